"""sapf: differentially private image synthesis across organisations (DP-SAPF).

The engine lives in :mod:`sapf.engine`, the Flower apps in :mod:`sapf.federation`,
ONNX export and the torch-free sampler in :mod:`sapf.export`; :mod:`sapf.cli` is a thin
Typer front end over them.
"""

__version__ = "0.1.0"
