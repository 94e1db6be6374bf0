"""What a run is made of, declared once. Torch-free: the CLI reads these defaults at start-up.

- :class:`MethodConfig` — the DP method (data, privacy target, parameter selection, DP-SGD, LoRA):
  the settings a central and a federated run share.
- :class:`TrainConfig` — a central run (`sapf train`, `sapf select`): the method plus its schedule.
- :class:`FederationConfig` — a federated run (`sapf federate`, `sapf serve`): the method plus rounds and
  sites; the server sends it to every site (:meth:`FederationConfig.to_record`).

``None`` means "the default that depends on something else" (δ on N, the learning rate on the optimizer,
the batch size on N). A Flower record cannot hold ``None``: such fields are left out of the record, and a
missing field reads back as its default — the only place "unset" is translated.

Every check of a setting raises :class:`ConfigError` naming the *field*; the CLI shows it as the flag
(``--top-fraction``), a site as the plan field (``top_fraction``).
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields

from sapf.defaults import FULL_LR, LORA_LR, SGD_LORA_LR, TRAIN_BATCH_SIZE, TRAIN_STEPS, WARMUP_MIN_EPSILON
from sapf.errors import SapfError

METHODS = ("diffusion", "dp-mepf")  # DP fine-tuning of the public diffusion model | DP-MEPF's generator
SELECTIONS = ("saliency", "attention", "random", "full", "sparta")  # parameter-selection strategies
CANDIDATE_SETS = ("all", "no-conditioning", "attention")
SCORES = ("sqnorm", "norm")
OPTIMIZERS = ("adam", "sgd")
PRETRAIN_AUGMENTATIONS = ("slant", "handwriting")  # sapf pretrain --augmentation
ACCOUNTANTS = ("rdp", "prv")
PARTITIONS = ("iid", "dirichlet")
WARMUPS = ("auto", "none", "central-images", "mean-embeddings")  # the warm-up stage's release (DP-FETA | DP-MEPF)
PUBLIC_SELECTIONS = ("none", "semantic")  # none: the base model as it is | semantic: PrivImage's query + pretraining
WEIGHT_SELECTIONS = ("full", "sparta")  # selections that train the model's own weights (no adapter, full-weight lr)
DEFAULT_HOLDOUT = 0.2  # share of the built-in sensitive set kept out of training, for evaluation


FLAGS = {"num_sites": "clients"}  # fields whose CLI flag has another name


class ConfigError(SapfError):
    """A setting out of range. ``field`` is the config field; the message starts with it."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field} {problem}")

    def as_flag(self) -> str:
        return f"--{kebab(FLAGS.get(self.field, self.field))} {self.problem}"


def _check(ok: bool, field: str, problem: str) -> None:
    if not ok:
        raise ConfigError(field, problem)


def _finite_positive(value) -> bool:
    if isinstance(value, (bool, str)):
        return False
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def _one_of(cfg, field: str, allowed: tuple[str, ...]) -> None:
    _check(getattr(cfg, field) in allowed, field, f"must be one of {', '.join(allowed)}, got {getattr(cfg, field)!r}")


