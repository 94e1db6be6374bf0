"""Privacy tests that fail when the mechanism breaks, through the real code paths.

Each test runs the code the product runs (``dp_finetune``, the saliency query, ``sapf select``,
the site's real ClientApp with real Flower Messages) and checks a property that a broken
mechanism would violate: replica averaging dropped, noise shrunk or reused, a release
unrecorded, a NaN let through. Where a test's power is not obvious, it also runs the broken
variant and checks that the property then fails.
"""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
from conftest import tiny_generator
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from sapf.config import FederationConfig
from sapf.engine import finetune
from sapf.engine.data import load_dataset
from sapf.engine.finetune import DPSGDConfig, dp_finetune, make_trainable, trainable_state
from sapf.engine.model import load_generator
from sapf.engine.privacy import Mechanism, PrivacyLedger
from sapf.engine.saliency import SaliencyQuery, candidate_modules, noisy_saliency_scores
from sapf.federation import client_app as site_app
from sapf.federation.site_policy import Refusal, check_noise


@pytest.fixture(scope="module")
def digits16():
    return load_dataset("mnist5k", 16, 1).subset(np.arange(0, 5000, 125))  # 40 real digits


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])


def _one_sgd_step(data, *, clip, sigma, multiplicity=1, strategy="full", batch=None):
    """Δθ of one DP-SGD step of ``dp_finetune`` with SGD at lr 1: −(clipped sum + noise) / B."""
    gen = tiny_generator()
    names = candidate_modules(gen.unet, "all")[:6]
    model = make_trainable(gen, strategy, names)
    before = _flat(model)
    ledger = PrivacyLedger(10.0, 1e-5)
    cfg = DPSGDConfig(steps=1, batch_size=batch or len(data), multiplicity=multiplicity, clip=clip, lr=1.0,
                      optimizer="sgd")
    dp_finetune(gen, model, data, cfg, sigma, ledger, show_progress=False)
    return (_flat(model) - before) * cfg.batch_size, ledger


def test_one_example_with_k_replicas_moves_a_dp_sgd_step_by_at_most_c(digits16, monkeypatch):
    # One example, sampled with rate 1, K = 4 replicas: the step's noiseless clipped sum is that example's
    # contribution, so its norm is at most C. Gradients are far above C here, so the clip binds.
    C, K = 1e-4, 4
    one = digits16.subset([7])
    moved, ledger = _one_sgd_step(one, clip=C, sigma=1e-9, multiplicity=K)
    assert 0.9 * C < float(moved.norm()) <= C * (1 + 1e-3)
    assert [(m.name, m.sample_rate, m.steps) for m in ledger.mechanisms] == [("dp-sgd", 1.0, 1)]
    # The mistake of public DP-LoRA code (each replica clipped as its own record) breaks the bound.
    monkeypatch.setattr(finetune, "average_replicas", lambda params, k: _no_average(params))
    broken, _ = _one_sgd_step(one, clip=C, sigma=1e-9, multiplicity=K)
    assert float(broken.norm()) > 1.5 * C


def _no_average(params):
    for p in params:
        if isinstance(p.grad_sample, list):
            p.grad_sample = torch.cat(p.grad_sample, dim=0)


def test_dp_sgd_noise_has_the_planned_standard_deviation(digits16):
    # Δθ·B = −(S + N(0, σ²C²)) with ‖S‖ ≤ B·C: over ~45k coordinates the spread is σC to a fraction of a percent.
    C, sigma, B = 1e-3, 0.8, 2
    moved, ledger = _one_sgd_step(digits16.subset([3, 9]), clip=C, sigma=sigma, batch=B)
    d = moved.numel()
    assert d > 20_000
    assert float(moved.std()) == pytest.approx(sigma * C, rel=0.03)
    assert ledger.mechanisms == [Mechanism("dp-sgd", sigma, 1.0, 1)]


def test_dp_sgd_noise_is_fresh_for_every_run(digits16):
    a, _ = _one_sgd_step(digits16.subset([3, 9]), clip=1e-3, sigma=0.8)
    b, _ = _one_sgd_step(digits16.subset([3, 9]), clip=1e-3, sigma=0.8)
    # Shared noise would make the difference at most the two clipped sums (‖·‖ ≤ 4C = 0.004); fresh noise gives
    # √2·σC·√d ≈ 0.24 (d ≈ 45k coordinates, so within a fraction of a percent): the threshold sits 50× above the first.
    assert float((a - b).norm()) > 50 * 4 * 1e-3


