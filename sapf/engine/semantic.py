"""PrivImage's semantic query (Li et al., USENIX Security 2024; as DPImageBench implements it): which public classes
is the private data made of? Then pretrain on just those.

The classifier. A CNN (:class:`sapf.engine.mepf.FeatureNet`'s architecture) trained on the public pool's semantic
labels — public data only, seeded, with images varied as handwriting varies (:func:`augment_pool_images`).

The release. Each private record (x_i, y_i) votes for the k public classes the classifier ranks highest for x_i, in
the row of its private label y_i (row 0 when the data has no labels):

    c_i = k ones at (y_i, top-k(x_i)) of a K × P histogram        ‖c_i‖₂ = √k = Δ

one noisy sum through :mod:`sapf.engine.noisy_sum` (recorded as ``semantic-query``). A federated server adds the
sites' noisy histograms.

The choice (post-processing of the noisy histogram alone): for each private label, the ``per_label`` public classes
with the highest noisy counts in its row; their union is the pretraining subset. Conditioning: each chosen public
class is relabelled as the private label whose row chose it (the row where its noisy count is highest, when several
did), so the pretrained model is conditional on the *private* labels and DP fine-tuning starts with each label's
embedding already trained on the public images that look like it. (DPImageBench's PrivImage pretrains on the chosen
classes' own labels and learns the private labels' embeddings from scratch during fine-tuning; relabelling needs no
extra privacy and spends none of the fine-tuning budget on learning what a "7" is.)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from sapf.engine.data import ImageDataset
from sapf.engine.noisy_sum import NoisySum, noisy_sum
from sapf.engine.privacy import PrivacyLedger
from sapf.errors import SapfError

RELEASE = "semantic-query"


@dataclass(frozen=True, kw_only=True)
class SemanticQuery:
    """The query's settings (defaults: :class:`sapf.config.MethodConfig`)."""

    top_k: int  # public classes each private record votes for (Δ = √k)
    per_label: int  # public classes chosen per private label
    sample_rate: float = 1.0


