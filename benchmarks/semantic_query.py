"""What PrivImage's semantic query chooses from `public-pool` for the private MNIST digits, per ε and seed.

The query as `sapf train --public-selection semantic` plans it (its share of ε at the run's target ε, δ = 1e-5, on
mnist5k's 4,000 training records): the pool classifier (seeded), one noisy histogram, a public class for each private
label (strongest noisy counts first, as `choose_public_classes` does). Reported: the chosen classes, how many
private labels got their own digit, and what else was chosen. The noise is fresh OS entropy, so seeds differ in the
noise as well as in the classifier. One draw per seed says little at ε = 1, so each row also gives the own digits
expected over 400 simulated draws: the noiseless histogram (a statistic of the private data, which this benchmark
may compute and a run never releases) plus the query's Gaussian noise, chosen from as `choose_public_classes` does.

    python benchmarks/semantic_query.py                  # ε 1 and 10, seeds 0 1 2: a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402

from sapf.config import TrainConfig  # noqa: E402

SIMULATED_DRAWS = 400


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 10.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--top-k", type=int, default=TrainConfig.semantic_top_k)
    ap.add_argument("--per-label", type=int, default=TrainConfig.semantic_per_label)
    ap.add_argument("--budget", type=float, default=TrainConfig.semantic_budget, help="The query's share of ε.")
    args = ap.parse_args()

    from sapf.engine.data import load_dataset
    from sapf.engine.model import load_generator
    from sapf.engine.run import load_private_data, plan_noise
    from sapf.engine.semantic import (
        SemanticQuery,
        choose_public_classes,
        release_semantic_histogram,
        semantic_contributions,
        train_pool_classifier,
    )

    gen = load_generator(None)
    data = load_private_data("mnist5k", gen, TrainConfig.holdout)
    pool = load_dataset("public-pool", gen.image_size, gen.channels)
    q = SemanticQuery(top_k=args.top_k, per_label=args.per_label)
    rows = []
    for seed in args.seeds:
        t0 = time.time()
        net = train_pool_classifier(pool, seed=seed, steps=TrainConfig.semantic_classifier_steps)
        train_s = time.time() - t0
        contributions, _ = semantic_contributions(net, data, pool.num_classes, q.top_k)
        noiseless = contributions(np.arange(len(data))).sum(0).numpy().reshape(-1, pool.num_classes)

        def own_digits(chosen: dict[int, int]) -> int:
            return sum(pool.class_names[c] == f"digit {y}" for c, y in chosen.items())

        for eps in args.epsilons:
            cfg = TrainConfig(epsilon=eps, delta=1e-5, public_selection="semantic", semantic_top_k=q.top_k,
                              semantic_per_label=q.per_label, semantic_budget=args.budget, warmup="none")
            sigma = plan_noise(cfg, len(data)).noise_of("semantic-query")
            hist = release_semantic_histogram(net=net, data=data, num_public=pool.num_classes, query=q,
                                              noise_multiplier=sigma, ledger=None)
            chosen = choose_public_classes(hist, q.per_label)
            names = {c: pool.class_names[c] for c in chosen}
            own = own_digits(chosen)
            rng = np.random.default_rng(seed)  # simulated draws only: the release above drew from OS entropy
            simulated = [own_digits(choose_public_classes(
                noiseless + rng.normal(0, sigma * math.sqrt(q.top_k), noiseless.shape), q.per_label))
                for _ in range(SIMULATED_DRAWS)]
            rows.append({"epsilon": eps, "seed": seed, "sigma": round(sigma, 3), "query_epsilon": eps *
                         cfg.semantic_budget, "chosen": len(chosen), "own_digit": own,
                         "own_digit_expected": round(float(np.mean(simulated)), 2),
                         "all_ten_share": round(float(np.mean(np.array(simulated) == data.num_classes)), 3),
                         "own_digit_noiseless": own_digits(choose_public_classes(noiseless, q.per_label)),
                         "digit_classes": sum(n.startswith("digit") for n in names.values()),
                         "others": ", ".join(n for n in names.values() if not n.startswith("digit")) or "-",
                         "classifier_train_s": round(train_s, 1),
                         "choice": {pool.class_names[c]: y for c, y in chosen.items()}})
            print(rows[-1], flush=True)
    save("semantic_query", rows, {"pool_classes": pool.num_classes, "pool_records": len(pool),
                                   "private_records": len(data), "top_k": q.top_k, "per_label": q.per_label,
                                   "budget": args.budget})
    print(table(rows, ["epsilon", "seed", "sigma", "query_epsilon", "chosen", "own_digit", "own_digit_expected",
                       "all_ten_share", "own_digit_noiseless", "digit_classes", "others"]))


if __name__ == "__main__":
    main()
