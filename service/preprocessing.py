"""Preprocessing shared by training and serving: numpy and Pillow only, never torch.

Everything a model's input or output depends on is defined here once: pixel scaling and
normalisation, the resize rule for uploads, the SST-2 tokenizer, the codec's latent
quantization and the generator's seeded latents. `training/` and `service/` both import
this module, so the two can never drift apart. The constants that vary per model (mean/std,
quantization bits, vocabulary) live in each model's metadata in `exported/`.
"""

from __future__ import annotations

import html
import io
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_SIZE = 28  # every image model works on 28×28 grey images

# --------------------------------------------------------------------------- images


def scale_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 pixels in [0, 255] -> float32 in [0, 1]; keeps the shape."""
    return images.astype(np.float32) / 255.0


def normalize(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Per-dataset standardisation applied to [0, 1] pixels before a classifier."""
    return ((images - np.float32(mean)) / np.float32(std)).astype(np.float32)


FRAMINGS = ("none", "digit", "garment")  # how an upload becomes the model's 28×28 input (README)
WORK_SIDE = 256  # framing looks at the upload shrunk to at most this many pixels a side
DIGIT_BOX = 20  # MNIST: the ink's longer side is scaled to 20 px, its centre of mass put at the centre


def to_grey_square(img: Image.Image, invert: str = "none", framing: str = "none"):
    """A decoded image -> float32 (28, 28) in [0, 1], light subject on dark, as the model was trained.

    framing "none" (the rule of models exported before framing): EXIF orientation, alpha over
    white, 8-bit grey, optional inversion (`invert` "none" | "always" | "auto": auto inverts
    when the border is brighter than 127.5), the whole picture's longer side scaled to 28 and
    centred on the border's median colour.
    framing "digit" (the MNIST recipe, `frame_digit`) and "garment" (the Fashion-MNIST recipe,
    `frame_garment`) find the subject first and frame it the way the training set was made.
    A 28×28 upload is the models' own format (the MNIST and Fashion-MNIST files, the
    denoiser's noisy digits): it is taken as framed and passes through the "none" rule
    unchanged. A picture with no subject (a blank page, noise) is never framed into one: it
    takes the "none" rule and stays what it is, which the OOD score flags.
    Memory stays proportional to the image's own pixels: every working copy is at most the
    decoded image (shrunk to WORK_SIDE before framing), padding happens on the 28×28 canvas.
    """
    img = ImageOps.exif_transpose(img) or img
    grey = _grey(img)  # (H, W) uint8
    if framing != "none" and grey.shape != (IMAGE_SIZE, IMAGE_SIZE):
        framed = frame_digit(grey) if framing == "digit" else frame_garment(grey)
        if framed is not None:
            return framed
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if invert == "always" or (invert == "auto" and float(border.mean()) > 127.5):
        grey, border = 255 - grey, 255 - border
    return scale_pixels(fit_square(grey, int(np.median(border))))


