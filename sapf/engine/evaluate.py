"""Fidelity and utility of synthetic images, offline.

No Inception weights exist offline, so fidelity uses a feature network we train ourselves: a
small CNN classifier fitted to the evaluation dataset's real *training* images and cached. Its
128-d penultimate features give FID, KID and precision/recall (k nearest neighbours). These
numbers compare sapf runs with each other, not with Inception-FID in papers.

Class fidelity asks what a user of a class-conditional generator asks first — is a "7" a 7? — as the
share of samples that the same network (a classifier of the real training split) assigns to the class
they were conditioned on; per class and as a confusion matrix too.

Utility follows DPImageBench: train a small CNN on the labelled synthetic images and report its
accuracy on the real holdout images.

Evaluation reads the real data: its outputs are for the data curator and fall outside the (ε, δ)
guarantee of the run they judge.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sapf.engine.data import ImageDataset, load_dataset, train_holdout_split
from sapf.errors import SapfError
from sapf.outputs import save_torch

FEATURE_NET_VERSION = 1


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers; `features` is the 128-d penultimate activation."""

    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int = 5, seed: int = 0,
                     batch_size: int = 128, lr: float = 2e-3) -> SmallCNN:
    """Images float (N,C,H,W) in [-1, 1]."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SmallCNN(images.shape[1], images.shape[-1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(np.ascontiguousarray(images, np.float32)), torch.from_numpy(labels.astype(np.int64))
    model.train()
    for _ in range(epochs):
        for b in np.array_split(rng.permutation(len(x)), max(1, len(x) // batch_size)):
            idx = torch.from_numpy(b)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def _batched(fn, images: np.ndarray, batch: int = 512) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def accuracy(model: SmallCNN, images: np.ndarray, labels: np.ndarray) -> float:
    pred = _batched(model, images).argmax(1)
    return float((pred == labels).mean())


def class_fidelity(model: SmallCNN, images: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """The share of samples the classifier assigns to their conditioning class: overall, per class, and
    the confusion matrix (rows: conditioning class, columns: recognised class; counts)."""
    pred = _batched(model, images).argmax(1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {int(k): float(confusion[k, k] / confusion[k].sum()) for k in range(num_classes) if confusion[k].sum()}
    return {"class_fidelity": float((pred == labels).mean()), "class_fidelity_per_class": per_class,
            "confusion": confusion.tolist()}


def plot_confusion(path: str | Path, confusion: list[list[int]], title: str = "class fidelity") -> None:
    """A PNG of the confusion matrix, each row normalised to the share of that class's samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sapf.outputs import atomic_path

    c = np.asarray(confusion, np.float64)
    share = c / np.maximum(c.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(c)):
        for j in range(len(c)):
            if share[i, j] >= 0.05:
                ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if share[i, j] > 0.6 else "black")
    ax.set_xlabel("recognised as")
    ax.set_ylabel("conditioned on")
    ax.set_xticks(range(len(c)))
    ax.set_yticks(range(len(c)))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def features(model: SmallCNN, images: np.ndarray) -> np.ndarray:
    return _batched(model.features, images).astype(np.float64)


def cache_dir() -> Path:
    return Path(os.environ.get("SAPF_CACHE", Path.home() / ".cache" / "sapf"))


