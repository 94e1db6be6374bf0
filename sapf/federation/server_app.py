"""The server: a Flower ServerApp that combines noisy saliency scores, averages DP-LoRA adapters,
checkpoints every round and writes the merged generator. It trusts no site (:mod:`sapf.federation.combine`).

Policy on faults: a round goes on with the replies that arrive (within ``round_timeout``) as
long as at least ``min_clients`` of them are valid; a reply that is an error, or has wrong
keys, wrong shapes or non-finite values, is logged and left out, never averaged in. With
fewer than ``min_clients`` valid replies the run stops, keeping the last round's checkpoint,
and ``sapf federate --resume RUN_DIR`` continues from it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load_file

from sapf.config import WEIGHT_SELECTIONS, snake
from sapf.engine.finetune import load_trainable_state, make_trainable, merged_generator, trainable_state
from sapf.engine.model import count_parameters, save_generator
from sapf.engine.saliency import candidate_modules, choose_matrices, select_top
from sapf.engine.sparta import row_masks, trainable_count
from sapf.engine.stages import stages_of
from sapf.errors import SapfError
from sapf.federation.combine import (
    MAX_REPORT_STEPS,
    combine_central_sums,
    combine_noisy_sums,
    combine_updates,
    metric,
    report_of,
)
from sapf.federation.task import (
    WIRE_DTYPE,
    FederationConfig,
    base_generator,
    base_to_wire,
    from_wire,
    load_base,
    recompute_epsilon,
    to_wire,
    validate_update,
)
from sapf.outputs import atomic_output_dir, atomic_path, read_json, save_tensors, write_json

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


def _write_site_reports(out: Path, replies: list[Message], accountant: str) -> set[int]:
    """Each site's ε history, validated, in ``privacy/site-<node id>.json``: named by the node that sent
    it, never by a name the site chooses (a site could otherwise write ``../status``). A site's ledger only
    grows, so a report whose ε is below the one kept is a site's lie or a stale reply: the kept one stays.
    Returns the nodes whose report was kept (a kept report replaces the site's earlier one, rounds without a reply
    included: the site's ledger holds what it spent in them)."""
    kept = set()
    for r in replies:
        if r.has_error():
            continue
        node = int(r.metadata.src_node_id)
        report, why = report_of(r, accountant)
        if report is None:
            say(f"site {node}: privacy report rejected: {why}")
            continue
        path = out / "privacy" / f"site-{node}.json"
        if path.exists() and _epsilon_or(report, math.inf) < _epsilon_or(read_json(path), -math.inf):
            say(f"site {node}: privacy report rejected: its ε is below the site's earlier report's")
            continue
        write_json(path, {"node_id": node, **report})
        kept.add(node)
    return kept


def _write_reports_of(out: Path, nodes: list[int], replies: list[Message], what: int | str,
                      accountant: str) -> None:
    """A request's site reports, and for each site sent it that kept no report, the request noted as *unconfirmed*
    in its stored report (a stub if it has none): the site may have recorded it (a site records before it computes)
    and failed afterwards, and its stored ε would otherwise be below what it spent. `what`: the training round's
    number, or the query's kind. :func:`_with_unconfirmed` counts an unconfirmed round at the rate the site declared
    for its rounds; what it cannot count is listed, never dropped."""
    kept = _write_site_reports(out, replies, accountant)
    for node in sorted(set(nodes) - kept):
        path = out / "privacy" / f"site-{node}.json"
        stored = read_json(path) if path.exists() else {"node_id": node}
        write_json(path, {**stored, "unconfirmed": [*stored.get("unconfirmed", []), what]})


def _with_unconfirmed(report: dict) -> tuple[dict, list]:
    """A stored site report with its unconfirmed training rounds counted as the site declared each round (its plan's
    DP-SGD σ, sample rate and steps a round, ``training_round``: an upper bound, exact for a site that recorded the
    round), and what could not be counted (a query, or a round with no declared rate)."""
    unconfirmed, per_round = report.get("unconfirmed", []), report.get("training_round")
    rounds = [w for w in unconfirmed if isinstance(w, int)] if per_round else []
    uncounted = [w for w in unconfirmed if w not in rounds]
    if not rounds:
        return report, uncounted
    extra = {"name": "dp-sgd (rounds without a reply)", "noise_multiplier": per_round["noise_multiplier"],
             "sample_rate": per_round["sample_rate"], "steps": min(len(rounds) * per_round["steps"], MAX_REPORT_STEPS)}
    return {**report, "mechanisms": [*report["mechanisms"], extra]}, uncounted


def _epsilon_or(report: dict, fallback: float) -> float:
    """A report's ε, or `fallback` when it cannot be recomputed (a report must not stop a round)."""
    try:
        return recompute_epsilon(report)
    except Exception:  # noqa: BLE001
        return fallback


def _parse(reply: Message, what: str, parse):
    """`parse(reply)` or None, with every failure — a reply of any shape — logged and left out."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        # repr, cut: a site's text must not forge log lines (newlines, terminal escapes).
        say(f"{what}: site {node} replied with an error: {reply.error.reason[:200]!r}")
        return None
    try:
        return parse(reply)
    except Exception as e:  # noqa: BLE001 - a site may send anything; no reply stops a round
        why = f"missing field {e}" if isinstance(e, KeyError) else e if isinstance(e, ValueError) else type(e).__name__
        say(f"{what}: site {node} reply rejected: {str(why)[:200]!r}")
        return None


def _content(cfg: FederationConfig, base, **records) -> RecordDict:
    """A request: the plan (+ `records`), and the server's base weights once a stage has changed the base."""
    return RecordDict({"config": ConfigRecord(cfg.to_record()), **records, **({"base": base} if base else {})})


def query_round(grid: Grid, cfg: FederationConfig, nodes: list[int], kind: str, size: int, content: RecordDict,
                max_abs: float = math.inf) -> list[tuple[np.ndarray, float, int]]:
    """One private query: ``query.<kind>`` to every site; each reply's noisy vector (under ``sums`` or ``scores``,
    `size` finite values of at most `max_abs`), σ > 0 and example count > 0 are checked, and what fails is left
    out; the sites' reports are kept. Returns [(vector, σ, examples)]; fewer than min_clients valid replies stop the
    run."""
    msgs = [Message(content, dst_node_id=n, message_type=f"query.{kind}", group_id=kind) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=ROUND_TIMEOUT))
    what = kind.replace("_", " ")

    def parse(r: Message):
        key = "sums" if "sums" in r.content else "scores"
        v = np.asarray(r.content[key][key].numpy(), np.float64)
        if v.shape != (size,) or not np.isfinite(v).all() or np.abs(v).max(initial=0.0) > max_abs:
            raise ValueError(f"malformed {what} vector")
        sigma, n = metric(r, "noise_multiplier", float), metric(r, "examples", int)
        if not (sigma > 0 and n > 0):
            raise ValueError("the reply's noise multiplier and example count must be positive")
        return v, sigma, n

    _write_reports_of(Path(cfg.out), nodes, replies, what, cfg.accountant)  # before a failed query stops the run
    valid = [v for v in (_parse(r, what, parse) for r in replies) if v is not None]
    if len(valid) < cfg.min_clients:
        raise SapfError(f"{what} round: {len(valid)} valid replies, fewer than --min-clients {cfg.min_clients}")
    return valid


