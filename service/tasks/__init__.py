"""What each task does, declared once: the task registry.

`base` is the contract (Job, Task, the registry); `fields` declares request fields once, for
the validation and the generated schemas alike; each other module is one task. A model
declares its task in its metadata and nothing else in the service names a model: adding a
model of an existing task is its files plus a manifest entry.

The batch-in/batch-out functions below (`classify_images`, `generate`, ...) are the served
code path (each task's feeds, job, forward and finish, without a batcher): training.evaluate
measures the committed models with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service import metadata as md
from service import preprocessing as pp
from service.runtime import Model
from service.tasks.base import (
    TASKS,
    Answer,
    Body,
    Context,
    Job,
    Signature,
    Task,
    Tensor,
    input_png,
    own_tensors,
    routes,
    run_job,
)
from service.tasks.classification import calibrated, observe_trust
from service.tasks.compression import Compression
from service.tasks.decompression import Decompression
from service.tasks.denoising import Denoising
from service.tasks.generation import MAX_SEED, ConditionalGeneration
from service.tasks.image_classification import ImageClassification
from service.tasks.text_classification import TEXT_CHUNK, TextClassification, encode_texts, texts_to_ids, token_logits

TASKS.update(
    (task.name, task)
    for task in (
        ImageClassification(),
        TextClassification(),
        ConditionalGeneration(),
        Compression(),
        Decompression(),
        Denoising(),
    )
)
assert set(TASKS) == set(md.TASK_NAMES), "every metadata type needs a task, and every task a metadata type"


def image_outputs(model: Model, images: np.ndarray) -> dict[str, np.ndarray]:
    """(N, 28, 28) pixels in [0, 1] -> every raw output (logits, ood_score if exported), in one
    ONNX run of the served feeds."""
    task = TASKS[model.task]
    return run_job(model, Job(task.feeds(model, images), len(images)), max(1, len(images)))


def classify_images(model: Model, images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) pixels in [0, 1] -> uncalibrated class probabilities (N, C) (the judge's view)."""
    return pp.softmax(image_outputs(model, images)["logits"])


def classify_token_ids(model: Model, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Non-empty id lists -> uncalibrated probabilities (N, C)."""
    return pp.softmax(token_logits(model, sequences))


def generate(model: Model, z: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Latents (N, z_dim) and digits (N,) -> images (N, 28, 28) in [0, 1]."""
    weights = np.eye(len(model.meta.labels), dtype=np.float32)[digits]
    return run_job(model, TASKS[model.task].job(model, z, weights))


def compress(encoder: Model, images: np.ndarray) -> list[bytes]:
    """(N, 28, 28) in [0, 1] -> one packed code per image."""
    return run_job(encoder, TASKS[encoder.task].job(encoder, images[:, None]))


def decompress(decoder: Model, codes: Sequence[bytes]) -> np.ndarray:
    """Packed codes (each exactly codec.bytes long) -> images (N, 28, 28) in [0, 1]."""
    return run_job(decoder, TASKS[decoder.task].job(decoder, list(codes)))


def denoise(model: Model, images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) noisy in [0, 1] -> (N, 28, 28) cleaned."""
    return run_job(model, TASKS[model.task].job(images[:, None]))


def run_in_chunks(fn, items, size: int = 512) -> Any:
    """Apply a batch function to a large array/list in chunks (evaluation, not serving)."""
    parts = [fn(items[i : i + size]) for i in range(0, len(items), size)]
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else sum(parts, [])


__all__ = [
    "MAX_SEED",
    "TASKS",
    "TEXT_CHUNK",
    "Answer",
    "Body",
    "Compression",
    "ConditionalGeneration",
    "Context",
    "Decompression",
    "Denoising",
    "ImageClassification",
    "Job",
    "Signature",
    "Task",
    "Tensor",
    "TextClassification",
    "calibrated",
    "classify_images",
    "classify_token_ids",
    "compress",
    "decompress",
    "denoise",
    "encode_texts",
    "generate",
    "image_outputs",
    "input_png",
    "observe_trust",
    "own_tensors",
    "routes",
    "run_in_chunks",
    "run_job",
    "texts_to_ids",
    "token_logits",
]
