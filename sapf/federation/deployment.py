"""On-premise federation on Flower's deployment engine: `sapf serve` and `sapf join`.

`serve` starts a SuperLink (``flower-superlink``), registers the sites' public keys when
SuperNode authentication is on, submits the sapf app to it with ``flwr run`` and follows the
run until it ends; `join` starts one site's SuperNode (``flower-supernode``) with the site's data
path, ledger directory and ε limit in its node config.

No code travels: the app bundle (FAB) that ``flwr run`` ships holds only a ``pyproject.toml``
naming sapf's ServerApp and ClientApp and the run's plan; every site runs the sapf it installed
itself. Runtime dependency installation is switched off at both ends, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sapf import __version__
from sapf.config import FederationConfig, kebab
from sapf.errors import SapfError
from sapf.federation.credentials import CA_CERT, SERVER_CERT, SERVER_KEY
from sapf.outputs import read_json

CONNECTION = "sapf"  # the SuperLink connection's name in the run's Flower configuration file
STATUS_POLL_S = 15.0
QUICK_EXIT_S, RETRY_S = 60.0, 5.0  # `join`: a SuperNode that exits this fast never got in; retry after


@dataclass
class Tls:
    """How a process reaches or serves the SuperLink: ``insecure`` or TLS with these files."""

    insecure: bool = False
    ca: Path | None = None  # the CA certificate the clients verify the SuperLink with
    cert: Path | None = None  # the SuperLink's certificate and key (server side only)
    key: Path | None = None

    @classmethod
    def from_dir(cls, certs: Path | None, insecure: bool, server: bool) -> "Tls":
        """The SuperLink's side (and the `flwr` CLI's): a directory made by `sapf certs`."""
        if insecure and certs is not None:
            raise SapfError("--insecure and --certs exclude each other")
        if insecure:
            return cls(insecure=True)
        if certs is None:
            raise SapfError("TLS is on by default: give --certs DIR (make one with `sapf certs`), or --insecure")
        tls = cls(ca=certs / CA_CERT, cert=certs / SERVER_CERT if server else None,
                  key=certs / SERVER_KEY if server else None)
        for p in (tls.ca, tls.cert, tls.key):
            if p is not None and not p.is_file():
                raise SapfError(f"{p} not found (make the certificates with `sapf certs --out {certs}`)")
        return tls

    @classmethod
    def for_site(cls, ca: Path | None, insecure: bool) -> "Tls":
        """A site's side: the CA certificate that verifies the SuperLink."""
        if insecure and ca is not None:
            raise SapfError("--insecure and --ca exclude each other")
        if insecure:
            return cls(insecure=True)
        if ca is None:
            raise SapfError("TLS is on by default: give --ca ca.crt (from the server's `sapf certs`), or --insecure")
        if not ca.is_file():
            raise SapfError(f"--ca {ca} not found")
        return cls(ca=ca)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable(name: str) -> str:
    """Flower's console scripts, from the same environment as this interpreter."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()


def write_app(app_dir: Path, cfg: FederationConfig) -> Path:
    """The app bundle's source: a pyproject naming sapf's components, with the plan as run config."""
    app_dir.mkdir(parents=True, exist_ok=True)
    plan = "\n".join(f"{kebab(k)} = {_toml_value(v)}" for k, v in cfg.to_record().items())
    (app_dir / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "sapf-federation"
version = "{__version__}"
description = "DP-SAPF federated fine-tuning (the code is the sapf each site installed)"
license = "Apache-2.0"
dependencies = ["sapf=={__version__}"]

[tool.flwr.app]
publisher = "sapf"

[tool.flwr.app.components]
serverapp = "sapf.federation.server_app:app"
clientapp = "sapf.federation.client_app:app"

[tool.flwr.app.config]
{plan}
""")
    return app_dir


def write_flower_home(home: Path, address: str, tls: Tls) -> Path:
    """A Flower configuration file with one SuperLink connection, for the `flwr` CLI."""
    home.mkdir(parents=True, exist_ok=True)
    conn = "insecure = true" if tls.insecure else f"root-certificates = {json.dumps(str(tls.ca.resolve()))}"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                                      f'[superlink.{CONNECTION}]\naddress = "{address}"\n{conn}\n')
    return home


