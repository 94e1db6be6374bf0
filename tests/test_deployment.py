"""On-premise federation for real: `sapf serve` starts a Flower SuperLink on 127.0.0.1, two
`sapf join` SuperNodes train on their own .npz files, and the run dir comes back complete.
Once insecure, once with TLS (certificates from `sapf certs`) and SuperNode authentication.
Every process a test starts is stopped, and the test checks that none is left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SAPF = [sys.executable, "-m", "sapf.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site_files(tmp_path_factory):
    """Two sites, 60 real MNIST digits each (6 a class), disjoint."""
    from sapf.engine.data import load_dataset

    ds = load_dataset("mnist5k", 28, 1)
    d = tmp_path_factory.mktemp("sites")
    paths = []
    for s in range(2):
        idx = np.concatenate([np.flatnonzero(ds.labels == k)[6 * s:6 * s + 6] for k in range(10)])
        p = d / f"site{s}.npz"
        np.savez(p, images=((ds.images[idx, 0] + 1) * 127.5).round().astype(np.uint8), labels=ds.labels[idx])
        paths.append(p)
    return paths


def _flower_processes() -> set[str]:
    """Live Flower processes (SuperLink, SuperNode, SuperExec, app processes), as 'pid: cmd'."""
    return {p for p in _processes_mentioning("flower-") + _processes_mentioning("flwr-")}


def _processes_mentioning(marker: str) -> list[str]:
    """Live processes whose command line mentions `marker` (zombies have none)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(f"{pid}: {cmd[:120]}")
    return found


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "wb")
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _federation(tmp_path, tiny_model_dir, site_files, server_flags, site_flags, while_up=None, rounds=1):
    port = _free_port()
    before = _flower_processes()
    out = tmp_path / "run"
    serve = _start(SAPF + ["serve", "--clients", "2", "--port", str(port), "--host", "127.0.0.1",
                           "--rounds", str(rounds), "--local-steps", "2", "--batch-size", "8", "--multiplicity", "1",
                           "--base-model", str(tiny_model_dir), "--out", str(out), *server_flags],
                   tmp_path / "serve.log")
    sites = []
    try:
        if while_up is not None:
            while_up(port)
        for i, data in enumerate(site_files):
            sites.append(_start(SAPF + ["join", "--superlink", f"127.0.0.1:{port}", "--data", str(data),
                                        "--state-dir", str(tmp_path / f"ledger{i}"), "--max-epsilon", "50",
                                        "--base-model", str(tiny_model_dir), *site_flags(i)],
                                tmp_path / f"join{i}.log"))
        try:
            rc = serve.wait(timeout=420)
        except subprocess.TimeoutExpired:
            rc = None
        logs = {p.name: p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("*.log")}
        assert rc == 0, json.dumps(logs, indent=1)
    finally:
        for p in [serve, *sites]:
            _stop_group(p)
    time.sleep(2.0)
    # every SuperLink, SuperNode, SuperExec and app process we caused is gone
    assert _processes_mentioning(str(tmp_path)) == [] and _flower_processes() - before == set()
    return out


def _check_run(out: Path, tmp_path: Path, default_plan: bool = True, rounds: int = 1) -> None:
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "completed" and status["rounds"] == rounds
    # The default plan at ε = 10 warms up on DP-FETA's central images: their round and the warmed base's weights in
    # every later request go over the real SuperLink too; after a warm-up there is no adapter of the public model.
    for rel in ("model/unet/config.json", "selection.json", "model.onnx", "grid.png", "metrics.json",
                *(["central_images.png"] if default_plan else [])):
        assert (out / rel).exists(), rel
    assert (out / "adapter").exists() != default_plan
    reports = sorted((out / "privacy").glob("site-*.json"))
    assert len(reports) == 2
    expected = ([("central-images", 1), ("saliency-query", 1), ("dp-sgd", 2 * rounds)] if default_plan
                else [("dp-sgd", 2 * rounds)])
    for i in range(2):  # each site's ledger on its own disk, matching what the server received
        ledger = json.loads((tmp_path / f"ledger{i}" / "ledger.json").read_text())
        assert [(m["name"], m["steps"]) for m in ledger["mechanisms"]] == expected
        assert 0 < ledger["epsilon_spent"] <= 10.0 + 1e-6
    assert len(json.loads((out / "metrics.json").read_text())["rounds"]) == rounds


