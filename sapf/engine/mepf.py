"""DP-MEPF (Harder et al., "Pre-trained Perceptual Features Improve Differentially Private Image Generation", TMLR
2023): spend the whole budget once, on noisy per-class mean embeddings of the private data, then train a generator
to match them — with no further privacy cost.

The feature network. A small CNN classifier trained on *public* data only (the public digits; the seed is public
randomness). Its perceptual features of an image are four blocks — the image itself average-pooled to 7×7 and each
conv layer's activations pooled to 4×4, 2×2 and 1×1 — each scaled to unit norm and weighted 1/√4, so every layer
counts alike and the whole vector φ(x) has norm 1 (a zero block stays zero).

The release. Each private record (x_i, y_i) contributes

    c_i = [0, …, φ(x_i) in block y_i, …, 0 | e_{y_i}]        (K·D + K values)

so ‖c_i‖₂ ≤ Δ = √2, and the noisy sum over a Poisson sample is one Gaussian mechanism through
:mod:`sapf.engine.noisy_sum` (recorded as ``mean-embeddings``). Per-class means (noisy block sums over noisy
counts) are post-processing; a federated server adds the sites' noisy sums first. Only first moments are released:
a second release of squared features would split the budget for a statistic DP-MEPF finds of little use on MNIST.

The generator. DP-MEPF's kind: a small conditional convolutional generator (latent + class embedding → 7×7 →
28×28), trained so that the mean feature vector of its images of each class matches the released mean. Not the
public diffusion model: matching a mean embedding needs gradients through whole samples, which a 50-step sampler
makes ~50× dearer, and DP-MEPF's point is that a cheap generator suffices. It is a diffusers ``ModelMixin``
(``save_pretrained`` / ``from_pretrained`` directories, safetensors) and exports to ONNX as one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from sapf.engine.data import ImageDataset
from sapf.engine.noisy_sum import NoisySum, noisy_sum
from sapf.engine.privacy import PrivacyLedger
from sapf.errors import SapfError

RELEASE = "mean-embeddings"
BOUND = math.sqrt(2.0)  # a record's unit feature vector plus its count's 1
FEATURE_STEPS = 600  # Adam steps of the feature network on public data
FEATURE_BATCH = 128
GENERATOR_BATCH = 200  # images a generator step draws (class-balanced)
FEATURE_NET_VERSION = 3  # of the augmentations' images (augment and the others): part of public_feature_net's cache key

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (images in [-1, 1], public generator)


class FeatureNet(nn.Module):
    """A public-data classifier whose pooled activations are the perceptual features."""

    def __init__(self, channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.head = nn.Linear(128, num_classes)

    def blocks(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(feature blocks, logits) of images in [-1, 1]."""
        a1 = F.relu(self.conv1(x))
        a2 = F.relu(self.conv2(F.max_pool2d(a1, 2)))
        a3 = F.relu(self.conv3(F.max_pool2d(a2, 2)))
        pooled = a3.mean(dim=(2, 3))
        blocks = [F.adaptive_avg_pool2d((x + 1) / 2, 7), F.adaptive_avg_pool2d(a1, 4), F.adaptive_avg_pool2d(a2, 2),
                  pooled]
        return [b.flatten(1) for b in blocks], self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x): (N, D), each block at unit norm over √(number of blocks), so ‖φ(x)‖ ≤ 1."""
        blocks, _ = self.blocks(x)
        scaled = [b / (b.norm(dim=1, keepdim=True) + 1e-8) for b in blocks]
        return torch.cat(scaled, dim=1) / math.sqrt(len(scaled))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Public images as handwriting varies: a random slant, a thinner or thicker stroke, a shift of up to 2 pixels."""
    from sapf.engine.pretrain import random_slant

    return vary_stroke_and_shift(random_slant(x, (-0.2, 0.5), g), g)


def vary_stroke_and_shift(x: torch.Tensor, g: torch.Generator, *, soft_stroke: bool = False,
                          thinner: bool = True) -> torch.Tensor:
    """One stroke change for the batch — none, thicker (grey dilation), thinner (grey erosion; not when `thinner`
    is False) or, with `soft_stroke`, thicker and blurred as a scanned pen stroke — then a shift of up to 2 pixels."""
    changes = ["none", "thicker"] + (["thinner"] if thinner else []) + (["soft"] if soft_stroke else [])
    stroke = changes[int(torch.randint(0, len(changes), (1,), generator=g))]
    if stroke in ("thicker", "soft"):
        x = F.max_pool2d(x, 3, stride=1, padding=1)
    elif stroke == "thinner":
        x = -F.max_pool2d(-x, 3, stride=1, padding=1)
    if stroke == "soft":
        # Without count_include_pad the border averages background only (zero padding would draw a grey frame).
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    shift = torch.randint(-2, 3, (2,), generator=g)
    return torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))


