"""SPARTA (Makni et al., KDD 2025): DP fine-tuning of a sparse set of *rows* chosen from noisy gradients.

Mask finding. ``mask_steps`` DP-SGD steps with learning rate 0 on every candidate weight of the public model: each
step releases the Gaussian-noised sum of the Poisson-sampled records' gradients, each record's gradient over all
candidates clipped to norm C as one vector — one noisy sum (:mod:`sapf.engine.noisy_sum`, Δ = C) recorded as
``sparta-mask`` with the step's sample rate, so the steps are accounted exactly as DP-SGD steps. A row is an output
unit (a Linear weight's row, a Conv2d weight's output channel); its score accumulates |noisy sum| over the row's
coordinates and the steps, as SPARTA's code does. The top ``row_fraction`` of each matrix's rows become trainable:
within one matrix every row has as many coordinates, so the noise adds alike to every score (across matrices of
different widths it would not).

Training. DP-SGD on those rows of the full weights of a copy of the UNet (everything else frozen). Each row-masked
weight carries its mask (``weight.row_mask``, 1 for a trainable row); :func:`mask_grad_samples` applies it to the
per-sample gradients before clipping, so frozen coordinates spend none of the clip, and :func:`mask_grads` to the
noisy gradient before the optimizer, so they never move (the discarded noise is post-processing). The trained UNet
is the merged model: base weights plus the masked delta.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sapf.engine.data import ImageDataset
from sapf.engine.device import compute_device
from sapf.engine.model import DiffusionModel
from sapf.engine.noisy_sum import NoisySum, noisy_sum
from sapf.engine.privacy import PrivacyLedger
from sapf.engine.saliency import Selection, candidate_modules, per_record_gradients
from sapf.errors import SapfError

RELEASE = "sparta-mask"


@dataclass(frozen=True, kw_only=True)
class MaskQuery:
    """The mask-finding steps' settings (defaults: :class:`sapf.config.MethodConfig`)."""

    candidates: str
    clip: float  # C: a record's gradient over all candidates is clipped to this norm
    sample_rate: float  # each step's Poisson rate
    steps: int
    row_fraction: float  # share of each matrix's rows made trainable
    chunk: int = 32  # records per gradient computation (compute only; a contribution is ~1 M floats)


def noisy_row_scores(gen: DiffusionModel, data: ImageDataset, q: MaskQuery, noise_multiplier: float,
                     ledger: PrivacyLedger | None, *, show_progress: bool = True, device: str = "cpu"
                     ) -> dict[str, np.ndarray]:
    """SPARTA's mask-finding steps: {matrix name: per-row score Σ_steps Σ_row |noisy sum|}. Each step is recorded in
    `ledger` before it returns (whatever σ, 0 included); batches, diffusion noise and Gaussian noise are fresh OS
    entropy."""
    from sapf.engine.progress import progress_bar

    if q.steps < 1:
        raise SapfError("SPARTA needs at least one mask-finding step")
    names = candidate_modules(gen.unet, q.candidates)
    gradients, close = per_record_gradients(gen, data, names, 1, compute_device(device))
    shapes = dict(gen.unet.named_modules())
    sizes = [shapes[n].weight.numel() for n in names]
    rows = [shapes[n].weight.shape[0] for n in names]

    def contributions(idx: np.ndarray) -> torch.Tensor:
        return torch.cat([g.flatten(1) for g in gradients(idx)], dim=1).cpu()  # clipped by the mechanism

    release = NoisySum(RELEASE, q.clip, noise_multiplier, q.sample_rate)
    scores = {n: np.zeros(r) for n, r in zip(names, rows, strict=True)}
    try:
        with progress_bar("SPARTA mask", q.steps, show_progress) as bar:
            for _ in range(q.steps):
                noisy, _ = noisy_sum(release=release, num_records=len(data), dim=sum(sizes),
                                     contributions=contributions, ledger=ledger, chunk=q.chunk)
                for n, block in zip(names, np.split(np.abs(noisy), np.cumsum(sizes)[:-1]), strict=True):
                    scores[n] += block.reshape(len(scores[n]), -1).sum(axis=1)
                bar.advance()
    finally:
        close()
    return scores


def top_rows(scores: dict[str, np.ndarray], row_fraction: float) -> dict[str, list[int]]:
    """The top `row_fraction` of each matrix's rows by score (at least one a matrix); ties by row order."""
    if not 0 < row_fraction <= 1:
        raise SapfError(f"the row fraction must lie in (0, 1], got {row_fraction}")
    out = {}
    for name, s in scores.items():
        k = rows_per_matrix(len(s), row_fraction)
        out[name] = sorted(int(i) for i in np.argsort(-s, kind="stable")[:k])
    return out


