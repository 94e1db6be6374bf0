"""SPARTA: the row mask comes only from the released noisy scores, and only the chosen rows change."""

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from typer.testing import CliRunner

from sapf.cli import app
from sapf.engine.model import load_generator
from sapf.engine.sparta import make_row_trainable, mask_grad_samples, mask_grads, top_rows


def test_sparta_trains_only_the_rows_its_noisy_scores_chose(tmp_path, tiny_model_dir, mnist_small_npz):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, [str(a) for a in (
        "train", "--base-model", tiny_model_dir, "--data", mnist_small_npz, "--epsilon", 10, "--selection", "sparta",
        "--mask-steps", 2, "--steps", 3, "--batch-size", 16, "--warmup", "none", "--out", out)])
    assert r.exit_code == 0, r.output
    priv = json.loads((out / "privacy.json").read_text())
    mech = [(m["name"], m["steps"]) for m in priv["mechanisms"]]
    assert mech[0][0] == "sparta-mask" and sum(s for n, s in mech if n == "sparta-mask") == 2  # recorded, accounted
    assert mech[-1] == ("dp-sgd", 3) and 0 < priv["epsilon_spent"] <= 10.0
    sel = json.loads((out / "selection.json").read_text())
    scores = {n: np.asarray(s) for n, s in sel["extra"]["row_scores"].items()}
    rows = sel["extra"]["rows"]
    assert rows == top_rows(scores, 0.2)  # the mask is a function of the released noisy scores alone
    _only_chosen_rows_moved(out, tiny_model_dir, rows)


def _only_chosen_rows_moved(out, tiny_model_dir, rows: dict[str, list[int]]) -> None:
    """The run's merged model differs from the base only in the chosen rows, and most chosen matrices moved."""
    assert not (out / "adapter").exists()
    base = dict(load_generator(tiny_model_dir).unet.named_parameters())
    merged = dict(UNet2DModel.from_pretrained(out / "model" / "unet").named_parameters())
    moved = 0
    for name, p in merged.items():
        module = name.rsplit(".", 1)[0]
        keep = torch.ones(p.shape[0], dtype=torch.bool)
        if name.endswith(".weight") and module in rows:
            keep[rows[module]] = False
            moved += int((p[~keep] != base[name][~keep]).any())
        assert torch.equal(p[keep], base[name][keep]), name  # frozen rows, biases, norms, unchosen matrices
    assert moved > len(rows) // 2  # the chosen rows did train


def test_row_masks_zero_frozen_rows_of_per_sample_and_noisy_gradients(tiny_model_dir):
    gen = load_generator(tiny_model_dir)
    name = next(n for n, m in gen.unet.named_modules() if isinstance(m, torch.nn.Conv2d))
    model = make_row_trainable(gen, {name: [0, 2]})
    w = dict(model.named_modules())[name].weight
    assert [p for p in model.parameters() if p.requires_grad] == [w]
    w.grad_sample = torch.randn(5, *w.shape)
    w.grad = torch.randn(w.shape)
    before = w.grad_sample.clone()
    mask_grad_samples([w])
    mask_grads([w])
    frozen = [i for i in range(w.shape[0]) if i not in (0, 2)]
    assert (w.grad_sample[:, frozen] == 0).all() and (w.grad[frozen] == 0).all()
    assert torch.equal(w.grad_sample[:, [0, 2]], before[:, [0, 2]]) and (w.grad[[0, 2]] != 0).all()


def test_the_mask_release_adds_noise_of_std_sigma_times_clip_and_records_every_step(tiny_model_dir, mnist_small_npz):
    """With a huge σ the row scores are sums of |noise|: per coordinate and step their mean is σ·C·√(2/π). Noise
    shrunk, or a bound smaller than the clip, fails this; so does a step left out of the ledger."""
    import math

    import pytest

    from sapf.engine.data import load_dataset
    from sapf.engine.privacy import PrivacyLedger
    from sapf.engine.sparta import MaskQuery, noisy_row_scores

    gen = load_generator(tiny_model_dir)
    data = load_dataset(str(mnist_small_npz), gen.image_size, gen.channels)
    q = MaskQuery(candidates="all", clip=0.01, sample_rate=0.5, steps=2, row_fraction=0.2)
    ledger = PrivacyLedger(10.0, 1e-5, "rdp")
    sigma = 1e4
    scores = noisy_row_scores(gen, data, q, sigma, ledger, show_progress=False)
    modules = dict(gen.unet.named_modules())
    coordinates = sum(modules[n].weight.numel() for n in scores)
    mean_abs = sum(float(s.sum()) for s in scores.values()) / (coordinates * q.steps)
    assert mean_abs == pytest.approx(sigma * q.clip * math.sqrt(2 / math.pi), rel=0.02)
    assert sum(m.steps for m in ledger.mechanisms) == q.steps
    assert {(m.name, m.noise_multiplier, m.sample_rate) for m in ledger.mechanisms} == {("sparta-mask", sigma, 0.5)}


def _site_call(message_type, cfg, node, **content):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from sapf.federation import client_app

    rec = RecordDict({"config": ConfigRecord(cfg.to_record() | content.pop("config", {})), **content})
    ctx = Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})
    return client_app.app(Message(rec, dst_node_id=1, message_type=message_type), ctx)


