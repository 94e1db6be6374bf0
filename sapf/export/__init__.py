"""ONNX export and the torch-free ONNX sampler.

- :mod:`sapf.export.onnx_export`  — ``export_onnx``: UNet → ``FILE.onnx`` + ``FILE.onnx.json``,
  with a parity check against PyTorch (needs torch and onnxscript)
- :mod:`sapf.export.onnx_sampler` — ``OnnxSampler``: DDIM in numpy + onnxruntime (no torch)

Nothing is imported here, so that importing the sampler never pulls in PyTorch.
"""
