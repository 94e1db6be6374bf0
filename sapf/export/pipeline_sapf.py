"""A class-conditional DDIM pipeline for sapf models, loadable with diffusers alone.

sapf writes this file into every model directory beside ``model_index.json`` (as diffusers community
pipelines ship), so that::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("RUN/model", trust_remote_code=True)
    images = pipe(class_labels=[0, 1, 7]).images   # PIL images

This module imports diffusers and torch only, never sapf. Sampling follows sapf's own sampler: DDIM
over the model's training schedule with step noise ``eta`` (1: DDPM-like, 0: deterministic).
"""

from __future__ import annotations

from typing import List, Optional, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class SapfPipeline(DiffusionPipeline):
    """Class-conditional generation with a sapf UNet2DModel (``num_class_embeds`` classes).

    ``null_class`` (pipeline config) is the label of the unconditional class for classifier-free
    guidance; a model trained without one samples with ``guidance_scale=1`` only.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, null_class: Optional[int] = None,
                 guidance_scale: float = 1.0, num_inference_steps: Optional[int] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(null_class=null_class, guidance_scale=guidance_scale,
                                num_inference_steps=num_inference_steps)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, List[int], torch.Tensor],
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        eta: float = 1.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Args:
            class_labels: one class index per image to generate.
            num_inference_steps: DDIM steps (None: the model's default, ``num_inference_steps`` in model_index.json).
            guidance_scale: classifier-free guidance weight w (1: the plain conditional sample; None: the model's
                default, ``guidance_scale`` in model_index.json).
            eta: DDIM step noise in [0, 1].
            generator: torch random generator(s) for the initial and step noise.
            output_type: "pil", "np" (floats in [0, 1], N×H×W×C) or "pt" (model space [-1, 1], N×C×H×W).
        """
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        num_classes = int(self.unet.config.num_class_embeds or 0)
        if num_classes and not ((labels >= 0) & (labels < num_classes)).all():
            raise ValueError(f"class_labels must lie in [0, {num_classes})")
        if num_inference_steps is None:
            num_inference_steps = self.config.num_inference_steps
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required: this model's model_index.json names no default")
        if guidance_scale is None:
            guidance_scale = self.config.guidance_scale if self.config.null_class is not None else 1.0
        if guidance_scale != 1.0 and self.config.null_class is None:
            raise ValueError("this model has no unconditional (null) class: classifier-free guidance needs one; "
                             "use guidance_scale=1")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), self.unet.config.in_channels, *size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(num_inference_steps, device=self.device)
        null = torch.full_like(labels, self.config.null_class) if guidance_scale != 1.0 else None
        for t in self.progress_bar(ddim.timesteps):
            if null is None:
                eps = self.unet(x, t, class_labels=labels if num_classes else None).sample
            else:
                both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
                cond, uncond = both.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            x = ddim.step(eps, t, x, eta=eta, generator=generator).prev_sample
        if output_type == "pt":
            images = x
        else:
            images = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(np.asarray(images))
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