def train_feature_net(public: ImageDataset, *, steps: int = FEATURE_STEPS, seed: int = 0,
                      augmentation: Augmentation = augment) -> FeatureNet:
    """The feature network, trained non-privately on public data (`augmentation`-ed; the seed is public)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet(public.channels, public.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x_all, y_all = torch.from_numpy(public.images), torch.from_numpy(public.labels).long()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (FEATURE_BATCH,), generator=g)
        loss = F.cross_entropy(net(augmentation(x_all[idx], g)), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def public_feature_net(public: ImageDataset, *, seed: int = 0, steps: int = FEATURE_STEPS,
                       augmentation: Augmentation = augment) -> FeatureNet:
    """:func:`train_feature_net`, from ``$SAPF_CACHE/classifiers/`` when trained before on the same public images
    and labels with the same seed, steps and augmentation (public data and public randomness: nothing private is
    cached)."""
    import hashlib

    from safetensors.torch import load_file

    from sapf.engine.evaluate import cache_dir
    from sapf.outputs import save_tensors

    h = hashlib.sha256(np.ascontiguousarray(public.images).tobytes())
    h.update(np.ascontiguousarray(public.labels).tobytes())
    # FEATURE_NET_VERSION names the augmentations' images (bumped when any of them changes), and an augmentation
    # other than `augment` adds its own name, so a changed recipe never reads an old network.
    recipe = "" if augmentation is augment else f"-{augmentation.__name__}"
    name = f"v{FEATURE_NET_VERSION}{recipe}-{h.hexdigest()[:16]}-seed{seed}-steps{steps}.safetensors"
    path = cache_dir() / "classifiers" / name
    if path.exists():
        net = FeatureNet(public.channels, public.num_classes)
        net.load_state_dict(load_file(str(path)))
        for p in net.parameters():
            p.requires_grad_(False)
        return net.eval()
    net = train_feature_net(public, steps=steps, seed=seed, augmentation=augmentation)
    save_tensors(path, net.state_dict())
    return net


def feature_dim(net: FeatureNet, channels: int, image_size: int) -> int:
    with torch.no_grad():
        return int(net.features(torch.zeros(1, channels, image_size, image_size)).shape[1])


def embedding_contributions(net: FeatureNet, data: ImageDataset, num_classes: int):
    """The per-record contribution function of the release (rows of K·D + K values, norm ≤ √2)."""
    x_all, y_all = torch.from_numpy(data.images), torch.from_numpy(data.labels).long()
    d = feature_dim(net, data.channels, data.images.shape[-1])

    @torch.no_grad()
    def contributions(idx: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(idx)
        f = net.features(x_all[idx]).double()
        y = y_all[idx]
        rows = torch.zeros(len(idx), num_classes * (d + 1), dtype=torch.float64)
        rows.scatter_(1, y[:, None] * d + torch.arange(d)[None, :], f)
        rows[torch.arange(len(idx)), num_classes * d + y] = 1.0
        return rows

    return contributions, num_classes * (d + 1)


def release_mean_embeddings(*, net: FeatureNet, data: ImageDataset, num_classes: int, noise_multiplier: float,
                            sample_rate: float = 1.0, ledger: PrivacyLedger | None) -> np.ndarray:
    """The one release: noisy per-class feature sums then noisy counts (K·D + K values), recorded in `ledger`."""
    contributions, dim = embedding_contributions(net, data, num_classes)
    noisy, _ = noisy_sum(release=NoisySum(RELEASE, BOUND, noise_multiplier, sample_rate), num_records=len(data),
                         dim=dim, contributions=contributions, ledger=ledger, chunk=512)
    return noisy


def mean_embeddings(noisy_sums: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Post-processing: (per-class means (K, D), noisy class counts (K,), at least 1)."""
    d, rem = divmod(noisy_sums.shape[0], num_classes)
    if rem or d < 2:
        raise SapfError(f"mean-embedding sums have {noisy_sums.shape[0]} values, not K·(D + 1) for K={num_classes}")
    d -= 1
    counts = np.maximum(noisy_sums[num_classes * d:], 1.0)
    return noisy_sums[: num_classes * d].reshape(num_classes, d) / counts[:, None], counts


