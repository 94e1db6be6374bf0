import numpy as np
import pytest
from PIL import Image

from sapf.engine.data import load_dataset, partition, train_holdout_split
from sapf.errors import SapfError


def test_mnist5k_is_the_real_5000_digits():
    ds = load_dataset("mnist5k", 28, 1)
    assert ds.images.shape == (5000, 1, 28, 28) and ds.images.dtype == np.float32
    assert np.bincount(ds.labels).tolist() == [500] * 10
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    # Real digits: mostly background with a stroke in the middle.
    assert (ds.images[:, :, :3, :] == -1).mean() > 0.99 and (ds.images[:, :, 10:18, 10:18] > 0).mean() > 0.2


def test_digits_are_upscaled_to_model_size():
    ds = load_dataset("digits", 16, 1)
    assert ds.images.shape == (1797, 1, 16, 16) and ds.num_classes == 10
    assert -1.0 <= ds.images.min() < -0.9 and 0.9 < ds.images.max() <= 1.0


def test_digits_take_mnists_layout():
    """20/28 of the frame, centre of mass at the centre — MNIST's documented format, as mnist5k shows."""
    for name in ("digits", "mnist5k"):
        x = (load_dataset(name, 28, 1).images[:, 0] + 1) / 2
        ink = x.sum(0) / x.sum()
        assert ink[:2].sum() + ink[-2:].sum() + ink[:, :2].sum() + ink[:, -2:].sum() < 0.01, name  # empty border
        rows = np.arange(28)
        com = np.array([(x.sum(2) * rows).sum(1), (x.sum(1) * rows).sum(1)]) / x.sum((1, 2))
        assert np.abs(com - 14).mean() < 1.0, name  # centred to within a pixel on average


def test_digits_are_drawn_as_pen_strokes():
    """Sharp strokes, as MNIST's: few grey pixels for each inked one. Upscaled UCI blobs have 1.65
    grey pixels per inked pixel; the pen-stroke re-drawing 0.89; MNIST 0.66."""
    for name in ("digits", "mnist5k"):
        x = (load_dataset(name, 28, 1).images + 1) / 2
        grey, ink = ((x > 0.1) & (x < 0.9)).mean(), (x > 0.5).mean()
        assert grey / ink < 1.2, (name, grey / ink)
        assert 0.08 < ink < 0.2, (name, ink)  # MNIST's share of inked pixels, within a factor of ~1.5


def _write_folder(root, n_per_class=3, classes=("cat", "dog"), size=20, mode="L"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_any_size_to_model_size(tmp_path):
    _write_folder(tmp_path, mode="RGB")
    ds = load_dataset(str(tmp_path), 16, 1)
    assert ds.images.shape == (6, 1, 16, 16) and ds.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert load_dataset(str(tmp_path), 16, 3).images.shape == (6, 3, 16, 16)


def test_corrupt_image_is_named(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(SapfError, match="broken.png"):
        load_dataset(str(tmp_path), 16, 1)


def test_empty_folders_are_refused(tmp_path):
    with pytest.raises(SapfError, match="no class sub-folders"):
        load_dataset(str(tmp_path), 16, 1)
    (tmp_path / "a").mkdir()
    with pytest.raises(SapfError, match="no images"):
        load_dataset(str(tmp_path), 16, 1)
    with pytest.raises(SapfError, match="neither a built-in"):
        load_dataset(str(tmp_path / "missing"), 16, 1)


def test_npz(tmp_path, mnist_small_npz):
    ds = load_dataset(str(mnist_small_npz), 16, 1)
    assert ds.images.shape == (120, 1, 16, 16) and ds.num_classes == 10
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(SapfError, match="'images'"):
        load_dataset(str(bad), 16, 1)


@pytest.mark.parametrize("case,images,labels,expected", [
    ("string labels", np.zeros((4, 8, 8), np.uint8), np.array(["a", "b", "c", "d"]), "labels must be integers"),
    ("float labels", np.zeros((4, 8, 8), np.uint8), np.array([0.0, 1.5, 2.0, 3.0]), "labels must be integers"),
    ("huge labels", np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 2, 10**12]), "labels must lie in"),
    ("negative labels", np.zeros((4, 8, 8), np.uint8), np.array([0, -1, 2, 3]), "labels must lie in"),
    ("NaN images", np.full((4, 8, 8), np.nan, np.float32), np.arange(4), "NaN"),
    ("float images past 1", np.full((4, 8, 8), 7.0, np.float32), np.arange(4), r"\[0, 1\]"),
    ("int images past 255", np.full((4, 8, 8), 300, np.int32), np.arange(4), "0..255"),
    ("text images", np.full((4, 8, 8), "x"), np.arange(4), "must be numbers"),
])
def test_bad_npz_is_refused_in_one_line(tmp_path, case, images, labels, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, images=images, labels=labels)
    with pytest.raises(SapfError, match=expected):
        load_dataset(str(path), 16, 1)


