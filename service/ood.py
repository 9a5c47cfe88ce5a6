"""Serving-side trust helpers (calibrated probabilities, unknown-token rate): numpy only.

The image models' `ood_score` comes out of the ONNX graph itself (see training/ood.py), so
the service only compares it with the metadata's threshold. What is left for the batch
function is here, small enough to run there for every batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LS_FLOOR = 1e-6  # smallest class probability kept when a label-smoothing inversion clips


def calibration_logits(logits: np.ndarray, label_smoothing: float = 0.0) -> np.ndarray:
    """The float64 scores a temperature divides: the logits themselves, or for a model trained
    with label smoothing eps over K classes the log of the un-smoothed probabilities,
    log(max((softmax(logits) - eps/K) / (1 - eps), LS_FLOOR)). The map is monotone per row,
    so the top label never changes."""
    z = np.asarray(logits, dtype=np.float64)
    if not label_smoothing:
        return z
    e = np.exp(z - z.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    k = z.shape[-1]
    q = (p - label_smoothing / k) / (1.0 - label_smoothing)
    return np.log(np.maximum(q, LS_FLOOR))


def calibrated_probabilities(logits: np.ndarray, temperature: float, label_smoothing: float = 0.0) -> np.ndarray:
    """(N, C) logits -> calibrated (N, C) probabilities, float32: softmax(logits / T) computed
    in float64 (with label_smoothing > 0, softmax(calibration_logits(...) / T))."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = calibration_logits(logits, label_smoothing) / float(temperature)
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def unknown_token_rate(ids: Sequence[int] | np.ndarray, unk_id: int) -> float:
    """Share of a text's token ids that are `unk_id` (0.0 for no ids; the service encodes a
    text without tokens as [UNK], which gives 1.0)."""
    ids = np.asarray(ids)
    return float(np.mean(ids == unk_id)) if ids.size else 0.0
