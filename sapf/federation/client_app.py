"""The site: a Flower ClientApp that answers the plan's noisy queries (PrivImage's semantic histogram, central
images, saliency, SPARTA's row scores, DP-MEPF's mean embeddings) and trains locally with DP-SGD (LoRA, every
weight, or SPARTA's rows).

A site trusts no plan (:mod:`sapf.federation.site_policy`): every field it reads is checked
against its own settings before its data is touched. Every release is recorded in the site's
lifetime ledger — on its own disk, under a lock, *before* the computation that produces it — and
a request that would take the site past its ``max-epsilon`` is refused, never answered by
spending more. Every reply holds only DP outputs (the noisy score vector, DP-SGD-trained adapter
tensors) and declared-public scalars (example count, ε, σ), plus the site's ε history. All noise
comes from fresh OS entropy. Refusals say what was refused and why in plan terms; any other
failure replies with a fixed message (no paths, no data facts) and is printed in the site's log.
"""

from __future__ import annotations

import hashlib
import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from sapf.engine.data import ImageDataset
from sapf.engine.finetune import dp_finetune, load_trainable_state, make_trainable, trainable_state
from sapf.engine.model import DiffusionModel
from sapf.engine.privacy import Mechanism, PrivacyLedger
from sapf.engine.saliency import noisy_saliency_scores
from sapf.federation.site_policy import (
    Refusal,
    SiteSettings,
    check_incoming_weights,
    check_noise,
    check_plan,
    check_round,
    check_rows,
    check_site_plan,
    ensure_same_dataset,
    site_delta,
    site_selection,
    site_settings,
)
from sapf.federation.task import (
    FederationConfig,
    SitePlan,
    base_generator,
    check_budget,
    dataset_fingerprint,
    fingerprint,
    from_wire,
    load_base,
    open_ledger,
    plan_site,
    site_data,
    site_lock,
    site_state_dir,
    to_wire,
)
from sapf.outputs import atomic_path, save_tensors, save_torch

ERROR_REFUSED = 1  # bad request or budget refusal (the site's own decision)
ERROR_FAILED = 2  # the site broke
FAILED_REASON = "the site could not answer this request; its operator sees why in the site's log"

app = ClientApp()


# What a site's ε history tells the server: enough to recompute its ε with any accountant, nothing more. Not the
# site's max-epsilon (how much a server could still ask for), not its name (a hash of its data path).
REPORT_FIELDS = ("delta", "accountant", "mechanisms")


def _report(ledger: PrivacyLedger, plan: SitePlan) -> ConfigRecord:
    """The site's ε history, and its plan's DP-SGD rate a round (public: it follows from ε, δ, N and the plan), with
    which the server counts a round it sent whose reply was lost after the site recorded it."""
    history = ledger.to_dict()
    report = {k: history[k] for k in REPORT_FIELDS}
    if plan.total_steps and plan.train_noise > 0:
        report["training_round"] = {"noise_multiplier": plan.train_noise, "sample_rate": plan.sample_rate,
                                    "steps": plan.local_steps}
    return ConfigRecord({"report": json.dumps(report)})


def _guard(handler):
    """Turn failures into Flower error replies (the server logs them and carries on). Only a
    :class:`Refusal`'s message travels; anything else may name paths or data, so it stays here."""

    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Refusal as e:
            print(f"[sapf site] {e}", flush=True)
            return Message(Error(code=ERROR_REFUSED, reason=str(e)), reply_to=msg)
        except Exception:  # noqa: BLE001 - any site failure must reach the server as an error reply
            traceback.print_exc()
            return Message(Error(code=ERROR_FAILED, reason=FAILED_REASON), reply_to=msg)

    wrapped.__name__ = handler.__name__
    return wrapped


