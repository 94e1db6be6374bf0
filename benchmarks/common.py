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
