"""How the server should combine the sites' noisy central images (DP-FETA across sites): each combination's error
against the noiseless central images, and how far one site can move a pixel.

Each site answers as `sapf federate` plans it (`sapf.federation.task.plan_site`: the default plan's σ, sample rate and
queries; `release_central_images`), on an equal split of mnist5k's training share. The combinations run on the same
releases, and `central_images` post-processes each one. Error: the mean absolute difference from the noiseless
combination (model space, range 2). The noise is fresh (OS entropy) in every draw, so two runs differ a little.

    python benchmarks/central_combination.py                 # 4 sites, 3 draws, ~1 min on 2 cores
    python benchmarks/central_combination.py --sites 8 --draws 5

Writes benchmarks/results/central_combination.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import save, table  # noqa: E402

INFLUENCE = {
    "sum": "unbounded",
    "mean-clamped-0-1": "≤ 1/sites",
    "mean-clamped-wide": "≤ 3/sites",
    "median-clamped-wide": "within the honest sites' values (honest majority)",
}


def combinations(vectors: list[np.ndarray], k: int, d: int) -> dict[str, np.ndarray]:
    """Every candidate, each in the (sums, counts) layout `central_images` reads; the last is sapf's."""
    from sapf.federation.combine import CENTRAL_MEAN_RANGE, combine_central_sums, site_class_means

    def means(lo, hi):
        return [site_class_means(v, k, d, lo, hi) for v in vectors]

    def layout(m):
        return np.concatenate([m.ravel(), np.ones(k)])

    return {"sum": np.sum(vectors, axis=0),
            "mean-clamped-0-1": layout(np.mean(means(0.0, 1.0), axis=0)),
            "mean-clamped-wide": layout(np.mean(means(*CENTRAL_MEAN_RANGE), axis=0)),
            "median-clamped-wide": combine_central_sums(vectors, k, d)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="public: the split into sites")
    a = ap.parse_args()

    from sapf.engine.central_images import REDUCE, central_images, image_bound, release_central_images
    from sapf.engine.data import load_dataset
    from sapf.engine.model import load_generator
    from sapf.engine.run import load_private_data
    from sapf.federation.task import FederationConfig, plan_site

    gen = load_generator(None)
    cfg = FederationConfig(num_sites=a.sites).for_model(conditional=True)
    data = load_private_data(cfg.data, gen, cfg.holdout)
    bound = image_bound(load_dataset(cfg.public_data, gen.image_size, gen.channels))
    k, d = gen.num_classes, gen.channels * (gen.image_size // REDUCE) ** 2
    sites = [data.subset(idx, f"site-{i}")
             for i, idx in enumerate(np.array_split(np.random.default_rng(a.seed).permutation(len(data)), a.sites))]
    plans = [plan_site(cfg, len(s)) for s in sites]

    def releases(noisy: bool) -> list[np.ndarray]:
        return [release_central_images(data=s, num_classes=k, bound=bound,
                                       noise_multiplier=p.central_noise if noisy else 0.0,
                                       sample_rate=cfg.central_sample_rate if noisy else 1.0,
                                       queries=cfg.central_queries, ledger=None)
                for s, p in zip(sites, plans, strict=True)]

    def images(sums):
        return central_images(sums, k, gen.channels, gen.image_size)

    clean = {name: images(c) for name, c in combinations(releases(False), k, d).items()}
    errors: dict[str, list[float]] = {name: [] for name in clean}
    for _ in range(a.draws):
        for name, c in combinations(releases(True), k, d).items():
            errors[name].append(float(np.abs(images(c) - clean[name]).mean()))
    rows = [{"combination": name, "error_min": min(e), "error_max": max(e), "error_mean": float(np.mean(e)),
             "influence": INFLUENCE[name]} for name, e in errors.items()]
    path = save("central_combination", rows, {"sites": a.sites, "draws": a.draws, "seed": a.seed,
                                              "noise_multiplier": plans[0].central_noise,
                                              "records_per_site": [len(s) for s in sites]})
    print(table(rows, ["combination", "error_min", "error_max", "error_mean", "influence"]))
    print(f"σ = {plans[0].central_noise:.3g}; {path}")


if __name__ == "__main__":
    main()
