"""Batched inference on the chosen device, in one run (docs/gpu.md, "Device runbook").

    python3 -m deploy.gpu.verify --device cuda --out $OUT    on a GPU (make gpu-verify)
    python -m deploy.gpu.verify --device cpu --quick         here, in under 2 minutes
                                                             (make gpu-verify DEVICE=cpu)

1. Every active model (exported/manifest.json) on the device's provider and on the CPU:
   parity on its smoke set (max abs diff per output), then a batch-size sweep, rows/s and
   latency side by side.
2. The report so far goes to OUT/gpu-verify.json and .md, with the machine (GPU, driver,
   Python, numpy, Pillow, ONNX Runtime), BEFORE any server starts: a run cut off by its time
   limit still returns it. Both files are rewritten after every load point.
3. The real server (`python -m bentoml serve service.service:DeepServe`) on the device, with
   adaptive batching on, then off: /classify (image, text), /generate n=16 and /denoise at
   several concurrencies, driven by an asyncio load generator (aiohttp; bodies validated);
   req/s, p50/p99, and from /metrics the rows and requests per executed batch and where the
   time went (read, decode, queue, infer, encode).

With --device cuda, DEEPSERVE_DEVICE=cuda everywhere: no model may fall back to the CPU. The
packages come from /tmp/site when `python3 -m deploy.gpu.stage receive` unpacked them there;
the script puts them first on PYTHONPATH, finds the CUDA and cuDNN libraries of the nvidia-*
wheels already installed, and re-executes itself with both paths set (the dynamic loader reads
LD_LIBRARY_PATH once, at start).

Exit status: 0 when everything ran and passed, 1 with the problems listed in the report, 2 when
it could not run at all.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SITE = Path("/tmp/site")  # deploy.gpu.stage's DEVICE_SITE
STAMP = ".deepserve-stage.json"
REEXEC = (
    "GPU_VERIFY_PREPARED"  # not DEEPSERVE_*: the settings forbid unknown ones  # set once the environment is prepared
)
CUDA_LIBS = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcufft.so.12")
CUDA_LIBS += ("libnvrtc.so.13", "libcudnn.so.9")
ENDPOINTS = ("classify-image", "classify-text", "generate-16", "denoise")  # bench.harness.payloads names
STAGES = ("read", "decode", "queue", "infer", "encode", "total")
NVSMI_GPU = "name,driver_version,compute_cap,memory.total,memory.used,pci.bus_id"

# what a run measures; --quick is the CPU check here, the default the GPU run (the sweep's
# largest batch is 4096 rows: past DEEPSERVE_MAX_BATCH_ROWS's ceiling of 8192 / 2)
FULL = {
    "sweep": [1, 4, 16, 64, 256, 1024, 4096],
    "concurrency": [1, 8, 32, 128],
    "load_seconds": 4.0,
    "warmup_seconds": 1.0,
    "point_seconds": 0.25,
    "deadline_seconds": 420.0,
}
QUICK = {
    "sweep": [1, 8, 64],
    "concurrency": [1, 8],
    "load_seconds": 1.0,
    "warmup_seconds": 0.3,
    "point_seconds": 0.05,
    "deadline_seconds": 110.0,
}


def say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- environment


def nvidia_lib_dirs() -> dict[str, str]:
    """soname -> folder, for the CUDA and cuDNN libraries of the installed nvidia-* wheels
    (nvidia/cu13/lib, nvidia/cudnn/lib, ... in any site-packages on sys.path)."""
    found = {}
    for base in sys.path:
        for lib in CUDA_LIBS:
            if lib in found:
                continue
            hits = sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", lib)))
            hits += sorted(glob.glob(os.path.join(base, "nvidia", "*", "*", "lib", lib)))
            if hits:
                found[lib] = os.path.dirname(hits[0])
    return found


def prepared_env(device: str, site: Path | None) -> dict[str, str] | None:
    """The environment this run needs, or None when the current one already is it."""
    if os.environ.get(REEXEC):
        return None
    env = dict(os.environ)
    env[REEXEC] = "1"
    paths = [str(REPO)]
    if site is not None and (site / STAMP).is_file():
        paths.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if device == "cuda":
        dirs = list(dict.fromkeys(nvidia_lib_dirs().values()))
        for driver in ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu"):
            if os.path.exists(os.path.join(driver, "libcuda.so.1")):
                dirs.append(driver)
                break
        old = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(dirs + old))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def nvidia_smi() -> dict | None:
    """The GPU's name, driver, compute capability and memory (MiB), or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={NVSMI_GPU}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:300]}
    gpus = [dict(zip(NVSMI_GPU.split(","), (v.strip() for v in line.split(",")))) for line in out.stdout.splitlines()]
    head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", head)
    return {"gpus": gpus, "driver_cuda_version": cuda.group(1) if cuda else None}


