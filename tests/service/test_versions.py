"""Shipping a model version into a running service with two workers: verified load under
steady load with no failed request, refusal of every kind of broken candidate, rollback,
pinning, and a restart that keeps the choice. Candidates are the committed models copied
under new version ids (no training in tests)."""

from __future__ import annotations

import collections
import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service import repository
from service.runtime import sha256_file
from tests.conftest import EXPORTED, FIXTURES, manifest
from tests.service.conftest import Server

pytestmark = pytest.mark.timing  # latency or windows under load: make test-noisy runs these beside a busy core

SEVEN = (FIXTURES / "mnist_test0_label7.png").read_bytes()
ADMIN = {"Authorization": "Bearer admin-secret"}
OLD = manifest()["families"]["digits"]["active"]


def add_version(root: Path, family: str, version: str, damage=None) -> None:
    """Copy the family's active version to `version` (optionally damaged) and register it."""
    m = repository.raw(root)
    src = root / family / m["families"][family]["active"]
    dst = root / family / version
    shutil.copytree(src, dst)
    for name in m["families"][family]["models"]:
        meta = json.loads((dst / f"{name}.json").read_text())
        meta["version"] = version
        if damage is not None:
            damage(dst, name, meta)
        (dst / f"{name}.json").write_text(json.dumps(meta))
        m["models"][name]["versions"][version] = {
            "file": f"{family}/{version}/{name}.onnx",
            "metadata": f"{family}/{version}/{name}.json",
            "sha256": meta["sha256"],
        }
    (root / "manifest.json").write_text(json.dumps(m))


def flip_a_byte(dst, name, meta):  # the file no longer matches its sha256
    path = dst / f"{name}.onnx"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


def not_onnx(dst, name, meta):  # a file with a matching sha256 that ONNX Runtime cannot open
    path = dst / f"{name}.onnx"
    path.write_bytes(b"this is not an ONNX model" * 100)
    meta["sha256"] = sha256_file(path)


def wrong_signature(dst, name, meta):  # another task's model under this one's metadata
    path = dst / f"{name}.onnx"
    shutil.copy(next((EXPORTED / "denoiser").glob("*/denoiser.onnx")), path)
    meta["sha256"] = sha256_file(path)


def failing_smoke(dst, name, meta):  # the file computes something else than it was evaluated as
    path = dst / meta["smoke"]["file"]
    with np.load(path) as npz:
        arrays = {k: npz[k] + (1.0 if k.startswith("out:") else 0) for k in npz.files}
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    meta["smoke"]["sha256"] = sha256_file(path)


