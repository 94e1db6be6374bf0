"""How the server combines what sites send: it trusts no site.

Every field of a reply is parsed here, inside validation, so no reply of any shape stops a round;
what fails is left out with its reason. What passes is bounded before it is combined, so one site
cannot decide a sum alone:

- **Noisy sums** (the saliency scores, and every per-record noisy sum to come): each site's vector
  is scaled to unit L1 norm and the sites are weighted equally. A site's declared example count is
  its own claim, and a vector of 1e30s would otherwise pick the matrices alone; after scaling, any
  one site moves the combined vector's L1 by at most 2/(number of sites), whatever it sends. That
  bounds, but does not remove, its say: it can still raise or lower a few scores by up to 1/sites,
  which may push those matrices into or out of the top fraction. For honest sites of equal size
  this is the plain sum up to a constant (the ranking is the same).
- **Central images** (DP-FETA's noisy per-class image sums and counts): each site's own per-class means (its
  sums over its counts of at least 1, clamped to [-1, 2]) are combined by their median, pixel by pixel. With an
  honest majority every pixel stays within the honest sites' values whatever one site sends; with two sites the
  median is their mean, which one site moves by at most 1.5. Adding the raw sums would let a site that sends sums
  and counts of 1e9 set every central image alone. The clamp is wider than the pixel range because an honest site's
  means are noisy (a pixel's spread ~0.26 at the default plan): clamped to [0, 1] they lift the background, and the
  central images' error against noiseless ones doubled (``benchmarks/central_combination.py``, 4 sites of mnist5k:
  0.35 against 0.17 for the plain sum; 0.18 for the median).
- **Adapter updates**: each site's change to the global adapter is clipped to
  ``UPDATE_NORM_FACTOR`` × the (low) median of the sites' change norms, and the clipped changes are
  averaged with equal weights. With an honest majority the low median is an honest norm (with two
  sites, the smaller one), so a site
  that sends huge values (float16 reaches 65504) or a huge example count moves the average by at
  most ``UPDATE_NORM_FACTOR`` × median / sites. The averaged adapter is checked again.
- **Privacy reports** are validated against their schema and named by the node that sent them,
  never by a name the site chooses. A report also declares the site's DP-SGD rate a round
  (``training_round``), so that a round the site was sent and answered with no report is counted at
  that rate (an over-count if the site did not record it, never an under-count if it did).
"""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import torch

UPDATE_NORM_FACTOR = 3.0  # an honest site's change norm is within this of the median (measured spread: < 1.5x)
MAX_REPORT_CHARS = 1_000_000
# A report is the site's whole lifetime ledger: consecutive steps merge, so an honest run adds 3-5 entries and a hundred
# cover some twenty runs of one dataset. Not more: the server recomputes each report's ε every round, at a
# tenth of a second or so an entry.
MAX_MECHANISMS = 100
CENTRAL_MEAN_RANGE = (-1.0, 2.0)  # a site's per-class mean pixels, before the median (pixels lie in [0, 1])
MAX_REPORT_STEPS = 10_000_000  # ten plans at a site's default cap (SiteLimits.max_total_steps)


def report_of(reply, plan_accountant: str | None = None) -> tuple[dict | None, str | None]:
    """A site's privacy report (its ε history) from a reply: (report, None) or (None, why not). With
    `plan_accountant`, a report in another is refused: a site's ledger keeps the accountant it started with, so an
    honest site cannot differ, and PRV's cost grows with the steps a report claims."""
    from sapf.config import ACCOUNTANTS

    try:
        text = reply.content["privacy"]["report"]
        if not isinstance(text, str) or len(text) > MAX_REPORT_CHARS:
            return None, "report is not a string of at most 1 MB"
        report = json.loads(text)
        delta, accountant, mechanisms = report["delta"], report["accountant"], report["mechanisms"]
        if not (isinstance(delta, float) and 0 < delta < 1):
            return None, "report delta is not in (0, 1)"
        if accountant not in ACCOUNTANTS:
            return None, "report accountant is unknown"
        if plan_accountant is not None and accountant != plan_accountant:
            return None, f"report accountant is not the plan's ({plan_accountant})"
        if not (isinstance(mechanisms, list) and len(mechanisms) <= MAX_MECHANISMS):
            return None, f"report mechanisms are not a list of at most {MAX_MECHANISMS}"
        clean = []
        for m in mechanisms:
            gaussian = _gaussian(m, steps=(0, 10**9), positive_noise=False)
            if not (isinstance(m["name"], str) and len(m["name"]) <= 64 and gaussian):
                return None, "report has a malformed mechanism"
            clean.append({"name": m["name"], **gaussian})
        if sum(m["steps"] for m in clean) > MAX_REPORT_STEPS:
            return None, f"report claims more than {MAX_REPORT_STEPS} steps"
        per_round = report.get("training_round")  # the site's DP-SGD rate a round, to count a round left unreported
        if per_round is not None:
            per_round = _gaussian(per_round, steps=(1, MAX_REPORT_STEPS), positive_noise=True)
            if per_round is None:
                return None, "report has a malformed training round"
    except Exception as e:  # noqa: BLE001 - a site may send anything (deep nesting, 10^400, ...)
        return None, f"report is malformed ({type(e).__name__})"
    return {"delta": delta, "accountant": accountant, "mechanisms": clean,
            **({"training_round": per_round} if per_round else {})}, None


