"""Unlabelled images for label-free pruning benchmarks, made offline (no download).

* ``photo``: random crops (scale, aspect), flips and colour jitter of scikit-learn's two
  bundled photos (``load_sample_images``: china.jpg, flower.jpg);
* ``text``: scenes of printed text (random words, digits, dates) in the system's DejaVu
  fonts (PIL's default font where none is installed), several lines of random sizes and
  colours on random backgrounds (flat, gradient or a faded photo crop): text detectors;
* ``line``: one line of text filling the image height: text recognizers;
* ``page``: a text scene rotated by 0, 90, 180 or 270 degrees: orientation classifiers.

Each kind is written as PNG files in one folder, no class sub-folders (gpp-onnx reads it
as unlabelled), at the size asked for, so gpp-onnx need not resize them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ("the of and to in is for on with as by at from invoice total date name address "
         "price qty amount paid due order number street city phone email page section "
         "report table figure chapter summary account balance receipt store item tax "
         "OPEN CLOSED EXIT SALE NEW FREE TOTAL STOP PARKING INFO HOTEL CAFE").split()
FONT_DIR = Path("/usr/share/fonts")
KINDS = ("photo", "text", "line", "page")


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(im) for im in load_sample_images().images]


def _fonts() -> list[Path]:
    return sorted(FONT_DIR.rglob("*.ttf")) if FONT_DIR.exists() else []


def _font(rng, fonts: list[Path], size: int):
    from PIL import ImageFont

    if fonts:
        return ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), size)
    return ImageFont.load_default(size=size)


def _crop(rng, photo: np.ndarray, h: int, w: int):
    """A random crop of `photo` (area 10-100%, aspect near h:w), resized to h x w, maybe
    flipped, with brightness / contrast / saturation jitter."""
    from PIL import Image

    ph, pw = photo.shape[:2]
    area = rng.uniform(0.1, 1.0) * ph * pw
    aspect = (w / h) * np.exp(rng.uniform(-0.3, 0.3))
    ch = int(min(ph, np.sqrt(area / aspect)))
    cw = int(min(pw, ch * aspect))
    top, left = rng.integers(0, ph - ch + 1), rng.integers(0, pw - cw + 1)
    im = Image.fromarray(photo[top:top + ch, left:left + cw]).resize((w, h), Image.BILINEAR)
    x = np.asarray(im, np.float32)
    if rng.random() < 0.5:
        x = x[:, ::-1]
    gray = x.mean(axis=2, keepdims=True)
    x = gray + (x - gray) * rng.uniform(0.6, 1.4)                   # saturation
    x = x.mean() + (x - x.mean()) * rng.uniform(0.7, 1.3)            # contrast
    x = x * rng.uniform(0.7, 1.3)                                    # brightness
    return np.clip(x, 0, 255).astype(np.uint8)


def _background(rng, photos, h: int, w: int) -> np.ndarray:
    mode = rng.integers(3)
    if mode == 0:  # flat paper-like colour
        return np.broadcast_to(rng.integers(170, 256, 3).astype(np.uint8), (h, w, 3)).copy()
    if mode == 1:  # gradient between two colours
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        t = t[None, :, None] if t.size == w else t[:, None, None]
        return np.broadcast_to(a + (b - a) * t, (h, w, 3)).astype(np.uint8).copy()
    photo = _crop(rng, photos[rng.integers(len(photos))], h, w).astype(np.float32)
    return (photo * 0.4 + 255 * 0.6 * rng.uniform(0.5, 1.0)).clip(0, 255).astype(np.uint8)


def _phrase(rng) -> str:
    parts = []
    for _ in range(rng.integers(1, 5)):
        r = rng.random()
        if r < 0.6:
            word = WORDS[rng.integers(len(WORDS))]
            parts.append(word.capitalize() if rng.random() < 0.3 else word)
        elif r < 0.85:
            parts.append(str(rng.integers(0, 10 ** rng.integers(1, 7))))
        else:
            parts.append(f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/"
                         f"{rng.integers(1990, 2030)}")
    return " ".join(parts)


def _ink(rng, bg: np.ndarray) -> tuple[int, int, int]:
    """A text colour that contrasts with the background's mean."""
    light = bg.mean() > 127
    lo, hi = (0, 90) if light else (180, 256)
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _text_scene(rng, photos, fonts, h: int, w: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    bg = _background(rng, photos, h, w)
    im = Image.fromarray(bg)
    draw = ImageDraw.Draw(im)
    y = int(rng.integers(0, max(1, h // 10)))
    while y < h:
        size = int(rng.integers(max(8, h // 30), max(12, h // 8)))
        if rng.random() < 0.75:
            x0 = int(rng.integers(0, max(1, w // 3)))
            draw.text((x0, y), _phrase(rng), fill=_ink(rng, bg), font=_font(rng, fonts, size))
        y += int(size * rng.uniform(1.2, 2.5))
    return np.asarray(im)


def _text_line(rng, photos, fonts, h: int, w: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    bg = _background(rng, photos, h, w)
    im = Image.fromarray(bg)
    draw = ImageDraw.Draw(im)
    size = int(h * rng.uniform(0.5, 0.8))
    font = _font(rng, fonts, size)
    text = _phrase(rng)
    while draw.textlength(text, font=font) > w * 0.95 and len(text) > 1:
        text = text[:-1]
    x0 = int(rng.integers(0, max(1, int(w - draw.textlength(text, font=font)) // 2 + 1)))
    y0 = int((h - size) * rng.uniform(0.0, 0.6))
    draw.text((x0, y0), text, fill=_ink(rng, bg), font=font)
    return np.asarray(im)


def _page(rng, photos, fonts, h: int, w: int) -> np.ndarray:
    k = int(rng.integers(4))
    side = (w, h) if k % 2 else (h, w)
    return np.ascontiguousarray(np.rot90(_text_scene(rng, photos, fonts, *side), k))


def make_images(kind: str, n: int, height: int, width: int, folder: Path, seed: int = 0,
                gray: bool = False) -> Path:
    """Write `n` images of `kind` (module docstring), height x width, as PNG files in
    `folder` (reused when it already holds n images)."""
    from PIL import Image

    if kind not in KINDS:
        raise ValueError(f"unknown image kind {kind}; one of {', '.join(KINDS)}")
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) == n:
        return folder
    rng = np.random.default_rng(seed)
    photos, fonts = _photos(), _fonts()
    make = {"photo": lambda: _crop(rng, photos[rng.integers(len(photos))], height, width),
            "text": lambda: _text_scene(rng, photos, fonts, height, width),
            "line": lambda: _text_line(rng, photos, fonts, height, width),
            "page": lambda: _page(rng, photos, fonts, height, width)}[kind]
    for i in range(n):
        im = Image.fromarray(make())
        (im.convert("L") if gray else im).save(folder / f"{i:05d}.png")
    return folder
