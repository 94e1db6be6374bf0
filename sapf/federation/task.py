"""Shared task code of the sapf Flower apps: configuration, site data and ledgers, records.

What crosses the network, and nothing else:
- server → site: public things (the plan's hyper-parameters, selected matrix names or SPARTA's row
  mask, the current global adapter or trainable weights, a pretrained or warmed base, the public networks of
  DP-MEPF and PrivImage);
- site → server: the *noisy* query outputs (saliency scores, central-image sums, SPARTA's row scores,
  DP-MEPF's mean-embedding sums, PrivImage's semantic histogram),
  DP-trained adapter tensors (or SPARTA's row-masked weights), and declared-public
  scalars (the site's example count, ε spent, the query's σ) plus the site's ε history (mechanism
  parameters, no data). No loss, timing or other statistic of private data.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sapf.config import FederationConfig
from sapf.engine.data import ImageDataset, partition
from sapf.engine.model import DiffusionModel, load_generator
from sapf.engine.privacy import RDP_ORDERS, Mechanism, PrivacyLedger, check_privacy_args, epsilon_of
from sapf.engine.run import load_private_data
from sapf.engine.stages import plan_run, stages_of
from sapf.errors import SapfError
from sapf.federation.site_policy import Refusal, sites_root
from sapf.outputs import read_json, write_json


def base_generator(cfg: FederationConfig) -> DiffusionModel:
    return load_generator(cfg.base_model)


def site_data(cfg: FederationConfig, node_config: dict, gen: DiffusionModel) -> tuple[ImageDataset, str]:
    """A site's private training data and its name.

    Deployment: ``data-path`` in the node config (``sapf join --data``). Simulation: partition
    ``partition-id`` of ``num-partitions`` of the run's dataset (its training split).
    """
    if "data-path" in node_config:
        ds = load_private_data(str(node_config["data-path"]), gen, holdout=0.0)
        return ds, f"site-{_short_hash(str(node_config['data-path']))}"
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    ds = load_private_data(cfg.data, gen, cfg.holdout)
    parts = partition(ds, num, cfg.partition, cfg.alpha, cfg.seed)
    return ds.subset(parts[pid], f"{ds.name}-site{pid}"), f"site-{pid}"


def _short_hash(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:10]


def fingerprint(*parts) -> str:
    """A short stable name for JSON-able values: keys the files a site keeps per plan."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def site_state_dir(cfg: FederationConfig, node_config: dict, site: str) -> Path:
    """Where a site keeps its ledger: ``state-dir`` from the node config, else (simulation, where
    the sites share the server's disk) under the run dir's ``private/``, else ``~/.sapf/sites``. A deployed site
    never uses the run dir: that path names a folder on the *server's* machine.

    A simulated site's state is the site's own, as on its machine: its dataset fingerprint (a hash of the exact
    records, which someone who knows all records but one could test guesses of the last against) and its kept
    replies. So it lives under ``private/``, which the guarantee does not cover and the run's shareable outputs
    exclude; the server's copies of the sites' ledgers are in ``privacy/``."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"]))
    if cfg.out and "data-path" not in node_config:
        state = Path(cfg.out) / "private" / "sites" / site
        earlier = Path(cfg.out) / "sites" / site  # where earlier versions kept it: a resumed run keeps its ledger
        if earlier.is_dir() and not state.exists():
            state.parent.mkdir(parents=True, exist_ok=True)
            os.replace(earlier, state)
        return state
    return sites_root() / site


def dataset_fingerprint(data: ImageDataset, node_config: dict) -> str:
    """Names the dataset a site's ledger belongs to. Deployed: sha256 of the data's bytes on disk (file, or
    every file of a folder with its relative path), so no plan field — e.g. a base model of another size —
    changes it. Simulation: sha256 of the partition as loaded."""
    h = hashlib.sha256()
    if "data-path" in node_config:
        root = Path(str(node_config["data-path"]))
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            h.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()
    h.update(np.ascontiguousarray(data.images).tobytes())
    h.update(np.ascontiguousarray(data.labels).tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def site_lock(state_dir: Path):
    """One request at a time reads, checks, records and saves the site's ledger (an exclusive
    file lock), so concurrent requests cannot both pass the budget check or lose an update."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class SitePlan:
    """A site's noise and step counts for the whole planned run."""

    delta: float
    selection_noise: float
    train_noise: float
    sample_rate: float
    total_steps: int
    local_steps: int
    central_noise: float = 0.0  # σ of the central-image release (0: no warm-up planned)
    mask_noise: float = 0.0  # σ of SPARTA's mask-finding steps (0: not a sparta plan)
    embedding_noise: float = 0.0  # σ of DP-MEPF's mean-embedding release (0: not a dp-mepf plan)
    semantic_noise: float = 0.0  # σ of PrivImage's semantic query (0: no semantic pretraining planned)


