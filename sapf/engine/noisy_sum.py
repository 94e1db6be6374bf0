"""The one mechanism of every private release before training: the noisy sum.

For each record i of a Poisson sample (rate q) of the private data, a method supplies a
contribution vector c_i; the mechanism clips it to L2 norm Δ (a non-finite c_i counts as zero),
sums, adds N(0, (σΔ)² I) and records ``(name, σ, q, 1)`` in the ledger before it returns. One
record then moves the noiseless sum by at most Δ, so the release is a (subsampled) Gaussian
mechanism with noise multiplier σ that any accountant can recompute from ``privacy.json``.
Means are post-processing (divide by a noisy count, or by the public expected sample size).
The table of methods and their Δ lives in the design note ``noisy-sum.md``.

The Poisson sample and the noise come from fresh OS entropy (:mod:`sapf.engine.noise`). A site
runs the same function and sends its noisy sum; the server adds the sites' vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sapf.engine.noise import fresh_global_rng, fresh_numpy_generator
from sapf.engine.privacy import PrivacyLedger
from sapf.errors import SapfError


@dataclass(frozen=True)
class NoisySum:
    """One release: its ledger name, the bound Δ of a record's contribution, σ (noise std σΔ), q."""

    name: str
    bound: float
    noise_multiplier: float
    sample_rate: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise SapfError(f"{self.name}: the contribution bound must be finite and > 0, got {self.bound}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise SapfError(f"{self.name}: the noise multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise SapfError(f"{self.name}: the sample rate must lie in (0, 1], got {self.sample_rate}")


def clip_rows(c: torch.Tensor, bound: float) -> torch.Tensor:
    """Each row clipped to L2 norm `bound`; a row with a non-finite entry becomes zero."""
    c = c.double().flatten(1)
    c = torch.where(torch.isfinite(c).all(dim=1, keepdim=True), c, torch.zeros((), dtype=c.dtype))
    return c * (bound / (c.norm(dim=1, keepdim=True) + 1e-300)).clamp(max=1.0)


def noisy_sum(*, release: NoisySum, num_records: int, dim: int, contributions: Callable[[np.ndarray], torch.Tensor],
              ledger: PrivacyLedger | None, chunk: int = 128, progress: Callable[[], None] | None = None
              ) -> tuple[np.ndarray, int]:
    """Release Σ clip(c_i, Δ) + N(0, (σΔ)²) over a Poisson sample of the records: (noisy sum, records used).
    The count of records used is private (the sample's size; the accountant assumes it hidden): never release it.

    Args:
        release: name, bound Δ, noise multiplier σ (0: no noise, recorded as such) and sample rate q.
        num_records: N, the number of private records (indices 0..N-1).
        dim: the length d of a contribution vector.
        contributions: maps an array of record indices (at most `chunk`) to their contribution rows
            (len(indices), d); the mechanism clips them, so a method may return unbounded rows.
        ledger: where the release is recorded before this returns (None: the caller recorded it, as a
            site does before computing).
        chunk: records per call of `contributions` (compute only).
        progress: called after each chunk.
    """
    rng = fresh_numpy_generator()
    member = rng.random(num_records) < release.sample_rate if release.sample_rate < 1 else np.ones(num_records, bool)
    idx_all = np.flatnonzero(member)
    total = torch.zeros(dim, dtype=torch.float64)  # an empty sample still releases (noise only)
    with fresh_global_rng():  # whatever the contributions draw from torch's global generator is fresh too
        for b in range(0, len(idx_all), chunk):
            idx = idx_all[b : b + chunk]
            rows = clip_rows(contributions(idx), release.bound)
            if rows.shape[1] != dim:
                raise SapfError(f"{release.name}: a contribution has {rows.shape[1]} entries, expected {dim}")
            # One row a record: more rows (a record's replicas left unaveraged, say) would each get the bound Δ.
            if rows.shape[0] != len(idx):
                raise SapfError(f"{release.name}: {rows.shape[0]} contributions for {len(idx)} records")
            total += rows.sum(dim=0)
            if progress is not None:
                progress()
    summed = total.numpy()
    noisy = summed + rng.normal(0.0, release.noise_multiplier * release.bound, size=summed.shape) \
        if release.noise_multiplier > 0 else summed
    if ledger is not None:
        ledger.record(release.name, release.noise_multiplier, release.sample_rate, 1)
    return noisy, int(len(idx_all))
