"""`sapf train` / `sapf select` end to end: plan the privacy budget, select, fine-tune, write.

Order matters: the whole privacy plan (noise for the query and for every DP-SGD step) is
fixed and checked before any gradient of private data is computed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sapf.defaults import FULL_LR, LORA_LR, SGD_LORA_LR, TRAIN_BATCH_SIZE, TRAIN_STEPS
from sapf.engine.data import ImageDataset, load_dataset, train_holdout_split
from sapf.engine.finetune import DPSGDConfig, check_optimizer, dp_finetune, make_trainable, merged_generator
from sapf.engine.model import Generator, check_data_fits, count_parameters, load_generator, save_generator
from sapf.engine.privacy import PrivacyLedger, PrivacyPlan, calibrate_noise, check_privacy_args, plan_privacy
from sapf.engine.saliency import STRATEGIES, SaliencyQuery, Selection, choose_matrices, top_count
from sapf.errors import SapfError
from sapf.outputs import atomic_output_dir, check_output_dir, write_json

# The built-in sensitive set is split once, the same way everywhere (training, evaluation,
# benchmarks), so that the holdout is never trained on.
SPLIT_SEED = 0
DEFAULT_HOLDOUT = 0.2


@dataclass
class TrainConfig:
    data: str = "mnist5k"
    base_model: str | None = None  # None: the shipped public model
    holdout: float = DEFAULT_HOLDOUT  # share of the data kept out of training (0: train on all)
    epsilon: float = 10.0
    delta: float | None = None  # None: 1/(N ln N)
    accountant: str = "rdp"
    selection: str = "saliency"
    candidates: str = "all"
    top_fraction: float = 0.3
    selection_budget: float = 0.1  # share of ε for the saliency query alone
    selection_clip: float = 1e-2
    selection_sample_rate: float = 1.0
    selection_multiplicity: int = 1  # the ranking needs no replicas; they would only cost time
    score: str = "sqnorm"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None  # None: default_batch_size(n)
    multiplicity: int = 1
    clip: float = 0.05  # at the start, attention-LoRA per-example gradient norms had median ~0.03
    lr: float | None = None  # None: LORA_LR, or FULL_LR for full fine-tuning
    rank: int = 8
    lora_alpha: int = 8
    ema_decay: float = 0.0
    seed: int = 0
    optimizer: str = "adam"

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.optimizer == "sgd":
            if self.selection == "full":
                raise SapfError("--optimizer sgd with --selection full needs an explicit --lr (none measured yet)")
            return SGD_LORA_LR
        return FULL_LR if self.selection == "full" else LORA_LR

    def dpsgd(self, steps: int) -> DPSGDConfig:
        return DPSGDConfig(steps, self.batch_size, self.multiplicity, self.clip, self.learning_rate(), self.ema_decay,
                           self.optimizer)

    def query(self) -> SaliencyQuery:
        return SaliencyQuery(self.selection_clip, self.selection_multiplicity, self.selection_sample_rate, self.score,
                             self.candidates)


def default_batch_size(n: int) -> int:
    """TRAIN_BATCH_SIZE, or a quarter of the examples for a small set (Poisson sampling at a rate of at most 1/4
    still amplifies privacy, and the default then works on any dataset)."""
    return max(1, min(TRAIN_BATCH_SIZE, n // 4))


def with_batch_size(cfg: TrainConfig, n: int) -> TrainConfig:
    return cfg if cfg.batch_size is not None else replace(cfg, batch_size=default_batch_size(n))


def training_steps(cfg: TrainConfig, n: int) -> int:
    if cfg.steps is not None and cfg.epochs is not None:
        raise SapfError("give --steps or --epochs, not both")
    if cfg.epochs is not None:
        if cfg.epochs <= 0:
            raise SapfError("--epochs must be > 0")
        return max(1, int(math.ceil(cfg.epochs * n / cfg.batch_size)))
    steps = TRAIN_STEPS if cfg.steps is None else cfg.steps
    if steps < 1:
        raise SapfError("--steps must be at least 1")
    return steps


def load_private_data(spec: str, gen: Generator, holdout: float) -> ImageDataset:
    ds = load_dataset(spec, gen.image_size, gen.channels)
    check_data_fits(gen, ds.num_classes, ds.channels)
    if holdout > 0:
        ds, _ = train_holdout_split(ds, holdout, SPLIT_SEED)
    return ds


def validate(cfg: TrainConfig, n: int) -> None:
    if cfg.selection not in STRATEGIES:
        raise SapfError(f"unknown --selection '{cfg.selection}' ({', '.join(STRATEGIES)})")
    top_count(2, cfg.top_fraction)
    if cfg.batch_size < 1 or cfg.batch_size > n:
        raise SapfError(f"--batch-size must be between 1 and the number of examples ({n}), got {cfg.batch_size}")
    if cfg.multiplicity < 1:
        raise SapfError("--multiplicity must be at least 1")
    if cfg.clip <= 0 or cfg.selection_clip <= 0:
        raise SapfError("clipping norms must be > 0")
    if not 0 < cfg.selection_sample_rate <= 1:
        raise SapfError("--selection-sample-rate must lie in (0, 1]")
    if cfg.rank < 1:
        raise SapfError("--rank must be at least 1")
    check_optimizer(cfg.optimizer)
    cfg.learning_rate()  # refuses a combination with no default learning rate


def plan(cfg: TrainConfig, n: int, train: bool = True) -> PrivacyPlan:
    """Fix every noise multiplier for the run (refusing a plan that cannot meet the target)."""
    delta = check_privacy_args(cfg.epsilon, cfg.delta, n)
    steps = training_steps(cfg, n) if train else 0
    return plan_privacy(cfg.epsilon, delta, cfg.batch_size / n, steps, cfg.selection == "saliency",
                        cfg.selection_budget, cfg.selection_sample_rate, cfg.accountant)


def select_only(cfg: TrainConfig, out: Path, force: bool = False, show_progress: bool = True) -> Selection:
    """`sapf select`: the saliency query alone, spending the whole --epsilon on it."""
    check_output_dir(out, force)
    gen = load_generator(cfg.base_model)
    data = load_private_data(cfg.data, gen, cfg.holdout)
    cfg = with_batch_size(cfg, len(data))
    validate(cfg, len(data))
    if cfg.selection != "saliency":
        raise SapfError("sapf select runs the saliency query; other strategies need no selection step")
    delta = check_privacy_args(cfg.epsilon, cfg.delta, len(data))
    sigma = calibrate_noise(cfg.epsilon, delta, cfg.selection_sample_rate, 1, accountant=cfg.accountant) if math.isfinite(cfg.epsilon) else 0.0
    ledger = PrivacyLedger(cfg.epsilon, delta, cfg.accountant)
    sel = choose_matrices("saliency", gen, data, cfg.query(), cfg.top_fraction, sigma, ledger, cfg.seed, show_progress)
    with atomic_output_dir(out, force) as tmp:
        write_json(tmp / "selection.json", sel.to_dict())
        write_json(tmp / "privacy.json", ledger.to_dict())
        write_json(tmp / "config.json", {"command": "select", **asdict(cfg)})
    return sel


def train(cfg: TrainConfig, out: Path, force: bool = False, show_progress: bool = True, sample_grid: bool = True) -> dict:
    """`sapf train`: plan → select → DP fine-tune → write adapter/, model/, JSONs and a grid."""
    check_output_dir(out, force)
    gen = load_generator(cfg.base_model)
    data = load_private_data(cfg.data, gen, cfg.holdout)
    n = len(data)
    cfg = with_batch_size(cfg, n)
    validate(cfg, n)
    pp = plan(cfg, n)  # before any private gradient is computed
    steps = training_steps(cfg, n)
    ledger = PrivacyLedger(cfg.epsilon, pp.delta, cfg.accountant)
    sel = choose_matrices(cfg.selection, gen, data, cfg.query(), cfg.top_fraction, pp.selection_noise, ledger,
                          cfg.seed, show_progress)
    torch.manual_seed(cfg.seed)  # public randomness: the LoRA initialisation
    model = make_trainable(gen, cfg.selection, sel.selected, cfg.rank, cfg.lora_alpha)
    trainable = count_parameters(model, trainable_only=True)
    hist = dp_finetune(gen, model, data, cfg.dpsgd(steps), pp.train_noise, ledger, show_progress)
    merged = merged_generator(gen, model, cfg.selection)
    summary = {  # public: the plan, the counts the plan already reveals, ε
        "examples": n,
        "steps": steps,
        "trainable_parameters": trainable,
        "selected_matrices": len(sel.selected) if cfg.selection != "full" else None,
        "train_noise_multiplier": pp.train_noise,
        "selection_noise_multiplier": pp.selection_noise,
        "epsilon_spent": ledger.epsilon() if ledger.private else math.inf,
    }
    curves = {  # statistics of private data, not noised: for the data curator only (private/)
        "wall_time_s": round(hist.wall_time_s, 2),
        "final_loss": float(np.nanmean(hist.loss[-50:])),
        "loss": hist.loss,
        "step_times_s": [round(t, 4) for t in hist.step_times],
    }
    with atomic_output_dir(out, force) as tmp:
        if cfg.selection != "full":
            model.save_pretrained(tmp / "adapter")
        save_generator(merged, tmp / "model")
        write_json(tmp / "selection.json", sel.to_dict())
        write_json(tmp / "privacy.json", ledger.to_dict())
        write_json(tmp / "config.json", {"command": "train", **asdict(cfg), "lr": cfg.learning_rate(), "base_model_resolved": gen.source,
                                         "resolved_steps": steps, "resolved_delta": pp.delta})
        write_json(tmp / "metrics.json", {**summary, "epsilon": hist.epsilon})
        write_private_curves(tmp, curves, "fine-tuning")
        _write_pictures(tmp, merged, cfg.seed, sample_grid)
    return {**summary, **{k: curves[k] for k in ("wall_time_s", "final_loss")}}


PRIVATE_DIR = "private"
PRIVATE_NOTE = """This folder holds statistics of the private training data that carry no DP noise (training
loss, timings). They are outside the (epsilon, delta) guarantee in privacy.json: keep them with the
data curator and do not share them with the rest of this run directory.
"""


def write_private_curves(run_dir: Path, curves: dict, title: str) -> None:
    """`RUN/private/`: the un-noised curves of private data, kept apart from what may be shared."""
    from sapf.outputs import write_text
    from sapf.plots import plot_curve

    d = run_dir / PRIVATE_DIR
    write_json(d / "training.json", curves)
    write_text(d / "README.txt", PRIVATE_NOTE)
    if curves.get("loss"):
        plot_curve(d / "loss.png", {"loss": curves["loss"]}, "step", "noise-prediction MSE", title, smooth=20)


def _write_pictures(out: Path, gen: Generator, seed: int, sample_grid: bool) -> None:
    from sapf.engine.sampling import sample
    from sapf.outputs import class_grid, save_png

    if sample_grid:
        images, labels = sample(gen, 100, steps=50, seed=seed, show_progress=False)
        save_png(out / "grid.png", class_grid(images, labels))
