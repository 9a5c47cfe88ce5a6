"""Preprocessing shared by training and serving: numpy and Pillow only, never torch.

Everything a model's input or output depends on is defined here once: pixel scaling and
normalisation, the resize rule for uploads, the SST-2 tokenizer, the codec's latent
quantization and the generator's seeded latents. `training/` and `service/` both import
this module, so the two can never drift apart. The constants that vary per model (mean/std,
quantization bits, vocabulary) live in each model's metadata in `exported/`.
"""

from __future__ import annotations

import io
import re
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


def to_grey_square(img: Image.Image, invert: str = "none") -> np.ndarray:
    """A decoded image -> float32 (28, 28) in [0, 1], MNIST-style.

    The rule (every image endpoint): apply EXIF orientation, composite alpha over white,
    convert to 8-bit grey, optionally invert so the subject is light on dark (`invert` is
    "none", "always" or "auto": auto inverts when the border is brighter than 127.5, i.e. a
    dark digit on light paper), scale the longer side to 28 (area averaging when shrinking,
    bilinear when enlarging) and centre it on a 28×28 canvas of the border's median colour.
    Memory stays proportional to the image's own pixels: padding to a square happens on the
    28×28 canvas, after the resize, so a 62,500×256 strip never becomes 62,500² pixels.
    """
    img = ImageOps.exif_transpose(img) or img
    grey = _grey(img)  # (H, W) uint8
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if invert == "always" or (invert == "auto" and float(border.mean()) > 127.5):
        grey, border = 255 - grey, 255 - border
    return scale_pixels(fit_square(grey, int(np.median(border))))


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


def tokenize(text: str) -> list[str]:
    """Raw text -> SST-2-style tokens: lower-case, contractions and punctuation split."""
    text = text.translate(_QUOTES).lower()
    text = _CONTRACTION.sub(r"\1 \2", text)
    return _TOKEN.findall(text)


def build_vocab(token_lists: Iterable[Sequence[str]], min_freq: int = 1) -> list[str]:
    """Tokens seen at least `min_freq` times, most frequent first, after <pad> and <unk>."""
    counts: dict[str, int] = {}
    for tokens in token_lists:
        for tok in tokens:
            counts[tok] = counts.get(tok, 0) + 1
    kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
    return ["<pad>", "<unk>", *kept]


def encode(tokens: Sequence[str], index: dict[str, int], max_tokens: int = MAX_TOKENS) -> list[int]:
    """Tokens -> ids, unknown words -> UNK, truncated to `max_tokens`."""
    return [index.get(tok, UNK) for tok in tokens[:max_tokens]]


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
