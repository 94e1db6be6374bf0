"""Federation with real Flower: handlers called with real Messages, and simulations on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from sapf.engine.finetune import make_trainable, trainable_state
from sapf.engine.model import load_generator
from sapf.engine.privacy import PrivacyLedger
from sapf.engine.saliency import candidate_modules
from sapf.errors import SapfError
from sapf.federation import client_app as site
from sapf.federation.combine import UPDATE_NORM_FACTOR, combine_noisy_sums, combine_updates
from sapf.federation.simulation import federate
from sapf.federation.task import FederationConfig, from_wire, recompute_epsilon, validate_update


def _cfg(tiny_model_dir, npz, out, **kw):
    # No ONNX export (~20 s a run here): the deployment tests and the federated DP-MEPF run check model.onnx.
    base = dict(data=str(npz), num_sites=2, base_model=str(tiny_model_dir), rounds=2, local_steps=2, batch_size=16,
                multiplicity=2, min_clients=2, out=str(out), warmup="none", onnx=False)
    return FederationConfig(**{**base, **kw})


def _ctx(node_config):
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


PUBLIC_SCALARS = {"scores": {"examples", "epsilon", "noise_multiplier"}, "adapter": {"examples", "epsilon"}}


def _check_only_dp_outputs_and_scalars(reply: Message, arrays: set[str]):
    """A reply carries exactly its noisy arrays, the declared-public scalars and the ε history."""
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    kind = "scores" if "scores" in reply.content else "adapter"
    assert set(reply.content.keys()) == {kind, "metrics", "privacy"}
    assert isinstance(reply.content[kind], ArrayRecord) and set(reply.content[kind].keys()) == arrays
    metrics = reply.content["metrics"]
    assert isinstance(metrics, MetricRecord) and set(metrics) == PUBLIC_SCALARS[kind]  # no loss, no timing
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    rec = reply.content["privacy"]
    assert isinstance(rec, ConfigRecord) and set(rec.keys()) == {"report"}  # no site name (a hash of its data path)
    report = json.loads(rec["report"])  # the ε history: mechanism parameters, no data, not the site's max-epsilon
    assert set(report) - {"training_round"} == {"delta", "accountant", "mechanisms"}
    if "training_round" in report:  # the plan's DP-SGD rate a round: public, as σ is
        assert set(report["training_round"]) == {"noise_multiplier", "sample_rate", "steps"}
    assert all(set(m) == {"name", "noise_multiplier", "sample_rate", "steps"} for m in report["mechanisms"])


def test_client_handlers_reply_only_noisy_outputs_and_scalars(tmp_path, tiny_model_dir, mnist_small_npz,
                                                              flower_identity):
    cfg = _cfg(tiny_model_dir, mnist_small_npz, tmp_path / "run")
    node = {"partition-id": 0, "num-partitions": 2}
    q = Message(RecordDict({"config": ConfigRecord(cfg.to_record())}), dst_node_id=1, message_type="query.saliency")
    reply = site.app(q, _ctx(node))
    _check_only_dp_outputs_and_scalars(reply, {"scores"})
    names = candidate_modules(load_generator(tiny_model_dir).unet, cfg.candidates)
    assert reply.content["scores"]["scores"].numpy().shape == (len(names),)
    ledger = PrivacyLedger.load(tmp_path / "run" / "private" / "sites" / "site-0" / "ledger.json")
    assert ledger.mechanisms[0].name == "saliency-query" and ledger.mechanisms[0].noise_multiplier > 0
    assert reply.content["metrics"]["noise_multiplier"] == ledger.mechanisms[0].noise_multiplier
    # A restarted server asks the same query again: the site sends the same release back, spending nothing (a fresh
    # draw would be a second release, paid for again).
    again = site.app(Message(q.content, dst_node_id=1, message_type="query.saliency"), _ctx(node))
    _check_only_dp_outputs_and_scalars(again, {"scores"})
    np.testing.assert_array_equal(again.content["scores"]["scores"].numpy(), reply.content["scores"]["scores"].numpy())
    assert PrivacyLedger.load(tmp_path / "run" / "private" / "sites" / "site-0" / "ledger.json").to_dict() == \
        ledger.to_dict()

    gen = load_generator(tiny_model_dir)
    selected = names[:3]
    state = trainable_state(make_trainable(gen, "saliency", selected))
    t = Message(RecordDict({"config": ConfigRecord({**cfg.to_record(), "selected": selected, "round": 1}),
                            "adapter": ArrayRecord(torch_state_dict=state)}), dst_node_id=1, message_type="train")
    reply = site.app(t, _ctx(node))
    _check_only_dp_outputs_and_scalars(reply, set(state))
    wire = reply.content["adapter"].to_torch_state_dict()
    assert all(v.dtype == torch.float16 for v in wire.values())  # adapters travel as float16
    update = from_wire(reply.content["adapter"])
    assert validate_update(update, state) is None
    assert any(not torch.equal(update[k], state[k]) for k in state)
    after = PrivacyLedger.load(tmp_path / "run" / "private" / "sites" / "site-0" / "ledger.json")
    assert after.mechanisms[-1].name == "dp-sgd" and after.mechanisms[-1].steps == 2
    assert reply.content["metrics"]["epsilon"] == pytest.approx(after.epsilon())

    # A restarted server asks for the same round again: the site re-sends its release, spending nothing.
    again = site.app(Message(t.content, dst_node_id=1, message_type="train"), _ctx(node))
    _check_only_dp_outputs_and_scalars(again, set(state))
    assert all(torch.equal(from_wire(again.content["adapter"])[k], update[k]) for k in state)

    def dp_steps():
        ledger = PrivacyLedger.load(tmp_path / "run" / "private" / "sites" / "site-0" / "ledger.json")
        return sum(m.steps for m in ledger.mechanisms if m.name == "dp-sgd")

    assert dp_steps() == 2
    # A different incoming adapter is a new request: it trains and is recorded (round 2: round 1 again with another
    # adapter would leave the site unable to afford the plan's last round, and is refused).
    moved = {k: v + 0.01 for k, v in state.items()}
    t2 = Message(RecordDict({"config": ConfigRecord({**cfg.to_record(), "selected": selected, "round": 2}),
                             "adapter": ArrayRecord(torch_state_dict=moved)}), dst_node_id=1, message_type="train")
    _check_only_dp_outputs_and_scalars(site.app(t2, _ctx(node)), set(state))
    assert dp_steps() == 4
    # The site's optimizer went on from round to round (its Adam moments stay on its disk): 2 + 2 steps.
    [opt_file] = (tmp_path / "run" / "private" / "sites" / "site-0").glob("optimizer-*.pt")
    opt = torch.load(opt_file, weights_only=True)
    assert {int(s["step"]) for s in opt["state"].values()} == {4}


def test_site_refuses_to_pass_its_budget(tmp_path, tiny_model_dir, mnist_small_npz, flower_identity):
    cfg = _cfg(tiny_model_dir, mnist_small_npz, tmp_path / "run", delta=1e-3)
    node = {"partition-id": 1, "num-partitions": 2, "max-epsilon": 1.0}
    q = Message(RecordDict({"config": ConfigRecord(cfg.to_record())}), dst_node_id=1, message_type="query.saliency")
    reply = site.app(q, _ctx(node))
    assert reply.has_error() and "past this site's limit" in reply.error.reason
    assert not (tmp_path / "run" / "private" / "sites" / "site-1" / "ledger.json").exists()  # nothing was spent
    # A site whose ledger is already at its limit refuses a training round and spends nothing more.
    ledger_path = tmp_path / "run" / "private" / "sites" / "site-1" / "ledger.json"
    full = PrivacyLedger(10.0, 1e-3)
    full.record("dp-sgd", 0.8, 0.3, 200)
    full.save(ledger_path)
    before = ledger_path.read_text()
    names = candidate_modules(load_generator(tiny_model_dir).unet)[:2]
    state = trainable_state(make_trainable(load_generator(tiny_model_dir), "saliency", names))
    node["max-epsilon"] = full.epsilon() + 0.01
    t = Message(RecordDict({"config": ConfigRecord({**cfg.to_record(), "selected": names, "round": 1}),
                            "adapter": ArrayRecord(torch_state_dict=state)}), dst_node_id=1, message_type="train")
    reply = site.app(t, _ctx(node))
    assert reply.has_error() and "past its limit" in reply.error.reason
    assert ledger_path.read_text() == before


def test_a_site_refuses_a_run_it_cannot_finish_even_without_the_selection_query(tmp_path, tiny_model_dir,
                                                                                  mnist_small_npz, flower_identity):
    """A server that skips DP-SAPF's saliency query (where the whole run was checked) and sends round 1 with its own
    selection must meet the same check: the site refuses to start training it cannot finish within max-epsilon."""
    cfg = _cfg(tiny_model_dir, mnist_small_npz, tmp_path / "run", delta=1e-3, rounds=3)
    node = {"partition-id": 0, "num-partitions": 2}
    names = candidate_modules(load_generator(tiny_model_dir).unet)[:2]
    state = trainable_state(make_trainable(load_generator(tiny_model_dir), "saliency", names))

    def train(rnd):
        return Message(RecordDict({"config": ConfigRecord({**cfg.to_record(), "selected": names, "round": rnd}),
                                   "adapter": ArrayRecord(torch_state_dict=state)}), dst_node_id=1,
                       message_type="train")

    plan = site._setup(train(1), _ctx(node)).plan
    node["max-epsilon"] = cfg.epsilon

    def eps_after(steps):
        ledger = PrivacyLedger(cfg.epsilon, plan.delta, cfg.accountant)
        ledger.record("dp-sgd", plan.train_noise, plan.sample_rate, steps)
        return ledger.epsilon()

    # Earlier spending on this dataset (another run) such that one more round fits and three do not.
    earlier = next(s for s in range(0, 100_000, plan.local_steps) if eps_after(s + 3 * plan.local_steps) > cfg.epsilon)
    assert earlier > 0 and eps_after(earlier + plan.local_steps) <= cfg.epsilon
    ledger_path = tmp_path / "run" / "private" / "sites" / "site-0" / "ledger.json"
    spent = PrivacyLedger(cfg.epsilon, plan.delta, cfg.accountant)
    spent.record("dp-sgd", plan.train_noise, plan.sample_rate, earlier)
    spent.save(ledger_path)
    reply = site.app(train(1), _ctx(node))
    assert reply.has_error() and "past its limit" in reply.error.reason
    assert sum(m.steps for m in PrivacyLedger.load(ledger_path).mechanisms) == earlier  # nothing spent
    # The last round alone is what remains to afford there: it fits, trains and is recorded.
    reply = site.app(train(3), _ctx(node))
    assert not reply.has_error(), reply.error.reason
    assert sum(m.steps for m in PrivacyLedger.load(ledger_path).mechanisms) == earlier + plan.local_steps


def test_a_deployed_site_refuses_an_empty_base_model(tmp_path, tiny_model_dir, mnist_small_npz, flower_identity,
                                                     monkeypatch):
    """Path("") is the working directory: a plan naming "" must not load whatever model sits there (say, one trained
    without DP on the site's own data) past the site's list of allowed models."""
    import shutil

    workdir = tmp_path / "supernode"
    shutil.copytree(tiny_model_dir, workdir)
    monkeypatch.chdir(workdir)
    state = tmp_path / "state"
    node = {"data-path": str(mnist_small_npz), "max-epsilon": 50.0, "state-dir": str(state), "delta": 1e-3}
    for base_model in ("", " "):
        cfg = {**_cfg(tiny_model_dir, mnist_small_npz, tmp_path / "run", delta=1e-3).to_record(),
               "base_model": base_model}
        q = Message(RecordDict({"config": ConfigRecord(cfg)}), dst_node_id=1, message_type="query.saliency")
        reply = site.app(q, _ctx(node))
        assert reply.has_error() and ("base_model" in reply.error.reason or "base model" in reply.error.reason)
        assert not (state / "ledger.json").exists()  # nothing was computed, nothing spent


@pytest.mark.parametrize("selection", ["attention", "full"])
def test_a_site_makes_a_public_selection_itself(tmp_path, tiny_model_dir, mnist_small_npz, flower_identity, selection):
    """DP-LoRA on all attention and full DP fine-tuning federate too: no query round, and the site chooses
    the public matrices itself; full fine-tuning puts every weight on the wire."""
    cfg = _cfg(tiny_model_dir, mnist_small_npz, tmp_path / "run", selection=selection, local_steps=1)
    node = {"partition-id": 0, "num-partitions": 2}
    gen = load_generator(tiny_model_dir)
    q = Message(RecordDict({"config": ConfigRecord(cfg.to_record())}), dst_node_id=1, message_type="query.saliency")
    reply = site.app(q, _ctx(node))
    assert reply.has_error() and "no saliency query" in reply.error.reason
    expected = candidate_modules(gen.unet, "attention") if selection == "attention" else []
    state = trainable_state(make_trainable(gen, selection, expected))
    if selection == "full":
        assert set(state) == {k for k, _ in gen.unet.named_parameters()}

    def ask(**extra):
        config = ConfigRecord({**cfg.to_record(), "round": 1, **extra})
        msg = Message(RecordDict({"config": config, "adapter": ArrayRecord(torch_state_dict=state)}), dst_node_id=1,
                      message_type="train")
        return site.app(msg, _ctx(node))

    refused = ask(selected=candidate_modules(gen.unet, "all")[:2])  # a server may not choose for a public strategy
    assert refused.has_error() and "selects its matrices publicly" in refused.error.reason
    reply = ask()
    _check_only_dp_outputs_and_scalars(reply, set(state))
    update = from_wire(reply.content["adapter"])
    assert validate_update(update, state) is None and any(not torch.equal(update[k], state[k]) for k in state)
    ledger = PrivacyLedger.load(tmp_path / "run" / "private" / "sites" / "site-0" / "ledger.json")
    assert [m.name for m in ledger.mechanisms] == ["dp-sgd"]  # all of ε went to DP-SGD


def test_validation_and_bounded_combination(flower_identity):
    a = {"w": torch.ones(2, 2)}
    assert "wrong keys" in validate_update({"v": torch.ones(2, 2)}, a)
    assert "wrong shape" in validate_update({"w": torch.ones(3)}, a)
    assert "non-finite" in validate_update({"w": torch.tensor([[1.0, float("nan")], [0, 0]])}, a)
    rng = np.random.default_rng(0)
    # Noisy sums: a site's vector of 1e30s moves the combination by at most 2/sites in L1, as any other vector would.
    honest = [v * 40 / v.sum() for v in (np.abs(rng.normal(1.0, 0.3, 40)) for _ in range(4))]  # sites of equal size
    evil = np.zeros(40)
    evil[7] = 1e30
    fair = combine_noisy_sums(honest)
    attacked = combine_noisy_sums(honest[:3] + [evil])
    assert np.abs(attacked - fair).sum() <= 2 / 4 + 1e-12
    assert (np.isclose(np.abs(fair).sum(), 1.0)
            and np.argsort(-fair)[:5].tolist() == np.argsort(-sum(honest))[:5].tolist())
    # Updates: equal weights, each change clipped to 3x the median change norm.
    current = {"w": torch.zeros(10, 10)}
    changes = [torch.randn(10, 10, generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(3)]
    huge = {"w": torch.full((10, 10), 65504.0)}  # float16's largest value, with an example count of 1e18
    new, norms, bound = combine_updates([{"w": c} for c in changes] + [huge], current)
    assert bound == pytest.approx(UPDATE_NORM_FACTOR * sorted(norms)[1])  # the low median of four
    assert float(new["w"].norm()) <= (sum(float(c.norm()) for c in changes) + bound) / 4 + 1e-9
    plain, _, _ = combine_updates([{"w": c} for c in changes], current)
    torch.testing.assert_close(plain["w"], sum(changes) / 3)  # honest sites: the plain mean
    # Reports: any shape a site sends is rejected with a reason, never raised.
    from sapf.federation.combine import report_of

    def reply(report: str) -> Message:
        return Message(RecordDict({"privacy": ConfigRecord({"site": "x", "report": report})}), dst_node_id=1,
                       message_type="train")

    good = json.dumps({"delta": 1e-5, "accountant": "rdp",
                       "mechanisms": [{"name": "dp-sgd", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3}]})
    assert report_of(reply(good))[0]["mechanisms"][0]["steps"] == 3
    assert report_of(reply(good), "rdp")[0] is not None
    # Another accountant than the plan's (PRV's cost grows with the claimed steps), or steps past any plan: refused.
    assert report_of(reply(good), "prv")[0] is None
    many = good.replace('"steps": 3', '"steps": 1000000000')
    assert report_of(reply(many))[0] is None
    # A site's lifetime ledger is kept up to the cap, and refused with the cap named past it.
    from sapf.federation.combine import MAX_MECHANISMS

    def lifetime(entries: int) -> str:
        return json.dumps({**json.loads(good), "mechanisms": [{"name": f"m{i % 3}", "noise_multiplier": 1.0,
                                                                "sample_rate": 0.1, "steps": 3}
                                                               for i in range(entries)]})
    assert len(report_of(reply(lifetime(MAX_MECHANISMS)))[0]["mechanisms"]) == MAX_MECHANISMS
    assert str(MAX_MECHANISMS) in report_of(reply(lifetime(MAX_MECHANISMS + 1)))[1]
    huge = good.replace('"noise_multiplier": 1.0', '"noise_multiplier": 1' + "0" * 400)
    for bad in ("[" * 100_000, huge, "null", '{"delta": "x"}', good.replace("dp-sgd", "x" * 100)):
        report, why = report_of(reply(bad))
        assert report is None and why


def test_one_site_cannot_move_a_central_image_past_the_honest_sites(tmp_path, tiny_model_dir, flower_identity):
    """DP-FETA across sites, through the server's round: a site that sends sums and counts of 1e9 (the largest value
    the server takes) must not set the central images alone, as a plain sum of the sites' vectors would let it."""
    from sapf.engine.central_images import REDUCE
    from sapf.federation.combine import combine_central_sums
    from sapf.federation.server_app import central_images_round

    gen = load_generator(tiny_model_dir)
    k, d = gen.num_classes, gen.channels * (gen.image_size // REDUCE) ** 2
    rng = np.random.default_rng(0)

    def honest():
        counts = np.full(k, 100.0) + rng.normal(0, 5, k)
        return np.concatenate([(rng.uniform(0, 0.5, (k, d)) * counts[:, None]).ravel(), counts])

    class Sites:  # Flower's Grid as the server uses it: three sites' replies, the third hostile
        def __init__(self, vectors):
            self.vectors = vectors

        def send_and_receive(self, msgs, timeout):
            return [Message(RecordDict({"sums": ArrayRecord({"sums": Array(v.astype(np.float32))}),
                                        "metrics": MetricRecord({"noise_multiplier": 1.0, "examples": 100})}),
                            reply_to=m) for m, v in zip(msgs, self.vectors, strict=True)]

    cfg = FederationConfig(num_sites=3, min_clients=3, base_model=str(tiny_model_dir), out=str(tmp_path))
    honest_sites = [honest(), honest()]
    means = [v[: k * d].reshape(k, d) / v[k * d:, None] for v in honest_sites]
    lo, hi = np.minimum(*means), np.maximum(*means)
    for target in (np.full((k, d), -1.0), np.ones((k, d))):
        evil = np.concatenate([(target * 1e9).ravel(), np.full(k, 1e9)])
        sums = central_images_round(Sites(honest_sites + [evil]), cfg, [1, 2, 3], gen)
        combined = sums[: k * d].reshape(k, d)
        assert (combined >= lo - 1e-6).all() and (combined <= hi + 1e-6).all()  # within the honest sites' values
    # Two sites of equal size: their means' mean, the sum over the total count; one site moves it by at most 1.5.
    a, b = honest(), honest()
    b[k * d:] = a[k * d:]
    plain = (a[: k * d] + b[: k * d]).reshape(k, d) / (2 * a[k * d:])[:, None]
    np.testing.assert_allclose(combine_central_sums([a, b], k, d)[: k * d].reshape(k, d), plain, rtol=1e-6)
    evil = np.concatenate([np.full(k * d, 1e9), np.ones(k)])
    assert np.abs(combine_central_sums([a, evil], k, d)[: k * d].reshape(k, d) - plain).max() <= 1.5 + 1e-9


def test_a_sites_stored_report_never_goes_down(tmp_path, flower_identity):
    """A site's ledger only grows: a later report with a smaller ε (a lie, or ``mechanisms: []``) is not kept."""
    from sapf.federation.server_app import _write_site_reports

    def reply(steps):
        mechanisms = [{"name": "dp-sgd", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": steps}] if steps else []
        request = Message(RecordDict(), dst_node_id=5, message_type="train")
        return Message(RecordDict({"privacy": ConfigRecord({"report": json.dumps(
            {"delta": 1e-5, "accountant": "rdp", "mechanisms": mechanisms})})}), reply_to=request)

    path = tmp_path / "privacy" / "site-5.json"
    _write_site_reports(tmp_path, [reply(100)], "rdp")
    _write_site_reports(tmp_path, [reply(200)], "rdp")
    assert json.loads(path.read_text())["mechanisms"][0]["steps"] == 200
    for smaller in (50, 0):
        _write_site_reports(tmp_path, [reply(smaller)], "rdp")
        assert json.loads(path.read_text())["mechanisms"][0]["steps"] == 200


def test_a_round_a_site_answered_with_no_report_still_counts(tmp_path, flower_identity):
    """A site records a round before it trains, so a reply lost afterwards must not leave the server's ε for it at
    its last report: the round counts at the rate the site declared a round (here its report came from the saliency
    query alone), until a later report replaces it; a site that never reported is named, not left out."""
    from sapf.federation.server_app import _site_ledgers, _write_reports_of
    from sapf.model_card import model_card

    query = {"name": "saliency-query", "noise_multiplier": 2.0, "sample_rate": 0.5, "steps": 1}
    per_round = {"noise_multiplier": 1.0, "sample_rate": 0.064, "steps": 25}

    def reply(node, mechanisms):
        request = Message(RecordDict(), dst_node_id=node, message_type="train")
        return Message(RecordDict({"privacy": ConfigRecord({"report": json.dumps(
            {"delta": 1e-5, "accountant": "rdp", "mechanisms": mechanisms, "training_round": per_round})})}),
            reply_to=request)

    def epsilon(*mechanisms):
        return recompute_epsilon({"delta": 1e-5, "accountant": "rdp", "mechanisms": list(mechanisms)})

    _write_reports_of(tmp_path, [5, 6], [reply(5, [query])], "saliency", "rdp")  # node 6: no reply
    for rnd in (1, 2):  # node 5 records both rounds and its replies are lost; node 6 never answers
        _write_reports_of(tmp_path, [5, 6], [], rnd, "rdp")
    eps, ledgers, uncounted = _site_ledgers(tmp_path)
    spent = epsilon(query, {"name": "dp-sgd", **per_round, "steps": 50})  # what node 5's own ledger holds
    assert eps["site-5"] == pytest.approx(spent) and eps["site-5"] > epsilon(query)
    assert "site-6" not in eps and uncounted == {"site-6": ["the saliency query", "round 1", "round 2"]}
    card = model_card(config={"method": "diffusion"}, privacy=ledgers, stages=[], examples="2 sites",
                      unconfirmed=uncounted)
    assert "**site-6** was sent the saliency query, round 1, round 2" in card
    # Node 5's next report holds both rounds and a third: it replaces the stored one, unconfirmed rounds and all.
    _write_reports_of(tmp_path, [5], [reply(5, [query, {"name": "dp-sgd", **per_round, "steps": 75}])], 3, "rdp")
    assert _site_ledgers(tmp_path)[0]["site-5"] == pytest.approx(epsilon(query, {"name": "dp-sgd", **per_round,
                                                                                  "steps": 75}))


@pytest.mark.slow
@pytest.mark.parametrize("plan", [
    {"warmup": "central-images", "warmup_steps": 2},
    {"warmup": "mean-embeddings", "selection": "attention", "warmup_steps": 2, "warmup_generator_steps": 2,
     "warmup_samples": 20},
])
def test_two_site_simulation(tmp_path, tiny_model_dir, mnist_small_npz, plan):
    """The main job's plan (DP-FETA's central images, the saliency query, DP-LoRA on the selected matrices), and the
    mean-embedding warm-up (samples of a generator matched to DP-MEPF's noisy mean embeddings) before DP-LoRA on all
    attention: every stage runs across two Flower sites, and each site's ledger holds exactly the plan's releases
    within its ε. (A plan without a warm-up goes over a real SuperLink in test_deployment.)"""
    out = tmp_path / "fed"
    status = federate(_cfg(tiny_model_dir, mnist_small_npz, out, **plan))
    assert status["status"] == "completed"
    warm = plan.get("warmup")
    picture = {"central-images": "central_images.png", "mean-embeddings": "warmup_samples.png"}.get(warm)
    for f in ("model/unet/config.json", "model/model_index.json", "README.md", "selection.json", "metrics.json",
              "grid.png", "comparison.png", "checkpoint/adapter-2.safetensors", "config.json",
              *([picture, "checkpoint/base.safetensors"] if warm else ["adapter/adapter_config.json"])):
        assert (out / f).exists(), f
    assert not (out / "model.onnx").exists()  # onnx=False: `sapf export RUN` makes it later
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and all(r["replies"] == 2 for r in metrics["rounds"])
    assert not any("time" in k for r in metrics["rounds"] for k in r)  # a round's time depends on private batch sizes
    reports = sorted((out / "privacy").glob("*.json"))  # named by the node that sent them: site-<node id>.json
    assert len(reports) == 2 and all(p.stem == f"site-{json.loads(p.read_text())['node_id']}" for p in reports)
    salient = plan.get("selection", "saliency") == "saliency"
    for path in reports:
        report = json.loads(path.read_text())
        names = [n for n in (warm, "saliency-query" if salient else None, "dp-sgd") if n]
        assert [m["name"] for m in report["mechanisms"]] == names
        assert report["mechanisms"][-1]["steps"] == 4
        assert 9.0 <= recompute_epsilon(report) <= 10.0
    # A site's dataset fingerprint (a hash of its exact records: a guess of one record can be tested against it)
    # stays with the site's own state, under private/, out of everything the run shares.
    hashes = [json.loads(p.read_text())["sha256"] for p in out.rglob("dataset.json")]
    assert len(hashes) == 2
    shared = [p for p in out.rglob("*") if p.is_file() and "private" not in p.relative_to(out).parts]
    assert not [p for p in shared for h in hashes if h[:16].encode() in p.read_bytes()]
    sel = json.loads((out / "selection.json").read_text())
    if salient:
        assert sel["sites"] == 2 and len(sel["selected"]) == round(0.3 * len(sel["candidates"]))
    else:
        assert sel["strategy"] == "attention" and sel["sites"] == 0


class _Faulty:
    """A real ClientApp whose sites misbehave on cue (files, since Ray runs sites in other processes)."""

    def __init__(self, flags: Path, real: ClientApp):
        self.flags, self.real = flags, real

    def __call__(self, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["round"]) if msg.metadata.message_type == "train" else 0
        if (self.flags / f"raise-{pid}-{rnd}").exists():
            raise RuntimeError("site crashed mid-round")
        reply = self.real(msg, context)
        if (self.flags / f"lost-{pid}-{rnd}").exists():  # recorded and trained, then the reply was lost
            raise RuntimeError("site crashed after its round")
        if (self.flags / f"rogue-{pid}-{rnd}").exists() and not reply.has_error():
            # A hostile site: a report name that climbs out of privacy/, float16's largest values, a huge count.
            reply.content["privacy"] = ConfigRecord({"site": "../config", "report": "{\"status\": \"completed\"}"})
            if "adapter" in reply.content:
                state = reply.content["adapter"].to_torch_state_dict()
                reply.content["adapter"] = ArrayRecord(torch_state_dict={k: torch.full_like(v, 65504.0)
                                                                         for k, v in state.items()})
            reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), "examples": 10**18})
        if (self.flags / f"nometric-{pid}-{rnd}").exists() and not reply.has_error():
            reply.content["metrics"] = MetricRecord({"examples": 1})  # no epsilon
        if (self.flags / f"nan-{pid}-{rnd}").exists() and not reply.has_error():
            state = reply.content["adapter"].to_torch_state_dict()
            state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
            reply.content["adapter"] = ArrayRecord(torch_state_dict=state)
        return reply


