"""The server: a Flower ServerApp that combines noisy saliency scores, averages DP-LoRA adapters,
checkpoints every round and writes the merged generator. It trusts no site (:mod:`sapf.federation.combine`).

Policy on faults: a round goes on with the replies that arrive (within ``round_timeout``) as
long as at least ``min_clients`` of them are valid; a reply that is an error, or has wrong
keys, wrong shapes or non-finite values, is logged and left out, never averaged in. With
fewer than ``min_clients`` valid replies the run stops, keeping the last round's checkpoint,
and ``sapf federate --resume RUN_DIR`` continues from it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load_file

from sapf.config import snake
from sapf.engine.finetune import load_trainable_state, make_trainable, merged_generator, trainable_state
from sapf.engine.model import count_parameters, save_generator
from sapf.engine.saliency import candidate_modules, choose_matrices, select_top
from sapf.engine.stages import stages_of
from sapf.errors import SapfError
from sapf.federation.combine import combine_noisy_sums, combine_updates, metric, report_of
from sapf.federation.task import (
    WIRE_DTYPE,
    FederationConfig,
    base_generator,
    base_to_wire,
    from_wire,
    load_base,
    recompute_epsilon,
    save_tensors,
    to_wire,
    validate_update,
)
from sapf.outputs import atomic_output_dir, read_json, write_json

log = logging.getLogger("sapf.server")
ROUND_TIMEOUT = 3600.0


def say(msg: str) -> None:
    print(f"[sapf server] {msg}", file=sys.stderr, flush=True)


def wait_for_nodes(grid: Grid, n: int, timeout: float = 600.0) -> list[int]:
    t0 = time.time()
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= n:
            return sorted(nodes)[:n]
        if time.time() - t0 > timeout:
            raise SapfError(f"only {len(nodes)} of {n} sites connected within {timeout:.0f} s")
        time.sleep(1.0)


def _write_site_reports(out: Path, replies: list[Message]) -> None:
    """Each site's ε history, validated, in ``privacy/site-<node id>.json``: named by the node that sent
    it, never by a name the site chooses (a site could otherwise write ``../status``)."""
    for r in replies:
        if r.has_error():
            continue
        node = int(r.metadata.src_node_id)
        report, why = report_of(r)
        if report is None:
            say(f"site {node}: privacy report rejected: {why}")
            continue
        write_json(out / "privacy" / f"site-{node}.json", {"node_id": node, **report})


def _parse(reply: Message, what: str, parse):
    """`parse(reply)` or None, with every failure — a reply of any shape — logged and left out."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        say(f"{what}: site {node} replied with an error: {reply.error.reason}")
        return None
    try:
        return parse(reply)
    except Exception as e:  # noqa: BLE001 - a site may send anything; no reply stops a round
        why = f"missing field {e}" if isinstance(e, KeyError) else e if isinstance(e, ValueError) else type(e).__name__
        say(f"{what}: site {node} reply rejected: {why}")
        return None


def _content(cfg: FederationConfig, base, **records) -> RecordDict:
    """A request: the plan (+ `records`), and the warmed base's weights when the plan has a warm-up."""
    return RecordDict({"config": ConfigRecord(cfg.to_record()), **records, **({"base": base} if base else {})})


def central_images_round(grid: Grid, cfg: FederationConfig, nodes: list[int], gen) -> tuple[np.ndarray, list]:
    """DP-FETA across sites: each site's noisy per-class image sums and counts; the server adds them (a sum of
    the sites' Gaussian releases) and divides only afterwards."""
    from sapf.engine.central_images import REDUCE

    d = gen.channels * (gen.image_size // REDUCE) ** 2
    size = gen.num_classes * (d + 1)
    msgs = [Message(_content(cfg, None), dst_node_id=n, message_type="query.central_images", group_id="central")
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=ROUND_TIMEOUT))

    def parse(r: Message):
        v = np.asarray(r.content["sums"]["sums"].numpy(), np.float64)
        if v.shape != (size,) or not np.isfinite(v).all() or np.abs(v).max() > 1e9:
            raise ValueError("malformed central-image sums")
        if not metric(r, "noise_multiplier", float) > 0:
            raise ValueError("the reply's noise multiplier must be positive")
        return v

    valid = [v for v in (_parse(r, "central images", parse) for r in replies) if v is not None]
    if len(valid) < cfg.min_clients:
        raise SapfError(f"central-image round: {len(valid)} valid replies, fewer than --min-clients {cfg.min_clients}")
    return np.sum(valid, axis=0), replies


