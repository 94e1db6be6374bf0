import numpy as np
import pytest
from typer.testing import CliRunner

from sapf.cli import app
from sapf.engine.data import load_dataset, train_holdout_split
from sapf.engine.evaluate import (
    accuracy,
    feature_network,
    features,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
    train_classifier,
)


@pytest.fixture(scope="module")
def real():
    ds = load_dataset("mnist5k", 28, 1)
    return train_holdout_split(ds, 0.2, 0)


@pytest.fixture(scope="module")
def net(real, tmp_path_factory):
    import os

    os.environ["SAPF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    train, _ = real
    return feature_network("mnist5k", train.subset(np.arange(1500)))


def _shuffled(ds):
    return ds.subset(np.random.default_rng(1).permutation(len(ds)))  # the holdout is sorted by label


def test_a_set_against_itself_is_ideal_and_noise_is_worse(real, net):
    hold = _shuffled(real[1])
    f = features(net, hold.images[:500])
    g = features(net, hold.images[500:1000])
    assert frechet_distance(f, f) < 1e-6
    p, r = precision_recall(f, f)
    assert p == 1.0 and r == 1.0
    rng = np.random.default_rng(0)
    noisy = np.clip(hold.images[500:1000] + rng.normal(0, 0.6, hold.images[500:1000].shape), -1, 1).astype(np.float32)
    h = features(net, noisy)
    assert frechet_distance(f, g) < frechet_distance(f, h)
    assert kernel_inception_distance(f, g, subsets=5) < kernel_inception_distance(f, h, subsets=5)
    # Mild noise keeps most samples on the real manifold (precision ~0.96 either way) but loses its spread: recall.
    assert precision_recall(f, g)[1] > precision_recall(f, h)[1] + 0.1
    # Shifted digits (moved 6 pixels) are further still from the real distribution than a fresh real set.
    shifted = features(net, np.roll(hold.images[500:1000], 6, axis=-1))
    assert frechet_distance(f, g) < frechet_distance(f, shifted)
    assert precision_recall(f, g)[0] > precision_recall(f, shifted)[0] + 0.3


def test_downstream_classifier_real_beats_noise(real):
    train, hold = real
    x, y = train.images[:800], train.labels[:800]
    on_real = train_classifier(x, y, 10, epochs=8)
    noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
    on_noise = train_classifier(noise, y, 10, epochs=8)
    assert accuracy(on_real, hold.images, hold.labels) > 0.8 > 0.3 > accuracy(on_noise, hold.images, hold.labels)


def test_class_fidelity_separates_real_labels_from_shuffled_ones(real, net):
    from sapf.engine.evaluate import class_fidelity

    hold = _shuffled(real[1])
    x, y = hold.images[:500], hold.labels[:500]
    right = class_fidelity(net, x, y, 10)
    wrong = class_fidelity(net, x, np.random.default_rng(0).permutation(y), 10)
    assert right["class_fidelity"] > 0.9 > 0.2 > wrong["class_fidelity"]
    assert np.asarray(right["confusion"]).sum() == 500 and np.trace(np.asarray(right["confusion"])) > 450
    assert min(right["class_fidelity_per_class"].values()) > 0.7


def test_evaluate_command(tmp_path, real, net, monkeypatch):
    hold = _shuffled(real[1])
    images = ((hold.images[:200, 0] + 1) * 127.5).round().astype(np.uint8)
    np.savez(tmp_path / "real.npz", images=images, labels=hold.labels[:200])
    r = CliRunner().invoke(app, ["evaluate", "--samples", str(tmp_path / "real.npz"),
                                 "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    import json

    m = json.loads((tmp_path / "m.json").read_text())
    assert {"class_fidelity", "fid", "kid", "precision", "recall", "downstream_acc"} <= set(m)
    assert m["downstream_acc"] > 0.6 and m["precision"] > 0.8 and m["class_fidelity"] > 0.9
    assert (tmp_path / "confusion.png").exists() and "outside" in m["privacy"]
    r = CliRunner().invoke(app, ["evaluate", "--samples", str(tmp_path / "none.npz")])
    assert r.exit_code == 2 and "no samples" in r.output
