"""One side of `python -m bench.ab --inprocess` (run as a script with PYTHONPATH at that side's
worktree, so `service` is that commit's): the ASGI app called directly, 32 concurrent
/classify text clients. Prints `ready`, then for each `go` on stdin runs one chunk of
requests and prints its CPU µs per request. Any answer but 200 stops it."""

import asyncio
import json
import os
import sys
import time

from service.app import build_app
from service.core import Core
from service.settings import Settings

CLIENTS = 32
BODY = json.dumps({"text": "it 's a charming and often affecting journey . "}).encode()
SCOPE = {
    "type": "http",
    "method": "POST",
    "path": "/classify",
    "raw_path": b"/classify",
    "query_string": b"",
    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
    "client": ("127.0.0.1", 1),
    "server": ("127.0.0.1", 2),
    "scheme": "http",
    "http_version": "1.1",
    "root_path": "",
}


async def main(chunk: int) -> None:
    core = Core(Settings())
    app = build_app(core)
    await core.warmup()

    async def one() -> None:
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": BODY, "more_body": False}
            await asyncio.sleep(3600)  # the client stays connected

        async def send(msg):
            if msg["type"] == "http.response.start" and msg["status"] != 200:
                raise SystemExit(f"answer {msg['status']}")

        await app(dict(SCOPE), receive, send)

    async def client(n: int) -> None:
        for _ in range(n):
            await one()

    per_client = max(1, chunk // CLIENTS)
    await asyncio.gather(*(client(per_client) for _ in range(CLIENTS)))  # warm
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
        started = time.process_time()
        await asyncio.gather(*(client(per_client) for _ in range(CLIENTS)))
        print((time.process_time() - started) / (per_client * CLIENTS) * 1e6, flush=True)
    core.shutdown()
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
