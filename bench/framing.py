"""`make bench-framing`: what server-side framing costs, old commit against this checkout.

    python -m bench.framing [--base 9a7571c] [--rounds 4] [--seconds 8] [--connections 32]

Both servers are `make serve` as each commit has it (the base in a temporary git worktree),
started in turn, ABBA, so drift on this shared machine cancels; wrk drives POST /classify
(digits) with three uploads: a 28×28 MNIST test PNG (passed through unframed), a 280×280
canvas drawing and a 640×480 phone photo (framed, in the decode pool). Prints medians and
ratios and writes docs/framing_bench.json; docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import FIXTURES, REPO, check, free_port, start, stop, wrk

BASE = "9a7571c"  # main before framing


def bodies(tmp: Path) -> dict[str, tuple]:
    from training import wild

    digit = np.load(FIXTURES / "mnist_test500.npz")["images"][:1]
    uploads = {
        "png-28x28": (FIXTURES / "mnist_test0_label7.png").read_bytes(),
        "canvas-280x280": wild.render("canvas", digit, 1)[0],
        "photo-640x480": wild.render("photo", digit, 1)[0],
    }
    out = {}
    for name, data in uploads.items():
        body = (
            b'--BENCH\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--BENCH--\r\n"
        )
        f = tmp / f"{name}.body"
        f.write_bytes(body)
        out[name] = ("/classify", "multipart/form-data; boundary=BENCH", f, "")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.framing", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default=BASE, help="the commit to compare against")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "docs" / "framing_bench.json"))
    args = p.parse_args(argv)
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = tmp / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.base], check=True)
        try:
            payload = bodies(tmp)
            sides = {"base": base, "new": REPO}
            for r in range(args.rounds):
                for side in ("base", "new") if r % 2 == 0 else ("new", "base"):  # ABBA
                    port = free_port()
                    proc = start("deepserve", port, tmp / f"{side}-{r}.log", repo=sides[side])
                    url = f"http://127.0.0.1:{port}"
                    try:
                        for name, body in payload.items():
                            check(url, body)
                            wrk(url, body, 8, 2)
                            time.sleep(1)
                            rps = wrk(url, body, args.connections, args.seconds)["rps"]
                            runs.setdefault(f"{side}:{name}", []).append(rps)
                            print(f"round {r + 1}/{args.rounds} {side} {name}: {rps:.0f} req/s", flush=True)
                    finally:
                        stop(proc)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"base": args.base, "rounds": args.rounds, "connections": args.connections, "req_per_s": {}}
    for name in payload:
        b, n = med[f"base:{name}"], med[f"new:{name}"]
        result["req_per_s"][name] = {"base": round(b, 1), "new": round(n, 1), "new/base": round(n / b, 3)}
        print(f"{name}: base {b:.0f} req/s, new {n:.0f} req/s, new/base {n / b:.3f}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
