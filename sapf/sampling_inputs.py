"""What both samplers (torch and ONNX) start from: labels and the seeded initial noise.

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
