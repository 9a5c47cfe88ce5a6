"""The ONNX Runtime core: a verified registry of exported models and batch-in/batch-out runs.

No torch and no BentoML here: `training.evaluate` measures the committed models through
exactly this code, and the BentoML service wraps it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger("deepserve")

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
_DTYPES = {"float32": np.float32, "int64": np.int64}


class ModelLoadError(RuntimeError):
    """An exported model is missing, corrupt, or does not match its metadata."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (model files here, dataset files in training)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def providers_for(device: str) -> list[str]:
    """Execution providers to ask for: 'cpu', 'cuda' (required) or 'auto' (CUDA if it loads)."""
    if device == "cpu":
        return [CPU]
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ModelLoadError(
            f"DEEPSERVE_DEVICE=cuda but this onnxruntime build has no CUDA provider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu or use auto/cpu"
        )
    return [CUDA, CPU] if CUDA in available else [CPU]


@dataclass
class Model:
    """One verified ONNX session plus the metadata that describes it."""

    name: str
    meta: dict
    session: ort.InferenceSession
    provider: str
    on_batch: Callable[[str, int, float], None] | None = field(default=None, repr=False)

    @property
    def version(self) -> str:
        return self.meta["version"]

    @functools.cached_property
    def vocab_index(self) -> dict[str, int]:
        """Token -> id for text models (built once)."""
        return {tok: i for i, tok in enumerate(self.meta.get("vocabulary", []))}

    def run(self, **feeds: np.ndarray) -> list[np.ndarray]:
        """Run one batch; inputs and outputs are checked against the metadata's signature."""
        rows = self._check_inputs(feeds)
        start = time.perf_counter()
        outputs = self.session.run(None, feeds)
        seconds = time.perf_counter() - start
        for spec, out in zip(self.meta["outputs"], outputs):
            if out.shape[0] != rows:  # one output row per input row, always
                raise RuntimeError(f"{self.name}: {out.shape[0]} output rows for {rows} inputs")
            if not np.all(np.isfinite(out)):
                raise RuntimeError(f"{self.name}: non-finite values in output {spec['name']}")
        if self.on_batch is not None:
            self.on_batch(self.name, rows, seconds)
        return outputs

    def _check_inputs(self, feeds: dict[str, np.ndarray]) -> int:
        specs = {s["name"]: s for s in self.meta["inputs"]}
        if set(feeds) != set(specs):
            raise ValueError(f"{self.name}: inputs {sorted(feeds)}, expected {sorted(specs)}")
        rows = {int(a.shape[0]) for a in feeds.values() if a.ndim}
        if len(rows) != 1 or 0 in rows:
            raise ValueError(f"{self.name}: inputs disagree on the batch size or are empty")
        for name, arr in feeds.items():
            spec = specs[name]
            if arr.dtype != _DTYPES[spec["dtype"]]:
                raise ValueError(f"{self.name}.{name}: dtype {arr.dtype}, expected {spec['dtype']}")
            if arr.ndim != len(spec["shape"]) or any(
                isinstance(d, int) and d != got for d, got in zip(spec["shape"], arr.shape)
            ):
                raise ValueError(f"{self.name}.{name}: shape {arr.shape}, expected {spec['shape']}")
        return rows.pop()


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only; provider fallbacks are reported by us
    return opts


def load_model(exported: Path, name: str, device: str = "cpu", threads: int = 1) -> Model:
    """Open one model after checking its file against the metadata's sha256 and size."""
    meta_path = exported / f"{name}.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model {name!r}: metadata {meta_path} is missing") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"model {name!r}: metadata {meta_path} is not valid JSON ({exc})") from exc
    path = exported / meta["file"]
    if not path.is_file():
        raise ModelLoadError(f"model {name!r}: ONNX file {path} is missing")
    digest = sha256_file(path)
    if digest != meta["sha256"]:
        raise ModelLoadError(
            f"model {name!r}: {path} has sha256 {digest[:16]}…, metadata says {meta['sha256'][:16]}…; "
            "refusing to serve an unverified model"
        )
    wanted = providers_for(device)
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=wanted)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelLoadError(f"model {name!r}: ONNX Runtime cannot load {path}: {exc}") from exc
    active = session.get_providers()[0]
    if device == "cuda" and active != CUDA:
        raise ModelLoadError(f"model {name!r}: DEEPSERVE_DEVICE=cuda but CUDA did not load")
    if wanted[0] != active:
        log.warning("model %s: %s did not load, running on %s", name, wanted[0], active)
    return Model(name=name, meta=meta, session=session, provider=active)


def load_registry(exported: Path, device: str = "cpu", threads: int = 1) -> dict[str, Model]:
    """Every model in exported/manifest.json, verified and opened once."""
    manifest_path = exported / "manifest.json"
    if not manifest_path.is_file():
        raise ModelLoadError(f"{manifest_path} is missing: no models to serve")
    names = json.loads(manifest_path.read_text())["models"]
    return {name: load_model(exported, name, device, threads) for name in names}
