"""STAND-IN for tests only — not the real library; verifies Ferry's adapter contract, not Neuron behaviour.

``tests/standins`` holds minimal stand-ins for ``torch`` and ``torch_neuronx``,
which cannot be installed on the build machine (torch-neuronx needs AWS
Inferentia/Trainium hardware and AWS's own pip repository).  They exist only so
that ``tests/test_neuron_runtime.py`` can check what ``workers/neuron.py`` and
``scripts/compile_neuron.py`` do with the library: which calls they make, in
which order, with which arguments.  A test puts this directory on ``sys.path``
inside its own child process; nothing here is importable otherwise.
"""