@dataclass
class Site:
    """Everything a request needs, checked: the plan, the site's settings, data and noise plan."""

    cfg: FederationConfig
    settings: SiteSettings
    gen: DiffusionModel
    data: ImageDataset
    name: str
    plan: SitePlan
    state_dir: Path
    fingerprint: str  # of the site's data: names the dataset its ledger belongs to

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.json"

    def ledger(self) -> PrivacyLedger:
        return open_ledger(self.ledger_path, self.settings.max_epsilon, self.plan.delta, self.cfg.accountant)

    def whole_training(self) -> Mechanism:
        """Every DP-SGD step of the plan, all rounds."""
        return self.training_from(1)

    def training_from(self, rnd: int) -> Mechanism:
        """The DP-SGD steps of round `rnd` and every round after it: what the site must still afford to finish."""
        return Mechanism("dp-sgd", self.plan.train_noise, self.plan.sample_rate,
                         self.plan.total_steps - self.plan.local_steps * (rnd - 1))

    def warmup_release(self) -> Mechanism | None:
        """The warm-up's release, if the plan has a warm-up: DP-FETA's central images or DP-MEPF's mean embeddings."""
        if self.cfg.embedding_warmup:
            return Mechanism("mean-embeddings", self.plan.embedding_noise, 1.0, 1)
        if not self.cfg.central_warmup:
            return None
        return Mechanism("central-images", self.plan.central_noise, self.cfg.central_sample_rate,
                         self.cfg.central_queries)

    def selection_query(self) -> Mechanism | None:
        """The plan's private selection query (DP-SAPF's saliency or SPARTA's mask-finding steps), if it has one."""
        cfg, plan = self.cfg, self.plan
        if cfg.selection == "saliency":
            return Mechanism("saliency-query", plan.selection_noise, cfg.selection_sample_rate, 1)
        if cfg.selection == "sparta":
            return Mechanism("sparta-mask", plan.mask_noise, cfg.mask_sample_rate, cfg.mask_steps)
        return None

    def spend(self, mechanisms: list[Mechanism], budget_check: list[Mechanism] | None = None) -> PrivacyLedger:
        """Under the site's lock: load the ledger, refuse past max-epsilon (checking `budget_check`,
        by default the mechanisms themselves), record `mechanisms` and save — all before the release
        is computed, so a crash can only over-count."""
        with site_lock(self.state_dir):
            ensure_same_dataset(self.state_dir, self.fingerprint, len(self.data))
            ledger = self.ledger()
            check_budget(ledger, budget_check if budget_check is not None else mechanisms, self.settings.max_epsilon)
            for m in mechanisms:
                ledger.record(m.name, m.noise_multiplier, m.sample_rate, m.steps)
            ledger.save(self.ledger_path)
        return ledger


def _setup(msg: Message, context: Context) -> Site:
    """Check the plan against the site's settings, then load the data and fix the noise plan."""
    try:
        cfg = FederationConfig.from_record(msg.content["config"])
    except (KeyError, TypeError) as e:
        raise Refusal(f"refused: the request carries no valid plan ({type(e).__name__})") from None
    except Exception as e:  # SapfError: a field of the wrong type
        raise Refusal(f"refused: {e}") from None
    settings = site_settings(context.node_config, cfg)
    check_plan(cfg, settings)
    gen = base_generator(cfg)
    cfg = cfg.for_model(conditional=gen.num_classes > 0)  # an "auto" warm-up decided as the server decides it
    data, name = site_data(cfg, context.node_config, gen)
    check_site_plan(cfg, settings, len(data))
    state_dir = site_state_dir(cfg, context.node_config, name)
    delta = site_delta(cfg, settings, len(data), deployed="data-path" in context.node_config)
    plan = plan_site(cfg, len(data), state_dir, delta)
    if cfg.public_selection == "semantic":
        check_noise("semantic query", plan.semantic_noise)
    if cfg.central_warmup:
        check_noise("central-image release", plan.central_noise)
    if cfg.embedding_warmup:
        check_noise("mean-embedding release", plan.embedding_noise)
    # A plan whose stages change the base (pretraining, a warm-up) sends the server's current base with every request
    # after its first query; that query runs on the base the site loaded itself.
    first = ("query.semantic" if cfg.public_selection == "semantic" else
             "query.central_images" if cfg.central_warmup else
             "query.mean_embeddings" if cfg.embedding_warmup else None)
    if first is not None and msg.metadata.message_type != first:
        gen = _warmed_base(msg, gen, settings)
    if cfg.method == "dp-mepf":  # its one release is all it makes
        check_noise("mean-embedding release", plan.embedding_noise)
    else:
        if cfg.selection == "saliency":
            check_noise("saliency query", plan.selection_noise)
        if cfg.selection == "sparta":
            check_noise("SPARTA mask-finding step", plan.mask_noise)
        check_noise("DP-SGD", plan.train_noise)
    return Site(cfg, settings, gen, data, name, plan, state_dir, dataset_fingerprint(data, context.node_config))


