"""The one ONNX export path for every family: eval mode, fixed names, dynamic batch axis,
the TorchScript exporter chosen explicitly, a single-file model, onnx.checker, and an
ONNX Runtime parity check against PyTorch at batch 1 and at batch >= 32 on real inputs."""

from __future__ import annotations

import hashlib
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from service import repository
from service.metadata import read_metadata
from training.common import write_json

OPSET = 17
PARITY_TOLERANCE = 1e-4


@dataclass
class ExportSpec:
    name: str  # the model's name, also the file stem: <family>/<version>/<name>.onnx
    task: str
    inputs: dict[str, np.ndarray]  # real example inputs, leading axis batch (>= 32 rows)
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]  # beyond the batch axis, e.g. {"tokens": {1: "seq"}}
    preprocessing: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # labels, vocabulary, quantization, ...


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _torch_outputs(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(v) for v in inputs.values()))
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def _spec_of(arrays: dict[str, np.ndarray], dynamic: dict[str, dict[int, str]]) -> list[dict]:
    specs = []
    for name, arr in arrays.items():
        shape = [dynamic.get(name, {}).get(i, int(d)) for i, d in enumerate(arr.shape)]
        specs.append({"name": name, "dtype": str(arr.dtype), "shape": shape})
    return specs


def export_onnx(module: torch.nn.Module, spec: ExportSpec, path: Path) -> dict:
    """Export, check and parity-test one model to `path`; return its signature and parity."""
    import onnx
    import onnxruntime as ort

    module = module.eval()
    names = list(spec.inputs) + spec.outputs
    dynamic = {n: {0: "batch", **spec.dynamic_axes.get(n, {})} for n in names}
    example = tuple(torch.from_numpy(v[:2]) for v in spec.inputs.values())
    # dynamo=False: the TorchScript exporter handles our LSTM and gather-based reversal with
    # dynamic axes, needs no onnxscript, and writes one self-contained file.
    torch.onnx.export(
        module,
        example,
        str(path),
        input_names=list(spec.inputs),
        output_names=spec.outputs,
        dynamic_axes=dynamic,
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parity = {}
    for batch in (1, min(64, len(next(iter(spec.inputs.values()))))):
        feed = {k: np.ascontiguousarray(v[:batch]) for k, v in spec.inputs.items()}
        want = _torch_outputs(module, feed)
        got = session.run(spec.outputs, feed)
        diff = max(float(np.max(np.abs(w - g))) for w, g in zip(want, got))
        parity[f"batch_{batch}"] = diff
        if diff > PARITY_TOLERANCE:
            raise AssertionError(f"{spec.name}: ORT/torch max abs diff {diff:.2e} at batch {batch}")
    print(f"exported {spec.name}: parity max abs diff {parity}", flush=True)
    outputs = dict(zip(spec.outputs, _torch_outputs(module, {k: v[:2] for k, v in spec.inputs.items()})))
    return {
        "inputs": _spec_of(spec.inputs, dynamic),
        "outputs": _spec_of(outputs, dynamic),
        "parity": {
            "max_abs_diff": parity,
            "tolerance": PARITY_TOLERANCE,
            "exporter": "torch.onnx.export(dynamo=False)",
            "opset": OPSET,
        },
    }


def family_version(date: str, digests: list[str]) -> str:
    """`<date>-<8 hex>`: one model's sha256 prefix, or a hash over a family's digests."""
    tag = digests[0] if len(digests) == 1 else sha256_bytes("".join(digests).encode())
    return f"{date}-{tag[:8]}"


def export_family(
    family: str,
    parts: list[tuple[torch.nn.Module, ExportSpec]],
    out_dir: Path,
    training: dict,
    activate: bool = False,
    finish=None,
) -> str:
    """Export every model of a family as one new version: `<out>/<family>/<version>/<model>.onnx`
    + `.json` (typed metadata, service.metadata), registered in `<out>/manifest.json`. The
    version is active if asked (or if the family had none). `finish(staging, metas)` may
    change the staged files and metadata before they are hashed (training.trust). Returns
    the version."""
    staging = out_dir / family / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    metas = {}
    for module, spec in parts:
        signature = export_onnx(module, spec, staging / f"{spec.name}.onnx")
        metas[spec.name] = {
            "name": spec.name,
            "task": spec.task,
            "family": family,
            "file": f"{spec.name}.onnx",
            **signature,
            "preprocessing": spec.preprocessing,
            **spec.extra,
            "training": training,
            "metrics": {},
            "versions": versions(),
        }
    if finish is not None:
        finish(staging, metas)
    return commit_version(out_dir, family, staging, metas, training["date"], activate)


def commit_version(out_dir: Path, family: str, staging: Path, metas: dict[str, dict], date: str, activate: bool) -> str:
    """Hash the staged models, name the version after them, move them into place with their
    metadata (checked against the service's types) and register the version."""
    digests = {name: sha256_bytes((staging / f"{name}.onnx").read_bytes()) for name in metas}
    version = family_version(date, list(digests.values()))
    final = out_dir / family / version
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for name, meta in metas.items():
        ordered = {
            "name": name,
            "task": meta["task"],
            "family": family,
            "version": version,
            "file": f"{name}.onnx",
            "sha256": digests[name],
        }
        ordered.update({k: v for k, v in meta.items() if k not in ordered})
        ordered["size_bytes"] = (final / f"{name}.onnx").stat().st_size
        write_json(final / f"{name}.json", ordered)
        read_metadata(final / f"{name}.json", name)  # the export writes what the service reads
    specs = [(name, metas[name]["task"]) for name in metas]
    register_version(out_dir, family, version, specs, list(digests.values()), activate)
    print(f"{family}: version {version} in {final}{' (active)' if activate else ''}", flush=True)
    return version


def register_version(
    out_dir: Path, family: str, version: str, specs: list[tuple[str, str]], digests: list[str], activate: bool
) -> None:
    """Add a family version to the manifest (created if missing) through its one owner
    (service.repository: locked, validated, atomic); activate it if asked."""
    repository.register_version(out_dir, family, version, specs, digests, activate)


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime as ort

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
