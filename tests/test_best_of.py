"""Best-of-n sampling (`sapf sample --best-of N`): every image is its most probable candidate under the shipped
classifier of the public digits, in the torch and the ONNX sampler alike, and the classifier is the public recipe's."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import TINY
from typer.testing import CliRunner

from sapf.cli import app
from sapf.errors import SapfError
from sapf.outputs import to_uint8
from sapf.public_classifier import DEFAULT_BEST_OF, SHIPPED, PublicClassifier, export_public_classifier

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def digit_model_dir(tmp_path_factory):
    """A tiny UNet of the real architecture at the digits' size (28x28 grey, 10 classes), random weights."""
    from sapf.engine.model import DiffusionModel, build_scheduler, build_unet, save_generator

    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("digit_model")
    save_generator(DiffusionModel(build_unet(**{**TINY, "image_size": 28}), build_scheduler()), d)
    return d


@pytest.fixture(scope="module")
def digit_onnx(digit_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("digit_onnx")
    shutil.copytree(digit_model_dir, d / "run" / "model")
    r = run("export", d / "run", "--out", d / "model.onnx")
    assert r.exit_code == 0, r.output
    return d / "model.onnx"


def expected_choice(candidates: np.ndarray, label: int, best_of: int) -> np.ndarray:
    """Each group of `best_of` consecutive candidates' most probable one, computed here from the classifier."""
    p = PublicClassifier().class_probability(candidates, np.full(len(candidates), label))
    groups = p.reshape(-1, best_of)
    assert (groups.max(axis=1) > groups.min(axis=1)).all()  # a real choice in every group, not a tie
    return candidates[np.arange(len(groups)) * best_of + groups.argmax(axis=1)]


def draw_torch(model_dir, num, **kw):
    from sapf.engine.model import load_generator
    from sapf.engine.sampling import sample

    return sample(load_generator(model_dir), num, steps=4, seed=3, show_progress=False, **kw)


def draw_onnx(onnx_file, num, **kw):
    from sapf.export.onnx_sampler import OnnxSampler

    return OnnxSampler(onnx_file).sample(num, steps=4, seed=3, show_progress=False, **kw)


@pytest.mark.parametrize("sampler", ["torch", "onnx"])
def test_each_image_is_its_most_probable_candidate(sampler, digit_model_dir, digit_onnx):
    # With one class asked for, the candidates of best-of-3 are exactly the plain sample of 3x as many images
    # (the same seed, image i·3 + j from noise i·3 + j), so the choice can be recomputed independently.
    draw = (lambda n, **kw: draw_torch(digit_model_dir, n, **kw)) if sampler == "torch" else (
        lambda n, **kw: draw_onnx(digit_onnx, n, **kw))
    candidates, _ = draw(18, class_label=7, best_of=1)
    chosen, labels = draw(6, class_label=7, best_of=3)
    assert (labels == 7).all() and chosen.shape == (6, 28, 28)
    assert (chosen == expected_choice(candidates, 7, 3)).all()
    # The choice raises the classifier's probability of the class over a plain draw of as many images.
    clf = PublicClassifier()
    plain, _ = draw(6, class_label=7, best_of=1)
    assert clf.class_probability(chosen, labels).mean() > clf.class_probability(plain, labels).mean()
    # Class-balanced when no class is asked for, as without --best-of.
    _, balanced = draw(12, best_of=2)
    assert balanced.tolist() == (np.arange(12) % 10).tolist()


@pytest.mark.parametrize("sampler", ["torch", "onnx"])
def test_digit_models_sample_best_of_by_default_and_other_models_plainly(sampler, digit_model_dir, digit_onnx,
                                                                         tiny_model_dir):
    draw = (lambda n, **kw: draw_torch(digit_model_dir, n, **kw)) if sampler == "torch" else (
        lambda n, **kw: draw_onnx(digit_onnx, n, **kw))
    assert DEFAULT_BEST_OF > 1
    default, _ = draw(4, class_label=5)
    assert (default == draw(4, class_label=5, best_of=DEFAULT_BEST_OF)[0]).all()
    assert not (default == draw(4, class_label=5, best_of=1)[0]).all()
    # A model the digit classifier cannot read (16x16) samples one candidate an image by default, not an error.
    assert (draw_torch(tiny_model_dir, 3)[0] == draw_torch(tiny_model_dir, 3, best_of=1)[0]).all()


def test_cli_records_the_best_of_it_used(digit_onnx, tiny_model_dir, tmp_path):
    import json

    for name, source, used in (("digits", ["--onnx", digit_onnx], DEFAULT_BEST_OF),
                               ("tiny", ["--model", tiny_model_dir], 1)):
        r = run("sample", *source, "--num", 2, "--steps", 2, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / name / "config.json").read_text())["best_of"] == used


