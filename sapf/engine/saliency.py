"""Which weight matrices to fine-tune: the noisy saliency query (DP-SAPF) and its baselines.

The query. For each private example i, take the gradient g_i of the diffusion loss with
respect to every candidate matrix of the *public* model (mean over the example's K replicas),
clip the whole vector over all candidates to norm C: ĝ_i = g_i · min(1, C/‖g_i‖). Then

    score_j = Σ_i ‖ĝ_ij‖²        ("sqnorm", the reference implementation's score), or
    score_j = Σ_i ‖ĝ_ij‖         ("norm").

Sensitivity (add/remove one example changes the score vector by v with v_j = ‖ĝ_ij‖² or ‖ĝ_ij‖):
    sqnorm: ‖v‖₂ ≤ ‖v‖₁ = Σ_j ‖ĝ_ij‖² = ‖ĝ_i‖² ≤ C²
    norm:   ‖v‖₂ = sqrt(Σ_j ‖ĝ_ij‖²) = ‖ĝ_i‖ ≤ C
so adding N(0, (σ_s·Δ)²) to every score, Δ = C² or C, is a Gaussian mechanism with noise
multiplier σ_s (subsampled when the query uses a Poisson sample of the data).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from sapf.config import CANDIDATE_SETS, SCORES, SELECTIONS, ConfigError, MethodConfig
from sapf.engine.data import ImageDataset
from sapf.engine.device import compute_device
from sapf.engine.diffusion import add_noise, per_example_loss
from sapf.engine.model import DiffusionModel
from sapf.engine.noise import fresh_torch_generator
from sapf.engine.noisy_sum import NoisySum, noisy_sum
from sapf.engine.persample import (
    average_replicas,
    clear_grad_samples,
    replicate,
    wrap_for_per_sample_grads,
)
from sapf.engine.privacy import PrivacyLedger
from sapf.errors import SapfError

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
STRATEGIES = SELECTIONS


def carries_conditioning(name: str) -> bool:
    """The matrices through which the time step and the class reach the network: the time-embedding MLP and
    every ResNet block's projection of it (the class embedding is added to the time embedding)."""
    return name.startswith("time_embedding.") or name.endswith("time_emb_proj")


def candidate_modules(unet: nn.Module, include: str = "attention") -> list[str]:
    """Names of candidate weight matrices (module names, as peft's target_modules wants them).

    ``attention``: every attention projection. ``all``: also every other Linear and Conv2d.
    ``no-conditioning``: ``all`` but the matrices that carry the time/class conditioning.
    """
    if include not in CANDIDATE_SETS:
        raise SapfError(f"unknown candidate set '{include}' ({', '.join(CANDIDATE_SETS)})")
    names = []
    for name, mod in unet.named_modules():
        is_attn = isinstance(mod, nn.Linear) and any(name == p or name.endswith("." + p) for p in ATTENTION_PROJECTIONS)
        if include == "no-conditioning" and carries_conditioning(name):
            continue
        if is_attn or (include != "attention" and isinstance(mod, (nn.Linear, nn.Conv2d))):
            names.append(name)
    if not names:
        raise SapfError("the model has no candidate matrices (no attention projections); "
                        "the candidate set 'all' includes every Linear/Conv2d")
    return names


def score_sensitivity(score: str, clip: float) -> float:
    if score == "sqnorm":
        return clip**2
    if score == "norm":
        return clip
    raise SapfError(f"unknown score '{score}' ({', '.join(SCORES)})")


def top_count(num_candidates: int, top_fraction: float) -> int:
    if not 0 < top_fraction <= 1:
        raise ConfigError("top_fraction", f"must lie in (0, 1], got {top_fraction}")
    return max(1, int(round(top_fraction * num_candidates)))


@dataclass(kw_only=True)
class SaliencyQuery:
    """The query's settings (defaults: :class:`sapf.config.MethodConfig`); noise_multiplier comes from the
    privacy plan (0 = non-private)."""

    clip: float = MethodConfig.selection_clip
    multiplicity: int = MethodConfig.selection_multiplicity
    sample_rate: float = MethodConfig.selection_sample_rate
    score: str = MethodConfig.score
    candidates: str = MethodConfig.candidates
    batch_size: int = 128  # a compute chunk only: the query sums over all sampled examples


