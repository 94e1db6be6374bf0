"""A run's model directory is a diffusers pipeline: diffusers alone loads it and samples by class."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_generator
from diffusers import DiffusionPipeline

from sapf.engine.model import PIPELINE_MODULE, default_model_dir, save_generator
from sapf.sampling_inputs import DEFAULT_STEPS


def _load(path) -> DiffusionPipeline:
    return DiffusionPipeline.from_pretrained(path, trust_remote_code=True)


def test_a_model_directory_loads_and_samples_with_diffusers_alone(tmp_path):
    save_generator(tiny_generator(), tmp_path / "model")
    pipe = _load(tmp_path / "model")
    assert type(pipe).__name__ == "SapfPipeline"
    pipe.set_progress_bar_config(disable=True)

    def run(labels, seed=0, **kw):
        g = torch.Generator().manual_seed(seed)
        return pipe(class_labels=labels, num_inference_steps=4, generator=g, output_type="np", **kw).images

    images = run([0, 1, 7])
    assert images.shape == (3, 16, 16, 1) and images.min() >= 0 and images.max() <= 1
    # Class-conditional: the same noise under another label gives another image; the same label, the same one.
    again, other = run([0, 1, 7]), run([0, 1, 3])
    np.testing.assert_array_equal(images, again)
    assert np.allclose(images[:2], other[:2]) and not np.allclose(images[2], other[2])
    np.testing.assert_array_equal(run([0, 1, 7], guidance_scale=1.0), images)  # w = 1: the plain conditional sample
    with pytest.raises(ValueError, match="null"):
        run([0], guidance_scale=2.0)  # this model learnt no unconditional class
    pil = pipe(class_labels=[2], num_inference_steps=2).images
    assert pil[0].size == (16, 16)
    # No step count given: sapf's default, written into model_index.json beside the guidance weight.
    assert pipe.config.num_inference_steps == DEFAULT_STEPS
    default = pipe(class_labels=[4], generator=torch.Generator().manual_seed(1), output_type="np").images
    explicit = pipe(class_labels=[4], num_inference_steps=DEFAULT_STEPS, generator=torch.Generator().manual_seed(1),
                    output_type="np").images
    np.testing.assert_array_equal(default, explicit)
    assert not np.allclose(default, run([4], seed=1))  # 4 steps draw another image from the same noise


def test_the_shipped_model_is_a_pipeline_directory_with_the_packaged_module():
    shipped = default_model_dir()
    index = json.loads((shipped / "model_index.json").read_text())
    assert index["_class_name"] == [PIPELINE_MODULE, "SapfPipeline"]
    assert index["num_inference_steps"] == DEFAULT_STEPS  # the shipped index names sapf's default, as a saved one does
    packaged = Path(__file__).resolve().parents[1] / "sapf" / "export" / f"{PIPELINE_MODULE}.py"
    assert (shipped / f"{PIPELINE_MODULE}.py").read_text() == packaged.read_text()
    pipe = _load(shipped)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[5], num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 28, 28, 1)