@dataclass
class MethodConfig:
    """The DP method, shared by central and federated runs."""

    data: str = "mnist5k"  # private data: built-in name, image folder or .npz (simulation: the sites' source)
    holdout: float = DEFAULT_HOLDOUT  # share of the data kept out of training (0: train on all)
    base_model: str | None = None  # None: the shipped public model
    epsilon: float = 10.0  # target ε of the whole run (per site in a federation)
    delta: float | None = None  # None: 1/(N ln N) of the data holder's N
    accountant: str = "rdp"  # rdp | prv (Opacus)
    method: str = "diffusion"  # diffusion: DP fine-tuning of the public model (--selection says how) | dp-mepf
    selection: str = "saliency"  # saliency (DP-SAPF) | attention (DP-LoRA) | random | full (DPDM) | sparta (rows)
    candidates: str = "all"  # matrices the selection ranks: all Linear/Conv2d, or attention projections
    top_fraction: float = 0.3  # share of the candidates fine-tuned (saliency, random)
    selection_budget: float = 0.1  # share of ε spent by the saliency query (or SPARTA's mask-finding steps)
    selection_clip: float = 1e-2  # clipping norm of a record's gradient in the saliency query
    selection_sample_rate: float = 1.0  # Poisson rate of the saliency query
    selection_multiplicity: int = 1  # the ranking needs no replicas; they would only cost time
    score: str = "sqnorm"  # saliency score: Σ‖ĝ‖² (sensitivity C²) or Σ‖ĝ‖ (sensitivity C)
    row_fraction: float = 0.2  # SPARTA: share of each matrix's rows fine-tuned (the paper's 20%)
    mask_steps: int = 16  # SPARTA: noisy gradient steps (lr 0) that score the rows: one epoch of...
    mask_sample_rate: float = 0.064  # ...expected batches of 6.4% of the data (256 of mnist5k's 4,000)
    multiplicity: int = 1  # noise/timestep replicas per record in DP-SGD (averaged before clipping)
    clip: float = 0.05  # DP-SGD clipping norm; LoRA per-record gradient norms start near 0.03
    optimizer: str = "adam"  # adam (AdamW) | sgd (momentum 0.9)
    lr: float | None = None  # None: LORA_LR, FULL_LR for full fine-tuning, SGD_LORA_LR for sgd
    label_dropout: float = 0.1  # classifier-free guidance: a label becomes the null class w.p. this (models with one)
    rank: int = 8  # LoRA rank
    lora_alpha: int = 8  # LoRA alpha
    seed: int = 0  # public randomness only: initialisation, random selection, partitions, sample grids
    public_data: str = "digits"  # the public set: it bounds the central images' norms
    warmup: str = "auto"  # auto | none | central-images (DP-FETA: warm up on noisy per-class mean images) |
    #   mean-embeddings (warm up on samples of a DP-MEPF generator); auto: central-images from ε = WARMUP_MIN_EPSILON
    #   up (a class-conditional model), none below
    warmup_budget: float = 0.05  # share of ε spent by the warm-up's release (central images or mean embeddings)
    central_sample_rate: float = 1.0  # Poisson rate of each central-image query
    central_queries: int = 1  # central-image queries (their sums add up)
    warmup_steps: int = 200  # non-private steps on the central images or generator samples (post-processing)
    warmup_generator_steps: int = 400  # mean-embeddings warm-up: DP-MEPF generator steps (post-processing)
    warmup_samples: int = 2000  # mean-embeddings warm-up: the generator's samples the model warms up on
    warmup_lr: float = 1e-4  # Adam learning rate of the warm-up (every weight moves)
    public_selection: str = "none"  # semantic (PrivImage): a noisy query picks public-pool classes to pretrain on
    public_pool: str = "public-pool"  # the labelled public data the semantic query chooses from
    semantic_budget: float = 0.05  # share of ε spent by the semantic query
    semantic_top_k: int = 1  # public classes each private record votes for (sensitivity √k)
    semantic_per_label: int = 1  # public classes chosen per private label
    semantic_classifier_steps: int = 1500  # Adam steps of the public-pool classifier that votes (public data; cached)
    pretrain_steps: int = 3000  # steps of pretraining on the chosen classes (the shipped model's: 3000)
    generator_steps: int = 2000  # DP-MEPF: Adam steps of the generator on the noisy mean embeddings (post-processing)
    generator_lr: float = 1e-3  # DP-MEPF: the generator's Adam learning rate

    @property
    def central_warmup(self) -> bool:
        """Whether the run has DP-FETA's warm-up stage (``auto``: from WARMUP_MIN_EPSILON up)."""
        if self.method == "dp-mepf":  # no diffusion model to warm up
            return False
        return self.warmup == "central-images" or (self.warmup == "auto" and self.epsilon >= WARMUP_MIN_EPSILON)

    @property
    def embedding_warmup(self) -> bool:
        """Whether the run warms up on a DP-MEPF generator's samples (``--warmup mean-embeddings``)."""
        return self.method != "dp-mepf" and self.warmup == "mean-embeddings"

    def for_model(self, conditional: bool):
        """These settings for a base model: ``auto`` made concrete (no central images without classes)."""
        from dataclasses import replace

        if self.warmup != "auto":
            return self
        return replace(self, warmup="central-images" if conditional and self.central_warmup else "none")

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.optimizer == "sgd":
            if self.selection in WEIGHT_SELECTIONS:
                raise ConfigError("lr", f"must be given for sgd with {self.selection} fine-tuning (none measured)")
            return SGD_LORA_LR
        return FULL_LR if self.selection in WEIGHT_SELECTIONS else LORA_LR

    def semantic_query(self):
        """PrivImage's query settings."""
        from sapf.engine.semantic import SemanticQuery

        return SemanticQuery(top_k=self.semantic_top_k, per_label=self.semantic_per_label)

    def mask_query(self):
        """SPARTA's mask-finding settings."""
        from sapf.engine.sparta import MaskQuery

        return MaskQuery(candidates=self.candidates, clip=self.selection_clip, sample_rate=self.mask_sample_rate,
                         steps=self.mask_steps, row_fraction=self.row_fraction)

    def query(self):
        """The saliency query's settings."""
        from sapf.engine.saliency import SaliencyQuery

        return SaliencyQuery(clip=self.selection_clip, multiplicity=self.selection_multiplicity,
                             sample_rate=self.selection_sample_rate, score=self.score, candidates=self.candidates)

    def validate(self) -> None:
        """Every method setting in range (ConfigError names the first that is not)."""
        _check(isinstance(self.epsilon, (int, float)) and not math.isnan(self.epsilon) and self.epsilon > 0,
               "epsilon", f"must be > 0 (or inf for non-private), got {self.epsilon!r}")
        _check(self.delta is None or 0 < self.delta < 1, "delta", f"must lie in (0, 1), got {self.delta!r}")
        _check(0 <= self.holdout < 1, "holdout", f"must lie in [0, 1), got {self.holdout!r}")
        # "" would load the working directory's model (Path("") is "."): absent means the shipped model, nothing else.
        _check(self.base_model is None or self.base_model.strip() != "", "base_model",
               "must name a model directory (leave it out for the shipped model)")
        for name, allowed in (("accountant", ACCOUNTANTS), ("method", METHODS), ("selection", SELECTIONS),
                              ("candidates", CANDIDATE_SETS), ("score", SCORES), ("optimizer", OPTIMIZERS)):
            _one_of(self, name, allowed)
        _check(0 < self.top_fraction <= 1, "top_fraction", f"must lie in (0, 1], got {self.top_fraction!r}")
        _check(0 < self.selection_budget < 1, "selection_budget", f"must lie in (0, 1), got {self.selection_budget!r}")
        _check(_finite_positive(self.selection_clip), "selection_clip",
               f"must be finite and > 0, got {self.selection_clip!r}")
        _check(0 < self.selection_sample_rate <= 1, "selection_sample_rate",
               f"must lie in (0, 1], got {self.selection_sample_rate!r}")
        _check(self.selection_multiplicity >= 1, "selection_multiplicity", "must be at least 1")
        _check(0 < self.row_fraction <= 1, "row_fraction", f"must lie in (0, 1], got {self.row_fraction!r}")
        _check(self.mask_steps >= 1, "mask_steps", "must be at least 1")
        _check(0 < self.mask_sample_rate <= 1, "mask_sample_rate", f"must lie in (0, 1], got {self.mask_sample_rate!r}")
        _check(self.multiplicity >= 1, "multiplicity", "must be at least 1")
        _check(_finite_positive(self.clip), "clip", f"must be finite and > 0, got {self.clip!r}")
        _check(_finite_positive(self.learning_rate()), "lr", f"must be finite and > 0, got {self.lr!r}")
        _check(0 <= self.label_dropout < 1, "label_dropout", f"must lie in [0, 1), got {self.label_dropout!r}")
        _check(self.rank >= 1, "rank", f"must be at least 1, got {self.rank!r}")
        _check(_finite_positive(self.lora_alpha), "lora_alpha", f"must be finite and > 0, got {self.lora_alpha!r}")
        _one_of(self, "warmup", WARMUPS)
        _one_of(self, "public_selection", PUBLIC_SELECTIONS)
        semantic = self.semantic_budget if self.public_selection == "semantic" else 0.0
        if self.public_selection == "semantic":
            _check(self.method == "diffusion", "public_selection", "semantic pretrains a diffusion model: not with "
                   "dp-mepf")
            _check(0 < self.semantic_budget < 1, "semantic_budget", f"must lie in (0, 1), got {self.semantic_budget!r}")
            _check(self.semantic_top_k >= 1, "semantic_top_k", "must be at least 1")
            _check(self.semantic_per_label >= 1, "semantic_per_label", "must be at least 1")
            _check(self.semantic_classifier_steps >= 1, "semantic_classifier_steps", "must be at least 1")
            _check(self.pretrain_steps >= 1, "pretrain_steps", "must be at least 1")
            spent = semantic + (self.selection_budget if self.selection in ("saliency", "sparta") else 0.0)
            _check(spent < 1, "semantic_budget", "and --selection-budget together must stay below 1")
        if self.method == "dp-mepf":
            _check(self.warmup in ("auto", "none"), "warmup", "must be auto or none for dp-mepf (it trains no "
                   "diffusion model)")
            _check(self.generator_steps >= 1, "generator_steps", "must be at least 1")
            _check(_finite_positive(self.generator_lr), "generator_lr",
                   f"must be finite and > 0, got {self.generator_lr!r}")
            return
        if self.warmup != "none":
            _check(0 < self.warmup_budget < 1, "warmup_budget", f"must lie in (0, 1), got {self.warmup_budget!r}")
            spent = semantic + self.warmup_budget + (self.selection_budget if self.selection in ("saliency", "sparta")
                                                     else 0.0)
            _check(spent < 1, "warmup_budget", "and the other stages' budgets together must stay below 1")
            _check(0 < self.central_sample_rate <= 1, "central_sample_rate",
                   f"must lie in (0, 1], got {self.central_sample_rate!r}")
            _check(self.central_queries >= 1, "central_queries", "must be at least 1")
            _check(self.warmup_steps >= 0, "warmup_steps", "must be at least 0")
            _check(self.warmup_generator_steps >= 1, "warmup_generator_steps", "must be at least 1")
            _check(self.warmup_samples >= 1, "warmup_samples", "must be at least 1")
            _check(_finite_positive(self.warmup_lr), "warmup_lr", f"must be finite and > 0, got {self.warmup_lr!r}")

    def dpsgd(self, steps: int, batch_size: int, ema_decay: float = 0.0):
        from sapf.engine.finetune import DPSGDConfig

        return DPSGDConfig(steps=steps, batch_size=batch_size, multiplicity=self.multiplicity, clip=self.clip,
                           lr=self.learning_rate(), ema_decay=ema_decay, optimizer=self.optimizer,
                           label_dropout=self.label_dropout)


