"""One privacy ledger per dataset holder, and noise calibration against a target (ε, δ).

Every release computed from private data — the saliency query, every DP-SGD step, any
later pre-query — is a (subsampled) Gaussian mechanism recorded here, in order. ε is always
recomputed from the whole history with an Opacus accountant, and ``privacy.json`` lists that
history so anyone can recompute ε with an independent accountant.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sapf.config import ConfigError
from sapf.errors import SapfError
from sapf.outputs import read_json, write_json

# Rényi orders for the RDP accountant: Opacus's defaults stop at 63, which cannot certify a
# small ε at a small δ at all (log(1/δ)/(α-1) alone exceeds 0.1 for δ=1e-5), so a 10% selection
# share of ε=1 would be refused. Larger orders only tighten the (still valid) bound.
RDP_ORDERS = tuple(sorted({1 + x / 10.0 for x in range(1, 100)} | set(range(12, 64))
                          | {int(1.25 ** k) for k in range(19, 50)}))


# The neighbouring relation of every guarantee sapf states (Opacus's, for Poisson-subsampled mechanisms).
NEIGHBOURING = "add/remove one record"
# What the accounting takes as known to everyone: each sample rate is (expected batch) / N and the
# default δ is 1/(N ln N), so N itself is revealed; federated sites also report it with each reply.
# Hence the guarantee covers what a record is, not whether N counts it: with N known exactly, someone who knows every
# other record learns whether one more is there (the convention of DP-SGD libraries that take q = B/N).
TREATED_AS_PUBLIC = ("the number of records N (so membership shown by N alone is not hidden); the plan (every noise "
                     "multiplier, sample rate and step count); the public model and public data")


@dataclass
class Mechanism:
    """A Gaussian mechanism run `steps` times; sample_rate 1.0 means no subsampling."""

    name: str
    noise_multiplier: float
    sample_rate: float
    steps: int = 1


def _accountant(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "rdp":
        return RDPAccountant()
    if kind == "prv":
        return PRVAccountant()
    raise SapfError(f"unknown accountant '{kind}' (rdp or prv)")


def epsilon_of(mechanisms: list[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """ε of the composition of `mechanisms` at δ (0 for an empty history, ∞ if any is noiseless)."""
    live = [m for m in mechanisms if m.steps > 0]
    if not live:
        return 0.0
    if any(m.noise_multiplier <= 0 for m in live):
        return math.inf
    if accountant == "rdp":
        # What RDPAccountant.get_epsilon computes (Σ steps·RDP(σ, q) over the history, then the
        # (ε, δ) conversion), with each mechanism's one-step RDP curve cached: Opacus recomputes it
        # at every call, in pure Python (~0.3 s a mechanism), and ε is asked for several times a
        # request, and dozens of times by a noise calibration's bisection.
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = [sum(m.steps * r for m, r in zip(live, per_order, strict=True)) for per_order in
               zip(*(_rdp_one_step(m.noise_multiplier, m.sample_rate) for m in live), strict=True)]
        return float(get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)[0])
    acc = _accountant(accountant)  # prv, or an unknown name (refused there)
    acc.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in live]
    return float(acc.get_epsilon(delta=delta))


def _binomials_overflow(order: float) -> bool:
    """Whether Opacus's RDP of a subsampled Gaussian at this integer order sums binomial coefficients past float64:
    it then returns NaN (inf − inf), which its ε conversion skips, after a Python loop of `order` terms."""
    if not float(order).is_integer():
        return False
    a, k = int(order), int(order) // 2
    return math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1) > math.log(sys.float_info.max)


# The orders Opacus can evaluate for a subsampled step: the rest (the integer orders from ~1,030 up) come out NaN
# whatever σ and q, and computing them took 1.8 of the 2.1 s a step's curve costs (a noise calibration asks for ~40).
# Should a later Opacus evaluate them, leaving them out can only raise ε (fewer orders to minimise over), never
# lower it; the test comparing every order with Opacus's would flag the difference.
SUBSAMPLED_ORDERS = tuple(a for a in RDP_ORDERS if not _binomials_overflow(a))


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Opacus's RDP of one (subsampled) Gaussian step at every order of RDP_ORDERS; `steps` of them compose to
    steps × this. For 0 < q < 1 the orders where Opacus's own computation overflows are NaN without running it
    (the same values: tests/test_privacy.py compares every order with Opacus's)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = SUBSAMPLED_ORDERS if 0 < sample_rate < 1 else RDP_ORDERS
    rdp = dict(zip(orders, compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders),
                   strict=True))
    return tuple(float(rdp.get(a, math.nan)) for a in RDP_ORDERS)


@dataclass
class PrivacyLedger:
    target_epsilon: float
    delta: float
    accountant: str = "rdp"
    mechanisms: list[Mechanism] = field(default_factory=list)

    def record(self, name: str, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record a release; consecutive runs of the same mechanism are merged into one entry."""
        last = self.mechanisms[-1] if self.mechanisms else None
        if last and (last.name, last.noise_multiplier, last.sample_rate) == (name, noise_multiplier, sample_rate):
            last.steps += steps
        else:
            self.mechanisms.append(Mechanism(name, float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self) -> float:
        return epsilon_of(self.mechanisms, self.delta, self.accountant)

    def would_spend(self, extra: list[Mechanism]) -> float:
        return epsilon_of(self.mechanisms + extra, self.delta, self.accountant)

    @property
    def private(self) -> bool:
        return math.isfinite(self.target_epsilon)

    def to_dict(self) -> dict:
        """``epsilon_spent`` is null for a non-private run (ε = ∞): nothing is guaranteed."""
        eps = self.epsilon() if self.private else None
        guarantee = (f"(ε={eps:.4g}, δ={self.delta:.3g})-differential privacy; neighbouring datasets: {NEIGHBOURING}"
                     if eps is not None and math.isfinite(eps) else "none: at least one release carried no noise")
        return {
            "guarantee": guarantee,
            "neighbouring": NEIGHBOURING,
            "treated_as_public": TREATED_AS_PUBLIC,
            "target_epsilon": self.target_epsilon if self.private else None,
            "delta": self.delta,
            "accountant": self.accountant,
            **({"rdp_orders": list(RDP_ORDERS)} if self.accountant == "rdp" else {}),
            "epsilon_spent": eps,
            "private": self.private,
            "mechanisms": [asdict(m) for m in self.mechanisms],
        }

    def save(self, path: str | Path) -> None:
        """Atomic and durable: on disk when this returns (a site saves before its release leaves)."""
        write_json(path, self.to_dict(), durable=True)

    @classmethod
    def load(cls, path: str | Path) -> "PrivacyLedger":
        d = read_json(path)
        target = d["target_epsilon"] if d["target_epsilon"] is not None else math.inf
        return cls(target, d["delta"], d["accountant"], [Mechanism(**m) for m in d["mechanisms"]])


def default_delta(n: int) -> float:
    """δ = 1 / (N ln N): below 1/N, as a meaningful δ must be."""
    return 1.0 / (n * math.log(n)) if n > 2 else 0.1 / max(n, 1)


def check_privacy_args(epsilon: float, delta: float | None, n: int) -> float:
    """Validate (ε, δ) for a dataset of `n` examples; return δ (defaulted)."""
    if n < 2:
        raise SapfError(f"need at least 2 private examples, got {n}")
    if not epsilon > 0:
        raise ConfigError("epsilon", f"must be > 0 (or inf for non-private), got {epsilon}")
    delta = default_delta(n) if delta is None else delta
    if not 0 < delta < 1.0 / n:
        raise ConfigError("delta", f"must lie in (0, 1/N) = (0, {1.0 / n:.3g}) for N={n}, got {delta}")
    return delta


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: list[Mechanism] | None = None,
    accountant: str = "rdp",
    max_sigma: float = 5000.0,
) -> float:
    """The smallest noise multiplier σ (to 0.1%) such that prior + `steps` × Gaussian(σ, q) meets ε.

    Refuses (SapfError) when no σ up to `max_sigma` meets the target, e.g. when the prior
    mechanisms already spend it.
    """
    prior = list(prior or [])
    spent = epsilon_of(prior, delta, accountant)
    if spent >= target_epsilon:
        raise SapfError(f"the earlier releases already spend ε={spent:.3g} of the target {target_epsilon:.3g}")

    def eps(sigma: float) -> float:
        return epsilon_of(prior + [Mechanism("candidate", sigma, sample_rate, steps)], delta, accountant)

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > max_sigma:
            raise SapfError(
                f"no noise level up to σ={max_sigma:g} meets ε={target_epsilon:g} with {steps} steps at sample rate "
                f"{sample_rate:.3g}; train fewer steps, use a smaller batch or a larger ε"
            )
    lo = 0.0
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if mid > 0 and eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class PlannedRelease:
    """A private release before training that a stage will make: its ledger name, the share of the
    target ε it may spend, its Poisson sample rate and how many times it runs."""

    name: str
    epsilon_share: float
    sample_rate: float = 1.0
    steps: int = 1