def test_dp_sgd_batches_are_poisson_samples(digits16):
    # The accountant assumes each record joins each step's batch independently with rate q = B/N: the batch size
    # is then Binomial(N, q), here std √(40·0.1·0.9) ≈ 1.9. Fixed-size batches (a shuffled loader) would not vary.
    gen = tiny_generator()
    model = make_trainable(gen, "saliency", candidate_modules(gen.unet, "all")[:2])
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    steps = 60
    cfg = DPSGDConfig(steps=steps, batch_size=4, multiplicity=1, clip=1e-2, lr=1e-3, optimizer="sgd")
    dp_finetune(gen, model, digits16, cfg, 1.0, None, show_progress=False)
    sizes += [0] * (steps - len(sizes))  # an empty batch runs no forward pass
    assert 2.5 < np.mean(sizes) < 5.5 and 1.1 < np.std(sizes) < 2.8


def test_a_non_finite_per_example_gradient_never_reaches_the_release(digits16, monkeypatch):
    # An adapter crafted to overflow for class 3 only (its class-embedding row ~ 1e37): the examples of
    # class 3 get NaN gradients, which are zeroed before clipping, so the trained weights stay finite
    # whether or not such an example was sampled.
    def train_once():
        gen = tiny_generator()
        model = make_trainable(gen, "saliency", candidate_modules(gen.unet, "all")[:6])
        with torch.no_grad():
            emb = next(p for n, p in model.named_parameters() if "class_embedding" in n and p.requires_grad)
            emb[3] = 1e37
        data = digits16.subset(np.flatnonzero(np.isin(digits16.labels, [3, 5])))
        cfg = DPSGDConfig(steps=2, batch_size=len(data), multiplicity=2, clip=1e-2, lr=1e-2, optimizer="sgd")
        dp_finetune(gen, model, data, cfg, 1.0, None, show_progress=False)
        return _flat(model)

    assert torch.isfinite(train_once()).all()
    monkeypatch.setattr(finetune, "zero_nonfinite_rows", lambda params: 0)  # the mechanism without the guard
    assert not torch.isfinite(train_once()).all()


def test_a_networks_own_randomness_inside_dp_sgd_is_fresh_and_the_seed_continues_after(digits16):
    # A base model that draws from torch's global generator in its forward pass (a user's model with dropout) gets
    # fresh draws inside DP-SGD, not the ones --seed fixed; after training the global generator is the seed's again.
    seen = []

    def train_once():
        gen = tiny_generator()
        model = make_trainable(gen, "saliency", candidate_modules(gen.unet, "all")[:6])
        model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_rng_state()))
        cfg = DPSGDConfig(steps=1, batch_size=len(digits16), multiplicity=1, clip=1e-2, lr=1e-2, optimizer="sgd")
        torch.manual_seed(0)
        seeded = torch.get_rng_state()
        dp_finetune(gen, model, digits16, cfg, 1.0, None, show_progress=False)
        return seeded, torch.rand(1)

    seeded, after = train_once()
    _, again = train_once()
    assert len(seen) == 2 and not torch.equal(seen[0], seeded) and not torch.equal(seen[0], seen[1])
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after) and torch.equal(after, again)


def test_saliency_query_noise_has_the_planned_std_and_records_its_sample_rate(digits16):
    C, sigma = 1e-2, 3.0
    q = SaliencyQuery(clip=C, sample_rate=0.5, candidates="all")
    ledger = PrivacyLedger(10.0, 1e-5)
    draws = [noisy_saliency_scores(tiny_generator(), digits16.subset([4]), q, sigma, ledger, False)[1]
             for _ in range(4)]
    # The noiseless scores of ≤ 1 example sum to ≤ C²: against noise of std σC² per score, they are negligible.
    noise = np.concatenate(draws)
    assert noise.size >= 100 and np.std(noise) == pytest.approx(sigma * C**2, rel=0.15)
    assert ledger.mechanisms == [Mechanism("saliency-query", sigma, 0.5, 4)]