def below_bars(dst, name, meta):
    meta["meets_bars"] = False
    meta["metrics"] = {**meta["metrics"], "test_accuracy": 0.5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models") / "exported"
    shutil.copytree(EXPORTED, root, ignore=shutil.ignore_patterns(".status", ".manifest.lock"))
    add_version(root, "digits", "2099-01-01-good")
    add_version(root, "digits", "2099-01-02-badsha", flip_a_byte)
    add_version(root, "digits", "2099-01-03-notonnx", not_onnx)
    add_version(root, "digits", "2099-01-04-signature", wrong_signature)
    add_version(root, "digits", "2099-01-05-smoke", failing_smoke)
    add_version(root, "digits", "2099-01-06-below", below_bars)
    add_version(root, "codec", "2099-02-01-good")
    return root


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(
        env={"DEEPSERVE_WORKERS": "2", "DEEPSERVE_EXPORTED_DIR": str(model_dir), "DEEPSERVE_ADMIN_KEY": "admin-secret"}
    )
    deadline = time.monotonic() + 60  # both workers report in
    while len(httpx.get(s.url + "/admin/status", headers=ADMIN).json()["workers"]) < 2:
        assert time.monotonic() < deadline, "two workers never reported their status"
        time.sleep(0.3)
    yield s
    s.stop()


class Traffic(threading.Thread):
    """Steady clients on fresh connections (spread over both workers): every answer and the
    model version it came from."""

    def __init__(self, url: str, clients: int = 16):
        super().__init__(daemon=True)
        self.url, self.clients, self.stop = url, clients, threading.Event()
        self.answers: list[tuple[float, object, str | None]] = []

    def run(self) -> None:
        threads = [threading.Thread(target=self.client, daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def client(self) -> None:
        with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(self.url + "/classify", files={"image": ("7.png", SEVEN, "image/png")})
                    ok = r.status_code if r.status_code != 200 or r.json()["label"] == "7" else "wrong label"
                    self.answers.append((time.monotonic(), ok, r.json().get("model_version")))
                except httpx.HTTPError as exc:
                    self.answers.append((time.monotonic(), type(exc).__name__, None))

    def finish(self) -> list:
        self.stop.set()
        self.join(60)
        return self.answers


def load(server, family: str, version: str, **extra) -> httpx.Response:
    return httpx.post(
        f"{server.url}/admin/models/{family}/load", json={"version": version, **extra}, headers=ADMIN, timeout=90
    )


def digits_version(server) -> str:
    return next(m["version"] for m in httpx.get(server.url + "/models").json()["models"] if m["name"] == "digits")


def make_active(server, model_dir, version: str) -> None:
    """Each test sets up the state it needs (digits: `version` active, OLD previous unless it
    is OLD itself) through the manifest, which every worker follows: no test depends on
    another having run first, in any order."""
    repository.set_active(model_dir, "digits", version, OLD if version != OLD else None)
    deadline = time.monotonic() + 30
    while True:  # every worker, not only the one that answers: a slower one would serve the old version
        workers = httpx.get(f"{server.url}/admin/status", headers=ADMIN, timeout=30).json()["workers"]
        if len(workers) == 2 and all(w["families"]["digits"]["active"] == version for w in workers):
            return
        assert time.monotonic() < deadline, f"the workers never followed the manifest: {workers}"
        time.sleep(0.2)


def test_the_admin_api_needs_its_own_key(server):
    r = httpx.post(f"{server.url}/admin/models/digits/load", json={"version": "x"})
    assert r.status_code == 401
    r = httpx.post(
        f"{server.url}/admin/models/digits/load", json={"version": "x"}, headers={"Authorization": "Bearer x"}
    )
    assert r.status_code == 401
    assert load(server, "nofamily", "x").status_code == 404
    r = load(server, "digits", "1999-no-such")
    assert r.status_code == 404 and "2099-01-01-good" in r.json()["error"]


@pytest.mark.parametrize(
    "version, words",
    [
        ("2099-01-02-badsha", "refusing to serve an unverified model"),
        ("2099-01-03-notonnx", "ONNX Runtime cannot load"),
        ("2099-01-04-signature", "do not match the metadata"),
        ("2099-01-05-smoke", "smoke set output 'logits' differs"),
        ("2099-01-06-below", "below its quality bars"),
    ],
    ids=["bad sha256", "broken ONNX", "wrong signature", "failing smoke set", "below its bars"],
)
def test_a_broken_candidate_is_refused_with_the_reason_and_traffic_is_unaffected(server, model_dir, version, words):
    make_active(server, model_dir, OLD)
    traffic = Traffic(server.url, clients=4)
    traffic.start()
    time.sleep(0.5)
    r = load(server, "digits", version)
    time.sleep(0.5)
    answers = traffic.finish()
    assert r.status_code == 409 and words in r.json()["error"], r.text
    assert digits_version(server) == OLD
    assert answers and all(status == 200 for _, status, _ in answers), collections.Counter(a[1] for a in answers)


def test_a_candidate_below_its_bars_loads_when_asked_to_then_rolls_back(server, model_dir):
    make_active(server, model_dir, OLD)
    r = load(server, "digits", "2099-01-06-below", allow_below_bars=True)
    assert r.status_code == 200, r.text
    assert digits_version(server) == "2099-01-06-below"
    r = httpx.post(f"{server.url}/admin/models/digits/rollback", headers=ADMIN, timeout=90)
    assert r.status_code == 200 and r.json()["version"] == OLD, r.text


def test_a_swap_under_steady_load_drops_nothing_and_every_worker_switches(server, model_dir):
    make_active(server, model_dir, OLD)
    traffic = Traffic(server.url)
    traffic.start()
    time.sleep(4)  # steady answers from the old version first
    start = time.monotonic()
    r = load(server, "digits", "2099-01-01-good")
    done = time.monotonic()
    time.sleep(4)  # and from the new one after
    answers = traffic.finish()
    assert r.status_code == 200, r.text
    assert {w["worker"].rsplit("-", 1)[1] for w in r.json()["workers"]} == {"1", "2"}
    assert all(w["active"] == "2099-01-01-good" for w in r.json()["workers"])
    statuses = collections.Counter(status for _, status, _ in answers)
    assert set(statuses) == {200}, statuses
    assert answers[0][0] < start - 2 and answers[-1][0] > done + 2 and len(answers) > 100  # load on both sides
    before = {v for t, _, v in answers if t < start}
    after = {v for t, _, v in answers if t > done + 0.5}
    assert before == {OLD} and after == {"2099-01-01-good"}, (before, after)
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'deepserve_model_swaps_total\{family="digits",outcome="ok"\} [1-9]', metrics)
    for worker in ("1", "2"):
        assert re.search(
            rf'deepserve_model_info\{{model="digits",[^}}]*version="{OLD}",worker="{worker}"\}} 0\.0', metrics
        )
        assert re.search(
            rf'deepserve_model_info\{{model="digits",[^}}]*version="2099-01-01-good",worker="{worker}"\}} 1\.0', metrics
        )


def test_pinning_a_loaded_version_and_404_for_others(server, model_dir):
    make_active(server, model_dir, "2099-01-01-good")
    files = {"image": ("7.png", SEVEN, "image/png")}
    for _ in range(6):  # fresh connections: both workers answer
        r = httpx.post(server.url + "/classify", files=files, data={"model_version": OLD})
        assert r.status_code == 200 and r.json()["model_version"] == OLD
    r = httpx.post(server.url + "/classify", files=files, data={"model_version": "2099-01-03-notonnx"})
    assert r.status_code == 404 and OLD in r.json()["error"] and "2099-01-01-good" in r.json()["error"]
    versions = next(m for m in httpx.get(server.url + "/models").json()["models"] if m["name"] == "digits")["versions"]
    assert versions["active"] == "2099-01-01-good" and versions["previous"] == OLD
    assert "2099-01-06-below" in versions["available"] and set(versions["loaded"]) == {OLD, "2099-01-01-good"}


def test_a_family_swaps_as_a_unit(server):
    r = load(server, "codec", "2099-02-01-good")
    assert r.status_code == 200, r.text
    by_name = {m["name"]: m["version"] for m in httpx.get(server.url + "/models").json()["models"]}
    assert by_name["encoder"] == by_name["decoder"] == "2099-02-01-good"
    code = httpx.post(server.url + "/compress", files={"image": ("7.png", SEVEN, "image/png")}).json()
    assert code["model_version"] == "2099-02-01-good"


def test_a_restart_serves_the_last_active_version(server, model_dir):
    make_active(server, model_dir, "2099-01-01-good")

    def workers() -> set[str]:
        return {w["worker"] for w in httpx.get(f"{server.url}/admin/status", headers=ADMIN).json()["workers"]}

    ours = workers()
    again = Server(env={"DEEPSERVE_EXPORTED_DIR": str(model_dir)})  # a fresh start on the same model directory
    try:
        assert digits_version(again) == "2099-01-01-good"
        versions = next(m for m in httpx.get(again.url + "/models").json()["models"] if m["name"] == "digits")[
            "versions"
        ]
        assert versions["previous"] == OLD and set(versions["loaded"]) == {OLD, "2099-01-01-good"}
        # two servers on one model directory: every worker has a status of its own
        deadline = time.monotonic() + 10
        while not workers() > ours:
            assert time.monotonic() < deadline, (ours, workers())
            time.sleep(0.2)
    finally:
        again.stop()
    assert workers() == ours  # the stopped server removed its own status files, not ours