def gpu_apps() -> list[dict]:
    """GPU memory per process (MiB), as nvidia-smi reports it."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    apps = []
    for line in out.stdout.splitlines():
        pid, _, mem = line.partition(",")
        if pid.strip().isdigit():
            apps.append({"pid": int(pid), "used_mib": float(mem) if mem.strip().replace(".", "").isdigit() else None})
    return apps


def machine(device: str) -> dict:
    """Versions and hardware: what the figures were measured with."""
    import importlib.metadata as md

    import numpy as np
    import onnxruntime as ort
    import PIL

    from service.gpu import build_info, cuda_unavailable_reason, onnxruntime_dir

    ort_dir = onnxruntime_dir()
    versions = {}
    for dist in ("bentoml", "starlette", "uvicorn", "pydantic", "prometheus-client", "aiohttp", "httpx"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    nvidia = {}
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-c") or name in ("nvidia-nvjitlink", "nvidia-curand"):
            nvidia[name] = dist.version
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "hostname": platform.node(),
        "cpu": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        ),
        "cores": cores,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_build": build_info(ort_dir) if ort_dir else {},
        "onnxruntime_path": str(ort_dir),
        "onnxruntime_providers": ort.get_available_providers(),
        "packages": versions,
        "nvidia_wheels": dict(sorted(nvidia.items())),
        "cuda_libraries": nvidia_lib_dirs() if device == "cuda" else {},
        "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
        "gpu": nvidia_smi(),
        "cuda_reason": (cuda_unavailable_reason() or "none: CUDA is usable") if device == "cuda" else "not asked",
        "staged_site": staged(),
    }


def staged() -> dict | None:
    """The stage unpacked into the site folder on PYTHONPATH, if any (deploy.gpu.stage's stamp)."""
    for p in sys.path:
        if p and (Path(p) / STAMP).is_file():
            return {"site": p, **json.loads((Path(p) / STAMP).read_text())}
    return None


def requirement_problems() -> list[str]:
    """Serving dependencies whose installed version does not satisfy what requires them
    (packages mixed from the device image and the carried ones)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    problems, todo, seen = [], ["bentoml", "pydantic-settings", "starlette", "uvicorn", "onnxruntime-gpu"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                problems.append(f"{name} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req}: {req.name} {have} is installed")
            todo.append(req.name.lower())
    return problems


# --------------------------------------------------------------------------- models in-process


def active_models(exported: Path) -> list[tuple[str, object]]:
    """(name, VersionFiles) of every model at its family's active version."""
    from service.metadata import read_manifest

    manifest = read_manifest(exported)
    out = []
    for name, entry in manifest.models.items():
        version = manifest.families[entry.family].active
        out.append((name, entry.versions[version]))
    return out


def smoke_feeds(exported: Path, files, model) -> tuple[dict, dict, str]:
    """The model's smoke set (inputs, golden outputs), or deterministic synthetic inputs when
    its version has none (then no golden outputs)."""
    import numpy as np

    from service.runtime import DTYPES

    smoke = model.meta.smoke
    if smoke is not None:
        path = exported / Path(files.metadata).parent / smoke.file
        if path.is_file():
            with np.load(path) as npz:
                feeds = {k[3:]: npz[k] for k in npz.files if k.startswith("in:")}
                golden = {k[4:]: npz[k] for k in npz.files if k.startswith("out:")}
            return feeds, golden, smoke.file
    rng = np.random.default_rng(0)
    feeds = {}
    seq = 16
    vocab = len(getattr(model.meta, "vocabulary", []) or [0, 0, 0])
    for spec in model.meta.inputs:
        shape = [8 if i == 0 else (d if isinstance(d, int) else seq) for i, d in enumerate(spec.shape)]
        dtype = DTYPES[spec.dtype]
        if spec.dtype == "int64" and len(shape) == 1:
            feeds[spec.name] = np.full(shape, seq, dtype)  # lengths
        elif spec.dtype == "int64":
            feeds[spec.name] = rng.integers(2, max(3, vocab), shape).astype(dtype)
        elif spec.dtype == "uint8":
            feeds[spec.name] = rng.integers(0, 256, shape).astype(dtype)
        else:  # images as pixels in [0, 1], other vectors standard normal
            x = rng.random(shape) if len(shape) == 4 else rng.standard_normal(shape)
            feeds[spec.name] = x.astype(dtype)
    return feeds, {}, "none in its metadata: synthetic inputs"


def max_diff(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if a.size else 0.0


def tf32_parity(path: Path, feeds: dict, out_cpu: dict, threads: int) -> dict | str:
    """Max abs diff from the CPU with the CUDA provider's own default, TF32 on (service.runtime
    turns it off): the figure behind that choice."""
    import onnxruntime as ort

    from service.runtime import CPU, CUDA, session_options

    try:
        sess = ort.InferenceSession(str(path), session_options(threads), providers=[(CUDA, {"use_tf32": "1"}), CPU])
        names = [o.name for o in sess.get_outputs()]
        return {k: max_diff(v, out_cpu[k]) for k, v in zip(names, sess.run(None, feeds)) if k in out_cpu}
    except Exception as exc:  # a diagnostic only
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def tiled(feeds: dict, rows: int) -> dict:
    """The smoke inputs repeated to `rows` rows (the batch axis is axis 0)."""
    import numpy as np

    n = next(iter(feeds.values())).shape[0]
    reps = -(-rows // n)
    return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:rows]) for k, v in feeds.items()}


