"""The sapf engine: plain functions and small dataclasses, one concept a module.

Settings live in :mod:`sapf.config` (torch-free). A run, in the order it happens:

- :mod:`sapf.engine.run`       — `sapf train` / `sapf select` end to end: plan, run the stages, write the run dir
- :mod:`sapf.engine.stages`    — a run as a list of stages sharing one privacy plan and one ledger
- :mod:`sapf.engine.privacy`   — the ledger, the accountant and the split of ε over the stages
- :mod:`sapf.engine.noisy_sum` — the one mechanism of every release before training: clipped sum + Gaussian noise
- :mod:`sapf.engine.noise`     — fresh OS-entropy generators for everything that touches private data
- :mod:`sapf.engine.central_images` — DP-FETA's noisy per-class central images and the warm-up on them
- :mod:`sapf.engine.saliency`  — the noisy saliency query (DP-SAPF) and the selection strategies
- :mod:`sapf.engine.sparta`    — SPARTA's noisy row scores, row masks and row-masked training
- :mod:`sapf.engine.finetune`  — DP-LoRA / DP full fine-tuning with Opacus
- :mod:`sapf.engine.persample` — per-sample gradients (with augmentation multiplicity)
- :mod:`sapf.engine.device`    — where the networks compute (cpu, cuda); the draws stay fresh OS entropy
- :mod:`sapf.engine.diffusion` — the noise-prediction loss
- :mod:`sapf.engine.data`      — built-in and user datasets, splits, site partitions
- :mod:`sapf.engine.model`     — :class:`~sapf.engine.model.DiffusionModel`, loading/saving pipeline dirs
- :mod:`sapf.engine.pretrain`  — non-private pretraining of the public generator
- :mod:`sapf.engine.sampling`  — the torch DDIM sampler
- :mod:`sapf.engine.evaluate`  — class fidelity, FID/KID, precision/recall, downstream accuracy on sapf's own networks

The modules are imported on demand so that light users (the ONNX sampler) never pay for PyTorch.
"""