def _faulty_app(flags: Path) -> ClientApp:
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's sites cannot import tests/
    handler = _Faulty(flags, site.app)
    app = ClientApp()
    app.query("saliency")(handler)
    app.train()(handler)
    return app


@pytest.mark.slow
def test_faults_and_resume(tmp_path, tiny_model_dir, mnist_small_npz, monkeypatch, capfd):
    flags = tmp_path / "flags"
    flags.mkdir()
    for f in ("rogue-0-0", "nometric-1-0", "raise-1-1", "rogue-0-1", "nan-2-2", "raise-0-3", "raise-1-3", "lost-2-3"):
        (flags / f).touch()
    monkeypatch.setattr(site, "app", _faulty_app(flags))
    out = tmp_path / "fed"
    cfg = _cfg(tiny_model_dir, mnist_small_npz, out, num_sites=3, rounds=3, local_steps=1, batch_size=8)
    with pytest.raises(SapfError, match="failed"):
        federate(cfg)  # rounds 1-2 go on without the bad site; round 3 has no valid reply
    log = capfd.readouterr().err
    assert "round 1: site" in log and "error" in log and "rejected: 'non-finite" in log  # site text is quoted
    assert "privacy report rejected" in log and "missing field 'noise_multiplier'" in log and "clipped" in log
    # The rogue site wrote nothing outside privacy/, faked no completion, and moved the average only by a bounded step.
    assert json.loads((out / "config.json").read_text())["command"] == "federate"
    assert all(p.name.startswith("site-") for p in (out / "privacy").iterdir())
    first = json.loads((out / "checkpoint" / "state.json").read_text())["history"][0]
    assert first["replies"] == 2 and max(first["update_norms"]) > 100 * first["update_norm_bound"] / 3
    ck = json.loads((out / "checkpoint" / "state.json").read_text())
    assert ck["round"] == 2 and [r["replies"] for r in ck["history"]] == [2, 2]
    from safetensors.torch import load_file

    # The checkpoint names its round's adapter, the only one kept.
    assert [p.name for p in (out / "checkpoint").glob("adapter*")] == [ck["adapter"]] == ["adapter-2.safetensors"]
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "checkpoint" / ck["adapter"])).values())
    # The server's ε for each site is at least what the site's own ledger spent: site 2 recorded round 3 and its
    # reply was lost, so its stored report (from round 2) alone falls short. Nodes are not partitions: compare sorted.
    from sapf.federation.server_app import _site_ledgers

    server = sorted(_site_ledgers(out)[0].values())
    sites = sorted(PrivacyLedger.load(p).epsilon() for p in (out / "private").rglob("ledger.json"))
    assert len(server) == len(sites) == 3
    assert all(s >= t - 1e-9 for s, t in zip(server, sites, strict=True)), (server, sites)
    for f in flags.iterdir():
        f.unlink()
    status = federate(FederationConfig(out=str(out)), resume=True)
    assert status["status"] == "completed"
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and rounds[-1]["replies"] == 3
    assert all("loss" not in r for r in rounds)  # no statistic of private data reaches the server