def time_runs(model, feeds: dict, point_s: float) -> dict:
    """First run (on a GPU: cuDNN's algorithm search for this shape), then repeats until
    point_s has passed (3..200 runs): median and p90 latency, rows/s at the median."""
    import numpy as np

    rows = next(iter(feeds.values())).shape[0]
    t = time.perf_counter()
    model.run(**feeds)
    first = time.perf_counter() - t
    times = []
    end = time.perf_counter() + point_s
    while len(times) < 3 or (time.perf_counter() < end and len(times) < 200):
        t = time.perf_counter()
        model.run(**feeds)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {
        "first_ms": round(first * 1e3, 3),
        "median_ms": round(med * 1e3, 3),
        "p90_ms": round(float(np.percentile(times, 90)) * 1e3, 3),
        "runs": len(times),
        "rows_per_s": round(rows / med, 1),
    }


def shape_change(model, feeds: dict, point_s: float) -> dict:
    """Runs whose batch shape differs from the previous run's (3, 4, 5, 4, 3, ... rows, each
    shape seen once before timing) against runs of one shape (4 rows): on a GPU the difference is
    what cuDNN's per-shape set-up costs a server whose batches vary (docs/gpu.md)."""
    import numpy as np

    shapes = [tiled(feeds, n) for n in (3, 4, 5, 4)]
    for batch in shapes[:3]:
        model.run(**batch)
    fixed = time_runs(model, shapes[1], point_s)["median_ms"]
    times = []
    end = time.perf_counter() + point_s
    while len(times) < 8 or (time.perf_counter() < end and len(times) < 200):
        t = time.perf_counter()
        model.run(**shapes[len(times) % 4])
        times.append(time.perf_counter() - t)
    alternating = float(np.median(times)) * 1e3
    return {"fixed_ms": fixed, "alternating_ms": round(alternating, 3), "ratio": round(alternating / fixed, 2)}


def knee(points: list[dict], key: str) -> int | None:
    """The smallest batch that reaches 90% of the best rows/s on `key` (device or cpu)."""
    rates = [(p["rows"], p[key]["rows_per_s"]) for p in points if p.get(key)]
    if not rates:
        return None
    best = max(r for _, r in rates)
    return next(n for n, r in rates if r >= 0.9 * best)


