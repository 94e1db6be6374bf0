"""PrivImage: the public pool, the semantic histogram's bound, noise and record, a choice made from the noisy
histogram alone, and the pretraining stage (cached by the choice)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sapf.cli import app
from sapf.engine.data import load_dataset
from sapf.engine.privacy import PrivacyLedger
from sapf.engine.semantic import (
    SemanticQuery,
    choose_public_classes,
    release_semantic_histogram,
    semantic_contributions,
    train_pool_classifier,
)

CLASSIFIER_STEPS = 30  # the pool classifier in tests: it only has to vote (its default 1,500 steps take a minute)


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    """One cache for this module's runs: the pool classifier is trained once, as a user's runs would share it."""
    import os

    old = os.environ.get("SAPF_CACHE")
    os.environ["SAPF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["SAPF_CACHE"])
    if old is None:
        del os.environ["SAPF_CACHE"]
    else:
        os.environ["SAPF_CACHE"] = old


@pytest.fixture(scope="module")
def pool_and_net():
    pool = load_dataset("public-pool", 16, 1)
    return pool, train_pool_classifier(pool, seed=0, steps=CLASSIFIER_STEPS)


def test_the_pool_has_dozens_of_named_classes_from_installed_files(pool_and_net):
    pool, _ = pool_and_net
    assert pool.num_classes >= 40 and len(pool.class_names) == pool.num_classes
    counts = np.bincount(pool.labels, minlength=pool.num_classes)
    assert (counts >= 100).all()  # every class is populated
    assert {"digit 7", "letter A", "face"} <= set(pool.class_names)
    from sapf.engine.public_pool import build_pool

    first = build_pool(1, 3)
    build_pool.cache_clear()
    assert all(np.array_equal(a, b) for a, b in zip(first, build_pool(1, 3), strict=True))  # seeded: public


def test_the_pool_read_back_from_the_cache_is_the_pool_built_afresh(pool_and_net, shared_cache):
    pool, _ = pool_and_net  # the module's first load: built afresh (its cache dir was empty) and written to it
    assert len(list((shared_cache / "pools").glob("public-pool-*-16px-1ch.npz"))) == 1
    again = load_dataset("public-pool", 16, 1)  # read from disk
    assert np.array_equal(again.images, pool.images) and np.array_equal(again.labels, pool.labels)
    assert again.images.dtype == pool.images.dtype and again.class_names == pool.class_names


def test_the_pool_classifier_sees_handwriting_variation_and_has_its_own_cache(pool_and_net, shared_cache):
    """Its augmentation keeps images in [-1, 1] with a black background (rotating a digit must not bring in a grey
    border), varies them per image, and the network it trains is cached apart from DP-MEPF's feature network of the
    same images, seed and steps (one read for the other would silently change which classes the query chooses)."""
    from sapf.engine.mepf import public_feature_net
    from sapf.engine.semantic import augment_pool_images

    pool, net = pool_and_net
    digits = torch.from_numpy(pool.images[pool.labels < 10][:64])
    varied = augment_pool_images(digits, torch.Generator().manual_seed(0))
    assert varied.shape == digits.shape and varied.min() >= -1 and varied.max() <= 1
    assert not torch.allclose(varied, augment_pool_images(digits, torch.Generator().manual_seed(1)))
    white = augment_pool_images(torch.ones(64, 1, 16, 16), torch.Generator().manual_seed(0))
    assert (white.flatten(1).min(1).values < -0.5).float().mean() > 0.5  # uncovered corners are background

    names = {p.name for p in (shared_cache / "classifiers").glob("*.safetensors")}
    plain = public_feature_net(pool, seed=0, steps=CLASSIFIER_STEPS)
    assert len({p.name for p in (shared_cache / "classifiers").glob("*.safetensors")} - names) == 1
    assert not torch.equal(plain.conv1.weight, net.conv1.weight)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), train_pool_classifier(
        pool, seed=0, steps=CLASSIFIER_STEPS).state_dict().values(), strict=True))


@pytest.mark.parametrize("top_k", [1, 3])
def test_one_record_moves_the_histogram_by_sqrt_k_and_the_noise_is_sigma_sqrt_k(pool_and_net, mnist_small_npz, top_k):
    """Noise shrunk, a bound other than √k or an unrecorded release fails this."""
    pool, net = pool_and_net
    data = load_dataset(str(mnist_small_npz), 16, 1)
    contributions, dim = semantic_contributions(net, data, pool.num_classes, top_k)
    rows = contributions(np.arange(len(data))).numpy()
    assert rows.shape == (len(data), 10 * pool.num_classes)
    assert np.allclose(np.linalg.norm(rows, axis=1), math.sqrt(top_k))  # k ones, in the record's label row
    for i in range(len(data)):
        assert rows[i].reshape(10, -1)[np.arange(10) != data.labels[i]].sum() == 0
    q = SemanticQuery(top_k=top_k, per_label=1)
    clean = release_semantic_histogram(net=net, data=data, num_public=pool.num_classes, query=q, noise_multiplier=0.0,
                                       ledger=None)
    assert clean.sum() == pytest.approx(top_k * len(data))
    ledger = PrivacyLedger(10.0, 1e-5, "rdp")
    sigma = 2.0
    torch.manual_seed(0)
    noisy = release_semantic_histogram(net=net, data=data, num_public=pool.num_classes, query=q,
                                       noise_multiplier=sigma, ledger=ledger)
    # The noise's std from six releases (4,740 draws): its estimate is then within ~1% (one release's 790 draws give
    # ~2.5%, and a 6% tolerance on one of them failed about once in fifty), so noise shrunk by 6% still fails.
    more = [release_semantic_histogram(net=net, data=data, num_public=pool.num_classes, query=q,
                                       noise_multiplier=sigma, ledger=None) for _ in range(5)]
    residual = np.concatenate([noisy - clean, *(m - clean for m in more)])
    assert np.std(residual) == pytest.approx(sigma * math.sqrt(top_k), rel=0.06)
    assert [(m.name, m.noise_multiplier, m.sample_rate, m.steps) for m in ledger.mechanisms] == \
        [("semantic-query", sigma, 1.0, 1)]
    torch.manual_seed(0)  # the public seed does not govern the noise: OS entropy, fresh at every release
    again = release_semantic_histogram(net=net, data=data, num_public=pool.num_classes, query=q,
                                       noise_multiplier=sigma, ledger=None)
    assert not np.allclose(again, noisy)


def test_every_label_gets_its_own_classes_strongest_counts_first():
    hist = np.array([[5.0, 1.0, 0.0, 3.0], [0.0, 2.0, 9.0, 4.0], [1.0, 0.0, 8.0, 0.0]])
    # Class 2 stands for label 1, where its count is highest; label 2, whose top class it also is, takes its best
    # class left (no label is left without pretraining data).
    assert choose_public_classes(hist, 1) == {0: 0, 1: 2, 2: 1}
    # Two a label until the pool runs out: label 2 gets none of the four classes the others hold more strongly.
    assert choose_public_classes(hist, 2) == {0: 0, 1: 0, 2: 1, 3: 1}
    # The choice depends on the histogram's order alone: shifting every count keeps it.
    assert choose_public_classes(hist + 100.0, 1) == choose_public_classes(hist, 1)


def test_semantic_pretraining_stage_is_recorded_first_and_cached(tmp_path, tiny_model_dir, mnist_small_npz,
                                                                 shared_cache):
    out = tmp_path / "run"
    args = ["train", "--base-model", tiny_model_dir, "--data", mnist_small_npz, "--epsilon", 10,
            "--public-selection", "semantic", "--pretrain-steps", 2, "--semantic-classifier-steps", CLASSIFIER_STEPS,
            "--steps", 2, "--batch-size", 16, "--warmup", "none", "--out", out]
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    priv = json.loads((out / "privacy.json").read_text())
    assert [m["name"] for m in priv["mechanisms"]] == ["semantic-query", "saliency-query", "dp-sgd"]
    assert priv["epsilon_spent"] <= 10.0
    record = json.loads((out / "semantic_query.json").read_text())
    hist = np.asarray(record["histogram"])
    chosen = choose_public_classes(hist, record["per_label"])  # the choice is a function of the noisy histogram
    assert [c["index"] for c in record["chosen"]] == list(chosen)
    assert record["sensitivity"] == 1.0 and record["noise_multiplier"] == priv["mechanisms"][0]["noise_multiplier"]
    assert not (out / "adapter").exists()  # LoRA on a pretrained model fits that model only
    cached = list((shared_cache / "pretrained").iterdir())
    assert len(cached) == 1
    # The same choice again is read from the cache, not pretrained twice.
    from sapf.engine.model import load_generator
    from sapf.engine.semantic import pretrained_on_choice

    stamp = (cached[0] / "unet" / "config.json").stat().st_mtime_ns
    pool = load_dataset("public-pool", 16, 1)
    pretrained_on_choice(pool, chosen, 10, load_generator(tiny_model_dir), steps=2, seed=0, show_progress=False)
    assert (cached[0] / "unet" / "config.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_federated_semantic_query_pretrains_on_the_sites_noisy_histograms(tmp_path, tiny_model_dir, mnist_small_npz):
    """Two Flower sites each release a recorded noisy histogram; the server combines them, pretrains on the chosen
    classes and sends that base with every later request; each site's ledger is exactly the plan's."""
    from sapf.federation.simulation import federate
    from sapf.federation.task import FederationConfig, recompute_epsilon

    out = tmp_path / "fed"
    cfg = FederationConfig(data=str(mnist_small_npz), num_sites=2, base_model=str(tiny_model_dir), rounds=1,
                           local_steps=1, batch_size=16, min_clients=2, out=str(out), warmup="none",
                           selection="attention", public_selection="semantic", pretrain_steps=2,
                           semantic_classifier_steps=CLASSIFIER_STEPS, onnx=False)
    assert federate(cfg)["status"] == "completed"
    record = json.loads((out / "semantic_query.json").read_text())
    assert record["sites"] == 2 and record["chosen"]
    assert [c["index"] for c in record["chosen"]] == list(choose_public_classes(np.asarray(record["histogram"]), 1))
    assert (out / "checkpoint" / "pretrained" / "unet" / "config.json").exists() and not (out / "adapter").exists()
    reports = sorted((out / "privacy").glob("*.json"))
    assert len(reports) == 2
    for path in reports:
        report = json.loads(path.read_text())
        assert [m["name"] for m in report["mechanisms"]] == ["semantic-query", "dp-sgd"]
        assert 9.0 <= recompute_epsilon(report) <= 10.0
