"""What the image and text classifiers share: calibrated probabilities, the trust metrics of
their finish step (whatever the protocol), the answer rows, and reject_ood."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from service import metrics, ood
from service import preprocessing as pp
from service.errors import ApiError
from service.runtime import Model
from service.tasks.base import Task


def observe_trust(model: Model, top1: list[float], verdicts: list[bool] | None) -> None:
    """The metrics of a classifier's finish step, whatever the protocol: each row's top-1
    probability (deepserve_prediction_confidence) and whether it looked like the training
    data (deepserve_predictions_total{in_distribution}; not counted without a detector)."""
    metrics.aggregate.observe_many("confidence", (model.name,), top1)
    if verdicts is not None:
        flagged = verdicts.count(False)
        if flagged:
            metrics.aggregate.inc("ood", (model.name, "false"), flagged)
        if len(verdicts) > flagged:
            metrics.aggregate.inc("ood", (model.name, "true"), len(verdicts) - flagged)


def classifications(model: Model, probs: np.ndarray, top_k: int, verdicts: list[bool] | None) -> list[dict]:
    """(N, C) probabilities -> one answer per row (sorted once for the whole batch, and
    built from Python numbers: per-row numpy calls cost more than the model here)."""
    labels = model.meta.labels
    k = min(top_k, len(labels))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.round(np.take_along_axis(probs, order, axis=1).astype(np.float64), 6).tolist()
    observe_trust(model, [p[0] for p in top], verdicts)
    out = []
    for idx, p in zip(order.tolist(), top):
        best = idx[0]
        out.append(
            {
                "model": model.name,
                "model_version": model.version,
                "label": labels[best],
                "index": best,
                "confidence": p[0],
                "top_k": [{"label": labels[i], "index": i, "probability": q} for i, q in zip(idx, p)],
            }
        )
    return out


def calibrated(model: Model, logits: np.ndarray) -> np.ndarray:
    """The probabilities clients get: softmax(logits / T), T fitted on the validation split
    (service.ood); uncalibrated where the metadata has no calibration."""
    cal = getattr(model.meta, "calibration", None)
    if cal is None:
        return pp.softmax(logits)
    return ood.calibrated_probabilities(logits, cal.temperature, cal.label_smoothing)


def reject_ood(results: list[dict], many: bool, score: str) -> None:
    """reject_ood=true: 422 naming every input that looks unlike the training data."""
    bad = [(i, r) for i, r in enumerate(results) if r.get("in_distribution") is False]
    if bad:
        names = [f"{'input #' + str(i + 1) if many else 'the input'} ({score} {r[score]:.3g})" for i, r in bad[:16]]
        raise ApiError(
            422,
            f"out of distribution: {', '.join(names)}; the model was not trained on inputs like "
            "these (send reject_ood=false to get labels anyway)",
            "out_of_distribution",
            out_of_distribution=[i for i, _ in bad],
        )


class Classifier(Task):
    """The trust step of a classifier (calibrated probabilities, a score and an
    in-distribution verdict per row) and, under the Open Inference Protocol, a finish step
    with the same metrics as its own route's."""

    def trust(self, model: Model, inputs: Any, out: dict[str, np.ndarray]) -> tuple:
        """A batch's raw outputs -> (calibrated probabilities (N, C), each row's trust score,
        each row's verdict (None without a detector))."""
        raise NotImplementedError

    def tensor_finish(self, model: Model, inputs: Any, tensors=None) -> Callable:
        """The finish step of a tensor job: the trust metrics, then the raw outputs (or
        `tensors(probabilities)`, a view's outputs)."""

        def finish(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            probs, _, verdicts = self.trust(model, inputs, out)
            observe_trust(model, np.round(probs.max(1).astype(np.float64), 6).tolist(), verdicts)
            return out if tensors is None else tensors(probs)

        return finish

    def describe(self, model: Model) -> dict:
        return {"labels": model.meta.labels}
