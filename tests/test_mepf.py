"""DP-MEPF: the mean-embedding release is bounded, noised and recorded; a tiny run trains, exports and samples."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sapf.cli import app
from sapf.engine.data import load_dataset
from sapf.engine.mepf import (
    BOUND,
    embedding_contributions,
    mean_embeddings,
    release_mean_embeddings,
    train_feature_net,
)
from sapf.engine.privacy import PrivacyLedger


@pytest.fixture(scope="module")
def small(mnist_small_npz):
    data = load_dataset(str(mnist_small_npz), 16, 1)
    net = train_feature_net(load_dataset("digits", 16, 1), steps=20, seed=0)
    return data, net


def test_one_record_moves_the_embedding_sums_by_at_most_sqrt2(small):
    data, net = small
    contributions, dim = embedding_contributions(net, data, 10)
    rows = contributions(np.arange(len(data)))
    assert rows.shape == (len(data), dim)
    norms = rows.norm(dim=1)
    assert (norms <= BOUND * (1 + 1e-6)).all() and norms.max() > 0.99 * BOUND  # unit features (float32) and a 1
    assert BOUND == pytest.approx(math.sqrt(2))
    # The noiseless release with and without the last record differs by that record's row: at most Δ.
    without = data.subset(np.arange(len(data) - 1), "without")
    a = release_mean_embeddings(net=net, data=data, num_classes=10, noise_multiplier=0.0, ledger=None)
    b = release_mean_embeddings(net=net, data=without, num_classes=10, noise_multiplier=0.0, ledger=None)
    assert 0 < np.linalg.norm(a - b) <= BOUND + 1e-9
    means, counts = mean_embeddings(a, 10)
    assert counts.sum() == pytest.approx(len(data)) and np.allclose(np.linalg.norm(means, axis=1), 1.0, atol=0.5)


def test_the_release_adds_noise_of_std_sigma_times_sqrt2_and_is_recorded(small):
    """Noise shrunk, a bound below √2 or an unrecorded release fails this."""
    data, net = small
    clean = release_mean_embeddings(net=net, data=data, num_classes=10, noise_multiplier=0.0, ledger=None)
    ledger = PrivacyLedger(10.0, 1e-5, "rdp")
    sigma = 3.0
    noisy = release_mean_embeddings(net=net, data=data, num_classes=10, noise_multiplier=sigma, ledger=ledger)
    assert np.std(noisy - clean) == pytest.approx(sigma * math.sqrt(2), rel=0.05)
    assert [(m.name, m.noise_multiplier, m.sample_rate, m.steps) for m in ledger.mechanisms] == \
        [("mean-embeddings", sigma, 1.0, 1)]
    again = release_mean_embeddings(net=net, data=data, num_classes=10, noise_multiplier=sigma, ledger=None)
    assert not np.allclose(again, noisy)  # fresh noise every release


def test_dp_mepf_trains_exports_and_samples_alike_in_torch_and_onnx(tmp_path, tiny_model_dir, mnist_small_npz):
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    run = tmp_path / "run"
    r = CliRunner().invoke(app, [str(a) for a in (
        "train", "--method", "dp-mepf", "--base-model", tiny_model_dir, "--data", mnist_small_npz, "--epsilon", 2,
        "--generator-steps", 3, "--out", run)])
    assert r.exit_code == 0, r.output
    for f in ("model/config.json", "feature_net.safetensors", "mean_embeddings.npz", "grid.png", "README.md",
              "config.json", "metrics.json"):
        assert (run / f).exists(), f
    # Everything shared is the release or computed from it; the run's time (a pass over the private data) is not.
    assert json.loads((run / "private" / "training.json").read_text()).keys() == {"wall_time_s"}
    assert "wall_time_s" not in json.loads((run / "metrics.json").read_text())
    priv = json.loads((run / "privacy.json").read_text())
    [m] = priv["mechanisms"]
    assert (m["name"], m["sample_rate"], m["steps"]) == ("mean-embeddings", 1.0, 1) and m["noise_multiplier"] > 0
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_event.GaussianDpEvent(m["noise_multiplier"]))
    assert acc.get_epsilon(priv["delta"]) <= priv["epsilon_spent"] * 1.01 and priv["epsilon_spent"] <= 2.0
    assert "DP-MEPF" in (run / "README.md").read_text()

    onnx_file = tmp_path / "gen.onnx"
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(onnx_file)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "gen.onnx.json").read_text())["kind"] == "generator"
    for how, src in (("torch", ["--model", str(run)]), ("onnx", ["--onnx", str(onnx_file)])):
        r = CliRunner().invoke(app, ["sample", *src, "--num", "20", "--seed", "3", "--out", str(tmp_path / how)])
        assert r.exit_code == 0, r.output
    a, b = (np.load(tmp_path / how / "samples.npz") for how in ("torch", "onnx"))
    assert np.array_equal(a["labels"], b["labels"]) and a["images"].shape == (20, 16, 16)
    assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1
    assert torch.from_numpy(a["images"]).float().std() > 0  # not a blank image


def test_the_release_has_the_public_models_classes_whatever_labels_the_data_holds(tmp_path, tiny_model_dir,
                                                                                  mnist_small_npz):
    """An .npz's classes are its largest label + 1: a release sized by them would change shape when the one record
    of the top label leaves. Sized by the base model's classes, neighbouring datasets give releases alike."""
    d = np.load(mnist_small_npz)
    keep = np.flatnonzero(d["labels"] != 9)
    keep = np.append(keep, np.flatnonzero(d["labels"] == 9)[:1])  # a single 9
    shapes = {}
    for name, idx in (("with", keep), ("without", keep[:-1])):  # neighbours: the single 9 removed
        npz = tmp_path / f"{name}.npz"
        np.savez(npz, images=d["images"][idx], labels=d["labels"][idx])
        run = tmp_path / name
        r = CliRunner().invoke(app, [str(a) for a in (
            "train", "--method", "dp-mepf", "--base-model", tiny_model_dir, "--data", npz, "--epsilon", 2,
            "--generator-steps", 1, "--holdout", 0, "--out", run)])
        assert r.exit_code == 0, r.output
        shapes[name] = np.load(run / "mean_embeddings.npz")["sums"].shape
        assert json.loads((run / "model" / "config.json").read_text())["num_classes"] == 10
    assert shapes["with"] == shapes["without"]


