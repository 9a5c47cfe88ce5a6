"""`make bench-priority`: the noisy neighbour, with and without priority classes.

    python -m bench.priority [--workers 1] [--rounds 2] [--seconds 10]

One deepserve server; bystanders (wrk, 2 connections) POST /classify with a 28×28 digit while a
heavy client (wrk, 48 connections) POSTs /generate n=64 (legal, heavy): first alone, then with
the heavy client at the default class (`interactive`), then marked `X-Priority: batch`,
interleaved over rounds. Prints the bystanders' p50/p95/p99 and the heavy client's goodput
per phase and writes docs/priority_bench.json; docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
from pathlib import Path

from bench.harness import FIXTURES, REPO, check, free_port, start, stop, wrk

PHASES = ("alone", "heavy-interactive", "heavy-batch")


def bodies(tmp: Path) -> tuple[tuple, dict[str, tuple]]:
    digit = (FIXTURES / "mnist_test0_label7.png").read_bytes()
    f = tmp / "classify.body"
    f.write_bytes(
        b'--BENCH\r\nContent-Disposition: form-data; name="image"; filename="7.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + digit + b"\r\n--BENCH--\r\n"
    )
    classify = ("/classify", "multipart/form-data; boundary=BENCH", f, "")
    g = tmp / "generate.json"
    g.write_text('{"n": 64}')
    heavy = {
        "heavy-interactive": ("/generate", "application/json", g, ""),
        "heavy-batch": ("/generate", "application/json", g, "X-Priority: batch"),
    }
    return classify, heavy


def phase(url: str, classify: tuple, heavy: tuple | None, seconds: float) -> dict:
    out: dict = {}
    if heavy is None:
        out["bystanders"] = wrk(url, classify, 2, seconds)
        return out

    def run_heavy() -> None:
        out["heavy"] = wrk(url, heavy, 48, seconds + 2)

    t = threading.Thread(target=run_heavy)
    t.start()
    import time

    time.sleep(1.0)  # the heavy client is at full load before the bystanders measure
    out["bystanders"] = wrk(url, classify, 2, seconds)
    t.join()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.priority", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--out", default=str(REPO / "docs" / "priority_bench.json"))
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {k: [] for k in PHASES}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        classify, heavy = bodies(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start("deepserve", port, tmp / "server.log", {"DEEPSERVE_WORKERS": str(args.workers)})
        try:
            check(url, classify)
            for body in heavy.values():
                check(url, body)
            for r in range(args.rounds):
                for name in PHASES if r % 2 == 0 else reversed(PHASES):
                    result = phase(url, classify, heavy.get(name), args.seconds)
                    runs[name].append(result)
                    b = result["bystanders"]
                    h = result.get("heavy", {})
                    print(
                        f"round {r + 1} {name:18s} bystanders p50 {b['p50_ms']:6.1f} p95 {b['p95_ms']:6.1f} "
                        f"p99 {b['p99_ms']:6.1f} ms, errors {b['errors']}"
                        + (f"; heavy {h.get('rps', 0):5.1f} req/s, errors {h.get('errors')}" if h else ""),
                        flush=True,
                    )
        finally:
            stop(proc)
    summary = {}
    for name, results in runs.items():
        summary[name] = {
            "bystander_p50_ms": statistics.median(x["bystanders"]["p50_ms"] for x in results),
            "bystander_p95_ms": statistics.median(x["bystanders"]["p95_ms"] for x in results),
            "bystander_p99_ms": statistics.median(x["bystanders"]["p99_ms"] for x in results),
            "bystander_errors": sum(x["bystanders"]["errors"] for x in results),
        }
        if name != "alone":
            summary[name]["heavy_rps"] = statistics.median(x["heavy"]["rps"] for x in results)
            summary[name]["heavy_errors"] = sum(x["heavy"]["errors"] for x in results)
    report = {"workers": args.workers, "rounds": args.rounds, "seconds": args.seconds, "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