@dataclass
class PrivacyPlan:
    """Noise for every release of the planned run, fixed before any private data is touched."""

    target_epsilon: float
    delta: float
    accountant: str
    releases: list[Mechanism]  # the releases before training, calibrated, in order
    train: Mechanism  # DP-SGD (noise 0: non-private, or no training planned)

    def noise_of(self, name: str) -> float:
        """The noise multiplier planned for release `name` (0.0 when none is planned)."""
        return next((m.noise_multiplier for m in self.releases + [self.train] if m.name == name), 0.0)

    @property
    def selection_noise(self) -> float:
        return self.noise_of("saliency-query")

    @property
    def train_noise(self) -> float:
        return self.train.noise_multiplier

    def planned(self) -> list[Mechanism]:
        return [m for m in self.releases + [self.train] if m.noise_multiplier > 0 and m.steps > 0]

    @property
    def private(self) -> bool:
        return math.isfinite(self.target_epsilon)


def plan_privacy(
    *,
    target_epsilon: float,
    delta: float,
    releases: list[PlannedRelease],
    train_sample_rate: float,
    train_steps: int,
    accountant: str = "rdp",
) -> PrivacyPlan:
    """Split the budget over a run's releases. The first k releases together spend ε·(share₁ + … + shareₖ)
    (each one's σ is calibrated against the composition of those before it); DP-SGD's σ is then calibrated so
    that the composition of everything meets the target exactly. Non-private (ε = ∞): every σ is 0.

    Args:
        target_epsilon: the run's ε (``inf``: no noise anywhere).
        delta: the run's δ.
        releases: the releases before training, in the order they run; shares in (0, 1), summing below 1
            (with no training: summing to 1).
        train_sample_rate: DP-SGD's Poisson rate (expected batch / N).
        train_steps: DP-SGD steps over the whole run (0: no training).
    """
    train = Mechanism("dp-sgd", 0.0, train_sample_rate, train_steps)
    if not math.isfinite(target_epsilon):
        return PrivacyPlan(target_epsilon, delta, accountant,
                           [Mechanism(r.name, 0.0, r.sample_rate, r.steps) for r in releases], train)
    shares = [r.epsilon_share for r in releases]
    if train_steps and (any(not 0 < s < 1 for s in shares) or sum(shares) >= 1):
        raise SapfError(f"each release's share of ε must lie in (0, 1) and the shares must sum below 1, got {shares}")
    if not train_steps and (any(not 0 < s <= 1 for s in shares) or abs(sum(shares) - 1) > 1e-9):
        raise SapfError(f"with no training, the releases' shares of ε must lie in (0, 1] and sum to 1, got {shares}")
    done: list[Mechanism] = []
    for r in releases:
        cumulative = target_epsilon * (sum(m.epsilon_share for m in releases[: len(done) + 1]))
        sigma = calibrate_noise(cumulative, delta, r.sample_rate, r.steps, done, accountant)
        done.append(Mechanism(r.name, sigma, r.sample_rate, r.steps))
    if train_steps:
        train.noise_multiplier = calibrate_noise(target_epsilon, delta, train_sample_rate, train_steps, done,
                                                 accountant)
    return PrivacyPlan(target_epsilon, delta, accountant, done, train)
