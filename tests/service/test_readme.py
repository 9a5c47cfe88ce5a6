"""The README's Python examples run against the real server."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples_for_every_endpoint():
    joined = "\n".join(BLOCKS)
    for path in ("/classify", "/generate", "/compress", "/decompress", "/denoise"):
        assert path in joined


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(server, index):
    out = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "DEEPSERVE_URL": server.url},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
