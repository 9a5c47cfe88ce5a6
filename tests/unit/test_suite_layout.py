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
