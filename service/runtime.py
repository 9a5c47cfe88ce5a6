"""The ONNX Runtime core: verified sessions and batch-in/batch-out runs.

No torch and no BentoML here: `training.evaluate` measures the committed models through
exactly this code, and the service wraps it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.gpu import cuda_unavailable_reason
from service.metadata import Metadata, MetadataError, VersionFiles, read_metadata

log = logging.getLogger("deepserve")

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# ONNX Runtime's CUDA provider, measured on an H200 (2026-11-29, deploy.gpu.verify; docs/gpu.md):
# - use_tf32 "0": its default (TF32 on) put the generator and decoder 1.2e-3 and 1.3e-3 from the
#   CPU, past their smoke sets' 1e-3, and the service refused to start on CUDA. In FP32 every
#   model is within 1.5e-6 of the CPU (digits' ood_score within 3.4e-4 on out-of-range inputs).
#   Up to 256 rows FP32 ran within run-to-run noise of TF32 (under 0.5 ms either way); at
#   1024-4096 rows up to 1.5x slower (fashion at 4096: 3.9x).
# - cudnn_conv_algo_search "HEURISTIC": with the default (EXHAUSTIVE) a run on a batch shape new
#   to a session took 20-230 ms (cuDNN benchmarking its algorithms), and in the server, where
#   adaptive batching varies the rows from batch to batch, the cost came back batch after batch
#   (digits, ~4 rows: 97 ms per batch against 0.46 ms in-process): /denoise at 8 clients served
#   20 req/s with batching on, 647 with it off. HEURISTIC: 2-95 ms on a new shape, about the
#   same steady-state speed, /denoise at 128 clients 1452 req/s (from 448; 681 with batching off).
PROVIDER_OPTIONS = {CUDA: {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}}
DTYPES = {"float32": np.float32, "int64": np.int64, "uint8": np.uint8}
ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "uint8": "tensor(uint8)"}


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


def device_problem(device: str) -> str | None:
    """Why the workers could not run on `device` (None: they can), checked in the server
    process before any worker starts: DEEPSERVE_DEVICE=cuda must have the CUDA provider and
    every library it loads, or start-up fails with this one line."""
    if device != "cuda":
        return None
    try:
        providers_for(device)
    except ModelLoadError as exc:
        return str(exc)
    reason = cuda_unavailable_reason()
    return f"DEEPSERVE_DEVICE=cuda but CUDA cannot load: {reason}" if reason else None


@functools.cache
def cuda_reason() -> str:
    """Why CUDA is not used, in one line (the library that failed to load, where known)."""
    try:
        return cuda_unavailable_reason() or "CUDA provider did not load"
    except ImportError:
        return "onnxruntime has no CUDA provider" if CUDA not in ort.get_available_providers() else "unknown"


@dataclass
class Model:
    """One verified ONNX session plus the typed metadata that describes it."""

    name: str
    meta: Metadata
    session: ort.InferenceSession
    provider: str
    provider_reason: str = ""  # why not CUDA, when auto fell back to the CPU
    on_batch: Callable[[str, int, float], None] | None = field(default=None, repr=False)

    @property
    def version(self) -> str:
        return self.meta.version

    @property
    def family(self) -> str:
        return self.meta.family

    @property
    def task(self) -> str:
        return self.meta.task

    @functools.cached_property
    def vocab_index(self) -> dict[str, int]:
        """Token -> id for text models (built once)."""
        return {tok: i for i, tok in enumerate(getattr(self.meta, "vocabulary", []))}

    @functools.cached_property
    def output_names(self) -> list[str]:
        return [o.name for o in self.meta.outputs]

    def run(self, **feeds: np.ndarray) -> list[np.ndarray]:
        """Run one batch; inputs and outputs are checked against the metadata's signature."""
        rows = self._check_inputs(feeds)
        start = time.perf_counter()
        outputs = self.session.run(None, feeds)
        seconds = time.perf_counter() - start
        for spec, out in zip(self.meta.outputs, outputs):
            if out.shape[0] != rows:  # one output row per input row, always
                raise RuntimeError(f"{self.name}: {out.shape[0]} output rows for {rows} inputs")
            if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
                raise RuntimeError(f"{self.name}: non-finite values in output {spec.name}")
        if self.on_batch is not None:
            self.on_batch(self.name, rows, seconds)
        return outputs

    def _check_inputs(self, feeds: dict[str, np.ndarray]) -> int:
        specs = {s.name: s for s in self.meta.inputs}
        if set(feeds) != set(specs):
            raise ValueError(f"{self.name}: inputs {sorted(feeds)}, expected {sorted(specs)}")
        rows = {int(a.shape[0]) for a in feeds.values() if a.ndim}
        if len(rows) != 1 or 0 in rows:
            raise ValueError(f"{self.name}: inputs disagree on the batch size or are empty")
        for name, arr in feeds.items():
            spec = specs[name]
            if arr.dtype != DTYPES[spec.dtype]:
                raise ValueError(f"{self.name}.{name}: dtype {arr.dtype}, expected {spec.dtype}")
            if arr.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != got for d, got in zip(spec.shape, arr.shape)
            ):
                raise ValueError(f"{self.name}.{name}: shape {arr.shape}, expected {spec.shape}")
        return rows.pop()


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only; provider fallbacks are reported by us
    return opts