def test_pyproject_declares_the_flower_app():
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    app = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    for ref in app["components"].values():
        module, attr = ref.split(":")
        assert getattr(importlib.import_module(module), attr) is not None
    cfg = FederationConfig.from_record({k.replace("-", "_"): v for k, v in app["config"].items()})
    known = {f.replace("_", "-") for f in FederationConfig.__dataclass_fields__}
    assert set(app["config"]) <= known  # every run-config key reaches the plan
    assert cfg.rounds == app["config"]["rounds"] and cfg.num_sites == app["config"]["num-sites"]
    defaults = FederationConfig()
    drift = {k: v for k, v in app["config"].items() if k != "out" and getattr(defaults, k.replace("-", "_")) != v}
    assert drift == {}  # the declared app runs the same plan as `sapf federate`


def test_plan_defaults_and_local_epochs(tmp_path):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from sapf.config import TrainConfig
    from sapf.federation.deployment import write_app

    # One declaration: the method settings of a federated run are those of a central one.
    shared = {f for f in FederationConfig.__dataclass_fields__} & {f for f in TrainConfig.__dataclass_fields__}
    assert {f: getattr(FederationConfig(), f) for f in shared if f != "batch_size"} == \
        {f: getattr(TrainConfig(), f) for f in shared if f != "batch_size"}
    assert FederationConfig().learning_rate() == TrainConfig().learning_rate()
    cfg = FederationConfig(local_epochs=0.5, batch_size=32)
    assert cfg.local_steps_for(1000) == 16 and cfg.local_steps_for(10) == 1
    assert FederationConfig(local_steps=7).local_steps_for(1000) == 7
    # The app bundle `sapf serve` ships: sapf's components and the whole plan, nothing else.
    app_dir = write_app(tmp_path / "app", FederationConfig(rounds=3, out="/srv/run"))
    assert [p.name for p in app_dir.iterdir()] == ["pyproject.toml"]
    app = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    back = FederationConfig.from_record({k.replace("-", "_"): v for k, v in app["config"].items()})
    assert back == FederationConfig(rounds=3, out="/srv/run")
    assert "lr" not in app["config"] and back.lr is None  # "unset" is left out of the record, and reads back unset


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_site_trains_with_the_planned_optimizer(tmp_path, tiny_model_dir, mnist_small_npz, flower_identity, optimizer):
    # One local step from a zero lora_B: Adam moves every entry by ≈ lr (its first step is lr·g/|g|),
    # SGD by lr·g, which varies from entry to entry. The spread tells which optimizer the site ran.
    lr = 1e-2
    cfg = _cfg(tiny_model_dir, mnist_small_npz, tmp_path / "run", local_steps=1, optimizer=optimizer, lr=lr)
    gen = load_generator(tiny_model_dir)
    names = candidate_modules(gen.unet, cfg.candidates)[:3]
    state = trainable_state(make_trainable(gen, "saliency", names))
    msg = Message(RecordDict({"config": ConfigRecord({**cfg.to_record(), "selected": names, "round": 1}),
                              "adapter": ArrayRecord(torch_state_dict=state)}), dst_node_id=1, message_type="train")
    reply = site.app(msg, _ctx({"partition-id": 0, "num-partitions": 2}))
    _check_only_dp_outputs_and_scalars(reply, set(state))
    update = from_wire(reply.content["adapter"])
    step = torch.cat([(update[k].float() - state[k].float()).abs().flatten() for k in state if "lora_B" in k])
    spread = float(step.std() / step.mean())
    if optimizer == "adam":
        assert spread < 0.05 and float(step.mean()) == pytest.approx(lr, rel=0.05)
    else:
        assert spread > 0.3


