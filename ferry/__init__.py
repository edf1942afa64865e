"""Ferry: batched inference serving over the Open Inference Protocol."""

__version__ = "0.1.0"
