"""The wild suites: what people send, through the served preprocessing, before and after.

Every suite is rendered from the official *test* split only (training.wild), seeded, and
decoded by the server's own code (service.images: header probe, decode, framing by the
model's metadata), so a number here is what `POST /classify` answers for those bytes.
In-distribution suites report accuracy and the OOD pass rate; the non-digit suites (noise,
blank pages, Fashion-MNIST garments, printed letters and symbols) report how many are flagged.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from service import images as served
from service import tasks
from training import data, wild
from training.families import FAMILIES

SEED = 2026  # the suites' seed; training renders with others (training.classifier, training.ood)


def pick(n: int, total: int, seed: int = SEED) -> np.ndarray:
    """A seeded, sorted choice of n test indices."""
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


def upload_png(img28: np.ndarray) -> bytes:
    """A test image uploaded as it is stored: a 28×28 grey PNG."""
    buf = io.BytesIO()
    Image.fromarray(img28).save(buf, format="PNG")
    return buf.getvalue()


def blank_page(rng: np.random.Generator) -> bytes:
    """An empty sheet: 280×280 or a 640×480 photo of paper with texture, noise and JPEG."""
    if rng.random() < 0.5:
        arr = np.full((280, 280), rng.uniform(235, 255)) + rng.normal(0, rng.uniform(0, 3), (280, 280))
        fmt = "PNG"
    else:
        yy = np.linspace(0, 1, 480)[:, None]
        arr = rng.uniform(180, 240) * (1 - rng.uniform(0, 0.3) * yy) + rng.normal(0, rng.uniform(1, 6), (480, 640))
        fmt = "JPEG"
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def noise_upload(rng: np.random.Generator) -> bytes:
    """Uniform noise at a random size."""
    h, w = int(rng.integers(28, 300)), int(rng.integers(28, 300))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def digit_suites(data_dir: Path, n: int) -> dict[str, tuple[list[bytes], np.ndarray]]:
    """{family: (uploads, labels)} from the MNIST test split."""
    images, labels = data.load_images("mnist", "test", data_dir)
    idx = pick(n, len(images))
    out = {"mnist_test_png": ([upload_png(images[i]) for i in idx], labels[idx])}
    for k, family in enumerate(wild.DIGIT_FAMILIES):
        out[family] = (wild.render(family, images[idx], SEED + k), labels[idx])
    return out


def garment_suites(data_dir: Path, n: int) -> dict[str, tuple[list[bytes], np.ndarray]]:
    images, labels = data.load_images("fashion", "test", data_dir)
    idx = pick(n, len(images))
    out = {"fashion_test_png": ([upload_png(images[i]) for i in idx], labels[idx])}
    for k, family in enumerate(wild.GARMENT_FAMILIES):
        out[family] = (wild.render(family, images[idx], SEED + 100 + k), labels[idx])
    return out


def outlier_suites(name: str, data_dir: Path, n: int) -> dict[str, list[bytes]]:
    """Uploads that are not family `name`'s subject at all: each should be flagged (its other
    dataset, and printed letters and symbols for a family fitted on glyphs)."""
    rng = np.random.default_rng(SEED + 7)
    out = {
        "uniform_noise": [noise_upload(rng) for _ in range(n)],
        "blank_page": [blank_page(rng) for _ in range(n)],
    }
    trust = FAMILIES[name].trust
    imgs, _ = data.load_images(trust.other, "test", data_dir)
    out[f"{trust.other}_test_png"] = [upload_png(imgs[i]) for i in pick(n, len(imgs), SEED + 8)]
    if trust.glyphs:
        fonts = wild.font_files()
        chars = wild.LETTERS + wild.SYMBOLS
        out["letters_symbols"] = (
            [
                wild.glyph(chars[i % len(chars)], fonts[i % len(fonts)], np.random.default_rng([SEED, i]))
                for i in range(n)
            ]
            if fonts
            else []
        )
    return out


def served_inputs(model, uploads: list[bytes], framing: str | None = None) -> np.ndarray:
    """Uploads -> (N, 28, 28) exactly as the server decodes and frames them for `model`
    (`framing`: another rule, to measure what framing alone does for an older model)."""
    pre = model.meta.preprocessing
    if framing is not None:
        pre = pre.model_copy(update={"framing": framing})
    return np.stack([served.decode(served.probe(b, "image", 1 << 40), pre) for b in uploads])


def predict(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, confidence, in_distribution) as /classify answers them."""
    out = tasks.image_outputs(model, x)
    probs = tasks.calibrated(model, out["logits"])
    ood = model.meta.ood
    inside = out[ood.output] <= ood.threshold if ood else np.ones(len(x), bool)
    return probs.argmax(1), probs.max(1), inside


def evaluate(model, name: str, data_dir: Path, n: int = 1000, keep: bool = False, framing: str | None = None):
    """{suite: {accuracy, ood_pass | flagged, n}} for one classifier (`keep`: also the inputs seen)."""
    suites = (digit_suites if FAMILIES[name].dataset == "mnist" else garment_suites)(data_dir, n)
    result, seen = {}, {}
    for key, (uploads, labels) in suites.items():
        x = served_inputs(model, uploads, framing)
        pred, conf, inside = predict(model, x)
        result[key] = {"n": len(labels), "accuracy": float(np.mean(pred == labels)), "ood_pass": float(np.mean(inside))}
        if keep:
            seen[key] = (x, labels, pred, conf)
    for key, uploads in outlier_suites(name, data_dir, n).items():
        if uploads:
            _, _, inside = predict(model, served_inputs(model, uploads, framing))
            result[key] = {"n": len(uploads), "flagged": float(np.mean(~inside))}
    return (result, seen) if keep else result


def worst_failures(seen: dict, per_suite: int = 10) -> tuple[np.ndarray, list[str]]:
    """The most confident mistakes of each suite, as the model saw them: (rows*cols, 28, 28), row names."""
    rows, names = [], []
    for key, (x, labels, pred, conf) in seen.items():
        wrong = np.flatnonzero(pred != labels)
        wrong = wrong[np.argsort(-conf[wrong])][:per_suite]
        row = np.zeros((per_suite, 28, 28), np.float32)
        row[: len(wrong)] = x[wrong]
        rows.append(row)
        names.append(f"{key}: " + " ".join(f"{labels[i]}→{pred[i]}" for i in wrong))
    return np.concatenate(rows), names
