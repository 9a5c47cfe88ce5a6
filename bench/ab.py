"""`python -m bench.ab`: two commits' servers, side by side in one session, interleaved.

    python -m bench.ab --base ec30735 --new HEAD [--base-reverts C1,C2] [--rounds 12] [--seconds 3]
    python -m bench.ab --base 99142e7 --new HEAD --inprocess [--rounds 300]

Each side is `make serve` as its commit has it, from a temporary git worktree (never this
checkout, which may hold uncommitted work). `--base-reverts` makes the base the new commit
with those commits reverted: the A/B of exactly those commits when others landed between.
`DEEPSERVE_EXPORTED_DIR`, when set, gives both sides the same model files.

Both servers run at once, pinned to the same core, and wrk drives them in short alternating
bursts (A B B A ...; bench.harness payloads: /classify image and text, /generate n=16, /v2
infer): this machine's drift (other tenants, ±5–10% from one minute to the next) hits both
sides of a pair alike. Each burst also reads the server's CPU seconds from /proc, so a side's
cost is CPU per request as well as req/s. What it reports per endpoint: the median of the
paired new/base ratios (with their quartiles), for req/s and for CPU per request.

`--inprocess` measures the path without HTTP: each side's ASGI app is called directly by 32
concurrent clients in its own process (same core), and the two processes run chunks of
/classify text requests in lockstep, A then B then A...: CPU µs per request, paired.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import PIN, REPO, check, cpu_seconds, free_port, machine, payloads, start, stop, wrk

ENDPOINTS = ("classify-image", "classify-text", "generate-16", "v2-digits")


def worktree(tmp: Path, name: str, ref: str, reverts: list[str]) -> Path:
    """A detached worktree of `ref`, with `reverts` undone in its files (nothing is committed)."""
    path = tmp / name
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref], check=True)
    for commit in reverts:
        subprocess.run(["git", "-C", str(path), "revert", "--no-commit", commit], check=True)
    return path


def paired(base: list[float], new: list[float]) -> dict:
    """The median of new/base over the pairs, and its quartiles."""
    r = sorted(b / a for a, b in zip(base, new))
    return {
        "median": round(statistics.median(r), 4),
        "q1": round(r[len(r) // 4], 4),
        "q3": round(r[(3 * len(r)) // 4], 4),
    }


def over_http(sides: dict[str, Path], names: list[str], args, tmp: Path) -> dict:
    bodies = payloads(tmp)
    procs, urls, runs = {}, {}, {}
    try:
        for side, repo in sides.items():
            port = free_port()
            procs[side] = start("deepserve", port, tmp / f"{side}.log", repo=repo)
            urls[side] = f"http://127.0.0.1:{port}"
        for name in names:
            for side in sides:
                check(urls[side], bodies[name])
                wrk(urls[side], bodies[name], 8, 2)  # warm-up
            for r in range(args.rounds):
                for side in ("base", "new") if r % 2 == 0 else ("new", "base"):  # ABBA
                    time.sleep(0.5)  # the other side's connections are closed
                    before = cpu_seconds(procs[side].pid)
                    got = wrk(urls[side], bodies[name], args.connections, args.seconds)
                    got["cpu_us"] = (cpu_seconds(procs[side].pid) - before) / max(1, got["requests"]) * 1e6
                    if got["errors"]:
                        raise RuntimeError(f"{side} {name}: {got['errors']} errors")
                    runs.setdefault(f"{side}:{name}", []).append(got)
                    print(
                        f"round {r + 1}/{args.rounds} {side} {name}: {got['rps']:.0f} req/s, "
                        f"{got['cpu_us']:.0f} µs CPU a request, p50 {got['p50_ms']:.2f} ms",
                        flush=True,
                    )
    finally:
        for proc in procs.values():
            stop(proc)
    out = {}
    for name in names:
        base, new = runs[f"base:{name}"], runs[f"new:{name}"]
        row = {}
        for side, got in (("base", base), ("new", new)):
            row[f"{side}_rps"] = round(statistics.median(x["rps"] for x in got), 1)
            row[f"{side}_cpu_us"] = round(statistics.median(x["cpu_us"] for x in got), 1)
            row[f"{side}_p50_ms"] = round(statistics.median(x["p50_ms"] for x in got), 3)
            row[f"{side}_rps_runs"] = [round(x["rps"], 1) for x in got]
            row[f"{side}_cpu_us_runs"] = [round(x["cpu_us"], 1) for x in got]
        row["new/base_rps"] = paired([x["rps"] for x in base], [x["rps"] for x in new])
        row["new/base_cpu_per_request"] = paired([x["cpu_us"] for x in base], [x["cpu_us"] for x in new])
        out[name] = row
        print(
            f"{name}: base {row['base_rps']:.0f} req/s, new {row['new_rps']:.0f} req/s; paired new/base: "
            f"req/s {row['new/base_rps']['median']:.3f} (quartiles {row['new/base_rps']['q1']:.3f}–"
            f"{row['new/base_rps']['q3']:.3f}), CPU a request {row['new/base_cpu_per_request']['median']:.3f} "
            f"(quartiles {row['new/base_cpu_per_request']['q1']:.3f}–{row['new/base_cpu_per_request']['q3']:.3f})",
            flush=True,
        )
    return out


def in_process(sides: dict[str, Path], args) -> dict:
    """/classify text through each side's ASGI app, no HTTP, the two processes in lockstep."""
    procs, got = {}, {"base": [], "new": []}
    worker = REPO / "bench" / "ab_inprocess.py"
    try:
        for side, repo in sides.items():
            env = {**os.environ, "PYTHONPATH": str(repo)}
            cmd = [sys.executable, str(worker), str(args.chunk)]
            procs[side] = subprocess.Popen(
                ["taskset", "-c", "1", *cmd] if PIN else cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
        for side, p in procs.items():
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{side}: the in-process app did not start")
        for r in range(args.rounds):
            for side in ("base", "new") if r % 2 == 0 else ("new", "base"):
                procs[side].stdin.write("go\n")
                procs[side].stdin.flush()
                got[side].append(float(procs[side].stdout.readline()))
            if (r + 1) % 50 == 0:
                print(f"chunk {r + 1}/{args.rounds}", flush=True)
    finally:
        for p in procs.values():
            p.kill()
    row = {
        "chunk_requests": args.chunk,
        "base_cpu_us": round(statistics.median(got["base"]), 1),
        "new_cpu_us": round(statistics.median(got["new"]), 1),
        "new/base_cpu_per_request": paired(got["base"], got["new"]),
    }
    ratio = row["new/base_cpu_per_request"]
    print(
        f"classify-text in-process: base {row['base_cpu_us']} µs, new {row['new_cpu_us']} µs CPU a request; "
        f"paired new/base {ratio['median']:.4f} (quartiles {ratio['q1']:.3f}–{ratio['q3']:.3f})",
        flush=True,
    )
    return {"classify-text-inprocess": row}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default="HEAD~1", help="the commit to compare against")
    p.add_argument("--new", default="HEAD", help="the commit measured")
    p.add_argument("--base-reverts", default="", help="comma-separated commits: the base is --new without them")
    p.add_argument("--rounds", type=int, default=12, help="ABBA pairs (bursts per side; chunks with --inprocess)")
    p.add_argument("--seconds", type=float, default=3, help="one wrk burst")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--endpoints", default=",".join(ENDPOINTS))
    p.add_argument("--inprocess", action="store_true", help="/classify text without HTTP, CPU per request")
    p.add_argument("--chunk", type=int, default=640, help="requests per in-process chunk")
    p.add_argument("--out", default=str(REPO / "docs" / "ab_bench.json"))
    args = p.parse_args(argv)
    reverts = [c for c in args.base_reverts.split(",") if c]
    base_ref = args.new if reverts else args.base
    names = args.endpoints.split(",")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sides = {}
        try:
            sides["base"] = worktree(tmp, "base", base_ref, reverts)
            sides["new"] = worktree(tmp, "new", args.new, [])
            endpoints = in_process(sides, args) if args.inprocess else over_http(sides, names, args, tmp)
        finally:
            for path in sides.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)
    result = {
        "base": base_ref + "".join(f" -{c}" for c in reverts),
        "new": args.new,
        "mode": "in-process, lockstep chunks" if args.inprocess else "HTTP, both servers up, alternating wrk bursts",
        "rounds": args.rounds,
        "seconds": None if args.inprocess else args.seconds,
        "connections": 32 if args.inprocess else args.connections,
        "models": os.environ.get("DEEPSERVE_EXPORTED_DIR", "each side's own exported/"),
        "machine": machine(),
        "endpoints": endpoints,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
