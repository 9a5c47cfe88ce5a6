"""Wild renderings: the official *test* digits and garments drawn the way people send them.

Each family turns one 28×28 test image into a picture a person or a script would upload:
a canvas drawing (dark on white, anywhere, thick strokes), a phone photo of paper (uneven
light, shadow, sensor noise, a dark table edge, JPEG), a low-resolution scan (8–16 px with a
few grey levels, then enlarged), a digit small on a page with margins, hairline and marker
strokes, and a garment small and off-centre on a white page. Everything is seeded: the same
(image, family, seed) gives the same bytes. numpy + Pillow only, like the serving code.

`make evaluate` measures every family through the served preprocessing (docs/models.md);
the tests run a committed subset (tests/fixtures + seeds) against thresholds; training
renders the *training* split with other seeds (never the test split, never these seeds).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from service import preprocessing as pp

DIGIT_FAMILIES = ("canvas", "photo", "scan", "page", "hairline", "marker")
GARMENT_FAMILIES = ("garment_page", "garment_photo")


def _ink_crop(img28: np.ndarray) -> np.ndarray:
    """The ink's bounding box of a light-on-dark 28×28 uint8 image (the whole image if blank)."""
    ys, xs = np.nonzero(img28 > 30)
    if not len(ys):
        return img28
    return img28[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _strokes(img28: np.ndarray, height: int, width_px: float, rng: np.random.Generator) -> Image.Image:
    """The digit as solid strokes of about `width_px` pixels, `height` pixels tall: 'L', ink=255."""
    crop = _ink_crop(img28).astype(np.float32)
    h, w = crop.shape
    f = height / h
    up = Image.fromarray(crop.astype(np.uint8)).resize((max(1, round(w * f)), max(1, height)), Image.Resampling.BICUBIC)
    arr = np.asarray(up, dtype=np.float32)
    # MNIST strokes are ~2.5 of 20 px; a pen of width_px at this scale: thin or thicken the mask
    natural = 2.5 * f * 20 / 28
    core = arr > 110
    out = Image.fromarray((core * 255).astype(np.uint8))
    if width_px > natural * 1.3:
        size = int(min(31, 2 * round((width_px - natural) / 2) + 1))
        if size >= 3:
            out = out.filter(ImageFilter.MaxFilter(size))
    elif width_px < natural * 0.7:  # thin the strokes step by step, never erasing a part of the digit
        full = int(np.count_nonzero(np.asarray(out)))
        for _ in range(int((natural - width_px) / 2)):
            thin = out.filter(ImageFilter.MinFilter(3))
            if np.count_nonzero(np.asarray(thin)) < 0.3 * full:
                break
            out = thin
    return out.filter(ImageFilter.GaussianBlur(max(0.6, width_px / 8)))  # anti-aliased edges


def _paste_ink(page: np.ndarray, ink: Image.Image, top: int, left: int, colour) -> None:
    """Composite ink (alpha 0..255) of `colour` onto an RGB float page in place."""
    a = np.asarray(ink, dtype=np.float32)[..., None] / 255.0
    h, w = a.shape[:2]
    region = page[top : top + h, left : left + w]
    region[:] = region * (1 - a) + np.asarray(colour, dtype=np.float32) * a


def _encode(arr: np.ndarray, fmt: str = "PNG", quality: int = 90, mode: str = "L") -> bytes:
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode=mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def canvas(img28: np.ndarray, rng: np.random.Generator, stroke: tuple[float, float] = (6, 18)) -> bytes:
    """A drawing pad: 280×280 white, a dark digit 35–75% of its height anywhere on it."""
    size = 280
    height = int(rng.uniform(0.35, 0.75) * size)
    ink = _strokes(img28, height, rng.uniform(*stroke), rng)
    w, h = ink.size
    w = min(w, size)
    top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    page = np.full((size, size, 3), 255.0, dtype=np.float32)
    colour = [(0, 0, 0), (20, 20, 20), (30, 60, 160), (40, 40, 40)][int(rng.integers(0, 4))]
    _paste_ink(page, ink.crop((0, 0, w, h)), top, left, colour)
    return _encode(page, mode="RGB")


def hairline(img28: np.ndarray, rng: np.random.Generator) -> bytes:
    """A canvas drawing with a fine pen (1.5–3 px strokes)."""
    return canvas(img28, rng, stroke=(1.5, 3.0))


def marker(img28: np.ndarray, rng: np.random.Generator) -> bytes:
    """A canvas drawing with a marker or a finger (18–28 px strokes)."""
    return canvas(img28, rng, stroke=(18, 28))


def photo(img28: np.ndarray, rng: np.random.Generator) -> bytes:
    """A phone photo of the digit on paper: 640×480, paper on a dark table, slanted light,
    a soft shadow, colour cast, sensor noise, slight blur, JPEG."""
    w_img, h_img = 640, 480
    height = int(rng.uniform(0.3, 0.6) * h_img)
    ink = _strokes(img28, height, rng.uniform(5, 14), rng)
    table = np.asarray(rng.uniform(30, 90, 3), dtype=np.float32)
    page = np.broadcast_to(table, (h_img, w_img, 3)).copy()
    # paper: most of the frame, one or two edges of the table showing
    px0, py0 = int(rng.uniform(-40, 90)), int(rng.uniform(-40, 70))
    px1, py1 = w_img - int(rng.uniform(-40, 90)), h_img - int(rng.uniform(-40, 70))
    paper_rgb = np.asarray(rng.uniform(205, 250, 3), dtype=np.float32)
    page[max(0, py0) : py1, max(0, px0) : px1] = paper_rgb
    iw, ih = ink.size
    cx = int(rng.uniform(max(0, px0) + iw / 2 + 10, min(w_img, px1) - iw / 2 - 10))
    cy = int(rng.uniform(max(0, py0) + ih / 2 + 10, min(h_img, py1) - ih / 2 - 10))
    _paste_ink(page, ink, cy - ih // 2, cx - iw // 2, (25, 25, 45))
    # light: a slanted gradient and a soft shadow
    yy, xx = np.mgrid[0:h_img, 0:w_img].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * xx / w_img + np.sin(angle) * yy / h_img) * rng.uniform(0.1, 0.35)
    light = 1.0 - (grad - grad.min())
    sx, sy, sr = rng.uniform(0, w_img), rng.uniform(0, h_img), rng.uniform(80, 250)
    shadow = 1.0 - rng.uniform(0.1, 0.3) * np.exp(-(((xx - sx) ** 2 + (yy - sy) ** 2) / (2 * sr**2)))
    page *= (light * shadow)[..., None]
    page += rng.normal(0, rng.uniform(2, 7), page.shape).astype(np.float32)
    img = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8), mode="RGB")
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.4)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(40, 86)))
    return buf.getvalue()