def _flwr(args: list[str], home: Path, timeout: float = 120.0) -> dict:
    """Run a `flwr` CLI command with JSON output against the run's connection."""
    env = {**os.environ, "FLWR_HOME": str(home)}
    try:
        res = subprocess.run([_executable("flwr"), *args, "--format", "json"], env=env, capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SapfError(f"`flwr {args[0]}` did not answer within {timeout:.0f} s") from None
    out = res.stdout.strip()
    try:
        payload = json.loads(out[out.index("{"):]) if "{" in out else {}
    except json.JSONDecodeError:
        payload = {}
    if res.returncode != 0 or not payload.get("success", False):
        why = payload.get("error-message") or (res.stderr.strip() or out).splitlines()[-1:] or ["no output"]
        raise SapfError(f"`flwr {' '.join(args[:2])}` failed: {why if isinstance(why, str) else why[0]}")
    return payload


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SapfError(f"{log.stem} exited with code {proc.returncode}; see {log}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise SapfError(f"{host}:{port} did not open within {timeout:.0f} s; see {log}")


def superlink_command(host: str, port: int, tls: Tls, supernode_auth: bool, database: Path | None) -> list[str]:
    cmd = [_executable("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if tls.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key), "--ssl-ca-certfile", str(tls.ca)]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(superlink: str, node_config: dict, tls: Tls, auth_key: Path | None, port: int) -> list[str]:
    cmd = [_executable("flower-supernode"), "--superlink", superlink, "--port", str(port),
           "--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())]
    cmd += ["--insecure"] if tls.insecure else ["--root-certificates", str(tls.ca)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def stop_process(proc: subprocess.Popen | None) -> None:
    """Stop a Flower process and the SuperExec children it started: its process group when it
    leads one, else the process alone."""
    if proc is None or proc.poll() is not None:
        return
    own_group = os.getpgid(proc.pid) == proc.pid

    def send(sig):
        try:
            os.killpg(proc.pid, sig) if own_group else proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
    if own_group:
        send(signal.SIGKILL)  # children that outlived their parent


def spawn(cmd: list[str], log: Path, env: dict | None = None, new_session: bool = True) -> subprocess.Popen:
    """Start a Flower process, by default in its own process group (to stop it with its children)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n".encode())
        # Flower's legacy gRPC APIs (which would listen on 0.0.0.0, past the Fleet gate) start only when these are set.
        base = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_GRPC_")}
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=new_session,
                                env={**base, **(env or {})})


def gate_command(host: str, port: int, upstream_port: int, tls: Tls) -> list[str]:
    """The Fleet gate (:mod:`sapf.federation.fleet_gate`) on the public address, in front of the SuperLink."""
    scheme = "http" if tls.insecure else "https"
    cmd = [sys.executable, "-m", "sapf.federation.fleet_gate", "--host", host, "--port", str(port),
           "--upstream", f"{scheme}://127.0.0.1:{upstream_port}"]
    if not tls.insecure:
        cmd += ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key), "--ca-certfile", str(tls.ca)]
    return cmd


def serve(cfg: FederationConfig, host: str, port: int, tls: Tls, supernode_keys: list[Path],
          timeout: float = 24 * 3600.0, on_ready=None, on_round=None) -> dict:
    """Run one federated DP-SAPF run on a fresh SuperLink; return the run's status.json.

    The SuperLink listens on 127.0.0.1 only (its Control and runtime APIs share its one port with the
    Fleet API, and Flower's default Control API lets any caller in); the Fleet gate faces `host`:`port`
    and passes the Fleet API alone. The SuperLink, the gate, their logs and the Flower CLI configuration
    live under ``RUN_DIR/superlink/``.
    """
    out = Path(cfg.out).resolve()
    cfg.out = str(out)
    for key in supernode_keys:
        if not key.is_file():
            raise SapfError(f"SuperNode public key {key} not found")
    work = out / "superlink"
    internal = _free_port()
    home = write_flower_home(work / "flwr-home", f"127.0.0.1:{internal}", tls)
    app_dir = write_app(work / "app", cfg)
    log, gate_log = work / "superlink.log", work / "fleet-gate.log"
    link = spawn(superlink_command("127.0.0.1", internal, tls, bool(supernode_keys), work / "state.db"), log)
    gate = None
    try:
        _wait_for_port("127.0.0.1", internal, link, log)
        gate = spawn(gate_command(host, port, internal, tls), gate_log)
        _wait_for_port("127.0.0.1" if host in ("0.0.0.0", "::") else host.strip("[]"), port, gate, gate_log)
        for key in supernode_keys:
            _flwr(["supernode", "register", str(key.resolve()), CONNECTION], home)
        if on_ready is not None:
            on_ready()
        run_id = _flwr(["run", str(app_dir), CONNECTION], home, timeout=300)["run-id"]
        return follow_run(run_id, out, home, link, log, timeout, on_round)
    finally:
        stop_process(gate)
        stop_process(link)


def follow_run(run_id: str, out: Path, home: Path, link: subprocess.Popen, log: Path, timeout: float,
               on_round=None) -> dict:
    """Wait for the run to end; the run's own status.json (written by the ServerApp) is the truth,
    because Flower reports a run whose ServerApp raised as merely "finished". Progress comes from
    the run dir; Flower is asked only every ``STATUS_POLL_S`` (each `flwr` call costs a process)."""
    t0, seen, last_poll = time.time(), 0, 0.0
    status_file, ck = out / "status.json", out / "checkpoint" / "state.json"
    while True:
        if link.poll() is not None:
            raise SapfError(f"the SuperLink stopped during the run (code {link.returncode}); see {log}")
        if on_round is not None and ck.exists():
            rnd = read_json(ck)["round"]
            if rnd > seen:
                on_round(rnd)
                seen = rnd
        if status_file.exists():
            break
        if time.time() - last_poll > STATUS_POLL_S:
            last_poll = time.time()
            runs = _flwr(["list", CONNECTION, "--run-id", str(run_id)], home)["runs"]
            state = runs[0]["status"] if runs else "unknown"
            if state.startswith("finished"):
                time.sleep(1.0)  # the ServerApp writes status.json before it returns
                break
        if time.time() - t0 > timeout:
            _flwr(["stop", str(run_id), CONNECTION], home)
            raise SapfError(f"the run did not finish within {timeout:.0f} s; stopped it")
        time.sleep(1.0)
    status = read_json(status_file) if status_file.exists() else {}
    if status.get("status") != "completed":
        why = status.get("error") or f"the ServerApp ended without a status; see {log}"
        raise SapfError(f"the federated run failed: {why}")
    return status


@dataclass
class SiteConfig:
    """What `sapf join` tells its SuperNode (node config); the data never leaves the site."""

    data: Path
    state_dir: Path
    max_epsilon: float  # the site's lifetime budget for this dataset (required)
    delta: float | None = None  # None: 1/(n ln n) of the site's n
    base_models: tuple[Path, ...] = ()  # model dirs the site loads besides the shipped one
    limits: str = ""  # SiteLimits overrides, "max-rank=16,max-clip=1"
    new_dataset: bool = False  # the data changed on purpose: retire the old ledger, start a new one

    def node_config(self) -> dict:
        cfg = {"data-path": str(self.data.resolve()), "state-dir": str(self.state_dir.resolve()),
               "max-epsilon": float(self.max_epsilon)}
        if self.delta is not None:
            cfg["delta"] = float(self.delta)
        if self.base_models:
            cfg["base-models"] = "\n".join(str(p.resolve()) for p in self.base_models)
        if self.limits:
            cfg["limits"] = self.limits
        return cfg


def check_site(site: SiteConfig) -> int:
    """Refuse a site whose settings or data are unusable before it joins anything; return its example count."""
    import math

    from sapf.engine.data import load_dataset
    from sapf.engine.privacy import check_privacy_args
    from sapf.federation.site_policy import SiteLimits

    if not (math.isfinite(site.max_epsilon) and site.max_epsilon > 0):
        raise SapfError(f"--max-epsilon must be finite and positive, got {site.max_epsilon}")
    SiteLimits.parse(site.limits)
    for p in site.base_models:
        if not p.is_dir():
            raise SapfError(f"--base-model {p} {'is not a directory' if p.exists() else 'does not exist'}")
    n = len(load_dataset(str(site.data), 28, 1))
    check_privacy_args(site.max_epsilon, site.delta, n)
    return n


TCP_PORTS = range(1, 65536)


def check_port(port: int, flag: str = "--port") -> None:
    """Refuse a TCP port outside 1..65535 (before anything starts listening on it)."""
    if port not in TCP_PORTS:
        raise SapfError(f"{flag} must lie in 1..65535, got {port}")


def check_superlink_address(superlink: str) -> None:
    """Refuse a --superlink that is not HOST:PORT with a port in 1..65535 (an IPv6 host in brackets is fine)."""
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit() or int(port) not in TCP_PORTS:
        raise SapfError(f"--superlink must be HOST:PORT with a port in 1..65535, got {superlink!r}")


def _echo_to_stdout(stream) -> None:
    """Forward the SuperNode's output until it closes the pipe. Reading never stops, even when stdout fails (a closed
    pipe, a full disk): a pipe nobody drains would block the SuperNode."""
    for line in iter(stream.readline, b""):
        try:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
        except (OSError, ValueError, AttributeError):
            pass


def join(superlink: str, site: SiteConfig, tls: Tls, auth_key: Path | None = None, port: int | None = None,
         wait: float = 600.0, say=print) -> int:
    """Run this site's SuperNode until the federation ends; return its exit code.

    A SuperNode gives up within seconds when the SuperLink is not up yet or has not registered
    this site's key, so a quick exit is retried for `wait` seconds: sites need not start after
    the server. A SuperNode that ran for a while and then stopped means the run is over.
    """
    check_superlink_address(superlink)
    if auth_key is not None and not auth_key.is_file():
        raise SapfError(f"SuperNode private key {auth_key} not found")
    from sapf.federation.app_guard import install_runner, path_with_runner
    from sapf.federation.site_policy import ledger_elsewhere, retire_dataset
    from sapf.federation.task import dataset_fingerprint, site_lock

    site.state_dir.mkdir(parents=True, exist_ok=True)
    with site_lock(site.state_dir):
        fingerprint = dataset_fingerprint(None, site.node_config())
        retired = retire_dataset(site.state_dir, fingerprint) if site.new_dataset else None
        elsewhere = ledger_elsewhere(site.state_dir, fingerprint)
    if elsewhere is not None:
        raise SapfError(f"this data already has a ledger, in {elsewhere}: the same bytes joined before from another "
                        "--data path or --state-dir, or set aside by --new-dataset; continue that ledger (its state "
                        "dir as --state-dir, or its files moved back), never a fresh one")
    if retired is not None:  # once, before any request: the data changed on purpose
        say(f"--new-dataset: the earlier dataset's ledger and state are kept in {retired}; a new ledger starts")
    # Flower starts each ClientApp as `flwr-clientapp` from PATH: ours checks the app bundle first. The site's
    # own Flower home keeps the apps it installs apart from any other Flower user's on the machine.
    env = {**os.environ, "PATH": path_with_runner(install_runner(site.state_dir / "bin").parent),
           "FLWR_HOME": str((site.state_dir / "flwr-home").resolve())}
    t0 = time.time()
    while True:
        started = time.time()
        # Same process group as `sapf join`: Ctrl-C (or a signal to the group) stops the SuperNode
        # and the app processes it starts.
        cmd = supernode_command(superlink, site.node_config(), tls, auth_key, port or _free_port())
        # Flower's SuperNode retries an unreachable SuperLink for ever by default; let it try only as
        # long as we would wait, so `sapf join` always returns.
        cmd += ["--max-wait-time", str(max(1.0, wait - (time.time() - t0)))]
        # The SuperNode's log, and its app processes', goes to stdout: stderr carries sapf's own lines only, so an
        # app process that the SuperNode stops mid-start (a KeyboardInterrupt traceback) cannot read as our error.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        echo = threading.Thread(target=_echo_to_stdout, args=(proc.stdout,), daemon=True)
        echo.start()
        try:
            code = proc.wait()
        finally:
            stop_process(proc)
        echo.join(timeout=5)  # a child that outlives the SuperNode keeps the pipe open: do not wait on it
        if not echo.is_alive():
            proc.stdout.close()
        if code == 0 or time.time() - started > QUICK_EXIT_S:
            return code
        if time.time() - t0 > wait:
            raise SapfError(f"could not join {superlink} within {wait:.0f} s (SuperNode exit code {code}): "
                            "is the SuperLink up, and is this site's key registered?")
        say(f"could not join {superlink} yet (SuperNode exit code {code}); retrying in {RETRY_S:.0f} s")
        time.sleep(RETRY_S)