def _only_the_fleet_api_faces_the_sites(port: int) -> None:
    """What a site (or anyone) reaching the public port gets: the Fleet API, and no Control API."""
    import httpx

    deadline = time.time() + 120
    while True:
        try:
            fleet = httpx.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", content=b"", timeout=5)
            break
        except httpx.HTTPError:
            assert time.time() < deadline, "the Fleet gate did not open"
            time.sleep(0.5)
    assert b"sapf fleet gate" not in fleet.content  # forwarded to the SuperLink (which rejects an empty body)
    for path in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/control/stream-logs",
                 "/v1/control/register-node", "/v1/runtime/acquire-task", "/v1/fleet/../control/start-run"):
        r = httpx.post(f"http://127.0.0.1:{port}{path}", content=b"", timeout=5)
        assert r.status_code == 404 and b"sapf fleet gate" in r.content, path


@pytest.mark.slow
def test_serve_and_join_insecure(tmp_path, tiny_model_dir, site_files):
    # Two training rounds and no query rounds: each site's ledger continues its kept plan from one SuperLink message to
    # the next (one dp-sgd entry of 2 × 2 steps); the default plan's query rounds go over TLS below, with one round.
    out = _federation(tmp_path, tiny_model_dir, site_files, ["--insecure", "--warmup", "none", "--selection",
                                                             "attention"],
                      lambda i: ["--insecure"], while_up=_only_the_fleet_api_faces_the_sites, rounds=2)
    _check_run(out, tmp_path, default_plan=False, rounds=2)
    assert "http://127.0.0.1" in (out / "superlink" / "superlink.log").read_text()