@dataclass
class TrainConfig(MethodConfig):
    """A central run: the method plus its DP-SGD schedule."""

    steps: int | None = None  # None: TRAIN_STEPS (or from epochs)
    epochs: float | None = None  # alternatively, epochs of expected batches
    batch_size: int | None = None  # expected Poisson batch; None: default_batch_size(N)
    ema_decay: float = 0.0  # EMA of the trained weights (0: off)

    def resolved(self, n: int) -> "TrainConfig":
        """The batch size this run uses on n records (a copy; the run's config.json records it)."""
        from dataclasses import replace

        return self if self.batch_size is not None else replace(self, batch_size=default_batch_size(n))

    def training_steps(self, n: int) -> int:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("steps", "and --epochs are exclusive: give one")
        if self.epochs is not None:
            _check(_finite_positive(self.epochs), "epochs", f"must be finite and > 0, got {self.epochs!r}")
            return max(1, math.ceil(self.epochs * n / self.resolved(n).batch_size))
        steps = TRAIN_STEPS if self.steps is None else self.steps
        _check(steps >= 1, "steps", "must be at least 1")
        return steps

    def validate_for(self, n: int) -> None:
        """Every setting, including those that depend on the number of records n."""
        self.validate()
        batch = self.resolved(n).batch_size
        _check(1 <= batch <= n, "batch_size", f"must be between 1 and the number of records ({n}), got {batch}")
        _check(self.ema_decay == 0 or 0 < self.ema_decay < 1, "ema_decay", "must be 0 (off) or lie in (0, 1)")
        self.training_steps(n)