def models_phase(report: Report, args, exported: Path, threads: int) -> None:
    """Parity and the sweep, model by model (the report is written after each)."""
    import numpy as np

    from service.runtime import ModelLoadError, load_model

    for name, files in active_models(exported):
        entry: dict = {"version": Path(files.file).parent.name}
        report.data["models"][name] = entry
        try:
            dev = load_model(exported, name, files, args.device, threads)
            cpu = load_model(exported, name, files, "cpu", threads) if args.device != "cpu" else None
        except ModelLoadError as exc:
            entry["error"] = str(exc)
            report.problem(f"{name}: {exc}")
            report.write()
            continue
        entry.update(task=dev.task, provider=dev.provider, provider_reason=dev.provider_reason or None)
        feeds, golden, source = smoke_feeds(exported, files, dev)
        atol = dev.meta.smoke.atol if dev.meta.smoke else 1e-3
        try:
            out_dev = dict(zip(dev.output_names, dev.run(**feeds)))
            out_cpu = dict(zip(cpu.output_names, cpu.run(**feeds))) if cpu else out_dev
        except Exception as exc:  # a CUDA kernel that cannot run raises from session.run
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            hint = ""
            if re.search(r"no kernel image|invalid device function|device kernel image", str(exc)):
                hint = " (the staged CUDA provider keeps sm_90 kernels only: `make gpu-stage ALL_ARCHS=1` restages it whole)"
            report.problem(f"{name}: inference failed on {args.device}: {entry['error']}{hint}")
            report.write()
            continue
        vs_cpu = {k: max_diff(v, out_cpu[k]) for k, v in out_dev.items()}
        tf32 = tf32_parity(exported / files.file, feeds, out_cpu, threads) if args.device == "cuda" else None
        vs_golden = {k: max_diff(out_dev[k], v) for k, v in golden.items() if k in out_dev}
        close = all(np.allclose(out_dev[k], out_cpu[k], rtol=1e-3, atol=atol) for k in out_dev) and all(
            v <= atol for v in vs_golden.values()
        )
        entry["parity"] = {
            "smoke_set": source,
            "rows": int(next(iter(feeds.values())).shape[0]),
            "max_abs_diff": max(vs_cpu.values(), default=0.0),
            "max_abs_diff_vs_cpu": vs_cpu,
            "max_abs_diff_vs_golden": vs_golden,
            "atol": atol,
            "ok": bool(close),
            "max_abs_diff_vs_cpu_tf32_on": tf32,  # ONNX Runtime's CUDA default, which deepserve turns off
        }
        if not close:
            report.problem(
                f"{name}: {args.device} outputs differ from the CPU's or the golden ones: {vs_cpu} {vs_golden}"
            )
        entry["sweep"] = []
        for rows in args.sweep:
            if report.past(0.5):
                entry["sweep_cut"] = f"stopped before {rows} rows: time limit"
                break
            batch = tiled(feeds, rows)
            point = {"rows": rows, "device": time_runs(dev, batch, args.point_seconds)}
            point["cpu"] = time_runs(cpu, batch, args.point_seconds) if cpu else None
            if cpu:
                point["speedup"] = round(point["device"]["rows_per_s"] / point["cpu"]["rows_per_s"], 2)
            entry["sweep"].append(point)
        entry["knee_rows"] = {"device": knee(entry["sweep"], "device"), "cpu": knee(entry["sweep"], "cpu")}
        if not report.past(2):
            entry["shape_change"] = shape_change(dev, feeds, args.point_seconds)
        report.write()
        say(f"  {name}: parity {entry['parity']['max_abs_diff']:.3g} ({source}); sweep {len(entry['sweep'])} points")


# --------------------------------------------------------------------------- server under load


@dataclass
class Body:
    path: str
    content_type: str
    data: bytes
    expect: bytes  # the answer must start with this (PNG magic, or '{' for JSON)
    field: bytes = b""  # ... and contain this