@pytest.mark.slow
def test_serve_and_join_with_tls_and_supernode_auth(tmp_path, tiny_model_dir, site_files):
    certs = tmp_path / "certs"
    res = subprocess.run(SAPF + ["certs", "--out", str(certs), "--host", "127.0.0.1", "--site", "a", "--site", "b",
                                 "--site", "rogue"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    keys = ["a", "b"]
    rogue = []

    def rogue_node_tries_first(port):  # an unregistered node, holding ca.crt, tries to take a site's place
        rogue.append(_start(SAPF + ["join", "--superlink", f"127.0.0.1:{port}", "--data", str(site_files[0]),
                                    "--state-dir", str(tmp_path / "rogue"), "--max-epsilon", "50", "--wait", "30",
                                    "--ca", str(certs / "ca.crt"), "--auth-key", str(certs / "rogue")],
                            tmp_path / "rogue.log"))
        time.sleep(8)

    out = _federation(tmp_path, tiny_model_dir, site_files,
                      ["--certs", str(certs), "--supernode-key", str(certs / "a.pub"),
                       "--supernode-key", str(certs / "b.pub")],
                      lambda i: ["--ca", str(certs / "ca.crt"), "--auth-key", str(certs / keys[i])],
                      while_up=rogue_node_tries_first)
    _check_run(out, tmp_path)
    assert rogue[0].wait(timeout=120) != 0  # refused all along, gave up after --wait
    assert "could not join" in (tmp_path / "rogue.log").read_text()
    assert not (tmp_path / "rogue" / "ledger.json").exists()
    log = (out / "superlink" / "superlink.log").read_text()
    assert "https://127.0.0.1" in log and "--enable-supernode-auth" in log


def test_join_and_serve_refuse_bad_input_in_one_line(tmp_path, site_files):
    cases = [
        (["join", "--superlink", "127.0.0.1:1", "--data", str(site_files[0]), "--max-epsilon", "5"],
         "TLS is on by default"),
        (["join", "--superlink", "127.0.0.1:1", "--data", str(tmp_path / "nope.npz"), "--insecure",
          "--max-epsilon", "5"], "not found"),
        (["join", "--superlink", "127.0.0.1:1", "--data", str(site_files[0]), "--insecure"], "'--max-epsilon'"),
        (["join", "--superlink", "127.0.0.1:1", "--data", str(site_files[0]), "--insecure", "--max-epsilon", "inf"],
         "--max-epsilon"),
        (["join", "--superlink", "127.0.0.1:1", "--data", str(site_files[0]), "--insecure", "--max-epsilon", "5",
          "--limit", "max-rank=lots"], "max-rank"),
        (["serve", "--clients", "2", "--open-enrollment", "--out", str(tmp_path / "r")], "TLS is on by default"),
        (["serve", "--clients", "2", "--insecure", "--certs", str(tmp_path), "--out", str(tmp_path / "r")], "exclude"),
        (["serve", "--clients", "2", "--certs", str(tmp_path / "c0"), "--out", str(tmp_path / "r")],
         "--open-enrollment"),
        (["serve", "--clients", "2", "--insecure", "--supernode-key", str(tmp_path / "k.pub"),
          "--out", str(tmp_path / "r")], "needs TLS"),
        (["certs", "--out", str(tmp_path / "c"), "--host", "127.0.0.1", "--days", "0"], "--days"),
        (["serve", "--clients", "2", "--insecure", "--resume", "--out", str(tmp_path / "r")], "no checkpoint"),
        (["serve", "--clients", "2", "--insecure", "--optimizer", "lbfgs", "--out", str(tmp_path / "r")],
         "--optimizer"),
        (["federate", "--clients", "2", "--optimizer", "lbfgs", "--out", str(tmp_path / "f")], "--optimizer"),
        (["serve", "--clients", "1", "--insecure", "--port", "70000", "--out", str(tmp_path / "r")], "--port"),
        (["join", "--superlink", "nohostport", "--data", str(site_files[0]), "--insecure", "--max-epsilon", "5"],
         "HOST:PORT"),
        (["join", "--superlink", "127.0.0.1:1", "--data", str(site_files[0]), "--insecure", "--max-epsilon", "5",
          "--wait", "-5"], "--wait"),
    ]
    from concurrent.futures import ThreadPoolExecutor

    def run(args):  # each case is its own `sapf` process; they start side by side (imports dominate)
        return subprocess.run(SAPF + args, capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, [args for args, _ in cases]))
    for (args, expected), res in zip(cases, results, strict=True):
        assert res.returncode == 2, (args, res.stderr)
        assert expected in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_certs_chain_and_keys_are_what_flower_reads(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key

    from sapf.federation.credentials import make_certificates, make_supernode_keys

    paths = make_certificates(tmp_path, ["server.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"server.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    assert oct(paths["key"].stat().st_mode & 0o777) == "0o600"
    (private, public), = make_supernode_keys(tmp_path, ["site-a"])
    assert len(try_load_public_key(public)) > 0  # what `flwr supernode register` accepts
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    assert isinstance(load_ssh_private_key(private.read_bytes(), None), ec.EllipticCurvePrivateKey)
    from sapf.errors import SapfError

    with pytest.raises(SapfError, match="already exists"):
        make_certificates(tmp_path, ["x"])  # never overwrites without force


@pytest.mark.slow
def test_serve_exits_nonzero_when_the_server_app_fails(tmp_path):
    """Flower calls a run whose ServerApp raised "finished"; `sapf serve` must still fail."""
    before = _flower_processes()
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    res = subprocess.run(SAPF + ["serve", "--clients", "1", "--insecure", "--host", "127.0.0.1",
                                "--port", str(_free_port()), "--base-model", str(empty),
                                "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "the federated run failed" in res.stderr and "Traceback" not in res.stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"
    # Flower's serverapp process ends on its own once the SuperLink is gone: 2 s usually, longer on a loaded machine.
    deadline = time.time() + 30.0
    while _flower_processes() - before and time.time() < deadline:
        time.sleep(0.5)
    assert _flower_processes() - before == set()


@pytest.mark.slow
def test_join_gives_up_after_wait(tmp_path, site_files):
    # Nothing listens on port 1: Flower's SuperNode would retry for ever; `sapf join` ends after --wait.
    t0 = time.time()
    res = subprocess.run(SAPF + ["join", "--superlink", "127.0.0.1:1", "--data", str(site_files[0]), "--insecure",
                                 "--max-epsilon", "5", "--wait", "2", "--state-dir", str(tmp_path / "st")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and time.time() - t0 < 60
    assert "sapf: error: could not join 127.0.0.1:1" in res.stderr and "Traceback" not in res.stderr


EVIL_APP = '''
import json
import os
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

if os.environ.get("SAPF_TEST_ROLE") == "site":  # what a hostile server would do next to the private data
    with open(os.environ["SAPF_TEST_MARKER"], "w") as f:
        f.write("the server's code ran at the site")

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    t0 = time.time()
    while not list(grid.get_node_ids()) and time.time() - t0 < 120:
        time.sleep(1)
    msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.saliency")
            for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    with open(context.run_config["result"], "w") as f:
        json.dump([[r.has_error(), r.error.reason if r.has_error() else ""] for r in replies], f)


@client.query("saliency")
def query(msg, context):
    return Message(RecordDict(), reply_to=msg)
'''


@pytest.mark.slow
def test_a_site_refuses_an_app_bundle_that_carries_code(tmp_path, site_files):
    from sapf.federation.deployment import Tls, superlink_command, write_flower_home

    app = tmp_path / "evil-app"
    app.mkdir()
    (app / "evil.py").write_text(EVIL_APP)
    result, marker = tmp_path / "result.json", tmp_path / "marker"
    (app / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evil"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "evil"

[tool.flwr.app.components]
serverapp = "evil:server"
clientapp = "evil:client"

[tool.flwr.app.config]
result = "{result}"
""")
    port = _free_port()
    link = _start(superlink_command("127.0.0.1", port, Tls(insecure=True), False, None), tmp_path / "link.log")
    os.environ.update(SAPF_TEST_ROLE="site", SAPF_TEST_MARKER=str(marker))  # inherited by the site's processes
    try:
        site = _start(SAPF + ["join", "--superlink", f"127.0.0.1:{port}", "--data", str(site_files[0]), "--insecure",
                              "--max-epsilon", "5", "--state-dir", str(tmp_path / "state")], tmp_path / "join.log")
    finally:
        del os.environ["SAPF_TEST_ROLE"], os.environ["SAPF_TEST_MARKER"]
    try:
        home = write_flower_home(tmp_path / "flwr-home", f"127.0.0.1:{port}", Tls(insecure=True))
        deadline = time.time() + 60
        while True:
            sub = subprocess.run(["flwr", "run", str(app), "sapf", "--format", "json"], capture_output=True, text=True,
                                 env={**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(app)}, timeout=120)
            ok = sub.returncode == 0 and json.loads(sub.stdout).get("success")
            if ok or time.time() > deadline:
                break
            time.sleep(2)  # the SuperLink may not be up yet
        assert sub.returncode == 0 and json.loads(sub.stdout)["success"], sub.stdout + sub.stderr
        deadline = time.time() + 240
        while not result.exists() and time.time() < deadline:
            time.sleep(1)
        replies = json.loads(result.read_text())
    finally:
        for p in (site, link):
            _stop_group(p)
    assert replies and all(err and "refused: the app bundle carries files of its own" in why for err, why in replies)
    assert not marker.exists()
    assert "refused: the app bundle" in (tmp_path / "join.log").read_text()


def test_certs_keep_the_ca_key_apart_and_a_site_makes_its_own_key_pair(tmp_path):
    res = subprocess.run(SAPF + ["certs", "--out", str(tmp_path / "server"), "--host", "127.0.0.1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "server").iterdir()) == ["ca.crt", "offline", "server.key", "server.pem"]
    assert (tmp_path / "server" / "offline" / "ca.key").stat().st_mode & 0o077 == 0
    assert "offline" in res.stderr and "off this machine" in res.stderr
    res = subprocess.run(SAPF + ["certs", "--out", str(tmp_path / "site"), "--site", "hospital-a"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["hospital-a", "hospital-a.pub"]
    assert "send only" in res.stderr