def _site_call(message_type, cfg, node, **content):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from sapf.federation import client_app

    rec = RecordDict({"config": ConfigRecord(cfg.to_record()), **content})
    ctx = Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})
    return client_app.app(Message(rec, dst_node_id=1, message_type=message_type), ctx)


def _mepf_plan(tiny_model_dir, npz, out, **kw):
    from sapf.federation.task import FederationConfig

    return FederationConfig(**{**dict(data=str(npz), num_sites=2, base_model=str(tiny_model_dir), min_clients=2,
                                      out=str(out), method="dp-mepf", generator_steps=3), **kw})


def test_a_site_checks_the_feature_network_and_records_its_one_release(tmp_path, tiny_model_dir, mnist_small_npz,
                                                                        flower_identity, small):
    from flwr.app import ArrayRecord

    from sapf.federation.task import base_to_wire

    _, net = small
    cfg = _mepf_plan(tiny_model_dir, mnist_small_npz, tmp_path / "run")
    node = {"partition-id": 0, "num-partitions": 2}
    ledger_path = tmp_path / "run" / "private" / "sites" / "site-0" / "ledger.json"
    wrong = {k: v[..., :1] if v.dim() > 1 else v for k, v in net.state_dict().items()}
    huge = {k: v * 1e6 for k, v in net.state_dict().items()}
    for content in ({}, {"features": ArrayRecord(torch_state_dict=wrong)},
                    {"features": ArrayRecord(torch_state_dict=huge)}):
        reply = _site_call("query.mean_embeddings", cfg, node, **content)
        assert reply.has_error() and "refused" in reply.error.reason
    assert not ledger_path.exists()  # nothing spent on a refused request
    reply = _site_call("query.mean_embeddings", cfg, node, features=base_to_wire(net))
    assert not reply.has_error(), reply.error.reason
    [m] = PrivacyLedger.load(ledger_path).mechanisms
    assert (m.name, m.sample_rate, m.steps) == ("mean-embeddings", 1.0, 1)
    assert reply.content["metrics"]["noise_multiplier"] == m.noise_multiplier > 0
    sums = reply.content["sums"]["sums"].numpy()
    assert sums.shape[0] % 10 == 0 and set(reply.content.keys()) == {"sums", "metrics", "privacy"}
    # A dp-mepf plan trains nothing at a site. The same request again gets the same release back, free; the spent
    # budget refuses a second release (another feature network).
    assert _site_call("train", cfg, node).has_error()
    again = _site_call("query.mean_embeddings", cfg, node, features=base_to_wire(net))
    assert not again.has_error(), again.error.reason
    np.testing.assert_array_equal(again.content["sums"]["sums"].numpy(), sums)
    other = {k: v + 1e-3 for k, v in net.state_dict().items()}
    second = _site_call("query.mean_embeddings", cfg, node, features=ArrayRecord(torch_state_dict=other))
    assert second.has_error() and "past its limit" in second.error.reason
    assert len(PrivacyLedger.load(ledger_path).mechanisms) == 1


@pytest.mark.slow
def test_federated_dp_mepf_one_round_of_noisy_feature_sums(tmp_path, tiny_model_dir, mnist_small_npz):
    from sapf.federation.simulation import federate
    from sapf.federation.task import recompute_epsilon

    out = tmp_path / "fed"
    status = federate(_mepf_plan(tiny_model_dir, mnist_small_npz, out))
    assert status["status"] == "completed"
    for f in ("model/config.json", "model.onnx", "grid.png", "README.md", "feature_net.safetensors",
              "checkpoint/mean_embeddings.npz"):
        assert (out / f).exists(), f
    assert json.loads((out / "model.onnx.json").read_text())["kind"] == "generator"
    reports = sorted((out / "privacy").glob("*.json"))
    assert len(reports) == 2
    for path in reports:
        report = json.loads(path.read_text())
        assert [(m["name"], m["steps"]) for m in report["mechanisms"]] == [("mean-embeddings", 1)]
        assert 9.9 <= recompute_epsilon(report) <= 10.0