def per_record_gradients(gen: DiffusionModel, data: ImageDataset, names: list[str], multiplicity: int,
                         device: torch.device):
    """Per-record gradients of the diffusion loss with respect to the weights of the modules `names` of a frozen copy
    of the public model: (function mapping record indices to one (B, *weight.shape) tensor per name, each record's
    the mean of its K replicas; closer). The diffusion noise and timesteps are fresh OS entropy, drawn on the CPU."""
    unet = copy.deepcopy(gen.unet).train().to(device)
    for p in unet.parameters():
        p.requires_grad_(False)
    modules = dict(unet.named_modules())
    weights = [modules[n].weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    gsm = wrap_for_per_sample_grads(unet)
    conditional = gen.num_classes > 0
    x_all, y_all = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    K = multiplicity
    torch_gen = fresh_torch_generator()  # diffusion noise and timesteps inside a private gradient

    def gradients(idx: np.ndarray) -> list[torch.Tensor]:
        idx = torch.from_numpy(idx)
        x0, y = replicate(x_all[idx], K), replicate(y_all[idx], K)
        xt, t, noise = (v.to(device) for v in add_noise(gen.scheduler, x0, torch_gen))  # drawn on the CPU
        pred = gsm(xt, t, class_labels=y.to(device) if conditional else None).sample
        per_example_loss(pred, noise).mean().backward()
        average_replicas(weights, K)
        grads = [w.grad_sample for w in weights]
        clear_grad_samples(weights)
        return grads

    return gradients, gsm._close


def _block_score_contributions(gen: DiffusionModel, data: ImageDataset, q: SaliencyQuery, names: list[str],
                               device: torch.device):
    """The query's per-record contribution: v_ij = ‖ĝ_ij‖² (or ‖ĝ_ij‖) for each candidate j, where ĝ_i
    is record i's gradient over all candidates (mean of its K replicas) clipped to C as one vector.
    ‖v_i‖₂ ≤ C² (or C) by construction. Returns (contribution function, closer)."""
    gradients, close = per_record_gradients(gen, data, names, q.multiplicity, device)

    def contributions(idx: np.ndarray) -> torch.Tensor:
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in gradients(idx)], dim=1)  # ‖g_ij‖, (B, J)
        factor = (q.clip / (norms.norm(dim=1, keepdim=True) + 1e-12)).clamp(max=1.0)  # clip the whole g_i to C
        blocks = norms * factor  # ‖ĝ_ij‖
        return (blocks.pow(2) if q.score == "sqnorm" else blocks).cpu()

    return contributions, close


def noisy_saliency_scores(gen: DiffusionModel, data: ImageDataset, q: SaliencyQuery, noise_multiplier: float,
                          ledger: PrivacyLedger | None, show_progress: bool = True, device: str = "cpu"
                          ) -> tuple[list[str], np.ndarray]:
    """Run the DP saliency query, a noisy sum (:mod:`sapf.engine.noisy_sum`) of the per-record block
    scores: (candidate names, noisy scores).

    Recorded in `ledger` (whatever σ, 0 included: the ledger then says ε = ∞) before it returns.
    The Poisson sample, the diffusion noise and timesteps, and the Gaussian noise come from fresh
    OS entropy (:mod:`sapf.engine.noise`), never from a seed: two queries never share a draw.
    """
    from sapf.engine.progress import progress_bar

    names = candidate_modules(gen.unet, q.candidates)
    if q.multiplicity < 1:
        raise ConfigError("selection_multiplicity", "must be at least 1")
    release = NoisySum("saliency-query", score_sensitivity(q.score, q.clip), noise_multiplier, q.sample_rate)
    contributions, close = _block_score_contributions(gen, data, q, names, compute_device(device))
    expected_chunks = math.ceil(len(data) * q.sample_rate / q.batch_size)
    try:
        with progress_bar("saliency query", expected_chunks, show_progress) as bar:
            # The Poisson sample's size is private (the accountant assumes it hidden): dropped here.
            noisy, _ = noisy_sum(release=release, num_records=len(data), dim=len(names),
                                 contributions=contributions, ledger=ledger, chunk=q.batch_size,
                                 progress=bar.advance)
    finally:
        close()
    return names, noisy


def select_top(names: list[str], scores: np.ndarray, top_fraction: float) -> list[str]:
    k = top_count(len(names), top_fraction)
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return [names[i] for i in sorted(order)]


@dataclass
class Selection:
    """What was chosen and how; written as ``selection.json``."""

    strategy: str
    candidates: list[str]
    selected: list[str]
    scores: list[float] | None = None  # noisy
    noise_multiplier: float = 0.0
    clip: float | None = None
    sample_rate: float | None = None
    expected_examples: float | None = None  # a query's q·N: public (the plan and N); its sample's real size is not
    score: str | None = None
    multiplicity: int | None = None
    top_fraction: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sensitivity"] = (score_sensitivity(self.score, self.clip) if self.score and self.clip
                            else self.extra.get("sensitivity"))
        return d


def choose_matrices(strategy: str, gen: DiffusionModel, data: ImageDataset | None, q: SaliencyQuery,
                    top_fraction: float, noise_multiplier: float, ledger: PrivacyLedger | None, seed: int,
                    show_progress: bool = True, device: str = "cpu") -> Selection:
    """One interface for every strategy; only ``saliency`` touches private data (with fresh randomness:
    `seed` drives the public ``random`` strategy only)."""
    if strategy not in STRATEGIES:
        raise SapfError(f"unknown selection '{strategy}' ({', '.join(STRATEGIES)})")
    names = candidate_modules(gen.unet, q.candidates)
    if strategy == "saliency":
        names, scores = noisy_saliency_scores(gen, data, q, noise_multiplier, ledger, show_progress, device)
        return Selection(strategy, names, select_top(names, scores, top_fraction), [float(s) for s in scores],
                         noise_multiplier, q.clip, q.sample_rate, round(q.sample_rate * len(data), 6), q.score,
                         q.multiplicity, top_fraction)
    if strategy == "attention":
        return Selection(strategy, names, candidate_modules(gen.unet, "attention"))
    if strategy == "random":
        k = top_count(len(names), top_fraction)
        pick = np.random.default_rng([seed, 2]).choice(len(names), k, replace=False)
        return Selection(strategy, names, [names[i] for i in sorted(pick)], top_fraction=top_fraction)
    return Selection(strategy, names, [n for n, _ in gen.unet.named_parameters()])
