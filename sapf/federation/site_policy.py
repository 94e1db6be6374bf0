"""What a site accepts: it trusts no plan, no adapter and no path the server sends.

Every field a site reads from a request is checked here against the site's *own* settings —
its lifetime ``max-epsilon``, its δ, the base models it allows and the caps of
:class:`SiteLimits` (constants that ``sapf join --limit`` may change, never values from the
plan) — before any private data is touched. A refusal is a :class:`Refusal`, whose message
names only plan values and public counts, so it may go back to the server as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from sapf.config import ConfigError, FederationConfig
from sapf.errors import SapfError


class Refusal(SapfError):
    """A site's refusal of a request; its one-line message is safe to send to the server."""


@dataclass(frozen=True)
class SiteLimits:
    """The largest plan a site runs. Generous for real runs; what they stop is a plan whose size is
    an attack (a search that spins, memory that runs out, an adapter that overflows)."""

    max_rounds: int = 1_000
    max_local_steps: int = 100_000  # DP-SGD steps a round
    max_total_steps: int = 1_000_000  # over the whole plan
    max_batch_size: int = 65_536
    max_multiplicity: int = 32
    max_rank: int = 256
    max_lora_alpha: float = 4_096.0
    max_clip: float = 100.0
    max_lr: float = 100.0
    max_adapter_norm: float = 1_000.0  # L2 norm of incoming weights (shipped model: LoRA start ~42, all weights ~77)
    max_public_classes: int = 100_000  # classes a public network may score (a histogram's width: memory, not privacy)

    @classmethod
    def parse(cls, text: str) -> "SiteLimits":
        """``"max-rank=16,max-clip=1"`` → limits (the format of ``sapf join --limit``)."""
        known = {f.name: f.type for f in fields(cls)}
        out = cls()
        for item in filter(None, (s.strip() for s in str(text).split(","))):
            key, _, value = item.partition("=")
            name = key.strip().replace("-", "_")
            if name not in known or not value:
                raise SapfError(f"unknown site limit '{key}' (known: {', '.join(k.replace('_', '-') for k in known)})")
            cast = int if known[name] in (int, "int") else float
            try:
                v = cast(value)
            except ValueError:
                raise SapfError(f"site limit {key} must be a number, got '{value}'") from None
            if not (math.isfinite(v) and v > 0):
                raise SapfError(f"site limit {key} must be positive, got {value}")
            out = replace(out, **{name: v})
        return out


@dataclass(frozen=True)
class SiteSettings:
    """A site's own settings: from ``sapf join`` (node config), or in simulation from the plan."""

    max_epsilon: float  # lifetime ε of this site's dataset
    delta: float | None  # None: 1/(n ln n) of the site's n
    base_models: tuple[str, ...]  # model dirs it loads besides the shipped one ("" = shipped)
    limits: SiteLimits


def site_settings(node_config: dict, cfg: FederationConfig) -> SiteSettings:
    """Deployed (``data-path`` in the node config): ``max-epsilon`` is required. Simulation: the
    user who typed ``sapf federate`` plays every site, so each site's budget is the plan's ε and
    the plan's base model is allowed."""
    deployed = "data-path" in node_config
    if "max-epsilon" in node_config:
        max_eps = float(node_config["max-epsilon"])
    elif deployed:
        raise Refusal("refused: this site states no max-epsilon (sapf join --max-epsilon)")
    else:
        check_epsilon(cfg)
        max_eps = float(cfg.epsilon)
    if not (math.isfinite(max_eps) and max_eps > 0):
        raise Refusal("refused: the site's max-epsilon must be finite and > 0")
    delta = float(node_config["delta"]) if "delta" in node_config else None
    allowed = tuple(p for p in str(node_config.get("base-models", "")).split("\n") if p)
    if not deployed:
        allowed += (cfg.base_model,)
    return SiteSettings(max_eps, delta, allowed, SiteLimits.parse(str(node_config.get("limits", ""))))


def check_epsilon(cfg: FederationConfig) -> None:
    if not (isinstance(cfg.epsilon, (int, float)) and math.isfinite(cfg.epsilon) and cfg.epsilon > 0):
        raise Refusal(f"refused: a site trains only with a finite ε > 0, the plan asks ε={cfg.epsilon!r}")


