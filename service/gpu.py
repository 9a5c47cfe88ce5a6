"""Why ONNX Runtime's CUDA provider is not usable here, in one line (docs/gpu.md).

ONNX Runtime falls back from CUDA to the CPU with one log line when a CUDA or cuDNN library
does not load. `cuda_unavailable_reason()` finds out which one, the way the process itself
would: it dlopens the CUDA provider library shipped inside the installed onnxruntime package
(after its `libonnxruntime_providers_shared.so`, which defines the `Provider_GetHost` the
provider needs), with the process's own library path (`LD_LIBRARY_PATH`, which the GPU image
sets to its nvidia wheels' lib folders, plus whatever `onnxruntime.preload_dlls()` already
loaded). It does not preload anything itself, so it reports what ONNX Runtime saw.

Standard library only, and nothing is imported from onnxruntime: it must work when
onnxruntime is the CPU build, and it must not initialise CUDA in the server process (CUDA
does not survive a fork) - the device probe runs in a short-lived child process.
"""

from __future__ import annotations

import ast
import ctypes
import glob
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

PROVIDER = "libonnxruntime_providers_cuda.so"
SHARED = "libonnxruntime_providers_shared.so"
DRIVER = "libcuda.so.1"  # from the NVIDIA driver: only a GPU node (or container with the GPU) has it
CUDNN = "libcudnn.so.9"  # cuDNN 9: the name onnxruntime.preload_dlls() loads (nvidia-cudnn-cu13)

# cudaGetDeviceCount in a child process: cuInit must not run in the server process.
_DEVICE_PROBE = """
import ctypes, sys
rt = ctypes.CDLL(sys.argv[1])
rt.cudaGetErrorString.restype = ctypes.c_char_p
n = ctypes.c_int(0)
err = rt.cudaGetDeviceCount(ctypes.byref(n))
print(err, n.value, rt.cudaGetErrorString(err).decode())
"""


def onnxruntime_dir() -> Path | None:
    """The installed onnxruntime package's folder, found without importing it."""
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def build_info(ort_dir: Path) -> dict[str, str]:
    """package_name, __version__ and cuda_version from onnxruntime/capi/build_and_package_info.py
    (the CUDA version the wheel was built against; absent in the CPU build's file)."""
    path = ort_dir / "capi" / "build_and_package_info.py"
    info: dict[str, str] = {}
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return info
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    info[target.id] = node.value.value
    return info


def _installed_copy(library: str, ort_dir: Path) -> str | None:
    """Where the nvidia-* wheels put `library`, if they are installed beside onnxruntime."""
    hits = sorted(glob.glob(str(ort_dir.parent / "nvidia" / "*" / "lib" / library)))
    return hits[0] if hits else None


def explain_load_error(error: str, ort_dir: Path, cuda_major: str) -> str:
    """One line from a dlopen error: the library that failed and what to do about it."""
    error = " ".join(error.split())
    missing = error.split(":", 1)[0].strip() if "cannot open shared object file" in error else ""
    missing = os.path.basename(missing)
    if missing == DRIVER:
        hint = (
            "the NVIDIA driver's library: no GPU on this host, or the container was started "
            "without it (--gpus / the nvidia.com/gpu resource, NVIDIA_DRIVER_CAPABILITIES=compute)"
        )
    elif missing and missing not in (PROVIDER, SHARED):
        copy = _installed_copy(missing, ort_dir)
        if copy:
            hint = (
                f"installed at {copy} but not on the library path: set LD_LIBRARY_PATH as "
                "deploy/bentofile-gpu.yaml does, or call onnxruntime.preload_dlls() first"
            )
        else:
            hint = (
                f"not installed: install the CUDA {cuda_major or '?'} and cuDNN wheels "
                "pinned in deploy/bentofile-gpu.yaml"
            )
    else:
        hint = "the onnxruntime-gpu installation is broken; reinstall it"
    return f"CUDA provider cannot load: {error} ({hint})"


def _loaded_path(soname: str) -> str | None:
    """The file this process mapped for `soname` (e.g. after preload_dlls by absolute path)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path) == soname:
                    return path
    except OSError:
        pass
    return None


def _probe_device(cudart: str, timeout: float) -> str | None:
    try:
        out = subprocess.run(
            [sys.executable, "-c", _DEVICE_PROBE, cudart], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"CUDA libraries load, but the device probe failed: {exc}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return f"CUDA libraries load, but the device probe failed: {last}"
    err, count, text = (out.stdout.split(maxsplit=2) + ["", "", ""])[:3]
    if err != "0":
        return f"CUDA libraries load, but cudaGetDeviceCount failed: {text.strip()} (error {err})"
    if count == "0":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "CUDA libraries load, but no CUDA device is visible" + (
            f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        )
    return None


def cuda_unavailable_reason(
    ort_dir: Path | None = None, probe_device: bool = True, timeout: float = 60.0
) -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run here, in one human line naming the library
    that failed, e.g. "CUDA provider cannot load: libcublasLt.so.13: cannot open shared object
    file: No such file or directory (...)". None when every library loads and a CUDA device
    is visible (then the reason is in ONNX Runtime's own log).

    ort_dir: the onnxruntime package folder (default: the installed one; for tests).
    probe_device: also ask the CUDA runtime for a device, in a child process.
    """
    if not sys.platform.startswith("linux"):
        return f"the CUDA provider check supports Linux only (this is {sys.platform})"
    ort_dir = ort_dir or onnxruntime_dir()
    if ort_dir is None:
        return "onnxruntime is not installed"
    capi = ort_dir / "capi"
    info = build_info(ort_dir)
    provider = capi / PROVIDER
    if not provider.is_file():
        name = info.get("package_name", "onnxruntime")
        return f"{name} (CPU build) has no CUDA provider; install onnxruntime-gpu"
    major = info.get("cuda_version", "").split(".")[0]
    try:
        if (capi / SHARED).is_file():
            ctypes.CDLL(str(capi / SHARED), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(provider))
    except OSError as exc:
        return explain_load_error(str(exc), ort_dir, major)
    # cuDNN is not a DT_NEEDED of the provider: it is dlopened when a session needs it
    try:
        ctypes.CDLL(CUDNN)
    except OSError as exc:
        return explain_load_error(str(exc), ort_dir, major).replace("CUDA provider", "cuDNN", 1)
    if probe_device and major:
        cudart = f"libcudart.so.{major}"
        return _probe_device(_loaded_path(cudart) or cudart, timeout)
    return None


if __name__ == "__main__":  # python -m service.gpu: the reason, or "CUDA is usable"
    print(cuda_unavailable_reason() or "CUDA is usable: every library loads and a device is visible")