def default_batch_size(n: int) -> int:
    """TRAIN_BATCH_SIZE, or a quarter of the records of a small set (Poisson sampling at a rate of at most 1/4
    still amplifies privacy, and the default then works on any dataset)."""
    return max(1, min(TRAIN_BATCH_SIZE, n // 4))


@dataclass
class FederationConfig(MethodConfig):
    """The whole plan of a federated run; the server sends it to every site, which checks every field."""

    partition: str = "iid"  # simulation: iid | dirichlet (label skew)
    alpha: float = 0.5  # Dirichlet concentration
    num_sites: int = 4  # `--clients`
    rounds: int = 6
    local_steps: int = 25  # DP-SGD steps per site per round
    local_epochs: float | None = None  # alternatively, epochs of a site's data per round
    batch_size: int = 64  # expected Poisson batch per site
    # A site carries its optimizer's state (Adam moments of its own noisy gradients; never sent) from round
    # to round; False starts a fresh optimizer every round.
    keep_optimizer_state: bool = True
    freeze_lora_a: bool = False  # FFA-LoRA: every A stays at the server's random start; sites train B only
    min_clients: int = 2  # fewest valid replies a round may go on with
    out: str | None = None  # the run dir on the server's machine (sites never write there when deployed)
    onnx: bool = True  # the server exports model.onnx at the end (False: `sapf export RUN` does it later)

    def local_steps_for(self, n: int) -> int:
        """DP-SGD steps per round at a site holding n records."""
        if self.local_epochs is not None:
            return max(1, math.ceil(self.local_epochs * n / self.batch_size))
        return self.local_steps

    def validate(self) -> None:
        super().validate()
        _check(math.isfinite(self.epsilon), "epsilon", "must be finite for a federation (sites train only under DP)")
        _one_of(self, "partition", PARTITIONS)
        _check(_finite_positive(self.alpha), "alpha", f"must be finite and > 0, got {self.alpha!r}")
        _check(self.num_sites >= 1, "num_sites", "must be at least 1")
        _check(1 <= self.min_clients <= self.num_sites, "min_clients", f"must lie between 1 and {self.num_sites}")
        _check(self.rounds >= 1, "rounds", "must be at least 1")
        _check(self.local_steps >= 1, "local_steps", "must be at least 1")
        _check(self.local_epochs is None or _finite_positive(self.local_epochs), "local_epochs",
               "must be finite and > 0")
        _check(self.batch_size >= 1, "batch_size", "must be at least 1")

    # --- the Flower boundary: flat records of str/int/float/bool, no None -------------------------------

    def to_record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, rec) -> "FederationConfig":
        """Known keys only: a message or run config may carry more (selected, round...). A missing key is
        its default. Each value must have its field's type (an int where an int is declared, never a bool;
        a float field takes an int): a site reads plans from a server it does not trust."""
        values = {}
        for f in fields(cls):
            if f.name not in rec:
                continue
            v, kind = rec[f.name], _plain_type(cls, f.name)
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if type(v) is not kind:
                raise SapfError(f"plan field {f.name} must be of type {kind.__name__}, got {type(v).__name__}")
            values[f.name] = v
        return cls(**values)


@dataclass
class PretrainConfig:
    """Non-private pretraining of a public generator (`sapf pretrain`)."""

    data: str = "digits"
    image_size: int = 28
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 32
    norm_num_groups: int = 8
    # Random horizontal shear of each batch, as (most left-leaning, most right-leaning): x += s·(height
    # above centre)/half-height. None: off. See random_slant.
    slant: tuple[float, float] | None = (-0.1, 0.5)
    # How each batch varies beyond the slant: "slant" (the slant alone) or "handwriting" (rotation, scale, stroke
    # and shift too; sapf.engine.pretrain.vary_as_handwriting).
    augmentation: str = "slant"
    # Classifier-free guidance: a null class (the last class embedding) replaces each label with this probability.
    label_dropout: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _plain_type(cls, name: str) -> type:
    """``float`` for a field declared ``float`` or ``float | None``."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def kebab(name: str) -> str:
    """A config field as a Flower run-config key or a CLI flag stem (``top_fraction`` → ``top-fraction``)."""
    return name.replace("_", "-")


def snake(key: str) -> str:
    return key.replace("-", "_")


def from_values(cls, values: dict, **overrides):
    """A config from a command's keyword arguments: the fields of `cls` found in `values`, then `overrides`."""
    names = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in values.items() if k in names}, **overrides})