def check_signature(name: str, meta: Metadata, session: ort.InferenceSession) -> None:
    """The ONNX file's inputs and outputs must be exactly the ones its metadata declares."""
    for kind, specs, actual in (
        ("inputs", meta.inputs, session.get_inputs()),
        ("outputs", meta.outputs, session.get_outputs()),
    ):
        got = [(a.name, a.type, len(a.shape)) for a in actual]
        want = [(s.name, ORT_TYPES[s.dtype], len(s.shape)) for s in specs]
        if got != want:
            raise ModelLoadError(f"model {name!r}: ONNX {kind} {got} do not match the metadata's {want}")


def load_model(directory: Path, name: str, files: VersionFiles, device: str = "cpu", threads: int = 1) -> Model:
    """Open one model at one version after checking its file against the sha256 in the
    manifest and in its metadata, and its signature against the metadata."""
    try:
        meta = read_metadata(directory / files.metadata, name)
    except MetadataError as exc:
        raise ModelLoadError(str(exc)) from None
    if meta.name != name:
        raise ModelLoadError(f"model {name!r}: its metadata names it {meta.name!r}")
    path = directory / files.file
    if not path.is_file():
        raise ModelLoadError(f"model {name!r}: ONNX file {path} is missing")
    digest = sha256_file(path)
    if digest != meta.sha256 or digest != files.sha256:
        raise ModelLoadError(
            f"model {name!r}: {path.name} has sha256 {digest[:16]}…, the manifest says {files.sha256[:16]}… "
            f"and the metadata {meta.sha256[:16]}…; refusing to serve an unverified model"
        )
    wanted = providers_for(device)
    try:
        session = ort.InferenceSession(
            str(path),
            session_options(threads),
            providers=wanted,
            provider_options=[PROVIDER_OPTIONS.get(p, {}) for p in wanted],
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelLoadError(f"model {name!r}: ONNX Runtime cannot load {path.name}: {str(exc)[:300]}") from exc
    check_signature(name, meta, session)
    active = session.get_providers()[0]
    if device == "cuda" and active != CUDA:
        raise ModelLoadError(f"model {name!r}: DEEPSERVE_DEVICE=cuda but CUDA did not load ({cuda_reason()})")
    reason = "" if active == CUDA else ("DEEPSERVE_DEVICE=cpu" if device == "cpu" else cuda_reason())
    if wanted[0] != active:
        log.warning("model %s: %s did not load (%s); running on %s", name, wanted[0], reason, active)
    return Model(name=name, meta=meta, session=session, provider=active, provider_reason=reason)
