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


CURL = re.findall(r"### curl\n.*?```sh\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)[0]


def curl_steps() -> list[tuple[str, list[str]]]:
    """(command, expected fragments of its output) for each command of the README's curl block."""
    steps: list[tuple[str, list[str]]] = []
    for line in CURL.splitlines():
        if line.startswith("#>"):
            steps[-1][1].append(line[2:].strip())
        elif line.strip() and not line.startswith("#"):
            steps.append((line, []))
    return steps


def test_readme_curl_block_runs_and_answers_what_it_says(server, tmp_path):
    """The curl block as one shell script (its variables carry over), against the session
    server, in a scratch folder; every `#>` fragment must be in its command's output."""
    import shutil

    steps = curl_steps()
    assert sum(len(expected) for _, expected in steps) >= 12
    assert shutil.which("curl") and shutil.which("file"), "curl and file are needed: make tools"
    host = server.url.removeprefix("http://")
    script = ["set -euo pipefail"]
    for i, (command, _) in enumerate(steps):
        script += [f"printf '\\n@@step {i}\\n'", command.replace("localhost:3000", host)]
    (tmp_path / "tests").symlink_to(REPO / "tests")
    out = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    outputs = re.split(r"^@@step \d+\n", out.stdout, flags=re.M)[1:]
    assert len(outputs) == len(steps)
    for (command, expected), got in zip(steps, outputs):
        for fragment in expected:
            assert fragment in got, f"{command}\n  expected {fragment!r} in\n  {got[:500]}"
