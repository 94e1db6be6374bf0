"""Classifier-free guidance: the same weight w in the torch sampler, the ONNX sampler and the diffusers pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sapf.cli import app
from sapf.engine.model import load_generator
from sapf.engine.sampling import sample
from sapf.errors import SapfError


@pytest.fixture(scope="module")
def null_model(tiny_model_dir, tmp_path_factory):
    """The tiny model read as 9 classes plus a null class (its last embedding), as `sapf pretrain` saves one."""
    d = tmp_path_factory.mktemp("cfg") / "model"
    shutil.copytree(tiny_model_dir, d)
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps({**index, "null_class": 9}))
    return d


def _sample(gen, label, w, **kw):
    return sample(gen, 4, class_label=label, steps=4, seed=3, eta=0.0, guidance=w, show_progress=False, **kw)[0]


def test_guidance_weights_in_the_torch_sampler(null_model, tiny_model_dir):
    gen = load_generator(null_model)
    assert (gen.num_classes, gen.null_class) == (9, 9)
    # w = 0 is the unconditional prediction alone: the label no longer matters.
    np.testing.assert_array_equal(_sample(gen, 1, 0.0), _sample(gen, 5, 0.0))
    # w = 1 is the plain conditional sample: the same weights read without a null class give the same images;
    # w = 3 moves away from it.
    plain = sample(load_generator(tiny_model_dir), 4, class_label=1, steps=4, seed=3, eta=0.0, show_progress=False)[0]
    np.testing.assert_array_equal(_sample(gen, 1, 1.0), plain)
    assert not np.array_equal(_sample(gen, 1, 3.0), plain)
    # No weight given: the model's default (GUIDANCE_WITH_NULL_CLASS with a null class, else 1).
    from sapf.sampling_inputs import GUIDANCE_WITH_NULL_CLASS

    np.testing.assert_array_equal(_sample(gen, 1, None), _sample(gen, 1, GUIDANCE_WITH_NULL_CLASS))
    np.testing.assert_array_equal(sample(load_generator(tiny_model_dir), 4, class_label=1, steps=4, seed=3, eta=0.0,
                                         show_progress=False)[0], plain)
    with pytest.raises(SapfError, match="null class"):
        _sample(load_generator(tiny_model_dir), 1, 2.0)  # a model trained without one


def test_the_onnx_sampler_and_the_pipeline_guide_like_the_torch_sampler(null_model, tmp_path):
    from diffusers import DiffusionPipeline

    from sapf.export.onnx_sampler import OnnxSampler

    r = CliRunner().invoke(app, ["export", str(null_model), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    onnx = OnnxSampler(tmp_path / "m.onnx")
    assert onnx.null_class == 9 and onnx.num_classes == 9
    want = _sample(load_generator(null_model), 2, 2.5).astype(int)
    got = onnx.sample(4, 2, steps=4, seed=3, eta=0.0, guidance=2.5, show_progress=False)[0].astype(int)
    assert np.abs(got - want).max() <= 2  # the same images, to float rounding
    pipe = DiffusionPipeline.from_pretrained(null_model, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    guided = pipe(class_labels=[2, 2], num_inference_steps=3, guidance_scale=2.5, generator=g, output_type="np")
    assert guided.images.shape == (2, 16, 16, 1)
