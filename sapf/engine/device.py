"""Where the engine computes: ``cpu`` (the default, and what CI runs) or ``cuda``.

Only the network's arithmetic moves to the device. Every random draw that touches private data
(Poisson batches, diffusion noise and timesteps, label dropout) is made on the CPU from the
run's fresh OS-entropy generator and then copied over, so a run draws the same way on either
device; the DP noise that Opacus adds on the device comes from a device generator seeded from
OS entropy too (:func:`sapf.engine.noise.fresh_torch_generator`), never from torch's global one,
which ``--seed`` sets.
"""

from __future__ import annotations

import re

import torch

from sapf.errors import SapfError

DEVICES = ("cpu", "cuda")


def compute_device(name: str | torch.device = "cpu") -> torch.device:
    """`name` checked: cpu, cuda or cuda:N, the latter only where PyTorch sees that GPU."""
    name = str(name)
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise SapfError(f"--device must be cpu or cuda, not '{name}'")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SapfError(f"--device {name}: PyTorch sees no CUDA GPU here (torch {torch.__version__})")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise SapfError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return torch.device(name)
