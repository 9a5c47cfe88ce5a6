"""The suite's own layout: pytest imports test files by basename (rootdir mode, no packages),
so two test files with one name in different folders stop the whole collection."""

from collections import Counter

from tests.conftest import REPO


def test_every_test_file_has_a_basename_of_its_own():
    names = Counter(p.name for p in (REPO / "tests").rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], sorted(n for n, k in names.items() if k > 1)
