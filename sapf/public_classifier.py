"""Best-of-n sampling: draw n candidates for every image asked for and keep the one a classifier of the *public*
digits finds most like its class.

Why: DP fine-tuning moves a model to the private data's style and costs it class identity (docs/experiments.md
#class-identity); some of its samples no longer read as the digit they were drawn for. Choosing among
candidates by a public classifier's probability of the conditioning class keeps the readable ones.

Privacy: the classifier is trained on the public digits only, with a public seed (DP-MEPF's feature network,
:func:`sapf.engine.mepf.public_feature_net`), and it scores samples of a DP model: the choice is post-processing
and costs no ε. It is not sapf's evaluation classifier (trained on the real digits, for the curator only), so
`sapf evaluate`'s class fidelity measures the choice with a network it never saw.

Torch-free (onnxruntime on the shipped ONNX file), so the ONNX sampler keeps running without PyTorch. The shipped
file is :func:`export_public_classifier`'s output; it knows 28×28 grey images of the ten digits only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sapf.errors import SapfError
from sapf.outputs import from_uint8

SHIPPED = Path(__file__).parent / "assets" / "public-digit-classifier.onnx"
IMAGE_SIZE, CHANNELS, NUM_CLASSES = 28, 1, 10  # what the shipped classifier reads
MAX_BEST_OF = 16
# The samplers' default for a model the classifier reads (ten classes of 28×28 grey images: sapf's digit models).
# Measured on the federated main job at 20 DDIM steps (docs/experiments.md#best-of-default): class fidelity
# 0.86 → 0.93 and FID 107 → 97 at the same recall, for twice the sampling time. Any other model: 1.
DEFAULT_BEST_OF = 2


def check_best_of_count(best_of: int) -> None:
    if not 1 <= best_of <= MAX_BEST_OF:
        raise SapfError(f"--best-of must lie in [1, {MAX_BEST_OF}], got {best_of}")


def reads(num_classes: int, channels: int, image_size: int) -> bool:
    """Whether the shipped classifier reads this model's images (ten classes of 28×28 grey images)."""
    return (num_classes, channels, image_size) == (NUM_CLASSES, CHANNELS, IMAGE_SIZE)


def resolve_best_of(best_of: int | None, num_classes: int, channels: int, image_size: int) -> int:
    """The candidates to draw an image: a given n, checked; None: :data:`DEFAULT_BEST_OF` for a model the
    classifier reads, else 1. (A ten-class 28×28 grey model of something other than digits: pass 1.)"""
    if best_of is None:
        return DEFAULT_BEST_OF if reads(num_classes, channels, image_size) else 1
    check_best_of(best_of, num_classes, channels, image_size)
    return best_of


def check_best_of(best_of: int, num_classes: int, channels: int, image_size: int) -> None:
    """Refuse a best-of-n the shipped classifier cannot serve (a bad n, or a model that does not draw digits)."""
    check_best_of_count(best_of)
    if best_of > 1 and not reads(num_classes, channels, image_size):
        raise SapfError(f"--best-of chooses with a classifier of the public digits ({NUM_CLASSES} classes, "
                        f"{IMAGE_SIZE}x{IMAGE_SIZE} grey); this model draws {num_classes} classes of "
                        f"{image_size}x{image_size}x{channels}: use --best-of 1")


def candidate_labels(labels: np.ndarray, best_of: int) -> np.ndarray:
    """The labels of the candidates: image i's are rows i·n … i·n + n − 1, all of its label."""
    return np.repeat(labels, best_of)


class PublicClassifier:
    """The shipped classifier of the public digits, on onnxruntime's CPU provider (a few ms a batch)."""

    def __init__(self, path: str | Path = SHIPPED):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # a missing or damaged file: one line, not onnxruntime's traceback
            raise SapfError(f"cannot load the public classifier {path}: {type(e).__name__}") from None

    def class_probability(self, images: np.ndarray, labels: np.ndarray, batch: int = 512) -> np.ndarray:
        """p(label | image) for uint8 images (N, H, W[, C]) and their labels."""
        x = from_uint8(images)  # the model space the samplers drew them in
        logits = np.concatenate([self.session.run(None, {"images": np.ascontiguousarray(x[b : b + batch])})[0]
                                 for b in range(0, len(x), batch)])
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return p[np.arange(len(labels)), labels]


def best_of_candidates(images: np.ndarray, labels: np.ndarray, best_of: int,
                       classifier: PublicClassifier | None = None) -> np.ndarray:
    """Of `images` (drawn for :func:`candidate_labels` (labels, best_of)), image i's most probable candidate."""
    if best_of == 1:
        return images
    p = (classifier or PublicClassifier()).class_probability(images, candidate_labels(labels, best_of))
    pick = np.arange(len(labels)) * best_of + p.reshape(len(labels), best_of).argmax(axis=1)
    return images[pick]


def export_public_classifier(out: str | Path, *, seed: int = 0) -> None:
    """Write the shipped classifier: DP-MEPF's feature network of the public digits (its recipe, `seed`) as ONNX,
    input ``images`` (N, 1, 28, 28) in [-1, 1], output ``logits`` (N, 10). The shipped file:
    ``python -m sapf.public_classifier sapf/assets/public-digit-classifier.onnx``."""
    import contextlib
    import io
    import warnings

    import torch

    from sapf.engine.data import load_dataset
    from sapf.engine.mepf import public_feature_net
    from sapf.outputs import atomic_path

    net = public_feature_net(load_dataset("digits", IMAGE_SIZE, CHANNELS), seed=seed)
    with atomic_path(out) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, CHANNELS, IMAGE_SIZE, IMAGE_SIZE),), str(tmp), dynamo=False,
                          input_names=["images"], output_names=["logits"], dynamic_axes={"images": {0: "n"}},
                          opset_version=17)


if __name__ == "__main__":
    import sys

    export_public_classifier(sys.argv[1])
