"""DP-FETA's central images (Li et al., "From Easy to Hard", S&P 2025) and the warm-up on them.

The release. Each private record (x_i, y_i) contributes its image downsampled 2× and mapped to [0, 1]
(flattened, d = C·h·w values), clipped to L2 norm B, placed in the block of its class y_i, plus a 1 in
that class's count:

    c_i = [0, …, clip(x̃_i, B) in block y_i, …, 0 | e_{y_i}]        (K·d + K values)

so ‖c_i‖₂ ≤ Δ = √(B² + 1), and the noisy sum over a Poisson sample is one Gaussian mechanism through
:mod:`sapf.engine.noisy_sum` (recorded as ``central-images``). The per-class means — noisy block sums
over noisy counts — are post-processing, as are the upsampling and the light blur that follow, and a
federated server simply adds the sites' noisy sums before dividing.

B is a public number: a high quantile of the norms of *public* images at the same size (clipping near
the images' real norm, not at the pixel-range maximum √d, keeps the noise small).

The warm-up trains the whole public model on the central images (with random shifts and slants) for a
few steps before DP fine-tuning: post-processing of the release, so it costs no privacy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from sapf.engine.data import ImageDataset
from sapf.engine.model import DiffusionModel
from sapf.engine.noisy_sum import NoisySum, noisy_sum
from sapf.engine.privacy import PrivacyLedger
from sapf.errors import SapfError

RELEASE = "central-images"
REDUCE = 2  # downsampling factor of the released images
BOUND_QUANTILE = 0.9  # of the public images' norms


def reduced(images: torch.Tensor) -> torch.Tensor:
    """Model-space images (N, C, H, W) in [-1, 1] → 2×-downsampled, in [0, 1], flattened (N, C·H/2·W/2)."""
    x = F.avg_pool2d(images.float(), REDUCE)
    return ((x + 1) / 2).flatten(1)


def image_bound(public: ImageDataset) -> float:
    """B: the BOUND_QUANTILE quantile of the reduced public images' L2 norms (public data only)."""
    norms = reduced(torch.from_numpy(public.images)).norm(dim=1).numpy()
    return float(np.quantile(norms, BOUND_QUANTILE))


def contribution_bound(bound: float) -> float:
    """Δ = √(B² + 1): a record's clipped image plus its count's 1."""
    return math.sqrt(bound**2 + 1.0)


def central_image_contributions(data: ImageDataset, num_classes: int, bound: float):
    """The per-record contribution function of the release (rows of K·d + K values, norm ≤ Δ)."""
    x_all, y_all = torch.from_numpy(data.images), torch.from_numpy(data.labels).long()
    d = reduced(x_all[:1]).shape[1]

    def contributions(idx: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(idx)
        x = reduced(x_all[idx]).double()
        x = x * (bound / (x.norm(dim=1, keepdim=True) + 1e-12)).clamp(max=1.0)
        y = y_all[idx]
        rows = torch.zeros(len(idx), num_classes * (d + 1), dtype=torch.float64)
        cols = y[:, None] * d + torch.arange(d)[None, :]
        rows.scatter_(1, cols, x)
        rows[torch.arange(len(idx)), num_classes * d + y] = 1.0
        return rows

    return contributions, num_classes * (d + 1)


def release_central_images(*, data: ImageDataset, num_classes: int, bound: float, noise_multiplier: float,
                           sample_rate: float, queries: int, ledger: PrivacyLedger | None) -> np.ndarray:
    """The noisy sum of the contributions over `queries` Poisson samples (each one recorded): a vector of
    K·d block sums followed by K counts."""
    contributions, dim = central_image_contributions(data, num_classes, bound)
    release = NoisySum(RELEASE, contribution_bound(bound), noise_multiplier, sample_rate)
    total = np.zeros(dim)
    for _ in range(queries):
        noisy, _ = noisy_sum(release=release, num_records=len(data), dim=dim, contributions=contributions,
                             ledger=ledger, chunk=512)
        total += noisy
    return total


def central_images(noisy_sums: np.ndarray, num_classes: int, channels: int, image_size: int) -> np.ndarray:
    """Post-processing: per-class means (block sums over counts of at least 1), lightly blurred (the noise is per
    pixel, the digits are smooth), contrast-stretched, upsampled to the model's size, in model space [-1, 1]:
    (K, C, H, W)."""
    h = image_size // REDUCE
    d = channels * h * h
    if noisy_sums.shape != (num_classes * (d + 1),):
        raise SapfError(f"central-image sums have {noisy_sums.shape[0]} values, expected {num_classes * (d + 1)}")
    sums = torch.from_numpy(noisy_sums[: num_classes * d].reshape(num_classes, channels, h, h)).float()
    counts = torch.from_numpy(noisy_sums[num_classes * d:]).float().clamp(min=1.0)
    means = (sums / counts[:, None, None, None]).clamp(0, 1)
    means = F.avg_pool2d(F.pad(means, (1, 1, 1, 1), mode="replicate"), 3, stride=1)  # 3×3 blur
    # A mean of many digits is a dim, wide stroke; stretch each to the pixel range the model draws in.
    top = torch.quantile(means.flatten(1), 0.99, dim=1).clamp(min=1e-3)
    means = (means / top[:, None, None, None]).clamp(0, 1)
    up = F.interpolate(means, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (up * 2 - 1).clamp(-1, 1).numpy()


def warm_up(gen: DiffusionModel, images: np.ndarray, *, steps: int, lr: float, label_dropout: float = 0.0,
            labels: np.ndarray | None = None, batch_size: int = 64, seed: int = 0, show_progress: bool = True,
            device: str = "cpu") -> DiffusionModel:
    """Train every weight of a copy of the model on images made from a DP release — the central images (one per
    class, label = its row) or a DP-MEPF generator's samples (`labels`) — each batch randomly shifted by up to 2
    pixels and slanted: post-processing."""
    import copy

    from sapf.engine.device import compute_device
    from sapf.engine.diffusion import add_noise, drop_labels, per_example_loss, predict
    from sapf.engine.pretrain import random_slant
    from sapf.engine.progress import progress_bar

    if steps < 1:
        return gen
    g = torch.Generator().manual_seed(seed)  # public randomness: the release is already noised
    device = compute_device(device)
    unet = copy.deepcopy(gen.unet).train().to(device)
    for p in unet.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    x_all = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    y_all = torch.arange(len(x_all)) if labels is None else torch.from_numpy(np.asarray(labels)).long()
    with progress_bar("warm-up", steps, show_progress) as bar:
        for _ in range(steps):
            idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
            x = random_slant(x_all[idx], (-0.1, 0.3), g)
            shift = torch.randint(-2, 3, (2,), generator=g)
            x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            labels = drop_labels(y_all[idx], gen.null_class, label_dropout, g)
            xt, t, noise = (v.to(device) for v in add_noise(gen.scheduler, x, g))  # drawn on the CPU, as seeded
            loss = per_example_loss(predict(unet, xt, t, labels.to(device)), noise).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.advance(loss=loss.item())
    for p in unet.parameters():
        p.requires_grad_(False)
    return DiffusionModel(unet.eval().cpu(), gen.scheduler, gen.source, gen.null_class)