def augment_pool_images(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The pool classifier's augmentation: DP-MEPF's (:func:`sapf.engine.mepf.augment`: slant, thinner or thicker
    stroke, shift) widened by a random rotation (±15°) and scale (0.80–1.15), and a soft thick stroke (dilated, then
    blurred), since handwriting varies in all of these more than fonts and pen strokes do.

    Why: with DP-MEPF's augmentation alone a seed-2 classifier put more MNIST 2s under ``texture astronaut`` than
    under ``digit 2``, so the query chose a texture for label 2 at ε = 10 whatever the noise. With this one the
    noiseless histogram gives every label its own digit for seeds 0, 1 and 2 (docs/experiments.md#pool-classifier).
    """
    from sapf.engine.pretrain import vary_as_handwriting

    return vary_as_handwriting(x, (-0.2, 0.5), g)


def train_pool_classifier(pool: ImageDataset, *, seed: int, steps: int):
    """The pool classifier: a public feature network trained on the pool's semantic labels for `steps` Adam steps
    (:class:`sapf.config.MethodConfig`'s ``semantic_classifier_steps``), with :func:`augment_pool_images` (cached)."""
    from sapf.engine.mepf import public_feature_net

    return public_feature_net(pool, seed=seed, steps=steps, augmentation=augment_pool_images)


def semantic_contributions(net, data: ImageDataset, num_public: int, top_k: int, num_labels: int | None = None):
    """The per-record contribution function (rows of K·P values: k ones in the record's label row). K is
    `num_labels` (a site passes its model's classes, so every site's histogram has the server's rows; data may hold
    fewer), else the data's."""
    if not 1 <= top_k <= num_public:
        raise SapfError(f"the semantic query's top-k must lie in 1..{num_public}, got {top_k}")
    rows_k = max(num_labels if num_labels is not None else data.num_classes, 1)
    if data.num_classes > rows_k:
        raise SapfError(f"the data has {data.num_classes} labels, more than the histogram's {rows_k} rows")
    x_all = torch.from_numpy(data.images)
    y_all = torch.from_numpy(data.labels).long() if data.num_classes else torch.zeros(len(data), dtype=torch.long)

    @torch.no_grad()
    def contributions(idx: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(idx)
        top = net(x_all[idx]).topk(top_k, dim=1).indices
        rows = torch.zeros(len(idx), rows_k * num_public, dtype=torch.float64)
        rows.scatter_(1, y_all[idx][:, None] * num_public + top, 1.0)
        return rows

    return contributions, rows_k * num_public


def release_semantic_histogram(*, net, data: ImageDataset, num_public: int, query: SemanticQuery,
                               noise_multiplier: float, ledger: PrivacyLedger | None,
                               num_labels: int | None = None) -> np.ndarray:
    """The noisy K × P histogram (recorded in `ledger`; None: the caller recorded it, as a site does)."""
    contributions, dim = semantic_contributions(net, data, num_public, query.top_k, num_labels)
    release = NoisySum(RELEASE, math.sqrt(query.top_k), noise_multiplier, query.sample_rate)
    noisy, _ = noisy_sum(release=release, num_records=len(data), dim=dim, contributions=contributions,
                         ledger=ledger, chunk=512)
    return noisy.reshape(-1, num_public)


def choose_public_classes(histogram: np.ndarray, per_label: int) -> dict[int, int]:
    """{chosen public class: the private label it stands for}, from the noisy histogram alone.

    Cells are taken in decreasing noisy count; a label takes a class while it has fewer than `per_label` and no label
    with a higher count took that class. So every label gets its own classes (when the pool has enough): letting each
    label take only its top classes left a label whose top class another label held more strongly (MNIST's 9 and the
    pool's "digit 8") with no pretraining data at all, and its samples unreadable."""
    if not 1 <= per_label <= histogram.shape[1]:
        raise SapfError(f"the classes chosen per label must lie in 1..{histogram.shape[1]}, got {per_label}")
    chosen: dict[int, int] = {}
    taken = np.zeros(histogram.shape[0], np.int64)
    for cell in np.argsort(-histogram, axis=None, kind="stable"):
        label, c = divmod(int(cell), histogram.shape[1])
        if taken[label] < per_label and c not in chosen:
            chosen[c] = label
            taken[label] += 1
    return dict(sorted(chosen.items()))


def public_subset(pool: ImageDataset, chosen: dict[int, int], num_labels: int) -> ImageDataset:
    """The pool's images of the chosen classes, relabelled as the private labels they stand for."""
    keep = np.isin(pool.labels, list(chosen))
    labels = np.array([chosen[int(c)] for c in pool.labels[keep]], np.int64)
    names = [f"label {k}" for k in range(num_labels)]
    return ImageDataset(pool.images[keep], labels, num_labels, f"{pool.name}[{len(chosen)} classes]", names)


def choice_record(histogram: np.ndarray, chosen: dict[int, int], pool: ImageDataset, query: SemanticQuery,
                  noise_multiplier: float) -> dict:
    """``semantic_query.json``: the noisy histogram, what it chose, and the mechanism's parameters. The histogram is
    kept at full precision so that anyone can recompute the choice from it (a federated histogram is unit-L1 scaled;
    rounding it made near-ties)."""
    return {"release": RELEASE, "noise_multiplier": noise_multiplier, "sensitivity": math.sqrt(query.top_k),
            "top_k": query.top_k, "per_label": query.per_label, "sample_rate": query.sample_rate,
            "public_classes": pool.class_names, "histogram": histogram.astype(float).tolist(),
            "chosen": [{"public_class": pool.class_names[c], "index": c, "private_label": y}
                       for c, y in chosen.items()]}


def choice_key(chosen: dict[int, int], pretrain_config: dict) -> str:
    """Names a pretrained generator by what it was trained on: the choice and the pretraining settings."""
    import hashlib

    blob = json.dumps({"chosen": sorted(chosen.items()), "pretrain": pretrain_config}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrain_config_for(base, steps: int, seed: int):
    """Pretraining settings with the base model's architecture, image size and null class (equal compute across
    choices, and a site can load the pretrained weights into the base it installed)."""
    from sapf.config import PretrainConfig

    c = base.unet.config
    dropout = PretrainConfig.label_dropout if base.null_class is not None else 0.0
    return PretrainConfig(data="public-pool subset", image_size=base.image_size, steps=steps, label_dropout=dropout,
                          block_out_channels=list(c.block_out_channels), layers_per_block=int(c.layers_per_block),
                          attention_head_dim=int(c.attention_head_dim), norm_num_groups=int(c.norm_num_groups),
                          seed=seed)


def pretrained_on_choice(pool: ImageDataset, chosen: dict[int, int], num_labels: int, base, *, steps: int, seed: int,
                         show_progress: bool = True):
    """The generator pretrained on the chosen classes (public data, no privacy cost), from the cache when this choice
    was pretrained before with the same settings (``$SAPF_CACHE/pretrained/<key>``)."""
    from sapf.engine.evaluate import cache_dir
    from sapf.engine.model import load_generator, save_generator
    from sapf.engine.pretrain import pretrain
    from sapf.outputs import atomic_output_dir

    cfg = pretrain_config_for(base, steps, seed)
    key = choice_key(chosen, {**cfg.to_dict(), "pool": pool.name, "pool_records": len(pool),
                              "channels": pool.channels})
    d = cache_dir() / "pretrained" / key
    if (d / "unet" / "config.json").exists():
        return load_generator(d)
    gen, _ = pretrain(cfg, public_subset(pool, chosen, num_labels), show_progress)
    with atomic_output_dir(d, force=True) as tmp:
        save_generator(gen, tmp)
    return load_generator(d)
