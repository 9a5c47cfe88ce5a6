"""What the peers share: the model directory, the upload rule and the answer shape."""

import io

import numpy as np
from PIL import Image

from service import preprocessing as pp
from service.core import load_models
from service.settings import REPO, usable_cores

EXPORTED = REPO / "exported"


def models():
    return load_models(EXPORTED, "cpu", usable_cores())


def decode(data: bytes, invert: str) -> np.ndarray:
    return pp.to_grey_square(Image.open(io.BytesIO(data)), invert)[None]  # (1, 28, 28)


def top(model, probs: np.ndarray) -> dict:
    i = int(probs.argmax())
    return {"model": model.name, "label": model.meta.labels[i], "index": i, "confidence": float(probs[i])}