def test_ffa_lora_site_keeps_a_and_trains_b(tmp_path, tiny_model_dir, mnist_small_npz, flower_identity):
    # FFA-LoRA: the site's reply carries the server's A unchanged (up to the float16 wire) and a trained B.
    cfg = _cfg(tiny_model_dir, mnist_small_npz, tmp_path / "run", local_steps=2, freeze_lora_a=True)
    gen = load_generator(tiny_model_dir)
    names = candidate_modules(gen.unet, cfg.candidates)[:3]
    model = make_trainable(gen, "saliency", names, freeze_lora_a=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    state = trainable_state(model)
    msg = Message(RecordDict({"config": ConfigRecord({**cfg.to_record(), "selected": names, "round": 1}),
                              "adapter": ArrayRecord(torch_state_dict=state)}), dst_node_id=1, message_type="train")
    reply = site.app(msg, _ctx({"partition-id": 0, "num-partitions": 2}))
    _check_only_dp_outputs_and_scalars(reply, set(state))
    update = from_wire(reply.content["adapter"])
    for k in state:
        moved = float((update[k] - state[k].half().float()).abs().max())
        assert (moved == 0) == ("lora_A" in k), k


def test_site_plan_is_kept_on_the_sites_disk(tmp_path):
    # A deployed site answers each request in a fresh process: its calibrated plan is read back from disk.
    from sapf.federation.task import plan_site

    cfg = FederationConfig(rounds=2, local_steps=3, batch_size=16)
    fresh = plan_site(cfg, 200)
    assert plan_site(cfg, 200, tmp_path) == fresh
    (saved,) = (tmp_path / "plans").glob("plan-*.json")
    longer = plan_site(FederationConfig(rounds=3, local_steps=3, batch_size=16), 200, tmp_path)
    assert longer.train_noise > fresh.train_noise and len(list((tmp_path / "plans").glob("*.json"))) == 2
    saved.write_text(saved.read_text().replace(str(fresh.train_noise), "9.5"))
    assert plan_site(cfg, 200, tmp_path).train_noise == 9.5  # read, not recalibrated


def test_a_federated_run_that_fails_keeps_the_run_it_was_to_replace(tmp_path):
    from sapf.federation.simulation import prepared_run_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "model.onnx").write_text("the earlier run's model")
    cfg = FederationConfig(out=str(out))
    with pytest.raises(SapfError, match="kept in") as failed:
        with prepared_run_dir(cfg, "federate", force=True, resume=False):
            assert not (out / "model.onnx").exists() and (out / "config.json").exists()  # the new run's dir
            raise SapfError("the federated run failed: a site dropped out")
    kept = next(tmp_path.glob(".run.earlier-*"))
    assert str(kept) in str(failed.value) and (kept / "model.onnx").read_text() == "the earlier run's model"
    # A run that completes removes what it replaced.
    with prepared_run_dir(cfg, "federate", force=True, resume=False):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", kept.name])  # only what the failure kept


