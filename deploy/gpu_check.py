#!/usr/bin/env python3
"""make gpu-check: install the GPU image's Python packages into a scratch venv and prove that
ONNX Runtime's CUDA provider resolves every shared library it needs except the NVIDIA driver's
libcuda.so.1 (which only a GPU node has). docs/gpu.md says what this proves and what it cannot.

Standard library only (runs with any python3 >= 3.9; the scratch venv gets its own python).

Steps:
  1. read deploy/bentofile-gpu.yaml (python.packages, docker.python_version, envs) by hand;
  2. create or reuse the scratch venv (--venv, default .venv-gpu-check) and pip-install exactly
     those packages (several GB: disk space is checked first);
  3. read what the installed onnxruntime-gpu was built for: capi/build_and_package_info.py
     (cuda_version), its METADATA (the [cuda] and [cudnn] extras) and onnxruntime's own
     preload_dlls() list (onnxruntime/__init__.py: _get_nvidia_dll_paths);
  4. resolve capi/libonnxruntime_providers_cuda.so's DT_NEEDED entries, recursively, plus the
     libraries it dlopens at run time (cuDNN and its parts, cuFFT, NVRTC), the way the dynamic
     loader would in the image: DT_RPATH/DT_RUNPATH with $ORIGIN, then the image's
     LD_LIBRARY_PATH (from the bentofile, mapped onto the scratch venv), then the system;
  5. cross-check with ldd (the real loader in trace mode), then dlopen the provider for real
     (service.gpu.cuda_unavailable_reason) and open a model with the CUDA provider requested:
     on a host without a GPU the only failure allowed is libcuda.so.1.

Exit status: 0 all resolved, 1 a check failed (every problem is named), 2 could not run.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DRIVER = "libcuda.so.1"
PROVIDER = "libonnxruntime_providers_cuda.so"
SHARED = "libonnxruntime_providers_shared.so"
# Where BentoML 1.4's Dockerfile template (base.j2: `uv venv /app/.venv`) installs packages.
IMAGE_SITE = "/app/.venv/lib/python{version}/site-packages"
# What a Debian-based image has without any CUDA: glibc, libgcc and libstdc++.
PLAIN_SYSTEM = re.compile(r"^(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|ld-linux-x86-64|libz)\.so")
CUDA_NAMES = re.compile(r"^lib(cu|nv|cudnn)")
MIN_FREE_GB = 8
STAMP = ".gpu-check-packages"


class CheckError(Exception):
    """The check could not run (exit status 2)."""


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- a tiny YAML subset reader


def _scalar(text: str):
    text = text.strip()
    if not text:
        return None
    if text[0] in "\"'":
        if len(text) < 2 or text[-1] != text[0]:
            raise ValueError(f"unterminated quoted string: {text}")
        body = text[1:-1]
        return body.replace("''", "'") if text[0] == "'" else bytes(body, "utf-8").decode("unicode_escape")
    if text[0] in "[{|>&*!":
        raise ValueError(f"unsupported YAML (flow/block scalar/anchor): {text}")
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "~"):
        return None
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", text):
        return float(text)
    return text


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'" and (i == 0 or line[i - 1] in " :-[{,"):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _split_key(content: str) -> tuple[str, str] | None:
    """'key: value' or 'key:' -> (key, value); None when content is not a mapping entry."""
    if content[0] in "\"'":
        end = content.find(content[0], 1)
        if end > 0 and content[end + 1 : end + 2] == ":" and content[end + 2 : end + 3] in ("", " "):
            return content[1:end], content[end + 2 :]
        return None
    m = re.match(r"([^:#]+?):(?:\s+(.*))?$", content)
    return (m.group(1).strip(), m.group(2) or "") if m else None


def load_yaml(text: str):
    """Block-style YAML (mappings, sequences, plain and quoted scalars), as yaml.safe_load
    reads it; anything else (flow style, block scalars, anchors) raises ValueError."""
    lines = []
    for raw in text.splitlines():
        if raw.strip() in ("---", "..."):
            continue
        line = _strip_comment(raw)
        if line.strip():
            if "\t" in line[: len(line) - len(line.lstrip())]:
                raise ValueError(f"tab indentation: {raw!r}")
            lines.append([len(line) - len(line.lstrip()), line.strip()])

    def block(i: int, indent: int):
        if lines[i][1].startswith("- ") or lines[i][1] == "-":
            out = []
            while i < len(lines) and lines[i][0] == indent and (lines[i][1].startswith("- ") or lines[i][1] == "-"):
                item = lines[i][1][1:].lstrip()
                if not item:
                    if i + 1 < len(lines) and lines[i + 1][0] > indent:
                        value, i = block(i + 1, lines[i + 1][0])
                    else:
                        value, i = None, i + 1
                elif item.startswith("- ") or _split_key(item):
                    lines[i] = [indent + len(lines[i][1]) - len(item), item]
                    value, i = block(i, lines[i][0])
                else:
                    value, i = _scalar(item), i + 1
                out.append(value)
            return out, i
        out = {}
        while i < len(lines) and lines[i][0] == indent:
            kv = _split_key(lines[i][1])
            if kv is None:
                raise ValueError(f"expected 'key: value', got {lines[i][1]!r}")
            key, rest = kv
            if rest.strip():
                out[key], i = _scalar(rest), i + 1
            elif i + 1 < len(lines) and (
                lines[i + 1][0] > indent or (lines[i + 1][0] == indent and lines[i + 1][1].startswith("-"))
            ):
                out[key], i = block(i + 1, lines[i + 1][0])
            else:
                out[key], i = None, i + 1
        return out, i

    if not lines:
        return None
    value, end = block(0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"unexpected indentation at {lines[end][1]!r}")
    return value


def read_bentofile(path: Path) -> dict:
    doc = load_yaml(path.read_text())
    packages = (doc.get("python") or {}).get("packages") or []
    if not packages:
        raise CheckError(f"{path}: no python.packages")
    docker = doc.get("docker") or {}
    envs = {e["name"]: str(e.get("value", "")) for e in doc.get("envs") or []}
    return {
        "packages": [str(p) for p in packages],
        "docker": docker,
        "envs": envs,
        "python_version": str(docker.get("python_version", "3.11")),
    }


# ---------------------------------------------------------------- ELF: DT_NEEDED and friends


class Elf:
    """DT_NEEDED, DT_SONAME, DT_RPATH and DT_RUNPATH of a 64-bit little-endian ELF, read with
    a few seeks (the CUDA provider is ~280 MB)."""

    def __init__(self, path: str):
        self.path = path
        self.needed: list[str] = []
        self.soname = self.rpath = self.runpath = None
        with open(path, "rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF":
                raise ValueError(f"{path}: not an ELF file")
            if ident[4] != 2 or ident[5] != 1:
                raise ValueError(f"{path}: not a 64-bit little-endian ELF")
            self.machine = struct.unpack_from("<H", ident, 18)[0]
            (phoff,) = struct.unpack_from("<Q", ident, 32)
            phentsize, phnum = struct.unpack_from("<HH", ident, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            loads, dynamic = [], None
            for k in range(phnum):
                p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", table, k * phentsize)
                if p_type == 1:
                    loads.append((p_vaddr, p_offset, p_filesz))
                elif p_type == 2:
                    dynamic = (p_offset, p_filesz)
            if dynamic is None:
                return
            f.seek(dynamic[0])
            raw = f.read(dynamic[1])
            entries = [struct.unpack_from("<qQ", raw, k) for k in range(0, len(raw) - 15, 16)]
            strtab = next((v for t, v in entries if t == 5), None)
            if strtab is None:
                return
            base = next((off + strtab - va for va, off, size in loads if va <= strtab < va + size), None)

            def string(offset: int) -> str:
                f.seek(base + offset)
                data = f.read(4096)
                return data[: data.index(b"\0")].decode()

            for tag, val in entries:
                if tag == 0:
                    break
                if tag == 1:
                    self.needed.append(string(val))
                elif tag == 14:
                    self.soname = string(val)
                elif tag == 15:
                    self.rpath = string(val)
                elif tag == 29:
                    self.runpath = string(val)


def _expand(paths: str | None, origin: str) -> list[str]:
    if not paths:
        return []
    return [p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for p in paths.split(":") if p]


def system_cache() -> dict[str, str]:
    """ld.so.cache, as `ldconfig -p` prints it (x86-64 entries)."""
    for exe in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        cache = {}
        for line in out.splitlines():
            m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
            if m and "x86-64" in m.group(2):
                cache.setdefault(m.group(1), m.group(3))
        return cache
    return {}


DEFAULT_DIRS = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"]


class Resolver:
    """The dynamic loader's search, for one process: a name already loaded is reused, else
    DT_RPATH (requester and its loaders, when the requester has no DT_RUNPATH), LD_LIBRARY_PATH,
    the requester's DT_RUNPATH, ld.so.cache, the default folders."""

    def __init__(self, ld_library_path: list[str]):
        self.ld_library_path = ld_library_path
        self.cache = system_cache()
        self.loaded: dict[str, str | None] = {}  # name -> path (None: missing)
        self.how: dict[str, str] = {}  # name -> which search step found it
        self.needed_by: dict[str, str] = {}
        self.elves: dict[str, Elf] = {}

    def elf(self, path: str) -> Elf:
        path = os.path.realpath(path)
        if path not in self.elves:
            self.elves[path] = Elf(path)
        return self.elves[path]

    def _candidates(self, name: str, chain: list[Elf]):
        req = chain[-1] if chain else None
        if req is not None and not req.runpath:
            for obj in reversed(chain):
                if obj.runpath:
                    break
                for d in _expand(obj.rpath, os.path.dirname(obj.path)):
                    yield d, "DT_RPATH"
        for d in self.ld_library_path:
            yield d, "LD_LIBRARY_PATH"
        if req is not None:
            for d in _expand(req.runpath, os.path.dirname(req.path)):
                yield d, "DT_RUNPATH"
        if name in self.cache:
            yield os.path.dirname(self.cache[name]), "ld.so.cache"
        for d in DEFAULT_DIRS:
            yield d, "default folder"

    def find(self, name: str, chain: list[Elf]) -> str | None:
        if name in self.loaded:
            return self.loaded[name]
        machine = chain[0].machine if chain else None
        path = None
        for d, how in self._candidates(name, chain):
            cand = os.path.join(d, name)
            if os.path.isfile(cand):
                try:
                    if machine is not None and self.elf(cand).machine != machine:
                        continue
                except ValueError:
                    continue
                path, self.how[name] = cand, how
                break
        self.loaded[name] = path
        return path

    def walk(self, name: str, chain: list[Elf], parent: str) -> None:
        """Resolve `name` as `chain[-1]` would load it, then everything it needs."""
        if name in self.loaded:
            return
        self.needed_by.setdefault(name, parent)
        path = self.find(name, chain)
        if path is None:
            return
        obj = self.elf(path)
        for dep in obj.needed:
            self.walk(dep, chain + [obj], os.path.basename(path))