def test_two_central_selects_at_different_epsilon_do_not_share_noise(tmp_path, tiny_model_dir):
    # The attack: with a shared noise draw z, (σ₂y₁ − σ₁y₂)/(σ₂ − σ₁) recovers the noiseless scores (L1 ≤ n·C²).
    from sapf.config import TrainConfig
    from sapf.engine.run import select_only

    ds = load_dataset("mnist5k", 16, 1)
    npz = tmp_path / "three.npz"
    np.savez(npz, images=((ds.images[:3, 0] + 1) * 127.5).round().astype(np.uint8), labels=ds.labels[:3])
    runs = []
    for eps in (1.0, 2.0):
        cfg = TrainConfig(data=str(npz), base_model=str(tiny_model_dir), holdout=0.0, epsilon=eps, delta=1e-5)
        select_only(cfg, tmp_path / f"sel{eps}", show_progress=False)
        sel = json.loads((tmp_path / f"sel{eps}" / "selection.json").read_text())
        runs.append((np.asarray(sel["scores"]), sel["noise_multiplier"], sel["sensitivity"]))
    (y1, s1, d), (y2, s2, _) = runs
    recovered = (s2 * y1 - s1 * y2) / (s2 - s1)
    assert np.abs(recovered).sum() > 10 * 3 * d  # independent noise: far from any noiseless score vector


# --- the site ------------------------------------------------------------------------------------


@pytest.fixture
def flower_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


@pytest.fixture
def site_npz(tmp_path):
    ds = load_dataset("mnist5k", 28, 1)
    path = tmp_path / "site.npz"
    np.savez(path, images=((ds.images[:24, 0] + 1) * 127.5).round().astype(np.uint8), labels=ds.labels[:24])
    return path


def _node(tmp_path, npz, tiny_model_dir, **extra):
    """A deployed site's node config, as `sapf join` writes it."""
    return {"data-path": str(npz), "state-dir": str(tmp_path / "state"), "max-epsilon": 20.0,
            "base-models": str(tiny_model_dir), **extra}


def _plan(tiny_model_dir, **kw):
    base = dict(base_model=str(tiny_model_dir), rounds=2, local_steps=2, batch_size=4, epsilon=8.0, warmup="none")
    return FederationConfig(**{**base, **kw})


def _query(cfg_record: dict) -> Message:
    return Message(RecordDict({"config": ConfigRecord(cfg_record)}), dst_node_id=1, message_type="query.saliency")


def _ask(msg: Message, node: dict) -> Message:
    return site_app.app(msg, Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={}))


def _ledger(tmp_path) -> PrivacyLedger | None:
    path = tmp_path / "state" / "ledger.json"
    return PrivacyLedger.load(path) if path.exists() else None


def test_a_site_repeating_a_query_with_a_field_changed_gives_independent_noise(tmp_path, tiny_model_dir, site_npz,
                                                                               flower_identity):
    node = _node(tmp_path, site_npz, tiny_model_dir, **{"max-epsilon": 40.0})
    replies = [_ask(_query(_plan(tiny_model_dir, epsilon=eps).to_record()), node) for eps in (8.0, 12.0)]
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    (y1, y2) = (r.content["scores"]["scores"].numpy() for r in replies)
    s1, s2 = (float(r.content["metrics"]["noise_multiplier"]) for r in replies)
    d = 1e-2 ** 2  # the plan's selection clip squared: the sensitivity
    recovered = (s2 * y1 - s1 * y2) / (s2 - s1)
    assert np.abs(recovered).sum() > 10 * 24 * d  # with a shared draw this would be the raw scores (L1 ≤ 24·C²)
    # Both releases were recorded before they left.
    assert [(m.name, m.noise_multiplier) for m in _ledger(tmp_path).mechanisms] == [("saliency-query", s1),
                                                                                   ("saliency-query", s2)]