def _in(name: str, value, lo, hi, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise Refusal(f"refused: plan field {name}={value!r} is outside this site's range "
                      f"{'(' if lo_open else '['}{lo:g}, {hi:g}]")


SITE_PUBLIC_SETS = ("digits", "public-pool")  # built-in public data; never a path, never the sensitive mnist5k


def check_plan(cfg: FederationConfig, settings: SiteSettings) -> None:
    """Refuse a plan any of whose fields lies outside what this site runs (before data is read): the
    method's own ranges (:meth:`FederationConfig.validate`), then this site's caps and allowed models."""
    lim = settings.limits
    check_epsilon(cfg)
    if cfg.epsilon > settings.max_epsilon * (1 + 1e-9):
        raise Refusal(f"refused: the plan's ε={cfg.epsilon:g} is past this site's limit ε={settings.max_epsilon:g}")
    try:
        cfg.validate()
    except ConfigError as e:
        raise Refusal(f"refused: plan field {e}") from None
    _in("selection_clip", cfg.selection_clip, 0.0, lim.max_clip, lo_open=True)
    _in("selection_multiplicity", cfg.selection_multiplicity, 1, lim.max_multiplicity)
    _in("rounds", cfg.rounds, 1, lim.max_rounds)
    _in("central_queries", cfg.central_queries, 1, lim.max_rounds)
    _in("mask_steps", cfg.mask_steps, 1, lim.max_local_steps)
    _in("local_steps", cfg.local_steps, 1, lim.max_local_steps)
    if cfg.local_epochs is not None:
        _in("local_epochs", cfg.local_epochs, 0.0, float(lim.max_local_steps), lo_open=True)
    _in("batch_size", cfg.batch_size, 1, lim.max_batch_size)
    _in("multiplicity", cfg.multiplicity, 1, lim.max_multiplicity)
    _in("clip", cfg.clip, 0.0, lim.max_clip, lo_open=True)
    _in("lr", cfg.learning_rate(), 0.0, lim.max_lr, lo_open=True)
    _in("rank", cfg.rank, 1, lim.max_rank)
    _in("lora_alpha", cfg.lora_alpha, 0.0, lim.max_lora_alpha, lo_open=True)
    allowed = {str(Path(p).resolve()) for p in settings.base_models if p}
    # Only an absent base model is the shipped one (validate() above refuses "", which would resolve to the
    # working directory, whatever it holds).
    if cfg.base_model is not None and str(Path(cfg.base_model).resolve()) not in allowed:
        raise Refusal("refused: the plan names a base model this site does not allow (sapf join --base-model)")
    # The public set fixes the central images' bound. A path would be read on this site's disk: pointed at the
    # site's own records, it would make the bound (and the noise) a statistic of private data.
    if cfg.public_data not in SITE_PUBLIC_SETS:
        raise Refusal(f"refused: plan field public_data must be a public set every site ships "
                      f"({', '.join(SITE_PUBLIC_SETS)}), got {cfg.public_data!r}")


def site_delta(cfg: FederationConfig, settings: SiteSettings, n: int, deployed: bool) -> float:
    """The δ the site accounts at: its own (`sapf join --delta`), else 1/(n ln n) of its n — never one the
    server picks for a deployed site (in simulation the plan's δ is the user's own). A plan that names
    another δ is refused."""
    from sapf.engine.privacy import default_delta

    own = settings.delta if settings.delta is not None else (cfg.delta if not deployed else None)
    delta = own if own is not None else default_delta(n)
    if cfg.delta is not None and cfg.delta != delta:
        raise Refusal(f"refused: this site accounts at δ={delta:.3g}; the plan asks δ={cfg.delta:.3g}")
    return delta


def check_site_plan(cfg: FederationConfig, settings: SiteSettings, n: int) -> None:
    """The checks that need the site's example count n (a public number: see the README)."""
    if cfg.method == "dp-mepf":  # one query, no training
        return
    if cfg.batch_size > n:
        raise Refusal(f"refused: batch size {cfg.batch_size} is larger than this site's {n} examples")
    local = cfg.local_steps_for(n)
    _in("local steps a round", local, 1, settings.limits.max_local_steps)
    _in("total steps", cfg.rounds * local, 1, settings.limits.max_total_steps)


def check_noise(name: str, sigma: float) -> None:
    """A site never releases with σ ≤ 0 (or a σ that is not a number)."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise Refusal(f"refused: the {name} would have noise multiplier {sigma!r}; a site releases only with σ > 0")


def check_selected(selected, candidates: list[str], top_fraction: float) -> list[str]:
    """The matrices a training request names: distinct candidates of the base model, no more than
    the plan's top fraction of them."""
    from sapf.engine.saliency import top_count

    if not isinstance(selected, (list, tuple)) or not selected or not all(isinstance(s, str) for s in selected):
        raise Refusal("refused: the request's selected matrices must be a non-empty list of names")
    known = set(candidates)
    if len(set(selected)) != len(selected) or not set(selected) <= known:
        raise Refusal("refused: the request selects matrices that are not distinct candidates of the base model")
    if len(selected) > top_count(len(candidates), top_fraction):
        raise Refusal("refused: the request selects more matrices than the plan's top fraction")
    return list(selected)


MAX_ROWS_TEXT = 10_000_000  # characters of a row mask in a request (the shipped model's is ~30 k)


def check_rows(requested, gen, cfg: FederationConfig) -> dict[str, list[int]]:
    """SPARTA's mask a training request carries (JSON {matrix: row indices}): exactly this model's candidate
    matrices, and in each exactly the plan's share of distinct, in-range rows — so a server can neither train
    more rows than the plan says nor name a matrix the site did not score."""
    import json

    from sapf.engine.sparta import row_counts, rows_per_matrix

    if not isinstance(requested, str) or len(requested) > MAX_ROWS_TEXT:
        raise Refusal("refused: a sparta training request must carry its row mask (rows, JSON)")
    try:
        rows = json.loads(requested)
    except (ValueError, RecursionError):
        raise Refusal("refused: the request's row mask is not valid JSON") from None
    counts = row_counts(gen, cfg.candidates)
    if not isinstance(rows, dict) or set(rows) != set(counts):
        raise Refusal("refused: the request's row mask must name exactly the plan's candidate matrices")
    for name, n in counts.items():
        chosen = rows[name]
        ok = isinstance(chosen, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in chosen)
        if not (ok and len(set(chosen)) == len(chosen) == rows_per_matrix(n, cfg.row_fraction)
                and all(0 <= i < n for i in chosen)):
            raise Refusal(f"refused: the row mask of {name} must hold {rows_per_matrix(n, cfg.row_fraction)} distinct "
                          f"rows in 0..{n - 1} (the plan's row fraction)")
    return {name: sorted(rows[name]) for name in counts}


def site_selection(cfg: FederationConfig, requested, gen) -> list[str]:
    """The matrices this site trains. Saliency: the server's choice from the noisy scores, checked
    (:func:`check_selected`). SPARTA: every candidate (its rows come checked by :func:`check_rows`). Every
    other strategy is a public choice the site makes itself; a request that names matrices for one is
    refused (the server has nothing to choose)."""
    from sapf.engine.saliency import candidate_modules, choose_matrices

    if cfg.selection == "saliency":
        return check_selected(requested, candidate_modules(gen.unet, cfg.candidates), cfg.top_fraction)
    if cfg.selection == "sparta":  # every candidate holds chosen rows (check_rows); no matrix list travels
        if requested is not None:
            raise Refusal("refused: a sparta plan's request names rows (rows), not matrices")
        return candidate_modules(gen.unet, cfg.candidates)
    if requested is not None:
        raise Refusal(f"refused: a {cfg.selection} plan selects its matrices publicly; the request must not name any")
    return choose_matrices(cfg.selection, gen, None, cfg.query(), cfg.top_fraction, 0.0, None, cfg.seed).selected


def check_round(rnd, rounds: int) -> int:
    if not (isinstance(rnd, int) and not isinstance(rnd, bool) and 1 <= rnd <= rounds):
        raise Refusal(f"refused: round {rnd!r} is not one of the plan's rounds 1..{rounds}")
    return rnd


def check_incoming_weights(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                           limits: SiteLimits) -> None:
    """An adapter from the server: exactly the expected tensors, finite, and within the site's norm
    bound (a site-side constant). Weights only: tensors are read from the message, never code."""
    from sapf.federation.task import validate_update

    why = validate_update(state, reference)
    if why:
        raise Refusal(f"refused: the incoming adapter has {why}")
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))
    if not norm <= limits.max_adapter_norm:
        raise Refusal(f"refused: the incoming adapter's norm {norm:.3g} is past this site's bound "
                      f"{limits.max_adapter_norm:g}")


