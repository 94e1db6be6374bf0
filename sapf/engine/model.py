"""The generator: a class-conditional diffusers UNet2DModel plus its noise scheduler.

A model directory is the standard diffusers layout — ``unet/`` (``save_pretrained``) and
``scheduler/`` — so anyone can load it with diffusers alone. A bare UNet2DModel directory
(``config.json`` + weights, e.g. a DDPM checkpoint downloaded once) is accepted too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from sapf.errors import SapfError

DEFAULT_MODEL_NAME = "public-digits-28"


def default_model_dir() -> Path:
    """The shipped public model (pretrained on scikit-learn's UCI digits)."""
    return Path(str(resources.files("sapf") / "assets" / DEFAULT_MODEL_NAME))


@dataclass
class DiffusionModel:
    """A class-conditional denoiser and its noise scheduler: what sapf trains, samples and exports.
    (Named apart from ``torch.Generator``, the random-number generator.)"""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    source: str = ""
    # The label of the unconditional class that classifier-free guidance contrasts with (the last class
    # embedding), or None for a model trained without one. Saved in model_index.json.
    null_class: int | None = None

    @property
    def image_size(self) -> int:
        s = self.unet.config.sample_size
        return int(s if isinstance(s, int) else s[0])

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def num_classes(self) -> int:
        """The real classes (0 for an unconditional model); a null class is not one of them."""
        embeds = int(self.unet.config.num_class_embeds or 0)
        return embeds - 1 if self.null_class is not None else embeds


def build_unet(
    image_size: int = 28,
    channels: int = 1,
    num_classes: int = 10,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 32,
    norm_num_groups: int = 8,
) -> UNet2DModel:
    """A lean UNet with attention in the down, mid and up paths (so there are matrices to select).

    The default (1.16M parameters at 28x28) has attention at 14x14 and 7x7 on the way down and
    up and in the mid block; the first level stays convolution-only because attention at full
    resolution is what makes CPU training slow.
    """
    n = len(block_out_channels)
    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1)
    up = ("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=layers_per_block,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        num_class_embeds=num_classes or None,
    )


def build_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    # Cosine schedule: at 28x28 the linear schedule wastes most steps on near-pure noise.
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def ddim_from(scheduler) -> DDIMScheduler:
    return DDIMScheduler.from_config(scheduler.config)


PIPELINE_MODULE = "pipeline_sapf"  # shipped in every model dir: diffusers has no class-conditional UNet pipeline
PIPELINE_CLASS = "SapfPipeline"


def save_generator(gen: DiffusionModel, out: Path) -> None:
    """A diffusers pipeline directory: ``unet/``, ``scheduler/``, ``model_index.json`` and the pipeline module,
    so that ``DiffusionPipeline.from_pretrained(out, trust_remote_code=True)`` samples from it."""
    out = Path(out)
    gen.unet.save_pretrained(out / "unet", safe_serialization=True)
    gen.scheduler.save_pretrained(out / "scheduler")
    write_pipeline_index(out, type(gen.scheduler).__name__, gen.null_class)


def write_pipeline_index(out: Path, scheduler_class: str = "DDPMScheduler", null_class: int | None = None) -> None:
    """``model_index.json`` and the pipeline module of a model directory."""
    import diffusers

    from sapf.sampling_inputs import DEFAULT_STEPS, resolve_guidance

    module = resources.files("sapf.export") / f"{PIPELINE_MODULE}.py"
    (out / f"{PIPELINE_MODULE}.py").write_text(module.read_text())
    index = {"_class_name": [PIPELINE_MODULE, PIPELINE_CLASS], "_diffusers_version": diffusers.__version__,
             "null_class": null_class, "guidance_scale": resolve_guidance(None, null_class),
             "num_inference_steps": DEFAULT_STEPS,
             "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", scheduler_class]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_generator(path: str | Path | None = None) -> DiffusionModel:
    """Load a sapf/diffusers model dir (``unet/`` + ``scheduler/``), a bare UNet2DModel dir, or a
    sapf run dir (its merged generator lives in ``model/``).

    ``None`` loads the shipped default public model.
    """
    if path is not None and not str(path).strip():
        raise SapfError("model path is empty (leave it out for the shipped model)")
    path = Path(path) if path is not None else default_model_dir()
    if not path.exists():
        raise SapfError(f"model '{path}' does not exist")
    if not path.is_dir():
        raise SapfError(f"model '{path}' is not a directory")
    if (path / "model" / "unet" / "config.json").exists():
        path = path / "model"
    if (path / "unet" / "config.json").exists():
        unet_dir, sched_dir = path / "unet", path / "scheduler"
    elif (path / "config.json").exists():
        unet_dir, sched_dir = path, path
    else:
        raise SapfError(f"'{path}' is not a diffusers model directory (no unet/config.json or config.json)")
    try:
        cls = json.loads((unet_dir / "config.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError) as e:
        raise SapfError(f"'{unet_dir / 'config.json'}' is not a readable diffusers config: {e}") from None
    if cls != "UNet2DModel":
        raise SapfError(f"'{path}' holds a {cls or 'unknown model'}, not a diffusers UNet2DModel")
    try:
        # safetensors only: a pickled checkpoint can run code when loaded, and a site must load weights only.
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, use_safetensors=True)
    except Exception as e:  # diffusers raises many types for missing/corrupt weights
        raise SapfError(f"cannot load the UNet in '{unet_dir}': {str(e).splitlines()[0]}") from None
    if (sched_dir / "scheduler_config.json").exists():
        try:
            scheduler = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
        except Exception as e:
            raise SapfError(f"cannot load the scheduler in '{sched_dir}': {str(e).splitlines()[0]}") from None
    else:
        scheduler = build_scheduler()
    unet.eval()
    return DiffusionModel(unet, scheduler, str(path), _null_class(path, unet))


def _null_class(path: Path, unet: UNet2DModel) -> int | None:
    """The null class from the pipeline index, checked against the UNet (it must be its last class embedding)."""
    index = path / "model_index.json"
    if not index.exists():
        return None
    try:
        null = json.loads(index.read_text()).get("null_class")
    except (OSError, json.JSONDecodeError) as e:
        raise SapfError(f"'{index}' is not readable: {e}") from None
    embeds = int(unet.config.num_class_embeds or 0)
    if null is not None and not (isinstance(null, int) and embeds >= 2 and null == embeds - 1):
        raise SapfError(f"'{index}': null_class must be the last class embedding ({embeds - 1}), got {null!r}")
    return null


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def check_data_fits(gen: DiffusionModel, num_classes: int, channels: int) -> None:
    """A dataset must match the model's channels and (for a conditional model) its classes."""
    if channels != gen.channels:
        raise SapfError(f"the data has {channels} channel(s) but the model expects {gen.channels}")
    if gen.num_classes and num_classes > gen.num_classes:
        raise SapfError(f"the data has {num_classes} classes but the model knows only {gen.num_classes}")
