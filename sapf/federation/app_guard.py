"""A site runs only the sapf it installed: its ClientApp runner checks the app bundle first.

Flower's SuperNode runs the ClientApp that the server's app bundle (FAB) names, with the bundle's
folder first on the import path: a server that ships a bundle with code of its own would run it at
every site, next to the private data. Flower 1.42 offers no switch against that
(``--trusted-entities`` accepts only bundles signed by Flower's hub), but it starts each ClientApp
as a separate ``flwr-clientapp`` process found on ``PATH``. ``sapf join`` puts this runner first on
the SuperNode's ``PATH`` under that name: before Flower installs or imports anything from a
bundle, the bundle must hold nothing but ``pyproject.toml`` (and Flower's ``.info/CONTENT``
manifest), and its ClientApp must be sapf's own. A refused bundle ends the task with an error
reply; nothing of it is written to disk or imported.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import zipfile
from pathlib import Path

from sapf.errors import SapfError

try:
    import tomllib
except ImportError:  # Python 3.10: Flower depends on tomli
    import tomli as tomllib

ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
SAPF_CLIENTAPP = "sapf.federation.client_app:app"
RUNNER_NAME = "flwr-clientapp"  # the command Flower's SuperExec starts for a ClientApp task


def check_bundle(fab: bytes) -> None:
    """Refuse (SapfError) an app bundle that carries any file besides its pyproject and manifest, or
    whose ClientApp is not sapf's."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as z:
            names = set(z.namelist())
            extra = sorted(names - ALLOWED_FILES)
            if extra:
                raise SapfError(f"refused: the app bundle carries files of its own ({', '.join(extra[:3])}); "
                                "a site runs only the sapf it installed")
            if "pyproject.toml" not in names:
                raise SapfError("refused: the app bundle has no pyproject.toml")
            project = tomllib.loads(z.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SapfError(f"refused: the app bundle is not readable ({type(e).__name__})") from None
    clientapp = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if clientapp != SAPF_CLIENTAPP:
        raise SapfError(f"refused: the app bundle names the ClientApp {clientapp!r}, not {SAPF_CLIENTAPP!r}")


def install_runner(bin_dir: Path) -> Path:
    """Write the `flwr-clientapp` runner into `bin_dir` (to go first on the SuperNode's PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / RUNNER_NAME
    path.write_text(f"#!{sys.executable}\nfrom sapf.federation.app_guard import main\nmain()\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def path_with_runner(bin_dir: Path) -> str:
    return os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])


def main() -> None:
    """Flower's `flwr-clientapp`, with the bundle checked before Flower installs it."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    install = run_clientapp.install_from_fab

    def checked_install(fab_content: bytes, *args, **kwargs):
        try:
            check_bundle(fab_content)
        except SapfError as e:
            print(f"[sapf site] {e}", file=sys.stderr, flush=True)
            raise
        return install(fab_content, *args, **kwargs)

    run_clientapp.install_from_fab = checked_install
    flwr_clientapp()
