"""The suite's own layout: pytest imports test files by basename (rootdir mode, no packages),
so two test files with one name in different folders stop the whole collection."""

from collections import Counter

import pytest

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


@pytest.mark.heavy  # two-worker pytest runs of its own: both cores
def test_under_two_workers_a_heavy_test_never_runs_beside_a_timing_or_heavy_test(tmp_path):
    """tests/conftest.py's locks, in real two-worker xdist runs of a module of timing tests, one
    of heavy tests, one of `alone` tests and one of unmarked tests: with the locks no heavy
    test's run overlaps a timing or another heavy test's, and an alone test's overlaps
    nothing; with them switched off (the control) they do overlap."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "conftest.py").write_text(
        "import json, time\nimport pytest\n"
        "from tests.conftest import _at_most_one_busy_core_beside_timing_tests, pytest_xdist_make_scheduler\n"
        "def pytest_configure(config):\n"
        "    for name in ('timing', 'heavy', 'alone'):\n"
        "        config.addinivalue_line('markers', f'{name}: -')\n"
        "@pytest.fixture\n"
        "def span(request):\n"
        "    start = time.monotonic()\n"
        "    time.sleep(0.4)\n"
        "    yield\n"
        f"    with open({str(tmp_path / 'spans.jsonl')!r}, 'a') as f:\n"
        "        marks = [m for m in ('alone', 'heavy', 'timing') if request.node.get_closest_marker(m)]\n"
        "        f.write(json.dumps([(marks or ['light'])[0], start, time.monotonic()]) + '\\n')\n"
    )
    # one worker runs the heavy module while the other runs the mixed one in its written order:
    # a light test beside the heavy ones (allowed), then an alone and a timing test (each must wait)
    heavy = "".join(f"@pytest.mark.heavy\ndef test_heavy_{i}(span):\n    pass\n" for i in range(3))
    mark = {"light": "", "alone": "@pytest.mark.alone\n", "timing": "@pytest.mark.timing\n"}
    mixed = "".join(f"{mark[k]}def test_{k}_{i}(span):\n    pass\n" for i in range(2) for k in mark)
    (tmp_path / "test_heavy.py").write_text("import pytest\n" + heavy)
    (tmp_path / "test_mixed.py").write_text("import pytest\n" + mixed)
    kinds = sorted(["heavy"] * 3 + ["light", "alone", "timing"] * 2)

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
        assert sorted(k for k, _, _ in spans) == kinds
        clash = lambda a, b: a[0] == "alone" or (a[0] == "heavy" and b[0] != "light")
        return [
            (a, b)
            for a in spans
            for b in spans
            if a is not b and b[1] < a[2] and a[1] < b[2] and (clash(a, b) or clash(b, a))
        ]

    control = overlaps(lock=False)
    assert {a[0] for a, _ in control} >= {"alone", "timing"}, ("the control: without the locks they overlap", control)
    assert not overlaps(lock=True)
