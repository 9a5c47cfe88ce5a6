"""`make bench-shadow`: what a 100% shadow costs the primary, at moderate load and at saturation.

    python -m bench.shadow [--workers 2] [--rounds 2] [--seconds 8]

One deepserve server (2 workers) on a scratch copy of exported/ with a twin of the active digits
version (the same model under a new id) held as the candidate. wrk drives POST /classify with a
28×28 digit at moderate load (16 connections pausing 25 ms between requests: a paced load at
about a third of capacity) and at saturation (64 connections at full speed), alternately
with no rollout and with `shadow: 1.0`, interleaved (off on off on ...). Prints goodput and
p99 per phase and what happened to the mirrors (compared, dropped) at each load; writes
docs/shadow_bench.json, which docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import FIXTURES, REPO, check, free_port, start, stop, wrk
from service import repository

ADMIN = {"Authorization": "Bearer bench-admin"}
TWIN = "2099-06-01-twin"
LOADS = {"moderate": 16, "saturation": 64}  # connections; moderate ones pause PACE_MS between requests
PACE_MS = 25  # 16 connections x (25 ms + service time): ~550 req/s offered, about a third of capacity


def scratch_models(tmp: Path) -> Path:
    """exported/ copied, with the active digits version also registered as TWIN."""
    root = tmp / "exported"
    shutil.copytree(REPO / "exported", root, ignore=shutil.ignore_patterns(".status", ".manifest.lock"))
    m = repository.raw(root)
    src = root / "digits" / m["families"]["digits"]["active"]
    shutil.copytree(src, root / "digits" / TWIN)
    meta = json.loads((root / "digits" / TWIN / "digits.json").read_text())
    meta["version"] = TWIN
    (root / "digits" / TWIN / "digits.json").write_text(json.dumps(meta))
    m["models"]["digits"]["versions"][TWIN] = {
        "file": f"digits/{TWIN}/digits.onnx",
        "metadata": f"digits/{TWIN}/digits.json",
        "sha256": meta["sha256"],
    }
    (root / "manifest.json").write_text(json.dumps(m))
    return root


def tally(url: str) -> dict:
    r = httpx.get(url + "/admin/status", headers=ADMIN, timeout=30).json()["families"]["digits"]["rollout"]
    return (r.get("live") or {}).get("tally", {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shadow", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--out", default=str(REPO / "docs" / "shadow_bench.json"))
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {f"{load}-{mode}": [] for load in LOADS for mode in ("off", "shadow")}
    mirrors: dict[str, list[dict]] = {load: [] for load in LOADS}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = scratch_models(tmp)
        f = tmp / "classify.body"
        f.write_bytes(
            b'--BENCH\r\nContent-Disposition: form-data; name="image"; filename="7.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
            + (FIXTURES / "mnist_test0_label7.png").read_bytes()
            + b"\r\n--BENCH--\r\n"
        )
        body = ("/classify", "multipart/form-data; boundary=BENCH", f, "")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            "DEEPSERVE_WORKERS": str(args.workers),
            "DEEPSERVE_EXPORTED_DIR": str(models),
            "DEEPSERVE_ADMIN_KEY": ADMIN["Authorization"].split()[1],
        }
        proc = start("deepserve", port, tmp / "server.log", env)
        base = f"{url}/admin/models/digits"
        try:
            check(url, body)
            r = httpx.post(f"{base}/candidate", json={"version": TWIN}, headers=ADMIN, timeout=120)
            assert r.status_code == 200, r.text
            for rnd in range(args.rounds):
                for load, connections in LOADS.items():
                    for mode in ("off", "shadow") if rnd % 2 == 0 else ("shadow", "off"):
                        if mode == "shadow":
                            r = httpx.post(f"{base}/rollout", json={"shadow": 1.0}, headers=ADMIN, timeout=30)
                            assert r.status_code == 200, r.text
                            before = tally(url)
                        os.environ["BENCH_DELAY_MS"] = str(PACE_MS if load == "moderate" else 0)
                        result = wrk(url, body, connections, args.seconds)
                        if mode == "shadow":
                            time.sleep(1.5)  # every worker has saved its tally
                            after = tally(url)
                            keys = ("primary_requests", "shadow_sent", "shadow_compared", "shadow_dropped")
                            mirrors[load].append({k: after.get(k, 0) - before.get(k, 0) for k in keys})
                            r = httpx.delete(f"{base}/rollout", headers=ADMIN, timeout=30)
                            assert r.status_code == 200, r.text
                            r = httpx.post(f"{base}/candidate", json={"version": TWIN}, headers=ADMIN, timeout=120)
                            assert r.status_code == 200, r.text
                        runs[f"{load}-{mode}"].append(result)
                        print(
                            f"round {rnd + 1} {load:10s} {mode:6s} {result['rps']:7.1f} req/s "
                            f"p99 {result['p99_ms']:6.1f} ms errors {result['errors']}"
                            + (f"  mirrors {mirrors[load][-1]}" if mode == "shadow" else ""),
                            flush=True,
                        )
        finally:
            stop(proc)
    summary: dict = {}
    for load in LOADS:
        off, on = runs[f"{load}-off"], runs[f"{load}-shadow"]
        rps_off, rps_on = statistics.median(x["rps"] for x in off), statistics.median(x["rps"] for x in on)
        p99_off, p99_on = statistics.median(x["p99_ms"] for x in off), statistics.median(x["p99_ms"] for x in on)
        m = mirrors[load]
        sent = sum(x["shadow_sent"] for x in m)
        summary[load] = {
            "connections": LOADS[load],
            "goodput_off": rps_off,
            "goodput_shadow": rps_on,
            "goodput_ratio": rps_on / rps_off,
            "p99_ms_off": p99_off,
            "p99_ms_shadow": p99_on,
            "p99_ratio": p99_on / p99_off,
            "errors": sum(x["errors"] for x in off + on),
            "mirrored_share": sent and sum(x["shadow_compared"] for x in m) / sent,
            "dropped_share": sent and sum(x["shadow_dropped"] for x in m) / sent,
        }
    report = {"workers": args.workers, "rounds": args.rounds, "seconds": args.seconds, "summary": summary}
    report["runs"], report["mirrors"] = runs, mirrors
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
