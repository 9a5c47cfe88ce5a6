"""Uploaded images -> 28×28 grey arrays, with work bounded by decoded pixels.

Every upload is opened header-first: its format and size are known before a pixel is
decoded, so a decompression bomb or an over-budget request stops at 413 for the price of
reading a header. Decoding then touches the first frame only, asks JPEG for a reduced-size
decode (DCT scaling), frames the subject the way the model's training set was made (the
model's `framing`, service.preprocessing) and shrinks the image to 28×28 without ever
allocating anything larger than the image itself: the "pad to a square" step happens after the resize, on the
28×28 canvas, so a 62,500×256 strip costs its 16 M pixels, not 62,500² of them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from service import preprocessing as pp
from service.errors import ApiError

# Pillow's own bomb check is replaced by the header check below against the configured
# pixel limits, which answers 413 before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
# leading bytes of each supported format: a file that starts like one but cannot be opened
# is a damaged image (400), anything else is not an image at all (415)
MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
DRAFT = 4 * pp.IMAGE_SIZE  # JPEGs are decoded at no less than this many pixels a side


@dataclass
class Upload:
    """An opened (not yet decoded) image and what decoding it will cost."""

    label: str
    image: Image.Image
    pixels: int


def probe(data: bytes, label: str, max_pixels: int) -> Upload:
    """Open one upload's header; 4xx ApiError for anything that is not a sane image."""
    if not data:
        raise ApiError(400, f"{label} is an empty file", "empty_image")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        if data.startswith(MAGIC):
            raise ApiError(
                400, f"{label} is truncated or corrupt: its header cannot be read", "corrupt_image"
            ) from None
        raise ApiError(415, f"{label} is not a supported image ({', '.join(FORMATS)})", "not_an_image") from None
    except Exception as exc:  # Pillow raises many types for hostile headers
        raise ApiError(400, f"{label} could not be read: {type(exc).__name__}", "corrupt_image") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ApiError(400, f"{label} has no pixels", "corrupt_image")
    if width * height > max_pixels:
        raise ApiError(
            413,
            f"{label} is {width}×{height} = {width * height} pixels; the limit is {max_pixels}",
            "too_many_pixels",
            limit=max_pixels,
        )
    return Upload(label, img, width * height)


def decode(upload: Upload, pre) -> np.ndarray:
    """One opened upload -> (28, 28) float32 in [0, 1], framed by the model's preprocessing
    `pre` (service.metadata.ImagePre: invert, framing); 400 if its data is corrupt."""
    img = upload.image
    try:
        if img.format == "JPEG":  # framing needs the subject's detail, the plain rule only 28 px
            side = pp.WORK_SIDE if pre.framing != "none" else DRAFT
            w, h = img.size  # JPEG scales by 1/2, 1/4, 1/8 only while both sides stay >= the request
            f = min(1.0, side / max(w, h))
            img.draft("L" if img.mode in ("L", "RGB") else None, (max(1, int(w * f)), max(1, int(h * f))))
        img.load()  # the first frame only: later frames of a GIF/TIFF/WebP are never decoded
        return pp.to_grey_square(img, pre.invert, pre.framing)
    except ApiError:
        raise
    except Exception as exc:
        raise ApiError(
            400, f"{upload.label} is truncated or corrupt ({img.format}: {type(exc).__name__})", "corrupt_image"
        ) from None