class MeanEmbeddingGenerator(ModelMixin, ConfigMixin):
    """DP-MEPF's conditional convolutional generator: (latent, class) → image in [-1, 1]."""

    @register_to_config
    def __init__(self, num_classes: int = 10, image_size: int = 28, channels: int = 1, latent_dim: int = 32,
                 width: int = 64):
        super().__init__()
        if image_size % 4:
            raise SapfError(f"the generator draws images whose size is a multiple of 4, not {image_size}")
        self.start = image_size // 4
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(2 * latent_dim, 2 * width * self.start**2)
        self.body = nn.Sequential(
            nn.GroupNorm(8, 2 * width), nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.GroupNorm(8, width // 2), nn.SiLU(),
            nn.Conv2d(width // 2, channels, 3, padding=1),
        )

    def forward(self, noise: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([noise, self.embed(class_labels)], dim=1))
        # -1 for the batch: a traced len(noise) would fix the exported graph's batch size
        return torch.tanh(self.body(h.view(-1, 2 * self.config.width, self.start, self.start)))


def train_generator(net: FeatureNet, means: np.ndarray, *, image_size: int, channels: int, steps: int, lr: float,
                    seed: int = 0, show_progress: bool = True) -> tuple[MeanEmbeddingGenerator, list[float]]:
    """Train a generator whose per-class mean features match `means` (K, D): Σ_k ‖mean φ(G(z, k)) − m_k‖² over
    class-balanced batches. Post-processing of the release (public randomness, seeded). Returns (generator, loss
    curve) — the curve is a function of the DP release alone, so it is public."""
    from sapf.engine.progress import progress_bar

    k = len(means)
    torch.manual_seed(seed)
    gen = MeanEmbeddingGenerator(num_classes=k, image_size=image_size, channels=channels)
    g = torch.Generator().manual_seed(seed)
    target = torch.from_numpy(np.asarray(means, np.float32))
    labels = torch.arange(GENERATOR_BATCH) % k
    counts = torch.bincount(labels, minlength=k).float()[:, None]
    opt = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.999))
    losses = []
    with progress_bar("generator", steps, show_progress) as bar:
        for _ in range(steps):
            z = torch.randn(GENERATOR_BATCH, gen.config.latent_dim, generator=g)
            f = net.features(gen(z, labels))
            fake = torch.zeros(k, f.shape[1]).index_add_(0, labels, f) / counts
            loss = (fake - target).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.advance(loss=losses[-1])
    return gen.eval(), losses


def _generator_dir(path):
    """The folder holding a :class:`MeanEmbeddingGenerator` (`path`, or a run dir's ``model/``), or None."""
    import json
    from pathlib import Path

    for d in (Path(path), Path(path) / "model"):
        try:
            if json.loads((d / "config.json").read_text()).get("_class_name") == MeanEmbeddingGenerator.__name__:
                return d
        except (OSError, ValueError):
            continue
    return None


def is_generator_dir(path) -> bool:
    """Whether `path` (a model dir, or a run dir with ``model/``) holds a :class:`MeanEmbeddingGenerator`."""
    return _generator_dir(path) is not None


def load_mean_embedding_generator(path) -> MeanEmbeddingGenerator:
    d = _generator_dir(path)
    if d is None:
        raise SapfError(f"'{path}' holds no DP-MEPF generator (model/config.json of a MeanEmbeddingGenerator)")
    try:
        return MeanEmbeddingGenerator.from_pretrained(d, local_files_only=True, use_safetensors=True).eval()
    except Exception as e:  # diffusers raises many types for missing/corrupt weights
        raise SapfError(f"cannot load the DP-MEPF generator in '{d}': {str(e).splitlines()[0]}") from None


@torch.no_grad()
def sample_generator(gen: MeanEmbeddingGenerator, num: int, class_label: int | None = None, seed: int = 0,
                     batch_size: int | None = None, best_of: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, labels), with the latents and labels the ONNX sampler draws for the same seed (best_of: as
    :func:`sapf.engine.sampling.sample`'s)."""
    from sapf.outputs import to_uint8
    from sapf.public_classifier import best_of_candidates, candidate_labels, resolve_best_of
    from sapf.sampling_inputs import generator_latents, resolve_batch_size, sample_labels

    batch_size = resolve_batch_size(batch_size)
    c = gen.config
    best_of = resolve_best_of(best_of, c.num_classes, c.channels, c.image_size)
    wanted = sample_labels(num, c.num_classes, class_label)
    labels = candidate_labels(wanted, best_of)
    z = generator_latents(len(labels), c.latent_dim, seed)
    out = [gen(torch.from_numpy(z[b : b + batch_size]), torch.from_numpy(labels[b : b + batch_size])).numpy()
           for b in range(0, len(labels), batch_size)]
    return best_of_candidates(to_uint8(np.concatenate(out)), wanted, best_of), wanted


@torch.no_grad()
def generator_images(gen: MeanEmbeddingGenerator, num: int, *, seed: int = 0, batch_size: int = 256
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(float images in [-1, 1] (N, C, H, W), class-balanced labels): training data for a diffusion model's warm-up
    (``--warmup mean-embeddings``); public randomness, seeded."""
    labels = np.arange(num) % gen.config.num_classes
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num, gen.config.latent_dim, generator=g)
    out = [gen(z[b : b + batch_size], torch.from_numpy(labels[b : b + batch_size])).numpy()
           for b in range(0, num, batch_size)]
    return np.concatenate(out).astype(np.float32), labels
