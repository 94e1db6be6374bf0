"""Best-of-n sampling (`sapf sample --best-of N`): what choosing among N candidates by the public digit classifier
does to class fidelity, FID, precision, recall and downstream accuracy, and what it costs in sampling time.

    python benchmarks/best_of.py --onnx RUN/model.onnx [--best-of 1 2 4] [--seeds 0 1] [--num 500]
    python benchmarks/best_of.py [--model DIR] ...          # the torch sampler (default: the shipped public model)

RUN is typically the README's main job (`sapf federate --clients 4`). Writes benchmarks/results/best_of.json (the
machine, the model, one row per (N, seed)) and prints a table. The evaluation reads the real holdout: its numbers are
for the data curator, outside the run's guarantee.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sapf.sampling_inputs import DEFAULT_STEPS  # noqa: E402

METRICS = ("class_fidelity", "fid", "precision", "recall", "downstream_acc")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", type=Path, help="an exported model (the ONNX sampler)")
    ap.add_argument("--model", type=Path, help="a model or run dir (the torch sampler; default: the shipped model)")
    ap.add_argument("--best-of", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--name", default="best_of", help="the results file's name (benchmarks/results/NAME.json)")
    a = ap.parse_args()

    import numpy as np
    from common import save, table

    from sapf.engine.evaluate import evaluate

    if a.onnx is not None:
        from sapf.export.onnx_sampler import OnnxSampler

        sampler = OnnxSampler(a.onnx)

        def draw(n, seed):
            return sampler.sample(a.num, steps=a.steps, seed=seed, show_progress=False, best_of=n)
    else:
        from sapf.engine.model import load_generator
        from sapf.engine.sampling import sample

        gen = load_generator(a.model)

        def draw(n, seed):
            return sample(gen, a.num, steps=a.steps, seed=seed, show_progress=False, best_of=n)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for n in a.best_of:
                t0 = time.perf_counter()
                images, labels = draw(n, seed)
                seconds = time.perf_counter() - t0
                path = Path(tmp) / f"s{seed}-n{n}.npz"
                np.savez(path, images=images, labels=labels)
                m = evaluate(path)
                rows.append({"best_of": n, "seed": seed, **{k: m[k] for k in METRICS}, "sample_s": round(seconds, 1),
                             "class_fidelity_per_class": m["class_fidelity_per_class"]})
                print(table(rows[-1:], ["best_of", "seed", *METRICS, "sample_s"]), flush=True)
    model = str(a.onnx or a.model or "shipped public model")
    out = save(a.name, rows, {"model": model, "num": a.num, "steps": a.steps,
                              "sampler": "onnx" if a.onnx else "torch"})
    print(table(rows, ["best_of", "seed", *METRICS, "sample_s"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