def feature_network(spec: str, train: ImageDataset, seed: int = 0) -> SmallCNN:
    """The feature network for `spec`, trained on its training split once and cached on disk."""
    key = hashlib.sha256(f"{spec}|{train.images.shape}|{train.num_classes}|{seed}|v{FEATURE_NET_VERSION}".encode())
    if os.path.exists(spec):
        key.update(str(os.path.getmtime(spec)).encode())
    path = cache_dir() / "feature-nets" / f"{key.hexdigest()[:16]}.pt"
    model = SmallCNN(train.channels, train.image_size, train.num_classes)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train_classifier(train.images, train.labels, train.num_classes, epochs=8, seed=seed)
    save_torch(path, model.state_dict())
    return model


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # A singular covariance (few samples, or dead features) is expected here and handled below;
        # the reference FID code silences the same warning (sqrtm(..., disp=False)).
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as the reference FID code does
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(max(0.0, ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 20, subset_size: int = 500,
                              seed: int = 0) -> float:
    """Unbiased MMD² with the cubic polynomial kernel, averaged over random subsets (KID)."""
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    vals = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
    return float(np.mean(vals))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 4) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): the share of fake samples inside the
    real manifold (union of k-NN balls), and of real samples inside the fake one."""

    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def coverage(ref, ref_r, query):
        d = np.sqrt(((query[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
        return float((d <= ref_r[None, :]).any(axis=1).mean())

    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


def load_samples(path: str | Path, image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A sampler output dir or .npz (uint8 images, labels) → model-space floats and labels."""
    path = Path(path)
    f = path / "samples.npz" if path.is_dir() else path
    if not f.exists():
        raise SapfError(f"no samples at {path} (expected a samples.npz or a directory holding one)")
    from sapf.engine.data import _prepare

    try:
        with np.load(f) as z:
            images, labels = np.asarray(z["images"]), np.asarray(z["labels"])
    except KeyError as e:
        raise SapfError(f"cannot read samples from {f}: no array {e}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):  # numpy's message would suggest unpickling
        raise SapfError(f"cannot read samples from {f}: not an .npz of arrays 'images' and 'labels'") from None
    if images.dtype.kind not in "uif" or images.ndim not in (3, 4) or not np.isfinite(images).all():
        raise SapfError(f"samples in {f}: 'images' must be finite pixel values of shape (N, H, W) or (N, H, W, C)")
    if labels.dtype.kind not in "ui" or labels.shape != (len(images),) or (labels < 0).any():
        raise SapfError(f"samples in {f}: 'labels' must be one non-negative integer per image")
    labels = labels.astype(np.int64)
    x = images.astype(np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return _prepare(x, image_size, channels), labels


def evaluate(samples: str | Path, data: str = "mnist5k", split: str = "holdout", seed: int = 0,
             downstream_epochs: int = 10, image_size: int = 28, channels: int = 1) -> dict:
    from sapf.config import DEFAULT_HOLDOUT
    from sapf.engine.run import SPLIT_SEED

    if split not in ("holdout", "train"):
        raise SapfError(f"--split must be holdout or train, got '{split}'")
    ds = load_dataset(data, image_size, channels)
    train, hold = train_holdout_split(ds, DEFAULT_HOLDOUT, SPLIT_SEED)
    real = hold if split == "holdout" else train
    fake, labels = load_samples(samples, image_size, channels)
    if len(fake) < 10:
        raise SapfError(f"need at least 10 samples to evaluate, got {len(fake)}")
    if labels.max() >= ds.num_classes:  # checked before the networks train (load_samples refused negatives)
        raise SapfError(f"sample labels must lie in [0, {ds.num_classes}) for {data}")
    net = feature_network(data, train, seed)
    fr, ff = features(net, real.images), features(net, fake)
    precision, recall = precision_recall(fr[:2000], ff[:2000], k=4)
    clf = train_classifier(fake, labels, ds.num_classes, epochs=downstream_epochs, seed=seed)
    fidelity = class_fidelity(net, fake, labels, ds.num_classes)
    return {
        "class_fidelity": fidelity["class_fidelity"],
        "fid": frechet_distance(fr, ff),
        "kid": kernel_inception_distance(fr, ff, seed=seed),
        "precision": precision,
        "recall": recall,
        "downstream_acc": accuracy(clf, hold.images, hold.labels),
        "feature_net_acc_on_real": accuracy(net, real.images, real.labels),
        "num_samples": int(len(fake)),
        "num_real": int(len(real)),
        "data": data,
        "split": split,
        "class_fidelity_per_class": fidelity["class_fidelity_per_class"],
        "confusion": fidelity["confusion"],
        "note": "FID/KID on sapf's own feature network (a CNN trained on the real training split): comparable "
                "between sapf runs, not with Inception-FID in papers",
        "privacy": "computed on the real data: for the data curator, outside the run's (ε, δ) guarantee",
    }