def test_best_of_refuses_what_the_digit_classifier_cannot_judge(tiny_model_dir, digit_onnx, tmp_path):
    with pytest.raises(SapfError, match="classifier of the public digits"):
        draw_torch(tiny_model_dir, 4, best_of=2)  # 16x16: not the digits' size
    draw_torch(tiny_model_dir, 2, best_of=1)  # best-of-1 is the plain sampler, any model
    for n in (0, 17):
        r = run("sample", "--onnx", digit_onnx, "--best-of", n, "--out", tmp_path / f"s{n}")
        assert r.exit_code == 2 and r.output.strip().splitlines() == [
            f"sapf: error: --best-of must lie in [1, 16], got {n}"], r.output
    r = run("sample", "--model", tiny_model_dir, "--best-of", 2, "--num", 4, "--steps", 2, "--out", tmp_path / "t")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--best-of 1" in r.output
    assert not any(tmp_path.iterdir())


def test_cli_best_of_writes_the_choice_and_records_it(digit_onnx, tmp_path):
    import json

    r = run("sample", "--onnx", digit_onnx, "--num", 4, "--steps", 4, "--seed", 3, "--class-label", 2,
            "--best-of", 2, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "s" / "samples.npz")
    candidates, _ = draw_onnx(digit_onnx, 8, class_label=2, best_of=1)
    assert (z["images"] == expected_choice(candidates, 2, 2)).all()
    assert json.loads((tmp_path / "s" / "config.json").read_text())["best_of"] == 2


def test_the_shipped_classifier_is_the_public_recipe(tmp_path):
    """The shipped ONNX file is what export_public_classifier makes from the public digits (nothing private went in):
    re-made here, it classifies the public digits as the shipped one does (training may round differently on
    another CPU, so agreement rather than equality)."""
    from sapf.engine.data import load_dataset

    remade = tmp_path / "classifier.onnx"
    export_public_classifier(remade)
    public = load_dataset("digits", 28, 1)
    images = to_uint8(public.images)
    shipped, again = PublicClassifier(SHIPPED), PublicClassifier(remade)
    agree = np.mean([
        (shipped.class_probability(images, np.full(len(images), k)) > 0.5)
        == (again.class_probability(images, np.full(len(images), k)) > 0.5) for k in range(10)])
    assert agree > 0.98
    # And it knows the public digits (trained on them): most are its most probable class.
    p = np.stack([shipped.class_probability(images, np.full(len(images), k)) for k in range(10)], axis=1)
    assert (p.argmax(axis=1) == public.labels).mean() > 0.9


def test_dp_mepf_generator_chooses_the_same_way():
    from sapf.engine.mepf import MeanEmbeddingGenerator, sample_generator

    torch.manual_seed(0)
    gen = MeanEmbeddingGenerator().eval()
    candidates, _ = sample_generator(gen, 12, class_label=4, seed=3, best_of=1)
    chosen, labels = sample_generator(gen, 4, class_label=4, seed=3, best_of=3)
    assert (labels == 4).all() and (chosen == expected_choice(candidates, 4, 3)).all()