@pytest.mark.parametrize("change,node_change,expected", [
    ({"epsilon": math.inf}, {}, "finite ε"),
    ({"epsilon": 0.0}, {}, "finite ε"),
    ({"epsilon": -1.0}, {}, "finite ε"),
    ({"epsilon": math.nan}, {}, "finite ε"),
    ({"epsilon": 30.0}, {}, "past this site's limit"),
    ({}, {"max-epsilon": None}, "no max-epsilon"),
    ({"epsilon": math.inf}, {"max-epsilon": None}, "no max-epsilon"),
    ({"batch_size": 10**9}, {}, "batch_size"),
    ({"rank": 10**6}, {}, "rank"),
    ({"multiplicity": 10**4}, {}, "multiplicity"),
    ({"rounds": 10**7}, {}, "rounds"),
    ({"clip": math.inf}, {}, "clip"),
    ({"clip": 0.0}, {}, "clip"),
    ({"selection_sample_rate": 1.5}, {}, "selection_sample_rate"),
    ({"selection_sample_rate": 0.0}, {}, "selection_sample_rate"),
    ({"selection_budget": 1.0}, {}, "selection_budget"),
    ({"lr": math.nan}, {}, "lr"),
    ({"accountant": "none"}, {}, "accountant"),
    ({"base_model": "/etc"}, {}, "base model"),
    ({"rounds": "3"}, {}, "type int"),
    ({"rounds": True}, {}, "type int"),
    ({"local_epochs": 1e9}, {}, "local_epochs"),
    ({"selection": "everything"}, {}, "selection"),
    ({"score": "max"}, {}, "score"),
    ({"selection_multiplicity": 10**4}, {}, "selection_multiplicity"),
    ({"top_fraction": math.nan}, {}, "top_fraction"),
    # a path (here the site's own records) would make the central images' bound a statistic of private data
    ({"public_data": "SITE_DATA", "warmup": "central-images"}, {}, "public_data"),
    ({"public_data": "mnist5k", "warmup": "central-images"}, {}, "public_data"),
])
def test_a_site_refuses_a_plan_outside_its_own_limits_and_spends_nothing(tmp_path, tiny_model_dir, site_npz,
                                                                         flower_identity, change, node_change,
                                                                         expected):
    node = {k: v for k, v in {**_node(tmp_path, site_npz, tiny_model_dir), **node_change}.items() if v is not None}
    change = {k: str(site_npz) if v == "SITE_DATA" else v for k, v in change.items()}
    reply = _ask(_query({**_plan(tiny_model_dir).to_record(), **change}), node)
    assert reply.has_error() and reply.error.code == site_app.ERROR_REFUSED
    assert expected in reply.error.reason, reply.error.reason
    assert _ledger(tmp_path) is None


def test_a_simulated_site_without_max_epsilon_refuses_epsilon_inf(tmp_path, tiny_model_dir, mnist_small_npz,
                                                                  flower_identity):
    cfg = FederationConfig(data=str(mnist_small_npz), num_sites=2, base_model=str(tiny_model_dir), epsilon=math.inf,
                           batch_size=8, out=str(tmp_path / "run"))
    reply = _ask(_query(cfg.to_record()), {"partition-id": 0, "num-partitions": 2})
    assert reply.has_error() and "finite ε" in reply.error.reason
    sites = tmp_path / "run" / "private" / "sites"
    assert not sites.exists() or not list(sites.rglob("ledger.json"))


def test_a_site_never_releases_without_noise():
    for sigma in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(Refusal, match="σ > 0"):
            check_noise("DP-SGD", sigma)
    check_noise("DP-SGD", 0.5)


def _train_msg(cfg: FederationConfig, selected, state, rnd=1) -> Message:
    return Message(RecordDict({"config": ConfigRecord({**cfg.to_record(), "selected": selected, "round": rnd}),
                               "adapter": ArrayRecord(torch_state_dict=state)}), dst_node_id=1, message_type="train")


def test_a_site_refuses_crafted_training_requests(tmp_path, tiny_model_dir, site_npz, flower_identity):
    cfg = _plan(tiny_model_dir)
    gen = load_generator(tiny_model_dir)
    names = candidate_modules(gen.unet, cfg.candidates)
    selected = names[:3]
    state = trainable_state(make_trainable(gen, "saliency", selected))
    node = _node(tmp_path, site_npz, tiny_model_dir)
    huge = {k: v * 1e6 if "lora_A" in k else v for k, v in state.items()}
    nan = {k: torch.full_like(v, math.nan) for k, v in state.items()}
    extra = {**state, "evil": torch.zeros(3)}
    cases = [
        (_train_msg(cfg, selected, huge), "norm"),
        (_train_msg(cfg, selected, nan), "non-finite"),
        (_train_msg(cfg, selected, extra), "wrong keys"),
        (_train_msg(cfg, ["conv_in", "../../etc"], state), "not distinct candidates"),
        (_train_msg(cfg, names, state), "more matrices"),
        (_train_msg(cfg, selected, state, rnd=0), "round"),
        (_train_msg(cfg, selected, state, rnd=99), "round"),
    ]
    for msg, expected in cases:
        reply = _ask(msg, node)
        assert reply.has_error() and expected in reply.error.reason, (expected, reply.error.reason)
    assert _ledger(tmp_path) is None  # nothing was spent
    # A crafted adapter within the site's (raised) norm bound that overflows for one class: the reply stays finite.
    node["limits"] = "max-adapter-norm=1e39"
    crafted = {k: v.clone() for k, v in state.items()}
    emb_key = next(k for k in crafted if "class_embedding" in k)
    crafted[emb_key][3] = 1e37
    reply = _ask(_train_msg(cfg, selected, crafted), node)
    assert not reply.has_error(), reply.error.reason
    back = reply.content["adapter"].to_torch_state_dict()
    assert all(torch.isfinite(v).all() for k, v in back.items() if k != emb_key)
    assert torch.isfinite(back[emb_key][[0, 1, 2, 4, 5, 6, 7, 8, 9]]).all()  # row 3 is the server's own (inf in fp16)


