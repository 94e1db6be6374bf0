import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from peft import PeftModel
from typer.testing import CliRunner

from sapf.cli import app
from sapf.engine.model import load_generator

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("selection,optimizer", [("saliency", "adam"), ("full", "adam"), ("saliency", "sgd")])
def test_train_end_to_end_at_epsilon_10(tmp_path, tiny_model_dir, mnist_small_npz, selection, optimizer):
    out = tmp_path / "run"
    r = run("train", "--base-model", tiny_model_dir, "--data", mnist_small_npz, "--epsilon", 10,
            "--selection", selection, "--steps", 4, "--batch-size", 16, "--multiplicity", 2, "--seed", 1,
            "--optimizer", optimizer, "--warmup", "none", "--out", out)
    assert r.exit_code == 0, r.output
    priv = json.loads((out / "privacy.json").read_text())
    assert set(priv) >= {"target_epsilon", "delta", "accountant", "epsilon_spent", "mechanisms"}
    n = json.loads((out / "metrics.json").read_text())["examples"]  # the hash split keeps ~80% of 120 (sd ~4.4)
    assert 80 <= n <= 112 and 0 < priv["epsilon_spent"] <= 10.0 and priv["delta"] < 1 / n
    names = [m["name"] for m in priv["mechanisms"]]
    assert names == (["saliency-query", "dp-sgd"] if selection == "saliency" else ["dp-sgd"])
    assert priv["mechanisms"][-1]["steps"] == 4 and priv["mechanisms"][-1]["sample_rate"] == pytest.approx(16 / n)
    sel = json.loads((out / "selection.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 1 and cfg["multiplicity"] == 2 and cfg["resolved_steps"] == 4
    assert cfg["optimizer"] == optimizer
    merged = UNet2DModel.from_pretrained(out / "model" / "unet")
    base = load_generator(tiny_model_dir).unet
    assert (out / "grid.png").exists() and (out / "private" / "loss.png").exists()
    card = (out / "README.md").read_text()  # the model card: method, guarantee, every mechanism, how to sample
    assert f"ε = {priv['epsilon_spent']:.4g}" in card and "add/remove one record" in card
    assert all(f"| {m['name']} |" in card for m in priv["mechanisms"]) and "from_pretrained" in card
    assert [s["name"] for s in cfg["stages"]] == ["select", "finetune"]
    changed = [n for (n, p), (_, q) in zip(merged.named_parameters(), base.named_parameters(), strict=False)
               if not torch.equal(p, q)]
    if selection == "saliency":
        assert len(sel["scores"]) == len(sel["candidates"]) and 0 < len(sel["selected"]) < len(sel["candidates"])
        peft_model = PeftModel.from_pretrained(load_generator(tiny_model_dir).unet, out / "adapter")
        x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 900]), torch.tensor([3, 4])
        with torch.no_grad():
            torch.testing.assert_close(peft_model(x, t, class_labels=y).sample, merged(x, t, y).sample,
                                       rtol=1e-4, atol=1e-5)
        # Only the selected matrices and the class embedding changed.
        assert changed and all(any(n.startswith(s + ".") for s in sel["selected"]) or n.startswith("class_embedding")
                               for n in changed)
    else:
        assert not (out / "adapter").exists() and len(changed) > 10


def test_non_private_says_so(tmp_path, tiny_model_dir, mnist_small_npz):
    r = run("train", "--base-model", tiny_model_dir, "--data", mnist_small_npz, "--epsilon", "inf",
            "--selection", "attention", "--steps", 2, "--multiplicity", 1, "--warmup", "none", "--out", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert "WITHOUT differential privacy" in r.output
    # No --batch-size: the default (256) would not fit ~96 examples, so a quarter of them is used, and recorded.
    n = json.loads((tmp_path / "r" / "metrics.json").read_text())["examples"]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["batch_size"] == n // 4
    priv = json.loads((tmp_path / "r" / "privacy.json").read_text())
    # Every release is recorded whatever its σ: σ = 0 says, to any accountant, that nothing is guaranteed.
    assert [(m["name"], m["noise_multiplier"], m["steps"]) for m in priv["mechanisms"]] == [("dp-sgd", 0.0, 2)]
    assert priv["private"] is False and priv["epsilon_spent"] is None
    assert "ε spent inf" in r.output


def test_bad_training_input(tmp_path, tiny_model_dir, mnist_small_npz):
    (tmp_path / "empty").mkdir()
    base = ["train", "--base-model", tiny_model_dir, "--steps", 2, "--out", tmp_path / "o"]
    cases = {
        "epsilon": ["--data", mnist_small_npz, "--epsilon", "0"],
        "delta": ["--data", mnist_small_npz, "--delta", "0.5"],
        "top-fraction": ["--data", mnist_small_npz, "--top-fraction", "1.5"],
        "batch-size": ["--data", mnist_small_npz, "--batch-size", "500"],
        "no class sub-folders": ["--data", tmp_path / "empty"],
        "selection": ["--data", mnist_small_npz, "--selection", "everything"],
        "no noise level": ["--data", mnist_small_npz, "--epsilon", "0.001", "--steps", "100000"],
        "optimizer": ["--data", mnist_small_npz, "--optimizer", "rmsprop"],
        "--lr must be given": ["--data", mnist_small_npz, "--optimizer", "sgd", "--selection", "full"],
    }
    for expect, extra in cases.items():
        r = run(*base, *extra)
        assert r.exit_code == 2, (expect, r.output)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and expect in lines[0], (expect, r.output)
    assert not (tmp_path / "o").exists()


def test_unknown_module_names_are_refused():
    from conftest import tiny_generator

    from sapf.engine.finetune import make_trainable
    from sapf.errors import SapfError

    with pytest.raises(SapfError, match="not in the model"):
        make_trainable(tiny_generator(), "saliency", ["mid_block.attentions.0.to_nothing"])


def test_select_command(tmp_path, tiny_model_dir, mnist_small_npz):
    r = run("select", "--base-model", tiny_model_dir, "--data", mnist_small_npz, "--epsilon", 1,
            "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    sel = json.loads((tmp_path / "s" / "selection.json").read_text())
    priv = json.loads((tmp_path / "s" / "privacy.json").read_text())
    assert priv["epsilon_spent"] <= 1.0 and priv["mechanisms"][0]["name"] == "saliency-query"
    assert np.isclose(sel["noise_multiplier"], priv["mechanisms"][0]["noise_multiplier"])
