"""The sapf engine: plain functions and small dataclasses, one concept a module.

- :mod:`sapf.engine.data`      — built-in and user datasets, splits, site partitions
- :mod:`sapf.engine.model`     — the class-conditional UNet, loading/saving diffusers dirs
- :mod:`sapf.engine.pretrain`  — non-private pretraining of the public generator
- :mod:`sapf.engine.sampling`  — the torch DDIM sampler
- :mod:`sapf.engine.privacy`   — the privacy ledger and noise calibration
- :mod:`sapf.engine.persample` — per-sample gradients (with augmentation multiplicity)
- :mod:`sapf.engine.saliency`  — the noisy saliency query (DP-SAPF) and selection strategies
- :mod:`sapf.engine.finetune`  — DP-LoRA / DP full fine-tuning with Opacus

The modules are imported on demand so that light users (the ONNX sampler) never pay for
PyTorch.
"""
