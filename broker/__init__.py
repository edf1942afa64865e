"""The broker contract (Redis keys and message layouts) and the batching broker process.

Gateways and workers depend on ``broker.keys`` and ``broker.messages`` only;
they never import each other.
"""
