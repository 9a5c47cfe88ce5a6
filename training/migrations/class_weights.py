"""The generator with a continuous class input: `python -m training.migrations.class_weights`.

The committed generator looks its class up (`Gather(embed.weight, digit)`): a digit is an
integer, so nothing lies between a 3 and an 8. This edits the graph into
`MatMul(class_weights, embed.weight)` with `class_weights` FP32 [batch, 10]: one-hot weights
give exactly the old embedding rows (the old images, checked to 1e-5 on every digit), and
weights in between interpolate the classes (the playground's digit morph). The new file is
registered as a new version of the `generator` family (made active; the old one is kept as
the previous version), then `make evaluate` measures it. New training runs export this
signature directly (training.generator)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from service import preprocessing as pp
from service import repository
from training import common
from training.export import commit_version

TOLERANCE = 1e-5


def with_class_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace the class lookup with a product by class weights; nothing else changes."""
    graph = model.graph
    gather = next(n for n in graph.node if n.op_type == "Gather" and "digit" in n.input)
    table = next(i for i in gather.input if i != "digit")
    classes = next(onnx.numpy_helper.to_array(i).shape[0] for i in graph.initializer if i.name == table)
    matmul = helper.make_node("MatMul", ["class_weights", table], list(gather.output), name="class_weights/MatMul")
    nodes = [matmul if n is gather else n for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    old = next(i for i in graph.input if i.name == "digit")
    graph.input.remove(old)
    graph.input.append(helper.make_tensor_value_info("class_weights", TensorProto.FLOAT, ["batch", classes]))
    onnx.checker.check_model(model, full_check=True)
    return model


def check_parity(old_path: Path, new_path: Path, z_dim: int) -> float:
    """Max |old - new| over every digit, 64 latents each: the one-hot case is unchanged."""
    old, new = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (old_path, new_path))
    worst = 0.0
    for digit in range(10):
        z, digits = pp.sample_latents(64, z_dim, seed=digit, digit=digit)
        a = old.run(None, {"z": z, "digit": digits})[0]
        b = new.run(None, {"z": z, "class_weights": np.eye(10, dtype=np.float32)[digits]})[0]
        worst = max(worst, float(np.abs(a - b).max()))
    if worst > TOLERANCE:
        raise AssertionError(f"one-hot class weights differ from the old images by {worst:.2e}")
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.migrations.class_weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--exported", default=str(common.EXPORTED))
    args = p.parse_args(argv)
    exported = Path(args.exported)
    source = repository.read(exported).families["generator"].active
    src = exported / "generator" / source
    meta = json.loads((src / "generator.json").read_text())
    if any(i["name"] == "class_weights" for i in meta["inputs"]):
        print(f"generator {source} already takes class_weights")
        return 0
    staging = exported / "generator" / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    onnx.save(with_class_weights(onnx.load(str(src / "generator.onnx"))), str(staging / "generator.onnx"))
    worst = check_parity(src / "generator.onnx", staging / "generator.onnx", meta["preprocessing"]["z_dim"])
    for key in ("version", "sha256", "size_bytes", "smoke"):
        meta.pop(key, None)
    meta["inputs"] = [i for i in meta["inputs"] if i["name"] != "digit"] + [
        {"name": "class_weights", "dtype": "float32", "shape": ["batch", 10]}
    ]
    meta["training"]["class_weights_from"] = source
    meta["parity"]["one_hot_vs_previous_version"] = worst
    version = commit_version(exported, "generator", staging, {"generator": meta}, common.today(), activate=True)
    print(f"VERSION generator {version}: class_weights input; one-hot reproduces {source} within {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