def test_a_sites_training_step_carries_the_noise_its_ledger_records(tmp_path, tiny_model_dir, site_npz,
                                                                    flower_identity):
    """The site records a Mechanism from its plan and hands σ to DP-SGD separately: the adapter it sends must carry
    exactly the recorded noise. One SGD step at lr 1 moves every trainable coordinate by −(S + N(0, σ²C²))/B, with
    the clipped sum S of a few records spread thin over thousands of coordinates."""
    cfg = _plan(tiny_model_dir, optimizer="sgd", lr=1.0, local_steps=1, batch_size=4, clip=0.05)
    gen = load_generator(tiny_model_dir)
    selected = candidate_modules(gen.unet, cfg.candidates)[:8]
    state = trainable_state(make_trainable(gen, "saliency", selected))
    reply = _ask(_train_msg(cfg, selected, state), _node(tmp_path, site_npz, tiny_model_dir))
    assert not reply.has_error(), reply.error.reason
    back = reply.content["adapter"].to_torch_state_dict()
    moved = torch.cat([(back[k].double() - state[k].double()).flatten() for k in state]) * cfg.batch_size
    (recorded,) = _ledger(tmp_path).mechanisms
    assert recorded.name == "dp-sgd" and moved.numel() > 2000
    assert float(moved.std()) == pytest.approx(recorded.noise_multiplier * cfg.clip, rel=0.08)


def test_a_sites_central_image_release_carries_the_noise_its_ledger_records(tmp_path, tiny_model_dir, site_npz,
                                                                            flower_identity):
    """The released sums minus the noiseless sums of the site's own records are the noise alone: std σΔ with the σ
    of the site's ledger (Δ = √(B² + 1), B from the public images)."""
    from sapf.engine.central_images import contribution_bound, image_bound, release_central_images
    from sapf.engine.run import load_private_data

    cfg = _plan(tiny_model_dir, warmup="central-images", selection="attention")
    msg = Message(RecordDict({"config": ConfigRecord(cfg.to_record())}), dst_node_id=1,
                  message_type="query.central_images")
    reply = _ask(msg, _node(tmp_path, site_npz, tiny_model_dir))
    assert not reply.has_error(), reply.error.reason
    gen = load_generator(tiny_model_dir)
    bound = image_bound(load_dataset(cfg.public_data, gen.image_size, gen.channels))
    noiseless = release_central_images(data=load_private_data(str(site_npz), gen, 0.0), num_classes=gen.num_classes,
                                       bound=bound, noise_multiplier=0.0, sample_rate=1.0, queries=1, ledger=None)
    noise = reply.content["sums"]["sums"].numpy() - noiseless
    (recorded,) = _ledger(tmp_path).mechanisms
    assert recorded.name == "central-images" and noise.size > 500
    assert float(np.std(noise)) == pytest.approx(recorded.noise_multiplier * contribution_bound(bound), rel=0.15)


def test_error_replies_carry_no_paths_or_data_facts(tmp_path, tiny_model_dir, flower_identity):
    secret = tmp_path / "patients-of-dr-x" / "hiv-positive.npz"
    secret.parent.mkdir()
    secret.write_bytes(b"not an npz")
    node = _node(tmp_path, secret, tiny_model_dir)
    reply = _ask(_query(_plan(tiny_model_dir).to_record()), node)
    assert reply.has_error() and reply.error.code == site_app.ERROR_FAILED
    assert reply.error.reason == site_app.FAILED_REASON


