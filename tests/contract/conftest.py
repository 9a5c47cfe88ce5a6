"""The HTTP contract in-process: deepserve's ASGI app built from a real Core (real ONNX files,
real batchers) and driven by Starlette's TestClient. No server process, no sockets: what a
real server adds (start-up, workers, drain, multiprocess metrics, load) is in tests/service."""

from __future__ import annotations

import warnings

import pytest

from service.app import build_app
from service.core import Core
from service.settings import Settings

warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
from starlette.testclient import TestClient  # noqa: E402


class InProcess:
    """A core + app + TestClient with its own settings; the core is warmed up and ready."""

    def __init__(self, **settings):
        self.settings = Settings(**settings)
        self.core = Core(self.settings)
        self.app = build_app(self.core)
        self.client = TestClient(self.app, raise_server_exceptions=False)
        self.client.__enter__()
        self.client.portal.call(self.core.warmup)

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.core.shutdown()


@pytest.fixture(scope="session")
def inprocess():
    ip = InProcess()
    yield ip
    ip.close()


@pytest.fixture(scope="session")
def client(inprocess):
    return inprocess.client


@pytest.fixture
def make_app():
    """InProcess with other settings, closed after the test."""
    made = []

    def make(**settings) -> InProcess:
        made.append(InProcess(**settings))
        return made[-1]

    yield make
    for ip in made:
        ip.close()