def saliency_round(grid: Grid, cfg: FederationConfig, nodes: list[int], names: list[str], base=None) -> dict:
    msgs = [Message(_content(cfg, base), dst_node_id=n, message_type="query.saliency", group_id="saliency")
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=ROUND_TIMEOUT))

    def parse(r: Message):
        s = np.asarray(r.content["scores"]["scores"].numpy(), np.float64)
        if s.shape != (len(names),) or not np.isfinite(s).all():
            raise ValueError("malformed score vector")
        sigma, n = metric(r, "noise_multiplier", float), metric(r, "examples", int)
        if not (sigma > 0 and n > 0):
            raise ValueError("the reply's noise multiplier and example count must be positive")
        return s, sigma, n

    valid = [v for v in (_parse(r, "saliency", parse) for r in replies) if v is not None]
    if len(valid) < cfg.min_clients:
        raise SapfError(f"saliency round: {len(valid)} valid replies, fewer than --min-clients {cfg.min_clients}")
    total = combine_noisy_sums([s for s, _, _ in valid])
    return {"strategy": "saliency", "candidates": names, "selected": select_top(names, total, cfg.top_fraction),
            "scores": total.tolist(), "combination": "equal-weight mean of unit-L1 site vectors",
            "sites": len(valid), "site_noise_multipliers": [v[1] for v in valid],
            "site_examples": [v[2] for v in valid], "clip": cfg.selection_clip, "score": cfg.score,
            "sensitivity_per_site": cfg.selection_clip**2 if cfg.score == "sqnorm" else cfg.selection_clip,
            "top_fraction": cfg.top_fraction, "replies": replies}


def public_selection(cfg: FederationConfig, gen) -> dict:
    """A strategy that needs no private data (attention, random, full): chosen here, and by each site itself."""
    sel = choose_matrices(cfg.selection, gen, None, cfg.query(), cfg.top_fraction, 0.0, None, cfg.seed)
    return {"strategy": cfg.selection, "candidates": sel.candidates, "selected": sel.selected, "sites": 0}


def training_round(grid: Grid, cfg: FederationConfig, nodes: list[int], rnd: int, selected: list[str],
                   state: dict[str, torch.Tensor], base=None) -> tuple[dict[str, torch.Tensor], dict, list[Message]]:
    # Only a saliency plan names its matrices: every other selection is public, and each site makes it itself.
    named = {"selected": selected} if cfg.selection == "saliency" else {}
    content = _content(cfg, base, adapter=to_wire(state))
    content["config"] = ConfigRecord({**cfg.to_record(), **named, "round": rnd})
    msgs = [Message(content, dst_node_id=n, message_type="train", group_id=f"round-{rnd}") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=ROUND_TIMEOUT))

    def parse(r: Message):
        update = from_wire(r.content["adapter"])
        why = validate_update(update, state)
        if why:
            raise ValueError(why)
        return update, metric(r, "examples", int), metric(r, "epsilon", float)

    valid = [v for v in (_parse(r, f"round {rnd}", parse) for r in replies) if v is not None]
    if len(valid) < cfg.min_clients:
        raise SapfError(f"round {rnd}: {len(valid)} valid replies, fewer than --min-clients {cfg.min_clients}; "
                        f"the last checkpoint is kept (resume with --resume)")
    averaged, norms, bound = combine_updates([u for u, _, _ in valid], state)
    clipped = sum(n > bound for n in norms)
    if clipped:
        say(f"round {rnd}: {clipped} site update(s) past {bound:.3g} (3x the median change) clipped")
    why = validate_update(averaged, state)
    if why:  # cannot happen with finite inputs; checked so that nothing unchecked becomes the global model
        raise SapfError(f"round {rnd}: the combined adapter is unusable ({why}); the last checkpoint is kept")
    if cfg.freeze_lora_a:  # FFA-LoRA: A is the server's; a site that moved it (e.g. an older sapf) cannot drift it
        averaged = {k: state[k] if ".lora_A." in k else v for k, v in averaged.items()}
    metrics = {"round": rnd, "replies": len(valid),
               "wire_bytes_per_site": int(sum(v.numel() for v in state.values()) * WIRE_DTYPE.itemsize),
               "max_site_epsilon": max(v[2] for v in valid),
               "examples": int(sum(min(v[1], 10**12) for v in valid)), "update_norms": [round(n, 6) for n in norms],
               "update_norm_bound": round(bound, 6)}
    return averaged, metrics, replies


