"""`python -m bench.ab`: two commits' servers, interleaved in one session (A B B A ...).

    python -m bench.ab --base ec30735 --new HEAD [--base-reverts C1,C2] [--rounds 4] [--seconds 6]

Each side is `make serve` as its commit has it, from a temporary git worktree (never this
checkout, which may hold uncommitted work). `--base-reverts` makes the base the new commit
with those commits reverted: the A/B of exactly those commits when others landed between.
The servers run in turn, ABBA, so drift on this shared machine cancels; wrk drives each
endpoint (bench.harness payloads: /classify image and text, /generate n=16, /v2 infer)
after a warm-up. Prints the median req/s and p50 of each side and new/base ratios, and
writes them as JSON (--out); docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.harness import REPO, check, free_port, machine, payloads, start, stop, wrk

ENDPOINTS = ("classify-image", "classify-text", "generate-16", "v2-digits")


def worktree(tmp: Path, name: str, ref: str, reverts: list[str]) -> Path:
    """A detached worktree of `ref`, with `reverts` undone in its files (nothing is committed)."""
    path = tmp / name
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref], check=True)
    for commit in reverts:
        subprocess.run(["git", "-C", str(path), "revert", "--no-commit", commit], check=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default="HEAD~1", help="the commit to compare against")
    p.add_argument("--new", default="HEAD", help="the commit measured")
    p.add_argument("--base-reverts", default="", help="comma-separated commits: the base is --new without them")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--endpoints", default=",".join(ENDPOINTS))
    p.add_argument("--out", default=str(REPO / "docs" / "ab_bench.json"))
    args = p.parse_args(argv)
    reverts = [c for c in args.base_reverts.split(",") if c]
    base_ref = args.new if reverts else args.base
    names = args.endpoints.split(",")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sides = {}
        try:
            sides["base"] = worktree(tmp, "base", base_ref, reverts)
            sides["new"] = worktree(tmp, "new", args.new, [])
            bodies = payloads(tmp)
            for r in range(args.rounds):
                for side in ("base", "new") if r % 2 == 0 else ("new", "base"):  # ABBA
                    port = free_port()
                    proc = start("deepserve", port, tmp / f"{side}-{r}.log", repo=sides[side])
                    url = f"http://127.0.0.1:{port}"
                    try:
                        for name in names:
                            check(url, bodies[name])
                            wrk(url, bodies[name], 8, 2)  # warm-up
                            time.sleep(1)
                            got = wrk(url, bodies[name], args.connections, args.seconds)
                            if got["errors"]:
                                raise RuntimeError(f"{side} {name}: {got['errors']} errors")
                            runs.setdefault(f"{side}:{name}", []).append(got)
                            print(
                                f"round {r + 1}/{args.rounds} {side} {name}: {got['rps']:.0f} req/s, "
                                f"p50 {got['p50_ms']:.2f} ms",
                                flush=True,
                            )
                    finally:
                        stop(proc)
        finally:
            for path in sides.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)
    result = {
        "base": base_ref + "".join(f" -{c}" for c in reverts),
        "new": args.new,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "connections": args.connections,
        "machine": machine(),
        "endpoints": {},
    }
    for name in names:
        row = {}
        for side in ("base", "new"):
            row[f"{side}_rps"] = round(statistics.median(x["rps"] for x in runs[f"{side}:{name}"]), 1)
            row[f"{side}_p50_ms"] = round(statistics.median(x["p50_ms"] for x in runs[f"{side}:{name}"]), 3)
            row[f"{side}_rps_runs"] = [round(x["rps"], 1) for x in runs[f"{side}:{name}"]]
        row["new/base_rps"] = round(row["new_rps"] / row["base_rps"], 3)
        result["endpoints"][name] = row
        print(
            f"{name}: base {row['base_rps']:.0f} req/s, new {row['new_rps']:.0f} req/s, "
            f"new/base {row['new/base_rps']:.3f} (p50 {row['base_p50_ms']:.2f} -> {row['new_p50_ms']:.2f} ms)",
            flush=True,
        )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
