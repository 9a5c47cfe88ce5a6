"""One client must never hurt another: hostile traffic against the real server, over real
sockets, while bystanders measure what a normal client gets.

Each test is one class of attack (docs/operations.md, "Threat model"): images whose decoded
size is far beyond their file size, extreme shapes, per-request pixel floods, stalled and
abandoned uploads, clients that hang up while queued, and random paths that would otherwise
grow the metrics without bound.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import io
import json
import random
import re
import resource
import socket
import string
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.conftest import FIXTURES
from tests.service.conftest import Server

pytestmark = pytest.mark.timing  # latency or windows under load: make test-noisy runs these beside a busy core

SEVEN = (FIXTURES / "mnist_test0_label7.png").read_bytes()


def blank_png(width: int, height: int) -> bytes:
    """A valid PNG of zeros: a few KB on the wire, width × height pixels once decoded."""
    buf = io.BytesIO()
    Image.new("L", (width, height), 0).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def tree_rss(pid: int) -> int:
    total = 0
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class Bystander(threading.Thread):
    """A polite client and a load balancer's probe, side by side with an attack: every answer
    and its latency are recorded."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.results = url, threading.Event(), []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                for kind in ("classify", "readyz"):
                    start = time.monotonic()
                    try:
                        if kind == "classify":
                            r = c.post("/classify", files={"image": ("7.png", SEVEN, "image/png")})
                            ok = r.status_code == 200 and r.json()["label"] == "7"
                        else:
                            ok = c.get("/readyz").status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    self.results.append((kind, ok, time.monotonic() - start))
                time.sleep(0.02)

    def report(self) -> dict:
        self.stop.set()
        self.join(30)
        lat = {k: [t for kind, _, t in self.results if kind == k] for k in ("classify", "readyz")}
        return {
            "failed": [r for r in self.results if not r[1]],
            "max_s": {k: max(v) for k, v in lat.items()},
            "p95_s": {k: float(np.percentile(v, 95)) for k, v in lat.items()},
            "n": len(self.results),
        }


def baseline(url: str, seconds: float = 1.5) -> dict:
    """The bystander's own latencies on this machine right now, with no attack: what an
    attack's figures are compared with (a loaded CI machine is slower for both)."""
    quiet = Bystander(url)
    quiet.start()
    time.sleep(seconds)
    return quiet.report()


def not_held_up(during: dict, quiet: dict) -> None:
    """Bystanders are not held up: p95 within 5x the quiet p95 (and never above 1 s), so a
    probe or a small request never waits behind the attack's decoding."""
    for kind in ("readyz", "classify"):
        bound = min(1.0, max(0.2, 5 * quiet["p95_s"][kind]))
        assert during["p95_s"][kind] < bound, (kind, during, quiet)


