import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from sapf.engine.privacy import (
    RDP_ORDERS,
    Mechanism,
    PlannedRelease,
    PrivacyLedger,
    calibrate_noise,
    check_privacy_args,
    default_delta,
    epsilon_of,
    plan_privacy,
)
from sapf.errors import SapfError


def test_ledger_is_on_disk_when_save_returns(tmp_path, monkeypatch):
    """A site saves its ledger before a release leaves: save returns only after the new file's bytes and the rename
    are fsynced, so a power cut after the release cannot bring back a ledger without it."""
    import os

    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ledger = PrivacyLedger(10.0, 1e-5)
    ledger.record("saliency-query", 4.0, 1.0)
    path = tmp_path / "ledger.json"
    ledger.save(path)
    assert synced == [path.stat().st_ino, tmp_path.stat().st_ino]  # the file (renamed, same inode), then its folder
    assert PrivacyLedger.load(path).mechanisms == ledger.mechanisms


def test_ledger_epsilon_equals_an_accountant_on_the_same_history(tmp_path):
    ledger = PrivacyLedger(10.0, 1e-5)
    ledger.record("saliency-query", 4.0, 1.0)
    for _ in range(50):
        ledger.record("dp-sgd", 1.1, 0.016)
    assert [(m.name, m.steps) for m in ledger.mechanisms] == [("saliency-query", 1), ("dp-sgd", 50)]
    snapshot = ledger.to_dict()
    acc = RDPAccountant()
    acc.step(noise_multiplier=4.0, sample_rate=1.0)
    for _ in range(50):
        acc.step(noise_multiplier=1.1, sample_rate=0.016)
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # Our cached composition is Opacus's RDPAccountant on the same history and orders, to rounding.
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(1e-5, alphas=RDP_ORDERS), rel=1e-12)
    ledger.record("dp-sgd", 0.9, 0.032, 7)
    for _ in range(7):
        acc.step(noise_multiplier=0.9, sample_rate=0.032)
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(1e-5, alphas=RDP_ORDERS), rel=1e-12)
    d = snapshot
    assert set(d) >= {"target_epsilon", "delta", "accountant", "epsilon_spent", "mechanisms"}
    assert d["mechanisms"][1] == {"name": "dp-sgd", "noise_multiplier": 1.1, "sample_rate": 0.016, "steps": 50}
    ledger.save(tmp_path / "p.json")
    assert PrivacyLedger.load(tmp_path / "p.json").epsilon() == pytest.approx(ledger.epsilon())
    # An independent accountant (PRV) recomputes from the written history alone.
    prv = PRVAccountant()
    prv.history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in d["mechanisms"]]
    assert prv.get_epsilon(1e-5) <= d["epsilon_spent"] * 1.05


@pytest.mark.parametrize(("noise_multiplier", "sample_rate"), [(0.7, 1e-3), (1.1, 0.16), (4.0, 0.9), (4.0, 1.0)])
def test_each_steps_rdp_curve_is_opacuss_at_every_order(noise_multiplier, sample_rate):
    """The cached one-step curve skips the orders where Opacus overflows (NaN): every order, NaN or not, must still be
    exactly what Opacus computes, or the ledger's ε would not be Opacus's."""
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    from sapf.engine.privacy import _rdp_one_step

    ours = np.array(_rdp_one_step(noise_multiplier, sample_rate))
    theirs = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS)
    np.testing.assert_array_equal(ours, theirs)  # NaN where Opacus gives NaN, bit for bit elsewhere
    assert np.isfinite(ours).sum() >= 100  # the orders that decide ε are there


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_meets_the_target_tightly(accountant):
    prior = [Mechanism("saliency-query", 5.0, 1.0, 1)]
    sigma = calibrate_noise(8.0, 1e-5, 0.02, 200, prior, accountant)
    eps = epsilon_of(prior + [Mechanism("dp-sgd", sigma, 0.02, 200)], 1e-5, accountant)
    assert eps <= 8.0
    assert epsilon_of(prior + [Mechanism("dp-sgd", sigma * 0.98, 0.02, 200)], 1e-5, accountant) > 8.0


def _plan(eps, releases, q=64 / 4000, steps=300):
    return plan_privacy(target_epsilon=eps, delta=1e-5, releases=releases, train_sample_rate=q, train_steps=steps)


def test_plan_splits_the_budget_and_the_total_meets_it():
    p = _plan(10.0, [PlannedRelease("saliency-query", 0.1)])
    sel_only = epsilon_of([Mechanism("s", p.selection_noise, 1.0, 1)], 1e-5)
    assert sel_only == pytest.approx(1.0, rel=0.01)
    total = epsilon_of(p.planned(), 1e-5)
    assert 9.9 <= total <= 10.0
    assert _plan(math.inf, [PlannedRelease("saliency-query", 0.1)], 0.01, 10).planned() == []


