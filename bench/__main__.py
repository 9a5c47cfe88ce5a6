"""`make bench`: deepserve against its peers and ceilings, in one run, on this machine.

    python -m bench [--seconds 8] [--concurrency 1 8 32 128] [--only deepserve fastapi ...]

Servers (each started here, measured, stopped): deepserve as `make serve` runs it; the same
with batching off; FastAPI + uvicorn running each request alone; LitServe with batching on; a
no-op server that takes the same upload. The load generator is wrk (compiled, one thread),
pinned to CPU 0 and the server to CPU 1 where the machine has two or more. Endpoints:
/classify (image), /classify (text), /generate n=16, /denoise. Then ONNX Runtime in-process at
the best batch size, without HTTP. Writes docs/benchmarks.md, docs/img/bench_*.png and
docs/benchmarks.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
SERVERS = {
    "deepserve": "deepserve (make serve defaults)",
    "deepserve-nobatch": "deepserve, batching off",
    "fastapi": "FastAPI + uvicorn, one request at a time",
    "litserve": "LitServe, batch 32 / 5 ms",
    "noop": "no-op server, same upload (ceiling)",
}
ENDPOINTS = ["classify-image", "classify-text", "generate-16", "denoise"]
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
    }
    out = {}
    for name, (path, ctype, body) in bodies.items():
        (tmp / name).write_bytes(body)
        out[name] = (path, ctype, tmp / name)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
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
    else:
        cmd = [sys.executable, "-m", "bench.peers", kind, str(port)]
    if PIN:
        cmd = ["taskset", "-c", "1", *cmd]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
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


def wrk(url: str, body: tuple[str, str, Path], connections: int, seconds: float) -> dict:
    path, ctype, file = body
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
        env={**os.environ, "BENCH_BODY": str(file), "BENCH_TYPE": ctype},
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
        "error_rate": errors / max(1, r["requests"]),
        "requests": r["requests"],
    }


def check(url: str, body: tuple[str, str, Path]) -> None:
    """One request before measuring: a server that answers errors fast must not look fast."""
    path, ctype, file = body
    for _ in range(20):  # a 503 right after a 128-connection run: the server is still draining it
        r = httpx.post(url + path, content=file.read_bytes(), headers={"Content-Type": ctype}, timeout=30)
        if r.status_code != 503:
            break
        time.sleep(0.5)
    if r.status_code != 200:
        raise RuntimeError(f"{url}{path}: {r.status_code} {r.text[:300]}")


def in_process(seconds: float = 0.5) -> dict[str, dict]:
    """ONNX Runtime without HTTP, at the best batch size: the ceiling for each endpoint's model
    (rows/s; for generate-16, requests/s = rows/s ÷ 16)."""
    from service import preprocessing as pp
    from service import tasks
    from service.core import load_models

    models = load_models(REPO / "exported", "cpu", os.cpu_count() or 1)
    x = pp.scale_pixels(np.load(FIXTURES / "mnist_test500.npz")["images"][:256])
    texts = [line.rsplit("\t", 1)[0] for line in (FIXTURES / "sst2_dev200.tsv").read_text().splitlines()[1:257]]
    ids = [s or [pp.UNK] for s in tasks.encode_texts(models["sentiment"], texts)]
    z, d = pp.sample_latents(256, models["generator"].meta.preprocessing.z_dim, 0, 7)
    runs = {
        "classify-image": lambda b: tasks.classify_images(models["digits"], x[:b]),
        "classify-text": lambda b: tasks.classify_token_ids(models["sentiment"], ids[:b]),
        "generate-16": lambda b: tasks.generate(models["generator"], z[:b], d[:b]),
        "denoise": lambda b: tasks.denoise(models["denoiser"], x[:b]),
    }
    out = {}
    for name, fn in runs.items():
        best = (0.0, 0)
        for b in (1, 8, 32, 64, 128, 256):
            fn(b)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                fn(b)
                n += b
            best = max(best, (n / (time.perf_counter() - start), b))
        rows = best[0]
        out[name] = {"rows_per_s": rows, "batch": best[1], "rps": rows / 16 if name == "generate-16" else rows}
        print(f"in-process {name}: {rows:,.0f} rows/s at batch {best[1]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seconds", type=float, default=8, help="wrk duration per point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128], help="wrk connections")
    p.add_argument("--only", nargs="+", choices=list(SERVERS), default=list(SERVERS), help="servers to run")
    p.add_argument(
        "--out", default=str(REPO / "docs" / "benchmarks.json"), help="raw results (committed beside the report)"
    )
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument(
        "--in-process-seconds", type=float, default=0.5, help="time per batch size for the in-process ceiling"
    )
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: `make tools` (Debian's wrk package)", file=sys.stderr)
        return 2
    results: dict = {"servers": {}, "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory() as tmp:
        bodies = payloads(Path(tmp))
        total = len(args.only) * len(ENDPOINTS) * len(args.concurrency)
        done = 0
        for kind in args.only:
            port = free_port()
            proc = start(kind, port, Path(tmp) / f"{kind}.log")
            try:
                table = results["servers"][kind] = {}
                for ep in ENDPOINTS:
                    check(f"http://127.0.0.1:{port}", bodies[ep])
                    wrk(f"http://127.0.0.1:{port}", bodies[ep], 8, 2)  # warm-up
                    for c in args.concurrency:
                        time.sleep(1)  # let the previous point's queue drain
                        r = table.setdefault(ep, {})[str(c)] = wrk(
                            f"http://127.0.0.1:{port}", bodies[ep], c, args.seconds
                        )
                        done += 1
                        print(
                            f"[{done}/{total}] {kind:18s} {ep:15s} c={c:<4d} {r['rps']:8.1f} req/s  "
                            f"p50 {r['p50_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}",
                            flush=True,
                        )
            finally:
                stop(proc)
    results["in_process"] = in_process(args.in_process_seconds)
    results["machine"] = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if not args.no_docs:
        from bench.report import write_report

        write_report(results, args)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
