import json

import numpy as np
import torch
from typer.testing import CliRunner

from sapf.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("pretrain", "sample", "train", "select"):
        assert cmd in r.output


def test_pretrain_then_sample(tmp_path):
    m = tmp_path / "model"
    r = run("pretrain", "--data", "digits", "--image-size", 16, "--widths", "8,16", "--steps", 10, "--batch-size", 8,
            "--out", m)
    assert r.exit_code == 0, r.output
    for f in ("unet/config.json", "scheduler/scheduler_config.json", "config.json", "loss.png", "samples/grid.png"):
        assert (m / f).exists(), f
    assert json.loads((m / "config.json").read_text())["slant"] == [-0.1, 0.5]  # the default augmentation, recorded
    s = tmp_path / "s"
    r = run("sample", "--model", m, "--num", 6, "--steps", 3, "--seed", 4, "--out", s)
    assert r.exit_code == 0, r.output
    z = np.load(s / "samples.npz")
    assert (z["images"].shape == (6, 16, 16) and z["images"].dtype == np.uint8
            and z["labels"].tolist() == [0, 1, 2, 3, 4, 5])
    assert len(list(s.glob("*_class*.png"))) == 6 and (s / "grid.png").exists()
    # An existing --out is refused without --force, and left untouched.
    before = (s / "samples.npz").read_bytes()
    r = run("sample", "--model", m, "--num", 2, "--steps", 2, "--out", s)
    assert r.exit_code != 0 and "--force" in r.output and "Traceback" not in r.output
    assert (s / "samples.npz").read_bytes() == before
    r = run("sample", "--model", m, "--num", 2, "--steps", 2, "--out", s, "--force")
    assert r.exit_code == 0 and np.load(s / "samples.npz")["images"].shape[0] == 2


def test_bad_inputs_one_line_no_traceback(tmp_path, tiny_model_dir):
    cases = [
        ("sample", "--model", tiny_model_dir, "--num", 0, "--out", tmp_path / "a"),
        ("sample", "--model", tmp_path, "--num", 2, "--out", tmp_path / "b"),
        ("sample", "--model", tiny_model_dir, "--num", 2, "--class-label", 12, "--out", tmp_path / "c"),
        ("pretrain", "--data", tmp_path / "nope", "--out", tmp_path / "d"),
        ("pretrain", "--data", "digits", "--widths", "8,x", "--out", tmp_path / "e"),
        ("pretrain", "--data", "digits", "--slant", "0.5,-0.1", "--out", tmp_path / "f"),
        ("pretrain", "--data", "digits", "--slant", "lean", "--out", tmp_path / "g"),
        ("pretrain", "--data", "digits", "--augmentation", "blur", "--out", tmp_path / "g2"),
        ("federate", "--clients", 2, "--rank", 0, "--out", tmp_path / "h"),  # refused before any site spends budget
        ("train", "--device", "tpu", "--out", tmp_path / "i"),
        ("sample", "--model", tiny_model_dir, "--device", "cuda:x", "--out", tmp_path / "j"),
        ("federate", "--clients", 2, "--selection", "sparta", "--row-fraction", 0, "--out", tmp_path / "m"),
        ("train", "--method", "dp-mepf", "--warmup", "central-images", "--out", tmp_path / "n"),  # no diffusion model
        ("train", "--method", "dp-mepf", "--generator-steps", 0, "--out", tmp_path / "o"),
        ("federate", "--clients", 2, "--selection-budget", 1.5, "--out", tmp_path / "p"),  # reaches the plan's check
        # refused before any work: an --out under a file, sizes and rates that no run can use
        ("sample", "--model", tiny_model_dir, "--num", 1, "--out", tmp_path / "afile" / "q"),
        ("pretrain", "--data", "digits", "--out", tmp_path / "afile" / "r"),
        ("pretrain", "--data", "digits", "--image-size", 0, "--out", tmp_path / "s"),
        ("train", "--epochs", "inf", "--out", tmp_path / "t"),
        ("train", "--clip", "inf", "--out", tmp_path / "u"),
        ("select", "--clip", "inf", "--out", tmp_path / "v"),
        ("federate", "--clients", 2, "--local-epochs", "inf", "--out", tmp_path / "w"),
        ("federate", "--clients", 2, "--min-clients", 3, "--out", tmp_path / "w"),  # refused, not lowered
        ("federate", "--clients", 2, "--partition", "dirichlet", "--alpha", "inf", "--out", tmp_path / "x"),
        ("export", tiny_model_dir, "--out", tmp_path / "afile" / "y.onnx"),
        ("evaluate", "--samples", tmp_path / "junk.npz"),
        ("evaluate", "--samples", tmp_path / "nan.npz"),
        ("certs", "--out", tmp_path / "z", "--site", "../evil"),
        ("certs", "--out", tmp_path / "afile", "--site", "a"),
        ("certs", "--out", tmp_path / "z", "--host", "127.0.0.1", "--site", ""),
    ]
    missing_model = run("sample", "--model", tmp_path / "no-such-model", "--num", 1, "--out", tmp_path / "a")
    assert missing_model.exit_code == 2 and "does not exist" in missing_model.output, missing_model.output
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "junk.npz").write_bytes(b"not an npz at all")
    np.savez(tmp_path / "nan.npz", images=np.full((3, 28, 28), np.nan), labels=np.arange(3))
    if not torch.cuda.is_available():  # where CUDA is missing, asking for it fails before any work
        cases += [("train", "--device", "cuda", "--out", tmp_path / "k"),
                  ("sample", "--model", tiny_model_dir, "--device", "cuda", "--out", tmp_path / "l")]
    for args in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("sapf: error:"), r.output
        assert "Traceback" not in r.output
    assert not any((tmp_path / x).exists() for x in "abcdefghijklmnopqrstuvwxyz" if x != "z")
    assert not (tmp_path / "z").exists() and not (tmp_path / "evil").exists()  # nothing half-made, nothing outside
