"""The admin API's agreement with the other workers, in-process: a real core and its
follower, and a second worker that speaks the same protocol (a status file with a
heartbeat, following the manifest) but refuses the new version, or never switches."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from service import repository
from service.repository import write_json_atomic
from service.versions import Follower, status_dir
from tests.conftest import EXPORTED
from tests.service.test_versions import add_version

pytestmark = pytest.mark.timing  # latency or windows under load: make test-noisy runs these beside a busy core

ADMIN = {"Authorization": "Bearer admin"}


class OtherWorker(threading.Thread):
    """A worker elsewhere that follows the manifest and reports through its status file."""

    def __init__(self, directory: Path, behaviour: str):
        super().__init__(daemon=True)
        self.directory, self.behaviour, self.stop = directory, behaviour, threading.Event()
        self.reported = threading.Event()  # its first status file is written

    def start(self) -> None:
        super().start()
        assert self.reported.wait(10), "the other worker never reported"

    def run(self) -> None:
        old = repository.raw(self.directory)["families"]["digits"]["active"]
        while not self.stop.is_set():
            active = repository.raw(self.directory)["families"]["digits"]["active"]
            state = {"active": old, "previous": None, "state": "serving", "target": old, "error": None}
            if active != old and self.behaviour == "refuses":
                state.update(state="failed", target=active, error="out of memory while loading")
            status_dir(self.directory).mkdir(exist_ok=True)
            write_json_atomic(status_dir(self.directory) / "elsewhere-2.json",
                              {"worker": "elsewhere-2", "pid": 0, "heartbeat": time.time(), "families": {"digits": state}})  # fmt: skip
            self.reported.set()
            time.sleep(0.1)


@pytest.fixture
def setup(tmp_path, make_app):
    root = tmp_path / "exported"
    shutil.copytree(EXPORTED, root, ignore=shutil.ignore_patterns(".status", ".manifest.lock"))
    add_version(root, "digits", "2099-03-01-candidate")
    ip = make_app(exported_dir=root, admin_key="admin", swap_timeout_s=2)
    follower = Follower(ip.core, 0.1)
    ip.client.portal.call(_start, follower)
    ip.app.follower = follower
    yield root, ip
    ip.client.portal.call(follower.stop)


async def _start(follower: Follower) -> None:
    follower.start()


def active(root: Path) -> str:
    return repository.raw(root)["families"]["digits"]["active"]


def test_a_worker_that_refuses_the_version_sends_every_worker_back(setup):
    root, ip = setup
    old = active(root)
    other = OtherWorker(root, "refuses")
    other.start()  # returns once its status file is there
    try:
        r = ip.client.post("/admin/models/digits/load", json={"version": "2099-03-01-candidate"}, headers=ADMIN)
    finally:
        other.stop.set()
    assert r.status_code == 409, r.text
    assert "out of memory while loading" in r.json()["error"] and f"back on {old}" in r.json()["error"]
    assert active(root) == old  # the manifest is put back
    digits = next(m for m in ip.client.get("/models").json()["models"] if m["name"] == "digits")
    assert digits["version"] == old  # and this worker returned to it


def test_a_worker_that_never_switches_gives_504_with_every_worker_s_state(setup):
    root, ip = setup
    other = OtherWorker(root, "never switches")
    other.start()  # returns once its status file is there
    try:
        r = ip.client.post("/admin/models/digits/load", json={"version": "2099-03-01-candidate"}, headers=ADMIN)
    finally:
        other.stop.set()
    assert r.status_code == 504, r.text
    workers = {w["worker"]: w for w in r.json()["workers"]}
    assert workers["elsewhere-2"]["active"] != "2099-03-01-candidate"
    assert any(w["active"] == "2099-03-01-candidate" for name, w in workers.items() if name != "elsewhere-2")


def test_the_admin_api_is_off_without_its_key(client):
    r = client.post("/admin/models/digits/load", json={"version": "x"}, headers=ADMIN)
    assert r.status_code == 404 and "admin API is off" in r.json()["error"]


def test_warm_up_is_never_shed_by_admission_control(tmp_path, make_app):
    """A version's warm-up is not a client's request: with a latency bound every queued
    request would break (10 ms), the core still starts, and a candidate and a new active
    version still load on every worker. A shed warm-up once left a candidate "loading" until
    the swap timed out (504)."""
    root = tmp_path / "exported"
    shutil.copytree(EXPORTED, root, ignore=shutil.ignore_patterns(".status", ".manifest.lock"))
    add_version(root, "digits", "2099-03-01-candidate")
    ip = make_app(exported_dir=root, admin_key="admin", swap_timeout_s=20, max_latency_ms=10)
    assert ip.core.ready
    follower = Follower(ip.core, 0.1)
    ip.client.portal.call(_start, follower)
    ip.app.follower = follower
    try:
        r = ip.client.post("/admin/models/digits/candidate", json={"version": "2099-03-01-candidate"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert [w["candidate_state"] for w in r.json()["workers"]] == ["serving"], r.text
        assert ip.client.delete("/admin/models/digits/candidate", headers=ADMIN).status_code == 200
        r = ip.client.post("/admin/models/digits/load", json={"version": "2099-03-01-candidate"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["changed"], r.text
        digits = next(m for m in ip.client.get("/models").json()["models"] if m["name"] == "digits")
        assert digits["version"] == "2099-03-01-candidate"
    finally:
        ip.client.portal.call(follower.stop)


def test_a_manifest_put_back_before_the_next_poll_is_still_followed(tmp_path, make_app):
    """The worker that takes an admin call syncs at once after its write; if the manifest is
    then put back to its old bytes before the next poll (A, B, A), that worker must still
    follow it. It compared the poll's digest with the last *poll's*, equal to A, and held the
    candidate for good (a rollout test's reset waited 60 s for it)."""
    root = tmp_path / "exported"
    shutil.copytree(EXPORTED, root, ignore=shutil.ignore_patterns(".status", ".manifest.lock"))
    add_version(root, "digits", "2099-03-01-candidate")
    before = (root / "manifest.json").read_bytes()
    ip = make_app(exported_dir=root, admin_key="admin", swap_timeout_s=20)
    follower = Follower(ip.core, 3600)  # no polling loop: the test takes the polls itself
    follower.write_status()
    ip.app.follower = follower
    r = ip.client.post("/admin/models/digits/candidate", json={"version": "2099-03-01-candidate"}, headers=ADMIN)
    assert r.status_code == 200 and ip.core.candidates["digits"].version == "2099-03-01-candidate", r.text
    (root / "manifest.put-back").write_bytes(before)  # A again, byte for byte, as a restore would
    os.replace(root / "manifest.put-back", root / "manifest.json")
    ip.client.portal.call(follower.poll)
    assert ip.core.candidates.get("digits") is None
    assert follower.candidate_state == {}