def row_counts(gen: DiffusionModel, candidates: str) -> dict[str, int]:
    """{candidate matrix: its number of rows}, in the model's order: the layout of a flat score vector."""
    modules = dict(gen.unet.named_modules())
    return {n: int(modules[n].weight.shape[0]) for n in candidate_modules(gen.unet, candidates)}


def flat_scores(scores: dict[str, np.ndarray]) -> np.ndarray:
    """The row scores as one vector (what a site sends)."""
    return np.concatenate([np.asarray(s, np.float64) for s in scores.values()])


def split_scores(vector: np.ndarray, counts: dict[str, int]) -> dict[str, np.ndarray]:
    """A flat score vector back to {matrix: row scores} (`counts` from :func:`row_counts`)."""
    if vector.shape != (sum(counts.values()),):
        raise SapfError(f"a row-score vector has shape {vector.shape}, expected ({sum(counts.values())},)")
    return dict(zip(counts, np.split(vector, np.cumsum(list(counts.values()))[:-1]), strict=True))


def rows_per_matrix(num_rows: int, row_fraction: float) -> int:
    """How many of a matrix's rows train: the top `row_fraction`, at least one."""
    return max(1, int(round(row_fraction * num_rows)))


def sparta_selection(gen: DiffusionModel, data: ImageDataset, q: MaskQuery, noise_multiplier: float,
                     ledger: PrivacyLedger | None, *, show_progress: bool = True, device: str = "cpu") -> Selection:
    """The mask from the released noisy row scores alone (written to ``selection.json`` with them)."""
    scores = noisy_row_scores(gen, data, q, noise_multiplier, ledger, show_progress=show_progress, device=device)
    rows = top_rows(scores, q.row_fraction)
    return Selection("sparta", list(scores), list(scores), noise_multiplier=noise_multiplier, clip=q.clip,
                     sample_rate=q.sample_rate, expected_examples=round(q.sample_rate * len(data), 6),
                     top_fraction=q.row_fraction,
                     extra={"rows": rows, "row_scores": {n: [float(v) for v in s] for n, s in scores.items()},
                            "mask_steps": q.steps, "sensitivity": q.clip})


def make_row_trainable(gen: DiffusionModel, rows: dict[str, list[int]]) -> nn.Module:
    """A copy of the UNet whose only trainable tensors are the weights holding chosen rows, each with its mask."""
    unet = copy.deepcopy(gen.unet)
    for p in unet.parameters():
        p.requires_grad_(False)
    modules = dict(unet.named_modules())
    missing = [n for n in rows if n not in modules or not hasattr(modules[n], "weight")]
    if missing:
        raise SapfError(f"module(s) not in the model: {', '.join(missing[:3])}")
    for name, chosen in rows.items():
        w = modules[name].weight
        if not chosen or min(chosen) < 0 or max(chosen) >= w.shape[0]:
            raise SapfError(f"{name}: rows must lie in 0..{w.shape[0] - 1}")
        mask = torch.zeros(w.shape[0])
        mask[chosen] = 1.0
        w.requires_grad_(True)
        w.row_mask = mask
    return unet.train()


def _masked(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if getattr(p, "row_mask", None) is not None]


def _on_rows(mask: torch.Tensor, t: torch.Tensor, row_dim: int) -> torch.Tensor:
    """`mask` (out,) shaped to multiply `t`, whose dimension `row_dim` holds the rows."""
    shape = [1] * t.dim()
    shape[row_dim] = -1
    return mask.to(t.device, t.dtype).view(shape)


def mask_grad_samples(params: list[nn.Parameter]) -> None:
    """Zero each per-sample gradient (B, out, ...) outside the trainable rows, before clipping."""
    for p in _masked(params):
        p.grad_sample = p.grad_sample * _on_rows(p.row_mask, p.grad_sample, 1)


def mask_grads(params: list[nn.Parameter]) -> None:
    """Zero each (noisy) gradient outside the trainable rows, so frozen coordinates never move."""
    for p in _masked(params):
        if p.grad is not None:
            p.grad.mul_(_on_rows(p.row_mask, p.grad, 0))


def row_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{trainable parameter name: its row mask}, for the parameters that carry one."""
    return {n: p.row_mask for n, p in model.named_parameters()
            if p.requires_grad and getattr(p, "row_mask", None) is not None}


def trainable_count(model: nn.Module) -> int:
    """Coordinates that can move: the chosen rows of the masked weights."""
    return sum(int(p.row_mask.sum().item()) * math.prod(p.shape[1:]) for p in _masked(list(model.parameters())))