def test_the_plan_splits_epsilon_over_every_stage_of_the_run():
    """Two releases before training (e.g. central images, then the saliency query): the first k together
    spend ε·(share₁ + … + shareₖ), and the whole run meets ε exactly; the stage list of a run decides them."""
    from sapf.config import TrainConfig
    from sapf.engine.stages import plan_run, stages_of

    p = _plan(10.0, [PlannedRelease("central-images", 0.05, 0.5, 3), PlannedRelease("saliency-query", 0.1)])
    first, both = p.releases[:1], p.releases
    assert [m.name for m in both] == ["central-images", "saliency-query"] and both[0].steps == 3
    assert epsilon_of(first, 1e-5) == pytest.approx(0.5, rel=0.01)
    assert epsilon_of(both, 1e-5) == pytest.approx(1.5, rel=0.01)
    assert 9.9 <= epsilon_of(p.planned(), 1e-5) <= 10.0
    with pytest.raises(SapfError, match="sum below 1"):
        _plan(10.0, [PlannedRelease("a", 0.6), PlannedRelease("b", 0.5)])
    # A public selection has no query: DP-SGD gets all of ε.
    stages = stages_of(TrainConfig(selection="attention", warmup="none"))
    assert [s.name for s in stages] == ["select", "finetune"] and not stages[0].release
    p = plan_run(stages, epsilon=10.0, delta=1e-5, accountant="rdp", train_sample_rate=0.016, train_steps=300)
    assert p.releases == [] and 9.9 <= epsilon_of(p.planned(), 1e-5) <= 10.0
    saliency = stages_of(TrainConfig(selection_budget=0.2, warmup="none"))[0]
    assert (saliency.release, saliency.epsilon_share) == ("saliency-query", 0.2)


def test_auto_warmup_from_its_epsilon_up_for_a_class_conditional_model():
    from sapf.config import TrainConfig
    from sapf.defaults import WARMUP_MIN_EPSILON
    from sapf.engine.stages import stages_of

    def names(cfg):
        return [s.name for s in stages_of(cfg)]

    assert TrainConfig().warmup == "auto" and names(TrainConfig(epsilon=WARMUP_MIN_EPSILON))[0] == "warmup"
    assert names(TrainConfig(epsilon=WARMUP_MIN_EPSILON / 2)) == ["select", "finetune"]
    assert names(TrainConfig(epsilon=1.0, warmup="central-images"))[0] == "warmup"  # asked for: always
    assert names(TrainConfig(epsilon=10.0, warmup="none")) == ["select", "finetune"]
    # Made concrete for the model (what a federated server sends its sites): no classes, no central images.
    assert TrainConfig(epsilon=10.0).for_model(conditional=True).warmup == "central-images"
    assert TrainConfig(epsilon=10.0).for_model(conditional=False).warmup == "none"
    assert TrainConfig(epsilon=1.0).for_model(conditional=True).warmup == "none"


def test_refusals():
    with pytest.raises(SapfError, match="delta"):
        check_privacy_args(10, 1 / 100, 100)
    with pytest.raises(SapfError, match="epsilon"):
        check_privacy_args(0, None, 100)
    d = check_privacy_args(10, None, 4000)
    assert d == pytest.approx(default_delta(4000)) and d < 1 / 4000
    with pytest.raises(SapfError, match="already spend"):
        calibrate_noise(1.0, 1e-5, 0.1, 10, [Mechanism("x", 0.3, 1.0, 5)])
    with pytest.raises(SapfError, match="no noise level"):
        calibrate_noise(1e-4, 1e-5, 1.0, 10**6, max_sigma=50)


def test_small_epsilon_is_certifiable_at_small_delta():
    """With Opacus's default Rényi orders (≤ 63) no σ certifies ε = 0.1 at δ = 1e-5, so a 10%
    selection share of ε = 1 was refused. For one Gaussian mechanism the answer is known in closed
    form (Balle & Wang's exact δ(ε) of the Gaussian mechanism), an accountant-independent check;
    the classic σ = sqrt(2 ln(1.25/δ))/ε ≈ 48 is an upper reference."""
    import math

    from scipy.stats import norm

    from sapf.engine.privacy import Mechanism, PlannedRelease, calibrate_noise, epsilon_of, plan_privacy

    sigma = calibrate_noise(0.1, 1e-5, 1.0, 1)
    assert epsilon_of([Mechanism("q", sigma, 1.0, 1)], 1e-5) <= 0.1 + 1e-9
    exact_delta = norm.cdf(1 / (2 * sigma) - 0.1 * sigma) - math.exp(0.1) * norm.cdf(-1 / (2 * sigma) - 0.1 * sigma)
    assert exact_delta <= 1e-5 and sigma <= math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.1
    plan = plan_privacy(target_epsilon=1.0, delta=1e-5, releases=[PlannedRelease("saliency-query", 0.1)],
                        train_sample_rate=64 / 4000, train_steps=200)
    assert plan.selection_noise > 0 and plan.train_noise > 0
