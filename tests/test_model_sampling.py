import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from sapf.config import PretrainConfig
from sapf.engine.data import load_dataset
from sapf.engine.model import default_model_dir, load_generator, save_generator
from sapf.engine.pretrain import pretrain
from sapf.engine.sampling import sample
from sapf.errors import SapfError


def test_pretrain_save_load_round_trip(tmp_path):
    ds = load_dataset("digits", 16, 1)
    cfg = PretrainConfig(image_size=16, steps=15, batch_size=16, block_out_channels=[8, 16], attention_head_dim=8,
                         norm_num_groups=4, warmup_steps=5)
    gen, hist = pretrain(cfg, ds, show_progress=False)
    assert len(hist["loss"]) == 15 and all(np.isfinite(hist["loss"]))
    save_generator(gen, tmp_path / "m")
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "m" / "scheduler" / "scheduler_config.json").exists()
    plain = UNet2DModel.from_pretrained(tmp_path / "m" / "unet")  # anyone can load it with diffusers alone
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5, 500]), torch.tensor([1, 7])
    with torch.no_grad():
        assert torch.equal(plain(x, t, y).sample, gen.unet(x, t, y).sample)
    again = load_generator(tmp_path / "m")
    assert again.num_classes == 10 and again.image_size == 16 and again.channels == 1
    assert again.null_class == 10 and gen.unet.config.num_class_embeds == 11  # the CFG null class, saved


def test_bare_unconditional_unet_dir_is_accepted(tmp_path):
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, layers_per_block=1)
    unet.save_pretrained(tmp_path)
    gen = load_generator(tmp_path)
    assert gen.num_classes == 0
    images, labels = sample(gen, 3, steps=2, seed=0, show_progress=False)
    assert images.shape == (3, 16, 16)
    with pytest.raises(SapfError, match="unconditional"):
        sample(gen, 3, class_label=1, steps=2, show_progress=False)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(SapfError, match="not a diffusers model"):
        load_generator(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(SapfError, match="not a diffusers UNet2DModel"):
        load_generator(tmp_path)


def test_sampling_shape_range_and_seed(tiny_model_dir):
    gen = load_generator(tiny_model_dir)
    a, la = sample(gen, 5, steps=4, seed=1, show_progress=False)
    b, _ = sample(gen, 5, steps=4, seed=1, show_progress=False)
    c, _ = sample(gen, 5, steps=4, seed=2, show_progress=False)
    assert a.shape == (5, 16, 16) and a.dtype == np.uint8
    assert la.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    d, _ = sample(gen, 5, steps=4, seed=1, batch_size=2, show_progress=False)  # each image keeps its own noise
    assert np.abs(a.astype(int) - d.astype(int)).max() <= 1  # up to rounding: the batch size is not a parameter
    with pytest.raises(SapfError, match="batch-size"):
        sample(gen, 5, steps=2, batch_size=0, show_progress=False)
    _, l7 = sample(gen, 3, class_label=7, steps=2, show_progress=False)
    assert l7.tolist() == [7, 7, 7]
    with pytest.raises(SapfError, match="outside"):
        sample(gen, 3, class_label=10, steps=2, show_progress=False)
    with pytest.raises(SapfError, match="at least 1"):
        sample(gen, 0, steps=2, show_progress=False)


def test_public_sample_is_cached_per_weights_and_settings(tiny_model_dir, tmp_path, monkeypatch):
    """The public half of a federated comparison grid is drawn once per (weights, settings): a second call reads the
    cache, and other weights or another seed never read an earlier entry."""
    import torch

    from sapf.engine.sampling import public_sample

    monkeypatch.setenv("SAPF_CACHE", str(tmp_path))
    gen = load_generator(tiny_model_dir)
    a, la = public_sample(gen, 5, steps=3, seed=1)
    fresh, _ = sample(gen, 5, steps=3, seed=1, show_progress=False)
    assert np.array_equal(a, fresh) and la.tolist() == [0, 1, 2, 3, 4]
    entries = list((tmp_path / "samples").glob("*.npz"))
    assert len(entries) == 1
    np.savez(entries[0], images=np.zeros_like(a), labels=la)  # marks the entry: a hit returns what the file holds
    assert not public_sample(gen, 5, steps=3, seed=1)[0].any()
    assert np.array_equal(public_sample(gen, 5, steps=3, seed=2)[0], sample(gen, 5, steps=3, seed=2,
                                                                               show_progress=False)[0])
    with torch.no_grad():
        next(gen.unet.parameters()).add_(0.1)  # other weights: another entry, never the marked one
    assert public_sample(gen, 5, steps=3, seed=1)[0].any()
    assert len(list((tmp_path / "samples").glob("*.npz"))) == 3


def test_default_public_model_is_shipped():
    gen = load_generator(None)
    assert default_model_dir().is_dir()
    assert gen.num_classes == 10 and gen.image_size == 28
    n = sum(p.numel() for p in gen.unet.parameters())
    assert 1_000_000 <= n <= 2_000_000