def ensure_same_dataset(state_dir: Path, fingerprint: str, n: int) -> None:
    """One lifetime ledger for one dataset. The first request records the data's fingerprint; a request
    on other data is refused (and nothing is spent). Only `sapf join --new-dataset`, before its SuperNode
    starts, may set the ledger aside (:func:`retire_dataset`). Call under the site's lock."""
    from sapf.outputs import read_json, write_json

    marker = state_dir / "dataset.json"
    if not marker.exists():
        write_json(marker, {"sha256": fingerprint, "examples": n}, durable=True)
        return
    old = read_json(marker)
    if old.get("sha256") != fingerprint:
        print(f"[sapf site] the data (sha256 {fingerprint[:12]}, {n} examples) differs from the dataset this "
              f"state dir's ledger belongs to (sha256 {str(old.get('sha256'))[:12]}); refusing. If it is a new "
              "dataset, restart with `sapf join --new-dataset`.", flush=True)
        raise Refusal("refused: this site's data changed since its ledger began; its operator must confirm "
                      "a new dataset")


DATASET_STATE = ("ledger.json", "dataset.json", "plans", "replies")  # and optimizer-*.pt


def sites_root() -> Path:
    """Where `sapf join` keeps a site's state dir unless given ``--state-dir``."""
    return Path.home() / ".sapf" / "sites"


