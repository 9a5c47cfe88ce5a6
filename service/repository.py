"""The one owner of the model repository's manifest (`<model dir>/manifest.json`).

Everything that reads or changes which versions exist and which one is active goes through
here: the server (read), the admin API (set_active), training's export and `make publish`
(register_version), evaluation, bench and tests. Every change is read-modify-write under one
exclusive lock file shared by every process that uses the directory (fcntl), validated as a
typed Manifest before it is written, and written through a temp file of its own then renamed,
so readers see the old manifest or the new one and concurrent writers never lose an update.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from service.metadata import MANIFEST, Manifest, read_manifest

__all__ = ["MANIFEST", "read", "raw", "update", "set_active", "register_version", "write_json_atomic"]

read = read_manifest  # typed, validated (MetadataError naming the field)
EMPTY = {"format": 2, "defaults": {}, "families": {}, "models": {}}


def raw(directory: Path) -> dict:
    """The manifest as plain JSON (tools that copy or edit a scratch model directory)."""
    return json.loads((Path(directory) / MANIFEST).read_text())


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """The repository's lock: one writer at a time, across processes."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Readers see the old file or the new one, never half of one; each writer has a temp
    file of its own (a fixed temp name let two writers clobber each other's)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def update(directory: Path, change: Callable[[dict], None]) -> Manifest:
    """Apply `change` to the manifest's JSON under the lock; validate; write atomically."""
    directory = Path(directory)
    with locked(directory):
        path = directory / MANIFEST
        data = json.loads(path.read_text()) if path.is_file() else json.loads(json.dumps(EMPTY))
        change(data)
        manifest = Manifest.model_validate(data)
        write_json_atomic(path, data)
    return manifest


def set_active(directory: Path, family: str, active: str, previous: str | None) -> Manifest:
    """A family's active and previous versions (the admin API's load and rollback)."""

    def change(data: dict) -> None:
        data["families"][family]["active"], data["families"][family]["previous"] = active, previous

    return update(directory, change)


def register_version(
    directory: Path, family: str, version: str, specs: list[tuple[str, str]], digests: list[str], activate: bool
) -> Manifest:
    """Add a family version, its models (name, task) with their digests; activate it if asked
    (the family's first version is always active)."""

    def change(data: dict) -> None:
        fam = data["families"].get(family)
        if fam is None:
            data["families"][family] = {"active": version, "previous": None, "models": [n for n, _ in specs]}
        elif activate and fam["active"] != version:
            fam["previous"], fam["active"] = fam["active"], version
        for (name, task), digest in zip(specs, digests):
            entry = data["models"].setdefault(name, {"task": task, "family": family, "versions": {}})
            entry["versions"][version] = {
                "file": f"{family}/{version}/{name}.onnx",
                "metadata": f"{family}/{version}/{name}.json",
                "sha256": digest,
            }

    return update(directory, change)
