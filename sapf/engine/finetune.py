"""DP fine-tuning of the public generator: peft LoRA on the chosen matrices (or all weights),
trained with Opacus DP-SGD — Poisson sampling, per-example clipping, Gaussian noise — and
augmentation multiplicity. The loop is meant to be read in one sitting.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sapf.config import OPTIMIZERS, WEIGHT_SELECTIONS, ConfigError, MethodConfig
from sapf.engine.data import ImageDataset
from sapf.engine.device import compute_device
from sapf.engine.diffusion import add_noise, drop_labels, per_example_loss
from sapf.engine.model import DiffusionModel
from sapf.engine.noise import fresh_global_rng, fresh_torch_generator
from sapf.engine.persample import (
    average_replicas,
    replicate,
    trainable_parameters,
    wrap_for_per_sample_grads,
    zero_nonfinite_rows,
)
from sapf.engine.privacy import PrivacyLedger
from sapf.engine.progress import progress_bar
from sapf.engine.sparta import mask_grad_samples, mask_grads, row_masks
from sapf.errors import SapfError


@dataclass(kw_only=True)
class DPSGDConfig:
    """One DP-SGD run's settings; the defaults live in :class:`sapf.config.MethodConfig` (``cfg.dpsgd(...)``)."""

    steps: int
    batch_size: int  # expected (Poisson) batch size
    multiplicity: int  # replicas per record, averaged before clipping
    clip: float  # per-record clipping norm C
    lr: float
    ema_decay: float = 0.0  # 0: no EMA
    optimizer: str = MethodConfig.optimizer  # adam (AdamW) | sgd (momentum 0.9)
    label_dropout: float = 0.0  # CFG label dropout, for a model with a null class


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def make_optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    # SGD keeps DP noise isotropic; Adam rescales every coordinate, so a coordinate with little signal
    # still takes a full-size (noise) step. Which is better for DP-LoRA is measured, not assumed (README).
    check_optimizer(name)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def make_trainable(gen: DiffusionModel, strategy: str, selected: list[str], rank: int = MethodConfig.rank,
                   lora_alpha: int = MethodConfig.lora_alpha,
                   freeze_lora_a: bool = False, rows: dict[str, list[int]] | None = None) -> nn.Module:
    """A model whose trainable parameters are exactly what the strategy fine-tunes.

    LoRA: peft adapters on `selected`, base frozen. The class embedding stays trainable as a
    peft ``modules_to_save`` copy — a LoRA on nn.Embedding gets no per-sample gradient in Opacus.
    ``freeze_lora_a`` (FFA-LoRA, Sun et al. 2024) keeps every A at its random start and trains B
    only: half the noisy coordinates, and averaging B across sites averages the products B·A
    exactly (averaging A and B separately does not).
    Full: a copy of the UNet with every weight trainable.
    SPARTA: a copy of the UNet whose chosen `rows` ({matrix: row indices}) alone train (:mod:`sapf.engine.sparta`).
    """
    if strategy == "sparta":
        from sapf.engine.sparta import make_row_trainable

        if not rows:
            raise SapfError("SPARTA needs its chosen rows")
        return make_row_trainable(gen, rows)
    unet = copy.deepcopy(gen.unet)
    if strategy == "full":
        for p in unet.parameters():
            p.requires_grad_(True)
        return unet.train()
    from peft import LoraConfig, get_peft_model

    if not selected:
        raise SapfError("no matrices selected for LoRA")
    known = {n for n, _ in unet.named_modules()}
    missing = [n for n in selected if n not in known]
    if missing:
        raise SapfError(f"module(s) not in the model: {', '.join(missing[:3])}")
    cfg = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        # Anchored full names: peft would otherwise also match names that merely end the same way.
        target_modules=selected,
        modules_to_save=["class_embedding"] if gen.num_classes else None,
        lora_dropout=0.0,
        init_lora_weights="gaussian",
    )
    model = get_peft_model(unet, cfg)
    if freeze_lora_a:
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return model.train()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a site sends: the LoRA matrices and the trainable class-embedding copy, or (full
    fine-tuning) every weight, or (SPARTA) the weights that hold chosen rows."""
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import PeftModel, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, state)
        return
    with torch.no_grad():
        for k, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state[k])


def merged_generator(gen: DiffusionModel, model: nn.Module, strategy: str) -> DiffusionModel:
    """A plain diffusers UNet with the adapters merged in (peft merge_and_unload)."""
    unet = copy.deepcopy(model)
    unet = unet if strategy in WEIGHT_SELECTIONS else unet.merge_and_unload()
    for p in unet.parameters():
        p.requires_grad_(False)
    return DiffusionModel(unet.eval(), gen.scheduler, gen.source, gen.null_class)


@dataclass
class TrainHistory:
    loss: list[float] = field(default_factory=list)
    epsilon: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    steps: int = 0
    optimizer_state: dict | None = None  # to continue with the same optimizer later (e.g. a site's next round)


def dp_finetune(
    gen: DiffusionModel,
    model: nn.Module,
    data: ImageDataset,
    cfg: DPSGDConfig,
    noise_multiplier: float,
    ledger: PrivacyLedger | None,
    show_progress: bool = True,
    label: str = "train",
    optimizer_state: dict | None = None,
    device: str | torch.device = "cpu",
) -> TrainHistory:
    """Train `model`'s trainable parameters on `data`; private iff noise_multiplier > 0.

    Private: Poisson batches with rate B/N, per-example gradients averaged over K replicas (a
    non-finite one zeroed), clipped to C, summed, noised with N(0, σ²C²) and divided by B (Opacus
    DPOptimizer); every step is recorded in `ledger` before its update is applied. Non-private
    (σ = 0, ε = ∞): uniform batches of B, no clipping or noise, recorded with σ = 0. All randomness
    comes from fresh OS entropy (:mod:`sapf.engine.noise`); the training loss and step times in the
    history are statistics of private data: the caller keeps them private.
    `optimizer_state` (from an earlier call's history, same parameters) continues that optimizer
    instead of starting a fresh one: its moments are functions of released noisy gradients only.
    `device` (:mod:`sapf.engine.device`): where the network computes; the model is moved there for the
    run and back to the CPU at the end, every draw but Opacus's noise is made on the CPU.
    """
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    n, K = len(data), cfg.multiplicity
    if cfg.batch_size > n:
        raise ConfigError("batch_size", f"{cfg.batch_size} is larger than the data ({n} records)")
    if K < 1:
        raise ConfigError("multiplicity", "must be at least 1")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise SapfError(f"the noise multiplier must be finite and >= 0, got {noise_multiplier}")
    private = noise_multiplier > 0
    device = compute_device(device)
    masks = row_masks(model)  # SPARTA's, kept by name: a conversion of the model must not drop them
    model.to(device)  # before the optimizer and the EMA see the parameters
    named = trainable_parameters(model)
    for name, p in named:
        if name in masks:
            p.row_mask = masks[name]
    params = [p for _, p in named]
    row_masked = bool(masks)
    # Batches, diffusion noise/timesteps and DP noise all touch private data: fresh OS entropy, never a seed.
    torch_gen = fresh_torch_generator()
    noise_gen = torch_gen if device.type == "cpu" else fresh_torch_generator(device)  # Opacus draws on the device
    conditional = gen.num_classes > 0
    net = wrap_for_per_sample_grads(model) if private else model
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:  # this call's learning rate, not the saved one
            group["lr"] = cfg.lr
    q = cfg.batch_size / n
    if private:
        optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=cfg.clip,
                                expected_batch_size=cfg.batch_size, generator=noise_gen)
        batches = iter(UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=torch_gen,
                                                     steps=cfg.steps))
    else:
        batches = (torch.randperm(n, generator=torch_gen)[: cfg.batch_size] for _ in range(cfg.steps))
    ema = None
    if cfg.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
    x_all, y_all = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    hist, t0 = TrainHistory(), time.time()
    # fresh_global_rng: a network's own draws (a user's base model with dropout) are fresh, not what --seed set.
    with fresh_global_rng(), progress_bar(label, cfg.steps, show_progress) as bar:
        for step in range(cfg.steps):
            t_step = time.perf_counter()
            idx = torch.as_tensor(next(batches), dtype=torch.long)
            if len(idx) == 0:  # an empty Poisson batch still releases noise (and is accounted)
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=device)
                loss = float("nan")
            else:
                x0, y = replicate(x_all[idx], K), replicate(y_all[idx], K)
                y = drop_labels(y, gen.null_class, cfg.label_dropout, torch_gen)  # fresh draws, per replica
                xt, t, noise = (v.to(device) for v in add_noise(gen.scheduler, x0, torch_gen))
                pred = net(xt, t, class_labels=y.to(device) if conditional else None).sample
                loss_t = per_example_loss(pred, noise).mean()
                loss_t.backward()
                loss = loss_t.item()
                if private:
                    average_replicas(params, K)  # mean over replicas *before* clipping: sensitivity stays C
                    zero_nonfinite_rows(params)  # a NaN row would pass the clip and poison the release
                    mask_grad_samples(params)  # SPARTA: frozen rows spend none of the clip
            if ledger is not None:  # recorded before the step's noisy gradient is used
                ledger.record("dp-sgd", noise_multiplier, q, 1)
            if row_masked:  # SPARTA: the noisy gradient's frozen rows are dropped before the optimizer sees them
                if not private or optimizer.pre_step():
                    mask_grads(params)
                    (optimizer.original_optimizer if private else optimizer).step()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)
            hist.step_times.append(time.perf_counter() - t_step)
            hist.loss.append(loss)
            eps = (ledger.epsilon() if (private and ledger is not None and (step % 10 == 9 or step == cfg.steps - 1))
                   else None)
            if eps is not None:
                hist.epsilon.append(eps)
            bar.advance(loss=float(np.nanmean(hist.loss[-20:])) if not math.isnan(loss) else loss,
                        **({"ε": hist.epsilon[-1]} if hist.epsilon else {}))
    if ema is not None:
        ema.copy_to(params)
    if private:
        net._close()
    model.to("cpu")
    hist.wall_time_s, hist.steps = time.time() - t0, cfg.steps
    hist.optimizer_state = optimizer.state_dict()
    return hist