def scan(img28: np.ndarray, rng: np.random.Generator) -> bytes:
    """A low-resolution scan: the digit filling its frame, downsampled to 8–16 px with 2–5 grey
    levels, then enlarged ×2–6 (nearest or bilinear), dark on light or light on dark."""
    crop = _ink_crop(img28)
    margin = int(rng.integers(0, 3))
    crop = np.pad(crop, margin)
    side = int(rng.integers(8, 17))
    h, w = crop.shape
    f = side / max(h, w)
    small = np.asarray(
        Image.fromarray(crop).resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BOX),
        dtype=np.float32,
    )
    levels = int(rng.integers(2, 6))
    small = np.round(small / 255 * (levels - 1)) / (levels - 1) * 255
    if rng.random() < 0.7:
        small = 255 - small
    scale = int(rng.integers(2, 7))
    resample = Image.Resampling.NEAREST if rng.random() < 0.5 else Image.Resampling.BILINEAR
    big = Image.fromarray(small.astype(np.uint8)).resize((small.shape[1] * scale, small.shape[0] * scale), resample)
    return _encode(np.asarray(big, dtype=np.float32))


def page(img28: np.ndarray, rng: np.random.Generator) -> bytes:
    """A small digit (6–15% of the height) somewhere on a white 600×800 page with margins."""
    w_img, h_img = 600, 800
    height = int(rng.uniform(0.06, 0.15) * h_img)
    ink = _strokes(img28, height, rng.uniform(3, 9), rng)
    iw, ih = ink.size
    arr = np.full((h_img, w_img, 3), 250.0, dtype=np.float32)
    top = int(rng.integers(60, h_img - ih - 60))
    left = int(rng.integers(60, w_img - iw - 60))
    _paste_ink(arr, ink, top, left, (10, 10, 10))
    return _encode(arr, mode="RGB")


