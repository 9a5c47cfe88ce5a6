"""service.gpu names the library that keeps CUDA away, and the GPU image's package set stays
the one `make gpu-check` verifies (docs/gpu.md). Runs on a CPU-only machine: the CUDA side is
played by tiny stub libraries compiled here (skipped without a C compiler)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service import gpu
from tests.conftest import REPO

BENTOFILE = REPO / "deploy" / "bentofile-gpu.yaml"
CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler for the stub libraries")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "deploy" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ the installed (CPU) onnxruntime


def test_the_cpu_onnxruntime_has_no_cuda_provider_and_says_so():
    ort_dir = gpu.onnxruntime_dir()
    assert ort_dir is not None and (ort_dir / "capi").is_dir()
    if (ort_dir / "capi" / gpu.PROVIDER).exists():
        pytest.skip("onnxruntime-gpu is installed here")
    assert gpu.cuda_unavailable_reason() == "onnxruntime (CPU build) has no CUDA provider; install onnxruntime-gpu"


def test_importing_service_gpu_does_not_import_onnxruntime():
    code = "import sys; import service.gpu; print('onnxruntime' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_no_onnxruntime_at_all(monkeypatch):
    monkeypatch.setattr(gpu, "onnxruntime_dir", lambda: None)
    assert gpu.cuda_unavailable_reason() == "onnxruntime is not installed"


# ------------------------------------------------------------------ a fake onnxruntime-gpu


def fake_ort(root: Path, cuda_version: str = "13.0") -> Path:
    capi = root / "site" / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (capi / "build_and_package_info.py").write_text(
        f"package_name = 'onnxruntime-gpu'\n__version__ = '1.31.1'\ncuda_version = '{cuda_version}'\n"
    )
    return capi.parent


def test_build_info_is_read_without_importing(tmp_path):
    ort_dir = fake_ort(tmp_path)
    assert gpu.build_info(ort_dir) == {
        "package_name": "onnxruntime-gpu",
        "__version__": "1.31.1",
        "cuda_version": "13.0",
    }


def test_a_provider_that_is_not_a_library_is_reported_as_a_broken_install(tmp_path):
    ort_dir = fake_ort(tmp_path)
    (ort_dir / "capi" / gpu.PROVIDER).write_bytes(b"not an ELF file at all" * 10)
    reason = gpu.cuda_unavailable_reason(ort_dir, probe_device=False)
    assert reason.startswith("CUDA provider cannot load: ") and gpu.PROVIDER in reason
    assert "reinstall" in reason and "\n" not in reason


def compile_lib(
    path: Path, soname: str, source: str = "int stub_symbol(void) { return 0; }", link: list[str] | None = None
) -> Path:
    src = path.with_suffix(".c")
    src.write_text(source)
    cmd = [
        CC,
        "-shared",
        "-fPIC",
        "-o",
        str(path),
        str(src),
        f"-Wl,-soname,{soname}",
        "-Wl,--no-as-needed",
        *(link or []),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return path


CUDART = r"""
const char *cudaGetErrorString(int e) { return e == 100 ? "no CUDA-capable device is detected" : "no error"; }
int cudaGetDeviceCount(int *n) { *n = COUNT; return ERR; }
"""


@pytest.fixture
def stubs(tmp_path):
    """A fake onnxruntime-gpu whose provider needs libcublasLt.so.13 and libcuda.so.1, and stub
    CUDA libraries that can be put on the library path one by one."""
    link = tmp_path / "link"
    link.mkdir()
    for name in ("libcublasLt.so.13", "libcuda.so.1"):
        compile_lib(link / name, name)
    ort_dir = fake_ort(tmp_path)
    compile_lib(
        ort_dir / "capi" / gpu.PROVIDER, gpu.PROVIDER, link=[f"-L{link}", "-l:libcublasLt.so.13", "-l:libcuda.so.1"]
    )
    return tmp_path, ort_dir, link


def reason_in_child(ort_dir: Path, lib_dirs: list[Path], probe_device: bool = False) -> str | None:
    """cuda_unavailable_reason() in a fresh process: what one dlopen loads stays loaded."""
    code = (
        "import json, sys; from pathlib import Path; from service.gpu import cuda_unavailable_reason; "
        "print(json.dumps(cuda_unavailable_reason(Path(sys.argv[1]), probe_device=sys.argv[2] == '1')))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "LD_LIBRARY_PATH": ":".join(map(str, lib_dirs))}
    out = subprocess.run(
        [sys.executable, "-c", code, str(ort_dir), "1" if probe_device else "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@needs_cc
def test_a_cuda_library_that_is_not_installed_is_named(stubs):
    _, ort_dir, _ = stubs
    reason = reason_in_child(ort_dir, [])
    assert reason.startswith("CUDA provider cannot load: libcublasLt.so.13: cannot open shared object file")
    assert "not installed" in reason and "CUDA 13" in reason


@needs_cc
def test_a_cuda_library_installed_but_off_the_library_path_says_where_it_is(stubs):
    root, ort_dir, link = stubs
    wheel_lib = root / "site" / "nvidia" / "cu13" / "lib"
    wheel_lib.mkdir(parents=True)
    shutil.copy(link / "libcublasLt.so.13", wheel_lib)
    reason = reason_in_child(ort_dir, [])
    assert "libcublasLt.so.13: cannot open shared object file" in reason
    assert f"installed at {wheel_lib / 'libcublasLt.so.13'} but not on the library path" in reason
    assert "LD_LIBRARY_PATH" in reason


@needs_cc
def test_only_the_driver_missing_is_named_as_the_driver(stubs, tmp_path):
    _, ort_dir, link = stubs
    cuda_libs = tmp_path / "cuda"
    cuda_libs.mkdir()
    shutil.copy(link / "libcublasLt.so.13", cuda_libs)
    reason = reason_in_child(ort_dir, [cuda_libs])
    assert reason.startswith("CUDA provider cannot load: libcuda.so.1: cannot open shared object file")
    assert "NVIDIA driver" in reason


@needs_cc
def test_cudnn_device_count_and_success(stubs, tmp_path):
    _, ort_dir, link = stubs
    libs = tmp_path / "cuda"
    libs.mkdir()
    for name in ("libcublasLt.so.13", "libcuda.so.1"):
        shutil.copy(link / name, libs)
    reason = reason_in_child(ort_dir, [libs])  # the provider loads; cuDNN is dlopened on its own
    assert reason.startswith("cuDNN cannot load: libcudnn.so.9: cannot open shared object file"), reason
    compile_lib(libs / "libcudnn.so.9", "libcudnn.so.9")
    assert reason_in_child(ort_dir, [libs]) is None  # no device probe: every library loads
    compile_lib(libs / "libcudart.so.13", "libcudart.so.13", CUDART.replace("COUNT", "0").replace("ERR", "100"))
    reason = reason_in_child(ort_dir, [libs], probe_device=True)
    assert reason == (
        "CUDA libraries load, but cudaGetDeviceCount failed: no CUDA-capable device is detected (error 100)"
    )
    compile_lib(libs / "libcudart.so.13", "libcudart.so.13", CUDART.replace("COUNT", "0").replace("ERR", "0"))
    assert reason_in_child(ort_dir, [libs], probe_device=True).startswith("CUDA libraries load, but no CUDA device")
    compile_lib(libs / "libcudart.so.13", "libcudart.so.13", CUDART.replace("COUNT", "1").replace("ERR", "0"))
    assert reason_in_child(ort_dir, [libs], probe_device=True) is None


# ------------------------------------------------------------------ the GPU image's package set


def test_gpu_check_reads_the_bentofiles_as_pyyaml_does():
    gc = load_gpu_check()
    assert gc.load_yaml(BENTOFILE.read_text()) == yaml.safe_load(BENTOFILE.read_text())
    text = "a:\n  - x: 1\n    y: 'q # not a comment'\n  -\n    - 2\nb: \"3.11\"  # comment\nc:\n- d\n"
    assert gc.load_yaml(text) == yaml.safe_load(text)
    with pytest.raises(ValueError):
        gc.load_yaml("a: {flow: style}\n")


def test_the_gpu_image_has_one_pinned_cuda_source_the_check_can_map():
    gc = load_gpu_check()
    bento = gc.read_bentofile(BENTOFILE)
    assert not bento["docker"].get("cuda_version"), "CUDA comes from the nvidia wheels only (docs/gpu.md)"
    pins = {}
    for req in bento["packages"]:
        name = re.split(r"[\[=<>~!; ]", req, maxsplit=1)[0]
        if name.startswith(("onnxruntime", "nvidia-")):
            assert re.fullmatch(rf"{re.escape(name)}==[\w.]+", req), f"{req} must be pinned exactly"
            pins[name] = req.split("==")[1]
    assert pins["onnxruntime-gpu"] == "1.31.1" and "onnxruntime" not in pins
    assert {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-curand", "nvidia-cudnn-cu13"} <= set(pins)
    assert pins["nvidia-cuda-runtime"].startswith("13.") and pins["nvidia-cudnn-cu13"].startswith("9.")
    site = gc.IMAGE_SITE.format(version=bento["python_version"])
    dirs = bento["envs"]["LD_LIBRARY_PATH"].split(":")
    assert dirs == [f"{site}/nvidia/cu13/lib", f"{site}/nvidia/cudnn/lib"]
    assert "compute" in bento["envs"]["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    assert bento["envs"]["DEEPSERVE_DEVICE"] == "cuda"


def test_the_gpu_deployment_keeps_the_image_library_path():
    dep = yaml.safe_load((REPO / "deploy" / "k8s" / "deployment-gpu.yaml").read_text())
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "LD_LIBRARY_PATH" not in env  # the image's points at its wheels
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")


def test_gpu_check_names_distributions_as_pins_do():
    """A bentofile pin (`prometheus-client==…`) must find its distribution whatever spelling
    the distribution's metadata uses (`prometheus_client`): PEP 503 names on both sides."""
    import sys
    from importlib.metadata import version

    gc = load_gpu_check()
    facts = gc.venv_facts(Path(sys.prefix))
    assert facts["dists"]["prometheus-client"]["version"] == version("prometheus_client")
    assert all(name == name.lower() and "_" not in name and "." not in name for name in facts["dists"])
