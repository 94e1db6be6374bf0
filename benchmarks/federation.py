"""Federation cost: wall time of `sapf federate` against centralised `sapf train` with the same
total DP steps and data, and the bytes a site sends per round against the full model's bytes.

    python benchmarks/federation.py [--clients 4 --rounds R --local-steps S] [--quick]

Defaults are `sapf federate`'s (FederationConfig); the central run uses the same batch size,
multiplicity, candidates, clip and learning rate, and clients × rounds × local steps DP steps.

Writes benchmarks/results/federation.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _timed(cmd: list[str]) -> float:
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.time() - t0


def bytes_per_round(selected: list[str]) -> dict:
    """Bytes of the ArrayRecord a site returns (adapter on the run's selection + class-embedding
    copy) vs the full UNet."""
    from flwr.app import ArrayRecord

    from sapf.engine.finetune import make_trainable, trainable_state
    from sapf.engine.model import load_generator
    from sapf.federation.task import to_wire

    gen = load_generator(None)
    model = make_trainable(gen, "saliency", selected)
    adapter = to_wire(trainable_state(model)).count_bytes()  # what a site really sends
    full = ArrayRecord(torch_state_dict=gen.unet.state_dict()).count_bytes()
    return {"adapter_bytes": adapter, "full_model_bytes": full, "ratio": adapter / full}


def main() -> None:
    from sapf.config import FederationConfig

    d = FederationConfig()
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=d.num_sites)
    ap.add_argument("--rounds", type=int, default=d.rounds)
    ap.add_argument("--local-steps", type=int, default=d.local_steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--quick", action="store_true", help="1 round of 5 local steps")
    ap.add_argument("--keep", type=Path, help="Keep both runs here (fed/, central/) instead of a temp dir.")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.local_steps = 1, 5
    import json

    from common import save, table

    total_steps = a.clients * a.rounds * a.local_steps
    same = ["--batch-size", str(a.batch_size), "--multiplicity", str(d.multiplicity), "--candidates", d.candidates,
            "--clip", str(d.clip), "--lr", str(d.learning_rate())]
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(a.keep)) if a.keep else tempfile.TemporaryDirectory()) as tmp:
        fed = _timed(["sapf", "federate", "--clients", str(a.clients), "--rounds", str(a.rounds), "--local-steps",
                      str(a.local_steps), *same, "--out", f"{tmp}/fed"])
        sizes = bytes_per_round(json.loads(Path(f"{tmp}/fed/selection.json").read_text())["selected"])
        central = _timed(["sapf", "train", "--steps", str(total_steps), *same, "--out", f"{tmp}/central"])
    rows = [{"clients": a.clients, "rounds": a.rounds, "local_steps": a.local_steps, "total_dp_steps": total_steps,
             "federate_s": round(fed, 1), "central_train_s": round(central, 1), "time_ratio": fed / central,
             **sizes}]
    save("federation", rows, {"goals": {"time_ratio": "<= 1.25", "ratio": "<= 0.05"}})
    print(table(rows, ["clients", "rounds", "local_steps", "total_dp_steps", "federate_s", "central_train_s",
                       "time_ratio", "adapter_bytes", "full_model_bytes", "ratio"]))


if __name__ == "__main__":
    main()
