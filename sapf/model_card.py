"""The model card (``README.md``, Hugging Face style) that every run directory carries.

It states what a reader of the outputs needs: the method and its stages, the data (by name and size
only), the guarantee — ε, δ, the neighbouring relation, every recorded mechanism — what may be shared,
the intended use and how to sample. Torch-free; the facts come from the run's config and ledger.
"""

from __future__ import annotations

import math
from pathlib import Path

from sapf.engine.privacy import NEIGHBOURING, TREATED_AS_PUBLIC
from sapf.outputs import write_text

SHAREABLE = {
    "model/": "the generator, a diffusers pipeline directory",
    "adapter/": "the trained LoRA adapters (peft), for the base model named below",
    "model.onnx": "the generator's UNet for onnxruntime (`sapf sample --onnx`)",
    "grid.png": "samples, one row per class",
    "central_images.png": "the warm-up's central images (a DP release, when the run has a warm-up)",
    "warmup_samples.png": "samples of the generator matched to the warm-up's mean embeddings (post-processing of a DP "
                          "release)",
    "comparison.png": "public model | this model, same seeds",
    "privacy.json": "the ledger: every release from private data, to recompute ε independently",
    "privacy/": "each site's ledger",
    "selection.json": "which matrices were fine-tuned, with the noisy scores",
    "semantic_query.json": "PrivImage's noisy semantic histogram and the public classes chosen from it",
    "checkpoint/": "the federated run's last global adapter and round history (DP outputs)",
    "status.json": "whether the federated run completed, and each site's ε",
    "config.json": "the full configuration",
    "metrics.json": "public counts and ε per step or round",
    "mean_embeddings.npz": "DP-MEPF's release: noisy per-class feature sums and counts, and their means",
    "feature_net.safetensors": "DP-MEPF's feature network (trained on public data only)",
}


def _mechanism_rows(mechanisms: list[dict]) -> list[str]:
    rows = ["| release | noise multiplier σ | sample rate | steps |", "|---|---|---|---|"]
    rows += [f"| {m['name']} | {m['noise_multiplier']:.4g} | {m['sample_rate']:.4g} | {m['steps']} |"
             for m in mechanisms]
    return rows


def model_card(*, config: dict, privacy: list[tuple[str, dict]], stages: list, examples: str,
               unconfirmed: dict | None = None) -> str:
    """The card's text. `privacy`: (whose, ledger dict) pairs — one for a central run, one per site. `unconfirmed`:
    site → the requests (rounds, queries) it was sent whose cost its ε above could not count (no report came back)."""
    method = {"saliency": "DP-SAPF (saliency-aware parameter fine-tuning)", "attention": "DP-LoRA on all attention",
              "random": "DP-LoRA on a random share of the matrices", "full": "full DP fine-tuning (DPDM)"}
    selection = config.get("selection", "saliency")
    federated = config.get("command") in ("federate", "serve")
    mepf = config.get("method") == "dp-mepf"
    base = config.get("base_model") or "the shipped public model (sapf's `public-digits-28`, trained on UCI digits)"
    title = ("A class-conditional generator trained on noisy mean embeddings (DP-MEPF)" if mepf else
             "A class-conditional diffusion model fine-tuned under differential privacy")
    start = (f"DP-MEPF{', federated across sites with Flower' if federated else ''}: a conditional convolutional "
             f"generator of {base}'s image size, with features from a network trained on public "
             f"`{config.get('public_data', 'digits')}`. Stages, in order:" if mepf else
             f"{method.get(selection, selection)}{', federated across sites with Flower' if federated else ''}, "
             f"starting from {base}. Stages, in order:")
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [differential-privacy, sapf, " + ("dp-mepf" if mepf else "diffusion") +
        ", class-conditional, image-generation]",
        "---",
        "",
        f"# {title} ({config.get('command')})",
        "",
        "## Method",
        "",
        start,
        "",
        *[f"{i}. **{s.name}** — {s.what}" for i, s in enumerate(stages, 1)],
        "",
        "## Data",
        "",
        f"Private data: `{config.get('data')}` ({examples}); the names and sizes here are public, the images are not.",
        "",
        "## Privacy",
        "",
    ]
    for whose, led in privacy:
        eps = led.get("epsilon_spent")
        eps_text = f"ε = {eps:.4g}" if eps is not None and math.isfinite(eps) else "no guarantee (non-private run)"
        lines += [f"**{whose}**: {eps_text}, δ = {led['delta']:.3g} ({led['accountant']} accountant); neighbouring "
                  f"datasets: {led.get('neighbouring', NEIGHBOURING)}.", "", *_mechanism_rows(led["mechanisms"]), ""]
    for whose, what in (unconfirmed or {}).items():
        lines += [f"**{whose}** was sent {', '.join(what)} and sent no report back: what it spent there "
                  "is not counted here (the site's own ledger holds it).", ""]
    lines += [
        "Every release computed from private data is a Gaussian mechanism recorded in the ledger above before it "
        "was released; noise came from OS entropy, never from the seed. Treated as public: "
        f"{TREATED_AS_PUBLIC}. The guarantee covers everything in this "
        "directory except `private/` (un-noised training statistics and a simulation's site state, for the data "
        "curator only), `superlink/` "
        "(an on-premise server's logs: when each site's message arrived) and evaluation outputs computed on a real "
        "holdout.",
        "",
        "## What may be shared",
        "",
        *[f"- `{name}` — {what}" for name, what in SHAREABLE.items()],
        "- not `private/`, nor `superlink/`",
        "",
        "## Intended use and limits",
        "",
        "Synthetic images for development, testing and downstream training where the private images may not go. "
        "DP bounds what the outputs reveal about any one record; it does not make the samples faithful: check their "
        "quality (`sapf evaluate`) before relying on them.",
        "",
        "## How to sample",
        "",
        "```bash",
        "sapf sample --model . --num 64 --out samples",
        "```",
        "",
        "```python",
        *(["from sapf.engine.mepf import load_mean_embedding_generator, sample_generator",
           'images, labels = sample_generator(load_mean_embedding_generator("model"), 64)'] if mepf else
          ["from diffusers import DiffusionPipeline",
           'pipe = DiffusionPipeline.from_pretrained("model", trust_remote_code=True)',
           "images = pipe(class_labels=[0, 1, 7]).images"]),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: Path, **kwargs) -> None:
    write_text(Path(run_dir) / "README.md", model_card(**kwargs))
