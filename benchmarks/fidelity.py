"""What keeps a digit's identity through DP fine-tuning: `sapf train` against one change at a time, each trained
model sampled at several classifier-free guidance weights.

Private data, split, public model and evaluation as in `benchmarks/quality.py` (mnist5k, 4,000 train / 1,000
holdout; the shipped public model, which has a null class). `plain` is `sapf train` at --epsilon (default 10) with
the product's defaults but no warm-up (`--warmup none`; the default, `auto`, warms up from ε = 5); every other
variant is `plain` with the fields it names changed; `public` is the shipped model untrained. Each model is sampled
at every --guidance weight (the same seed, so the same initial noise) and evaluated with `sapf evaluate`'s metrics,
class fidelity first. Rows are written as they finish, so a run cut short reports.

    python benchmarks/fidelity.py                          # every variant, seeds 0 1, on the CPU: hours
    python benchmarks/fidelity.py --device cuda            # the same on a GPU
    python benchmarks/fidelity.py --variants plain ema --out-dir /tmp/part1
    python benchmarks/fidelity.py --merge /tmp/part1 /tmp/part2  # parts run apart → one JSON and table

Writes benchmarks/results/fidelity.json and docs/fidelity.md (or under --out-dir).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, machine, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# One change at a time from `plain`: sapf.config's defaults without a warm-up (the TrainConfig fields each sets).
PLAIN = dict(warmup="none")
VARIANTS = {
    "public": None,
    "plain": {},
    "ema": dict(ema_decay=0.95),  # an average over the last ~20 noisy steps
    "no-conditioning": dict(candidates="no-conditioning"),  # never adapt the time/class projections
    "warm-up": dict(warmup="central-images"),  # DP-FETA's central images first (5% of ε)
    "warm-up-ema": dict(warmup="central-images", ema_decay=0.95),  # the two that helped, together
    "lr-3e-3": dict(lr=3e-3),  # Adam moves every coordinate by ~lr a step, signal or noise
    "batch-1024": dict(batch_size=1024),  # 4× the examples per step, so 4× the signal against the same noise
    "full": dict(selection="full"),  # every weight, DP full fine-tuning
}
GUIDANCE = (1.0, 1.5, 2.0, 3.0)
METRICS = ("class_fidelity", "fid", "precision", "recall", "downstream_acc")


def run_variant(name: str, epsilon: float, seed: int, guidance: list[float], samples: int, work: Path,
                device: str, steps: int | None = None) -> list[dict]:
    from sapf.config import TrainConfig
    from sapf.engine.evaluate import evaluate
    from sapf.engine.model import load_generator
    from sapf.engine.run import train
    from sapf.engine.sampling import sample
    from sapf.outputs import write_samples

    base = {"variant": name, "epsilon": epsilon if VARIANTS[name] is not None else None, "seed": seed,
            "device": device}
    if VARIANTS[name] is None:
        gen = load_generator(None)
    else:
        run_dir = work / f"{name}-{seed}"
        cfg = TrainConfig(epsilon=epsilon, seed=seed, steps=steps, **{**PLAIN, **VARIANTS[name]})
        s = train(cfg, run_dir, force=True, sample_grid=False, device=device)
        base.update(train_time_s=round(s["private"]["wall_time_s"], 1), trainable_parameters=s["trainable_parameters"])
        gen = load_generator(str(run_dir / "model"))
    rows = []
    for w in guidance:
        images, labels = sample(gen, samples, seed=seed, guidance=w, show_progress=False, device=device, best_of=1)
        sdir = work / f"samples-{name}-{seed}-{w:g}"
        write_samples(sdir, images, labels)
        m = evaluate(sdir, "mnist5k", "holdout", seed)
        rows.append({**base, "guidance": w, **{k: m[k] for k in METRICS}})
        shutil.rmtree(sdir, ignore_errors=True)
        print("  " + "  ".join(f"{k} {v}" for k, v in rows[-1].items()), file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["epsilon"] or 0.0, r["guidance"]), []).append(r)
    order = list(VARIANTS)
    out = []
    for (v, e, w), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1], kv[0][2])):
        s = {"variant": v, "ε": f"{e:g}" if e else "-", "guidance": w, "n": len(rs)}
        for k in METRICS:
            vals = [r[k] for r in rs]
            mean = statistics.fmean(vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else None
            s[k] = f"{mean:.3f}" if mean < 10 else f"{mean:.0f}"
            if sd is not None:
                s[k] += f" ± {sd:.3f}" if mean < 10 else f" ± {sd:.0f}"
        out.append(s)
    return out


def _missing(result: dict) -> str:
    ran = {r["variant"] for r in result["rows"]}
    missing = [v for v in VARIANTS if v not in ran]
    return f"\nNot measured yet (no finished row): {', '.join(missing)}.\n" if missing else ""


def write(out_dir: Path | None, result: dict) -> None:
    from sapf.outputs import write_json

    js = (out_dir or RESULTS) / "fidelity.json"
    doc = (out_dir or ROOT / "docs") / "fidelity.md"
    write_json(js, result)
    doc.write_text(f"""# Class identity through DP fine-tuning: one change at a time

Produced by `python benchmarks/fidelity.py` ({result['machine'].get('gpu', 'CPU')}, {result['machine']['date']});
raw rows in `benchmarks/results/fidelity.json`. `plain` is `sapf train` (ε in the table) with the product's
defaults but no warm-up; every other variant changes what it names ({', '.join(f'{k}: {v}' for k, v in VARIANTS.items()
if v)}); `public` is the shipped model. {result['samples']} class-balanced samples per (variant, guidance, seed),
DDIM 50 steps, eta 1; mean ± sample standard deviation over seeds {', '.join(map(str, result['seeds']))}.
Metrics on sapf's own feature network (see benchmarks.md); class fidelity is the share of samples recognised as the
class they were drawn for.{(' ' + result['note']) if result.get('note') else ''}

{table(summary(result['rows']), ['variant', 'ε', 'guidance', 'n', *METRICS])}
{_missing(result)}""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--epsilon", type=float, default=10.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--guidance", type=float, nargs="+", default=list(GUIDANCE))
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, help="DP-SGD steps (default: sapf train's)")
    ap.add_argument("--out-dir", type=Path)
    ap.add_argument("--merge", type=Path, nargs="+", metavar="DIR", help="Merge the fidelity.json of these dirs.")
    a = ap.parse_args()
    if a.merge:
        from sapf.outputs import read_json

        parts = [read_json(d / "fidelity.json") for d in a.merge]
        rows = [r for p in parts for r in p["rows"]]
        write(a.out_dir, {**parts[0], "rows": rows, "seeds": sorted({r["seed"] for r in rows}),
                          "machines": [p["machine"] for p in parts]})
        return
    result = {"machine": machine(), "epsilon": a.epsilon, "samples": a.samples, "seeds": a.seeds, "steps": a.steps,
              "guidance": a.guidance, "variants": {v: VARIANTS[v] for v in a.variants}, "rows": []}
    work = Path(tempfile.mkdtemp(prefix="sapf-fidelity-"))
    try:
        for seed in a.seeds:
            for v in a.variants:
                t0 = time.time()
                print(f"{v} seed {seed}", file=sys.stderr, flush=True)
                result["rows"] += run_variant(v, a.epsilon, seed, a.guidance, a.samples, work, a.device, a.steps)
                print(f"  {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
                write(a.out_dir, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
