"""`make screenshots`: run the playground's browser test, then copy the desktop and phone
screenshots it took (results/playground/) to docs/img/, where the README shows them.

Nothing is copied unless every test passed and both screenshots are from this run (a run
where Chromium is missing skips, and must not leave stale pictures looking fresh).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "results" / "playground"
DOCS_IMG = REPO / "docs" / "img"
SCREENSHOTS = ("playground.png", "playground-mobile.png")


def main() -> int:
    started = time.time()
    code = pytest.main([str(Path(__file__).with_name("test_playground.py")), "-q", "-p", "no:cacheprovider"])
    if code != pytest.ExitCode.OK:
        print(f"make screenshots: the browser test failed (exit {int(code)}); docs/img/ is unchanged", file=sys.stderr)
        return int(code)
    fresh = [RESULTS / name for name in SCREENSHOTS if (RESULTS / name).is_file()]
    if len(fresh) < len(SCREENSHOTS) or any(p.stat().st_mtime < started for p in fresh):
        print(
            "make screenshots: the browser test took no screenshots (skipped?); docs/img/ is unchanged", file=sys.stderr
        )
        return 1
    for path in fresh:
        target = DOCS_IMG / path.name
        # a 256-colour palette: a third of the bytes, and a page of flat colours looks the same
        Image.open(path).convert("RGB").quantize(256).save(target, optimize=True)
        print(f"{target.relative_to(REPO)}: {target.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
