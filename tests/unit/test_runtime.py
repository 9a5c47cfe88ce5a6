import json
import shutil

import numpy as np
import pytest

from service import runtime
from tests.conftest import EXPORTED


@pytest.fixture
def exported_copy(tmp_path):
    for name in ("digits.onnx", "digits.json"):
        shutil.copy(EXPORTED / name, tmp_path / name)
    (tmp_path / "manifest.json").write_text(json.dumps({"models": {"digits": {}}}))
    return tmp_path


def test_loads_a_verified_model_on_cpu(exported_copy):
    model = runtime.load_model(exported_copy, "digits", "cpu", 1)
    assert model.provider == runtime.CPU
    (logits,) = model.run(image=np.zeros((3, 1, 28, 28), np.float32))
    assert logits.shape == (3, 10)


def test_refuses_a_model_whose_sha256_differs(exported_copy):
    path = exported_copy / "digits.onnx"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(runtime.ModelLoadError, match="refusing to serve an unverified model"):
        runtime.load_model(exported_copy, "digits")


def test_missing_file_and_missing_manifest(exported_copy):
    (exported_copy / "digits.onnx").unlink()
    with pytest.raises(runtime.ModelLoadError, match="ONNX file .* is missing"):
        runtime.load_model(exported_copy, "digits")
    (exported_copy / "manifest.json").unlink()
    with pytest.raises(runtime.ModelLoadError, match="manifest.json is missing"):
        runtime.load_registry(exported_copy)


def test_corrupt_onnx_with_matching_sha_is_refused_by_ort(exported_copy):
    path = exported_copy / "digits.onnx"
    path.write_bytes(b"not an onnx model")
    meta = json.loads((exported_copy / "digits.json").read_text())
    meta["sha256"] = runtime.sha256_file(path)
    (exported_copy / "digits.json").write_text(json.dumps(meta))
    with pytest.raises(runtime.ModelLoadError, match="ONNX Runtime cannot load"):
        runtime.load_model(exported_copy, "digits")


def test_cuda_required_but_absent_fails_loudly():
    import onnxruntime as ort

    if runtime.CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(runtime.ModelLoadError, match="no CUDA provider"):
        runtime.providers_for("cuda")
    assert runtime.providers_for("auto") == [runtime.CPU]


@pytest.mark.parametrize("feeds, message", [
    ({"image": np.zeros((2, 1, 28, 28), np.float64)}, "dtype float64"),
    ({"image": np.zeros((2, 1, 27, 28), np.float32)}, r"shape \(2, 1, 27, 28\)"),
    ({"img": np.zeros((2, 1, 28, 28), np.float32)}, "inputs"),
    ({"image": np.zeros((0, 1, 28, 28), np.float32)}, "empty"),
])  # fmt: skip
def test_run_checks_inputs_against_metadata(exported_copy, feeds, message):
    model = runtime.load_model(exported_copy, "digits", "cpu", 1)
    with pytest.raises(ValueError, match=message):
        model.run(**feeds)
