"""Writing results: atomic files and directories, sample PNGs, grids, npz.

Torch-free on purpose: the ONNX sampler on an edge box imports this module without PyTorch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sapf.errors import SapfError


@contextlib.contextmanager
def atomic_path(path: str | Path, private: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path` that replaces `path` only when the block succeeds.

    A reader never sees a half-written file, and a failure leaves the earlier file as it was.
    The temporary name keeps `path`'s suffix (writers that infer the format from it work).
    ``private`` creates the file 0600 (keys, a site's secret); otherwise the umask decides, as for any file.
    ``durable`` returns only once the new bytes and the rename are on disk (fsync of the file, then of its folder):
    a site's ledger is written before a release leaves, and a power cut after the release must not bring back
    the ledger without it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666))
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable and os.name == "posix":  # the rename lives in the folder's entry (no folder fsync on Windows)
            _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any, durable: bool = False) -> None:
    """Write JSON atomically (``durable``: see :func:`atomic_path`)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", durable=durable)


def write_text(path: str | Path, text: str, durable: bool = False) -> None:
    """Write a text file atomically (``durable``: see :func:`atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def check_writable_path(path: str | Path, flag: str = "--out", beside: bool = False) -> Path:
    """Refuse, before any work, a path that cannot be written: an existing folder must be writable itself, anything
    else (or, with `beside`, the path even when it is a folder: its temporary twin is made next to it) needs its
    nearest existing ancestor to be a folder this process may write in."""
    path = Path(path)
    ancestor = path.absolute()
    if beside or not ancestor.is_dir():
        ancestor = ancestor.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SapfError(f"{flag} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SapfError(f"{flag} {path}: cannot write in {ancestor}")
    return path


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Refuse an --out that already holds something, unless --force, or that cannot be made (checked before any
    work)."""
    out = check_writable_path(out, beside=True)  # atomic_output_dir makes its temporary folder beside `out`
    if out.exists() and not out.is_dir():
        raise SapfError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SapfError(f"--out {out} already holds an earlier run; pass --force to replace it")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only when the block succeeds.

    An interrupted run leaves a hidden ``.name.tmp-*`` directory, never a half-written `out`
    that looks complete; an earlier `out` is replaced (with ``force``) only at the very end.
    """
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save atomically (torch imported here, so this module stays torch-free)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_tensors(path: str | Path, state: dict) -> None:
    """A state dict as safetensors, atomically (checkpoints, a site's saved replies, public networks)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Save one uint8 image (H,W) or (H,W,C) as PNG, atomically."""
    from PIL import Image

    arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile uint8 images (N,H,W[,C]) into one uint8 image, `ncol` per row."""
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    ncol = ncol or max(1, int(math.ceil(math.sqrt(n))))
    nrow = int(math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid[..., 0] if c == 1 else grid


def class_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 10) -> np.ndarray:
    """A grid with one row per class (the first `per_class` samples of each), else a plain grid."""
    classes = np.unique(labels)
    rows = [images[labels == k][:per_class] for k in classes]
    if len(classes) > 1 and all(len(r) == per_class for r in rows):
        return image_grid(np.concatenate(rows), ncol=per_class, scale=2)
    return image_grid(images[: per_class * per_class], scale=2)


def write_samples(out: Path, images: np.ndarray, labels: np.ndarray, meta: dict | None = None) -> None:
    """The sampler's files: one PNG per image, ``grid.png``, ``samples.npz`` (+ ``config.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = len(str(max(len(images) - 1, 0)))
    for i, (img, lab) in enumerate(zip(images, labels, strict=False)):
        save_png(out / f"{i:0{width}d}_class{int(lab)}.png", img)
    save_png(out / "grid.png", class_grid(images, labels))
    with atomic_path(out / "samples.npz") as tmp:
        np.savez_compressed(tmp, images=images, labels=labels.astype(np.int64))
    if meta is not None:
        write_json(out / "config.json", meta)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Model space [-1, 1] (N,C,H,W) → uint8 (N,H,W) for one channel, else (N,H,W,C)."""
    x = np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    x = x.transpose(0, 2, 3, 1)
    return x[..., 0] if x.shape[-1] == 1 else x


def from_uint8(images: np.ndarray) -> np.ndarray:
    """:func:`to_uint8`'s inverse: uint8 (N,H,W) or (N,H,W,C) → model space [-1, 1] (N,C,H,W), float32."""
    x = np.asarray(images).astype(np.float32) / 127.5 - 1.0
    return x[:, None] if x.ndim == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