def test_corrupt_npz_is_refused(tmp_path, mnist_small_npz):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(mnist_small_npz.read_bytes()[:5000])
    with pytest.raises(SapfError, match="cannot read"):
        load_dataset(str(path), 16, 1)


def test_pixel_scale_is_decided_by_dtype_not_by_values(tmp_path):
    # A dark uint8 image and the same pixels as floats in [0, 1] load alike; one record's values never
    # change how another is scaled.
    dark = np.zeros((2, 8, 8), np.uint8)
    dark[0, 2:6, 2:6] = 1  # every pixel <= 1: a value-based rule would read these as already in [0, 1]
    np.savez(tmp_path / "u8.npz", images=dark, labels=np.arange(2))
    np.savez(tmp_path / "f.npz", images=dark.astype(np.float32) / 255, labels=np.arange(2))
    a, b = load_dataset(str(tmp_path / "u8.npz"), 8, 1), load_dataset(str(tmp_path / "f.npz"), 8, 1)
    np.testing.assert_allclose(a.images, b.images, atol=1e-6)
    assert a.images.max() < -0.99  # 1/255 of full ink


def test_split_is_seeded_disjoint_and_moves_no_other_record_when_one_is_added():
    ds = load_dataset("mnist5k", 28, 1)
    a_train, a_hold = train_holdout_split(ds, 0.2, seed=0)
    b_train, b_hold = train_holdout_split(ds, 0.2, seed=0)
    c_train, c_hold = train_holdout_split(ds, 0.2, seed=1)
    assert len(a_train) + len(a_hold) == 5000 and 900 <= len(a_hold) <= 1100
    assert np.array_equal(a_hold.images, b_hold.images) and not np.array_equal(a_hold.images, c_hold.images)
    assert np.bincount(a_hold.labels).min() >= 60  # every class held out, in about its share
    flat = lambda d: {x.tobytes() for x in d.images}  # noqa: E731
    assert not flat(a_train) & flat(a_hold)
    # Neighbouring data sets stay neighbours after the split: drop one record, no other changes side.
    smaller = ds.subset(np.arange(1, len(ds)))
    s_train, s_hold = train_holdout_split(smaller, 0.2, seed=0)
    assert flat(s_train) == flat(a_train) - {ds.images[0].tobytes()}
    assert flat(s_hold) == flat(a_hold) - {ds.images[0].tobytes()}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_deterministic_complete_and_stable(scheme):
    ds = load_dataset("digits", 8, 1)
    parts = partition(ds, 4, scheme, alpha=0.5, seed=3)
    again = partition(ds, 4, scheme, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(ds)))  # every example exactly once
    assert all(len(p) > 0 for p in parts)
    if scheme == "iid":
        assert all(abs(len(p) - len(ds) / 4) < 0.1 * len(ds) for p in parts)
        assert all(len(np.unique(ds.labels[p])) == 10 for p in parts)  # label coverage
    else:
        other = partition(ds, 4, scheme, alpha=0.5, seed=4)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
        # Label skew: some site's class histogram is far from uniform.
        skews = [np.bincount(ds.labels[p], minlength=10).max() / len(p) for p in parts]
        assert max(skews) > 0.2
    # Removing one record moves no other record to another site.
    site_of = {i: s for s, p in enumerate(parts) for i in p}
    fewer = partition(ds.subset(np.arange(1, len(ds))), 4, scheme, alpha=0.5, seed=3)
    assert all(site_of[i + 1] == s for s, p in enumerate(fewer) for i in p)


