"""Randomness that touches private data: fresh operating-system entropy for every release.

Every noise draw and every Poisson sample of a private computation — DP-SGD's Gaussian noise
and batches, the saliency query's noise, the diffusion noise and timesteps drawn inside a
private gradient — comes from a generator seeded here from ``os.urandom``, once per release.
Nothing a server or a reader of the outputs knows (``--seed``, the run config, a round number)
reaches it, so two releases never share a draw: a repeated request with any field changed gets
independent noise, and (σ₂y₁ − σ₁y₂)/(σ₂ − σ₁) recovers nothing. ``--seed`` governs public
randomness only (initialisation, public data, sample grids).

Caveat (as for every floating-point DP library without a CSPRNG sampler, Opacus's secure mode
included when torchcsprng is missing): the Gaussian is sampled by torch/numpy from a 64-bit
(torch) or 128-bit (numpy) OS-entropy seed in floating point. Mironov (CCS 2012) shows that the
low-order bits of floating-point noise can leak; sapf does not defend against that attack.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch


def fresh_torch_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with 64 bits of OS entropy (torch's seed width)."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def fresh_numpy_generator() -> np.random.Generator:
    """A numpy Generator seeded with 128 bits of OS entropy."""
    return np.random.default_rng(int.from_bytes(os.urandom(16), "little"))


@contextlib.contextmanager
def fresh_global_rng():
    """Inside a private computation, torch's global generator — what a network draws its own randomness from (the
    dropout of a user's base model, say) — is seeded from OS entropy, not left at what ``--seed`` set; outside it
    the global generator continues as before, so public randomness stays reproducible."""
    # Every initialised CUDA device's generator is restored too (torch.manual_seed reseeds them all).
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int.from_bytes(os.urandom(8), "little"))
        yield
