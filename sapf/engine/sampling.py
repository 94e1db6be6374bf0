"""The torch DDIM sampler (diffusers DDIMScheduler).

The initial noise comes from numpy's seeded generator, exactly as in the ONNX sampler, so the
two samplers give the same images for the same seed.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from sapf import sampling_inputs as inputs  # the same labels, noise and guidance as the ONNX sampler
from sapf.engine.device import compute_device
from sapf.engine.model import DiffusionModel, ddim_from
from sapf.engine.progress import progress_bar
from sapf.errors import SapfError
from sapf.outputs import to_uint8
from sapf.public_classifier import SHIPPED, best_of_candidates, candidate_labels, resolve_best_of

# The sample grid of every run (RUN/grid.png, and the public half of a federated run's comparison.png): 10 a class.
GRID_SAMPLES = 100


@torch.no_grad()
def sample(
    gen: DiffusionModel,
    num: int,
    class_label: int | None = None,
    steps: int = inputs.DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int | None = None,
    show_progress: bool = True,
    eta: float = inputs.DEFAULT_ETA,
    guidance: float | None = None,
    device: str = "cpu",
    best_of: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 images (N,H,W[,C]), labels (N,)). eta: DDIM's step noise (0: deterministic); guidance:
    classifier-free guidance weight w (1: the conditional sample; needs a model with a null class otherwise;
    None: the model's default, :func:`sapf.sampling_inputs.resolve_guidance`); device: where the UNet runs
    (the inputs are drawn on the CPU, so the images match the CPU's up to floating-point rounding); batch_size:
    images a batch (None: :data:`sapf.sampling_inputs.TORCH_CPU_BATCH_SIZE` on the CPU, ``BATCH_SIZE`` elsewhere;
    the images do not depend on it); best_of: candidates drawn an image, the one the public digit classifier finds
    most like its class kept (:mod:`sapf.public_classifier`; 1: none; None: the model's default,
    :func:`sapf.public_classifier.resolve_best_of`)."""
    if steps < 1:
        raise SapfError("--steps must be at least 1")
    inputs.check_eta(eta)
    guidance = inputs.resolve_guidance(guidance, gen.null_class)
    best_of = resolve_best_of(best_of, gen.num_classes, gen.channels, gen.image_size)
    wanted = inputs.sample_labels(num, gen.num_classes, class_label)
    labels = candidate_labels(wanted, best_of)  # the labels of what is drawn: `wanted` itself when best_of is 1
    num = len(labels)
    noise = inputs.initial_noise(num, gen.channels, gen.image_size, seed)
    ddim = ddim_from(gen.scheduler)
    ddim.set_timesteps(steps)
    dev = compute_device(device)
    batch_size = inputs.resolve_batch_size(
        batch_size, inputs.TORCH_CPU_BATCH_SIZE if dev.type == "cpu" else inputs.BATCH_SIZE)
    unet = gen.unet.eval() if dev.type == "cpu" else copy.deepcopy(gen.unet).eval().to(dev)
    out = []
    n_batches = (num + batch_size - 1) // batch_size
    with progress_bar("sample", n_batches * steps, show_progress) as bar:
        for b in range(0, num, batch_size):
            x = torch.from_numpy(noise[b : b + batch_size]).to(dev)
            y = torch.from_numpy(labels[b : b + batch_size]).to(dev) if gen.num_classes else None
            z = inputs.step_noise(b, x.shape[0], steps, gen.channels, gen.image_size, seed) if eta > 0 else None
            for k, t in enumerate(ddim.timesteps):
                tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=dev)
                if guidance == 1.0:
                    eps = unet(x, tt, class_labels=y).sample
                else:
                    null = torch.full_like(y, gen.null_class)
                    cond, uncond = unet(torch.cat([x, x]), torch.cat([tt, tt]), class_labels=torch.cat([y, null])
                                        ).sample.chunk(2)
                    eps = torch.from_numpy(inputs.guided(cond.cpu().numpy(), uncond.cpu().numpy(), guidance)).to(dev)
                noise_k = torch.from_numpy(z[k]).to(dev) if z is not None else None
                x = ddim.step(eps, t, x, eta=eta, variance_noise=noise_k).prev_sample
                bar.advance()
            out.append(x.cpu().numpy())
    return best_of_candidates(to_uint8(np.concatenate(out)), wanted, best_of), wanted


def public_sample(gen: DiffusionModel, num: int, *, seed: int,
                  steps: int = inputs.DEFAULT_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample` of a public model (the model's default guidance, eta and best-of), from
    ``$SAPF_CACHE/samples/`` when drawn before with the same weights and settings: every federated run from the shipped
    model draws the same public half of its comparison grid. Only for public models and the public seed: nothing
    private is cached."""
    import hashlib
    import json

    import diffusers

    import sapf
    from sapf.engine.evaluate import cache_dir
    from sapf.outputs import atomic_path

    # Everything the images depend on: the weights (names, shapes, dtypes, values), the UNet's and the scheduler's
    # configs, the sampler's settings, and the versions of the code that draws them (sapf's sampler and inputs,
    # diffusers' DDIM step, numpy's and torch's generators and kernels).
    h = hashlib.sha256()
    for name, tensor in sorted(gen.unet.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.float().numpy().tobytes())  # exact for every float dtype (bfloat16 has no numpy type)
    for config in (gen.unet.config, gen.scheduler.config):
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    guidance = inputs.resolve_guidance(None, gen.null_class)
    best_of = resolve_best_of(None, gen.num_classes, gen.channels, gen.image_size)
    h.update(f"{gen.null_class}|{num}|{steps}|{seed}|{inputs.DEFAULT_ETA}|{guidance}|{best_of}|{sapf.__version__}|"
             f"{diffusers.__version__}|{np.__version__}|{torch.__version__}".encode())
    if best_of > 1:  # the choice among candidates is the shipped classifier's
        h.update(SHIPPED.read_bytes())
    path = cache_dir() / "samples" / f"{h.hexdigest()[:24]}.npz"
    if path.exists():
        with np.load(path) as cached:
            return cached["images"], cached["labels"]
    images, labels = sample(gen, num, steps=steps, seed=seed, show_progress=False)
    try:
        with atomic_path(path) as tmp:
            np.savez(tmp, images=images, labels=labels)
    except OSError:  # a cache that cannot be written costs time next run, never this run's output
        pass
    return images, labels
