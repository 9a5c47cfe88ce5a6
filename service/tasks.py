"""Batch-in/batch-out model tasks over runtime.Model, shared by the service and evaluation.

Each function takes already-validated inputs for many requests at once and returns one
result per input row, in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service import preprocessing as pp
from service.runtime import Model


def classify_images(model: Model, images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) pixels in [0, 1] -> class probabilities (N, C)."""
    pre = model.meta["preprocessing"]
    x = pp.normalize(images, pre["mean"], pre["std"])[:, None]  # (N, 1, 28, 28)
    (logits,) = model.run(image=x)
    return pp.softmax(logits)


def encode_texts(model: Model, texts: Sequence[str]) -> list[list[int]]:
    """Texts -> token id lists (truncated to the model's max_tokens); [] for no tokens."""
    index = model.vocab_index
    max_tokens = model.meta["preprocessing"]["max_tokens"]
    return [pp.encode(pp.tokenize(t), index, max_tokens) for t in texts]


def classify_token_ids(model: Model, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Non-empty id lists -> probabilities (N, 2). Sorted by length so padding stays small;
    the model is exact under padding, so grouping never changes a result."""
    order = np.argsort([len(s) for s in sequences], kind="stable")
    probs = np.empty((len(sequences), len(model.meta["labels"])), dtype=np.float32)
    for start in range(0, len(order), 64):
        chunk = order[start : start + 64]
        tokens, lengths = pp.pad_batch([sequences[i] for i in chunk])
        (logits,) = model.run(tokens=tokens, lengths=lengths)
        probs[chunk] = pp.softmax(logits)
    return probs


def generate(model: Model, z: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Latents (N, z_dim) and digits (N,) -> images (N, 28, 28) in [0, 1]."""
    (images,) = model.run(z=z, digit=digits)
    return np.clip(images[:, 0], 0.0, 1.0)  # tanh rescaled to [0, 1] can round a hair past either end


def compress(encoder: Model, images: np.ndarray) -> list[bytes]:
    """(N, 28, 28) in [0, 1] -> one packed code per image."""
    (latent,) = encoder.run(image=images[:, None])
    return pp.pack_codes(pp.quantize(latent, encoder.meta["codec"]["bits"]), encoder.meta["codec"]["bits"])


def decompress(decoder: Model, codes: Sequence[bytes]) -> np.ndarray:
    """Packed codes (each exactly codec.bytes long) -> images (N, 28, 28) in [0, 1]."""
    codec = decoder.meta["codec"]
    levels = pp.unpack_codes(codes, codec["latent_dim"], codec["bits"])
    (images,) = decoder.run(latent=pp.dequantize(levels, codec["bits"]))
    return images[:, 0]


def denoise(model: Model, images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) noisy in [0, 1] -> (N, 28, 28) cleaned."""
    (out,) = model.run(image=images[:, None])
    return out[:, 0]


def run_in_chunks(fn, items, size: int = 512):
    """Apply a batch function to a large array/list in chunks (evaluation, not serving)."""
    parts = [fn(items[i : i + size]) for i in range(0, len(items), size)]
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else sum(parts, [])

