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
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import FIXTURES, REPO, check, free_port, machine, payloads, start, stop, wrk

SERVERS = {
    "deepserve": "deepserve (make serve defaults)",
    "deepserve-nobatch": "deepserve, batching off",
    "deepserve-notiming": "deepserve without Server-Timing and its stage histogram (what they cost)",
    "fastapi": "FastAPI + uvicorn, one request at a time",
    "litserve": "LitServe, batch 32 / 5 ms",
    "noop": "no-op server, same upload (ceiling)",
}
ENDPOINTS = ["classify-image", "classify-text", "generate-16", "denoise"]
# deepserve only: the Open Inference Protocol beside /classify, and the previous digits version
# (no out-of-distribution head, no calibration) beside the active one: what trust costs
EXTRA = {"deepserve": ["v2-digits", "classify-image-previous"], "deepserve-notiming": []}


def endpoints(kind: str) -> list[str]:
    if kind == "deepserve-notiming":
        return ["classify-image", "classify-text"]
    return ENDPOINTS + EXTRA.get(kind, [])


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


AB = {  # small effects, measured by alternating the two servers: drift between minutes hits both
    "server-timing": ("deepserve", "deepserve-notiming", ["classify-image", "classify-text"]),
    "trust": ("deepserve", "deepserve", ["classify-image", "classify-image-previous"]),
}


def interleaved(rounds: int, seconds: float = 8, connections: int = 32) -> dict:
    """Medians of `rounds` alternating runs per comparison: {name: {endpoint: {kind: rps}}}."""
    import statistics

    if rounds <= 0:
        return {}
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        bodies = payloads(Path(tmp))
        for name, (a, b, eps) in AB.items():
            runs: dict = {}
            for r in range(rounds):
                for kind in dict.fromkeys((a, b) if r % 2 == 0 else (b, a)):  # ABBA: order effects cancel
                    port = free_port()
                    proc = start(kind, port, Path(tmp) / f"ab-{kind}-{r}.log")
                    url = f"http://127.0.0.1:{port}"
                    try:
                        for ep in eps:
                            check(url, bodies[ep])
                            wrk(url, bodies[ep], 8, 2)
                            time.sleep(1)
                            rps = wrk(url, bodies[ep], connections, seconds)["rps"]
                            runs.setdefault(f"{kind}:{ep}", []).append(rps)
                            print(f"A/B {name} round {r + 1}/{rounds} {kind} {ep}: {rps:.0f} req/s", flush=True)
                    finally:
                        stop(proc)
            out[name] = {k: round(statistics.median(v), 1) for k, v in runs.items()}
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
    p.add_argument("--ab-rounds", type=int, default=4, help="rounds of each interleaved A/B comparison (0: none)")
    p.add_argument(
        "--in-process-seconds", type=float, default=0.5, help="time per batch size for the in-process ceiling"
    )
    p.add_argument("--ab-only", action="store_true", help="rerun only the interleaved A/B into the existing results")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: `make tools` (Debian's wrk package)", file=sys.stderr)
        return 2
    if args.ab_only:
        results = json.loads(Path(args.out).read_text())
        results["ab"] = interleaved(args.ab_rounds)
        Path(args.out).write_text(json.dumps(results, indent=2))
        if not args.no_docs:
            from bench.report import write_report

            write_report(results, args)
        return 0
    results: dict = {"servers": {}, "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory() as tmp:
        bodies = payloads(Path(tmp))
        total = sum(len([e for e in endpoints(k) if e in bodies]) for k in args.only) * len(args.concurrency)
        done = 0
        for kind in args.only:
            port = free_port()
            proc = start(kind, port, Path(tmp) / f"{kind}.log")
            try:
                table = results["servers"][kind] = {}
                for ep in [e for e in endpoints(kind) if e in bodies]:
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
    # the A/B pairs compare deepserve with itself: only when deepserve is being measured
    results["ab"] = interleaved(args.ab_rounds) if "deepserve" in args.only else {}
    results["machine"] = machine()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if not args.no_docs:
        from bench.report import write_report

        write_report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