def test_one_lifetime_ledger_per_dataset(tmp_path, tiny_model_dir, site_npz, flower_identity):
    from sapf.errors import SapfError
    from sapf.federation.site_policy import retire_dataset
    from sapf.federation.task import dataset_fingerprint

    node = _node(tmp_path, site_npz, tiny_model_dir)
    assert not _ask(_query(_plan(tiny_model_dir).to_record()), node).has_error()
    other = tmp_path / "other.npz"
    with np.load(site_npz) as z:
        np.savez(other, images=z["images"][::-1], labels=z["labels"][::-1])
    node_other = {**node, "data-path": str(other)}
    reply = _ask(_query(_plan(tiny_model_dir).to_record()), node_other)
    assert reply.has_error() and "data changed" in reply.error.reason
    assert [m.steps for m in _ledger(tmp_path).mechanisms] == [1]  # the old ledger, untouched
    # Only `sapf join --new-dataset` (before its SuperNode starts) sets the old ledger aside; a request cannot.
    retired = retire_dataset(tmp_path / "state", dataset_fingerprint(None, node_other))
    assert (retired / "ledger.json").exists() and _ledger(tmp_path) is None
    assert not _ask(_query(_plan(tiny_model_dir).to_record()), node_other).has_error()
    assert [m.steps for m in _ledger(tmp_path).mechanisms] == [1]
    # Going back to the first data never starts its ledger afresh.
    with pytest.raises(SapfError, match="set aside before"):
        retire_dataset(tmp_path / "state", dataset_fingerprint(None, node))


def test_the_same_records_never_start_a_second_ledger(tmp_path, tiny_model_dir, site_npz, flower_identity,
                                                      monkeypatch):
    """`sapf join`'s default state dir follows the data's path: the same bytes copied elsewhere, or joined with
    another --state-dir, must continue their ledger, not start a fresh budget. Refused before any SuperNode starts."""
    import shutil

    from sapf.errors import SapfError
    from sapf.federation.deployment import SiteConfig, Tls, join
    from sapf.federation.site_policy import retire_dataset
    from sapf.federation.task import dataset_fingerprint

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert not _ask(_query(_plan(tiny_model_dir).to_record()), _node(tmp_path, site_npz, tiny_model_dir)).has_error()
    copy = tmp_path / "elsewhere" / site_npz.name  # the fingerprint holds a file's name (a folder's: relative paths)
    copy.parent.mkdir()
    shutil.copy(site_npz, copy)
    for data in (site_npz, copy):  # a state dir beside the ledger's
        with pytest.raises(SapfError, match=f"ledger, in {tmp_path / 'state'}"):
            join("127.0.0.1:9", SiteConfig(data, tmp_path / "state-b", 20.0), Tls(insecure=True), wait=0,
                 say=lambda _: None)
    assert [m.steps for m in _ledger(tmp_path).mechanisms] == [1]
    # A ledger under the default root (~/.sapf/sites) is found from a state dir anywhere.
    default = tmp_path / "home" / ".sapf" / "sites" / "site-a"
    default.parent.mkdir(parents=True)
    (tmp_path / "state").rename(default)
    with pytest.raises(SapfError, match=f"ledger, in {default}"):
        join("127.0.0.1:9", SiteConfig(copy, tmp_path / "x" / "y", 20.0), Tls(insecure=True), wait=0,
             say=lambda _: None)
    # Set aside by --new-dataset (other data joined in its place, no request yet): still that data's ledger.
    other = tmp_path / "other.npz"
    with np.load(site_npz) as z:
        np.savez(other, images=z["images"][::-1], labels=z["labels"][::-1])
    retire_dataset(default, dataset_fingerprint(None, {"data-path": str(other)}))  # what `join --new-dataset` runs
    with pytest.raises(SapfError, match=f"ledger, in {default / 'retired-'}"):
        join("127.0.0.1:9", SiteConfig(copy, default, 20.0), Tls(insecure=True), wait=0, say=lambda _: None)


def test_the_fingerprint_is_the_datas_not_the_plans(tmp_path, site_npz):
    from sapf.federation.task import dataset_fingerprint

    node = {"data-path": str(site_npz)}
    small, big = load_dataset(str(site_npz), 16, 1), load_dataset(str(site_npz), 28, 1)
    assert dataset_fingerprint(small, node) == dataset_fingerprint(big, node)  # a base model of another size


