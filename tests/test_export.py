"""ONNX export (parity with PyTorch) and the torch-free ONNX sampler."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sapf.cli import app
from sapf.errors import SapfError
from sapf.export import onnx_export
from sapf.export.onnx_sampler import DDIM, OnnxSampler, metadata_path

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(r) -> str:
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sapf: error:"), r.output
    return lines[0]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """The tiny model as a run dir (model/ inside), exported with `sapf export`."""
    d = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_model_dir, d / "run" / "model")
    out = d / "tiny.onnx"
    r = run("export", d / "run", "--out", out)
    assert r.exit_code == 0, r.output
    assert "max |Δ|" in r.output
    return out


def _reuse(exported):
    """Stand-in for the (slow) torch.onnx.export: the tiny model's export from the fixture."""
    return lambda gen, path, opset: shutil.copyfile(exported, path)


def test_export_parity_and_metadata(exported, tiny_model_dir):
    import onnx

    onnx.checker.check_model(str(exported))
    meta = json.loads(metadata_path(exported).read_text())
    assert meta["variant"] == "fp32" and meta["opset"] == 18
    assert (meta["image_size"], meta["channels"], meta["num_classes"]) == (16, 1, 10)
    assert meta["inputs"] == ["sample", "timestep", "class_labels"]
    assert meta["scheduler"]["beta_schedule"] == "squaredcos_cap_v2"
    assert meta["parity_max_abs_diff"] <= 1e-4 and meta["parity"]["timesteps"] == [0, 250, 500, 999]
    # Dynamic batch: batch 1 and 5 run and match PyTorch.
    from sapf.engine.model import load_generator

    gen = load_generator(tiny_model_dir)
    rng = np.random.default_rng(1)
    feeds = [{"sample": rng.standard_normal((b, 1, 16, 16)).astype(np.float32), "timestep": np.full(b, 700),
              "class_labels": np.arange(b) % 10} for b in (1, 5)]
    err = onnx_export.prediction_error(onnx_export.torch_predictions(gen, feeds),
                                       onnx_export.onnx_predictions(exported, feeds))
    assert err["max_abs_diff"] <= 1e-4


def test_export_refuses_existing_out_without_force(exported, tmp_path):
    before = exported.read_bytes()
    r = run("export", tmp_path, "--out", exported)
    assert "--force" in one_error_line(r)
    assert exported.read_bytes() == before
    assert "exclusive" in one_error_line(run("export", tmp_path, "--out", tmp_path / "x.onnx", "--fp16", "--int8"))
    assert "does not exist" in one_error_line(run("export", tmp_path / "nope", "--out", tmp_path / "x.onnx"))