def _warmed_base(msg: Message, gen: DiffusionModel, settings: SiteSettings) -> DiffusionModel:
    """After pretraining or a warm-up every later request carries the server's base: weights only, of this site's
    own architecture, checked like an adapter."""
    if "base" not in msg.content:
        raise Refusal("refused: this plan's request must carry the server's pretrained or warmed base weights")
    state = from_wire(msg.content["base"])
    check_incoming_weights(state, {k: p for k, p in gen.unet.named_parameters()}, settings.limits)
    return load_base(gen, state)


def _noisy_sum_reply(msg: Message, site: Site, ledger: PrivacyLedger, key: str, noisy, sigma: float) -> Message:
    """A query's reply: its noisy sum under `key`, the declared-public scalars (N, ε, σ) and the ε history."""
    return Message(RecordDict({
        key: ArrayRecord(array_dict={key: Array(np.asarray(noisy, np.float64))}),
        "metrics": MetricRecord({"examples": int(len(site.data)), "epsilon": float(ledger.epsilon()),
                                 "noise_multiplier": float(sigma)}),
        "privacy": _report(ledger, site.plan),
    }), reply_to=msg)


def _release_once(msg: Message, site: Site, spent: list[Mechanism], budget_check: list[Mechanism],
                  compute) -> tuple[PrivacyLedger, np.ndarray]:
    """A query's noisy release, paid for and drawn once per request: a server that restarts and asks the same
    request again (the same plan and public weights) gets the kept release back, spending nothing, as a training
    round's reply is kept. Sending the same release again is post-processing; a fresh draw would be a second release
    (paid again, and with two draws the noise averages down). Kept before it leaves: a crash can only over-count."""
    kept = site.state_dir / "replies" / f"{msg.metadata.message_type}-{_request_key(msg)}.npy"
    if kept.exists():
        return site.spend([], budget_check=[]), np.load(kept)  # the same dataset's ledger, nothing recorded
    ledger = site.spend(spent, budget_check=budget_check)
    noisy = np.asarray(compute(), np.float64)
    with atomic_path(kept, private=True) as tmp:
        np.save(tmp, noisy)
    return ledger, noisy


@app.query("central_images")
@_guard
def central_images(msg: Message, context: Context) -> Message:
    """DP-FETA's release at this site: its noisy per-class image sums and counts (one noisy sum)."""
    from sapf.engine.central_images import image_bound, release_central_images
    from sapf.engine.data import load_dataset

    site = _setup(msg, context)
    if not site.cfg.central_warmup:
        raise Refusal("refused: this plan has no central-image warm-up")
    if not site.gen.num_classes:
        raise Refusal("refused: central images need a class-conditional base model")
    cfg = site.cfg
    release = site.warmup_release()
    later = [m for m in (site.selection_query(),) if m is not None]
    bound = image_bound(load_dataset(cfg.public_data, site.gen.image_size, site.gen.channels))
    ledger, sums = _release_once(  # the whole run's budget checked up front
        msg, site, [release], [release, *later, site.whole_training()],
        lambda: release_central_images(data=site.data, num_classes=site.gen.num_classes, bound=bound,
                                       noise_multiplier=site.plan.central_noise, sample_rate=cfg.central_sample_rate,
                                       queries=cfg.central_queries, ledger=None))
    return _noisy_sum_reply(msg, site, ledger, "sums", sums, site.plan.central_noise)


@app.query("saliency")
@_guard
def saliency(msg: Message, context: Context) -> Message:
    site = _setup(msg, context)
    if site.cfg.selection != "saliency":
        raise Refusal(f"refused: a {site.cfg.selection} plan has no saliency query")
    query = site.selection_query()
    # Refuse up front a run whose whole plan (query + every round) would pass the site's limit.
    ledger, scores = _release_once(msg, site, [query], [query, site.whole_training()], lambda: noisy_saliency_scores(
        site.gen, site.data, site.cfg.query(), site.plan.selection_noise, None, show_progress=False)[1])
    return _noisy_sum_reply(msg, site, ledger, "scores", scores, site.plan.selection_noise)


