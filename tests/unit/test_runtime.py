"""Sessions are opened only for verified files whose signature matches their metadata."""

import json
import shutil

import numpy as np
import pytest

from service import repository, runtime
from service.core import load_all
from service.metadata import VersionFiles
from tests.conftest import EXPORTED, manifest


@pytest.fixture
def digits_dir(tmp_path):
    """A model directory with only the digits family (its active version)."""
    m = manifest()
    version = m["families"]["digits"]["active"]
    shutil.copytree(EXPORTED / "digits" / version, tmp_path / "digits" / version)
    m = {
        "format": 2,
        "defaults": {},
        "families": {"digits": m["families"]["digits"]},
        "models": {"digits": m["models"]["digits"]},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    return tmp_path


def files(directory) -> tuple[VersionFiles, dict]:
    m = repository.raw(directory)
    version = m["families"]["digits"]["active"]
    vf = VersionFiles(**m["models"]["digits"]["versions"][version])
    return vf, json.loads((directory / vf.metadata).read_text())


def test_loads_a_verified_model_on_cpu(digits_dir):
    vf, _ = files(digits_dir)
    model = runtime.load_model(digits_dir, "digits", vf, "cpu", 1)
    assert model.provider == runtime.CPU and model.provider_reason == "DEEPSERVE_DEVICE=cpu"
    logits = model.run(image=np.zeros((3, 1, 28, 28), np.float32))[0]
    assert logits.shape == (3, 10)


def test_refuses_a_model_whose_sha256_differs(digits_dir):
    vf, _ = files(digits_dir)
    path = digits_dir / vf.file
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(runtime.ModelLoadError, match="refusing to serve an unverified model"):
        runtime.load_model(digits_dir, "digits", vf)


def test_missing_file_and_missing_manifest(digits_dir):
    vf, _ = files(digits_dir)
    (digits_dir / vf.file).unlink()
    with pytest.raises(runtime.ModelLoadError, match="ONNX file .* is missing"):
        runtime.load_model(digits_dir, "digits", vf)
    (digits_dir / "manifest.json").unlink()
    with pytest.raises(runtime.ModelLoadError, match="manifest.json is missing"):
        load_all(digits_dir)


def test_corrupt_onnx_with_matching_sha_is_refused_by_ort(digits_dir):
    vf, meta = files(digits_dir)
    path = digits_dir / vf.file
    path.write_bytes(b"not an onnx model")
    digest = runtime.sha256_file(path)
    meta["sha256"] = digest
    (digits_dir / vf.metadata).write_text(json.dumps(meta))
    with pytest.raises(runtime.ModelLoadError, match="ONNX Runtime cannot load"):
        runtime.load_model(digits_dir, "digits", vf.model_copy(update={"sha256": digest}))


def test_a_signature_that_differs_from_the_metadata_is_refused(digits_dir):
    vf, meta = files(digits_dir)
    meta["outputs"][0]["name"] = "scores"
    (digits_dir / vf.metadata).write_text(json.dumps(meta))
    with pytest.raises(runtime.ModelLoadError, match="ONNX outputs .* do not match"):
        runtime.load_model(digits_dir, "digits", vf)


def test_cuda_required_but_absent_fails_loudly():
    import onnxruntime as ort

    if runtime.CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(runtime.ModelLoadError, match="no CUDA provider"):
        runtime.providers_for("cuda")
    assert runtime.providers_for("auto") == [runtime.CPU]


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"image": np.zeros((2, 1, 28, 28), np.float64)}, "dtype float64"),
        ({"image": np.zeros((2, 1, 27, 28), np.float32)}, r"shape \(2, 1, 27, 28\)"),
        ({"img": np.zeros((2, 1, 28, 28), np.float32)}, "inputs"),
        ({"image": np.zeros((0, 1, 28, 28), np.float32)}, "empty"),
    ],
)
def test_run_checks_inputs_against_metadata(digits_dir, feeds, message):
    vf, _ = files(digits_dir)
    model = runtime.load_model(digits_dir, "digits", vf, "cpu", 1)
    with pytest.raises(ValueError, match=message):
        model.run(**feeds)