def test_random_slant_leans_digits_right_and_keeps_the_background():
    """Pretraining's augmentation: a shear s moves the rows above the centre right by s per row."""
    import torch

    from sapf.engine.pretrain import random_slant

    x = torch.from_numpy(load_dataset("digits", 28, 1).images[:64])
    gen = torch.Generator().manual_seed(0)

    def lean(imgs):  # ink column of the top rows minus that of the bottom rows, per image
        ink = imgs[:, 0] + 1
        col = torch.arange(28.0)
        top, bottom = ink[:, 4:12].sum(1), ink[:, 16:24].sum(1)
        return (top * col).sum(1) / top.sum(1) - (bottom * col).sum(1) / bottom.sum(1)

    upright = lean(x)
    assert torch.allclose(random_slant(x, (0.0, 0.0), gen), x, atol=1e-5)
    right = lean(random_slant(x, (0.5, 0.5), gen)) - upright
    left = lean(random_slant(x, (-0.3, -0.3), gen)) - upright
    assert right.min() > 4.0 and right.max() < 8.0, right  # rows 12 apart: 0.5 × 12 ≈ 6 px
    assert left.max() < -2.0, left
    mixed = random_slant(x, (-0.1, 0.5), gen)
    assert mixed.min() >= -1.0 and mixed.max() <= 1.0 and (mixed[:, :, :2] == -1).float().mean() > 0.99
    assert (lean(mixed) - upright).std() > 0.5  # each image draws its own slant


def test_stroke_changes_keep_a_blank_background_and_a_generator_never_sees_thinner_strokes():
    """A blank image stays blank under every stroke change (a blur that averaged the zero padding drew a grey frame
    round a quarter of the pool classifier's batches), and pretraining's `handwriting` recipe only keeps or thickens
    the pen's strokes (the pool classifier's, which may thin them, wipes out thin lines)."""
    import torch

    from sapf.config import PretrainConfig
    from sapf.engine.mepf import vary_stroke_and_shift
    from sapf.engine.pretrain import augment_public_batch, vary_as_handwriting

    blank = -torch.ones(4, 1, 28, 28)
    assert all(torch.equal(vary_stroke_and_shift(blank, torch.Generator().manual_seed(s), soft_stroke=True), blank)
               for s in range(24))
    # Lines a pixel wide, 4 apart: a grey erosion wipes them out (a 3x3 window always reaches background).
    lines = -torch.ones(8, 1, 28, 28)
    lines[:, :, 2::4, :] = 1

    def ink_kept(vary) -> float:
        return min(float((vary(lines, torch.Generator().manual_seed(s)) + 1).sum()) for s in range(24)) / float(
            (lines + 1).sum())

    recipe = PretrainConfig(augmentation="handwriting")
    assert ink_kept(lambda v, g: augment_public_batch(v, recipe, g)) > 0.5
    assert ink_kept(lambda v, g: vary_as_handwriting(v, recipe.slant, g)) < 0.1  # can fail: erosion wipes them
    x = torch.from_numpy(load_dataset("digits", 28, 1).images[:32])
    varied = [augment_public_batch(x, recipe, torch.Generator().manual_seed(s)) for s in range(6)]
    assert all(v.shape == x.shape and v.min() >= -1 and v.max() <= 1 for v in varied)
    assert not torch.allclose(varied[0], varied[1])
    assert torch.equal(augment_public_batch(x, PretrainConfig(slant=None), torch.Generator()), x)
