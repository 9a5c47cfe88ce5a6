"""What the benchmark and the stress run share: the payloads, starting and stopping servers
pinned to a core, and driving them with wrk (compiled, one thread, pinned to another core)."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
PIN = (os.cpu_count() or 1) >= 2


def payloads(tmp: Path) -> dict[str, tuple[str, str, Path]]:
    """endpoint -> (path, content type, body file): the same bytes for every server."""
    from PIL import Image

    from service import preprocessing as pp

    seven = (FIXTURES / "mnist_test0_label7.png").read_bytes()
    clean = pp.scale_pixels(np.asarray(Image.open(FIXTURES / "mnist_test0_label7.png")))
    noisy = pp.png_bytes(pp.add_gaussian_noise(clean, 0.3, np.random.default_rng(0)))
    sentence = (FIXTURES / "sst2_dev200.tsv").read_text().splitlines()[1].rsplit("\t", 1)[0]

    def multipart(data: bytes) -> bytes:
        return (
            b'--BENCH\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--BENCH--\r\n"
        )

    bodies = {
        "classify-image": ("/classify", "multipart/form-data; boundary=BENCH", multipart(seven)),
        "classify-text": ("/classify", "application/json", json.dumps({"text": sentence}).encode()),
        "generate-16": ("/generate", "application/json", json.dumps({"n": 16, "digit": 7, "seed": 1}).encode()),
        "denoise": ("/denoise", "multipart/form-data; boundary=BENCH", multipart(noisy)),
        "generate-64": ("/generate", "application/json", json.dumps({"n": 64, "digit": 7, "seed": 1}).encode()),
        "compress": ("/compress", "multipart/form-data; boundary=BENCH", multipart(seven)),
        "decompress": ("/decompress", "application/json", json.dumps({"code": "Z8RMuEVmZnmZJ4Jp24x1Rg=="}).encode()),
    }
    # the Open Inference Protocol: one digit as a binary tensor, normalized as the metadata says
    manifest = json.loads((REPO / "exported" / "manifest.json").read_text())
    digits = manifest["models"]["digits"]
    meta = json.loads(
        (REPO / "exported" / digits["versions"][manifest["families"]["digits"]["active"]]["metadata"]).read_text()
    )
    x = pp.normalize(clean, meta["preprocessing"]["mean"], meta["preprocessing"]["std"]).astype(np.float32).tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": [1, 1, 28, 28],
                    "parameters": {"binary_data_size": len(x)},
                }
            ],
            "outputs": [{"name": "logits"}],
        }
    ).encode()
    bodies["v2-digits"] = ("/v2/models/digits/infer", "application/octet-stream", head + x)
    headers = {"v2-digits": f"Inference-Header-Content-Length: {len(head)}"}
    # the same digit on the previous digits version (no out-of-distribution head, no calibration)
    previous = manifest["families"]["digits"]["previous"]
    if previous:
        field = b'--BENCH\r\nContent-Disposition: form-data; name="model_version"\r\n\r\n' + previous.encode() + b"\r\n"
        bodies["classify-image-previous"] = (
            "/classify",
            "multipart/form-data; boundary=BENCH",
            field + multipart(seven),
        )
    out = {}
    for name, (path, ctype, body) in bodies.items():
        (tmp / name).write_bytes(body)
        out[name] = (path, ctype, tmp / name, headers.get(name, ""))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    kind: str, port: int, log: Path, extra_env: dict[str, str] | None = None, repo: Path = REPO
) -> subprocess.Popen:
    """Start a server of `kind` from the checkout `repo` (another commit's worktree for an A/B)."""
    env = {**os.environ, "PYTHONPATH": str(repo), **(extra_env or {})}
    if kind.startswith("deepserve"):
        cmd = [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "service.service:DeepServe",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        if kind == "deepserve-nobatch":
            env["DEEPSERVE_BATCHING"] = "false"
        if kind == "deepserve-notiming":
            env["DEEPSERVE_SERVER_TIMING"] = "false"
        env.setdefault("BENTOML_HOME", str(log.parent / f"bentoml-{port}"))
    else:
        cmd = [sys.executable, "-m", "bench.peers", kind, str(port)]
    if PIN:
        cmd = ["taskset", "-c", "1", *cmd]
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    probe = "/readyz" if kind.startswith("deepserve") else ("/health" if kind == "litserve" else None)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited: {log.read_text()[-2000:]}")
        try:
            if probe:
                ok = httpx.get(url + probe, timeout=2).status_code == 200
            else:
                ok = httpx.post(url + "/generate", json={"n": 1}, timeout=2).status_code == 200
            if ok:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{kind} not ready: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by process `root` and every process under it: a
    server started by `start` and its workers (circus gives each its own session). Unlike
    req/s it does not count the time the machine's other tenants took from the core (steal),
    the largest drift here."""
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:  # fields after the name: state ppid pgrp session ... utime (11) stime (12)
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            stats[int(d.name)] = (int(f[1]), int(f[11]) + int(f[12]))
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(stats[pid][1] for pid in tree if pid in stats) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, body: tuple, connections: int, seconds: float) -> dict:
    path, ctype, file, header = body
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{round(seconds)}s",
        "--timeout",
        "10s",
        "-s",
        str(REPO / "bench" / "report.lua"),
        url + path,
    ]
    if PIN:
        cmd = ["taskset", "-c", "0", *cmd]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**os.environ, "BENCH_BODY": str(file), "BENCH_TYPE": ctype, "BENCH_HEADER": header},
        timeout=seconds + 60,
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({' '.join(cmd)}): {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(line)
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return {
        "rps": r["requests"] / r["seconds"],
        "p50_ms": r["p50_ms"],
        "p95_ms": r["p95_ms"],
        "p99_ms": r["p99_ms"],
        "errors": errors,
        "status_errors": r["status"],  # answered, but not 2xx (a 503 shed among them)
        "socket_errors": r["connect"] + r["read"] + r["write"] + r["timeout"],  # never answered
        "error_rate": errors / max(1, r["requests"]),
        "requests": r["requests"],
    }


def check(url: str, body: tuple) -> None:
    """One request before measuring: a server that answers errors fast must not look fast."""
    path, ctype, file, header = body
    extra = dict([header.split(": ", 1)]) if header else {}
    for _ in range(20):  # a 503 right after a 128-connection run: the server is still draining it
        r = httpx.post(url + path, content=file.read_bytes(), headers={"Content-Type": ctype, **extra}, timeout=30)
        if r.status_code != 503:
            break
        time.sleep(0.5)
    if r.status_code != 200:
        raise RuntimeError(f"{url}{path}: {r.status_code} {r.text[:300]}")


def machine() -> dict:
    import bentoml
    import onnxruntime

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "python": platform.python_version(),
        "bentoml": bentoml.__version__,
        "onnxruntime": onnxruntime.__version__,
        "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip(),
        "pinning": "wrk on CPU 0, server on CPU 1" if PIN else "none (one core)",
    }