def bodies(tmp: Path) -> dict[str, Body]:
    """The benchmark's payloads (bench.harness), with what a correct answer looks like."""
    from bench.harness import payloads

    raw = payloads(tmp)
    png, js = b"\x89PNG", b"{"
    rules = {
        "classify-image": (js, b'"label"'),
        "classify-text": (js, b'"label"'),
        "generate-16": (png, b""),
        "denoise": (png, b""),
    }
    return {k: Body(raw[k][0], raw[k][1], raw[k][2].read_bytes(), *rules[k]) for k in ENDPOINTS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m bentoml serve` from the repo root, as the tests' Server (tests/conftest.py) starts it."""

    def __init__(self, env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full = {**os.environ, **env, "BENTOML_HOME": tempfile.mkdtemp(prefix="bentoml-verify-")}
        cmd = [sys.executable, "-m", "bentoml", "serve", "service.service:DeepServe"]
        self.proc = subprocess.Popen(
            [*cmd, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO,
            env=full,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> float:
        import httpx

        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail(1500)}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready in {timeout:.0f} s: {self.tail(1500)}")

    def tail(self, n: int) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


METRIC = re.compile(
    r"^(deepserve_(?:batch_rows|batch_requests|inference_seconds|stage_seconds)_(?:sum|count))\{([^}]*)\} (\S+)$"
)


def scrape(url: str) -> dict[tuple, float]:
    """(metric, labels...) -> value for the batch and stage histograms' sums and counts."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[tuple, float] = collections.defaultdict(float)
    for line in text.splitlines():
        m = METRIC.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            key = (m.group(1), labels.get("model") or labels.get("endpoint"), labels.get("stage"))
            out[key] += float(m.group(3))
    return out


def batch_stats(before: dict, after: dict) -> dict:
    """Per model that ran batches between two scrapes: batches, rows and requests per batch,
    ONNX Runtime ms per batch; per endpoint: mean ms per stage."""

    def delta(metric: str, who: str, stage: str | None = None) -> float:
        return after.get((metric, who, stage), 0.0) - before.get((metric, who, stage), 0.0)

    models = {}
    for metric, who, _ in after:
        if metric == "deepserve_batch_rows_count" and (n := delta(metric, who)) > 0:
            req_n = delta("deepserve_batch_requests_count", who)
            inf_n = delta("deepserve_inference_seconds_count", who)
            models[who] = {
                "batches": int(n),
                "rows_per_batch": round(delta("deepserve_batch_rows_sum", who) / n, 2),
                "requests_per_batch": round(delta("deepserve_batch_requests_sum", who) / req_n, 2) if req_n else None,
                "infer_ms_per_batch": round(delta("deepserve_inference_seconds_sum", who) / inf_n * 1e3, 3)
                if inf_n
                else None,
            }
    stages = {}
    for metric, who, stage in after:
        if metric == "deepserve_stage_seconds_count" and (n := delta(metric, who, stage)) > 0:
            stages.setdefault(who, {})[stage] = round(delta("deepserve_stage_seconds_sum", who, stage) / n * 1e3, 3)
    return {"models": models, "stages_ms": stages}


async def drive(url: str, body: Body, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients sending `body` back to back for `seconds`: req/s of valid answers,
    latency percentiles, every other outcome counted by status or exception."""
    import aiohttp
    import numpy as np

    latencies: list[float] = []
    outcomes: collections.Counter = collections.Counter()
    headers = {"Content-Type": body.content_type}
    connector = aiohttp.TCPConnector(limit=concurrency)
    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        stop = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    async with session.post(url + body.path, data=body.data, headers=headers) as r:
                        data, status = await r.read(), r.status
                except (TimeoutError, aiohttp.ClientError) as exc:
                    outcomes[type(exc).__name__] += 1
                    continue
                if status != 200:
                    outcomes[str(status)] += 1
                elif not data.startswith(body.expect) or body.field not in data:
                    outcomes["200 with a wrong body"] += 1
                else:
                    outcomes["200"] += 1
                    latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ok = len(latencies)
    total = sum(outcomes.values())
    ms = np.asarray(latencies) * 1e3 if ok else np.zeros(1)
    return {
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests": total,
        "rps": round(ok / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "errors": {k: v for k, v in outcomes.items() if k != "200"},
        "error_rate": round((total - ok) / total, 4) if total else 1.0,
        "client_cpu": round((time.process_time() - cpu0) / elapsed, 2),  # near 1.0: the client limits
    }


def run_async(coro):
    """asyncio.run, on uvloop where it is installed (a cheaper client)."""
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    except ImportError:
        return asyncio.run(coro)


class GpuSampler:
    """nvidia-smi's utilisation and memory every 200 ms while a load point runs."""

    def __init__(self):
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        util, mem = [], []
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and all(p.replace(".", "").isdigit() for p in parts):
                util.append(float(parts[0]))
                mem.append(float(parts[1]))
        if not util:
            return None
        return {"util_mean": round(sum(util) / len(util), 1), "util_max": max(util), "memory_used_mib_max": max(mem)}


def server_phase(report: Report, args, batching: bool, payloads: dict[str, Body]) -> None:
    """One server (batching on or off): /models, then every endpoint at every concurrency."""
    import httpx

    key = "batching_on" if batching else "batching_off"
    section: dict = {"batching": batching, "points": []}
    report.data["server"][key] = section
    log = Path(args.out) / f"server-{key.replace('_', '-')}.log"
    env = {"DEEPSERVE_DEVICE": args.device, "DEEPSERVE_BATCHING": "true" if batching else "false"}
    env["DEEPSERVE_WORKERS"] = str(args.workers)
    server = Server(env, log)
    try:
        section["startup_s"] = round(server.wait_ready(args.ready_timeout), 2)
        listing = httpx.get(server.url + "/models", timeout=10).json()
        section["provider"] = listing.get("provider")
        section["models_provider"] = {m["name"]: m["provider"] for m in listing["models"]}
        section["batching_settings"] = listing.get("batching")
        want = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
        wrong = {n: p for n, p in section["models_provider"].items() if p != want}
        if wrong:
            report.problem(f"{key}: /models reports {wrong}, expected {want} for every model")
        section["gpu_memory_after_warmup"] = gpu_apps()
        report.write()
        for name in args.endpoints:
            body = payloads[name]
            r = httpx.post(
                server.url + body.path, content=body.data, headers={"Content-Type": body.content_type}, timeout=60
            )
            if r.status_code != 200 or not r.content.startswith(body.expect):
                report.problem(f"{key} {name}: first request answered {r.status_code} {r.text[:200]}")
                continue
            for c in args.concurrency:
                if report.past(args.load_seconds + args.warmup_seconds + 5):
                    section.setdefault("skipped", []).append(f"{name} c={c}: time limit")
                    continue
                run_async(drive(server.url, body, c, args.warmup_seconds))  # new batch shapes, connections
                before = scrape(server.url)
                sampler = GpuSampler()
                point = run_async(drive(server.url, body, c, args.load_seconds))
                point["gpu"] = sampler.stop()
                point.update(endpoint=name, **batch_stats(before, scrape(server.url)))
                section["points"].append(point)
                if point["error_rate"] > 0.01:
                    report.problem(
                        f"{key} {name} c={c}: {point['error_rate']:.1%} of requests failed: {point['errors']}"
                    )
                report.write()
                per_batch = ", ".join(f"{m} {v['rows_per_batch']}" for m, v in point["models"].items())
                say(
                    f"  {key:<13} {name:<15} c={c:<4} {point['rps']:>8.1f} req/s  p99 {point['p99_ms']:>8.1f} ms  "
                    f"rows/batch {per_batch}"
                )
    except (RuntimeError, TimeoutError, httpx.HTTPError, OSError, ValueError) as exc:
        section["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        report.problem(f"{key}: {section['error'][:500]}")
    finally:
        server.stop()
        report.write()


def gains(server: dict) -> list[dict]:
    """Batching on ÷ off, per endpoint and concurrency measured on both."""
    on = {(p["endpoint"], p["concurrency"]): p for p in server.get("batching_on", {}).get("points", [])}
    off = {(p["endpoint"], p["concurrency"]): p for p in server.get("batching_off", {}).get("points", [])}
    out = []
    for k in on:
        if k in off and off[k]["rps"] > 0:
            out.append(
                {
                    "endpoint": k[0],
                    "concurrency": k[1],
                    "rps_on": on[k]["rps"],
                    "rps_off": off[k]["rps"],
                    "rps_ratio": round(on[k]["rps"] / off[k]["rps"], 2),
                    "p99_on_ms": on[k]["p99_ms"],
                    "p99_off_ms": off[k]["p99_ms"],
                }
            )
    return out


# --------------------------------------------------------------------------- the report


class Report:
    """OUT/gpu-verify.json and OUT/gpu-verify.md, rewritten whole after every step."""

    def __init__(self, out: Path, deadline_s: float):
        self.out = out
        self.start = time.monotonic()
        self.deadline = self.start + deadline_s
        self.data: dict = {
            "tool": "deploy.gpu.verify",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "complete": False,
            "problems": [],
            "models": {},
            "server": {},
        }

    def past(self, needed_s: float) -> bool:
        """True when `needed_s` more would run past the deadline."""
        return time.monotonic() + needed_s > self.deadline

    def problem(self, text: str) -> None:
        self.data["problems"].append(text)
        say(f"  PROBLEM: {text}")

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.data["ok"] = self.data["complete"] and not self.data["problems"]
        tmp = self.out / ".gpu-verify.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.out / "gpu-verify.json")
        (self.out / "gpu-verify.md").write_text(markdown(self.data))


def markdown(d: dict) -> str:
    m = d.get("machine", {})
    gpu = ((m.get("gpu") or {}).get("gpus") or [{}])[0]
    lines = [
        f"# deepserve on {d.get('device')}: parity, batch sweep, server with batching on and off ({d['date']})",
        "",
        f"- outcome: {'OK' if d.get('ok') else 'NOT OK'}; complete: {d['complete']}; {d.get('elapsed_s')} s",
        f"- GPU: {gpu.get('name', 'none')}, driver {gpu.get('driver_version', '-')}, compute capability "
        f"{gpu.get('compute_cap', '-')}, {gpu.get('memory.total', '-')} MiB; CPU: {m.get('cpu')} ({m.get('cores')} cores)",
        f"- Python {m.get('python')}, numpy {m.get('numpy')}, Pillow {m.get('pillow')}, onnxruntime {m.get('onnxruntime')} "
        f"({(m.get('onnxruntime_build') or {}).get('package_name', '?')}, CUDA {(m.get('onnxruntime_build') or {}).get('cuda_version', '-')}), "
        f"bentoml {(m.get('packages') or {}).get('bentoml')}",
        f"- CUDA: {m.get('cuda_reason')}",
        "",
    ]
    if d["problems"]:
        lines += ["## Problems", ""] + [f"- {p}" for p in d["problems"]] + [""]
    lines += ["## Parity with the CPU (max abs diff over the smoke set)", ""]
    lines += [
        "| model | version | provider | smoke set | vs CPU | vs golden | atol | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in d["models"].items():
        p = e.get("parity", {})
        golden = max(p.get("max_abs_diff_vs_golden", {}).values(), default=None)
        lines.append(
            f"| {name} | {e.get('version')} | {e.get('provider', e.get('error', '-'))} | {p.get('smoke_set', '-')} | "
            f"{p.get('max_abs_diff', '-')} | {golden if golden is not None else '-'} | {p.get('atol', '-')} | {p.get('ok', '-')} |"
        )
    lines += ["", "## Batch shape changing from run to run (3, 4, 5, 4 rows) against one shape (4 rows), ms", ""]
    lines += ["| model | one shape | changing | ratio |", "|---|---|---|---|"]
    for name, e in d["models"].items():
        sc = e.get("shape_change")
        if sc:
            lines.append(f"| {name} | {sc['fixed_ms']} | {sc['alternating_ms']} | {sc['ratio']} |")
    lines += ["", "## Batch-size sweep in-process (rows/s; median ms per run; first run ms)", ""]
    for name, e in d["models"].items():
        if not e.get("sweep"):
            continue
        lines += [f"**{name}** (90% of the best rows/s from {e['knee_rows']})", ""]
        lines += [
            "| rows | device rows/s | device ms | device first ms | CPU rows/s | CPU ms | speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for pt in e["sweep"]:
            c = pt.get("cpu") or {}
            lines.append(
                f"| {pt['rows']} | {pt['device']['rows_per_s']} | {pt['device']['median_ms']} | {pt['device']['first_ms']} | "
                f"{c.get('rows_per_s', '-')} | {c.get('median_ms', '-')} | {pt.get('speedup', '-')} |"
            )
        lines.append("")
    for key, s in d["server"].items():
        if not isinstance(s, dict) or "batching" not in s:
            continue
        lines += [
            f"## Server, {key.replace('_', ' ')} (provider {s.get('provider')}, ready in {s.get('startup_s')} s)",
            "",
        ]
        if s.get("error"):
            lines += [f"error: {s['error'][:500]}", ""]
        lines += [
            "| endpoint | c | req/s | p50 ms | p99 ms | errors | rows/batch | requests/batch | infer ms/batch | GPU util % | client CPU |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in s.get("points", []):
            mods = p.get("models", {})
            rows = ", ".join(f"{k} {v['rows_per_batch']}" for k, v in mods.items())
            reqs = ", ".join(f"{v['requests_per_batch']}" for v in mods.values())
            inf = ", ".join(f"{v['infer_ms_per_batch']}" for v in mods.values())
            util = (p.get("gpu") or {}).get("util_mean", "-")
            lines.append(
                f"| {p['endpoint']} | {p['concurrency']} | {p['rps']} | {p['p50_ms']} | {p['p99_ms']} | "
                f"{sum(p['errors'].values())} | {rows} | {reqs} | {inf} | {util} | {p['client_cpu']} |"
            )
        lines.append("")
    if d.get("gain"):
        lines += ["## Does adaptive batching pay? (req/s with batching on ÷ off)", ""]
        lines += [
            "| endpoint | c | on req/s | off req/s | on ÷ off | p99 on ms | p99 off ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in d["gain"]:
            lines.append(
                f"| {g['endpoint']} | {g['concurrency']} | {g['rps_on']} | {g['rps_off']} | {g['rps_ratio']}× | "
                f"{g['p99_on_ms']} | {g['p99_off_ms']} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="provider to verify (default cuda)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "results/gpu-verify", help="report folder (default $OUT)")
    ap.add_argument("--quick", action="store_true", help="the short CPU run: a smaller sweep, 1 s per load point")
    ap.add_argument(
        "--sweep", type=lambda s: [int(x) for x in s.split(",")], help="batch sizes (rows), comma-separated"
    )
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], help="clients, comma-separated")
    ap.add_argument("--endpoints", type=lambda s: s.split(","), default=list(ENDPOINTS), help=",".join(ENDPOINTS))
    ap.add_argument("--load-seconds", type=float, help="measured seconds per load point")
    ap.add_argument("--warmup-seconds", type=float, help="unmeasured load before each point (new batch shapes)")
    ap.add_argument("--point-seconds", type=float, help="timed runs per sweep point, at least 3")
    ap.add_argument("--deadline-seconds", type=float, help="skip what would run past this; the report stays whole")
    ap.add_argument("--workers", type=int, default=1, help="DEEPSERVE_WORKERS for the server (default 1)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads in-process (default: every core)")
    ap.add_argument("--ready-timeout", type=float, default=180, help="seconds for the server to become ready")
    ap.add_argument("--no-server", action="store_true", help="parity and sweep only")
    ap.add_argument(
        "--site",
        type=Path,
        help=f"staged packages put first on PYTHONPATH (default with --device cuda: {SITE}; none with cpu)",
    )
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.site is None and args.device == "cuda":
        args.site = SITE
    unknown = set(args.endpoints) - set(ENDPOINTS)
    if unknown:
        ap.error(f"unknown endpoints {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = prepared_env(args.device, args.site)
    if env is not None:  # the loader reads LD_LIBRARY_PATH at start: run again with it set
        cmd = [sys.executable, "-m", "deploy.gpu.verify", *(sys.argv[1:] if argv is None else argv)]
        os.chdir(REPO)
        os.execve(sys.executable, cmd, env)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["DEEPSERVE_DEVICE"] = args.device
    report = Report(out, args.deadline_seconds)
    d = report.data
    d["device"] = args.device
    d["settings"] = {
        k: getattr(args, k)
        for k in ("sweep", "concurrency", "endpoints", "load_seconds", "warmup_seconds", "point_seconds", "workers")
    }
    say(f"gpu-verify: device {args.device}, report in {out}")
    try:
        d["machine"] = machine(args.device)
        d["machine"]["requirement_problems"] = requirement_problems()
    except ImportError as exc:
        report.problem(f"cannot import what serving needs: {exc} (on a device: were the staging calls made?)")
        report.write()
        return 2
    if args.device == "cuda" and "CUDAExecutionProvider" not in d["machine"]["onnxruntime_providers"]:
        report.problem(
            f"onnxruntime {d['machine']['onnxruntime']} has no CUDA provider and {args.site} holds no stage: "
            "make the staging calls first (docs/gpu.md, Device runbook; .stage/RUNBOOK.md)"
        )
        report.write()
        return 2
    from service.settings import usable_cores

    threads = args.threads or usable_cores()
    d["settings"]["threads"] = threads
    gpu = ((d["machine"].get("gpu") or {}).get("gpus") or [{}])[0]
    say(
        f"  {gpu.get('name', 'no GPU')} driver {gpu.get('driver_version', '-')}; onnxruntime {d['machine']['onnxruntime']}"
    )
    say(f"  CUDA: {d['machine']['cuda_reason']}")
    report.write()
    exported = REPO / "exported"
    t = time.monotonic()
    models_phase(report, args, exported, threads)
    d["phases"] = {"models_s": round(time.monotonic() - t, 1)}
    report.write()  # parity and sweep are on disk before any server starts
    if not args.no_server and not any("error" in e for e in d["models"].values()):
        t = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="gpu-verify-") as tmp:
            payloads = bodies(Path(tmp))
            for batching in (True, False):
                server_phase(report, args, batching, payloads)
        d["phases"]["server_s"] = round(time.monotonic() - t, 1)
        d["gain"] = gains(d["server"])
    elif not args.no_server:
        report.problem("the server was not started: a model failed in-process")
    d["complete"] = True
    report.write()
    say(f"gpu-verify: {'OK' if d['ok'] else 'NOT OK'} in {d['elapsed_s']} s -> {out / 'gpu-verify.md'}")
    return 0 if d["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
