"""DP-FETA's central images: a bounded, noised, recorded release, and the warm-up stage that uses it —
centrally (`sapf train --warmup central-images`) and at a site (the real ClientApp, real Flower messages)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import tiny_generator
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from sapf.cli import app
from sapf.config import FederationConfig
from sapf.engine.central_images import (
    central_image_contributions,
    central_images,
    contribution_bound,
    image_bound,
    release_central_images,
)
from sapf.engine.data import load_dataset
from sapf.engine.finetune import make_trainable, trainable_state
from sapf.engine.model import load_generator
from sapf.engine.privacy import Mechanism, PrivacyLedger
from sapf.engine.saliency import candidate_modules
from sapf.federation import client_app as site
from sapf.federation.task import base_to_wire


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("mnist5k", 16, 1).subset(np.arange(0, 5000, 50))  # 100 real digits


def test_one_added_record_moves_the_noiseless_sum_by_at_most_the_bound(digits16):
    bound = image_bound(load_dataset("digits", 16, 1))
    assert 1.0 < bound < 8.0  # near the images' real norm (√64 = 8 would be the pixel-range maximum)
    without = digits16.subset(np.arange(99))

    def noiseless(data):
        return release_central_images(data=data, num_classes=10, bound=bound, noise_multiplier=0.0, sample_rate=1.0,
                                      queries=1, ledger=None)

    step = noiseless(digits16) - noiseless(without)
    delta = contribution_bound(bound)
    assert np.linalg.norm(step) <= delta + 1e-9
    # A record brighter than the bound is clipped to it: the step is then exactly Δ (image at B, count 1).
    bright = digits16.subset([99])
    bright.images = np.ones_like(bright.images)
    contributions, dim = central_image_contributions(bright, 10, bound)
    row = contributions(np.array([0]))[0].numpy()
    assert row.shape == (dim,) and np.linalg.norm(row) == pytest.approx(delta, rel=1e-9)
    assert row[-10:].sum() == 1.0 and row[-10 + int(bright.labels[0])] == 1.0  # its class's count


def test_the_release_has_the_planned_noise_and_is_recorded(digits16):
    bound, sigma = 3.0, 2.0
    ledger = PrivacyLedger(10.0, 1e-5)
    zero = release_central_images(data=digits16, num_classes=10, bound=bound, noise_multiplier=0.0, sample_rate=1.0,
                                  queries=1, ledger=None)
    noisy = release_central_images(data=digits16, num_classes=10, bound=bound, noise_multiplier=sigma,
                                   sample_rate=1.0, queries=3, ledger=ledger)
    # Three queries: the sums add, so the noise has std √3·σΔ around three times the noiseless sum.
    residual = noisy - 3 * zero
    assert np.std(residual) == pytest.approx(math.sqrt(3) * sigma * contribution_bound(bound), rel=0.1)
    assert ledger.mechanisms == [Mechanism("central-images", sigma, 1.0, 3)]
    images = central_images(noisy, 10, 1, 16)
    assert images.shape == (10, 1, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_central_training_with_the_warm_up_records_every_stage(tmp_path, tiny_model_dir, mnist_small_npz):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, [str(a) for a in (
        "train", "--base-model", tiny_model_dir, "--data", mnist_small_npz, "--epsilon", 10, "--warmup",
        "central-images", "--warmup-budget", 0.1, "--warmup-steps", 3, "--steps", 2, "--batch-size", 16,
        "--out", out)])
    assert r.exit_code == 0, r.output
    priv = json.loads((out / "privacy.json").read_text())
    assert [m["name"] for m in priv["mechanisms"]] == ["central-images", "saliency-query", "dp-sgd"]
    assert 9.5 <= priv["epsilon_spent"] <= 10.0
    central_only = PrivacyLedger(10.0, priv["delta"], mechanisms=[Mechanism(**priv["mechanisms"][0])])
    assert central_only.epsilon() == pytest.approx(1.0, rel=0.02)  # its share of ε
    assert (out / "central_images.png").exists() and not (out / "adapter").exists()
    stages = [s["name"] for s in json.loads((out / "config.json").read_text())["stages"]]
    assert stages == ["warmup", "select", "finetune"]
    assert "central-images" in (out / "README.md").read_text()


@pytest.fixture
def flower_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def _ctx(node_config):
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_a_site_releases_central_images_and_then_needs_the_warmed_base(tmp_path, tiny_model_dir, mnist_small_npz,
                                                                       flower_identity):
    cfg = FederationConfig(data=str(mnist_small_npz), num_sites=2, base_model=str(tiny_model_dir), rounds=2,
                           local_steps=1, batch_size=16, warmup="central-images", out=str(tmp_path / "run"))
    node = {"partition-id": 0, "num-partitions": 2}
    q = Message(RecordDict({"config": ConfigRecord(cfg.to_record())}), dst_node_id=1,
                message_type="query.central_images")
    reply = site.app(q, _ctx(node))
    assert not reply.has_error(), reply.error.reason
    assert set(reply.content.keys()) == {"sums", "metrics", "privacy"}
    assert set(reply.content["metrics"]) == {"examples", "epsilon", "noise_multiplier"}
    sums = reply.content["sums"]["sums"].numpy()
    assert sums.shape == (10 * (8 * 8 + 1),) and np.isfinite(sums).all()
    ledger = PrivacyLedger.load(tmp_path / "run" / "private" / "sites" / "site-0" / "ledger.json")
    assert [m.name for m in ledger.mechanisms] == ["central-images"]
    assert ledger.mechanisms[0].noise_multiplier == reply.content["metrics"]["noise_multiplier"] > 0

    gen = load_generator(tiny_model_dir)
    warmed = tiny_generator(seed=5)  # stands for the server's warmed model: other weights, same shapes
    names = candidate_modules(gen.unet, cfg.candidates)[:2]
    state = trainable_state(make_trainable(gen, "saliency", names))

    def train(**base):
        config = ConfigRecord({**cfg.to_record(), "selected": names, "round": 1})
        msg = Message(RecordDict({"config": config, "adapter": ArrayRecord(torch_state_dict=state), **base}),
                      dst_node_id=1, message_type="train")
        return site.app(msg, _ctx(node))

    refused = train()
    assert refused.has_error() and "warmed base" in refused.error.reason
    huge = {k: v * 1e4 for k, v in trainable_state(warmed.unet).items()}
    refused = train(base=ArrayRecord(torch_state_dict=huge))
    assert refused.has_error() and "norm" in refused.error.reason
    reply = train(base=base_to_wire(warmed.unet))
    assert not reply.has_error(), reply.error.reason
    ledger = PrivacyLedger.load(tmp_path / "run" / "private" / "sites" / "site-0" / "ledger.json")
    assert [m.name for m in ledger.mechanisms] == ["central-images", "dp-sgd"]