# ---------------------------------------------------------------- the scratch venv


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def find_python(version: str) -> str:
    """A python of the image's version (python3.11 for "3.11"), else this one."""
    if "{}.{}".format(*sys.version_info[:2]) == version:
        return sys.executable
    exe = shutil.which(f"python{version}")
    if exe:
        return exe
    say(
        f"warning: no python{version} here; the scratch venv uses python "
        f"{sys.version_info[0]}.{sys.version_info[1]} (the image uses {version})"
    )
    return sys.executable


def du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def install(venv: Path, packages: list[str], python_version: str, fresh: bool) -> float:
    """Create or reuse the venv; install exactly `packages`. Returns seconds spent installing."""
    stamp = venv / STAMP
    wanted = "\n".join(packages) + "\n"
    if fresh and venv.exists():
        say(f"--fresh: removing {venv}")
        shutil.rmtree(venv)
    if venv_python(venv).exists() and stamp.is_file() and stamp.read_text() == wanted:
        say(f"reusing {venv}: it holds exactly the bentofile's packages (--fresh to reinstall)")
        return 0.0
    parent = venv if venv.exists() else venv.parent
    free = shutil.disk_usage(parent).free / 2**30
    say(f"free disk at {parent.resolve()}: {free:.1f} GiB (need ~{MIN_FREE_GB} GiB: the CUDA, cuBLAS and cuDNN wheels)")
    if free < MIN_FREE_GB:
        raise CheckError(f"only {free:.1f} GiB free at {parent.resolve()}; the GPU packages need ~{MIN_FREE_GB} GiB")
    start = time.monotonic()
    if not venv_python(venv).exists():
        python = find_python(python_version)
        say(f"creating {venv} with {python}")
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    stamp.unlink(missing_ok=True)
    say(
        f"installing the GPU image's {len(packages)} packages (the large downloads: onnxruntime-gpu, "
        "nvidia-cublas, nvidia-cudnn-cu13; pip shows each as it goes):"
    )
    for p in packages:
        say(f"    {p}")
    cmd = [str(venv_python(venv)), "-m", "pip", "install", "--progress-bar", "on", *packages]
    out = subprocess.run(cmd)
    if out.returncode != 0:
        raise CheckError(f"pip install failed (exit {out.returncode}): {' '.join(cmd)}")
    seconds = time.monotonic() - start
    stamp.write_text(wanted)
    say(f"installed in {seconds:.0f} s; {venv} is {du(venv) / 2**30:.2f} GiB")
    return seconds


