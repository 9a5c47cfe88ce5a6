"""The README's rollout block (admin calls, a candidate on shadow and canary, priority
classes) as one shell script against a real server with an admin key and a scratch model
directory; every `#>` fragment must be in its command's output."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import EXPORTED, REPO
from tests.service.conftest import Server

BLOCK = re.findall(r"### On live traffic first.*?```sh\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)[0]


def steps() -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for line in BLOCK.splitlines():
        if line.startswith("#>"):
            out[-1][1].append(line[2:].strip())
        elif line.strip() and not line.startswith("#"):
            out.append((line, []))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("readme-admin") / "exported"
    shutil.copytree(EXPORTED, models, ignore=shutil.ignore_patterns(".status", ".manifest.lock"))
    s = Server(env={"DEEPSERVE_EXPORTED_DIR": str(models), "DEEPSERVE_ADMIN_KEY": "readme-admin-key"})
    yield s
    s.stop()


def test_the_readme_rollout_block_runs_and_answers_what_it_says(server, tmp_path):
    todo = steps()
    assert sum(len(expected) for _, expected in todo) >= 5
    host = server.url.removeprefix("http://")
    script = ["set -euo pipefail", "export DEEPSERVE_ADMIN_KEY=readme-admin-key"]
    for i, (command, _) in enumerate(todo):
        script += [f"printf '\\n@@step {i}\\n'", command.replace("localhost:3000", host)]
    (tmp_path / "tests").symlink_to(REPO / "tests")
    out = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    outputs = out.stdout.split("\n@@step ")[1:]
    assert len(outputs) == len(todo)
    for (command, expected), chunk in zip(todo, outputs):
        for fragment in expected:
            assert fragment in chunk, f"{command!r}: {fragment!r} not in {chunk[-600:]!r}"
    assert (tmp_path / "bulk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
