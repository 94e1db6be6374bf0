"""Atomic writes: a failed write leaves the earlier file whole and no temporary behind."""

import os
import stat

import numpy as np
import pytest

from sapf.outputs import atomic_path, read_json, save_png, write_json


def test_a_failed_write_keeps_the_earlier_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"fid": 1.0})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"fid": ')  # half written, then the writer dies
            raise RuntimeError("killed")
    assert read_json(path) == {"fid": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_modes_and_suffix(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(tmp_path / "key.pem", private=True) as tmp:
        assert tmp.suffix == ".pem" and tmp.parent == tmp_path
        tmp.write_bytes(b"secret")
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    save_png(tmp_path / "sub" / "g.png", np.zeros((4, 4), np.uint8))  # makes the folder too
    assert stat.S_IMODE((tmp_path / "sub" / "g.png").stat().st_mode) == 0o666 & ~umask