def shrink(grey: np.ndarray, side: int = WORK_SIDE) -> np.ndarray:
    """(H, W) uint8 -> at most `side` pixels a side, area-averaged; never larger than the input."""
    h, w = grey.shape
    longest = max(h, w)
    if longest <= side:
        return grey
    src = Image.fromarray(grey)
    if longest >= 2 * side:
        src = src.reduce(longest // side)
    if max(src.size) > side:
        f = side / max(src.size)
        src = src.resize((max(1, round(src.size[0] * f)), max(1, round(src.size[1] * f))), Image.Resampling.BOX)
    return np.asarray(src, dtype=np.uint8)


def _blocks(x: np.ndarray, k: int, op) -> np.ndarray:
    """(h, w) -> (ceil(h/k), ceil(w/k)) reduced by `op` (np.min, np.max, np.mean) over k×k blocks;
    edge blocks are padded with their own edge values."""
    h, w = x.shape
    ph, pw = -h % k, -w % k
    if ph or pw:
        x = np.pad(x, ((0, ph), (0, pw)), mode="edge")
    return op(x.reshape(x.shape[0] // k, k, x.shape[1] // k, k), axis=(1, 3))


def _spread(x: np.ndarray, op, steps: int = 1) -> np.ndarray:
    """3×3 grey dilation (np.maximum) or erosion (np.minimum), `steps` times, same shape."""
    for _ in range(steps):  # shifted views instead of np.pad: ~4x faster on the small grids used here
        y = x.copy()
        op(y[1:], x[:-1], out=y[1:])
        op(y[:-1], x[1:], out=y[:-1])
        x = y.copy()
        op(x[:, 1:], y[:, :-1], out=x[:, 1:])
        op(x[:, :-1], y[:, 1:], out=x[:, :-1])
    return x


def _upsample(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A small float map -> (h, w) float32, bilinear."""
    h, w = shape
    return np.asarray(Image.fromarray(x.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))


def otsu(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: the cut that best separates two classes."""
    hist = np.histogram(values, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
    centres = (np.arange(bins) + 0.5) / bins
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))] + 0.5 / bins)


def _ink_is_dark(g: np.ndarray) -> bool:
    """Ink is the minority of the two classes Otsu's threshold separates. A frame around the
    paper (a photo's dark table: one class, along most of the edge, yet under half of the
    picture) is left out of the count first. Too close to call (a tiny scan full of ink): the
    border's colour is the paper."""
    t = otsu(g)
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    if max(g.shape) <= 64:  # a scan or an icon: its digit fills it, its border is the paper
        bright_border = float(np.mean(border >= t))
        if abs(bright_border - 0.5) > 0.2:
            return bright_border > 0.5
    coarse = _blocks(g, max(1, max(g.shape) // 64), np.mean)
    dark = coarse < t
    for cls in (dark, ~dark):
        frame = _from_border(cls)
        contact = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).mean()
        if contact >= 0.5 and frame.mean() < 0.5:
            inside = ~frame
            dark_share = float(np.mean(dark[inside]))
            if abs(dark_share - 0.5) > 0.1:
                return dark_share < 0.5
    dark_share = float(np.mean(g < t))
    if abs(dark_share - 0.5) > 0.1:
        return dark_share < 0.5
    return float(np.median(border)) > 0.5


def _paper_level(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(coarse means of x, paper level): the paper is most of the picture (its median); a
    histogram mode would pick a uniform table over paper under a light gradient."""
    coarse = _blocks(x, max(1, max(x.shape) // 64), np.mean)
    return coarse, float(np.median(coarse))


def ink_map(grey: np.ndarray) -> np.ndarray:
    """(h, w) uint8 -> float32 ink contrast in [0, 1] (1: full ink), independent of the lighting.

    Ink is made light-on-dark, the paper's level is estimated per region (the local minimum
    over blocks of 1/8 of the picture, spread to neighbouring blocks so a thick stroke never
    counts as paper) and the contrast is taken relative to the light that falls there:
    (x - paper) / (1 - paper). Shadows and uneven light scale paper and ink alike and cancel.
    What lies off the paper (a photo's table or frame: dark regions that run along at least a
    tenth of the picture's edge) is not ink when something is drawn on the paper itself; a
    digit drawn up to the edge of a canvas only touches it.
    """
    g = grey.astype(np.float32) / 255.0
    x = 1.0 - g if _ink_is_dark(g) else g
    if max(x.shape) <= 64:  # too small for regions: one paper level (a scan's background)
        paper = np.full(x.shape, np.percentile(x, 5), np.float32)
    else:
        k = max(2, max(x.shape) // 8)
        blurred = _box3(x) / 9.0  # the minimum of noise is biased: blur first
        paper = _upsample(_spread(_blocks(blurred, k, np.min), np.minimum), x.shape)
    ink = np.clip((x - paper) / np.maximum(1.0 - paper, 0.25), 0.0, 1.0)  # paper under 25% of full light: as if 25%
    if min(ink.shape) >= 3 and (_box3(ink) / 9.0).var() < 0.3 * ink.var():
        return np.zeros_like(ink)  # contrast without structure: noise keeps ~1/9 of it under a 3×3 mean, ink over 0.45
    xc, xp = _paper_level(x)
    off = _from_border(xc > xp + 0.4 * (1.0 - xp))
    contact = np.concatenate([off[0], off[-1], off[:, 0], off[:, -1]]).mean()
    if contact >= 0.05:  # a table or frame runs along the edge; a stroke that reaches it only touches it
        c = max(1, max(x.shape) // 64)
        up = lambda cells: np.repeat(np.repeat(cells, c, 0), c, 1)[: x.shape[0], : x.shape[1]]
        grown = _spread(off, np.maximum)
        kept = np.where(up(grown), 0.0, ink)
        fringe = kept[up(_spread(grown, np.maximum, 2) & ~grown)].sum()
        # something is drawn on the paper itself, not only the edge of what was removed (when
        # a thick digit reaching the edge was taken for a table, only its outline remains)
        if np.count_nonzero(kept > 0.5) >= 12 and fringe < 0.6 * kept.sum():
            ink = kept
    return ink


def _reach(mask: np.ndarray, seeds: np.ndarray, limit: int = 256) -> np.ndarray:
    """The 8-connected parts of `mask` that contain a seed (bounded geodesic dilation)."""
    reached = seeds & mask
    for _ in range(limit):
        grown = _spread(reached, np.maximum) & mask
        if np.array_equal(grown, reached):
            break
        reached = grown
    return reached


def _from_border(mask: np.ndarray) -> np.ndarray:
    """The parts of `mask` connected to the picture's edge (a photo's table or frame)."""
    seeds = np.zeros_like(mask)
    seeds[0], seeds[-1], seeds[:, 0], seeds[:, -1] = True, True, True, True
    return _reach(mask, seeds)


def subject_box(ink: np.ndarray, threshold: float = 0.35) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the digit in an ink map, or None when there is no subject
    (a blank page; noise has no ink at all, see `ink_map`).

    On a coarse grid (cells of 1/64 of the picture) the digit is the blob, grown over gaps of
    one cell, around the densest ink; specks elsewhere are not part of it.
    """
    h, w = ink.shape
    if min(h, w) < 3:
        return None
    smooth = _box3(ink) / 9.0  # single-pixel noise and JPEG ringing fade, strokes stay
    peak = float(smooth.max())
    if np.count_nonzero(ink > threshold) < 12:
        return None  # a blank or near-blank page: no stroke of a dozen pixels with real contrast
    k = max(1, max(h, w) // 64)
    coarse = _blocks(np.where(smooth > 0.35 * peak, smooth, 0.0), k, np.mean)
    mask = coarse > 0.02
    weight = np.where(mask, coarse, 0.0)
    seed = np.unravel_index(int(np.argmax(np.where(mask, _box3(weight), -1.0))), weight.shape)
    if not mask[seed]:
        return None
    seeds = np.zeros_like(mask)
    seeds[seed] = True
    blob = _reach(_spread(mask, np.maximum), seeds) & mask
    edge = _from_border(mask)
    band = np.ones_like(mask)
    band[5:-5, 5:-5] = False
    slivers = edge & ~_reach(edge, edge & ~band)  # parts that never leave the picture's outer band
    if not (blob & slivers).any():  # a sliver of table or shadow along the edge is not part of the digit
        mask = mask & ~slivers
    for _ in range(2):  # parts of the digit a little apart (a 5's flag, a broken stroke) join it
        rows, cols = np.flatnonzero(blob.any(1)), np.flatnonzero(blob.any(0))
        my = mx = 1 + max(rows[-1] - rows[0], cols[-1] - cols[0]) // 4
        near = np.zeros_like(mask)
        near[max(0, rows[0] - my) : rows[-1] + my + 1, max(0, cols[0] - mx) : cols[-1] + mx + 1] = True
        blob = mask & near
    rows, cols = np.flatnonzero(blob.any(1)), np.flatnonzero(blob.any(0))
    top, bottom, left, right = rows[0] * k, min(h, (rows[-1] + 1) * k), cols[0] * k, min(w, (cols[-1] + 1) * k)
    sub = smooth[top:bottom, left:right] > 0.35 * peak  # the real ink inside the coarse box
    r, c = np.flatnonzero(sub.any(1)), np.flatnonzero(sub.any(0))
    return top + r[0], top + r[-1] + 1, left + c[0], left + c[-1] + 1


def _box3(x: np.ndarray) -> np.ndarray:
    """3×3 box sum, same shape (edge values repeated past the border)."""
    p = np.pad(x, 1, mode="edge")
    r = p[:-2] + p[1:-1] + p[2:]
    return r[:, :-2] + r[:, 1:-1] + r[:, 2:]


def _resize_float(x: np.ndarray, w: int, h: int) -> np.ndarray:
    f = Image.fromarray(x.astype(np.float32), mode="F")
    resample = Image.Resampling.BOX if w <= x.shape[1] and h <= x.shape[0] else Image.Resampling.BILINEAR
    return np.asarray(f.resize((w, h), resample), dtype=np.float32)


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    total = float(img.sum())
    if total <= 0:
        return (img.shape[0] - 1) / 2, (img.shape[1] - 1) / 2
    ys, xs = np.arange(img.shape[0], dtype=np.float64), np.arange(img.shape[1], dtype=np.float64)
    return float(img.sum(1) @ ys / total), float(img.sum(0) @ xs / total)


def frame_digit(grey: np.ndarray) -> np.ndarray | None:
    """The MNIST recipe on any picture: (H, W) uint8 -> (28, 28) float32, or None with no ink.

    The ink is separated from the paper (`ink_map`, lighting-independent), the digit found
    (`subject_box`), cropped, its longer side scaled to 20 px keeping the aspect ratio, the
    strokes brought to full strength (MNIST's cores are 255), and its centre of mass put at
    the centre of the 28×28 frame.
    """
    work = shrink(grey)
    ink = ink_map(work)
    box = subject_box(ink)
    if box is None:
        return None
    top, bottom, left, right = box
    f = max(grey.shape) / max(work.shape)
    if f > 1.5 and max(bottom - top, right - left) < 0.4 * max(work.shape):
        # a small subject on a large picture: look again at the original pixels around it
        # (a view of the decoded image, shrunk again to at most WORK_SIDE), for its detail
        my, mx = (bottom - top) // 2 + 2, (right - left) // 2 + 2
        y0, x0 = int(max(0, top - my) * f), int(max(0, left - mx) * f)
        y1, x1 = int(min(work.shape[0], bottom + my) * f), int(min(work.shape[1], right + mx) * f)
        work = shrink(grey[y0:y1, x0:x1])
        ink = ink_map(work)
        box = subject_box(ink) or (0, work.shape[0], 0, work.shape[1])
        top, bottom, left, right = box
    peak = float(ink[top:bottom, left:right].max())
    crop = np.where(ink[top:bottom, left:right] >= 0.3 * peak, ink[top:bottom, left:right], 0.0)
    ch, cw = crop.shape
    f = DIGIT_BOX / max(ch, cw)
    small = _resize_float(crop, max(1, round(cw * f)), max(1, round(ch * f)))
    small = np.clip(small / max(float(np.percentile(small[small > 0], 98)) if (small > 0).any() else 1.0, 1e-3), 0, 1)
    if small.sum() < 1.3 * sum(small.shape):  # hairline strokes (ink per box side under MNIST's 1st percentile)
        small = np.maximum(small, 0.6 * _spread(small, np.maximum))
    return _place(small, *centre_of_mass(small))


def _place(small: np.ndarray, cy: float, cx: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Paste (h, w) onto a zero (size, size) canvas with the point (cy, cx) at its centre (clamped)."""
    h, w = small.shape
    top = int(np.clip(round(size / 2 - 0.5 - cy), 0, size - h))
    left = int(np.clip(round(size / 2 - 0.5 - cx), 0, size - w))
    out = np.zeros((size, size), dtype=np.float32)
    out[top : top + h, left : left + w] = small
    return out


def frame_garment(grey: np.ndarray) -> np.ndarray | None:
    """The Fashion-MNIST recipe: trim the background (the border's colour), longer side to 28,
    centred, negated so the product is light on black. (H, W) uint8 -> (28, 28) float32, or
    None when nothing differs from the background."""
    work = shrink(grey).astype(np.float32)
    border = np.concatenate([work[0], work[-1], work[:, 0], work[:, -1]])
    bg = float(np.median(border))
    diff = np.abs(work - bg) / 255.0
    if min(work.shape) >= 3:
        diff = _box3(diff) / 9.0
    noise = float(np.median(np.abs(border - bg))) / 255.0
    fg = diff > max(0.05, 4 * noise)
    if not fg.any():
        return None
    rows, cols = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
    crop = work[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if bg > 127.5:  # a product on a light page: negate, as Fashion-MNIST did
        crop, bg = 255.0 - crop, 255.0 - bg
    crop = np.clip((crop - bg) / max(255.0 - bg, 1.0), 0.0, 1.0)
    ch, cw = crop.shape
    f = IMAGE_SIZE / max(ch, cw)
    small = np.clip(_resize_float(crop, max(1, round(cw * f)), max(1, round(ch * f))), 0, 1)
    h, w = small.shape
    return _place(small, (h - 1) / 2, (w - 1) / 2)


def _grey(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W) uint8 grey; alpha over white, 16-bit scaled to 8."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        la = np.asarray(img.convert("LA"), dtype=np.uint16)  # (H, W, 2): grey and alpha
        grey, alpha = la[..., 0], la[..., 1]
        return ((grey * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.dtype.kind not in "iu":
            arr = np.asarray(img.convert("I"))
        peak = 65535 if int(arr.max(initial=0)) > 255 else 255
        return (np.clip(arr, 0, peak).astype(np.uint32) * 255 // peak).astype(np.uint8)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def fit_square(grey: np.ndarray, fill: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W) uint8 -> (size, size) uint8: longer side scaled to `size`, centred on `fill`."""
    h, w = grey.shape
    if (h, w) == (size, size):
        return grey
    side = max(h, w)
    new_w, new_h = max(1, round(w * size / side)), max(1, round(h * size / side))
    src = Image.fromarray(grey)
    if side > 4 * size:  # integer box-reduce first: fast, and the final resize sees <= 4x its size
        src = src.reduce(side // (2 * size))
    resample = Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
    small = np.asarray(src.resize((new_w, new_h), resample), dtype=np.uint8)
    canvas = np.full((size, size), fill, dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = small
    return canvas


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] (any shape) -> uint8, rounded and clipped."""
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """A (H, W) float image in [0, 1] -> PNG bytes (deterministic for equal input)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image), mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W) images in [0, 1] -> one (rows*(H+pad)+pad, cols*(W+pad)+pad) grid image."""
    n, h, w = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y : y + h, x : x + w] = img
    return out


def add_gaussian_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The denoiser's corruption: x + N(0, sigma^2), clipped to [0, 1]."""
    noise = rng.standard_normal(images.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(images + noise, 0.0, 1.0).astype(np.float32)


def psnr(reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for images in [0, 1]; leading axis is the batch."""
    axes = tuple(range(1, reference.ndim))
    mse = np.mean((reference.astype(np.float64) - estimate.astype(np.float64)) ** 2, axis=axes)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))


# --------------------------------------------------------------------------- text

PAD, UNK = 0, 1  # reserved ids at the start of every vocabulary
MAX_TOKENS = 128  # longer texts are truncated to their first MAX_TOKENS tokens

# SST-2 is lower-cased and PTB-tokenized ("it 's a charming , funny film . ").
# Raw client text is brought to that form: contractions split, punctuation separated.
_CONTRACTION = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'s|'re|'ve|'ll|'d|'m|[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]", re.I)
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "`": "'"})


# Text as people write it, brought to SST-2's conventions before tokenizing (SST-2 has no
# URLs, emoji, markup or shouting; it spells "..." and single "!"/"?").
_URL = re.compile(r"(?i)\b(?:https?://|www\.)\S+|\b\S+@\S+\.[a-z]{2,}\b")
_TAG = re.compile(r"<[a-zA-Z/][^<>]{0,200}>")
_REPEAT_PUNCT = re.compile(r"([!?,;:~])\1+")  # not "--", "***" or "...": SST-2 spells those
_DOTS = re.compile(r"\.{2,}|\u2026")
_ELONGATED = re.compile(r"([a-z])\1{2,}")  # "sooo": encode tries "soo", then "so", when it is unknown


def normalize_text(text: str) -> str:
    """HTML entities and tags, URLs and e-mail addresses, emoji and other symbols, repeated
    punctuation -> the plain text SST-2 was written in (lower-case). Elongated words ("sooo")
    are left to `encode`, which knows the vocabulary ("xxx" is a film in SST-2)."""
    text = html.unescape(_TAG.sub(" ", text)) if ("&" in text or "<" in text) else text
    text = _URL.sub(" ", text.translate(_QUOTES))
    if not text.isascii():
        text = "".join(" " if unicodedata.category(ch)[0] in "SC" and ch not in "$%&+<=>" else ch for ch in text)
        text = unicodedata.normalize("NFKC", text)
    return _DOTS.sub(" ... ", _REPEAT_PUNCT.sub(r"\1", text.lower()))


def tokenize(text: str, normalize: bool = True) -> list[str]:
    """Raw text -> SST-2-style tokens: normalized (`normalize_text`; off: lower-case only, the
    rule before normalization, kept for the before/after measurement), contractions and
    punctuation split."""
    text = normalize_text(text) if normalize else text.translate(_QUOTES).lower()
    return _TOKEN.findall(_CONTRACTION.sub(r"\1 \2", text))


def build_vocab(token_lists: Iterable[Sequence[str]], min_freq: int = 1) -> list[str]:
    """Tokens seen at least `min_freq` times, most frequent first, after <pad> and <unk>."""
    counts: dict[str, int] = {}
    for tokens in token_lists:
        for tok in tokens:
            counts[tok] = counts.get(tok, 0) + 1
    kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
    return ["<pad>", "<unk>", *kept]


def encode(tokens: Sequence[str], index: dict[str, int], max_tokens: int = MAX_TOKENS) -> list[int]:
    """Tokens -> ids, unknown words -> UNK, truncated to `max_tokens`. An unknown word with a
    elongated spelling (a letter three times or more) tries the word with its repeats cut to two
    letters, then to one; other unknown words (SST-2's own typos and names) stay unknown."""
    out = []
    for tok in tokens[:max_tokens]:
        i = index.get(tok)
        if i is None and _ELONGATED.search(tok):  # "sooo" -> "soo" -> "so"; "gooood" -> "good"
            twice = _ELONGATED.sub(r"\1\1", tok)
            i = index.get(twice) or index.get(_DOUBLE.sub(r"\1", twice))
        out.append(UNK if i is None else i)
    return out


_DOUBLE = re.compile(r"([a-z])\1")


def pad_batch(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Id lists -> (tokens (B, T) int64 right-padded with PAD, lengths (B,) int64)."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    tokens = np.full((len(sequences), max(1, int(lengths.max(initial=1)))), PAD, dtype=np.int64)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = seq
    return tokens, lengths


# --------------------------------------------------------------------------- codec


def quantize(latent: np.ndarray, bits: int) -> np.ndarray:
    """Encoder output in [0, 1], (B, D) -> integer levels in [0, 2^bits - 1], uint8."""
    levels = (1 << bits) - 1
    return np.clip(np.rint(latent * levels), 0, levels).astype(np.uint8)


def dequantize(codes: np.ndarray, bits: int) -> np.ndarray:
    """Integer levels (B, D) -> decoder input in [0, 1], float32."""
    return (codes.astype(np.float32) / np.float32((1 << bits) - 1)).astype(np.float32)


def code_bytes(dim: int, bits: int) -> int:
    """Size in bytes of one packed code."""
    return (dim * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> list[bytes]:
    """Levels (B, D) uint8 -> one packed byte string per row, big-endian bit order."""
    bit_planes = np.unpackbits(codes[..., None], axis=-1)[..., 8 - bits :]  # (B, D, bits)
    flat = bit_planes.reshape(codes.shape[0], -1)
    return [np.packbits(row).tobytes() for row in flat]


def unpack_codes(blobs: Sequence[bytes], dim: int, bits: int) -> np.ndarray:
    """Inverse of pack_codes; every blob must be exactly code_bytes(dim, bits) long."""
    n = code_bytes(dim, bits)
    if any(len(b) != n for b in blobs):
        raise ValueError(f"each code must be {n} bytes")
    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), n)
    bit_rows = np.unpackbits(raw, axis=1)[:, : dim * bits].reshape(len(blobs), dim, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
    return (bit_rows * weights).sum(axis=-1).astype(np.uint8)


# --------------------------------------------------------------------------- generator


def sample_latents(n: int, dim: int, seed: int, digit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded generator inputs: z (n, dim) float32 ~ N(0, 1), digits (n,) int64.

    A fixed digit repeats it n times; None draws digits uniformly from the same stream,
    so (n, digit, seed) fully determines the images.
    """
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, dim), dtype=np.float32)
    if digit is None:
        digits = rng.integers(0, 10, size=n, dtype=np.int64)
    else:
        digits = np.full(n, digit, dtype=np.int64)
    return z, digits


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation between latents a and b (D,) at fractions t (N,) -> (N, D):
    Gaussian latents keep their typical norm along the way (a straight line would shrink it)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = np.dot(a64, b64) / max(np.linalg.norm(a64) * np.linalg.norm(b64), 1e-12)
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    t = np.asarray(t, dtype=np.float64)[:, None]
    if omega < 1e-6:  # the same direction: a straight line is exact
        return ((1 - t) * a64 + t * b64).astype(np.float32)
    return ((np.sin((1 - t) * omega) * a64 + np.sin(t * omega) * b64) / np.sin(omega)).astype(np.float32)


def morph_inputs(z_dim: int, classes: int, start: tuple[int, int], end: tuple[int, int], steps: int):
    """Generator inputs for a morph from (digit, seed) to (digit, seed) in `steps` frames:
    latents (steps, z_dim) by slerp between the two seeds' first latents, class weights
    (steps, classes) on the line between the two one-hot digits."""
    (d0, s0), (d1, s1) = start, end
    z0 = sample_latents(1, z_dim, s0, d0)[0][0]
    z1 = sample_latents(1, z_dim, s1, d1)[0][0]
    t = np.linspace(0.0, 1.0, steps)
    eye = np.eye(classes, dtype=np.float32)
    weights = ((1 - t)[:, None] * eye[d0] + t[:, None] * eye[d1]).astype(np.float32)
    return slerp(z0, z1, t), weights


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stable probabilities, returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
