"""Helpers shared by the benchmarks: result files and markdown tables."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from sapf.outputs import write_json

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    gpu = {"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}
    return {"platform": platform.platform(), "processor": platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), **gpu, "date": time.strftime("%Y-%m-%d")}


def save(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    path = RESULTS / f"{name}.json"
    write_json(path, {"machine": machine(), **(extra or {}), "rows": rows})
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def pld_epsilon(privacy: dict) -> float | None:
    """ε of a run's privacy.json recomputed by an accountant sapf does not use (Google's dp_accounting, privacy loss
    distributions) from the recorded mechanisms alone: each a (Poisson-subsampled) Gaussian with its noise multiplier,
    sample rate and steps. None when dp_accounting is not installed (`pip install -e ".[dev]"`)."""
    try:
        from dp_accounting import dp_event
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError:
        return None
    mechanisms = [m for m in privacy["mechanisms"] if m["steps"] > 0]
    if any(m["noise_multiplier"] <= 0 for m in mechanisms):
        return float("inf")
    if not mechanisms:
        return 0.0
    events = [dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(m["sample_rate"], dp_event.GaussianDpEvent(m["noise_multiplier"]))
        if m["sample_rate"] < 1 else dp_event.GaussianDpEvent(m["noise_multiplier"]), m["steps"])
        for m in mechanisms]
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_event.ComposedDpEvent(events))
    return float(accountant.get_epsilon(privacy["delta"]))
