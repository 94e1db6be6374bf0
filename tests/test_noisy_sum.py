"""The noisy-sum mechanism itself: the bound, the noise, the record — with contributions that try to break them."""

import math

import numpy as np
import pytest
import torch

from sapf.engine.noisy_sum import NoisySum, noisy_sum
from sapf.engine.privacy import Mechanism, PrivacyLedger
from sapf.errors import SapfError


def _rows(table: torch.Tensor):
    return lambda idx: table[torch.from_numpy(idx)]


def test_one_added_record_moves_the_noiseless_sum_by_at_most_the_bound():
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.normal(0, 100, (50, 30)))  # every row far past the bound
    release = NoisySum("test", bound=0.5, noise_multiplier=0.0)
    without, _ = noisy_sum(release=release, num_records=49, dim=30, contributions=_rows(data[:49]), ledger=None)
    with_one, used = noisy_sum(release=release, num_records=50, dim=30, contributions=_rows(data), ledger=None, chunk=7)
    assert used == 50
    moved = np.linalg.norm(with_one - without)
    assert 0.5 * (1 - 1e-9) <= moved <= 0.5 * (1 + 1e-9)


def test_a_non_finite_contribution_counts_as_zero():
    data = torch.ones(4, 3)
    data[2, 1] = math.nan
    data[3, 0] = math.inf
    total, _ = noisy_sum(release=NoisySum("test", 10.0, 0.0), num_records=4, dim=3, contributions=_rows(data),
                         ledger=None)
    np.testing.assert_allclose(total, [2.0, 2.0, 2.0])


def test_the_noise_has_std_sigma_times_bound_is_fresh_and_recorded_before_return():
    ledger = PrivacyLedger(10.0, 1e-5)
    release = NoisySum("semantic-query", bound=0.5, noise_multiplier=2.0, sample_rate=0.3)
    zeros = lambda idx: torch.zeros(len(idx), 20_000)  # noqa: E731
    a, used = noisy_sum(release=release, num_records=1000, dim=20_000, contributions=zeros, ledger=ledger)
    b, _ = noisy_sum(release=release, num_records=1000, dim=20_000, contributions=zeros, ledger=ledger)
    assert np.std(a) == pytest.approx(1.0, rel=0.02) and np.std(b) == pytest.approx(1.0, rel=0.02)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05  # two releases never share a draw
    assert 200 < used < 400  # a Poisson sample at rate 0.3
    assert ledger.mechanisms == [Mechanism("semantic-query", 2.0, 0.3, 2)]


def test_the_sample_is_poisson():
    """Each record joins independently with probability q, so the sample's size varies as Binomial(N, q) (std
    √(Nq(1−q)) ≈ 14.5 here); a fixed-size sample, which the accountant does not cover, would not vary at all."""
    release = NoisySum("test", bound=1.0, noise_multiplier=1.0, sample_rate=0.3)
    ones = lambda idx: torch.ones(len(idx), 1)  # noqa: E731
    used = [noisy_sum(release=release, num_records=1000, dim=1, contributions=ones, ledger=None)[1]
            for _ in range(40)]
    assert 270 < np.mean(used) < 330 and 7 < np.std(used) < 25


def test_a_record_gets_one_contribution_row():
    """A method that returned several rows for one record (its replicas, unaveraged) would give that record
    several times the bound: refused."""
    replicas = lambda idx: torch.ones(2 * len(idx), 3)  # noqa: E731
    with pytest.raises(SapfError, match="contributions for"):
        noisy_sum(release=NoisySum("test", 1.0, 1.0), num_records=4, dim=3, contributions=replicas, ledger=None)


def test_what_contributions_draw_from_the_global_generator_is_fresh():
    """A network's own randomness inside a release (a user's model with dropout) does not follow --seed; outside the
    release the global generator continues as the seed set it."""
    draws = lambda idx: torch.rand(len(idx), 4)  # noqa: E731  (torch's global generator)
    release = NoisySum("test", bound=10.0, noise_multiplier=0.0)
    torch.manual_seed(0)
    a, _ = noisy_sum(release=release, num_records=3, dim=4, contributions=draws, ledger=None)
    after_a = torch.rand(1)
    torch.manual_seed(0)
    b, _ = noisy_sum(release=release, num_records=3, dim=4, contributions=draws, ledger=None)
    assert not np.allclose(a, b)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after_a)  # public randomness after the release is still the seed's


def test_bad_releases_are_refused():
    for kw in (dict(bound=0.0), dict(bound=math.inf), dict(noise_multiplier=-1.0), dict(noise_multiplier=math.nan),
               dict(sample_rate=0.0), dict(sample_rate=1.5)):
        with pytest.raises(SapfError):
            NoisySum(**{"name": "x", "bound": 1.0, "noise_multiplier": 1.0, **kw})