def test_central_training_warms_up_on_samples_of_a_mean_embedding_generator(tmp_path, tiny_model_dir,
                                                                            mnist_small_npz):
    """`--warmup mean-embeddings`: DP-MEPF's release spends its share of ε, recorded first; every weight of the
    model moves in the warm-up on the generator's samples; DP-SAPF's stages follow on the warmed model."""
    from sapf.engine.model import load_generator
    from sapf.engine.privacy import Mechanism

    run = tmp_path / "run"
    r = CliRunner().invoke(app, [str(a) for a in (
        "train", "--base-model", tiny_model_dir, "--data", mnist_small_npz, "--epsilon", 10, "--warmup",
        "mean-embeddings", "--warmup-budget", 0.1, "--warmup-steps", 3, "--warmup-generator-steps", 3, "--steps", 2,
        "--batch-size", 16, "--out", run)])
    assert r.exit_code == 0, r.output
    priv = json.loads((run / "privacy.json").read_text())
    assert [m["name"] for m in priv["mechanisms"]] == ["mean-embeddings", "saliency-query", "dp-sgd"]
    assert 9.5 <= priv["epsilon_spent"] <= 10.0
    release_only = PrivacyLedger(10.0, priv["delta"], mechanisms=[Mechanism(**priv["mechanisms"][0])])
    assert release_only.epsilon() == pytest.approx(1.0, rel=0.02)  # its share of ε
    assert (run / "warmup_samples.png").exists() and not (run / "adapter").exists()
    assert [s["name"] for s in json.loads((run / "config.json").read_text())["stages"]] == ["warmup", "select",
                                                                                             "finetune"]
    base, tuned = load_generator(tiny_model_dir).unet.state_dict(), load_generator(run).unet.state_dict()
    moved = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(moved) == len(base)  # the warm-up trains every weight, not only the selected matrices
    assert "mean embeddings" in (run / "README.md").read_text()


def test_a_site_answers_the_warm_up_query_within_its_whole_plan(tmp_path, tiny_model_dir, mnist_small_npz,
                                                                 flower_identity, small):
    """A diffusion plan with the mean-embedding warm-up: the site checks the whole run's budget up front, records
    the release at the warm-up's σ, refuses a second one, and afterwards needs the server's warmed base."""
    from flwr.app import ArrayRecord

    from sapf.federation.task import base_to_wire, plan_site

    _, net = small
    cfg = _mepf_plan(tiny_model_dir, mnist_small_npz, tmp_path / "run", method="diffusion",
                     warmup="mean-embeddings", selection="attention", rounds=2, local_steps=1, batch_size=16)
    node = {"partition-id": 0, "num-partitions": 2}
    ledger_path = tmp_path / "run" / "private" / "sites" / "site-0" / "ledger.json"
    reply = _site_call("query.mean_embeddings", cfg, node, features=base_to_wire(net))
    assert not reply.has_error(), reply.error.reason
    [m] = PrivacyLedger.load(ledger_path).mechanisms
    assert (m.name, m.sample_rate, m.steps) == ("mean-embeddings", 1.0, 1)
    assert reply.content["metrics"]["noise_multiplier"] == m.noise_multiplier
    ledger = PrivacyLedger(10.0, PrivacyLedger.load(ledger_path).delta, mechanisms=[m])
    assert ledger.epsilon() == pytest.approx(10.0 * cfg.warmup_budget, rel=0.02)  # the warm-up's share, not all of ε
    assert m.noise_multiplier == plan_site(cfg, reply.content["metrics"]["examples"]).embedding_noise
    other = {k: v + 1e-3 for k, v in net.state_dict().items()}  # another network: a second release
    again = _site_call("query.mean_embeddings", cfg, node, features=ArrayRecord(torch_state_dict=other))
    assert again.has_error() and "past its limit" in again.error.reason
    refused = _site_call("train", cfg, node)
    assert refused.has_error() and "warmed base" in refused.error.reason
    assert len(PrivacyLedger.load(ledger_path).mechanisms) == 1


def test_the_public_feature_network_is_cached_by_its_public_inputs(tmp_path, monkeypatch):
    """Trained once per (public images, labels, seed, steps) and read back after: the same weights, and another seed
    trains another network (nothing private goes into the cache key or the cache)."""
    from sapf.engine.mepf import public_feature_net

    monkeypatch.setenv("SAPF_CACHE", str(tmp_path))
    public = load_dataset("digits", 16, 1)
    first = public_feature_net(public, seed=0, steps=5)
    [cached] = list((tmp_path / "classifiers").glob("*.safetensors"))
    again = public_feature_net(public, seed=0, steps=5)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    other = public_feature_net(public, seed=1, steps=5)
    assert len(list((tmp_path / "classifiers").glob("*.safetensors"))) == 2 and cached.exists()
    assert not torch.equal(first.conv1.weight, other.conv1.weight)
