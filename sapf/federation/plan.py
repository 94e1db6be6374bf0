"""The plan of a federated run: what the server sends every site. Torch-free (the CLI reads
its defaults)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from sapf.defaults import LORA_LR, SGD_LORA_LR

# Local DP-SGD learning rate when none is given, per optimizer (the same as central `sapf train`).
DEFAULT_LR = {"adam": LORA_LR, "sgd": SGD_LORA_LR}


@dataclass
class FederationConfig:
    """The whole plan of a federated run; the server sends it to every site."""

    data: str = "mnist5k"  # simulation: the dataset the sites' partitions come from
    partition: str = "iid"
    alpha: float = 0.5
    num_sites: int = 4
    holdout: float = 0.2  # as sapf.engine.run.DEFAULT_HOLDOUT (a test keeps them equal)
    base_model: str = ""  # "" = the shipped public model (present at every site)
    epsilon: float = 10.0  # per-site target
    delta: float = 0.0  # 0: each site uses 1/(n ln n) of its own n
    accountant: str = "rdp"
    top_fraction: float = 0.3
    candidates: str = "all"
    selection_budget: float = 0.1
    selection_clip: float = 1e-2
    selection_sample_rate: float = 1.0
    rounds: int = 6
    local_steps: int = 25
    local_epochs: float = 0.0  # > 0: local steps = epochs × a site's n / batch size instead
    batch_size: int = 64
    multiplicity: int = 1
    clip: float = 0.05
    optimizer: str = "adam"  # adam (AdamW) | sgd (momentum 0.9)
    # A site carries its optimizer's state (Adam moments of its own noisy gradients; never sent)
    # from round to round; False starts a fresh optimizer every round.
    keep_optimizer_state: bool = True
    lr: float = DEFAULT_LR["adam"]
    rank: int = 8
    lora_alpha: int = 8
    freeze_lora_a: bool = False  # FFA-LoRA: every A stays at the server's random start; sites train B only
    min_clients: int = 2
    seed: int = 0
    out: str = ""

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, rec) -> "FederationConfig":
        """Known keys only: a message or run config may carry more (selected, round...). Each value
        must have its field's type (an int where an int is declared, never a bool; a float field
        takes an int): a site reads plans from a server it does not trust."""
        values = {}
        for f in fields(cls):
            if f.name not in rec:
                continue
            v, kind = rec[f.name], type(getattr(cls, f.name))
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if type(v) is not kind:
                from sapf.errors import SapfError

                raise SapfError(f"plan field {f.name} must be of type {kind.__name__}, got {type(v).__name__}")
            values[f.name] = v
        return cls(**values)

    def local_steps_for(self, n: int) -> int:
        """DP-SGD steps per round at a site holding n examples."""
        if self.local_epochs > 0:
            return max(1, math.ceil(self.local_epochs * n / self.batch_size))
        return self.local_steps

    def query(self):
        from sapf.engine.saliency import SaliencyQuery

        return SaliencyQuery(self.selection_clip, 1, self.selection_sample_rate, "sqnorm", self.candidates)