def _save_checkpoint(out: Path, rnd: int, selection: dict, state: dict[str, torch.Tensor], history: list[dict]) -> None:
    ck = out / "checkpoint"
    save_tensors(ck / "adapter.safetensors", state)
    write_json(ck / "state.json", {"round": rnd, "selection": selection, "history": history})  # written last


def run_server(grid: Grid, cfg: FederationConfig) -> None:
    """The run's stages, in order, each private query one round whose replies are the sites' noisy sums:
    ``warmup`` (central images, then the server warms the model up and sends its weights with every later
    request), ``select`` (the saliency round, or a public choice), then ``finetune`` (rounds of local DP-SGD)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    public = gen = base_generator(cfg)
    cfg = cfg.for_model(conditional=gen.num_classes > 0)  # the sites get a concrete --warmup
    base = None  # the warmed base's weights on the wire, when the plan has a warm-up
    nodes = wait_for_nodes(grid, cfg.min_clients if cfg.num_sites <= 0 else cfg.num_sites)
    say(f"{len(nodes)} sites connected")
    ck = out / "checkpoint" / "state.json"
    resumed = ck.exists()
    if resumed:
        st = read_json(ck)
        selection, start, history = st["selection"], st["round"] + 1, st["history"]
        say(f"resuming after round {st['round']}")
    for stage in stages_of(cfg):
        if stage.name == "warmup":
            gen = _warmup(grid, cfg, nodes, gen, out, resumed)
            base = base_to_wire(gen.unet)
        elif stage.name == "select" and not resumed:
            if cfg.selection == "saliency":
                selection = saliency_round(grid, cfg, nodes, candidate_modules(gen.unet, cfg.candidates), base)
                _write_site_reports(out, selection.pop("replies"))
            else:
                selection = public_selection(cfg, gen)
            write_json(out / "selection.json", selection)
            say(f"selection ({cfg.selection}): {len(selection['selected'])} of {len(selection['candidates'])} "
                f"matrices")
        elif stage.name == "finetune":
            torch.manual_seed(cfg.seed)  # the same initial adapter for every site
            model = make_trainable(gen, cfg.selection, selection["selected"], cfg.rank, cfg.lora_alpha,
                                   cfg.freeze_lora_a)
            if resumed:
                state = load_file(str(out / "checkpoint" / "adapter.safetensors"))
            else:
                state, start, history = trainable_state(model), 1, []
                _save_checkpoint(out, 0, selection, state, history)
            for rnd in range(start, cfg.rounds + 1):
                t0 = time.time()
                state, metrics, replies = training_round(grid, cfg, nodes, rnd, selection["selected"], state, base)
                metrics["wall_time_s"] = round(time.time() - t0, 1)
                history.append(metrics)
                _write_site_reports(out, replies)
                _save_checkpoint(out, rnd, selection, state, history)
                say(f"round {rnd}/{cfg.rounds}: {metrics['replies']} sites, "
                    f"max site ε {metrics['max_site_epsilon']:.3f}, {metrics['wall_time_s']:.0f} s")
            load_trainable_state(model, state)
    finish(out, cfg, gen, model, selection, history, public)


def _warmup(grid: Grid, cfg: FederationConfig, nodes: list[int], gen, out: Path, resumed: bool):
    """The warm-up stage: the sites' central-image sums → central images → the warmed model (kept in
    checkpoint/base.safetensors, so a resumed run sends the same base)."""
    from sapf.engine.central_images import central_images, warm_up
    from sapf.engine.run import write_central_images

    saved = out / "checkpoint" / "base.safetensors"
    if resumed and saved.exists():
        return load_base(gen, load_file(str(saved)))
    sums, replies = central_images_round(grid, cfg, nodes, gen)
    _write_site_reports(out, replies)
    central = central_images(sums, gen.num_classes, gen.channels, gen.image_size)
    write_central_images(out / "central_images.png", central)
    warmed = warm_up(gen, central, steps=cfg.warmup_steps, lr=cfg.warmup_lr, label_dropout=cfg.label_dropout,
                     seed=cfg.seed, show_progress=False)
    save_tensors(saved, {k: p for k, p in warmed.unet.named_parameters()})
    say(f"warm-up: central images from {len(nodes)} sites; {cfg.warmup_steps} steps on them")
    return warmed


def finish(out: Path, cfg: FederationConfig, gen, model, selection: dict, history: list[dict], public=None) -> None:
    from sapf.engine.sampling import sample
    from sapf.model_card import write_model_card
    from sapf.outputs import class_grid, save_png

    merged = merged_generator(gen, model, cfg.selection)
    writers = {"model": lambda d: save_generator(merged, d)}
    if cfg.selection != "full" and not cfg.central_warmup:  # after a warm-up the adapters fit the warmed model only
        writers["adapter"] = lambda d: model.save_pretrained(d)
    for name, write in writers.items():
        with atomic_output_dir(out / name, force=True) as tmp:
            write(tmp)
    write_json(out / "metrics.json", {"rounds": history, "trainable_parameters": count_parameters(model, True)})
    images, labels = sample(merged, 100, steps=50, seed=cfg.seed, show_progress=False)
    grid = class_grid(images, labels)
    save_png(out / "grid.png", grid)
    pub, plabels = sample(public or gen, 100, steps=50, seed=cfg.seed, show_progress=False)
    gap = np.full((grid.shape[0], 8), 255, np.uint8)
    save_png(out / "comparison.png", np.concatenate([class_grid(pub, plabels), gap, grid], axis=1))
    try:
        from sapf.export.onnx_export import export_onnx

        export_onnx(out / "model", out / "model.onnx")
    except ImportError:
        say("ONNX export is not available in this installation; skipped")
    reports = sorted((out / "privacy").glob("*.json")) if (out / "privacy").exists() else []
    eps, ledgers = {}, []
    for p in reports:  # validated when written; still, a report must not stop the run at its end
        try:
            report = read_json(p)
            eps[p.stem] = recompute_epsilon(report)
            ledgers.append((p.stem, {**report, "epsilon_spent": eps[p.stem]}))
        except Exception as e:  # noqa: BLE001
            say(f"{p.name}: ε not recomputed ({type(e).__name__})")
    saved = out / "config.json"
    config = {"command": read_json(saved).get("command", "federate") if saved.exists() else "federate",
              **cfg.to_record()}
    write_model_card(out, config=config, privacy=ledgers, stages=stages_of(cfg),
                     examples=f"{len(ledgers)} sites; per-site record counts in each site's replies (metrics.json)")
    write_json(out / "status.json", {"status": "completed", "rounds": cfg.rounds, "site_epsilon": eps})


def run_and_record(grid: Grid, cfg: FederationConfig) -> None:
    """run_server, with a failure written to status.json: Flower reports a run whose ServerApp
    raised as merely "finished", so `sapf federate` and `sapf serve` read this file instead."""
    try:
        run_server(grid, cfg)
    except Exception as e:
        say(f"error: {e}")
        if cfg.out:
            write_json(Path(cfg.out) / "status.json", {"status": "failed", "error": str(e)})
        raise


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: the plan comes from the run config (pyproject / --run-config)."""
    cfg = FederationConfig.from_record({snake(k): v for k, v in context.run_config.items()})
    run_and_record(grid, cfg if cfg.out else replace(cfg, out="runs/deployed"))  # `flwr run .` names no run dir


def make_server_app(cfg: FederationConfig) -> ServerApp:
    """Simulation entry point: the same main, with the plan given directly."""
    sim = ServerApp()

    @sim.main()
    def _main(grid: Grid, context: Context) -> None:
        run_and_record(grid, cfg)

    return sim
