"""Shared fixtures; every test gets the marker of its folder (unit, export, service, deploy)."""

from __future__ import annotations

import collections
import fcntl
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service import repository

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
EXPORTED = REPO / "exported"


def require_tools(*tools: str):
    """A mark for tests that need system tools: under CI (CI=true) a missing tool fails the run
    (a collection error, never a silent skip); elsewhere the tests skip naming `make tools`."""
    missing = [t for t in tools if shutil.which(t) is None]
    reason = f"{', '.join(missing)} not installed: `make tools` installs it from Debian's packages"
    if missing and os.environ.get("CI"):
        raise RuntimeError(f"CI: {reason}")
    return pytest.mark.skipif(bool(missing), reason=reason)


def manifest() -> dict:
    return repository.raw(EXPORTED)


def active_meta(name: str) -> dict:
    """The metadata of a model's active version, read through the manifest."""
    m = manifest()
    family = m["models"][name]["family"]
    version = m["families"][family]["active"]
    return json.loads((EXPORTED / m["models"][name]["versions"][version]["metadata"]).read_text())


def active_file(name: str) -> Path:
    m = manifest()
    family = m["models"][name]["family"]
    return EXPORTED / m["models"][name]["versions"][m["families"][family]["active"]]["file"]


_collected = iter(range(1 << 30))


FOLDER_MARKERS = ("unit", "export", "contract", "service", "deploy", "browser", "container")