def central_images_round(grid: Grid, cfg: FederationConfig, nodes: list[int], gen, base=None) -> np.ndarray:
    """DP-FETA across sites: each site's noisy per-class image sums and counts, combined with bounded influence
    (:func:`combine_central_sums`: the pixel-wise median of each site's own clamped means)."""
    from sapf.engine.central_images import REDUCE

    d = gen.channels * (gen.image_size // REDUCE) ** 2
    valid = query_round(grid, cfg, nodes, "central_images", gen.num_classes * (d + 1), _content(cfg, base),
                        max_abs=1e9)
    return combine_central_sums([v for v, _, _ in valid], gen.num_classes, d)


def saliency_round(grid: Grid, cfg: FederationConfig, nodes: list[int], names: list[str], base=None) -> dict:
    valid = query_round(grid, cfg, nodes, "saliency", len(names), _content(cfg, base))
    total = combine_noisy_sums([s for s, _, _ in valid])
    return {"strategy": "saliency", "candidates": names, "selected": select_top(names, total, cfg.top_fraction),
            "scores": total.tolist(), "combination": "equal-weight mean of unit-L1 site vectors",
            "sites": len(valid), "site_noise_multipliers": [v[1] for v in valid],
            "site_examples": [v[2] for v in valid], "clip": cfg.selection_clip, "score": cfg.score,
            "sensitivity_per_site": cfg.selection_clip**2 if cfg.score == "sqnorm" else cfg.selection_clip,
            "top_fraction": cfg.top_fraction}


def sparta_round(grid: Grid, cfg: FederationConfig, nodes: list[int], gen, base=None) -> dict:
    """SPARTA across sites: each site's noisy row scores (its mask-finding steps, recorded in its ledger); the
    server combines them (bounded, :func:`combine_noisy_sums`) and keeps each matrix's top rows."""
    from sapf.engine.sparta import row_counts, split_scores, top_rows

    counts = row_counts(gen, cfg.candidates)
    valid = query_round(grid, cfg, nodes, "sparta_mask", sum(counts.values()), _content(cfg, base))
    scores = split_scores(combine_noisy_sums([s for s, _, _ in valid]), counts)
    return {"strategy": "sparta", "candidates": list(counts), "selected": list(counts),
            "rows": top_rows(scores, cfg.row_fraction), "row_scores": {k: v.tolist() for k, v in scores.items()},
            "combination": "equal-weight mean of unit-L1 site vectors", "sites": len(valid),
            "site_noise_multipliers": [v[1] for v in valid], "site_examples": [v[2] for v in valid],
            "mask_steps": cfg.mask_steps, "sensitivity_per_site": cfg.selection_clip, "clip": cfg.selection_clip,
            "top_fraction": cfg.row_fraction}


def public_selection(cfg: FederationConfig, gen) -> dict:
    """A strategy that needs no private data (attention, random, full): chosen here, and by each site itself."""
    sel = choose_matrices(cfg.selection, gen, None, cfg.query(), cfg.top_fraction, 0.0, None, cfg.seed)
    return {"strategy": cfg.selection, "candidates": sel.candidates, "selected": sel.selected, "sites": 0}


def training_round(grid: Grid, cfg: FederationConfig, nodes: list[int], rnd: int, selection: dict,
                   state: dict[str, torch.Tensor], base=None, masks: dict[str, torch.Tensor] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """One round of local DP-SGD at every site, the changes combined (bounded), the sites' reports kept.
    `masks`: SPARTA's row masks by parameter name; rows outside them keep the current weights whatever a site
    sends."""
    # A saliency plan names its matrices, a SPARTA plan its rows; every other selection is public, and each
    # site makes it itself.
    named = ({"selected": selection["selected"]} if cfg.selection == "saliency" else
             {"rows": json.dumps(selection["rows"], separators=(",", ":"))} if cfg.selection == "sparta" else {})
    content = _content(cfg, base, adapter=to_wire(state))
    content["config"] = ConfigRecord({**cfg.to_record(), **named, "round": rnd})
    msgs = [Message(content, dst_node_id=n, message_type="train", group_id=f"round-{rnd}") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=ROUND_TIMEOUT))
    _write_reports_of(Path(cfg.out), nodes, replies, rnd, cfg.accountant)  # before a failed round stops the run

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
    if bound == 0 and max(norms) > 0:  # e.g. one of two sites sends its adapter back unchanged
        say(f"round {rnd}: warning: the low median of the sites' change norms is 0, so no site's change counts and "
            f"the model did not move; with {len(valid)} sites, sites that send no change decide the bound")
    clipped = sum(n > bound for n in norms)
    if clipped:
        say(f"round {rnd}: {clipped} site update(s) past {bound:.3g} (3x the median change) clipped")
    why = validate_update(averaged, state)
    if why:  # cannot happen with finite inputs; checked so that nothing unchecked becomes the global model
        raise SapfError(f"round {rnd}: the combined adapter is unusable ({why}); the last checkpoint is kept")
    if cfg.freeze_lora_a:  # FFA-LoRA: A is the server's; a site that moved it (e.g. an older sapf) cannot drift it
        averaged = {k: state[k] if ".lora_A." in k else v for k, v in averaged.items()}
    if masks:  # SPARTA: only the chosen rows move (float16 rounding on the wire must not drift the frozen ones)
        averaged = {k: torch.where(_rows_of(masks[k], v), v, state[k]) if k in masks else v
                    for k, v in averaged.items()}
    metrics = {"round": rnd, "replies": len(valid),
               "wire_bytes_per_site": int(sum(v.numel() for v in state.values()) * WIRE_DTYPE.itemsize),
               "max_site_epsilon": max(v[2] for v in valid),
               "examples": int(sum(min(v[1], 10**12) for v in valid)), "update_norms": [round(n, 6) for n in norms],
               "update_norm_bound": round(bound, 6)}
    return averaged, metrics


def _rows_of(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A row mask (out,) as a boolean tensor that broadcasts over `t` (out, ...)."""
    return mask.bool().view(-1, *[1] * (t.dim() - 1))


def _save_checkpoint(out: Path, rnd: int, selection: dict, state: dict[str, torch.Tensor], history: list[dict]) -> None:
    """The round's adapter under its own name, then state.json naming it (written last), then older adapters go: a
    kill between two writes leaves state.json with the adapter of its own round, never a later round's (resuming
    round r on round r's adapter would have the sites train, and pay for, that round twice)."""
    ck = out / "checkpoint"
    name = f"adapter-{rnd}.safetensors"
    save_tensors(ck / name, state)
    write_json(ck / "state.json", {"round": rnd, "adapter": name, "selection": selection, "history": history})
    for old in ck.glob("adapter*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def run_server(grid: Grid, cfg: FederationConfig) -> None:
    """The run's stages, in order, each private query one round whose replies are the sites' noisy sums:
    ``warmup`` (central images or mean embeddings, then the server warms the model up and sends its weights with
    every later request), ``select`` (the saliency round, SPARTA's row-score round, or a public choice), then
    ``finetune`` (rounds of local DP-SGD)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    public = gen = base_generator(cfg)
    cfg = cfg.for_model(conditional=gen.num_classes > 0)  # the sites get a concrete --warmup
    base = None  # the server's base weights on the wire, once pretraining or a warm-up changed it
    nodes = wait_for_nodes(grid, cfg.min_clients if cfg.num_sites <= 0 else cfg.num_sites)
    say(f"{len(nodes)} sites connected")
    if cfg.method == "dp-mepf":
        return mean_embedding_run(grid, cfg, nodes, gen, out)
    ck = out / "checkpoint" / "state.json"
    resumed = ck.exists()
    if resumed:
        st = read_json(ck)
        # A checkpoint of an older sapf may carry round times: they are not shared any more.
        selection, start = st["selection"], st["round"] + 1
        history = [{k: v for k, v in h.items() if k != "wall_time_s"} for h in st["history"]]
        say(f"resuming after round {st['round']}")
    for stage in stages_of(cfg):
        if stage.name == "pretrain":
            gen = _pretrain(grid, cfg, nodes, gen, out, resumed)
            base = base_to_wire(gen.unet)
        elif stage.name == "warmup":
            gen = _warmup(grid, cfg, nodes, gen, out, resumed, base)
            base = base_to_wire(gen.unet)
        elif stage.name == "select" and not resumed:
            if cfg.selection == "saliency":
                selection = saliency_round(grid, cfg, nodes, candidate_modules(gen.unet, cfg.candidates), base)
            elif cfg.selection == "sparta":
                selection = sparta_round(grid, cfg, nodes, gen, base)
            else:
                selection = public_selection(cfg, gen)
            write_json(out / "selection.json", selection)
            say(f"selection ({cfg.selection}): {len(selection['selected'])} of {len(selection['candidates'])} "
                f"matrices" + (f", the top {cfg.row_fraction:.0%} of each one's rows" if "rows" in selection else ""))
        elif stage.name == "finetune":
            torch.manual_seed(cfg.seed)  # the same initial adapter for every site
            model = make_trainable(gen, cfg.selection, selection["selected"], cfg.rank, cfg.lora_alpha,
                                   cfg.freeze_lora_a, rows=selection.get("rows"))
            masks = row_masks(model)
            if resumed:
                state = load_file(str(out / "checkpoint" / Path(st.get("adapter", "adapter.safetensors")).name))
            else:
                state, start, history = trainable_state(model), 1, []
                _save_checkpoint(out, 0, selection, state, history)
            for rnd in range(start, cfg.rounds + 1):
                t0 = time.time()
                state, metrics = training_round(grid, cfg, nodes, rnd, selection, state, base, masks)
                history.append(metrics)  # no round time: it depends on the sites' Poisson batch sizes
                _save_checkpoint(out, rnd, selection, state, history)
                say(f"round {rnd}/{cfg.rounds}: {metrics['replies']} sites, "
                    f"max site ε {metrics['max_site_epsilon']:.3f}, {time.time() - t0:.0f} s")
            load_trainable_state(model, state)
    finish(out, cfg, gen, model, selection, history, public)


def mean_embedding_run(grid: Grid, cfg: FederationConfig, nodes: list[int], base, out: Path) -> None:
    """DP-MEPF across sites: one round. The server trains the feature network on public data and sends its weights;
    each site releases its noisy per-class feature sums and counts; the server combines the sites' means
    (:func:`combine_mean_embeddings`), trains the generator on them and writes the run dir. The combined sums are
    kept in ``checkpoint/``, so a resumed run asks the sites nothing again (and were it to ask again, say after a
    failure before they were kept, each site would send its kept release back at no cost)."""
    from sapf.engine.data import load_dataset
    from sapf.engine.mepf import feature_dim, public_feature_net, sample_generator, train_generator
    from sapf.engine.sampling import GRID_SAMPLES
    from sapf.model_card import write_model_card
    from sapf.outputs import class_grid, save_png

    if not base.num_classes:
        raise SapfError("dp-mepf needs a class-conditional base model (per-class mean embeddings)")
    net = public_feature_net(load_dataset(cfg.public_data, base.image_size, base.channels), seed=cfg.seed)
    k, d = base.num_classes, feature_dim(net, base.channels, base.image_size)
    saved = out / "checkpoint" / "mean_embeddings.npz"
    if saved.exists():
        means = np.load(saved)["means"]
    else:
        valid = query_round(grid, cfg, nodes, "mean_embeddings", k * (d + 1),
                            _content(cfg, None, features=base_to_wire(net)))
        means = combine_mean_embeddings([v for v, _, _ in valid], k)
        with atomic_path(saved) as tmp:  # a kill mid-write must not leave means a resumed run would read
            np.savez(tmp, means=means, sites=len(valid))
    say(f"mean embeddings from {len(nodes)} sites; training the generator for {cfg.generator_steps} steps")
    gen, losses = train_generator(net, means, image_size=base.image_size, channels=base.channels,
                                  steps=cfg.generator_steps, lr=cfg.generator_lr, seed=cfg.seed, show_progress=False)
    with atomic_output_dir(out / "model", force=True) as tmp:
        gen.save_pretrained(tmp)
    save_tensors(out / "feature_net.safetensors", net.state_dict())
    write_json(out / "metrics.json", {"trainable_parameters": count_parameters(gen, True), "feature_dim": d,
                                      "generator_loss": [round(v, 6) for v in losses]})
    images, labels = sample_generator(gen, GRID_SAMPLES, seed=cfg.seed)
    save_png(out / "grid.png", class_grid(images, labels))
    _export(out, cfg)
    eps, ledgers, uncounted = _site_ledgers(out)
    write_model_card(out, config={"command": _command(out), **cfg.to_record()}, privacy=ledgers,
                     stages=stages_of(cfg), examples=f"{len(ledgers)} sites", unconfirmed=uncounted)
    write_json(out / "status.json", {"status": "completed", "rounds": 1, "site_epsilon": eps,
                                     **({"site_requests_unconfirmed": uncounted} if uncounted else {})})


def combine_mean_embeddings(site_sums: list[np.ndarray], num_classes: int) -> np.ndarray:
    """The sites' per-class means (each site's noisy sums over its noisy counts), each mean clipped to norm 1 — a
    mean of unit vectors is no longer — and averaged with equal weights: a site that sends anything moves a class's
    mean by at most 2/(number of sites)."""
    from sapf.engine.mepf import mean_embeddings

    means = []
    for v in site_sums:
        m, _ = mean_embeddings(v, num_classes)
        means.append(m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1.0))
    return np.mean(means, axis=0)


def _export(out: Path, cfg: FederationConfig) -> None:
    if not cfg.onnx:
        say(f"model.onnx not exported (--no-onnx); for onnxruntime: sapf export {out} --out {out}/model.onnx")
        return
    try:
        from sapf.export.onnx_export import export_onnx

        export_onnx(out / "model", out / "model.onnx")
    except ImportError:
        say("ONNX export is not available in this installation; skipped")


def _command(out: Path) -> str:
    """The command that made the run dir (federate or serve), from its config.json."""
    saved = out / "config.json"
    return read_json(saved).get("command", "federate") if saved.exists() else "federate"


def _site_ledgers(out: Path) -> tuple[dict, list, dict]:
    """(site → ε recomputed, [(site, ledger)], site → what it was sent that its ε could not count) from
    ``privacy/``, unconfirmed rounds counted (:func:`_with_unconfirmed`): validated when written; still, a report
    must not stop the run at its end. A site that never kept a report has no ε here, only what it was sent."""
    reports = sorted((out / "privacy").glob("*.json")) if (out / "privacy").exists() else []
    eps, ledgers, uncounted = {}, [], {}
    for p in reports:
        try:
            stored = read_json(p)
            if "mechanisms" not in stored:  # a stub: sent requests, never a kept report
                uncounted[p.stem] = stored["unconfirmed"]
                continue
            report, uncounted_here = _with_unconfirmed(stored)
            if uncounted_here:
                uncounted[p.stem] = uncounted_here
            eps[p.stem] = recompute_epsilon(report)
            ledgers.append((p.stem, {**report, "epsilon_spent": eps[p.stem]}))
        except Exception as e:  # noqa: BLE001
            say(f"{p.name}: ε not recomputed ({type(e).__name__})")
    uncounted = {site: [f"round {w}" if isinstance(w, int) else f"the {w} query" for w in what]
                 for site, what in uncounted.items()}
    for site, what in uncounted.items():
        say(f"{site}: sent {', '.join(what)} with no report back; what it spent there is in its own ledger only")
    return eps, ledgers, uncounted


def _pretrain(grid: Grid, cfg: FederationConfig, nodes: list[int], gen, out: Path, resumed: bool):
    """PrivImage across sites: the server trains the pool classifier (public data) and sends its weights; each site
    releases its noisy semantic histogram; the server combines them (bounded, :func:`combine_noisy_sums`), chooses the
    classes and pretrains on them (kept in checkpoint/pretrained, so a resumed run sends the same base)."""
    from sapf.engine.data import load_dataset
    from sapf.engine.model import load_generator
    from sapf.engine.semantic import (
        choice_record,
        choose_public_classes,
        pretrained_on_choice,
        train_pool_classifier,
    )

    saved = out / "checkpoint" / "pretrained"
    if resumed and (saved / "unet" / "config.json").exists():
        return load_generator(saved)
    pool = load_dataset(cfg.public_pool, gen.image_size, gen.channels)
    net = train_pool_classifier(pool, seed=cfg.seed, steps=cfg.semantic_classifier_steps)
    k, p = gen.num_classes, pool.num_classes
    valid = query_round(grid, cfg, nodes, "semantic", k * p,
                        _content(cfg, None, classifier=base_to_wire(net)))
    hist = combine_noisy_sums([v for v, _, _ in valid]).reshape(k, p)
    chosen = choose_public_classes(hist, cfg.semantic_per_label)
    pretrained = pretrained_on_choice(pool, chosen, k, gen, steps=cfg.pretrain_steps, seed=cfg.seed,
                                      show_progress=False)
    with atomic_output_dir(saved, force=True) as tmp:
        save_generator(pretrained, tmp)
    record = choice_record(hist, chosen, pool, cfg.semantic_query(), None)
    write_json(out / "semantic_query.json", {**record, "combination": "equal-weight mean of unit-L1 site histograms",
                                             "sites": len(valid), "site_noise_multipliers": [v[1] for v in valid]})
    say(f"semantic query: {len(chosen)} public classes chosen from {len(nodes)} sites; pretrained "
        f"{cfg.pretrain_steps} steps on them")
    return pretrained


def _warmup(grid: Grid, cfg: FederationConfig, nodes: list[int], gen, out: Path, resumed: bool, base=None):
    """The warm-up stage: the sites' central-image sums → central images → the warmed model (kept in
    checkpoint/base.safetensors, so a resumed run sends the same base)."""
    from sapf.engine.central_images import central_images, warm_up
    from sapf.engine.run import write_central_images

    saved = out / "checkpoint" / "base.safetensors"
    if resumed and saved.exists():
        return load_base(gen, load_file(str(saved)))
    if cfg.embedding_warmup:
        warmed = _embedding_warmup(grid, cfg, nodes, gen, out, base)
        save_tensors(saved, {k: p for k, p in warmed.unet.named_parameters()})
        return warmed
    sums = central_images_round(grid, cfg, nodes, gen, base)
    central = central_images(sums, gen.num_classes, gen.channels, gen.image_size)
    write_central_images(out / "central_images.png", central)
    warmed = warm_up(gen, central, steps=cfg.warmup_steps, lr=cfg.warmup_lr, label_dropout=cfg.label_dropout,
                     seed=cfg.seed, show_progress=False)
    save_tensors(saved, {k: p for k, p in warmed.unet.named_parameters()})
    say(f"warm-up: central images from {len(nodes)} sites; {cfg.warmup_steps} steps on them")
    return warmed


def _embedding_warmup(grid: Grid, cfg: FederationConfig, nodes: list[int], gen, out: Path, base=None):
    """The warm-up on DP-MEPF's release: the sites' noisy per-class feature sums (one round, as a dp-mepf run's),
    combined like a dp-mepf run's (:func:`combine_mean_embeddings`), a generator matched to them, and the model
    warmed up on its samples (``warmup_samples.png``)."""
    from sapf.engine.central_images import warm_up
    from sapf.engine.data import load_dataset
    from sapf.engine.mepf import BOUND, feature_dim, public_feature_net
    from sapf.engine.run import warmup_generator_samples, write_warmup_samples

    net = public_feature_net(load_dataset(cfg.public_data, gen.image_size, gen.channels), seed=cfg.seed)
    k, d = gen.num_classes, feature_dim(net, gen.channels, gen.image_size)
    valid = query_round(grid, cfg, nodes, "mean_embeddings", k * (d + 1),
                        _content(cfg, base, features=base_to_wire(net)))
    # A site's class mean carries noise of norm about σ·Δ·√D / (its records per class) against a signal of norm at
    # most 1 (public: σ, Δ, D and N). Past 1 the combined means, and so the generator's samples, are mostly noise.
    noise = max(sigma * BOUND * math.sqrt(d) / max(n / k, 1.0) for _, sigma, n in valid)
    if noise > 1:
        say(f"warning: each site's mean embeddings carry noise of norm ~{noise:.1f} against a signal of at most 1; "
            "the warm-up will learn mostly noise (raise --warmup-budget, or use --warmup central-images)")
    images, labels = warmup_generator_samples(cfg, net, combine_mean_embeddings([v for v, _, _ in valid], k), gen,
                                              show_progress=False)
    write_warmup_samples(out / "warmup_samples.png", images, labels)
    warmed = warm_up(gen, images, labels=labels, steps=cfg.warmup_steps, lr=cfg.warmup_lr,
                     label_dropout=cfg.label_dropout, seed=cfg.seed, show_progress=False)
    say(f"warm-up: mean embeddings from {len(valid)} sites; a generator of {cfg.warmup_generator_steps} steps; "
        f"{cfg.warmup_steps} steps on {cfg.warmup_samples} of its samples")
    return warmed


def finish(out: Path, cfg: FederationConfig, gen, model, selection: dict, history: list[dict], public=None) -> None:
    from sapf.engine.sampling import GRID_SAMPLES, public_sample, sample
    from sapf.model_card import write_model_card
    from sapf.outputs import class_grid, save_png

    public = gen if public is None else public
    merged = merged_generator(gen, model, cfg.selection)
    writers = {"model": lambda d: save_generator(merged, d)}
    if cfg.selection not in WEIGHT_SELECTIONS and gen is public:  # after pretraining or a warm-up the adapters fit
        # that model only
        writers["adapter"] = lambda d: model.save_pretrained(d)
    for name, write in writers.items():
        with atomic_output_dir(out / name, force=True) as tmp:
            write(tmp)
    trainable = trainable_count(model) if cfg.selection == "sparta" else count_parameters(model, True)
    write_json(out / "metrics.json", {"rounds": history, "trainable_parameters": trainable})
    images, labels = sample(merged, GRID_SAMPLES, seed=cfg.seed, show_progress=False)
    grid = class_grid(images, labels)
    save_png(out / "grid.png", grid)
    pub, plabels = public_sample(public, GRID_SAMPLES, seed=cfg.seed)
    gap = np.full((grid.shape[0], 8), 255, np.uint8)
    save_png(out / "comparison.png", np.concatenate([class_grid(pub, plabels), gap, grid], axis=1))
    _export(out, cfg)
    eps, ledgers, uncounted = _site_ledgers(out)
    config = {"command": _command(out), **cfg.to_record()}
    write_model_card(out, config=config, privacy=ledgers, stages=stages_of(cfg), unconfirmed=uncounted,
                     examples=f"{len(ledgers)} sites; the records they hold in all: each round's `examples` "
                              "in metrics.json")
    write_json(out / "status.json", {"status": "completed", "rounds": cfg.rounds, "site_epsilon": eps,
                                     **({"site_requests_unconfirmed": uncounted} if uncounted else {})})


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
