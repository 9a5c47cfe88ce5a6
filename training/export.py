"""The one ONNX export path for every family: eval mode, fixed names, dynamic batch axis,
the TorchScript exporter chosen explicitly, a single-file model, onnx.checker, and an
ONNX Runtime parity check against PyTorch at batch 1 and at batch >= 32 on real inputs."""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.common import write_json

OPSET = 17
PARITY_TOLERANCE = 1e-4


@dataclass
class ExportSpec:
    name: str  # registry name, also the file stem: exported/<name>.onnx
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


def export_model(module: torch.nn.Module, spec: ExportSpec, out_dir: Path, training: dict) -> dict:
    """Export, check and parity-test one model; write <name>.onnx and <name>.json; return metadata."""
    import onnx
    import onnxruntime as ort

    module = module.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{spec.name}.onnx"
    names = list(spec.inputs) + spec.outputs
    dynamic = {n: {0: "batch", **spec.dynamic_axes.get(n, {})} for n in names}
    example = tuple(torch.from_numpy(v[:2]) for v in spec.inputs.values())
    # dynamo=False: the TorchScript exporter handles our LSTM and gather-based reversal with
    # dynamic axes, needs no onnxscript, and writes one self-contained file.
    torch.onnx.export(
        module, example, str(path), input_names=list(spec.inputs), output_names=spec.outputs,
        dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False,
    )  # fmt: skip
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)

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
    print(f"exported {path.name}: parity max abs diff {parity}", flush=True)

    outputs = dict(zip(spec.outputs, _torch_outputs(module, {k: v[:2] for k, v in spec.inputs.items()})))
    digest = sha256_bytes(path.read_bytes())
    meta = {
        "name": spec.name,
        "task": spec.task,
        "file": path.name,
        "sha256": digest,
        "version": f"{training['date']}-{digest[:8]}",
        "inputs": _spec_of(spec.inputs, dynamic),
        "outputs": _spec_of(outputs, dynamic),
        "preprocessing": spec.preprocessing,
        **spec.extra,
        "training": training,
        "metrics": {},
        "parity": {"max_abs_diff": parity, "tolerance": PARITY_TOLERANCE,
                   "exporter": "torch.onnx.export(dynamo=False)", "opset": OPSET},
        "versions": versions(),
        "size_bytes": path.stat().st_size,
    }  # fmt: skip
    write_json(out_dir / f"{spec.name}.json", meta)
    write_manifest(out_dir)
    return meta


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime as ort

    return {"python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__}  # fmt: skip


def write_manifest(out_dir: Path) -> None:
    """exported/manifest.json: every model's name, task, files, version and sha256."""
    models = {}
    for meta_path in sorted(out_dir.glob("*.json")):
        if meta_path.name == "manifest.json":
            continue
        meta = json.loads(meta_path.read_text())
        models[meta["name"]] = {"task": meta["task"], "file": meta["file"],
                                "metadata": meta_path.name, "version": meta["version"],
                                "sha256": meta["sha256"]}  # fmt: skip
    write_json(out_dir / "manifest.json", {"models": models})