def ledger_elsewhere(state_dir: Path, fingerprint: str) -> Path | None:
    """When `state_dir` holds no ledger yet: a ledger of the same data elsewhere — in a state dir beside it or under
    :func:`sites_root`, kept or set aside by ``--new-dataset`` (this state dir's own set-aside ones included) — or
    None. The default state dir follows the data's path, so without this the same records copied or moved elsewhere,
    or rejoined after being set aside, would start a fresh budget."""
    from sapf.outputs import read_json

    if (state_dir / "dataset.json").exists():
        return None
    here = state_dir.resolve()
    for root in dict.fromkeys((here.parent, sites_root().resolve())):
        for marker in [*root.glob("*/dataset.json"), *root.glob("*/retired-*/dataset.json")]:
            try:
                if read_json(marker).get("sha256") == fingerprint:
                    return marker.parent
            except (OSError, ValueError, AttributeError):
                continue  # not a state dir's marker
    return None


def retire_dataset(state_dir: Path, fingerprint: str) -> Path | None:
    """`sapf join --new-dataset`: when the state dir's ledger belongs to other data, move that dataset's
    state (ledger, plans, replies, optimizer state) to ``retired-<its hash>/`` and return that folder. A
    dataset that was retired before is not started afresh: that is refused (restore its folder by hand)."""
    from sapf.outputs import read_json

    marker = state_dir / "dataset.json"
    if not marker.exists():
        return None
    old = str(read_json(marker).get("sha256"))
    if old == fingerprint:
        return None
    if (state_dir / f"retired-{fingerprint[:12]}").exists():
        raise SapfError(f"this data's ledger was set aside before ({state_dir / f'retired-{fingerprint[:12]}'}); "
                        "move its files back into the state dir to continue it, never start it afresh")
    retired = state_dir / f"retired-{old[:12]}"
    if retired.exists():
        raise SapfError(f"{retired} already exists; move it away first")
    retired.mkdir()
    for p in list(state_dir.iterdir()):  # the dataset's state; never the lock or `sapf join`'s runner (bin/)
        if p.name in DATASET_STATE or p.name.startswith("optimizer-"):
            p.rename(retired / p.name)
    return retired
