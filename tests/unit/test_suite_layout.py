"""The suite's own layout: pytest imports test files by basename (rootdir mode, no packages),
so two test files with one name in different folders stop the whole collection."""

from collections import Counter

from tests.conftest import REPO


def test_every_test_file_has_a_basename_of_its_own():
    names = Counter(p.name for p in (REPO / "tests").rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], sorted(n for n, k in names.items() if k > 1)


def test_folder_markers_select_their_folder():
    """`make test-fast` selects by folder marker (`-m "unit or contract or export"`): each
    marker must select exactly its folder's tests (they once selected none: the markers were
    added after `-m` had deselected everything)."""
    import os
    import subprocess
    import sys

    def collected(*args: str) -> set[str]:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=120,
        ).stdout
        return {line.split("::")[0] for line in out.splitlines() if "::" in line}

    files = collected("-m", "unit or contract", "tests/unit/test_suite_layout.py", "tests/contract/test_morph.py")
    assert files == {"tests/unit/test_suite_layout.py", "tests/contract/test_morph.py"}
    assert collected("-m", "unit", "tests/unit/test_suite_layout.py", "tests/contract/test_morph.py") == {
        "tests/unit/test_suite_layout.py"
    }


def test_under_two_workers_a_heavy_test_never_runs_beside_a_timing_or_heavy_test(tmp_path):
    """tests/conftest.py's lock, in real two-worker xdist runs of a module of timing tests and one
    of heavy tests (each worker takes one module): with the lock no heavy test's run overlaps a
    timing or another heavy test's; with it switched off (the control) they do overlap."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "conftest.py").write_text(
        "import json, time\nimport pytest\n"
        "from tests.conftest import _at_most_one_busy_core_beside_timing_tests, pytest_xdist_make_scheduler\n"
        "def pytest_configure(config):\n"
        "    config.addinivalue_line('markers', 'timing: t')\n"
        "    config.addinivalue_line('markers', 'heavy: h')\n"
        "@pytest.fixture\n"
        "def span(request):\n"
        "    start = time.monotonic()\n"
        "    time.sleep(0.4)\n"
        "    yield\n"
        f"    with open({str(tmp_path / 'spans.jsonl')!r}, 'a') as f:\n"
        "        kind = 'timing' if request.node.get_closest_marker('timing') else 'heavy'\n"
        "        f.write(json.dumps([kind, start, time.monotonic()]) + '\\n')\n"
    )
    for kind in ("timing", "heavy"):
        tests = "".join(f"@pytest.mark.{kind}\ndef test_{kind}_{i}(span):\n    pass\n" for i in range(3))
        (tmp_path / f"test_{kind}.py").write_text("import pytest\n" + tests)

    def overlaps(lock: bool) -> list:
        (tmp_path / "spans.jsonl").unlink(missing_ok=True)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-n",
                "2",
                "--dist",
                "loadscope",
                "-p",
                "no:randomly",
                str(tmp_path),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "DEEPSERVE_TESTS_NO_CPU_LOCK": "" if lock else "1"},
            timeout=180,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
        spans = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
        assert sorted(k for k, _, _ in spans) == ["heavy"] * 3 + ["timing"] * 3
        heavy = [(a, b) for k, a, b in spans if k == "heavy"]
        return [(h, (c, d)) for h in heavy for _, c, d in spans if (c, d) != h and c < h[1] and h[0] < d]

    assert overlaps(lock=False), "the control: without the lock the two workers' tests overlap"
    assert not overlaps(lock=True)
