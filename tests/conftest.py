"""Shared fixtures; every test gets the marker of its folder (unit, export, service, deploy)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

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


def pytest_collection_modifyitems(items):
    for item in items:
        folder = Path(item.fspath).parent.name
        if folder in ("unit", "export", "contract", "service", "deploy", "browser"):
            item.add_marker(getattr(pytest.mark, folder))


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
