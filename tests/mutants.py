"""`make mutants`: deliberate faults in the service, each of which the test suite must catch.

Each mutant replaces one snippet of one file with a broken version, in a scratch copy of the
checkout (the working tree is never touched), then runs the tests named for it; the mutant
is *caught* when at least one of them fails. Prints a table and exits 1 if any survives.

    python tests/mutants.py [--only NAME ...] [--list]

The list and the catching tests are in docs/testing.md ("Does the suite bite?").
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str  # the fault, in words
    file: str
    old: str  # a snippet that must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) expected to catch it


MUTANTS = [
    Mutant(
        "no-framing",
        "the server scales the whole picture again instead of framing the digit",
        "service/preprocessing.py",
        'if framing != "none" and grey.shape != (IMAGE_SIZE, IMAGE_SIZE):',
        "if False:",
        ("tests/unit/test_framing.py",),
    ),
    Mutant(
        "no-pixel-budget",
        "an upload's pixel count is not checked against the limit before decoding",
        "service/images.py",
        "if width * height > max_pixels:",
        "if False:",
        ("tests/contract/test_errors.py::test_one_image_over_the_per_image_pixel_limit_is_refused_from_its_header",),
    ),
    Mutant(
        "ignore-reject-ood",
        "reject_ood=true answers labels for out-of-distribution inputs instead of 422",
        "service/tasks/classification.py",
        'bad = [(i, r) for i, r in enumerate(results) if r.get("in_distribution") is False]',
        "bad = []",
        ("tests/contract/test_trust.py",),
    ),
    Mutant(
        "wrong-label-order",
        "labels are reported in reverse order (label i named as label C-1-i)",
        "service/tasks/classification.py",
        "labels = model.meta.labels\n",
        "labels = model.meta.labels[::-1]\n",
        ("tests/contract/test_endpoints.py",),
    ),
    Mutant(
        "no-drain",
        "SIGTERM stops the worker at once instead of draining in-flight requests",
        "service/drain.py",
        "        while time.monotonic() < deadline:\n",
        "        while False:\n",
        ("tests/service/test_lifecycle.py",),
    ),
    Mutant(
        "no-return-input",
        "return_input=true is accepted but the model's view is not answered",
        "service/tasks/image_classification.py",
        '                r["input_png"] = input_png(image)',
        "                pass",
        ("tests/service/test_wild.py::test_return_input_shows_what_the_model_saw",),
    ),
    Mutant(
        "no-manifest-lock",
        "manifest writers (publish, admin load/rollback) no longer take the repository's lock",
        "service/repository.py",
        "        fcntl.flock(lock, fcntl.LOCK_EX)\n",
        "        pass\n",
        ("tests/unit/test_repository.py",),
    ),
    Mutant(
        "no-text-normalization",
        "text is tokenized without bringing it to SST-2's conventions",
        "service/preprocessing.py",
        "text = normalize_text(text) if normalize else text.translate(_QUOTES).lower()",
        "text = text.translate(_QUOTES).lower()",
        ("tests/unit/test_preprocessing.py",),
    ),
]


def scratch_copy(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files, plus the venv by a link."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for f in filter(None, files):
        src, dst = REPO / f.decode(), dest / f.decode()
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (dest / ".venv").symlink_to(REPO / ".venv")


def run(m: Mutant, base: Path) -> tuple[bool, str, float]:
    """(caught, what the tests said, seconds)."""
    target = base / m.file
    original = target.read_text()
    if original.count(m.old) != 1:
        return False, f"snippet found {original.count(m.old)} times in {m.file}: update the mutant", 0.0
    target.write_text(original.replace(m.old, m.new))
    start = time.monotonic()
    try:
        env = {**os.environ, "PYTHONPATH": str(base)}
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *m.tests],
            cwd=base,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        tail = [line for line in out.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
        return out.returncode != 0, tail[0], time.monotonic() - start
    finally:
        target.write_text(original)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/mutants.py", description=__doc__)
    p.add_argument("--only", nargs="*", default=None, help="mutant names")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:22s} {m.file:28s} {m.what}")
        return 0
    survivors = []
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        base = Path(tmp)
        scratch_copy(base)
        print(f"{'mutant':22s} {'caught':7s} {'seconds':>7s}  tests -> last line", flush=True)
        for m in chosen:
            caught, said, seconds = run(m, base)
            print(
                f"{m.name:22s} {'yes' if caught else 'NO':7s} {seconds:7.0f}  {' '.join(m.tests)} -> {said}", flush=True
            )
            if not caught:
                survivors.append(m.name)
    if survivors:
        print(f"survived: {', '.join(survivors)}", flush=True)
        return 1
    print(f"every one of {len(chosen)} mutants was caught", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
