"""SPARTA: the row mask comes only from the released noisy scores, and only the chosen rows change."""

import json

import numpy as np
import torch
from diffusers import UNet2DModel
from typer.testing import CliRunner

from sapf.cli import app
from sapf.engine.model import load_generator
from sapf.engine.sparta import make_row_trainable, mask_grad_samples, mask_grads, top_rows


def test_sparta_trains_only_the_rows_its_noisy_scores_chose(tmp_path, tiny_model_dir, mnist_small_npz):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, [str(a) for a in (
        "train", "--base-model", tiny_model_dir, "--data", mnist_small_npz, "--epsilon", 10, "--selection", "sparta",
        "--mask-steps", 2, "--steps", 3, "--batch-size", 16, "--warmup", "none", "--out", out)])
    assert r.exit_code == 0, r.output
    priv = json.loads((out / "privacy.json").read_text())
    mech = [(m["name"], m["steps"]) for m in priv["mechanisms"]]
    assert mech[0][0] == "sparta-mask" and sum(s for n, s in mech if n == "sparta-mask") == 2  # recorded, accounted
    assert mech[-1] == ("dp-sgd", 3) and 0 < priv["epsilon_spent"] <= 10.0
    sel = json.loads((out / "selection.json").read_text())
    scores = {n: np.asarray(s) for n, s in sel["extra"]["row_scores"].items()}
    rows = sel["extra"]["rows"]
    assert rows == top_rows(scores, 0.2)  # the mask is a function of the released noisy scores alone
    assert not (out / "adapter").exists()
    base = dict(load_generator(tiny_model_dir).unet.named_parameters())
    merged = dict(UNet2DModel.from_pretrained(out / "model" / "unet").named_parameters())
    moved = 0
    for name, p in merged.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in rows:
            keep = torch.ones(p.shape[0], dtype=torch.bool)
            keep[rows[module]] = False
            assert torch.equal(p[keep], base[name][keep]), name  # a frozen row of a chosen matrix
            moved += int((p[~keep] != base[name][~keep]).any())
        else:
            assert torch.equal(p, base[name]), name  # biases, norms, matrices with no chosen row
    assert moved > len(rows) // 2  # the chosen rows did train


def test_row_masks_zero_frozen_rows_of_per_sample_and_noisy_gradients(tiny_model_dir):
    gen = load_generator(tiny_model_dir)
    name = next(n for n, m in gen.unet.named_modules() if isinstance(m, torch.nn.Conv2d))
    model = make_row_trainable(gen, {name: [0, 2]})
    w = dict(model.named_modules())[name].weight
    assert [p for p in model.parameters() if p.requires_grad] == [w]
    w.grad_sample = torch.randn(5, *w.shape)
    w.grad = torch.randn(w.shape)
    before = w.grad_sample.clone()
    mask_grad_samples([w])
    mask_grads([w])
    frozen = [i for i in range(w.shape[0]) if i not in (0, 2)]
    assert (w.grad_sample[:, frozen] == 0).all() and (w.grad[frozen] == 0).all()
    assert torch.equal(w.grad_sample[:, [0, 2]], before[:, [0, 2]]) and (w.grad[[0, 2]] != 0).all()


def test_the_mask_release_adds_noise_of_std_sigma_times_clip_and_records_every_step(tiny_model_dir, mnist_small_npz):
    """With a huge σ the row scores are sums of |noise|: per coordinate and step their mean is σ·C·√(2/π). Noise
    shrunk, or a bound smaller than the clip, fails this; so does a step left out of the ledger."""
    import math

    import pytest

    from sapf.engine.data import load_dataset
    from sapf.engine.privacy import PrivacyLedger
    from sapf.engine.sparta import MaskQuery, noisy_row_scores

    gen = load_generator(tiny_model_dir)
    data = load_dataset(str(mnist_small_npz), gen.image_size, gen.channels)
    q = MaskQuery(candidates="all", clip=0.01, sample_rate=0.5, steps=2, row_fraction=0.2)
    ledger = PrivacyLedger(10.0, 1e-5, "rdp")
    sigma = 1e4
    scores = noisy_row_scores(gen, data, q, sigma, ledger, show_progress=False)
    modules = dict(gen.unet.named_modules())
    coordinates = sum(modules[n].weight.numel() for n in scores)
    mean_abs = sum(float(s.sum()) for s in scores.values()) / (coordinates * q.steps)
    assert mean_abs == pytest.approx(sigma * q.clip * math.sqrt(2 / math.pi), rel=0.02)
    assert sum(m.steps for m in ledger.mechanisms) == q.steps
    assert {(m.name, m.noise_multiplier, m.sample_rate) for m in ledger.mechanisms} == {("sparta-mask", sigma, 0.5)}
