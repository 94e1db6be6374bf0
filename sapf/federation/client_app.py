"""The site: a Flower ClientApp that answers the saliency query and trains DP-LoRA locally.

Every reply holds only DP-noised outputs (the noisy score vector, DP-SGD-trained adapter
tensors) and scalars, plus the site's ε history. The site's ledger lives on its own disk,
is written before anything is released, and a request that would take the site past its
``max-epsilon`` (node config) is answered with an error, never by spending more.
"""

from __future__ import annotations

import hashlib
import json
import os
import traceback
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from sapf.engine.finetune import DPSGDConfig, dp_finetune, load_lora_state, lora_state, make_trainable
from sapf.engine.privacy import Mechanism
from sapf.engine.saliency import noisy_saliency_scores
from sapf.errors import SapfError
from sapf.federation.task import (FederationConfig, base_generator, check_budget, fingerprint, from_wire, max_epsilon,
                                  open_ledger, plan_site, save_tensors, site_data, site_state_dir, to_wire)
from sapf.outputs import atomic_path, save_torch

ERROR_REFUSED = 1  # bad request or budget refusal (the site's own decision)
ERROR_FAILED = 2  # the site broke

app = ClientApp()


def _site_seed(state_dir: Path, *parts) -> int:
    """Noise seeds mix in a secret that never leaves the site: the server knows the run's seed,
    and noise it could regenerate would protect nothing."""
    state_dir.mkdir(parents=True, exist_ok=True)
    secret_file = state_dir / "secret"
    if not secret_file.exists():
        with atomic_path(secret_file, private=True) as tmp:
            tmp.write_bytes(os.urandom(32))
    h = hashlib.sha256(secret_file.read_bytes() + json.dumps(parts).encode()).digest()
    return int.from_bytes(h[:7], "big")


def _report(ledger, site: str) -> ConfigRecord:
    return ConfigRecord({"site": site, "report": json.dumps(ledger.to_dict())})


def _guard(handler):
    """Turn failures into Flower error replies (the server logs them and carries on)."""

    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except SapfError as e:
            return Message(Error(code=ERROR_REFUSED, reason=str(e)), reply_to=msg)
        except Exception as e:  # noqa: BLE001 - any site failure must reach the server as an error reply
            traceback.print_exc()
            return Message(Error(code=ERROR_FAILED, reason=f"{type(e).__name__}: {e}"), reply_to=msg)

    wrapped.__name__ = handler.__name__
    return wrapped


def _setup(msg: Message, context: Context):
    cfg = FederationConfig.from_record(msg.content["config"])
    gen = base_generator(cfg)
    data, site = site_data(cfg, context.node_config, gen)
    state_dir = site_state_dir(cfg, context.node_config, site)
    plan = plan_site(cfg, len(data), state_dir)
    ledger_path = state_dir / "ledger.json"
    ledger = open_ledger(ledger_path, cfg, plan.delta)
    return cfg, gen, data, site, plan, state_dir, ledger_path, ledger


@app.query("saliency")
@_guard
def saliency(msg: Message, context: Context) -> Message:
    cfg, gen, data, site, plan, state_dir, ledger_path, ledger = _setup(msg, context)
    # Refuse up front a run whose whole plan (query + every round) would pass the site's limit.
    planned = [Mechanism("saliency-query", plan.selection_noise, cfg.selection_sample_rate, 1),
               Mechanism("dp-sgd", plan.train_noise, plan.sample_rate, plan.total_steps)]
    check_budget(ledger, planned, max_epsilon(context.node_config))
    seed = _site_seed(state_dir, cfg.seed, "saliency")
    _, scores, used = noisy_saliency_scores(gen, data, cfg.query(), plan.selection_noise, ledger, seed, show_progress=False)
    ledger.save(ledger_path)  # on disk before the release leaves the site
    content = RecordDict({
        "scores": ArrayRecord(array_dict={"scores": Array(np.asarray(scores, np.float64))}),
        "metrics": MetricRecord({"examples": int(len(data)), "epsilon": float(ledger.epsilon()),
                                 "noise_multiplier": float(plan.selection_noise)}),
        "privacy": _report(ledger, site),
    })
    return Message(content, reply_to=msg)


def _request_key(msg: Message) -> str:
    """Fingerprint of a training request: its plan, round, selection and incoming adapter."""
    h = hashlib.sha256(json.dumps(dict(msg.content["config"]), sort_keys=True, default=str).encode())
    for name, arr in sorted(msg.content["adapter"].items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr.numpy()).tobytes())
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


def _optimizer_state_path(state_dir: Path, cfg: FederationConfig, selected: list[str]) -> Path | None:
    """Where the site keeps its optimizer between rounds of one plan (None: a fresh one each round)."""
    if not cfg.keep_optimizer_state:
        return None
    return state_dir / f"optimizer-{fingerprint(cfg.to_record(), selected)}.pt"


@app.train()
@_guard
def train(msg: Message, context: Context) -> Message:
    cfg, gen, data, site, plan, state_dir, ledger_path, ledger = _setup(msg, context)
    selected = list(msg.content["config"]["selected"])
    rnd = int(msg.content["config"]["round"])
    # A server that restarts asks again for a round this site may already have answered. Sending
    # the same release again is free (post-processing); training anew would spend budget twice.
    cached = state_dir / "replies" / f"train-{_request_key(msg)}.safetensors"
    reply = _load_reply(cached)
    if reply is None:
        steps = Mechanism("dp-sgd", plan.train_noise, plan.sample_rate, plan.local_steps)
        check_budget(ledger, [steps], max_epsilon(context.node_config))
        model = make_trainable(gen, "saliency", selected, cfg.rank, cfg.lora_alpha, cfg.freeze_lora_a)
        load_lora_state(model, from_wire(msg.content["adapter"]))
        # Record the round's steps before training: a crash mid-round can only over-count.
        ledger.record(steps.name, steps.noise_multiplier, steps.sample_rate, steps.steps)
        ledger.save(ledger_path)
        dp_cfg = DPSGDConfig(plan.local_steps, cfg.batch_size, cfg.multiplicity, cfg.clip, cfg.lr, 0.0,
                             _site_seed(state_dir, cfg.seed, "train", rnd), cfg.optimizer)
        torch.set_num_threads(max(1, int(os.environ.get("SAPF_SITE_THREADS", "1"))))
        opt_path = _optimizer_state_path(state_dir, cfg, selected)
        opt_state = torch.load(opt_path, weights_only=True) if opt_path and opt_path.exists() else None
        hist = dp_finetune(gen, model, data, dp_cfg, plan.train_noise, None, show_progress=False,
                           optimizer_state=opt_state)
        reply = lora_state(model), {"examples": int(len(data)), "loss": float(np.nanmean(hist.loss)),
                                    "train_time_s": float(hist.wall_time_s)}
        _save_reply(cached, *reply)
        if opt_path:
            save_torch(opt_path, hist.optimizer_state)
    state, metrics = reply
    content = RecordDict({
        "adapter": to_wire(state),
        "metrics": MetricRecord({**metrics, "epsilon": float(ledger.epsilon())}),
        "privacy": _report(ledger, site),
    })
    return Message(content, reply_to=msg)