def test_a_site_accounts_at_its_own_delta(tmp_path, tiny_model_dir, site_npz, flower_identity):
    from sapf.engine.privacy import default_delta

    node = _node(tmp_path, site_npz, tiny_model_dir, delta=1e-4)
    assert not _ask(_query(_plan(tiny_model_dir).to_record()), node).has_error()
    assert _ledger(tmp_path).delta == 1e-4
    reply = _ask(_query(_plan(tiny_model_dir, delta=1e-3).to_record()), node)
    assert reply.has_error() and "δ" in reply.error.reason
    # Without --delta a deployed site uses 1/(n ln n) of its n; a server cannot pick a larger δ for it.
    fresh = _node(tmp_path / "b", site_npz, tiny_model_dir)
    reply = _ask(_query(_plan(tiny_model_dir, delta=0.9 / 24).to_record()), fresh)
    assert reply.has_error() and "δ" in reply.error.reason and _ledger(tmp_path / "b") is None
    assert not _ask(_query(_plan(tiny_model_dir).to_record()), fresh).has_error()
    assert _ledger(tmp_path / "b").delta == pytest.approx(default_delta(24))


def test_concurrent_requests_lose_no_ledger_update(tmp_path, site_npz):
    from sapf.federation.client_app import Site
    from sapf.federation.site_policy import SiteLimits, SiteSettings
    from sapf.federation.task import SitePlan

    data = load_dataset(str(site_npz), 16, 1)
    site = Site(FederationConfig(), SiteSettings(1e6, None, (), SiteLimits()), None, data, "s",
                SitePlan(1e-3, 5.0, 1.0, 0.1, 100, 1), tmp_path / "state", "f" * 64)
    step = Mechanism("dp-sgd", 1.0, 0.1, 1)

    def spend_many():
        for _ in range(15):
            site.spend([step])

    threads = [threading.Thread(target=spend_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(m.steps for m in _ledger(tmp_path).mechanisms) == 60


def test_every_recorded_epsilon_holds_under_an_independent_pld_accountant(tmp_path, tiny_model_dir, mnist_small_npz):
    # Google's dp_accounting (PLD) recomputes ε from privacy.json alone: at most the recorded ε (to 1%),
    # which is at most the target.
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from typer.testing import CliRunner

    from sapf.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--base-model", str(tiny_model_dir), "--data", str(mnist_small_npz),
                                 "--epsilon", "3", "--steps", "3", "--batch-size", "16", "--out", str(out)])
    assert r.exit_code == 0, r.output
    priv = json.loads((out / "privacy.json").read_text())
    events = [dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(m["sample_rate"], dp_event.GaussianDpEvent(m["noise_multiplier"]))
        if m["sample_rate"] < 1 else dp_event.GaussianDpEvent(m["noise_multiplier"]), m["steps"])
        for m in priv["mechanisms"]]
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_event.ComposedDpEvent(events))
    assert [m["name"] for m in priv["mechanisms"]] == ["saliency-query", "dp-sgd"]
    assert acc.get_epsilon(priv["delta"]) <= priv["epsilon_spent"] * 1.01
    assert priv["epsilon_spent"] <= priv["target_epsilon"]
    assert "neighbouring" in priv and "add/remove" in priv["guarantee"]


