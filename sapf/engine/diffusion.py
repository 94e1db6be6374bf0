"""The DDPM noise-prediction objective, shared by pretraining, the saliency query and DP training."""

from __future__ import annotations

import torch


def add_noise(scheduler, x0: torch.Tensor, generator: torch.Generator | None = None):
    """Draw a timestep and Gaussian noise per row of `x0`; return (x_t, t, noise)."""
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return scheduler.add_noise(x0, noise, t), t, noise


def predict(net, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """`net` is a UNet or a wrapper of one (peft, Opacus); labels None for an unconditional model."""
    return net(xt, t, class_labels=labels).sample


def per_example_loss(pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (pred - noise).pow(2).flatten(1).mean(1)


def diffusion_loss(unet, scheduler, x0, labels, generator=None) -> torch.Tensor:
    xt, t, noise = add_noise(scheduler, x0, generator)
    return per_example_loss(predict(unet, xt, t, labels), noise).mean()


def drop_labels(labels: torch.Tensor, null_class: int | None, p: float, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Classifier-free guidance's label dropout: each label becomes the null class with probability p (a
    per-record choice, so a record's influence on a DP step stays bounded by the clip). No null class: as is."""
    if null_class is None or p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)
