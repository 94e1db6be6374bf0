"""What both samplers (torch and ONNX) draw: labels, the seeded initial noise and, for a
stochastic sampler (eta > 0), the noise each step adds.

Torch-free, so the ONNX sampler shares it; numpy's generator makes the same seed give the same
images in both samplers.
"""

from __future__ import annotations

import numpy as np

from sapf.errors import SapfError


def sample_labels(num: int, num_classes: int, class_label: int | None) -> np.ndarray:
    """Class-balanced labels (0,1,2,...,0,1,...), or all `class_label`."""
    if num < 1:
        raise SapfError("--num must be at least 1")
    if class_label is not None:
        if num_classes == 0:
            raise SapfError("--class-label given, but the model is unconditional")
        if not 0 <= class_label < num_classes:
            raise SapfError(f"--class-label {class_label} is outside the model's classes 0..{num_classes - 1}")
        return np.full(num, class_label, np.int64)
    return (np.arange(num) % max(num_classes, 1)).astype(np.int64)


def initial_noise(num: int, channels: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num, channels, size, size)).astype(np.float32)


# DDIM's eta: 0 is the deterministic sampler, 1 adds DDPM's posterior noise at every step. Measured on
# fine-tuned models (README, *Sample quality*): the fresh noise corrects the small errors that eta = 0
# carries to the end, where they become broken strokes; eta = 1 draws connected digits.
DEFAULT_ETA = 1.0

# DDIM steps when none are given (`sapf sample`, both samplers, the diffusers pipeline, every run's grid). With eta = 1
# fewer, larger steps draw more recognisable digits at level FID, and take less time; 50 was diffusers' habit.
# Chosen by measurement: docs/experiments.md#sampler-steps.
DEFAULT_STEPS = 20


# Images a sampler runs at once. The torch sampler on a CPU runs faster in small batches (measured on 2 cores: 200
# guided samples, 10 DDIM steps, 24.4 s in one batch of 200, 18.2-19.5 s in batches of 16-64);
# onnxruntime (16.3-17.4 s, whatever the batch) and GPUs take the large one.
BATCH_SIZE, TORCH_CPU_BATCH_SIZE = 256, 32


def resolve_batch_size(batch_size: int | None, default: int = BATCH_SIZE) -> int:
    """The batch to sample in: `batch_size` checked, or (None) the sampler's `default`."""
    if batch_size is None:
        return default
    if batch_size < 1:
        raise SapfError("--batch-size must be at least 1")
    return batch_size


def check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise SapfError(f"--eta must lie in [0, 1], got {eta}")


def step_noise(first: int, count: int, steps: int, channels: int, size: int, seed: int) -> np.ndarray:
    """(steps, count, C, H, W): the noise images first..first+count-1 take at each sampling step.

    One generator per image, so an image is the same whatever the batch size it was drawn in.
    """
    return np.stack([np.random.default_rng([seed, 1, i]).standard_normal((steps, channels, size, size), np.float32)
                     for i in range(first, first + count)], axis=1)


# Classifier-free guidance weight w when none is given: a model that learnt a null class samples at this w, any other
# at w = 1 (the plain conditional sample). Chosen by measurement: docs/experiments.md#guidance.
GUIDANCE_WITH_NULL_CLASS = 1.5


def resolve_guidance(guidance: float | None, null_class: int | None) -> float:
    """The weight to sample with: `guidance` checked, or (None) the default for this model."""
    if guidance is None:
        return GUIDANCE_WITH_NULL_CLASS if null_class is not None else 1.0
    check_guidance(guidance, null_class)
    return float(guidance)


def check_guidance(guidance: float, null_class: int | None) -> None:
    if not (guidance == guidance and 0 <= guidance <= 20):  # NaN fails the first test
        raise SapfError(f"--guidance must lie in [0, 20], got {guidance}")
    if guidance != 1.0 and null_class is None:
        raise SapfError("--guidance needs a model trained with a null class (sapf pretrain --label-dropout); "
                        "this one has none: use --guidance 1")


def guided(cond: np.ndarray, uncond: np.ndarray, guidance: float) -> np.ndarray:
    """ε = ε_∅ + w (ε_y − ε_∅), computed the same way by every sampler."""
    return uncond + guidance * (cond - uncond)


def generator_latents(num: int, latent_dim: int, seed: int) -> np.ndarray:
    """The latents a one-pass generator (DP-MEPF) maps to images: (num, latent_dim), seeded."""
    return np.random.default_rng([seed, 2]).standard_normal((num, latent_dim)).astype(np.float32)
