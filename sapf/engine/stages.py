"""A run is a list of stages that share one privacy plan and one ledger.

Today's stages, in order (each method of the harness is a choice of them):

- ``pretrain`` — optional: PrivImage's noisy semantic query picks public classes, and the generator is
  pretrained on them (:mod:`sapf.engine.semantic`);
- ``warmup``   — optional: DP-FETA's noisy per-class central images (a private release through
  :mod:`sapf.engine.noisy_sum`), then every weight trained on them (:mod:`sapf.engine.central_images`);
  or DP-MEPF's noisy mean embeddings, a generator matched to them, and every weight trained on its
  samples (:mod:`sapf.engine.mepf`);
- ``select``   — which weight matrices to fine-tune: the noisy saliency query (DP-SAPF, a private
  release through :mod:`sapf.engine.noisy_sum`) or a public choice (all attention, random, full);
- ``finetune`` — DP-SGD on the chosen parameters (LoRA, or every weight).

Stages that come before training — public-data selection — slot in ahead of ``select`` with their own
release and share of ε. :func:`plan_run` fixes every stage's noise
before any private data is touched; central runs (:mod:`sapf.engine.run`) and the federated server and
sites (:mod:`sapf.federation`) all plan and run the same list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sapf.config import MethodConfig
from sapf.engine.privacy import PlannedRelease, PrivacyPlan, plan_privacy


@dataclass(frozen=True)
class Stage:
    name: str  # pretrain | warmup | select | finetune (DP fine-tuning); embed | generator (DP-MEPF)
    what: str  # one line for config.json and the model card
    release: str | None = None  # ledger name of the stage's private release before training, if it makes one
    epsilon_share: float = 0.0  # share of the run's ε that release spends
    sample_rate: float = 1.0  # its Poisson rate
    release_steps: int = 1  # how many times the release runs

    def to_dict(self) -> dict:
        return asdict(self)


def stages_of(cfg: MethodConfig) -> list[Stage]:
    """The stage list of a run with these settings."""
    if cfg.method == "dp-mepf":
        return [Stage("embed", "noisy per-class mean embeddings of public-network features (DP-MEPF), the whole ε",
                      "mean-embeddings", 1.0),
                Stage("generator", f"a conditional generator trained {cfg.generator_steps} steps to match them "
                      "(post-processing, no privacy cost)")]
    stages = []
    if cfg.public_selection == "semantic":
        stages.append(Stage("pretrain", f"noisy semantic query (PrivImage, top-{cfg.semantic_top_k} votes) picks "
                            f"{cfg.semantic_per_label} class(es) of {cfg.public_pool} per private label; the generator "
                            f"is pretrained on them for {cfg.pretrain_steps} steps (public data)", "semantic-query",
                            cfg.semantic_budget))
    if cfg.central_warmup:
        stages.append(Stage("warmup", f"noisy per-class central images (DP-FETA, {cfg.central_queries} "
                            f"quer{'y' if cfg.central_queries == 1 else 'ies'}), then every weight trained on them for "
                            f"{cfg.warmup_steps} steps", "central-images", cfg.warmup_budget, cfg.central_sample_rate,
                            cfg.central_queries))
    elif cfg.embedding_warmup:
        stages.append(Stage("warmup", "noisy per-class mean embeddings of public-network features (DP-MEPF), a "
                            f"generator trained {cfg.warmup_generator_steps} steps to match them, then every weight "
                            f"trained on {cfg.warmup_samples} of its samples for {cfg.warmup_steps} steps",
                            "mean-embeddings", cfg.warmup_budget))
    if cfg.selection == "saliency":
        select = Stage("select", f"noisy saliency query ranks the {cfg.candidates} candidate matrices; the top "
                       f"{cfg.top_fraction:.0%} are fine-tuned", "saliency-query", cfg.selection_budget,
                       cfg.selection_sample_rate)
    elif cfg.selection == "sparta":
        select = Stage("select", f"SPARTA: {cfg.mask_steps} noisy gradient steps (lr 0) score every row of the "
                       f"{cfg.candidates} candidate matrices; the top {cfg.row_fraction:.0%} of each matrix's rows are "
                       "fine-tuned", "sparta-mask", cfg.selection_budget, cfg.mask_sample_rate, cfg.mask_steps)
    elif cfg.selection == "full":
        select = Stage("select", "every weight is fine-tuned (public choice)")
    elif cfg.selection == "attention":
        select = Stage("select", "every attention projection gets LoRA (public choice)")
    else:
        select = Stage("select", f"a seeded random {cfg.top_fraction:.0%} of the candidates get LoRA (public choice)")
    tuned = ("every weight" if cfg.selection == "full" else "the chosen rows" if cfg.selection == "sparta"
             else f"LoRA (rank {cfg.rank}) on the chosen matrices")
    return stages + [select, Stage("finetune", f"DP-SGD ({cfg.optimizer}) on {tuned}; the rest of ε", "dp-sgd")]


def plan_run(stages: list[Stage], *, epsilon: float, delta: float, accountant: str, train_sample_rate: float,
             train_steps: int) -> PrivacyPlan:
    """Every stage's noise, fixed up front: each release before training spends its share of ε; DP-SGD's σ
    is calibrated so that everything composes to ε exactly. A run with no ``finetune`` stage (DP-MEPF) trains
    nothing privately: its release takes the whole ε."""
    before = [PlannedRelease(s.release, s.epsilon_share, s.sample_rate, s.release_steps) for s in stages
              if s.release and s.name != "finetune"]
    if not any(s.name == "finetune" for s in stages):
        train_steps = 0
    return plan_privacy(target_epsilon=epsilon, delta=delta, releases=before, train_sample_rate=train_sample_rate,
                        train_steps=train_steps, accountant=accountant)