def venv_facts(venv: Path) -> dict:
    """Asked of the venv's own python: site-packages, distributions, onnxruntime's preload list."""
    code = r"""
import json, re, sys, sysconfig
from importlib.metadata import distributions
site = sysconfig.get_paths()["purelib"]
dists = {}
for d in distributions():
    files = [str(f) for f in (d.files or [])]
    name = re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower()  # PEP 503, as the pins are read
    dists[name] = {"version": d.version, "files": files,
                                         "requires": d.metadata.get_all("Requires-Dist") or []}
out = {"site": site, "python": "%d.%d" % sys.version_info[:2], "dists": dists}
try:
    import onnxruntime as ort
    out["ort"] = {"version": ort.__version__, "providers": ort.get_available_providers(),
                  "build": ort.get_build_info()}
    out["preload"] = [list(p) for p in ort._get_nvidia_dll_paths(False, True, True)]
    out["preload_optional"] = [list(p)[-1] for p in ort._get_nvidia_dll_paths(False, False, True)] + [
        p[-1] for p in ort._get_nvidia_dll_paths(False, True, False) if "cufft" in p[-1] or "nvrtc" in p[-1]]
except Exception as exc:
    out["ort_error"] = repr(exc)
print(json.dumps(out))
"""
    out = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise CheckError(f"cannot inspect {venv}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


def check_extras(facts: dict, problems: list[str]) -> list[str]:
    """onnxruntime-gpu's [cuda] and [cudnn] requirements must be installed, in range."""
    code = r"""
import json, sys
from importlib.metadata import version, PackageNotFoundError
from packaging.requirements import Requirement
rows = []
for line in json.loads(sys.argv[1]):
    req = Requirement(line)
    extra = [e for e in ("cuda", "cudnn") if req.marker and req.marker.evaluate({"extra": e})]
    if not extra:
        continue
    try:
        got = version(req.name)
    except PackageNotFoundError:
        got = None
    ok = got is not None and req.specifier.contains(got, prereleases=True)
    rows.append([extra[0], req.name, str(req.specifier), got, ok])
print(json.dumps(rows))
"""
    reqs = facts["dists"]["onnxruntime-gpu"]["requires"]
    venv_py = facts["_python"]
    out = subprocess.run([venv_py, "-c", code, json.dumps(reqs)], capture_output=True, text=True)
    if out.returncode != 0:
        problems.append(f"cannot read onnxruntime-gpu's extras: {out.stderr.strip()[-500:]}")
        return []
    rows = json.loads(out.stdout)
    lines = []
    for extra, name, spec, got, ok in rows:
        lines.append(f"    [{extra}] {name}{spec}: installed {got or 'NOTHING'} {'ok' if ok else '<- WRONG'}")
        if not ok:
            problems.append(f"onnxruntime-gpu[{extra}] requires {name}{spec}; installed: {got or 'nothing'}")
    return lines


# ---------------------------------------------------------------- the check


def image_ld_library_path(bento: dict, site: str, problems: list[str]) -> tuple[str, list[str]]:
    """The bentofile's LD_LIBRARY_PATH, and the same folders in the scratch venv."""
    value = bento["envs"].get("LD_LIBRARY_PATH", "")
    image_site = IMAGE_SITE.format(version=bento["python_version"])
    mapped = []
    for d in [d for d in value.split(":") if d]:
        if not d.startswith(image_site + "/"):
            problems.append(f"bentofile LD_LIBRARY_PATH entry {d} is not in the image's site-packages {image_site}")
            continue
        local = site + d[len(image_site) :]
        if not os.path.isdir(local):
            problems.append(f"bentofile LD_LIBRARY_PATH entry {d} does not exist in the installed packages ({local})")
        mapped.append(local)
    return value, mapped


def source_of(path: str | None, owners: dict[str, str], site: str) -> str:
    if path is None:
        return "MISSING"
    real = os.path.realpath(path)
    if real in owners:
        return owners[real]
    if real.startswith(os.path.realpath(site) + os.sep):
        return "site-packages (no wheel owns it)"
    return "system"


def ldd(path: str, env: dict) -> dict[str, str | None] | None:
    try:
        out = subprocess.run(["ldd", path], capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (not found|(\S+) \(0x[0-9a-f]+\))", line)
        if m:
            found[m.group(1)] = None if m.group(2) == "not found" else m.group(3)
    return found


def live_check(venv: Path, env: dict, site: str, problems: list[str]) -> None:
    """dlopen the provider for real, and open one model asking for CUDA."""
    models = sorted((REPO / "exported").rglob("*.onnx"))
    code = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from service.gpu import cuda_unavailable_reason
out = {"reason": cuda_unavailable_reason()}
if len(sys.argv) > 2:
    import onnxruntime as ort
    s = ort.InferenceSession(sys.argv[2], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    out["session"] = s.get_providers()
print("GPU-CHECK-RESULT " + json.dumps(out))
"""
    args = [str(venv_python(venv)), "-c", code, str(REPO)] + ([str(models[0])] if models else [])
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("GPU-CHECK-RESULT ")), None)
    if out.returncode != 0 or line is None:
        problems.append(f"the live check failed: {(out.stderr or out.stdout).strip()[-1500:]}")
        return
    result = json.loads(line.split(" ", 1)[1])
    reason = result["reason"]
    say(f"  service.gpu.cuda_unavailable_reason(): {reason}")
    ort_errors = []
    for x in out.stderr.splitlines():
        x = re.sub(r"\x1b\[[0-9;]*m", "", x)
        if "Failed to load library" in x:
            ort_errors.append(x[x.index("Failed to load library") :].replace(site, "<site-packages>").strip())
    if models:
        say(f"  InferenceSession({models[0].relative_to(REPO)}, providers=[CUDA, CPU]) ran on: {result['session']}")
        for x in ort_errors[:3]:
            say(f"  onnxruntime's log: {x}")
    if reason is None:
        if models and result["session"][0] != "CUDAExecutionProvider":
            problems.append("every CUDA library loads and a device is visible, yet the session did not run on CUDA")
        else:
            say("  this host has a GPU: the CUDA provider loads and runs")
    elif DRIVER not in reason:
        problems.append(f"the CUDA provider does not load for a reason other than the driver: {reason}")
    elif "cannot open shared object file" not in reason:
        problems.append(f"unexpected failure mentioning the driver: {reason}")
    if models and reason and result["session"][0] != "CPUExecutionProvider":
        problems.append(f"unexpected providers {result['session']}")


def check(venv: Path, bento: dict, bentofile: Path) -> int:
    problems: list[str] = []
    facts = venv_facts(venv)
    facts["_python"] = str(venv_python(venv))
    site = facts["site"]
    say(f"\nscratch venv: {venv} (python {facts['python']}; the image: python {bento['python_version']})")
    if facts["python"] != bento["python_version"]:  # the libraries are the same; the wheel tag differs
        say(f"warning: scratch venv python {facts['python']} != image python {bento['python_version']}")

    # -- one onnxruntime, the GPU build
    ort_dists = sorted(n for n in facts["dists"] if n == "onnxruntime" or n.startswith("onnxruntime-"))
    if ort_dists != ["onnxruntime-gpu"]:
        problems.append(f"onnxruntime distributions installed: {ort_dists}; the image must have onnxruntime-gpu only")
    if "onnxruntime-gpu" not in facts["dists"] or "ort" not in facts:
        for p in problems + [facts.get("ort_error", "onnxruntime-gpu is not installed")]:
            say(f"  - {p}")
        say("gpu-check: FAILED")
        return 1
    # -- the venv holds exactly the bentofile's pins
    for req in bento["packages"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^,;\s]+)", req.strip())
        if m:
            name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            got = facts["dists"].get(name, {}).get("version")
            if got != m.group(3):
                problems.append(f"{bentofile.name} pins {req}; the scratch venv has {got or 'nothing'} (--fresh)")
        elif re.match(r"(onnxruntime|nvidia-)", req):
            problems.append(f"{bentofile.name}: {req} is not pinned with ==; the image could get another CUDA set")
    ort_dir = Path(site) / "onnxruntime"
    info = {}
    for node in ast.parse((ort_dir / "capi" / "build_and_package_info.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            info[node.targets[0].id] = node.value.value
    cuda_major = str(info.get("cuda_version", "")).split(".")[0]
    say(
        f"onnxruntime: {info.get('package_name')} {info.get('__version__')}, "
        f"cuda_version = {info.get('cuda_version')!r} (onnxruntime/capi/build_and_package_info.py)"
    )
    say(f"  build: {facts['ort']['build']}")
    say(f"  available providers: {', '.join(facts['ort']['providers'])}")
    if not cuda_major:
        problems.append("build_and_package_info.py has no cuda_version: not a CUDA build")
    if "CUDAExecutionProvider" not in facts["ort"]["providers"]:
        problems.append("CUDAExecutionProvider is not among onnxruntime's available providers")
    say("onnxruntime-gpu's own extras (METADATA Requires-Dist), against what is installed:")
    for line in check_extras(facts, problems):
        say(line)
    preload = [p[-1] for p in facts.get("preload", [])]
    say(f"onnxruntime.preload_dlls() would load (onnxruntime/__init__.py _get_nvidia_dll_paths): {', '.join(preload)}")
    cudnn_major = next((p.rsplit(".", 1)[-1] for p in preload if p.startswith("libcudnn.so.")), "")

    # -- one CUDA source: the wheels
    if bento["docker"].get("cuda_version"):
        problems.append(
            f"{bentofile.name} sets docker.cuda_version={bento['docker']['cuda_version']}: a second CUDA "
            "(the base image's) beside the nvidia wheels; remove it"
        )
    if "compute" not in bento["envs"].get("NVIDIA_DRIVER_CAPABILITIES", ""):
        problems.append(
            f"{bentofile.name} does not set NVIDIA_DRIVER_CAPABILITIES to include compute: on an image "
            "not based on nvidia/cuda the container runtime then mounts no libcuda.so.1"
        )
    ld_value, ld_dirs = image_ld_library_path(bento, site, problems)
    say(f"image LD_LIBRARY_PATH ({bentofile.name}): {ld_value or '(unset)'}")
    if not ld_value:
        problems.append(
            f"{bentofile.name} sets no LD_LIBRARY_PATH: the provider (no RUNPATH) cannot find "
            "the nvidia wheels' libraries"
        )

    # -- resolve, the loader's way
    owners = {}
    for name, d in facts["dists"].items():
        for f in d["files"]:
            owners[os.path.realpath(os.path.join(site, f))] = f"wheel {name}=={d['version']}"
    res = Resolver(ld_dirs)
    provider = ort_dir / "capi" / PROVIDER
    if not provider.is_file():
        problems.append(f"{provider} is missing")
    else:
        root = res.elf(str(provider))
        res.loaded[PROVIDER] = str(provider)
        res.how[PROVIDER] = "onnxruntime loads it by path"
        res.needed_by[PROVIDER] = "onnxruntime"
        for dep in root.needed:
            res.walk(dep, [root], PROVIDER)
        # dlopened at run time: onnxruntime's preload list (cuDNN, cuFFT, NVRTC), then
        # cuDNN's own parts, which libcudnn.so.9 dlopens from the same search path
        for name in preload:
            res.walk(name, [root], f"{PROVIDER} (dlopen)")
        cudnn = res.loaded.get(f"libcudnn.so.{cudnn_major}") if cudnn_major else None
        if cudnn:
            obj = res.elf(cudnn)
            for part in sorted(os.listdir(os.path.dirname(cudnn))):
                if re.fullmatch(rf"libcudnn_\w+\.so\.{cudnn_major}", part):
                    res.walk(part, [root, obj], f"libcudnn.so.{cudnn_major} (dlopen)")

    say(f"\n{'library':<42} {'needed by':<40} resolved path  [source]")
    missing = []
    for name, path in res.loaded.items():
        src = source_of(path, owners, site)
        shown = path.replace(site, "<site-packages>") if path else "MISSING"
        say(f"{name:<42} {res.needed_by.get(name, ''):<40} {shown}  [{src}]")
        if path is None:
            missing.append(name)
        elif src == "system" and CUDA_NAMES.match(name) and name != DRIVER:
            problems.append(f"{name} resolved from this host's system ({path}); the image has no system CUDA")
        elif src == "system" and not PLAIN_SYSTEM.match(name) and name != DRIVER:
            problems.append(f"{name} comes from this host's system ({path}); is it in the image's base?")
    others = [m for m in missing if m != DRIVER]
    for m in others:
        problems.append(f"{m} (needed by {res.needed_by.get(m)}) is MISSING")

    # -- the real loader agrees
    env = {k: v for k, v in os.environ.items() if not k.startswith("LD_")}
    if ld_dirs:
        env["LD_LIBRARY_PATH"] = ":".join(ld_dirs)
    if shutil.which("ldd") and provider.is_file():
        disagree = []
        checked = 0
        for path in {p for p in res.loaded.values() if p and os.path.realpath(p).startswith(os.path.realpath(site))}:
            for name, got in (ldd(path, env) or {}).items():
                checked += 1
                if name not in res.loaded:
                    disagree.append(f"{os.path.basename(path)}: {name}: ldd {got}, not walked by gpu-check")
                    continue
                want = res.loaded[name]
                if (got and os.path.realpath(got)) != (want and os.path.realpath(want)):
                    disagree.append(f"{os.path.basename(path)}: {name}: ldd {got}, gpu-check {want}")
        say(
            f"\nldd (the real dynamic loader), with the image's LD_LIBRARY_PATH: {checked} lookups, "
            f"{len(disagree)} disagree"
        )
        problems += [f"ldd disagrees: {d}" for d in disagree]
    else:
        say("\nldd not found: the loader cross-check is skipped")

    say("\nlive: dlopen the provider and open a model asking for CUDA, with the image's LD_LIBRARY_PATH")
    live_check(venv, env, site, problems)

    resolved = [n for n, p in res.loaded.items() if p]
    wheels = sorted({source_of(p, owners, site) for p in res.loaded.values() if p} - {"system"})
    say("")
    say(
        f"onnxruntime-gpu {info.get('__version__')}: CUDA {cuda_major}, cuDNN {cudnn_major}; "
        f"{len(resolved)} libraries resolved, from {len(wheels)} wheels and the system; "
        f"missing: {', '.join(missing) or 'nothing'}"
        + (" (the NVIDIA driver: only a GPU node has it)" if missing == [DRIVER] else "")
    )
    if problems:
        say("gpu-check: FAILED")
        for p in problems:
            say(f"  - {p}")
        return 1
    say("gpu-check: OK - the CUDA provider resolves every library except the driver's libcuda.so.1")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=".venv-gpu-check", help="the scratch venv (created or reused)")
    ap.add_argument("--bentofile", default=str(REPO / "deploy" / "bentofile-gpu.yaml"))
    ap.add_argument("--fresh", action="store_true", help="remove the scratch venv first")
    ap.add_argument(
        "--print-packages",
        action="store_true",
        help="print the GPU image's packages, one per line (pip install -r <(...)), and exit",
    )
    ap.add_argument(
        "--print-ld-library-path",
        action="store_true",
        help="print the image's LD_LIBRARY_PATH mapped onto --venv, and exit",
    )
    args = ap.parse_args(argv)
    bentofile = Path(args.bentofile)
    venv = Path(args.venv)
    try:
        bento = read_bentofile(bentofile)
        if args.print_packages:
            print("\n".join(bento["packages"]))
            return 0
        if args.print_ld_library_path:
            if not venv_python(venv).exists():
                raise CheckError(f"{venv} is not a venv")
            problems: list[str] = []
            _, dirs = image_ld_library_path(bento, venv_facts(venv)["site"], problems)
            if problems:
                raise CheckError("; ".join(problems))
            print(":".join(dirs))
            return 0
        started = time.monotonic()
        install(venv, bento["packages"], bento["python_version"], args.fresh)
        status = check(venv, bento, bentofile)
        say(f"(gpu-check took {time.monotonic() - started:.0f} s; {venv} is {du(venv) / 2**30:.2f} GiB)")
        return status
    except (CheckError, ValueError, OSError, subprocess.CalledProcessError) as exc:
        say(f"gpu-check: could not run: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
