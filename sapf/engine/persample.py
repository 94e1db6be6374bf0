"""Per-sample gradients through Opacus, with augmentation multiplicity.

Opacus's ``hooks`` (and ``ghost``) mode computes a Conv2d's per-sample gradient with
``unfold2d``/``as_strided``, which silently returns all-zero gradients when the conv input is
not NCHW-contiguous — and diffusers' attention blocks hand exactly such tensors to the next
conv. So whenever a convolution is trainable (full fine-tuning, LoRA on convs) we wrap with
``force_functorch=True`` (a per-layer ``vmap``), which is correct and, on the UNet, about 3×
faster than hooks with a contiguity fix. When only Linear/Embedding/norm layers train (LoRA on
attention projections, the class embedding) the hooks mode's einsum rules are exact and
cheaper. The test suite checks every trainable tensor against a whole-model ``torch.func``
reference on both paths.

Multiplicity: each private example is fed as K noise/timestep replicas (rows i*K..i*K+K-1);
the example's gradient is the *mean* of its replicas' gradients, formed before clipping, so one
example still moves the clipped sum by at most C.
"""

from __future__ import annotations

import warnings

import torch
from opacus import GradSampleModule

# Harmless and repeated every step: the UNet's inputs need no gradient, and Opacus's functorch
# path opens a CPU autocast region for float32.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")

GRAD_SAMPLE_MODE = "functorch"


_UNFOLD_LAYERS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def needs_functorch(module: torch.nn.Module) -> bool:
    """True when a convolution owns a trainable parameter (hooks mode would be wrong there)."""
    return any(isinstance(m, _UNFOLD_LAYERS) and any(p.requires_grad for p in m.parameters(recurse=False))
               for m in module.modules())


def wrap_for_per_sample_grads(module: torch.nn.Module) -> GradSampleModule:
    # strict=False: frozen modules Opacus has no rule for are fine; trainable ones without a rule
    # fall back to functorch inside Opacus.
    return GradSampleModule(module, batch_first=True, loss_reduction="mean", strict=False,
                            force_functorch=needs_functorch(module))


def trainable_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def average_replicas(params: list[torch.nn.Parameter], multiplicity: int) -> None:
    """Replace each p.grad_sample (B*K, ...) by the mean over each example's K replicas (B, ...)."""
    for p in params:
        gs = p.grad_sample
        if isinstance(gs, list):  # several forward passes accumulated: concatenate them
            gs = torch.cat(gs, dim=0)
        if multiplicity > 1:
            gs = gs.reshape(gs.shape[0] // multiplicity, multiplicity, *gs.shape[1:]).mean(dim=1)
        p.grad_sample = gs


def zero_nonfinite_rows(params: list[torch.nn.Parameter]) -> int:
    """Zero every example whose gradient (over all `params`, after replica averaging) has a non-finite
    entry; return how many. A NaN or inf would pass any clip (its norm is NaN), so a crafted input (an
    adapter that overflows for one class, an image of NaNs) could turn the noisy sum into NaN and reveal
    whether that example was sampled. A zero row contributes nothing and keeps the bound."""
    bad = torch.zeros(params[0].grad_sample.shape[0], dtype=torch.bool, device=params[0].grad_sample.device)
    for p in params:
        bad |= ~torch.isfinite(p.grad_sample.flatten(1)).all(dim=1)
    if bad.any():
        for p in params:
            p.grad_sample = torch.where(bad.view(-1, *([1] * (p.grad_sample.dim() - 1))),
                                        torch.zeros((), dtype=p.grad_sample.dtype), p.grad_sample)
    return int(bad.sum())


def clear_grad_samples(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad_sample = None
        p.grad = None


def replicate(x: torch.Tensor, multiplicity: int) -> torch.Tensor:
    """Rows i*K..i*K+K-1 are copies of row i."""
    return x.repeat_interleave(multiplicity, dim=0) if multiplicity > 1 else x