def attack(url: str, bodies: list[bytes], path: str = "/classify", timeout: float = 60) -> list[int]:
    """Send every body at once (one image each); the statuses that came back."""

    def one(body: bytes) -> int:
        try:
            return httpx.post(url + path, files={"image": ("a.png", body, "image/png")}, timeout=timeout).status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def under_attack(server: Server, bodies: list[bytes], rounds: int = 2) -> tuple[list, dict, int]:
    idle_rss = tree_rss(server.proc.pid)
    peak, watching = [idle_rss], threading.Event()

    def watch():
        while not watching.is_set():
            peak.append(tree_rss(server.proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    bystander = Bystander(server.url)
    bystander.start()
    time.sleep(0.5)
    statuses = []
    for _ in range(rounds):
        statuses += attack(server.url, bodies)
    report = bystander.report()
    watching.set()
    watcher.join()
    return statuses, report, max(peak) - idle_rss


@pytest.mark.parametrize(
    "shape",
    [(62_500, 256), (256, 62_500), (16_000_000, 1), (4000, 4000)],
    ids=["wide strip 62500x256", "tall strip 256x62500", "one row of 16M", "4000x4000 blank"],
)
def test_images_that_decode_to_millions_of_pixels_do_not_hurt_bystanders(server, shape):
    """A ~20 KB file that decodes to 16 M pixels (under the per-image limit, so it is served):
    bounded memory (never max(w, h)² — a 62,500² canvas was 3.9 GB), decoded off the event
    loop, so the probes and small requests next to it are not held up."""
    body = blank_png(*shape)
    assert len(body) < 100_000
    quiet = baseline(server.url)
    statuses, report, grew = under_attack(server, [body] * 4)
    assert set(statuses) <= {200, 503}, statuses  # served, or shed while the decoder is busy
    assert 200 in statuses
    assert not report["failed"], report["failed"][:5]
    not_held_up(report, quiet)
    assert grew < 1.0 * 2**30, f"memory grew by {grew / 2**20:.0f} MiB"


def test_pixels_are_budgeted_per_request_from_the_headers(server):
    """Three 16 M-pixel images in one request: 413 from the headers, before any decoding."""
    big = blank_png(4000, 4000)
    decodes = lambda lines: metric_total(lines, "deepserve_stage_seconds_count", 'stage="decode"')
    before = decodes(scrape_lines(server.url))
    r = httpx.post(
        server.url + "/classify", files=[("image", (f"{i}.png", big, "image/png")) for i in range(3)], timeout=30
    )
    assert r.status_code == 413 and "pixels together" in r.json()["error"], r.text
    assert r.json()["limit"] > 0
    # refused from the headers: the server's decode stage never ran for it (48 M pixels never decoded)
    assert decodes(scrape_lines(server.url)) == before


def test_a_thousand_stalled_uploads_change_nothing_for_a_normal_client():
    """Uploads that stop sending never count against max_concurrency (only requests whose
    body has arrived do) and get 408 after DEEPSERVE_BODY_IDLE_TIMEOUT_S."""
    stalled_count = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * stalled_count + 500  # the test's sockets and the server's (docs/operations.md)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} file descriptors (ulimit -n), the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    s = Server(env={"DEEPSERVE_MAX_CONCURRENCY": "16", "DEEPSERVE_BODY_IDLE_TIMEOUT_S": "4"})
    socks = []
    try:
        head = (
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            b"Content-Length: 100000\r\n\r\n--zz\r\n"
        )
        quiet = baseline(s.url)
        for _ in range(stalled_count):
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(head)
            socks.append(sock)
        started = time.monotonic()
        times = []
        with httpx.Client(base_url=s.url, timeout=10) as c:
            while time.monotonic() - started < 3:  # all 1,000 are stalled meanwhile
                t0 = time.monotonic()
                r = c.post("/classify", files={"image": ("7.png", SEVEN, "image/png")})
                assert r.status_code == 200 and r.json()["label"] == "7", r.text
                times.append(time.monotonic() - t0)
        bound = max(0.2, 5 * quiet["p95_s"]["classify"])  # against this machine's quiet p95, measured first
        assert len(times) >= 10 and float(np.percentile(times, 95)) < bound, (times, quiet["p95_s"])
        answered = 0
        for sock in socks:
            sock.settimeout(max(0.1, started + 15 - time.monotonic()))
            with contextlib.suppress(OSError):
                answered += sock.recv(64).startswith(b"HTTP/1.1 408")
        assert answered >= 0.99 * stalled_count, f"{answered} of {stalled_count} stalled uploads got 408"
        r = httpx.get(s.url + "/metrics").text
        assert re.search(r'deepserve_rejected_requests_total\{endpoint="/classify",reason="body_timeout"\} \d+', r)
    finally:
        for sock in socks:
            sock.close()
        s.stop()


def scrape_lines(url: str) -> list[str]:
    return [line for line in httpx.get(url + "/metrics", timeout=10).text.splitlines() if line and line[0] != "#"]


def metric_total(lines: list[str], name: str, *labels: str) -> float:
    """The sum of a metric's samples whose line carries every label given (`code="5` ...)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(name) and all(label in line for label in labels)
    )


def settled(url: str, name: str, *labels: str, quiet: float = 0.6, deadline: float = 20) -> list[str]:
    """Scrape until `name` stops changing for `quiet` seconds (the server has finished the
    work it accepted), instead of sleeping a fixed time."""
    end = time.monotonic() + deadline
    lines = scrape_lines(url)
    last, since = metric_total(lines, name, *labels), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.2)
        lines = scrape_lines(url)
        value = metric_total(lines, name, *labels)
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return lines
    return lines


def hang_up(sock: socket.socket) -> int | None:
    """Close a client's connection; the status of an answer already in its buffer, if one is.
    An answer that arrived before the hang-up reached the client (the server cannot tell a
    client that stopped reading from one that is slow): a machine that stalls the client
    past the server's hold makes such answers, and they are the client's, not a leak."""
    sock.setblocking(False)
    try:
        head = sock.recv(12, socket.MSG_PEEK)
    except (BlockingIOError, ConnectionError):
        head = b""
    sock.close()
    return int(head[9:12]) if head.startswith(b"HTTP/1.1 ") and head[9:12].isdigit() else None


def post_generate(sock: socket.socket, seed: int) -> None:
    body = json.dumps({"n": 64, "seed": seed}).encode()
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def test_clients_that_hang_up_cost_no_5xx_no_traceback_and_no_model_work(server):
    before = scrape_lines(server.url)
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\nContent-Length: 10000\r\n\r\n--zz\r\n"
    for _ in range(30):  # mid-upload
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(head)
        time.sleep(0.01)
        sock.close()

    def impatient(i: int) -> int | None:  # gives up after 50 ms, queued behind a burst of large generations
        sock = socket.create_connection(("127.0.0.1", server.port))
        post_generate(sock, i)
        time.sleep(0.05)
        return hang_up(sock)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answered = [code for code in pool.map(impatient, range(64)) if code is not None]
    lines = settled(server.url, "deepserve_batch_rows_sum", 'model="generator"')
    delta = lambda name, *labels: metric_total(lines, name, *labels) - metric_total(before, name, *labels)
    closed = delta("deepserve_rejected_requests_total", "client_closed")
    assert closed >= 30, [line for line in lines if "rejected" in line]
    # no 5xx for a client that had hung up: the only ones counted are answers that were already
    # in a client's buffer when it closed (none, unless this machine stalled the client past the hold)
    got_5xx = sum(1 for code in answered if code >= 500)
    assert delta("deepserve_http_requests_total", 'code="5') == got_5xx, (
        answered,
        [ln for ln in lines if 'code="5' in ln],
    )
    assert "Traceback" not in server.log() and "Exception in ASGI" not in server.log()
    # the generations whose clients were gone before their batch started never ran: fewer rows
    # than the 64 requests × 64 rows asked for reached the generator (counted from this test's start)
    rows = delta("deepserve_batch_rows_sum", 'model="generator"')
    assert 0 < rows < 64 * 64, rows


def test_every_5xx_counted_reached_a_client_and_hang_ups_while_shed_are_client_closed():
    """At capacity, requests wait for a slot and are shed (503) after a hold; those whose
    clients gave up meanwhile are counted as client_closed. The invariant: the server's 5xx
    count is exactly the 5xx its clients received, whichever path shed them.

    The overload is made, not hoped for: 32 connections are opened first, then every request
    is written in one tight loop, so all 32 arrive within a few milliseconds against 2 slots
    and 2 waiting places; the rest are shed after the 300-ms hold. One in four clients reads
    its answer; the others hang up after 50 ms, long before any shed answer exists."""
    server = Server(env={"DEEPSERVE_MAX_CONCURRENCY": "2", "DEEPSERVE_SHED_HOLD_MS": "300"})
    try:
        before = scrape_lines(server.url)
        received: list[int] = []
        for rnd in range(2):
            socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(32)]
            for i, sock in enumerate(socks):
                post_generate(sock, rnd * 32 + i)
            time.sleep(0.05)
            patient = []
            for i, sock in enumerate(socks):
                if i % 4:
                    code = hang_up(sock)  # gave up after 50 ms
                    if code is not None:  # unless a stalled client had its answer already
                        received.append(code)
                else:
                    patient.append(sock)
            for sock in patient:
                sock.settimeout(60)
                answer = http.client.HTTPResponse(sock)
                answer.begin()
                answer.read()
                received.append(answer.status)
                sock.close()
        lines = settled(server.url, "deepserve_rejected_requests_total", 'endpoint="/generate"')
        delta = lambda name, *labels: metric_total(lines, name, *labels) - metric_total(before, name, *labels)
        got_5xx = sum(1 for c in received if c >= 500)
        assert got_5xx >= 1, received  # the shed path ran for clients still there
        counted_5xx = delta("deepserve_http_requests_total", 'endpoint="/generate"', 'code="5')
        assert counted_5xx == got_5xx, (received, [ln for ln in lines if "/generate" in ln])
        closed = delta("deepserve_rejected_requests_total", 'endpoint="/generate"', "client_closed")
        assert closed >= 1, [line for line in lines if "rejected" in line]
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def test_random_paths_do_not_grow_the_metrics(server):
    rng = random.Random(0)

    def junk_path() -> str:
        kind = rng.choice(["plain", "static", "v2", "deep", "query", "long"])
        word = "".join(rng.choices(string.ascii_letters + string.digits + "-_.%", k=rng.randint(1, 30)))
        return {
            "plain": f"/{word}",
            "static": f"/static/{word}.js",
            "v2": f"/v2/models/{word}/infer",
            "deep": f"/{word}/{word}/{word}",
            "query": f"/classify?{word}={word}",
            "long": "/" + word * 200,
        }[kind]

    def flood(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for _ in range(n):
                c.request(rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]), junk_path())

    flood(200)
    before = scrape_lines(server.url)
    flood(3000)
    after = scrape_lines(server.url)
    # every label value comes from a fixed set, never from what a client sent
    endpoints = set(re.findall(r'endpoint="([^"]*)"', "\n".join(after)))
    routes = {
        "/classify",
        "/generate",
        "/compress",
        "/decompress",
        "/denoise",
        "/models",
        "/docs.json",
        "/openapi.json",
        "/schema.json",
        "/",
        "/docs",
        "/static/*",
        "unrouted",
        "/livez",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    routes |= {e for e in endpoints if e.startswith(("/v2", "/admin"))} & TEMPLATES
    assert endpoints <= routes, sorted(endpoints - routes)[:20]
    assert len(after) <= len(before) + 60, f"{len(before)} series before 3,000 random paths, {len(after)} after"


TEMPLATES = {
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/{name}",
    "/v2/models/{name}/ready",
    "/v2/models/{name}/config",
    "/v2/models/{name}/infer",
    "/v2/models/{name}/versions/{version}",
    "/v2/models/{name}/versions/{version}/ready",
    "/v2/models/{name}/versions/{version}/config",
    "/v2/models/{name}/versions/{version}/infer",
    "/admin/models/{family}/load",
    "/admin/models/{family}/rollback",
}


def test_slow_drip_uploads_are_cut_with_408_and_closed_while_a_slow_client_succeeds():
    """Bodies that progress but average under the minimum rate (one byte every 0.5 s: the idle
    rule never fires) get 408 `body_too_slow` within the grace + a couple of seconds and
    their sockets are closed; a 1 MB image over a 200 kB/s link still gets its answer;
    bystanders are not held up."""
    drips_count, grace = 300, 2.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * drips_count + 500
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} file descriptors (ulimit -n), the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    s = Server(env={"DEEPSERVE_BODY_RATE_GRACE_S": str(grace), "DEEPSERVE_BODY_MIN_RATE": "1024"})
    socks = []
    try:
        quiet = baseline(s.url)
        head = (
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        for _ in range(drips_count):
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(head)
            sock.setblocking(False)
            socks.append(sock)
        started = time.monotonic()
        bystander = Bystander(s.url)
        bystander.start()
        cut, answers = {}, {}
        while len(cut) < drips_count and time.monotonic() - started < grace + 8:
            for i, sock in enumerate(socks):
                if i in cut:
                    continue
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    try:
                        data = sock.recv(4096)
                    except ConnectionResetError:  # our last byte reached a socket it had closed: closed too
                        data = b""
                    answers[i] = answers.get(i, b"") + data
                    if not data:  # the server closed the connection
                        cut[i] = time.monotonic() - started
                        continue
                with contextlib.suppress(OSError):
                    sock.send(b"-")  # progress: one byte at a time
            time.sleep(0.5)
        report = bystander.report()
        assert len(cut) == drips_count, f"{drips_count - len(cut)} drips still open after {grace + 8} s"
        assert max(cut.values()) < grace + 4, sorted(cut.values())[-5:]
        got = [a for a in answers.values() if a.startswith(b"HTTP/1.1 408")]
        assert len(got) >= 0.99 * drips_count, f"only {len(got)} drips were answered 408"
        assert b"body_too_slow" in got[0] or b"bytes/s" in got[0], got[0][:300]
        not_held_up(report, quiet)
        metrics = httpx.get(s.url + "/metrics").text
        assert re.search(
            r'deepserve_rejected_requests_total\{endpoint="/classify",reason="body_too_slow"\} \d+', metrics
        )

        # a slow but reasonable client: a 1 MB image at 200 kB/s, straight to the server
        noise = np.random.default_rng(0).integers(0, 256, (1000, 1000), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noise).save(buf, format="PNG", compress_level=0)
        body = (
            b'--zz\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + buf.getvalue() + b"\r\n--zz--\r\n"
        )
        assert len(body) > 1_000_000
        slow = socket.create_connection(("127.0.0.1", s.port))
        slow.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        t0 = time.monotonic()
        for k in range(0, len(body), 20_000):  # 20 kB every 0.1 s = 200 kB/s
            slow.sendall(body[k : k + 20_000])
            time.sleep(max(0.0, t0 + (k // 20_000 + 1) * 0.1 - time.monotonic()))
        slow.settimeout(30)
        answer = slow.recv(4096)
        slow.close()
        assert time.monotonic() - t0 > 4  # it really was slow
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    finally:
        for sock in socks:
            sock.close()
        s.stop()
