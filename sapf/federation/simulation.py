"""`sapf federate`: the same ServerApp and ClientApp in Flower's simulation engine (Ray)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sapf.config import FederationConfig
from sapf.errors import SapfError
from sapf.outputs import check_output_dir, read_json, write_json


@contextlib.contextmanager
def prepared_run_dir(cfg: FederationConfig, command: str, force: bool, resume: bool, extra: dict | None = None,
                     precheck=None) -> Iterator[FederationConfig]:
    """The run dir of `sapf federate` and `sapf serve`, for the block that runs the federation. Resuming, the saved
    plan wins (the sites calibrated their noise for it) and the ServerApp continues from checkpoint/; otherwise the
    dir is made afresh (``precheck(cfg)`` first, if given) with the plan in config.json. An earlier run that --force
    replaces is set aside, and removed only when the block completes: a new run that fails loses nothing."""
    out = Path(cfg.out)
    if resume:
        if not (out / "checkpoint" / "state.json").exists():
            raise SapfError(f"--resume: {out} holds no checkpoint of an earlier run; pass --force instead to start "
                            "afresh")
        cfg = FederationConfig.from_record({**read_json(out / "config.json"), "out": str(out)})
    cfg.validate()  # the CLI shows a ConfigError as the flag to change
    earlier = None
    if not resume:
        if not force and _stopped_before_a_checkpoint(out):
            raise SapfError(f"--out {out} holds a run that stopped before its first checkpoint (nothing to --resume); "
                            "pass --force to start afresh")
        check_output_dir(out, force)
        if precheck is not None:
            precheck(cfg)  # before the old run is touched: a plan no site can run loses nothing
        if out.exists() and any(out.iterdir()):  # check_output_dir let it through: --force
            earlier = Path(tempfile.mkdtemp(prefix=f".{out.name}.earlier-", dir=out.parent))
            os.replace(out, earlier)  # onto the empty folder just made for it
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"command": command, **(extra or {}), **cfg.to_record()})
    (out / "status.json").unlink(missing_ok=True)
    try:
        yield cfg
    except SapfError as e:
        if earlier is not None:
            raise SapfError(f"{e} (the run it was to replace is kept in {earlier})") from None
        raise
    except BaseException:  # interrupted: say where the earlier run is before the CLI's own line
        if earlier is not None:
            print(f"sapf: the run --force was to replace is kept in {earlier}", file=sys.stderr)
        raise
    if earlier is not None:
        shutil.rmtree(earlier, ignore_errors=True)


def _stopped_before_a_checkpoint(out: Path) -> bool:
    """A federated run's dir (its config.json, written first, names the command) with no checkpoint that did not
    complete: e.g. a `sapf serve` stopped while waiting for its sites."""
    if not (out / "config.json").is_file() or (out / "checkpoint" / "state.json").exists():
        return False
    try:
        command = read_json(out / "config.json").get("command")
        status = read_json(out / "status.json").get("status") if (out / "status.json").exists() else None
    except (OSError, ValueError, AttributeError):
        return False
    return command in ("federate", "serve") and status != "completed"


def federate(cfg: FederationConfig, force: bool = False, resume: bool = False) -> dict:
    with prepared_run_dir(cfg, "federate", force, resume, precheck=_precheck) as cfg:
        return _simulate(cfg)


def _simulate(cfg: FederationConfig) -> dict:
    out = Path(cfg.out)

    from flwr.simulation import run_simulation

    from sapf.federation.client_app import app as client_app
    from sapf.federation.server_app import make_server_app

    _quiet_libraries()
    # Sites train with one thread each; Ray runs as many at once as there are cores.
    cores = max(1, os.cpu_count() or 1)
    os.environ.setdefault("SAPF_SITE_THREADS", "1")
    try:
        run_simulation(
            server_app=make_server_app(cfg),
            client_app=client_app,
            num_supernodes=cfg.num_sites,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": cores, "include_dashboard": False, "log_to_driver": True}},
        )
    except SapfError as e:  # raised by the ServerApp; its status.json says so too
        raise SapfError(f"the federated run failed: {e}") from None
    # Flower may also swallow a ServerApp failure: the run's own status file is the truth.
    status = (read_json(out / "status.json") if (out / "status.json").exists()
              else {"status": "failed", "error": "no status"})
    if status.get("status") != "completed":
        raise SapfError(f"the federated run failed: {status.get('error', 'see the log above')}")
    return status


class _DropDeprecation:
    """We call run_simulation on purpose (a Python API, no federation config to write); Flower's
    notice that it prefers `flwr run` would only confuse a user reading our progress lines."""

    def filter(self, record) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _quiet_libraries() -> None:
    import logging

    # Opacus calls logging.basicConfig at import, so Flower's records (which propagate) were
    # printed twice, the second time at DEBUG level; Flower's own handler is enough.
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    if not any(isinstance(f, _DropDeprecation) for f in flwr_log.filters):
        flwr_log.addFilter(_DropDeprecation())
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _precheck(cfg: FederationConfig) -> None:
    """Catch a plan no site could run before starting Ray (sites check again for themselves)."""
    from sapf.engine.data import partition
    from sapf.engine.model import load_generator
    from sapf.engine.run import load_private_data
    from sapf.federation.task import plan_site

    gen = load_generator(cfg.base_model)
    cfg = cfg.for_model(conditional=gen.num_classes > 0)
    ds = load_private_data(cfg.data, gen, cfg.holdout)
    for part in partition(ds, cfg.num_sites, cfg.partition, cfg.alpha, cfg.seed):
        plan_site(cfg, len(part))
