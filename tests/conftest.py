"""Shared fixtures; every test gets the marker of its folder (unit, export, service, deploy)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
EXPORTED = REPO / "exported"


def pytest_collection_modifyitems(items):
    for item in items:
        folder = Path(item.fspath).parent.name
        if folder in ("unit", "export", "service", "deploy"):
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