def plan_site(cfg: FederationConfig, n: int, state_dir: Path | None = None, delta: float | None = None) -> SitePlan:
    """Noise for this site's whole planned run (query + rounds × local steps), calibrated once at
    the site's δ (default: the plan's, else 1/(n ln n)).

    With `state_dir` the plan is kept on the site's disk: a deployed site answers every request in
    a fresh process (Flower's subprocess isolation), and the calibration costs seconds each time.
    """
    delta = check_privacy_args(cfg.epsilon, delta if delta is not None else cfg.delta, n)
    trains = cfg.method != "dp-mepf"  # a DP-MEPF site answers one query and trains nothing
    if trains and cfg.batch_size > n:
        raise SapfError(f"batch size {cfg.batch_size} is larger than this site's {n} examples")
    saved = None
    if state_dir is not None:
        saved = state_dir / "plans" / f"plan-{fingerprint(cfg.to_record(), n, delta, list(RDP_ORDERS))}.json"
        if saved.exists():
            return SitePlan(**read_json(saved))
    steps = cfg.rounds * cfg.local_steps_for(n) if trains else 0
    p = plan_run(stages_of(cfg), epsilon=cfg.epsilon, delta=delta, accountant=cfg.accountant,
                 train_sample_rate=cfg.batch_size / n, train_steps=steps)
    plan = SitePlan(delta, p.selection_noise, p.train_noise, cfg.batch_size / n, steps, cfg.local_steps_for(n),
                    p.noise_of("central-images"), p.noise_of("sparta-mask"), p.noise_of("mean-embeddings"),
                    p.noise_of("semantic-query"))
    if saved is not None:
        write_json(saved, asdict(plan))
    return plan


def open_ledger(path: Path, max_epsilon: float, delta: float, accountant: str) -> PrivacyLedger:
    """The site's lifetime ledger, read back from disk when present. Its δ and accountant are fixed
    when it starts; a plan that would account differently is refused (SapfError)."""
    if path.exists():
        ledger = PrivacyLedger.load(path)
        if ledger.delta != delta or ledger.accountant != accountant:
            raise Refusal(f"refused: this site's ledger accounts at δ={ledger.delta:g} with {ledger.accountant}; "
                            f"the plan asks δ={delta:g} with {accountant}")
        ledger.target_epsilon = max_epsilon
        return ledger
    return PrivacyLedger(max_epsilon, delta, accountant)


def check_budget(ledger: PrivacyLedger, extra: list[Mechanism], limit: float) -> float:
    """ε after `extra`; refuse (SapfError) when it would pass the site's limit."""
    after = ledger.would_spend(extra)
    if not after <= limit * (1 + 1e-9):
        raise Refusal(f"refused: this would bring the site to ε={after:.3f}, past its limit ε={limit:.3f} "
                        f"(spent so far {ledger.epsilon():.3f})")
    return after


# --- aggregation (server side) ---------------------------------------------------------------


WIRE_DTYPE = torch.float16


def to_wire(state: dict[str, torch.Tensor]):
    """Adapter tensors as they travel, both ways: float16 halves the bytes; rounding a LoRA
    weight to 11 significant bits (relative error ≤ 5e-4) is far below the DP noise in it, and
    rounding a DP output is post-processing, so it costs no privacy. A value past float16's
    range becomes inf, which the receiver rejects."""
    from flwr.app import ArrayRecord

    return ArrayRecord(torch_state_dict={k: v.detach().to(WIRE_DTYPE).contiguous() for k, v in state.items()})


def base_to_wire(unet: torch.nn.Module):
    """A warmed-up base model's weights, float32 (every site trains on exactly the server's base)."""
    from flwr.app import ArrayRecord

    return ArrayRecord(torch_state_dict={k: p.detach().float().contiguous() for k, p in unet.named_parameters()})


def load_base(gen: DiffusionModel, state: dict[str, torch.Tensor]) -> DiffusionModel:
    """A copy of `gen` with the server's (checked) base weights."""
    import copy

    unet = copy.deepcopy(gen.unet)
    with torch.no_grad():
        for k, p in unet.named_parameters():
            p.copy_(state[k])
    return DiffusionModel(unet.eval(), gen.scheduler, gen.source, gen.null_class)


def from_wire(record) -> dict[str, torch.Tensor]:
    """float32 tensors for training and averaging."""
    return {k: v.float() for k, v in record.to_torch_state_dict().items()}


def validate_update(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str | None:
    """Why a site's adapter reply is unusable, or None when it is fine."""
    if set(state) != set(reference):
        missing, extra = set(reference) - set(state), set(state) - set(reference)
        return f"wrong keys (missing {sorted(missing)[:2]}, unexpected {sorted(extra)[:2]})"
    for k, ref in reference.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            return f"wrong shape for {k}: {tuple(state[k].shape)} != {tuple(ref.shape)}"
        if not torch.isfinite(state[k]).all():
            return f"non-finite values in {k}"
    return None


def recompute_epsilon(report: dict) -> float:
    return epsilon_of([Mechanism(**m) for m in report["mechanisms"]], report["delta"], report["accountant"])
