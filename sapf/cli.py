"""The `sapf` command line: a thin Typer layer over the engine.

Imports of the engine (and so of PyTorch) happen inside the commands: `sapf sample --onnx`
must run on a box that has onnxruntime but no PyTorch.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from sapf.config import (
    PRETRAIN_AUGMENTATIONS,
    ConfigError,
    FederationConfig,
    MethodConfig,
    PretrainConfig,
    TrainConfig,
)
from sapf.defaults import FULL_LR, LORA_LR, SGD_LORA_LR, TRAIN_BATCH_SIZE, TRAIN_STEPS, WARMUP_MIN_EPSILON
from sapf.errors import SapfError
from sapf.public_classifier import DEFAULT_BEST_OF
from sapf.sampling_inputs import DEFAULT_ETA, DEFAULT_STEPS, GUIDANCE_WITH_NULL_CLASS

app = typer.Typer(
    name="sapf",
    help="Differentially private image synthesis across organisations (DP-SAPF).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(*args, **kwargs):
    """Register a command whose SapfError becomes one line on stderr and exit code 2."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            try:
                return fn(*a, **kw)
            except SapfError as e:
                typer.echo(f"sapf: error: {e.as_flag() if isinstance(e, ConfigError) else e}", err=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                typer.echo("sapf: interrupted (a federated run continues with --resume; other commands leave nothing "
                           "partial in --out)", err=True)
                raise typer.Exit(130) from None

        return app.command(*args, **kwargs)(wrapper)

    return deco


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


_P = PretrainConfig


@command()
def pretrain(
    out: Path = typer.Option(..., "--out", help="Model directory to write (diffusers layout)."),
    data: str = typer.Option(_P.data, help="Public data: digits, mnist5k, an image folder or an .npz."),
    image_size: int = typer.Option(_P.image_size, help="Image side in pixels."),
    steps: int = typer.Option(_P.steps, help="Optimiser steps."),
    batch_size: int = typer.Option(_P.batch_size),
    lr: float = typer.Option(_P.lr, help="Peak learning rate (warm-up, then cosine)."),
    widths: str = typer.Option(",".join(map(str, _P().block_out_channels)),
                               help="UNet channels per level, comma-separated."),
    slant: str = typer.Option(",".join(map(str, _P.slant)),
                              help="Random shear range MIN,MAX per image (positive leans right), or 'off'."),
    augmentation: str = typer.Option(_P.augmentation, help="'slant' (the slant alone) or 'handwriting' (rotation, "
                                                           "scale, stroke and shift beside the slant)."),
    label_dropout: float = typer.Option(_P.label_dropout, help="Classifier-free guidance: share of labels replaced "
                                                               "by a null class (0: no null class)."),
    seed: int = typer.Option(_P.seed),
    force: bool = typer.Option(False, help="Replace an existing --out."),
):
    """Train a public class-conditional generator non-privately (public data only)."""
    from sapf.engine.data import load_dataset
    from sapf.engine.model import save_generator
    from sapf.engine.pretrain import pretrain as run_pretrain
    from sapf.engine.sampling import GRID_SAMPLES, sample
    from sapf.outputs import atomic_output_dir, check_output_dir, write_json, write_samples
    from sapf.plots import plot_curve

    if steps < 1 or batch_size < 1:
        raise SapfError("--steps and --batch-size must be at least 1")
    if image_size < 8:
        raise SapfError(f"--image-size must be at least 8, got {image_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise SapfError(f"--lr must be finite and > 0, got {lr}")
    if not 0 <= label_dropout < 1:
        raise SapfError(f"--label-dropout must lie in [0, 1), got {label_dropout}")
    try:
        levels = [int(w) for w in widths.split(",")]
    except ValueError:
        raise SapfError(f"--widths must be comma-separated integers, got '{widths}'") from None
    if len(levels) < 2 or any(w < 1 for w in levels) or image_size % 2 ** (len(levels) - 1):
        raise SapfError("--widths needs at least 2 levels and --image-size divisible by 2^(levels-1)")
    slant_range = None if slant.strip().lower() == "off" else _float_pair(slant, "--slant")
    if augmentation not in PRETRAIN_AUGMENTATIONS:
        raise SapfError(f"--augmentation must be one of {', '.join(PRETRAIN_AUGMENTATIONS)}, got '{augmentation}'")
    check_output_dir(out, force)
    cfg = PretrainConfig(data=data, image_size=image_size, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         slant=slant_range, augmentation=augmentation, label_dropout=label_dropout,
                         block_out_channels=levels, norm_num_groups=math.gcd(8, *levels),
                         attention_head_dim=min(32, levels[-1]))
    ds = load_dataset(data, image_size, 1)
    gen, hist = run_pretrain(cfg, ds)
    with atomic_output_dir(out, force) as tmp:
        save_generator(gen, tmp)
        write_json(tmp / "config.json", {"command": "pretrain", **cfg.to_dict(), "parameters": hist["parameters"],
                                         "wall_time_s": round(hist["wall_time_s"], 1)})
        plot_curve(tmp / "loss.png", {"loss": hist["loss"]}, "step", "noise-prediction MSE", "pretraining", smooth=25)
        images, labels = sample(gen, GRID_SAMPLES, seed=seed)
        write_samples(tmp / "samples", images, labels)
    _say(f"wrote {out} ({hist['parameters']:,} parameters, {hist['wall_time_s']:.0f} s); grid: {out}/samples/grid.png")


def _float_pair(text: str, option: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SapfError(f"{option} must be MIN,MAX (two numbers) or 'off', got '{text}'") from None
    if not (lo <= hi and abs(lo) <= 1 and abs(hi) <= 1):
        raise SapfError(f"{option} needs MIN <= MAX, both within [-1, 1], got '{text}'")
    return lo, hi


@command()
def sample(
    out: Path = typer.Option(..., "--out", help="Directory for PNGs, grid.png and samples.npz."),
    num: int = typer.Option(100, "--num", help="Number of images."),
    model: Optional[Path] = typer.Option(None, "--model",
                                         help="Model dir or run dir (default: the shipped public model)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx",
                                        help="Sample from an exported ONNX file with onnxruntime instead."),
    class_label: Optional[int] = typer.Option(None, "--class-label", help="Only this class (default: class-balanced)."),
    steps: int = typer.Option(DEFAULT_STEPS, help="DDIM steps."),
    eta: float = typer.Option(DEFAULT_ETA, help="DDIM step noise: 1 adds DDPM's noise each step, 0 is deterministic."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance weight w (1: plain conditional). "
                                             "Default: the model's (a model with a null class: "
                                             f"{GUIDANCE_WITH_NULL_CLASS:g}; any other: 1)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    allow_cpu_fallback: bool = typer.Option(False, help="With --device cuda: run on CPU if CUDA is missing."),
    batch_size: Optional[int] = typer.Option(None, help="Images a batch (default: 32 for the torch sampler on the "
                                             "CPU, 256 otherwise; the images do not depend on it)."),
    best_of: Optional[int] = typer.Option(None, "--best-of", help="Draw N candidates an image and keep the one a "
                                          "classifier of the public digits finds most like its class (N times the "
                                          "time; no privacy cost; digit models only). Default: "
                                          f"{DEFAULT_BEST_OF} for a model of ten 28x28 grey classes, else 1."),
    force: bool = typer.Option(False, help="Replace an existing --out."),
):
    """Generate images with DDIM from a model directory or an ONNX file."""
    from sapf.outputs import atomic_output_dir, check_output_dir, write_samples
    from sapf.public_classifier import check_best_of_count, resolve_best_of
    from sapf.sampling_inputs import check_eta, resolve_guidance

    if num < 1:
        raise SapfError("--num must be at least 1")
    if model is not None and onnx is not None:
        raise SapfError("give --model or --onnx, not both")
    if device not in ("cpu", "cuda"):
        raise SapfError(f"--device must be cpu or cuda, not '{device}'")
    check_eta(eta)
    if best_of is not None:
        check_best_of_count(best_of)  # before a model loads; the model's kind is checked where it is loaded
    check_output_dir(out, force)
    meta = {"command": "sample", "num": num, "class_label": class_label, "steps": steps, "eta": eta, "seed": seed,
            "device": device}
    if onnx is not None:
        from sapf.export.onnx_sampler import OnnxSampler

        sampler = OnnxSampler(onnx, device=device, allow_cpu_fallback=allow_cpu_fallback)
        images, labels = sampler.sample(num, class_label, steps, seed, batch_size, eta=eta, guidance=guidance,
                                        best_of=best_of)
        guidance = resolve_guidance(guidance, sampler.null_class)
        shape = sampler.num_classes, int(sampler.meta["channels"]), int(sampler.meta["image_size"])
        meta.update(onnx=str(onnx), provider=sampler.provider)
    else:
        from sapf.engine.mepf import is_generator_dir, load_mean_embedding_generator, sample_generator
        from sapf.engine.model import load_generator
        from sapf.engine.sampling import sample as torch_sample

        device = _torch_device(device, allow_cpu_fallback)
        if model is not None and is_generator_dir(model):  # DP-MEPF: one pass, no steps or guidance
            guidance = resolve_guidance(guidance, None)
            generator = load_mean_embedding_generator(model)
            images, labels = sample_generator(generator, num, class_label, seed, batch_size, best_of=best_of)
            shape = generator.config.num_classes, generator.config.channels, generator.config.image_size
            meta.update(model=str(model))
        else:
            gen = load_generator(model)
            images, labels = torch_sample(gen, num, class_label, steps, seed, batch_size, eta=eta, guidance=guidance,
                                          device=device, best_of=best_of)
            guidance = resolve_guidance(guidance, gen.null_class)
            shape = gen.num_classes, gen.channels, gen.image_size
            meta.update(model=gen.source)
    meta["guidance"] = guidance  # as resolved for this model
    meta["best_of"] = resolve_best_of(best_of, *shape)
    meta["device"] = device  # as used
    with atomic_output_dir(out, force) as tmp:
        write_samples(tmp, images, labels, meta)
    _say(f"wrote {num} images to {out} (grid: {out}/grid.png)")


def _torch_device(device: str, allow_cpu_fallback: bool = False) -> str:
    """The device PyTorch computes on: `device` checked, or the CPU (with a warning) when CUDA is missing and the
    user allowed the fallback."""
    import torch

    from sapf.engine.device import compute_device

    if device.startswith("cuda") and allow_cpu_fallback and not torch.cuda.is_available():
        print(f"sapf: warning: --device {device}: PyTorch sees no CUDA GPU; computing on CPU", file=sys.stderr)
        return "cpu"
    return str(compute_device(device))


def _epsilon(value: str) -> float:
    try:
        eps = float(value)
    except ValueError:
        raise SapfError(f"--epsilon must be a number or inf, got '{value}'") from None
    if math.isnan(eps):
        raise SapfError("--epsilon must be a number or inf")
    return eps


def _config(cls, values: dict, **overrides):
    """The command's config: its options named like the config's fields, then `overrides` (each default lives
    in the config class; the options below only read it)."""
    from sapf.config import from_values

    values = {**values, "epsilon": _epsilon(values["epsilon"]),
              "base_model": str(values["base_model"]) if values.get("base_model") else None}
    return from_values(cls, values, **overrides)


def _eps_text(value: float) -> str:
    return f"{value:g}"


# Options shared by `train`, `select`, `federate` and `serve`: one definition each, defaults from sapf.config.
_M = MethodConfig
_DATA = typer.Option(_M.data, help="Private data: mnist5k, an image folder (one sub-folder per class) or an .npz.")
_BASE = typer.Option(None, "--base-model",
                     help="Public base model dir, present at every site (default: the shipped public model).")
_DELTA = typer.Option(None, help="Target δ (default 1/(N ln N) of the data holder's N).")
_SELECTION = typer.Option(_M.selection, help="saliency (DP-SAPF) | attention (DP-LoRA) | random | full (DPDM) | "
                                              "sparta (rows from noisy gradients).")
_METHOD = typer.Option(_M.method, help="diffusion: DP fine-tuning of the public diffusion model (--selection says "
                                        "how) | dp-mepf: a generator trained on noisy mean embeddings (one release).")
_GENERATOR_STEPS = typer.Option(_M.generator_steps, help="dp-mepf: generator steps on the noisy mean embeddings.")
_PUBLIC_SELECTION = typer.Option(_M.public_selection, help="none | semantic (PrivImage: a noisy query picks the "
                                                            "classes of the public-pool data to pretrain on first).")
_SEMANTIC_BUDGET = typer.Option(_M.semantic_budget, help="Share of ε spent by the semantic query.")
_PRETRAIN_STEPS = typer.Option(_M.pretrain_steps, help="Pretraining steps on the chosen public classes (cached).")
_ONNX = typer.Option(FederationConfig.onnx, "--onnx/--no-onnx",
                     help="Export model.onnx at the end of the run (--no-onnx: later, with "
                          "`sapf export RUN --out RUN/model.onnx`).")
_CLASSIFIER_STEPS = typer.Option(_M.semantic_classifier_steps,
                                 help="Training steps of the public-pool classifier that votes (public data; cached).")
_ROW_FRACTION = typer.Option(_M.row_fraction, help="SPARTA: share of each matrix's rows fine-tuned.")
_MASK_STEPS = typer.Option(_M.mask_steps, help="SPARTA: noisy gradient steps (lr 0) that score the rows.")
_CANDIDATES = typer.Option(_M.candidates, help="Candidate matrices: all Linear/Conv2d, or attention projections.")
_TOP = typer.Option(_M.top_fraction, help="Share of candidate matrices to fine-tune (saliency, random).")
_SEL_BUDGET = typer.Option(_M.selection_budget, help="Share of ε given to the saliency query.")
_MULTIPLICITY = typer.Option(_M.multiplicity, help="Noise/timestep replicas per record (averaged before clipping).")
_CLIP = typer.Option(_M.clip, help="Per-record clipping norm C of DP-SGD (LoRA per-record norms start near 0.03).")
_OPTIMIZER = typer.Option(_M.optimizer, help="adam (AdamW) or sgd (momentum 0.9).")
_LR = typer.Option(None, help=f"Learning rate (Adam: {LORA_LR:g} for LoRA, {FULL_LR:g} for full; "
                              f"SGD: {SGD_LORA_LR:g} for LoRA).")
_RANK = typer.Option(_M.rank, help="LoRA rank.")
_ALPHA = typer.Option(_M.lora_alpha, help="LoRA alpha.")
_HOLDOUT = typer.Option(_M.holdout, help="Share of the data kept out of training for evaluation (0: none).")
_ACCOUNTANT = typer.Option(_M.accountant, help="rdp or prv (Opacus).")
_SEED = typer.Option(_M.seed, help="Seed of public randomness only (initialisation, random selection, partitions, "
                                   "sample grids); DP noise and batches are always fresh.")
_FORCE = typer.Option(False, help="Replace an existing --out.")
_WARMUP = typer.Option(_M.warmup, help="auto | none | central-images (DP-FETA: noisy per-class mean images, then "
                                        "every weight warmed up on them) | mean-embeddings (DP-MEPF's noisy mean "
                                        "embeddings, a generator matched to them, every weight warmed up on its "
                                        f"samples); auto: central-images from ε = {WARMUP_MIN_EPSILON:g} up.")
_WARMUP_BUDGET = typer.Option(_M.warmup_budget, help="Share of ε spent by the warm-up's release.")
_WARMUP_STEPS = typer.Option(_M.warmup_steps, help="Non-private warm-up steps on the central images or the generator's "
                                                   "samples (post-processing).")
_WARMUP_GENERATOR_STEPS = typer.Option(_M.warmup_generator_steps,
                                       help="mean-embeddings warm-up: generator steps on the noisy mean embeddings "
                                            "(post-processing).")


@command()
def train(
    out: Path = typer.Option(..., "--out", help="Run directory to write."),
    data: str = _DATA, base_model: Optional[Path] = _BASE,
    epsilon: str = typer.Option(_eps_text(TrainConfig.epsilon),
                                help="Target ε for the whole run (inf: non-private upper bound)."),
    delta: Optional[float] = _DELTA, method: str = _METHOD, selection: str = _SELECTION, top_fraction: float = _TOP,
    candidates: str = _CANDIDATES, selection_budget: float = _SEL_BUDGET,
    row_fraction: float = _ROW_FRACTION, mask_steps: int = _MASK_STEPS, generator_steps: int = _GENERATOR_STEPS,
    public_selection: str = _PUBLIC_SELECTION, semantic_budget: float = _SEMANTIC_BUDGET,
    pretrain_steps: int = _PRETRAIN_STEPS, semantic_classifier_steps: int = _CLASSIFIER_STEPS,
    warmup: str = _WARMUP, warmup_budget: float = _WARMUP_BUDGET, warmup_steps: int = _WARMUP_STEPS,
    warmup_generator_steps: int = _WARMUP_GENERATOR_STEPS,
    steps: Optional[int] = typer.Option(None, help=f"DP-SGD steps (default {TRAIN_STEPS})."),
    epochs: Optional[float] = typer.Option(None, help="Alternatively, epochs of expected batches."),
    batch_size: Optional[int] = typer.Option(None, help=f"Expected (Poisson) batch size (default {TRAIN_BATCH_SIZE}, "
                                                        "or a quarter of a smaller dataset)."),
    multiplicity: int = _MULTIPLICITY, clip: float = _CLIP, lr: Optional[float] = _LR, optimizer: str = _OPTIMIZER,
    rank: int = _RANK, lora_alpha: int = _ALPHA,
    ema_decay: float = typer.Option(TrainConfig.ema_decay, help="EMA of the trained weights (0: off)."),
    holdout: float = _HOLDOUT, accountant: str = _ACCOUNTANT, seed: int = _SEED, force: bool = _FORCE,
    device: str = typer.Option("cpu", help="Where the networks compute: cpu or cuda (the privacy is the same)."),
):
    """Fine-tune the public generator on private data under (ε, δ)-DP."""
    cfg = _config(TrainConfig, locals())
    cfg.validate()  # a bad flag is answered at once, before torch and diffusers load (seconds)
    device = _torch_device(device)
    from sapf.engine.run import train as run_train
    if not math.isfinite(cfg.epsilon):
        _say("ε = inf: training WITHOUT differential privacy (the non-private upper bound)")
    s = run_train(cfg, out, force=force, device=device)
    steps = f"{cfg.generator_steps} generator steps" if cfg.method == "dp-mepf" else f"{s['steps']} steps"
    _say(
        f"wrote {out}: {s['trainable_parameters']:,} trainable parameters, {steps}, "
        f"ε spent {s['epsilon_spent']:.3f}; model card: {out}/README.md; grid: {out}/grid.png; "
        f"sample: sapf sample --model {out} --num 64 --out OUT"
    )


@command()
def select(
    out: Path = typer.Option(..., "--out", help="Directory for selection.json and privacy.json."),
    data: str = _DATA, base_model: Optional[Path] = _BASE,
    epsilon: str = typer.Option("1", help="ε spent on the query alone."),
    delta: Optional[float] = _DELTA, top_fraction: float = _TOP, candidates: str = _CANDIDATES,
    score: str = typer.Option(_M.score, help="sqnorm (Σ‖ĝ‖², sensitivity C²) or norm (Σ‖ĝ‖, sensitivity C)."),
    clip: float = typer.Option(_M.selection_clip, help="Clipping norm C of a record's gradient over all candidates."),
    sample_rate: float = typer.Option(_M.selection_sample_rate, help="Poisson sample rate of the query."),
    holdout: float = _HOLDOUT, accountant: str = _ACCOUNTANT, force: bool = _FORCE,
):
    """Run the noisy saliency query alone and write selection.json."""
    from sapf.engine.run import select_only

    if not (math.isfinite(clip) and clip > 0):  # checked here: the config's field is selection_clip, the flag --clip
        raise SapfError(f"--clip must be finite and > 0, got {clip}")
    cfg = _config(TrainConfig, locals(), clip=_M.clip, selection_clip=clip, selection_sample_rate=sample_rate)
    sel = select_only(cfg, out, force=force)
    _say(f"selected {len(sel.selected)} of {len(sel.candidates)} matrices; wrote {out}/selection.json")


# The plan of a federated run, shared by `federate` (simulation) and `serve` (deployment).
_F = FederationConfig
_ROUNDS = typer.Option(_F.rounds, help="Training rounds.")
_LOCAL_STEPS = typer.Option(None, "--local-steps", help=f"DP-SGD steps per site per round (default {_F.local_steps}).")
_LOCAL_EPOCHS = typer.Option(None, "--local-epochs", help="Alternatively, epochs of a site's data per round.")
_FED_EPSILON = typer.Option(_eps_text(_F.epsilon), help="Target ε per site for the whole run.")
_BATCH = typer.Option(_F.batch_size, help="Expected (Poisson) batch size per site.")
_KEEP_OPT = typer.Option(_F.keep_optimizer_state, "--keep-optimizer-state/--fresh-optimizer",
                         help="A site carries its optimizer's state (its own, never sent) from round to round.")
_FREEZE_A = typer.Option(_F.freeze_lora_a, "--freeze-lora-a/--train-lora-a",
                         help="FFA-LoRA: keep every LoRA A at its shared random start and train B only.")
_RESUME = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint (its saved plan).")


def _federation_config(values: dict, **overrides) -> FederationConfig:
    if values["local_epochs"] is not None and values["local_steps"] is not None:
        raise SapfError("give --local-steps or --local-epochs, not both")
    given = {k: v for k, v in values.items() if not (k == "local_steps" and v is None)}
    return _config(FederationConfig, {**given, "out": str(values["out"])}, num_sites=values["clients"], **overrides)


@command()
def federate(
    out: Path = typer.Option(Path("runs/federate"), "--out", help="Run directory."),
    clients: int = typer.Option(_F.num_sites, "--clients", help="Number of simulated sites."),
    data: str = typer.Option(_F.data, help="Dataset the sites' partitions come from."),
    partition: str = typer.Option(_F.partition, help="iid or dirichlet (label skew)."),
    alpha: float = typer.Option(_F.alpha, help="Dirichlet concentration."),
    rounds: int = _ROUNDS, local_steps: Optional[int] = _LOCAL_STEPS, local_epochs: Optional[float] = _LOCAL_EPOCHS,
    epsilon: str = _FED_EPSILON, delta: Optional[float] = _DELTA, method: str = _METHOD, selection: str = _SELECTION,
    warmup: str = _WARMUP, warmup_budget: float = _WARMUP_BUDGET, warmup_steps: int = _WARMUP_STEPS,
    warmup_generator_steps: int = _WARMUP_GENERATOR_STEPS,
    batch_size: int = _BATCH, multiplicity: int = _MULTIPLICITY, top_fraction: float = _TOP,
    row_fraction: float = _ROW_FRACTION, mask_steps: int = _MASK_STEPS, generator_steps: int = _GENERATOR_STEPS,
    public_selection: str = _PUBLIC_SELECTION, semantic_budget: float = _SEMANTIC_BUDGET,
    pretrain_steps: int = _PRETRAIN_STEPS, semantic_classifier_steps: int = _CLASSIFIER_STEPS,
    candidates: str = _CANDIDATES, selection_budget: float = _SEL_BUDGET, clip: float = _CLIP,
    optimizer: str = _OPTIMIZER, lr: Optional[float] = _LR, keep_optimizer_state: bool = _KEEP_OPT,
    freeze_lora_a: bool = _FREEZE_A, rank: int = _RANK,
    min_clients: Optional[int] = typer.Option(
        None, help=f"Fewest valid replies a round may go on with (default: {_F.min_clients}, or --clients if fewer)."),
    base_model: Optional[Path] = _BASE, seed: int = _SEED, onnx: bool = _ONNX, resume: bool = _RESUME,
    force: bool = _FORCE,
):
    """Fine-tune the public generator across simulated sites with Flower (DP-SAPF by default)."""
    # Only the default yields to a smaller federation: a --min-clients above --clients is refused, not lowered.
    cfg = _federation_config(locals(), min_clients=min(_F.min_clients, clients) if min_clients is None else min_clients)
    if not resume:
        cfg.validate()  # a bad flag is answered at once, before Flower, torch and diffusers load (seconds)
    from sapf.federation.simulation import federate as run_federate

    _done(out, run_federate(cfg, force=force, resume=resume))


def _done(out: Path, status: dict) -> None:
    eps = ", ".join(f"{k} ε={v:.2f}" for k, v in sorted(status["site_epsilon"].items()))
    # Only what this plan wrote: no adapter after a warm-up or full fine-tuning, no comparison for DP-MEPF.
    parts = [("README.md", "model card"), ("model", "the generator"), ("adapter", "peft"), ("model.onnx", ""),
             ("grid.png", ""), ("comparison.png", "public | federated")]
    listed = ", ".join(f"{name}{'/' if (out / name).is_dir() else ''}{f' ({what})' if what else ''}"
                       for name, what in parts if (out / name).exists())
    _say(f"done. outputs in {out}/: {listed}, privacy/ ({eps})")
    if (out / "model.onnx").exists():
        _say(f"sample from the ONNX file: sapf sample --onnx {out}/model.onnx --num 64 --out samples")


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the Flower processes we started are stopped too."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@command()
def serve(
    out: Path = typer.Option(Path("runs/serve"), "--out", help="Run directory (on this, the server's, machine)."),
    clients: int = typer.Option(..., "--clients", help="Sites to wait for before the run starts."),
    host: str = typer.Option("0.0.0.0", help="Address the sites dial (the Fleet gate; "
                                             "the SuperLink itself listens on 127.0.0.1)."),
    port: int = typer.Option(9092, help="Port the sites dial: the Fleet API only."),
    certs: Optional[Path] = typer.Option(None, "--certs",
                                         help="Directory from `sapf certs` (ca.crt, server.pem, server.key)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP, no TLS (tests and closed networks only)."),
    supernode_key: list[Path] = typer.Option([], "--supernode-key",
                                             help="A site's public key (repeat): only these nodes may join."),
    open_enrollment: bool = typer.Option(False, "--open-enrollment",
                                         help="Under TLS, let any node that holds ca.crt join (no site keys)."),
    rounds: int = _ROUNDS, local_steps: Optional[int] = _LOCAL_STEPS, local_epochs: Optional[float] = _LOCAL_EPOCHS,
    epsilon: str = _FED_EPSILON, delta: Optional[float] = _DELTA, method: str = _METHOD, selection: str = _SELECTION,
    warmup: str = _WARMUP, warmup_budget: float = _WARMUP_BUDGET, warmup_steps: int = _WARMUP_STEPS,
    warmup_generator_steps: int = _WARMUP_GENERATOR_STEPS,
    batch_size: int = _BATCH, multiplicity: int = _MULTIPLICITY, top_fraction: float = _TOP,
    row_fraction: float = _ROW_FRACTION, mask_steps: int = _MASK_STEPS, generator_steps: int = _GENERATOR_STEPS,
    public_selection: str = _PUBLIC_SELECTION, semantic_budget: float = _SEMANTIC_BUDGET,
    pretrain_steps: int = _PRETRAIN_STEPS, semantic_classifier_steps: int = _CLASSIFIER_STEPS,
    candidates: str = _CANDIDATES, selection_budget: float = _SEL_BUDGET, clip: float = _CLIP,
    optimizer: str = _OPTIMIZER, lr: Optional[float] = _LR, keep_optimizer_state: bool = _KEEP_OPT,
    freeze_lora_a: bool = _FREEZE_A, rank: int = _RANK,
    min_clients: Optional[int] = typer.Option(None,
                                              help="Fewest valid replies a round may go on with (default: all sites)."),
    base_model: Optional[Path] = _BASE, seed: int = _SEED, onnx: bool = _ONNX, resume: bool = _RESUME,
    force: bool = _FORCE,
):
    """Start a SuperLink, run DP-SAPF across the sites that `sapf join` it, and write the run dir."""
    import shutil

    from sapf.federation.deployment import Tls, check_port
    from sapf.federation.deployment import serve as run_serve

    check_port(port)
    if insecure and supernode_key:
        raise SapfError("--supernode-key needs TLS (Flower authenticates SuperNodes only over TLS); drop --insecure")
    if not insecure and not supernode_key and not open_enrollment:
        raise SapfError("under TLS only registered sites may join: give each site's --supernode-key KEY.pub, "
                        "or --open-enrollment to let any node holding ca.crt join")
    tls = Tls.from_dir(certs, insecure, server=True)
    if base_model is not None and not base_model.exists():
        raise SapfError(f"--base-model {base_model} not found")
    cfg = _federation_config(locals(), min_clients=min_clients or clients)
    from sapf.federation.simulation import prepared_run_dir

    with prepared_run_dir(cfg, "serve", force, resume, extra={"host": host, "port": port, "tls": not insecure,
                                                             "supernode_auth": bool(supernode_key)}) as cfg:
        shutil.rmtree(out / "superlink", ignore_errors=True)  # a resumed run gets a fresh SuperLink (and database)
        ready = (f"SuperLink up on {host}:{port} ({'insecure' if insecure else 'TLS'}); waiting for {cfg.num_sites} "
                 f"sites: sapf join --superlink HOST:{port} --data PATH --max-epsilon EPS"
                 + (" --insecure" if insecure else " --ca ca.crt") + (" --auth-key KEY" if supernode_key else ""))
        _exit_on_sigterm()
        status = run_serve(cfg, host, port, tls, list(supernode_key), on_ready=lambda: _say(ready),
                           on_round=lambda r: _say(f"round {r}/{cfg.rounds} done"))
    _done(out, status)


@command()
def join(
    superlink: str = typer.Option(..., "--superlink", help="The SuperLink's HOST:PORT."),
    data: Path = typer.Option(..., "--data", help="This site's private images: an image folder or an .npz."),
    max_epsilon: float = typer.Option(..., "--max-epsilon",
                                      help="This site's lifetime ε for this dataset: it never spends past it."),
    delta: Optional[float] = typer.Option(None, help="The δ this site accounts at (default 1/(n ln n) of its n)."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Where this site's privacy ledger lives "
                                                                       "(default ~/.sapf/sites/NAME)."),
    base_model: list[Path] = typer.Option([], "--base-model",
                                          help="A base model dir this site allows the server to name "
                                               "(repeat; the shipped model is always allowed)."),
    limit: list[str] = typer.Option([], "--limit", help="Change one of the site's plan caps, e.g. max-rank=16 "
                                                        "(repeat; see the README)."),
    new_dataset: bool = typer.Option(False, "--new-dataset", help="The data changed on purpose: "
                                                                  "keep the old ledger aside and start a new one."),
    ca: Optional[Path] = typer.Option(None, "--ca",
                                      help="CA certificate (ca.crt from `sapf certs`) to verify the SuperLink."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP, no TLS."),
    auth_key: Optional[Path] = typer.Option(None, "--auth-key",
                                            help="This site's private key, for SuperNode authentication."),
    port: Optional[int] = typer.Option(None, help="Local port of the SuperNode's app runtime (default: a free one)."),
    wait: float = typer.Option(600.0, help="Seconds to keep trying while the SuperLink is not up "
                                           "or has not registered this site."),
):
    """Join a federation as one site: start a Flower SuperNode that trains on --data locally."""
    import hashlib

    from sapf.federation.deployment import SiteConfig, Tls, check_port, check_site, check_superlink_address
    from sapf.federation.deployment import join as run_join
    from sapf.federation.site_policy import sites_root

    check_superlink_address(superlink)  # before the line that says whom this site joins
    if port is not None:
        check_port(port)
    if not (math.isfinite(wait) and wait >= 0):
        raise SapfError(f"--wait must be a number of seconds >= 0, got {wait}")
    tls = Tls.for_site(ca, insecure)
    if not data.exists():
        raise SapfError(f"--data {data} not found")
    name = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:10]
    site = SiteConfig(data, state_dir or sites_root() / f"site-{name}", max_epsilon, delta,
                      tuple(base_model), ",".join(limit), new_dataset)
    n = check_site(site)
    _say(f"joining {superlink} with {n} examples from {data}; ledger in {site.state_dir}; ε limit {max_epsilon:g}")
    _exit_on_sigterm()
    raise typer.Exit(run_join(superlink, site, tls, auth_key, port, wait=wait, say=_say))


@command()
def certs(
    out: Path = typer.Option(..., "--out", help="Directory for ca.crt, server.pem, server.key (and site keys)."),
    host: list[str] = typer.Option([], "--host", help="Name or IP the sites dial (repeat); "
                                                      "localhost and 127.0.0.1 are always added."),
    sites: list[str] = typer.Option([], "--site", help="Make a SuperNode key pair for this site name (repeat). "
                                                       "Without --host: only the key pair, made at the site."),
    days: int = typer.Option(365, help="Validity in days."),
    force: bool = typer.Option(False, help="Replace existing files."),
):
    """Make a private CA and the SuperLink's TLS certificate (with --host), and/or SuperNode key pairs (--site).

    A site makes its own key pair (`sapf certs --out DIR --site NAME`) and sends only NAME.pub to the operator."""
    from sapf.federation.credentials import make_certificates, make_supernode_keys
    from sapf.outputs import check_writable_path

    if not host and not sites:
        raise SapfError("give --host NAME (the SuperLink's certificate) and/or --site NAME (a site's key pair)")
    if out.exists() and not out.is_dir():
        raise SapfError(f"--out {out} exists and is not a directory")
    check_writable_path(out)
    for name in sites:  # a site name is a file name inside --out: never a path out of it
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise SapfError(f"--site {name!r}: use letters, digits, '.', '_' and '-' (a file name in --out)")
    for name in host:
        if not re.fullmatch(r"[A-Za-z0-9_.:*-]{1,253}", name):
            raise SapfError(f"--host {name!r} is not a host name or IP address")
    if host:
        paths = make_certificates(out, host, days, force)
        _say(f"wrote {paths['ca']} (give to every site), {paths['cert']} and {paths['key']} (SuperLink only), and the "
             f"CA's private key {paths['ca_key']}: move it off this machine and keep it offline")
    for private, public in make_supernode_keys(out, sites, force) if sites else []:
        _say(f"site key pair: {private} stays at the site (sapf join --auth-key {private}); send only {public} to the "
             f"operator (sapf serve --supernode-key)")


@command()
def export(
    src: Path = typer.Argument(..., help="Run dir (model/, or adapter/ + its base) or diffusers model dir."),
    out: Path = typer.Option(..., "--out", help="ONNX file to write; its metadata goes to OUT.json beside it."),
    opset: int = typer.Option(18, help="ONNX opset (the exporter's native one is 18; lower ones are converted)."),
    fp16: bool = typer.Option(False, "--fp16", help="Float16 weights and activations (for GPUs)."),
    int8: bool = typer.Option(False, "--int8", help="Int8 dynamic quantisation of the MatMul/Gemm weights (for CPUs)."),
    force: bool = typer.Option(False, help="Replace an existing --out."),
):
    """Export the generator's UNet to ONNX (checked against PyTorch) for `sapf sample --onnx`."""
    from sapf.export.onnx_export import export_onnx
    from sapf.export.onnx_sampler import metadata_path

    if fp16 and int8:
        raise SapfError("--fp16 and --int8 are exclusive: fp16 is for GPUs, int8 for CPUs")
    from sapf.outputs import check_writable_path

    check_writable_path(out)
    if out.is_dir():
        raise SapfError(f"--out {out} is a directory; give a file name such as model.onnx")
    if out.exists() and not force:
        raise SapfError(f"--out {out} already exists; pass --force to replace it")
    meta = export_onnx(src, out, opset=opset, fp16=fp16, int8=int8)
    p = meta["parity"]
    figure = (f"relative RMSE {p['rel_rmse']:.3g} (bound {p['bound']:g}), max |Δ| {p['max_abs_diff']:.3g}"
              if p["metric"] == "rel_rmse" else f"max |Δ| {p['max_abs_diff']:.3g} (bound {p['bound']:g})")
    _say(f"wrote {out} ({meta['variant']}, opset {meta['opset']}) and {metadata_path(out)}; "
         f"parity vs PyTorch: {figure}")


@command()
def evaluate(
    samples: Path = typer.Option(..., "--samples", help="A sampler output dir (samples.npz) or an .npz file."),
    data: str = typer.Option("mnist5k", help="The real dataset to compare with."),
    split: str = typer.Option("holdout", help="Real images to compare with: holdout or train."),
    out: Optional[Path] = typer.Option(None, "--out", help="metrics.json to write, with confusion.png beside it "
                                                           "(default: print only)."),
    seed: int = typer.Option(0),
):
    """Class fidelity, FID, KID, precision/recall (on sapf's own classifier of the real data) and downstream accuracy.

    These read the real data: they are for the data curator, outside the run's (ε, δ) guarantee."""
    from sapf.engine.evaluate import evaluate as run_evaluate
    from sapf.engine.evaluate import plot_confusion
    from sapf.outputs import check_writable_path, write_json

    if out is not None:
        check_writable_path(out)
    metrics = run_evaluate(samples, data, split, seed)
    if out is not None:
        write_json(out, {**metrics, "samples": str(samples), "seed": seed})
        plot_confusion(out.with_name("confusion.png"), metrics["confusion"],
                       f"class fidelity {metrics['class_fidelity']:.3f}")
    typer.echo("  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    per_class = metrics["class_fidelity_per_class"]
    typer.echo("class fidelity per class: " + "  ".join(f"{k}: {v:.2f}" for k, v in per_class.items()))


def main() -> None:
    """`sapf`: usage errors (a missing or malformed option) are one line on stderr and exit 2, like every
    other bad input, instead of Typer's boxed panel."""
    import sys

    import click

    try:
        code = app(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        code = 2
    except click.exceptions.UsageError as e:
        where = e.ctx.command_path if e.ctx else "sapf"
        typer.echo(f"sapf: error: {e.format_message()} (see '{where} --help')", err=True)
        code = 2
    except click.exceptions.Abort:
        typer.echo("sapf: interrupted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