def test_a_model_directory_is_read_as_weights_only(tmp_path):
    # A pickled checkpoint can run code when unpickled: sapf (and so every site) loads safetensors only.
    from sapf.errors import SapfError

    gen = tiny_generator()
    gen.unet.save_pretrained(tmp_path / "pickled" / "unet", safe_serialization=False)
    assert (tmp_path / "pickled" / "unet" / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(SapfError, match="cannot load the UNet"):
        load_generator(tmp_path / "pickled")


# Per query: the engine module whose noisy_sum makes the release, its ledger name, the plan, and the public network
# the request carries (a class count; none for the queries that run on the site's own model).
RELEASES = {
    "saliency": ("saliency", "saliency-query", {}, None),
    "central_images": ("central_images", "central-images", {"warmup": "central-images"}, None),
    "sparta_mask": ("sparta", "sparta-mask", {"selection": "sparta", "mask_steps": 2}, None),
    "mean_embeddings": ("mepf", "mean-embeddings", {"method": "dp-mepf"}, ("features", 10)),
    # the same query as a diffusion plan's warm-up (the whole run's budget checked first, then recorded)
    "mean_embeddings+warmup": ("mepf", "mean-embeddings", {"warmup": "mean-embeddings", "selection": "attention"},
                               ("features", 10)),
    "semantic": ("semantic", "semantic-query", {"public_selection": "semantic", "selection": "attention"},
                 ("classifier", 79)),
}


def _release_request(query: str, tiny_model_dir) -> Message:
    """The server's request for one of RELEASES: its plan, and the public network it carries, if any."""
    from sapf.engine.mepf import FeatureNet
    from sapf.federation.task import base_to_wire

    _, _, plan, network = RELEASES[query]
    content = {"config": ConfigRecord(_plan(tiny_model_dir, **plan).to_record())}
    if network is not None:
        content[network[0]] = base_to_wire(FeatureNet(1, network[1]))
    return Message(RecordDict(content), dst_node_id=1, message_type=f"query.{query.split('+')[0]}")


@pytest.mark.parametrize("query", list(RELEASES))
def test_a_site_records_its_release_before_computing_it(tmp_path, tiny_model_dir, site_npz, flower_identity,
                                                        monkeypatch, query):
    """When the site starts computing a release, its ledger on disk already holds it: a crash, a kill or a reply
    lost mid-query cannot leave a release unrecorded. The spy reads the ledger and calls the real noisy sum."""
    import importlib

    from sapf.engine import noisy_sum

    module, name, plan, _ = RELEASES[query]
    seen = []

    def spy(**kwargs):
        ledger = _ledger(tmp_path)
        seen.append([m.name for m in ledger.mechanisms] if ledger is not None else [])
        return noisy_sum.noisy_sum(**kwargs)

    monkeypatch.setattr(importlib.import_module(f"sapf.engine.{module}"), "noisy_sum", spy)
    reply = _ask(_release_request(query, tiny_model_dir), _node(tmp_path, site_npz, tiny_model_dir))
    assert not reply.has_error(), reply.error.reason
    assert seen and all(s == [name] for s in seen)  # every step of the release (SPARTA's: mask_steps of them)
    assert len(seen) == plan.get("mask_steps", 1)


@pytest.mark.parametrize("query", [q for q, (*_, network) in RELEASES.items() if network is not None])
def test_a_site_refuses_a_public_network_wider_than_its_limit_and_spends_nothing(tmp_path, tiny_model_dir, site_npz,
                                                                                flower_identity, query):
    """The public network's class count is the server's to choose; the site caps it (its own `--limit`), since the
    release's width is the site's memory."""
    classes = RELEASES[query][3][1]
    reply = _ask(_release_request(query, tiny_model_dir),
                 _node(tmp_path, site_npz, tiny_model_dir, limits=f"max-public-classes={classes - 1}"))
    assert reply.has_error() and reply.error.code == site_app.ERROR_REFUSED
    assert f"between 1 and {classes - 1} classes; it scores {classes}" in reply.error.reason, reply.error.reason
    assert _ledger(tmp_path) is None


def test_a_site_records_its_training_before_computing_it(tmp_path, tiny_model_dir, site_npz, flower_identity,
                                                         monkeypatch):
    """A round's DP-SGD steps are in the site's ledger on disk before it trains (a reply cached unrecorded would be
    sent again for free), and a refused round leaves no reply behind."""
    seen = []

    def spy(*args, **kwargs):
        seen.append([(m.name, m.steps) for m in _ledger(tmp_path).mechanisms])
        return dp_finetune(*args, **kwargs)

    monkeypatch.setattr(site_app, "dp_finetune", spy)
    cfg = _plan(tiny_model_dir, local_steps=3)
    gen = load_generator(tiny_model_dir)
    selected = candidate_modules(gen.unet, cfg.candidates)[:2]
    state = trainable_state(make_trainable(gen, "saliency", selected))
    node = _node(tmp_path, site_npz, tiny_model_dir)
    reply = _ask(_train_msg(cfg, selected, state), node)
    assert not reply.has_error(), reply.error.reason
    assert seen == [[("dp-sgd", 3)]]
    replies = tmp_path / "state" / "replies"
    cached = sorted(replies.iterdir())
    ledger = _ledger(tmp_path)  # spent elsewhere since: the next round would pass the site's lifetime limit
    ledger.record("dp-sgd", 0.5, 1.0, 2000)
    ledger.save(tmp_path / "state" / "ledger.json")
    moved = {k: v + 0.01 for k, v in state.items()}
    refused = _ask(_train_msg(cfg, selected, moved, rnd=2), node)
    assert refused.has_error() and "would bring the site" in refused.error.reason, refused.error.reason
    assert len(seen) == 1 and sorted(replies.iterdir()) == cached

