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
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from service.metadata import MANIFEST, Manifest, Rollout, read_manifest

__all__ = [
    "MANIFEST",
    "Conflict",
    "decide_rollout",
    "raw",
    "read",
    "register_version",
    "set_active",
    "set_candidate",
    "start_rollout",
    "undo_promotion",
    "update",
    "write_json_atomic",
]

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
        fam = data["families"][family]
        fam["active"], fam["previous"] = active, previous
        if fam.get("candidate") == active:  # the candidate loaded directly: its rollout is over
            fam.pop("candidate")
            rollout = fam.get("rollout")
            if rollout and rollout["state"] == "running":
                rollout.update(state="stopped", decided=time.time(), reason="the candidate was loaded directly")

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


class Conflict(ValueError):
    """The manifest is not in the state a change expects (e.g. a rollout already decided)."""


def set_candidate(directory: Path, family: str, version: str | None) -> Manifest:
    """A family's candidate version (loaded by every worker, serving nothing by itself), or
    none; dropping or replacing the candidate stops a running rollout of it."""

    def change(data: dict) -> None:
        fam = data["families"][family]
        if version is not None and version == fam["active"]:
            raise Conflict(f"{version} is already the active version of {family}")
        rollout = fam.get("rollout")
        if rollout and rollout["state"] == "running" and rollout["candidate"] != version:
            rollout.update(state="stopped", decided=time.time(), reason="the candidate was dropped or replaced")
        if version is None:
            fam.pop("candidate", None)
        else:
            fam["candidate"] = version

    return update(directory, change)


def start_rollout(directory: Path, family: str, rollout: dict) -> Manifest:
    """Start (or retune: same candidate, same id) the family's rollout of its candidate."""
    rollout = Rollout.model_validate(rollout).model_dump(exclude_none=True)  # defaults written out

    def change(data: dict) -> None:
        fam = data["families"][family]
        if fam.get("candidate") != rollout["candidate"]:
            raise Conflict(
                f"{family} has no candidate {rollout['candidate']!r} loaded (load it as the candidate first)"
            )
        fam["rollout"] = rollout

    return update(directory, change)


def decide_rollout(
    directory: Path, family: str, rollout_id: str, state: str, reason: str, evidence: dict | None = None
) -> Manifest:
    """End a running rollout, once: `promoted` makes the candidate active (the active version
    becomes the previous one), `rolled_back` and `stopped` drop the candidate. Raises Conflict
    when that rollout is not running any more (another worker or an operator decided first)."""

    def change(data: dict) -> None:
        fam = data["families"][family]
        rollout = fam.get("rollout")
        if not rollout or rollout["id"] != rollout_id or rollout["state"] != "running":
            raise Conflict(f"rollout {rollout_id} of {family} is not running")
        rollout.update(state=state, decided=time.time(), reason=reason, evidence=evidence)
        if state == "promoted":
            fam["previous"], fam["active"] = fam["active"], fam["candidate"]
        fam.pop("candidate", None)

    return update(directory, change)


def undo_promotion(
    directory: Path, family: str, rollout_id: str, active: str, previous: str | None, why: str
) -> Manifest:
    """A promotion a worker refused: the old active and previous versions back, and the
    rollout marked rolled back with the reason, in one update (the manifest never says
    "promoted" for a version nobody serves)."""

    def change(data: dict) -> None:
        fam = data["families"][family]
        fam["active"], fam["previous"] = active, previous
        rollout = fam.get("rollout")
        if rollout and rollout["id"] == rollout_id:
            rollout.update(state="rolled_back", decided=time.time(), reason=f"promotion failed: {why}")

    return update(directory, change)
