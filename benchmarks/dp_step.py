"""Per-step time and peak memory of DP fine-tuning on the default public model, at the product's defaults
(sapf.config.TrainConfig: batch, clip, learning rate, candidates, top fraction; K = 1 and 4).

Each configuration runs in its own process so that peak RSS is its own. Writes
benchmarks/results/dp_step.json and prints a markdown table.

    python benchmarks/dp_step.py [--steps 5] [--batch-size N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CONFIGS = [  # (name, strategy, private)
    ("non-DP LoRA (saliency set)", "saliency", False),
    ("DP-SAPF LoRA (saliency set)", "saliency", True),
    ("DP-LoRA (all attention)", "attention", True),
    ("DP full fine-tuning", "full", True),
]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms (CPU tensors are
    invisible to tracemalloc, and ru_maxrss would include data loading)."""

    def __enter__(self):
        import threading

        self.base, self.peak, self._stop = _rss_mb(), 0.0, threading.Event()

        def watch():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_mb())
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def above_base_mb(self) -> float:
        return self.peak - self.base


def _one(args) -> dict:
    name, strategy, private, selected, K, steps, batch = args
    import torch

    from sapf.config import TrainConfig
    from sapf.engine.data import load_dataset
    from sapf.engine.finetune import dp_finetune, make_trainable
    from sapf.engine.model import count_parameters, load_generator

    torch.set_num_threads(2)
    cfg = TrainConfig(selection=strategy, multiplicity=K)
    gen = load_generator(None)
    data = load_dataset("mnist5k", 28, 1)
    model = make_trainable(gen, strategy, selected, cfg.rank, cfg.lora_alpha)
    with PeakRSS() as mem:
        hist = dp_finetune(gen, model, data, cfg.dpsgd(steps, batch), noise_multiplier=1.0 if private else 0.0,
                           ledger=None, show_progress=False)
    return {"config": name, "K": K, "trainable_params": count_parameters(model, trainable_only=True),
            "step_s": statistics.median(hist.step_times[1:]), "peak_mem_mb": round(mem.above_base_mb, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the product's (TrainConfig)")
    a = ap.parse_args()
    from common import save, table

    from sapf.config import TrainConfig
    from sapf.engine.data import load_dataset
    from sapf.engine.model import load_generator
    from sapf.engine.run import load_private_data
    from sapf.engine.saliency import choose_matrices

    cfg = TrainConfig()
    gen = load_generator(None)
    a.batch_size = a.batch_size or cfg.resolved(len(load_private_data(cfg.data, gen, cfg.holdout))).batch_size
    data = load_dataset("mnist5k", 28, 1).subset(range(0, 5000, 5))
    sal = choose_matrices("saliency", gen, data, cfg.query(), cfg.top_fraction, 0.0, None, seed=0,
                          show_progress=False).selected
    att = choose_matrices("attention", gen, None, cfg.query(), cfg.top_fraction, 0.0, None, seed=0).selected
    jobs = [(n, s, p, sal if s == "saliency" else att, K, a.steps, a.batch_size) for K in (1, 4) for n, s, p in CONFIGS]
    ctx = mp.get_context("spawn")
    rows = []
    for job in jobs:
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(_one, (job,)))
        print(rows[-1], flush=True)
    ratios = {}
    for K in (1, 4):
        r = {row["config"]: row for row in rows if row["K"] == K}
        sapf, nondp, full = r[CONFIGS[1][0]], r[CONFIGS[0][0]], r[CONFIGS[3][0]]
        ratios[f"K={K}"] = {
            "dp_sapf_vs_nondp_time": sapf["step_s"] / nondp["step_s"],
            "full_vs_dp_sapf_time": full["step_s"] / sapf["step_s"],
            "full_vs_dp_sapf_memory": full["peak_mem_mb"] / max(sapf["peak_mem_mb"], 1e-9),
        }
    save("dp_step", rows, {"batch_size": a.batch_size, "selected": sal, "ratios": ratios})
    print(table(rows, ["config", "K", "trainable_params", "step_s", "peak_mem_mb"]))
    for k, v in ratios.items():
        print(k, {n: round(x, 2) for n, x in v.items()})


if __name__ == "__main__":
    main()