def test_a_site_releases_recorded_row_scores_and_trains_only_a_valid_mask(tmp_path, tiny_model_dir, mnist_small_npz,
                                                                         flower_identity):
    """Federated SPARTA at one site: the row-score query is recorded (mask_steps steps) before it runs and its reply
    is the noisy score vector; a training request must carry exactly the plan's share of rows of every candidate,
    and only those rows come back changed."""
    from flwr.app import ArrayRecord

    from sapf.engine.finetune import make_trainable, trainable_state
    from sapf.engine.privacy import PrivacyLedger
    from sapf.engine.sparta import row_counts, rows_per_matrix
    from sapf.federation.task import FederationConfig, from_wire

    cfg = FederationConfig(data=str(mnist_small_npz), num_sites=2, base_model=str(tiny_model_dir), rounds=1,
                           local_steps=2, batch_size=16, min_clients=2, out=str(tmp_path / "run"), warmup="none",
                           selection="sparta", mask_steps=3)
    node = {"partition-id": 0, "num-partitions": 2}
    gen = load_generator(tiny_model_dir)
    counts = row_counts(gen, cfg.candidates)
    reply = _site_call("query.sparta_mask", cfg, node)
    assert not reply.has_error(), reply.error.reason
    scores = reply.content["scores"]["scores"].numpy()
    assert scores.shape == (sum(counts.values()),) and (scores > 0).all()
    ledger_path = tmp_path / "run" / "private" / "sites" / "site-0" / "ledger.json"
    [m] = PrivacyLedger.load(ledger_path).mechanisms
    assert (m.name, m.steps, m.sample_rate) == ("sparta-mask", 3, cfg.mask_sample_rate) and m.noise_multiplier > 0
    assert reply.content["metrics"]["noise_multiplier"] == m.noise_multiplier

    rows = {n: list(range(rows_per_matrix(c, cfg.row_fraction))) for n, c in counts.items()}
    model = make_trainable(gen, "sparta", list(counts), rows=rows)
    state = trainable_state(model)
    adapter = ArrayRecord(torch_state_dict=state)
    first = next(iter(counts))
    too_many = {**rows, first: rows[first] + [counts[first] - 1]}
    unknown = {**{n: r for n, r in rows.items() if n != first}, "conv_in.nonexistent": [0]}
    for bad in (None, "{", json.dumps(too_many), json.dumps(unknown), json.dumps({**rows, first: [counts[first]]}),
                json.dumps({**rows, first: [True] * len(rows[first])})):
        extra = {} if bad is None else {"rows": bad}
        refused = _site_call("train", cfg, node, config={"round": 1, **extra}, adapter=adapter)
        assert refused.has_error() and "refused" in refused.error.reason, bad
    assert len(PrivacyLedger.load(ledger_path).mechanisms) == 1  # a refused request spends nothing

    reply = _site_call("train", cfg, node, config={"round": 1, "rows": json.dumps(rows)}, adapter=adapter)
    assert not reply.has_error(), reply.error.reason
    update = from_wire(reply.content["adapter"])
    assert set(update) == set(state)
    moved = 0
    for k, v in update.items():
        module = k.rsplit(".", 1)[0]
        frozen = torch.ones(v.shape[0], dtype=torch.bool)
        frozen[rows[module]] = False
        assert torch.equal(v[frozen], state[k][frozen].half().float()), k  # as sent (float16 on the wire)
        moved += int((v[~frozen] != state[k][~frozen].half().float()).any())
    assert moved > len(rows) // 2
    assert [m.name for m in PrivacyLedger.load(ledger_path).mechanisms] == ["sparta-mask", "dp-sgd"]


@pytest.mark.slow
def test_federated_sparta_masks_from_the_sites_noisy_scores(tmp_path, tiny_model_dir, mnist_small_npz):
    """Two Flower sites: each releases its recorded row scores, the server combines them and sends the mask;
    the merged model differs from the base only in the chosen rows."""
    from sapf.federation.simulation import federate
    from sapf.federation.task import FederationConfig, recompute_epsilon

    out = tmp_path / "fed"
    cfg = FederationConfig(data=str(mnist_small_npz), num_sites=2, base_model=str(tiny_model_dir), rounds=2,
                           local_steps=2, batch_size=16, min_clients=2, out=str(out), warmup="none",
                           selection="sparta", mask_steps=2)
    assert federate(cfg)["status"] == "completed"
    sel = json.loads((out / "selection.json").read_text())
    assert sel["strategy"] == "sparta" and sel["sites"] == 2
    rows = sel["rows"]
    assert rows == top_rows({n: np.asarray(s) for n, s in sel["row_scores"].items()}, cfg.row_fraction)
    for path in sorted((out / "privacy").glob("*.json")):
        report = json.loads(path.read_text())
        assert [(m["name"], m["steps"]) for m in report["mechanisms"]] == [("sparta-mask", 2), ("dp-sgd", 4)]
        assert 9.0 <= recompute_epsilon(report) <= 10.0
    _only_chosen_rows_moved(out, tiny_model_dir, rows)