def pytest_itemcollected(item):
    """Every test gets the marker of its folder, as it is collected: before `-m` selects (a
    marker added later, in pytest_collection_modifyitems, is too late for `-m unit`)."""
    item.user_properties.append(("collected", next(_collected)))  # the written order, params included
    folder = Path(item.fspath).parent.name
    if folder in FOLDER_MARKERS:
        item.add_marker(getattr(pytest.mark, folder))


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers with `--dist loadscope`, scoped and ordered here:
    - a module's tests run on one worker, in the order the shuffle gave them (its module-scoped
      servers start once, a SESSION module keeps its written order); the container tests all
      run on one worker (they share the docker daemon, the image and the swarm); the modules
      with `heavy` tests form one scope too, so heavy tests never run beside each other.
      (xdist_group marks would say the same, but `--dist loadgroup` ignores them with pytest
      9.2: xdist #1386.)
    - the heavy scope goes first, then the modules without timing tests, then those with
      timing tests and the container scope: while one worker runs the heavy tests the other
      runs tests that take no lock (below), instead of waiting for it."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # the order below, not the largest scope first
    kinds: dict[str, str] = {}

    def kind(module: str) -> str:  # read from the module's source: the controller collects nothing
        if module not in kinds:
            text = (REPO / module).read_text() if (REPO / module).is_file() else ""
            kinds[module] = (
                "heavy"
                if "pytest.mark.heavy" in text
                else "timing"
                if "pytest.mark.timing" in text or module.startswith("tests/container/")
                else "light"
            )
        return kinds[module]

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module.startswith("tests/container/"):
                return "tests/container/"
            return "heavy" if kind(module) == "heavy" else module

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.workqueue = Ranked()

    class Ranked(collections.OrderedDict):
        """The work queue: a worker asking for work (popitem(last=False)) gets the first scope
        of the best rank, heavy, then light, then timing."""

        RANK = {"heavy": 0, "light": 1, "timing": 2}

        def popitem(self, last: bool = True):
            if last:
                return super().popitem(last=True)
            scope = min(self, key=lambda s: self.RANK["heavy" if s == "heavy" else kind(s.split("::", 1)[0])])
            return scope, self.pop(scope)

    return ByModule(config, log)


@pytest.fixture(autouse=True)
def _at_most_one_busy_core_beside_timing_tests(request, testrun_uid):
    """Under `make test`'s two workers, a `timing` test (latency bounds, time windows) runs with
    at most one busy core beside it, the condition `make test-noisy` checks: never beside a
    `heavy` test, one that keeps both cores busy (fuzzing with its own workers, training, load
    generators, and the tests that bound latency under the load they make themselves). A heavy
    test takes an exclusive lock shared by the workers, a timing test a shared one (two timing
    tests may run at once); other tests take none. An `alone` test compares latencies that
    any neighbour's CPU use confounds: it takes a second lock exclusively, which every other
    test takes shared, so nothing runs beside it (taken first, in one order: no deadlock).
    One worker, or no xdist: no lock (DEEPSERVE_TESTS_NO_CPU_LOCK=1: none either, the control
    run of the test of this lock)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER") if not os.environ.get("DEEPSERVE_TESTS_NO_CPU_LOCK") else None
    if worker is None:
        yield
        return
    node = request.node
    waited = time.monotonic()
    cpu = (
        fcntl.LOCK_EX if node.get_closest_marker("heavy") else fcntl.LOCK_SH if node.get_closest_marker("timing") else 0
    )
    alone = fcntl.LOCK_EX if node.get_closest_marker("alone") else fcntl.LOCK_SH
    folder = Path(tempfile.gettempdir())
    with open(folder / f"deepserve-tests-{testrun_uid}.alone", "a") as alone_lock:
        fcntl.flock(alone_lock, alone)
        try:
            if not cpu:
                _timeline(worker, node.nodeid, waited)
                yield
                return
            with open(folder / f"deepserve-tests-{testrun_uid}.lock", "a") as cpu_lock:
                fcntl.flock(cpu_lock, cpu)
                _timeline(worker, node.nodeid, waited)
                try:
                    yield
                finally:
                    fcntl.flock(cpu_lock, fcntl.LOCK_UN)
        finally:
            fcntl.flock(alone_lock, fcntl.LOCK_UN)


def _timeline(worker: str, nodeid: str, waited: float) -> None:
    """DEEPSERVE_TESTS_TIMELINE=file: each test's worker, start and time spent waiting for the
    locks, one JSON line per test (where a two-worker run's minutes go: docs/testing.md)."""
    path = os.environ.get("DEEPSERVE_TESTS_TIMELINE")
    if path:
        now = time.time()
        with open(path, "a") as f:
            f.write(
                json.dumps({"worker": worker, "test": nodeid, "start": now, "lock_wait": time.monotonic() - waited})
                + "\n"
            )


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle
def pytest_collection_modifyitems(items):
    """A module that declares `SESSION = True` is one scripted user session (the browser tests:
    each continues from the page the previous one left): after the shuffle its tests go back to
    their written order, in the place the shuffle gave them; every other test runs in the
    shuffled order."""
    slots = [i for i, item in enumerate(items) if getattr(getattr(item, "module", None), "SESSION", False)]
    ordered = sorted((items[i] for i in slots), key=lambda item: dict(item.user_properties)["collected"])
    for i, item in zip(slots, ordered):
        items[i] = item


@pytest.fixture(scope="session")
def mnist500():
    """First 500 MNIST test images (uint8) and labels, committed as a fixture."""
    f = np.load(FIXTURES / "mnist_test500.npz")
    return f["images"], f["labels"]


@pytest.fixture(scope="session")
def fashion500():
    f = np.load(FIXTURES / "fashion_test500.npz")
    return f["images"], f["labels"]


@pytest.fixture(scope="session")
def sst2_dev200():
    lines = (FIXTURES / "sst2_dev200.tsv").read_text().splitlines()[1:]
    pairs = [line.rsplit("\t", 1) for line in lines]
    return [s for s, _ in pairs], np.array([int(y) for _, y in pairs])


def png(array: np.ndarray, mode: str = "L") -> bytes:
    """uint8 array -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- the real server
# One session-scoped deepserve with default settings for every folder that needs one (service,
# browser, deploy); servers with special settings only where the settings are the test.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `bentoml serve` process with its own settings."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        target: str = "service.service:DeepServe",
        cwd: Path = REPO,
        wait: bool = True,
        pythonpath: bool = True,
        host: str = "127.0.0.1",
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"deepserve-test-{self.port}.log"
        full_env = {**os.environ, **(env or {})}
        # BentoML wipes $BENTOML_HOME/prometheus_multiproc_dir when a server starts: servers
        # that share a BENTOML_HOME erase each other's metrics (docs/operations.md)
        self.home = None  # a BENTOML_HOME made here is removed by stop(); a given one is the caller's
        if "BENTOML_HOME" not in full_env:
            self.home = full_env["BENTOML_HOME"] = tempfile.mkdtemp(prefix=f"bentoml-{self.port}-")
        full_env.pop("PYTHONPATH", None)
        if pythonpath:
            full_env["PYTHONPATH"] = str(REPO)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", target, "--host", host, "--port", str(self.port)],
            cwd=cwd,
            env=full_env,
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.home:
            shutil.rmtree(self.home, ignore_errors=True)
        return self.proc.returncode


@pytest.fixture(scope="session")
def server():
    """deepserve with default settings and the committed models."""
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c
