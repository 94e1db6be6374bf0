"""How MNIST-like the public digits are, as pretraining would vary them: sapf's evaluation classifier and features
(trained on MNIST's training split, as `sapf evaluate` uses them) applied to the public digits themselves.

A public model learns its data, so its samples score about what its data scores here (the shipped model: class
fidelity 0.798 against its data's 0.788). This probe looks at MNIST: it explains a measured public model, it does not
choose a default (docs/experiments.md#public-augmentation).

    python benchmarks/public_data.py      # about a minute on 2 cores once the feature network is cached
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402

from sapf.config import DEFAULT_HOLDOUT, PretrainConfig  # noqa: E402


def variants(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    from sapf.engine.pretrain import random_slant, vary_as_handwriting

    slanted = random_slant(x, PretrainConfig.slant, torch.Generator().manual_seed(seed))
    dilated = F.max_pool2d(slanted, 3, stride=1, padding=1)
    plus = torch.maximum(torch.maximum(slanted, F.max_pool2d(slanted, (3, 1), stride=1, padding=(1, 0))),
                         F.max_pool2d(slanted, (1, 3), stride=1, padding=(0, 1)))
    handwriting = vary_as_handwriting(x, PretrainConfig.slant, torch.Generator().manual_seed(seed),
                                      thinner=False, soft_stroke=False)
    return {
        "slant (the shipped model's recipe)": slanted,
        "slant + 3x3 dilation": dilated,
        "slant + plus-shaped dilation": plus,
        "slant + half a dilation": torch.maximum(slanted, (dilated + slanted) / 2),
        "--augmentation handwriting": handwriting,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="Seeds the augmentation and the evaluation network.")
    args = ap.parse_args()

    from sapf.engine.data import load_dataset, train_holdout_split
    from sapf.engine.evaluate import class_fidelity, feature_network, features, frechet_distance, precision_recall
    from sapf.engine.run import SPLIT_SEED

    train, hold = train_holdout_split(load_dataset("mnist5k"), DEFAULT_HOLDOUT, SPLIT_SEED)
    net = feature_network("mnist5k", train, args.seed)
    real = features(net, hold.images)
    public = load_dataset("digits")
    rows = []
    for name, images in variants(torch.from_numpy(public.images), args.seed).items():
        x = images.numpy().astype(np.float32)
        fake = features(net, x)
        precision, recall = precision_recall(real[:2000], fake[:2000], k=4)
        rows.append({"public digits": name,
                     "class_fidelity": class_fidelity(net, x, public.labels, 10)["class_fidelity"],
                     "fid": frechet_distance(real, fake), "precision": precision, "recall": recall,
                     "ink": float(((images + 1) / 2).mean())})
    mnist_ink = float(((torch.from_numpy(hold.images) + 1) / 2).mean())
    save("public_data", rows, {"seed": args.seed, "mnist_holdout_ink": mnist_ink})
    print(table(rows, ["public digits", "class_fidelity", "fid", "precision", "recall", "ink"]))
    print(f"MNIST holdout ink: {mnist_ink:.3f}")


if __name__ == "__main__":
    main()
