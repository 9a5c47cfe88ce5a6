"""What tracing costs on /classify (image and text): off, sample rate 0.01 and 1, ABBA-interleaved.

    python -m bench.tracing [--rounds 2] [--seconds 8] [--connections 32]

"off" is deepserve as shipped (no exporter configured: no span objects at all); the other
two export over OTLP/HTTP to a sink started here that accepts and discards the batches.
Prints medians and ratios to "off" and writes docs/tracing_bench.json.
"""

from __future__ import annotations

import argparse
import http.server
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import REPO, check, free_port, payloads, start, stop, wrk


class Sink(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP endpoint that answers 200 and counts what it was sent."""

    def __init__(self):
        self.batches = 0
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                sink.batches += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def env_for(rate: float | None, endpoint: str) -> dict[str, str]:
    if rate is None:
        return {}
    return {
        "BENTOML_CONFIG_OPTIONS": f"services.deepserve.tracing.exporter_type=otlp "
        f"services.deepserve.tracing.sample_rate={rate} services.deepserve.tracing.otlp.protocol=http "
        f"services.deepserve.tracing.otlp.endpoint={endpoint}"
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tracing")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "docs" / "tracing_bench.json"))
    args = p.parse_args(argv)
    sink = Sink()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    sides = {"off": None, "rate 0.01": 0.01, "rate 1": 1.0}
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bodies = payloads(tmp)
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                port = free_port()
                proc = start("deepserve", port, tmp / f"{side}-{r}.log", env_for(sides[side], endpoint))
                url = f"http://127.0.0.1:{port}"
                try:
                    for ep in ("classify-image", "classify-text"):
                        check(url, bodies[ep])
                        wrk(url, bodies[ep], 8, 2)
                        time.sleep(1)
                        rps = wrk(url, bodies[ep], args.connections, args.seconds)["rps"]
                        runs.setdefault(f"{side}:{ep}", []).append(rps)
                        print(f"round {r + 1}/{args.rounds} {side} {ep}: {rps:.0f} req/s", flush=True)
                finally:
                    stop(proc)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "rounds": args.rounds,
        "connections": args.connections,
        "otlp_batches_received": sink.batches,
        "req_per_s": {},
    }
    for ep in ("classify-image", "classify-text"):
        off = med[f"off:{ep}"]
        result["req_per_s"][ep] = {
            s: {"rps": round(med[f"{s}:{ep}"], 1), "vs_off": round(med[f"{s}:{ep}"] / off, 3)} for s in sides
        }
        print(ep, {s: f"{med[f'{s}:{ep}']:.0f} ({med[f'{s}:{ep}'] / off:.2f}x)" for s in sides}, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    sink.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