def test_failed_parity_leaves_no_file(exported, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "_export_fp32", _reuse(exported))
    monkeypatch.setattr(onnx_export, "FP32_BOUND", 0.0)
    out = tmp_path / "m.onnx"
    with pytest.raises(SapfError, match="parity failed"):
        onnx_export.export_onnx(tiny_model_dir, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_quantised_variants_within_bounds(variant, exported, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "_export_fp32", _reuse(exported))
    out = tmp_path / f"m.{variant}.onnx"
    r = run("export", tiny_model_dir, "--out", out, f"--{variant}")
    assert r.exit_code == 0, r.output
    p = json.loads(metadata_path(out).read_text())["parity"]
    if variant == "int8":
        assert p["metric"] == "rel_rmse" and p["rel_rmse"] <= onnx_export.INT8_BOUND == 0.03
        assert "relative RMSE" in r.output
    else:
        assert p["metric"] == "max_abs_diff" and p["max_abs_diff"] <= onnx_export.FP16_BOUND
    ref, _ = OnnxSampler(exported).sample(10, steps=5, seed=2, show_progress=False)
    got, _ = OnnxSampler(out).sample(10, steps=5, seed=2, show_progress=False)
    assert np.abs(ref.astype(int) - got.astype(int)).mean() < 3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_torch_and_onnx_samplers_agree(exported, tiny_model_dir, eta):
    from sapf.engine.model import load_generator
    from sapf.engine.sampling import sample

    a, la = sample(load_generator(tiny_model_dir), 10, steps=8, seed=5, batch_size=4, show_progress=False, eta=eta)
    s = OnnxSampler(exported)
    assert s.provider == "CPUExecutionProvider"
    b, lb = s.sample(10, steps=8, seed=5, batch_size=4, show_progress=False, eta=eta)
    assert a.shape == b.shape == (10, 16, 16) and b.dtype == np.uint8 and lb.dtype == np.int64
    assert (la == lb).all()
    d = np.abs(a.astype(int) - b.astype(int))
    assert d.max() <= 2 and d.mean() < 0.5
    # The IOBinding loop (the GPU path: DDIM update as an ONNX graph), run here on CPU OrtValues.
    s.iobinding = True
    c, _ = s.sample(10, steps=8, seed=5, batch_size=4, show_progress=False, eta=eta)
    d = np.abs(c.astype(int) - b.astype(int))
    assert d.max() <= 1 and d.mean() < 0.05


def test_stochastic_sampling_is_seeded_per_image(tiny_model_dir):
    """eta > 0 draws fresh noise every step, from one generator per image: the same seed gives the same
    images whatever the batch size, another seed other images, and eta changes the result."""
    from sapf.engine.model import load_generator
    from sapf.engine.sampling import sample

    gen = load_generator(tiny_model_dir)
    a, _ = sample(gen, 6, steps=6, seed=1, batch_size=6, show_progress=False, eta=1.0)
    b, _ = sample(gen, 6, steps=6, seed=1, batch_size=4, show_progress=False, eta=1.0)
    c, _ = sample(gen, 6, steps=6, seed=1, batch_size=6, show_progress=False, eta=0.0)
    d, _ = sample(gen, 6, steps=6, seed=2, batch_size=6, show_progress=False, eta=1.0)
    assert (a == b).all()
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5 and np.abs(a.astype(int) - d.astype(int)).mean() > 5
    with pytest.raises(SapfError, match="--eta"):
        sample(gen, 2, steps=2, show_progress=False, eta=1.5)


BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
try:
    import torch
    raise SystemExit("torch import was not blocked")
except ImportError:
    pass
"""


def test_onnx_sampler_runs_without_torch(exported, tmp_path):
    out = tmp_path / "s"
    code = BLOCK_TORCH + textwrap.dedent(f"""
        from sapf.cli import app
        try:
            app(["sample", "--onnx", {str(exported)!r}, "--num", "12", "--steps", "4", "--seed", "3",
                 "--out", {str(out)!r}])
        except SystemExit as e:
            assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
            assert not [m for m in sys.modules if m.startswith("sapf.engine")]
            raise
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    z = np.load(out / "samples.npz")
    assert z["images"].shape == (12, 16, 16) and z["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert (out / "grid.png").exists() and len(list(out.glob("*_class*.png"))) == 12
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["provider"] == "CPUExecutionProvider"
    # Same seed, same images as the in-process sampler.
    same, _ = OnnxSampler(exported).sample(12, steps=4, seed=3, show_progress=False)
    assert (same == z["images"]).all()


def test_bad_inputs_give_one_line(exported, tmp_path):
    not_onnx = tmp_path / "junk.onnx"
    not_onnx.write_text("this is not a protobuf\n")
    assert "not a valid ONNX model" in one_error_line(run("sample", "--onnx", not_onnx, "--out", tmp_path / "a"))
    bare = tmp_path / "bare.onnx"
    shutil.copyfile(exported, bare)
    assert "no metadata" in one_error_line(run("sample", "--onnx", bare, "--out", tmp_path / "b"))
    assert "outside the model's classes" in one_error_line(
        run("sample", "--onnx", exported, "--class-label", 10, "--out", tmp_path / "c"))
    assert "--num" in one_error_line(run("sample", "--onnx", exported, "--num", 0, "--out", tmp_path / "d"))
    assert "--steps" in one_error_line(run("sample", "--onnx", exported, "--steps", 0, "--out", tmp_path / "e"))
    assert not any(tmp_path.glob("[a-e]"))


def test_cuda_without_cuda(exported, tmp_path):
    try:
        provider = OnnxSampler(exported, device="cuda").provider
    except SapfError:
        provider = None
    if provider == "CUDAExecutionProvider":
        pytest.skip("CUDA is usable here")
    r = run("sample", "--onnx", exported, "--device", "cuda", "--num", 2, "--steps", 2, "--out", tmp_path / "a")
    assert "--allow-cpu-fallback" in one_error_line(r)
    assert not (tmp_path / "a").exists()
    r = run("sample", "--onnx", exported, "--device", "cuda", "--allow-cpu-fallback", "--num", 2, "--steps", 2,
            "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "sampling on CPU" in r.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["provider"] == "CPUExecutionProvider"


def test_unconditional_model(tmp_path):
    from sapf.engine.model import DiffusionModel, build_scheduler, build_unet, save_generator

    torch.manual_seed(0)
    save_generator(DiffusionModel(build_unet(16, 1, 0, (8, 16), 1, 8, 4), build_scheduler()), tmp_path / "m")
    meta = onnx_export.export_onnx(tmp_path / "m", tmp_path / "u.onnx")
    assert meta["num_classes"] == 0 and meta["inputs"] == ["sample", "timestep"] and meta["parity_max_abs_diff"] <= 1e-4
    s = OnnxSampler(tmp_path / "u.onnx")
    images, labels = s.sample(3, steps=2, show_progress=False)
    assert images.shape == (3, 16, 16) and labels.tolist() == [0, 0, 0]
    with pytest.raises(SapfError, match="unconditional"):
        s.sample(3, class_label=1)


def test_adapter_run_dir_is_merged(tiny_model_dir, tmp_path):
    from sapf.engine.finetune import make_trainable, merged_generator
    from sapf.engine.model import load_generator
    from sapf.engine.saliency import candidate_modules

    gen = load_generator(tiny_model_dir)
    model = make_trainable(gen, "attention", candidate_modules(gen.unet)[:4], rank=2, lora_alpha=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "config.json").write_text(json.dumps({"base_model_resolved": str(tiny_model_dir)}))
    merged = onnx_export.load_source(tmp_path)
    ref = merged_generator(gen, model, "attention")
    feeds = onnx_export._parity_inputs(gen)
    a, b = onnx_export.torch_predictions(ref, feeds), onnx_export.torch_predictions(merged, feeds)
    assert onnx_export.prediction_error(a, b)["max_abs_diff"] < 1e-5
    assert onnx_export.prediction_error(onnx_export.torch_predictions(gen, feeds), b)["max_abs_diff"] > 1e-3
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SapfError, match="base_model_resolved"):
        onnx_export.load_source(tmp_path)


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(beta_schedule="linear", timestep_spacing="trailing"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, steps_offset=1),
    dict(timestep_spacing="linspace", prediction_type="v_prediction", clip_sample=False),
    dict(prediction_type="sample", clip_sample_range=0.5, timestep_spacing="trailing"),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
])
def test_numpy_ddim_matches_diffusers(cfg):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**{"beta_schedule": "squaredcos_cap_v2", **cfg})
    ours = DDIM(dict(sched.config))
    rng = np.random.default_rng(0)
    for steps in (10, 7):
        sched.set_timesteps(steps)
        ts = ours.set_timesteps(steps)
        assert (ts == sched.timesteps.numpy()).all()
        for t in ts:
            x, m = (rng.standard_normal((2, 1, 4, 4)).astype(np.float32) for _ in range(2))
            ref = sched.step(torch.from_numpy(m), t, torch.from_numpy(x), eta=0.0).prev_sample.numpy()
            # 1e-4 is far below one uint8 level (1/127.5); zero-SNR schedules amplify float32 ulps near ᾱ = 0.
            np.testing.assert_allclose(ours.step(m, int(t), x), ref, rtol=1e-4, atol=1e-4)
            z = rng.standard_normal(x.shape).astype(np.float32)
            for eta in (0.5, 1.0):  # the stochastic update, given the same step noise
                ref = sched.step(torch.from_numpy(m), t, torch.from_numpy(x), eta=eta,
                                 variance_noise=torch.from_numpy(z)).prev_sample.numpy()
                got = ours.step(m, int(t), x, eta, z)
                # diffusers' NaN (zero-SNR, eta=1: √ of a rounding negative) is not copied
                assert np.isfinite(got).all()
                ok = np.isfinite(ref)
                np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-4, atol=1e-4)


def test_thresholding_is_refused():
    with pytest.raises(SapfError, match="thresholding"):
        DDIM({"thresholding": True})