def garment_page(img28: np.ndarray, rng: np.random.Generator) -> bytes:
    """A Fashion-MNIST garment as a product shot, small (60–200 px) and off-centre on a white page."""
    side = int(rng.uniform(60, 200))
    product = 255 - np.asarray(Image.fromarray(img28).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    w_img, h_img = 480, 640
    arr = np.full((h_img, w_img), 255.0, dtype=np.float32)
    top, left = int(rng.integers(0, h_img - side)), int(rng.integers(0, w_img - side))
    arr[top : top + side, left : left + side] = product
    return _encode(arr)


def garment_photo(img28: np.ndarray, rng: np.random.Generator) -> bytes:
    """A garment on a light, slightly uneven background: noise and JPEG."""
    side = int(rng.uniform(100, 260))
    product = 255 - np.asarray(Image.fromarray(img28).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    w_img, h_img = 400, 400
    bg = rng.uniform(215, 250)
    arr = np.full((h_img, w_img), bg, dtype=np.float32)
    top, left = int(rng.integers(0, h_img - side)), int(rng.integers(0, w_img - side))
    arr[top : top + side, left : left + side] = np.minimum(product, bg)
    yy = np.linspace(0, 1, h_img, dtype=np.float32)[:, None]
    arr = arr * (1 - rng.uniform(0, 0.12) * yy) + rng.normal(0, rng.uniform(1, 4), arr.shape)
    return _encode(arr, "JPEG", int(rng.integers(60, 92)))


RENDER: dict[str, Callable[[np.ndarray, np.random.Generator], bytes]] = {
    "canvas": canvas,
    "photo": photo,
    "scan": scan,
    "page": page,
    "hairline": hairline,
    "marker": marker,
    "garment_page": garment_page,
    "garment_photo": garment_photo,
}


def render(family: str, images: np.ndarray, seed: int) -> list[bytes]:
    """Each 28×28 uint8 image rendered by `family`; image i uses the stream (seed, i)."""
    fn = RENDER[family]
    return [fn(img, np.random.default_rng([seed, i])) for i, img in enumerate(images)]


# --------------------------------------------------------------------------- non-digits

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SYMBOLS = "#@%&?!+=*$§¶€£{}[]<>~^/\\|"


def glyph(char: str, font_path: str, rng: np.random.Generator) -> bytes:
    """One printed character, dark on a 280×280 white canvas like a drawing pad's digit."""
    size = int(rng.uniform(90, 200))
    font = ImageFont.truetype(font_path, size)
    img = Image.new("L", (280, 280), 255)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((0, 0), char, font=font)
    w, h = box[2] - box[0], box[3] - box[1]
    x = int(rng.uniform(0, max(1, 280 - w))) - box[0]
    y = int(rng.uniform(0, max(1, 280 - h))) - box[1]
    draw.text((x, y), char, fill=0, font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


FONT_DIR = "/usr/share/fonts/truetype"


def font_files() -> list[str]:
    """TrueType fonts from Debian's packages (fonts-dejavu-core, fonts-liberation, fonts-freefont-ttf)."""
    found = sorted(str(p) for p in Path(FONT_DIR).rglob("*.ttf"))
    return found


def glyph_ink(char: str, font_path: str) -> np.ndarray:
    """One character light on dark as a 28×28 uint8 image shaped like an MNIST digit (longer
    side 20 px, centred), so the digit renderings (RENDER) can draw it."""
    font = ImageFont.truetype(font_path, 120)
    img = Image.new("L", (200, 200), 0)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((0, 0), char, font=font)
    draw.text((100 - (box[0] + box[2]) // 2, 100 - (box[1] + box[3]) // 2), char, fill=255, font=font)
    arr = np.asarray(img)
    ys, xs = np.nonzero(arr > 30)
    out = np.zeros((28, 28), np.uint8)
    if not len(ys):
        return out
    arr = arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = arr.shape
    f = 20 / max(h, w)
    small = np.asarray(
        Image.fromarray(arr).resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS)
    )
    top, left = (28 - small.shape[0]) // 2, (28 - small.shape[1]) // 2
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return out


def glyph_upload(char: str, font_path: str, mode: str, rng: np.random.Generator) -> bytes:
    """A printed character as an upload: "glyph" (printed on a canvas) or a digit rendering
    (canvas, photo, ...) of its shape; a glyph too wide for a rendering is printed instead."""
    if mode != "glyph":
        try:
            return RENDER[mode](glyph_ink(char, font_path), rng)
        except ValueError:  # wider than the rendering's page allows
            pass
    return glyph(char, font_path, rng)


# --------------------------------------------------------------------------- training sets


def _frame_one(args) -> np.ndarray:
    family, img, seed, framing = args
    data = RENDER[family](img, np.random.default_rng(seed))
    return pp.to_uint8(pp.to_grey_square(Image.open(io.BytesIO(data)), "auto", framing))


def framed_set(
    images: np.ndarray, labels: np.ndarray, families: tuple[str, ...], n: int, seed: int, framing: str, cache=None
) -> tuple[np.ndarray, np.ndarray]:
    """n wild renderings of `images` (cycled over `families`), framed exactly as the server frames
    them -> (uint8 (n, 28, 28), labels (n,)). Seeds are (seed, i) with seed far from the test
    suites'. Cached as npz at `cache` (a path) when given; rendered on every core."""
    if cache is not None and Path(cache).is_file():
        z = np.load(cache)
        return z["images"], z["labels"]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(images), size=n, replace=n > len(images))
    jobs = [(families[i % len(families)], images[j], (seed, i), framing) for i, j in enumerate(pick)]
    with mp.get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
        out = np.stack(pool.map(_frame_one, jobs, chunksize=64))
    ys = labels[pick]
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, images=out, labels=ys)
    return out, ys


# --------------------------------------------------------------------------- text as people write it

_DETOK = [(" n't", "n't"), (" 's", "'s"), (" 're", "'re"), (" 've", "'ve"), (" 'll", "'ll"), (" 'd", "'d"),
          (" 'm", "'m"), (" ,", ","), (" .", "."), (" !", "!"), (" ?", "?"), (" ;", ";"), (" :", ":"),
          ("( ", "("), (" )", ")"), ("`` ", '"'), (" ''", '"'), (" ...", "...")]  # fmt: skip
NEUTRAL_EMOJI = ["🎬", "🍿", "🎥", "📽️", "🎞️"]  # no sentiment of their own: the label stays the sentence's


def as_people_write(sentence: str, rng: np.random.Generator) -> str:
    """An SST-2 sentence (lower-cased, PTB-tokenized) as a person would type it: joined
    contractions and punctuation, capitals, a shouted word, "!!!", an elongated word, curly
    quotes, an HTML entity, a URL, a neutral emoji. The sentiment is left as it was."""
    text = sentence.strip()
    for a, b in _DETOK:
        text = text.replace(a, b)
    words = text.split(" ")
    if words and words[0]:
        words[0] = words[0][:1].upper() + words[0][1:]
    long_words = [i for i, w in enumerate(words) if len(w) > 3 and w.isalpha()]
    if long_words and rng.random() < 0.3:
        i = long_words[int(rng.integers(len(long_words)))]
        words[i] = words[i].upper()
    if long_words and rng.random() < 0.3:
        i = long_words[int(rng.integers(len(long_words)))]
        w = words[i]
        v = max((w.lower().rfind(c) for c in "aeiou"), default=-1)
        if v >= 0:
            words[i] = w[: v + 1] + w[v] * int(rng.integers(2, 5)) + w[v + 1 :]
    text = " ".join(words)
    if rng.random() < 0.35:
        text = text.rstrip(".") + "!" * int(rng.integers(2, 5))
    if rng.random() < 0.3:
        text = text.replace("'", "\u2019")
    if rng.random() < 0.2:
        text = text.replace(" and ", " &amp; ", 1)
    if rng.random() < 0.15:
        text += " https://example.org/review/" + str(int(rng.integers(1000, 9999)))
    if rng.random() < 0.25:
        text += " " + NEUTRAL_EMOJI[int(rng.integers(len(NEUTRAL_EMOJI)))]
    return text


def people_texts(sentences: list[str], seed: int = 2026) -> list[str]:
    return [as_people_write(s, np.random.default_rng([seed, i])) for i, s in enumerate(sentences)]


def wild_reviews() -> tuple[list[str], np.ndarray]:
    """training/wild_reviews.tsv: short reviews written the way people post them (not SST-2)."""
    lines = (Path(__file__).parent / "wild_reviews.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts, labels = zip(*(line.rsplit("\t", 1) for line in lines if line.strip()))
    return list(texts), np.array([int(y) for y in labels], dtype=np.int64)