def _gaussian(m: dict, *, steps: tuple[int, int], positive_noise: bool) -> dict | None:
    """A reported Gaussian mechanism's σ and sample rate (finite floats, σ ≥ 0 or > 0, rate in (0, 1]) and steps (an
    int within `steps`), or None if any is malformed."""
    sigma, q, n = m["noise_multiplier"], m["sample_rate"], m["steps"]
    ok = (_number(sigma) and (sigma > 0 if positive_noise else sigma >= 0) and _number(q) and 0 < q <= 1
          and isinstance(n, int) and not isinstance(n, bool) and steps[0] <= n <= steps[1])
    return {"noise_multiplier": float(sigma), "sample_rate": float(q), "steps": n} if ok else None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric(reply, key: str, kind: type):
    """A scalar from a reply's metrics, of the given type (int or float), finite; raises ValueError."""
    v = reply.content["metrics"][key]
    if not _number(v):
        raise ValueError(f"metric {key} is not a finite number")
    v = kind(v)
    if kind is int and v != reply.content["metrics"][key]:
        raise ValueError(f"metric {key} is not an integer")
    return v


def combine_noisy_sums(vectors: list[np.ndarray]) -> np.ndarray:
    """Equal-weight combination of the sites' noisy sum vectors, each scaled to unit L1 norm."""
    scaled = [v / max(float(np.abs(v).sum()), 1e-300) for v in vectors]
    return np.sum(scaled, axis=0) / len(scaled)


def site_class_means(vector: np.ndarray, num_classes: int, pixels: int, lo: float, hi: float) -> np.ndarray:
    """One site's central-image release as its own per-class means (K, pixels): sums over counts of at least 1,
    clamped to [lo, hi]."""
    sums = vector[: num_classes * pixels].reshape(num_classes, pixels)
    counts = np.maximum(vector[num_classes * pixels:], 1.0)
    return np.clip(sums / counts[:, None], lo, hi)


def combine_central_sums(vectors: list[np.ndarray], num_classes: int, pixels: int) -> np.ndarray:
    """The sites' noisy central-image sums combined with bounded influence (see the module's note), in the layout
    :func:`sapf.engine.central_images.central_images` reads: the pixel-wise median of the sites' clamped per-class
    means as the sums, and counts of one."""
    means = [site_class_means(v, num_classes, pixels, *CENTRAL_MEAN_RANGE) for v in vectors]
    return np.concatenate([np.median(means, axis=0).ravel(), np.ones(num_classes)])


def combine_updates(updates: list[dict[str, torch.Tensor]], current: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """The new global adapter: current + the equal-weight mean of each site's change, each change
    clipped to UPDATE_NORM_FACTOR × the low median change norm. Returns (adapter, change norms, bound)."""
    changes = [{k: u[k].double() - current[k].double() for k in current} for u in updates]
    norms = [math.sqrt(sum(float(d.pow(2).sum()) for d in c.values())) for c in changes]
    bound = UPDATE_NORM_FACTOR * statistics.median_low(norms)
    mean = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in current.items()}
    for c, n in zip(changes, norms, strict=True):
        scale = min(1.0, bound / n) if n > 0 else 1.0
        for k in mean:
            mean[k] += c[k] * (scale / len(changes))
    return {k: (current[k].double() + mean[k]).to(current[k].dtype) for k in current}, norms, bound