def test_a_run_dir_without_a_checkpoint_says_what_to_pass(tmp_path):
    from sapf.federation.simulation import prepared_run_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"command": "serve"}')  # a `sapf serve` stopped before its first round ended
    cfg = FederationConfig(out=str(out))
    with pytest.raises(SapfError, match="before its first checkpoint.*--force"):
        with prepared_run_dir(cfg, "serve", force=False, resume=False):
            pass
    with pytest.raises(SapfError, match="no checkpoint.*--force"):
        with prepared_run_dir(cfg, "serve", force=False, resume=True):
            pass
    (out / "status.json").write_text('{"status": "completed"}')  # a finished run: --force, as for any other
    with pytest.raises(SapfError, match="already holds an earlier run"):
        with prepared_run_dir(cfg, "serve", force=False, resume=False):
            pass
    with prepared_run_dir(cfg, "serve", force=True, resume=False):
        pass
    assert json.loads((out / "config.json").read_text())["command"] == "serve" and not (out / "status.json").exists()
    (out / "config.json").write_text('{"command": "train"}')  # not a federated run: the general refusal
    with pytest.raises(SapfError, match="already holds an earlier run"):
        with prepared_run_dir(cfg, "serve", force=False, resume=False):
            pass


def test_a_simulated_sites_earlier_state_moves_under_private(tmp_path):
    """A run begun when simulated sites kept their state in RUN/sites/ resumes with the same ledger (a fresh one
    would spend the budget twice), moved to where the shared outputs exclude it."""
    from sapf.federation.task import site_state_dir

    cfg = FederationConfig(out=str(tmp_path / "run"))
    earlier = tmp_path / "run" / "sites" / "site-0"
    earlier.mkdir(parents=True)
    (earlier / "ledger.json").write_text("the ledger so far")
    state = site_state_dir(cfg, {"partition-id": 0}, "site-0")
    assert state == tmp_path / "run" / "private" / "sites" / "site-0"
    assert (state / "ledger.json").read_text() == "the ledger so far" and not earlier.exists()
    assert site_state_dir(cfg, {"partition-id": 1}, "site-1") == tmp_path / "run" / "private" / "sites" / "site-1"
