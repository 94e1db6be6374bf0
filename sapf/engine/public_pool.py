"""``public-pool``: public images of many kinds, each with a semantic class, built from files that ship inside
installed wheels — no download, and no private example looked at.

What it holds (class names are the semantic labels PrivImage's query histograms):

- ``digit 0`` … ``digit 9``: sklearn's UCI digits as pen strokes in MNIST's layout (:func:`sapf.engine.data`'s
  ``digits``), plus the digit glyph rendered from each font below;
- ``letter A`` … ``letter Z``, ``letter a`` … ``letter z``: glyphs rendered from the fonts matplotlib ships
  (DejaVu Sans / Serif / Sans Mono and their bold and oblique faces, STIX, Computer Modern), each with a random size,
  stroke width, rotation, shear and an elastic distortion, white on black in MNIST's layout;
- ``texture <name>``: random crops of scikit-image's sample images (brick, grass, gravel, coins, moon, …) and
  ``face``: its small face set (LFW crops), grey, at random scales.

Licences: DejaVu (Bitstream Vera licence, free), STIX (SIL Open Font Licence), Computer Modern (matplotlib's
BaKoMa TrueType conversion, free), as shipped in matplotlib's ``mpl-data/fonts``; scikit-image's sample images are
public domain or CC-licensed as listed in ``skimage/data/README.txt``; UCI digits (CC BY 4.0) via scikit-learn.

Everything is drawn from a seeded generator (public randomness): the same seed gives the same pool.
"""

from __future__ import annotations

import functools
import os
import string

import numpy as np

from sapf.errors import SapfError

NAME = "public-pool"
PER_CLASS = 150  # rendered or cropped images per class (the UCI digits add their own ~180)
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
         "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
         "STIXGeneral.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBol.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf")
TEXTURES = ("brick", "grass", "gravel", "coins", "moon", "camera", "text", "page", "cell", "hubble_deep_field",
            "retina", "chelsea", "coffee", "astronaut", "horse", "clock_motion")
CANVAS = 64  # glyphs are drawn on this canvas, then laid out as MNIST digits are
POOL_VERSION = 1  # of build_pool's recipe: part of the on-disk cache key, so a changed recipe never reads an old pool


def class_names() -> list[str]:
    return ([f"digit {d}" for d in range(10)] + [f"letter {c}" for c in string.ascii_uppercase]
            + [f"letter {c}" for c in string.ascii_lowercase] + [f"texture {t}" for t in TEXTURES] + ["face"])


def _font_dir() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


def _image_dir() -> str:
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data")


def _glyph(char: str, font_file: str, rng: np.random.Generator) -> np.ndarray:
    """One glyph, white on black on a CANVAS² in [0, 1]: random size, stroke, rotation, shear, elastic warp."""
    from PIL import Image, ImageDraw, ImageFont
    from scipy.ndimage import affine_transform, gaussian_filter, map_coordinates

    font = ImageFont.truetype(os.path.join(_font_dir(), font_file), size=int(rng.integers(34, 46)))
    img = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(img).text((CANVAS / 2, CANVAS / 2), char, fill=255, font=font, anchor="mm",
                             stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
    x = np.asarray(img, np.float32) / 255.0
    angle, shear = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(-0.3, 0.3)
    m = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.array([[1, shear], [0, 1]])
    centre = np.array([CANVAS / 2, CANVAS / 2])
    x = affine_transform(x, m, offset=centre - m @ centre, order=1)
    dy, dx = (gaussian_filter(rng.uniform(-1, 1, x.shape), 5) * 40 for _ in range(2))  # elastic, Simard et al.
    rows, cols = np.mgrid[0:CANVAS, 0:CANVAS]
    return map_coordinates(x, [rows + dy, cols + dx], order=1).clip(0, 1)


def _crops(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random square crops of a scikit-image sample image, grey in [0, 1], CANVAS²."""
    from PIL import Image
    from skimage.transform import resize

    # The file inside the wheel, read directly: some skimage.data loaders fetch from the network.
    path = next((os.path.join(_image_dir(), name + ext) for ext in (".png", ".jpg")
                 if os.path.exists(os.path.join(_image_dir(), name + ext))), None)
    if path is None:
        raise SapfError(f"scikit-image's sample image '{name}' is missing from this installation")
    img = np.asarray(Image.open(path).convert("L"), np.float64)
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
    h, w = img.shape
    out = np.empty((n, CANVAS, CANVAS), np.float32)
    for i in range(n):
        size = int(rng.integers(min(h, w) // 8, min(h, w) // 2 + 1))
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        out[i] = resize(img[top : top + size, left : left + size], (CANVAS, CANVAS), anti_aliasing=True)
    return out


def _faces(n: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.transform import resize

    faces = np.load(os.path.join(_image_dir(), "lfw_subset.npy"))  # (200, 25, 25) grey in [0, 1]
    idx = rng.choice(len(faces), n, replace=n > len(faces))
    return np.stack([resize(faces[i], (CANVAS, CANVAS), anti_aliasing=False) for i in idx]).astype(np.float32)


def pool_images(image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The pool in model space at this size: exactly ``_prepare(build_pool())``, read from ``$SAPF_CACHE/pools/``
    when it was built before with the same recipe and the same installed fonts, images and digits (public data
    only). Building it renders ~9,000 glyphs: half a minute, in every process that needs the pool."""
    from importlib.metadata import version

    from sapf.engine.data import _prepare
    from sapf.engine.evaluate import cache_dir
    from sapf.outputs import atomic_path

    sources = "-".join(f"{p}{version(p)}" for p in ("matplotlib", "scikit-image", "scikit-learn", "torch"))
    path = cache_dir() / "pools" / f"{NAME}-v{POOL_VERSION}-{PER_CLASS}-{sources}-{image_size}px-{channels}ch.npz"
    if path.exists():
        with np.load(path) as f:
            return f["images"], f["labels"]
    x, y = build_pool()
    x = _prepare(x, image_size, channels)
    with atomic_path(path) as tmp:
        np.savez(tmp, images=x, labels=y)
    return x, y.copy()


@functools.lru_cache(maxsize=2)
def build_pool(seed: int = 0, per_class: int = PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 1, CANVAS, CANVAS) in [0, 1], labels (N,)) — glyphs already in MNIST's layout at CANVAS."""
    from sapf.engine.data import _uci_digits_as_pen_strokes, mnist_layout

    rng = np.random.default_rng([seed, 7])
    names = class_names()
    chars = list("0123456789" + string.ascii_uppercase + string.ascii_lowercase)
    images, labels = [], []
    for label, char in enumerate(chars):
        glyphs = np.stack([_glyph(char, FONTS[i % len(FONTS)], rng) for i in range(per_class)])[:, None]
        images.append(mnist_layout(glyphs, CANVAS))
        labels.append(np.full(per_class, label))
    strokes, digit_labels = _uci_digits_as_pen_strokes()
    images.append(mnist_layout(strokes, CANVAS))
    labels.append(digit_labels)
    first_texture = names.index(f"texture {TEXTURES[0]}")
    for i, name in enumerate(TEXTURES):
        images.append(_crops(name, per_class, rng)[:, None])
        labels.append(np.full(per_class, first_texture + i))
    images.append(_faces(per_class, rng)[:, None])
    labels.append(np.full(per_class, names.index("face")))
    x, y = np.concatenate(images).astype(np.float32), np.concatenate(labels).astype(np.int64)
    if int(y.max()) + 1 != len(names):
        raise SapfError("the public pool's classes and their names disagree")
    return x, y
