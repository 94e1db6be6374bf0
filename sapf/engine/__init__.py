"""The sapf engine: plain functions and small dataclasses, one concept a module.

Settings live in :mod:`sapf.config` (torch-free). A run, in the order it happens:

- :mod:`sapf.engine.run`       — `sapf train` / `sapf select` end to end: plan, run the stages, write the run dir
- :mod:`sapf.engine.stages`    — a run as a list of stages sharing one privacy plan and one ledger
- :mod:`sapf.engine.privacy`   — the ledger, the accountant and the split of ε over the stages
- :mod:`sapf.engine.noisy_sum` — the one mechanism of every release before training: clipped sum + Gaussian noise
- :mod:`sapf.engine.noise`     — fresh OS-entropy generators for everything that touches private data
- :mod:`sapf.engine.saliency`  — the noisy saliency query (DP-SAPF) and the selection strategies
- :mod:`sapf.engine.finetune`  — DP-LoRA / DP full fine-tuning with Opacus
- :mod:`sapf.engine.persample` — per-sample gradients (with augmentation multiplicity)
- :mod:`sapf.engine.diffusion` — the noise-prediction loss
- :mod:`sapf.engine.data`      — built-in and user datasets, splits, site partitions
- :mod:`sapf.engine.model`     — :class:`~sapf.engine.model.DiffusionModel`, loading/saving pipeline dirs
- :mod:`sapf.engine.pretrain`  — non-private pretraining of the public generator
- :mod:`sapf.engine.sampling`  — the torch DDIM sampler
- :mod:`sapf.engine.evaluate`  — FID/KID, precision/recall, downstream accuracy on sapf's own networks

The modules are imported on demand so that light users (the ONNX sampler) never pay for PyTorch.
"""