def _public_network(msg: Message, key: str, site: "Site", min_classes: int = 1):
    """The public network a request carries under `key` (DP-MEPF's feature network, PrivImage's pool classifier):
    weights only, loaded into the architecture this site installed, checked like an adapter. Its class count is
    read from its head (public; no bound depends on it) and capped by the site's ``max-public-classes`` limit, as the
    histogram's width costs memory."""
    from sapf.engine.mepf import FeatureNet

    if key not in msg.content:
        raise Refusal(f"refused: this request must carry the public network's weights ({key})")
    state = from_wire(msg.content[key])
    head = state.get("head.bias")
    classes = int(head.shape[0]) if head is not None and head.dim() == 1 else 0
    most = site.settings.limits.max_public_classes
    if not min_classes <= classes <= most:
        raise Refusal(f"refused: the public network must score between {min_classes} and {most} classes; it "
                      f"scores {classes}")
    net = FeatureNet(site.gen.channels, classes)
    check_incoming_weights(state, net.state_dict(), site.settings.limits)
    net.load_state_dict(state)
    return net.eval()


@app.query("semantic")
@_guard
def semantic(msg: Message, context: Context) -> Message:
    """PrivImage's query at this site: its noisy histogram of the public classes its images look like (per private
    label). The pool classifier comes from the server as weights only, loaded into this site's own architecture;
    whatever its weights, a record votes for exactly k classes, so the bound √k holds."""
    from sapf.engine.semantic import release_semantic_histogram

    site = _setup(msg, context)
    cfg = site.cfg
    if cfg.public_selection != "semantic":
        raise Refusal("refused: this plan has no semantic query")
    if not site.data.num_classes:
        raise Refusal("refused: the semantic query needs labelled data at the site")
    net = _public_network(msg, "classifier", site, min_classes=cfg.semantic_top_k)
    num_public = net.head.out_features
    q = cfg.semantic_query()
    release = Mechanism("semantic-query", site.plan.semantic_noise, q.sample_rate, 1)
    later = [m for m in (site.warmup_release(), site.selection_query()) if m is not None]
    ledger, hist = _release_once(  # the whole run's budget checked up front
        msg, site, [release], [release, *later, site.whole_training()],
        lambda: release_semantic_histogram(net=net, data=site.data, num_public=num_public, query=q,
                                           noise_multiplier=site.plan.semantic_noise, ledger=None,
                                           num_labels=site.gen.num_classes).ravel())  # the server's histogram rows
    return _noisy_sum_reply(msg, site, ledger, "sums", hist, site.plan.semantic_noise)


@app.query("mean_embeddings")
@_guard
def mean_embeddings(msg: Message, context: Context) -> Message:
    """DP-MEPF's release at this site: noisy per-class sums of unit feature vectors and counts (one noisy sum; a
    dp-mepf plan's whole ε, or a warm-up's share of it). The feature network comes from the server as weights only,
    loaded into the architecture this site installed; whatever its weights, every feature vector is scaled to unit
    norm, so the bound holds."""
    from sapf.engine.mepf import release_mean_embeddings

    site = _setup(msg, context)
    cfg = site.cfg
    if cfg.method != "dp-mepf" and not cfg.embedding_warmup:
        raise Refusal(f"refused: this {cfg.method} plan has no mean-embedding query")
    if not site.data.num_classes:
        raise Refusal("refused: mean embeddings are per class; this site's data has no labels")
    net = _public_network(msg, "features", site)
    release = Mechanism("mean-embeddings", site.plan.embedding_noise, 1.0, 1)
    # dp-mepf: its one release is the whole plan; a warm-up: the whole run's budget is checked up front
    later = [] if cfg.method == "dp-mepf" else [*(m for m in (site.selection_query(),) if m), site.whole_training()]
    ledger, sums = _release_once(msg, site, [release], [release, *later], lambda: release_mean_embeddings(
        net=net, data=site.data, num_classes=site.gen.num_classes, noise_multiplier=site.plan.embedding_noise,
        ledger=None))
    return _noisy_sum_reply(msg, site, ledger, "sums", sums, site.plan.embedding_noise)


@app.query("sparta_mask")
@_guard
def sparta_mask(msg: Message, context: Context) -> Message:
    """SPARTA's mask-finding steps at this site: its row scores (|noisy sum| of every step's noisy gradient sum,
    per row; post-processing of mask_steps recorded releases), one vector in the model's candidate order."""
    from sapf.engine.sparta import flat_scores, noisy_row_scores

    site = _setup(msg, context)
    if site.cfg.selection != "sparta":
        raise Refusal(f"refused: a {site.cfg.selection} plan has no SPARTA mask query")
    query = site.selection_query()
    ledger, scores = _release_once(msg, site, [query], [query, site.whole_training()], lambda: flat_scores(
        noisy_row_scores(site.gen, site.data, site.cfg.mask_query(), site.plan.mask_noise, None, show_progress=False)))
    return _noisy_sum_reply(msg, site, ledger, "scores", scores, site.plan.mask_noise)


