"""deepserve load test: weighted users over every endpoint, real payloads, checked bodies.

    locust -f loadtests/locustfile.py --config loadtests/locust.conf --host http://127.0.0.1:3000

Payloads are the committed real test samples (tests/fixtures): MNIST and Fashion-MNIST test
images as PNG, SST-2 dev sentences. Every response body is validated (fields, types, images
decode to the right size); anything else is a failure. At the end, thresholds decide the exit
code: the overall fail ratio and each endpoint's p95 (`--max-fail-ratio`, `--max-p95-ms`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import random
from pathlib import Path

import numpy as np
from locust import FastHttpUser, between, events, task
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


def _labels(name: str) -> list[str]:
    """A model's labels, from its active version's metadata (through the manifest)."""
    manifest = json.loads((REPO / "exported" / "manifest.json").read_text())
    entry = manifest["models"][name]
    files = entry["versions"][manifest["families"][entry["family"]]["active"]]
    return json.loads((REPO / "exported" / files["metadata"]).read_text())["labels"]


LABELS = {name: _labels(name) for name in ("digits", "fashion", "sentiment")}
log = logging.getLogger("loadtest")


def _pngs(npz: str, n: int = 200) -> list[bytes]:
    images = np.load(FIXTURES / npz)["images"][:n]
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


MNIST, FASHION_PNGS = _pngs("mnist_test500.npz"), _pngs("fashion_test500.npz")
SENTENCES = [line.rsplit("\t", 1)[0] for line in (FIXTURES / "sst2_dev200.tsv").read_text().splitlines()[1:]]


class BadBody(Exception):
    """The response came back 200 but its body breaks the contract."""


def png_size(data: bytes) -> tuple[int, int]:
    try:
        img = Image.open(io.BytesIO(data), formats=("PNG",))
        img.load()
    except Exception as exc:
        raise BadBody(f"not a PNG: {exc}") from None
    return img.size


def check_classification(body: dict, labels: list[str], top_k: int) -> None:
    if body.get("label") not in labels or not isinstance(body.get("index"), int):
        raise BadBody(f"bad label/index: {str(body)[:200]}")
    if not 0.0 <= float(body.get("confidence", -1)) <= 1.0:
        raise BadBody("confidence out of [0, 1]")
    ranked = body.get("top_k")
    if not isinstance(ranked, list) or len(ranked) != top_k or ranked[0]["label"] != body["label"]:
        raise BadBody("top_k does not rank the label first")


class DeepServeUser(FastHttpUser):
    """One client of every endpoint, weighted roughly like a classification-heavy product."""

    wait_time = between(0.0, 0.05)

    def _checked(self, name: str, method: str, path: str, check, **kwargs):
        with self.client.request(method, path, name=name, catch_response=True, **kwargs) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return None
            try:
                result = check(r)
            except (BadBody, KeyError, TypeError, ValueError, binascii.Error) as exc:
                r.failure(f"bad body: {exc}")
                return None
            r.success()
            return result

    def _image(self, name: str, data: bytes, model: str, labels: list[str]):
        fields = {"model": model, "top_k": "3"}
        self._checked(
            name,
            "POST",
            "/classify",
            lambda r: check_classification(r.json(), labels, 3),
            files={"image": ("x.png", data, "image/png")},
            data=fields,
        )

    @task(6)
    def classify_digit(self):
        self._image("/classify digits", random.choice(MNIST), "digits", LABELS["digits"])

    @task(2)
    def classify_fashion(self):
        self._image("/classify fashion", random.choice(FASHION_PNGS), "fashion", LABELS["fashion"])

    @task(4)
    def classify_text(self):
        self._checked(
            "/classify text",
            "POST",
            "/classify",
            lambda r: check_classification(r.json(), LABELS["sentiment"], 2),
            data=json.dumps({"text": random.choice(SENTENCES)}),
            headers={"Content-Type": "application/json"},
        )

    @task(2)
    def generate(self):
        def check(r):
            body = r.json()
            if len(body["images"]) != 16 or body["digits"] != [7] * 16:
                raise BadBody("wrong number of images or digits")
            if png_size(base64.b64decode(body["images"][0])) != (28, 28):
                raise BadBody("generated image is not 28x28")

        self._checked(
            "/generate n=16",
            "POST",
            "/generate",
            check,
            data=json.dumps({"n": 16, "digit": 7, "format": "json"}),
            headers={"Content-Type": "application/json"},
        )

    @task(2)
    def compress_then_decompress(self):
        def check(r):
            body = r.json()
            if body["bytes"] != len(base64.b64decode(body["code"], validate=True)):
                raise BadBody("code length differs from 'bytes'")
            return body["code"]

        code = self._checked(
            "/compress", "POST", "/compress", check, files={"image": ("x.png", random.choice(MNIST), "image/png")}
        )
        if code is None:
            return

        def check_png(r):
            if png_size(r.content) != (28, 28):
                raise BadBody("decompressed image is not 28x28")

        self._checked(
            "/decompress",
            "POST",
            "/decompress",
            check_png,
            data=json.dumps({"code": code}),
            headers={"Content-Type": "application/json"},
        )

    @task(2)
    def denoise(self):
        def check(r):
            if png_size(r.content) != (28, 28):
                raise BadBody("denoised image is not 28x28")

        self._checked(
            "/denoise", "POST", "/denoise", check, files={"image": ("x.png", random.choice(MNIST), "image/png")}
        )


@events.init_command_line_parser.add_listener
def _thresholds(parser):
    parser.add_argument("--max-fail-ratio", type=float, default=0.0, help="exit 1 above this fail ratio")
    parser.add_argument("--max-p95-ms", type=float, default=1000.0, help="exit 1 if any endpoint's p95 is above this")


@events.quitting.add_listener
def _judge(environment, **_kwargs):
    """Thresholds set the exit code, so a load test can fail a pipeline."""
    opts, stats = environment.parsed_options, environment.stats
    problems = []
    if stats.total.num_requests == 0:
        problems.append("no requests were made")
    if stats.total.fail_ratio > opts.max_fail_ratio:
        problems.append(f"fail ratio {stats.total.fail_ratio:.4f} > {opts.max_fail_ratio}")
    for entry in stats.entries.values():
        p95 = entry.get_response_time_percentile(0.95)
        if entry.num_requests and p95 > opts.max_p95_ms:
            problems.append(f"{entry.name}: p95 {p95:.0f} ms > {opts.max_p95_ms:.0f} ms")
    for p in problems:
        log.error("threshold broken: %s", p)
    if problems:
        environment.process_exit_code = 1
    else:
        log.info(
            "thresholds met: fail ratio %.4f <= %s, every p95 <= %.0f ms",
            stats.total.fail_ratio,
            opts.max_fail_ratio,
            opts.max_p95_ms,
        )