def _request_key(msg: Message) -> str:
    """Fingerprint of a request: its plan (round and selection included) and every weight record it carries (the
    incoming adapter, the server's base, a public network)."""
    h = hashlib.sha256(msg.metadata.message_type.encode() + b"\0")
    h.update(json.dumps(dict(msg.content["config"]), sort_keys=True, default=str).encode())
    for record in ("adapter", "base", "classifier", "features"):
        for name, arr in sorted(msg.content[record].items()) if record in msg.content else []:
            a = np.ascontiguousarray(arr.numpy())  # dtype and shape too: the same bytes may be another array
            h.update(f"{record}/{name}/{a.dtype.str}/{a.shape}/{a.nbytes}\0".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:24]


def _load_reply(path: Path) -> tuple[dict, dict] | None:
    from safetensors.torch import load_file

    if not (path.with_suffix(".json").exists() and path.exists()):
        return None
    return load_file(str(path)), json.loads(path.with_suffix(".json").read_text())


def _save_reply(path: Path, state: dict, metrics: dict) -> None:
    from sapf.outputs import write_json

    save_tensors(path, state)
    write_json(path.with_suffix(".json"), metrics)  # written last: marks the reply complete


def _optimizer_state_path(state_dir: Path, cfg: FederationConfig, selected) -> Path | None:
    """Where the site keeps its optimizer between rounds of one plan (None: a fresh one each round)."""
    if not cfg.keep_optimizer_state:
        return None
    return state_dir / f"optimizer-{fingerprint(cfg.to_record(), selected)}.pt"


@app.train()
@_guard
def train(msg: Message, context: Context) -> Message:
    site = _setup(msg, context)
    cfg = site.cfg
    if cfg.method == "dp-mepf":
        raise Refusal("refused: a dp-mepf plan trains nothing at the sites")
    config = msg.content["config"]
    rnd = check_round(config.get("round"), cfg.rounds)
    selected = site_selection(cfg, config.get("selected"), site.gen)
    rows = check_rows(config.get("rows"), site.gen, cfg) if cfg.selection == "sparta" else None
    model = make_trainable(site.gen, cfg.selection, selected, cfg.rank, cfg.lora_alpha, cfg.freeze_lora_a,
                           rows=rows)
    if "adapter" not in msg.content:
        raise Refusal("refused: the training request carries no adapter")
    incoming = from_wire(msg.content["adapter"])
    check_incoming_weights(incoming, trainable_state(model), site.settings.limits)
    # A server that restarts asks again for a round this site may already have answered. Sending
    # the same release again is free (post-processing); training anew would spend budget twice.
    cached = site.state_dir / "replies" / f"train-{_request_key(msg)}.safetensors"
    reply = _load_reply(cached)
    if reply is None:
        steps = Mechanism("dp-sgd", site.plan.train_noise, site.plan.sample_rate, site.plan.local_steps)
        # Recorded before training: a crash mid-round can only over-count. A site refuses a run it could not
        # finish, at every round and whatever came before: a server may skip the selection query (which checked
        # the whole run) and send its own selection, or start at a later round.
        site.spend([steps], budget_check=[site.training_from(rnd)])
        load_trainable_state(model, incoming)
        dp_cfg = cfg.dpsgd(site.plan.local_steps, cfg.batch_size)
        torch.set_num_threads(max(1, int(os.environ.get("SAPF_SITE_THREADS", "1"))))
        opt_path = _optimizer_state_path(site.state_dir, cfg, [selected, rows])
        opt_state = torch.load(opt_path, weights_only=True) if opt_path and opt_path.exists() else None
        hist = dp_finetune(site.gen, model, site.data, dp_cfg, site.plan.train_noise, None, show_progress=False,
                           optimizer_state=opt_state)
        reply = trainable_state(model), {"examples": int(len(site.data))}
        _save_reply(cached, *reply)
        if opt_path:
            save_torch(opt_path, hist.optimizer_state)
    ledger = site.ledger()
    content = RecordDict({
        "adapter": to_wire(reply[0]),
        "metrics": MetricRecord({"examples": int(len(site.data)), "epsilon": float(ledger.epsilon())}),
        "privacy": _report(ledger, site.plan),
    })
    return Message(content, reply_to=msg)
