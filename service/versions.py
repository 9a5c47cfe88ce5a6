"""Model versions in a running service: every worker follows the manifest.

The manifest (`exported/manifest.json`) says which version of each family is active and
which was before; it is the one source of truth. Each worker polls it (a read and digest of
its few kB every `DEEPSERVE_MANIFEST_POLL_S`) and, when a family's active version changes, loads and checks
that version exactly as at start-up (sha256s, ONNX Runtime, signatures against their tasks,
the smoke set, a warm-up), then switches between requests: requests in flight finish on
the version they started with. It keeps the active and the previous version loaded, so a
rollback is a switch, not a load. A version that fails its checks is never served: the
worker stays on what it had and says why.

Each worker writes its state to `<model dir>/.status/<host>-<server pid>-<worker>.json` (atomically, with
a heartbeat), which is how the admin API (service.admin) knows when every worker — of this
pod, or of every pod that shares the model directory — serves a new version.

A worker also watches its supervisor: BentoML starts workers in sessions of their own, so a
worker whose `bentoml serve` was killed would go on answering with nobody to stop it. When
its parent process changes, the worker drains and exits, as gunicorn's workers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import time
from pathlib import Path

from service import metrics
from service.core import Core, Loaded, load_family
from service.metadata import MANIFEST, MetadataError, parse_manifest, read_manifest
from service.repository import undo_promotion, write_json_atomic
from service.runtime import ModelLoadError

log = logging.getLogger("deepserve")
STATUS_DIR = ".status"
HEARTBEAT_S = 1.0  # status files are rewritten at least this often
LIVE_S = 5.0  # a status file older than this belongs to a worker that is gone


def status_dir(directory: Path) -> Path:
    return directory / STATUS_DIR


def worker_id() -> str:
    """`<host>-<server pid>-<worker index>`: unique among every server that shares the model
    directory, the same for a worker its server restarts (it continues that worker's rollout
    tally). With only host and index, two servers on one host shared their status and tally
    files: a stopping server deleted the other's status, so an admin swap counted one worker
    and answered before the other had switched."""
    supervisor = os.environ.get("DEEPSERVE_SUPERVISOR_PID") or str(os.getppid())
    return f"{socket.gethostname()}-{supervisor}-{metrics.worker_index()}"


def _digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def expected(exc: BaseException) -> bool:
    """A version refused for a reason the operator can act on (a file, its checks, its bars)."""
    return isinstance(exc, (ModelLoadError, MetadataError, OSError, ValueError))


def refusal(exc: BaseException) -> str:
    """The reason a worker reports for a refused version."""
    return (str(exc) if expected(exc) else f"internal error while loading: {exc!r}")[:500]


class Follower:
    """One worker's view of the manifest: loads, checks and switches family versions."""

    def __init__(self, core: Core, poll_s: float):
        self.core, self.poll_s = core, poll_s
        self.path = core.directory / MANIFEST
        self.stamp = self._stamp()
        self.state: dict[str, dict] = {}  # family -> {"state", "target", "error"}
        self.candidate_state: dict[str, dict] = {}  # family -> candidate being loaded or refused
        self.verified: dict[tuple[str, str], Loaded] = {}  # verified by this worker, not yet active
        self.rollouts = core.rollouts
        self.rollouts.worker = worker_id()
        self._last_check = 0.0
        self._lock = asyncio.Lock()
        self._last_write = 0.0
        self._task: asyncio.Task | None = None

    def _stamp(self) -> bytes | None:
        """The manifest's content digest: two writes within one tick of the file clock, of
        the same size, or onto a recycled inode still differ here (stat fields alone missed
        such changes); the file is a few kB, read once per poll."""
        try:
            return _digest(self.path.read_bytes())
        except OSError:
            return None

    def start(self) -> None:
        self.write_status()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="deepserve-follow-manifest")

    async def _run(self) -> None:
        try:
            await self.sync()  # a candidate and a running rollout too (a worker restarted mid-rollout)
        except Exception:
            log.exception("following the manifest failed; serving what is loaded")
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the follower die: the service must keep serving
                log.exception("following the manifest failed; serving what is loaded")

    async def poll(self) -> None:
        """One look at the manifest (every poll_s): sync if it differs from what the last sync
        read; the heartbeat; the running rollouts' checks."""
        if self._stamp() != self.stamp:
            await self.sync()
        if time.monotonic() - self._last_write >= HEARTBEAT_S:
            self.write_status()
        if self.rollouts.running and time.monotonic() - self._last_check >= self.core.settings.rollout_check_s:
            self._last_check = time.monotonic()
            await self.rollouts.check(self)

    async def sync(self) -> None:
        """Bring every family to the manifest's active version (or stay and say why)."""
        async with self._lock:
            # the stamp is what this sync read, whoever called it: an admin call syncs at once
            # after its write, and a manifest put back to its old bytes before the next poll
            # (A, B synced directly, A again) once left that worker holding B for good
            try:
                raw = self.path.read_bytes()
            except OSError:
                raw = None
            self.stamp = None if raw is None else _digest(raw)
            try:
                manifest = read_manifest(self.core.directory) if raw is None else parse_manifest(raw, self.path)
            except MetadataError as exc:
                log.error("manifest is invalid, keeping the loaded versions: %s", exc)
                return
            self.core.manifest = manifest
            for family, entry in manifest.families.items():
                loaded = self.core.active.get(family)
                if loaded is not None and loaded.version == entry.active:
                    self.state.pop(family, None)
                else:
                    await self.switch(family, entry.active)
                await self.hold_candidate(family, entry.candidate)
            self.rollouts.sync(manifest)
            self.write_status()

    async def hold_candidate(self, family: str, version: str | None) -> None:
        """Load (verified, warmed up) or drop the family's candidate as the manifest says."""
        held = self.core.candidates.get(family)
        if version is None:
            self.candidate_state.pop(family, None)
            if held is not None:
                self.core.set_candidate(None, family)
            return
        if held is not None and held.version == version:
            return
        self.candidate_state[family] = {"candidate": version, "candidate_state": "loading", "candidate_error": None}
        try:
            loaded = await self.verify(family, version)
        except Exception as exc:  # whatever went wrong, never "loading" for good: the admin call waits on it
            self.candidate_state[family].update(candidate_state="failed", candidate_error=refusal(exc))
            log.error("family %s candidate %s refused: %s", family, version, exc, exc_info=not expected(exc))
            return
        self.verified.pop((family, version), None)
        self.core.set_candidate(loaded, family)
        self.candidate_state.pop(family, None)
        log.info("family %s holds candidate %s", family, version)

    async def verify(self, family: str, version: str) -> Loaded:
        """Load and check a family version (in a thread), serve it from batchers of its own
        and warm it up; not yet active. Raises ModelLoadError with the reason."""
        key = (family, version)
        if key in self.verified:
            return self.verified[key]
        for loaded in (self.core.active.get(family), self.core.previous.get(family), self.core.candidates.get(family)):
            if loaded is not None and loaded.version == version:
                return loaded
        core = self.core
        manifest = read_manifest(core.directory)
        if family not in manifest.families:
            raise ModelLoadError(f"no family {family!r} in the manifest")
        loaded = await asyncio.to_thread(
            load_family, core.directory, manifest, family, version, core.settings.device, core.threads
        )
        core.serve(loaded)
        try:
            await core.warmup([loaded])
        except Exception as exc:  # an ORT error on the warm-up input...: refused, with the reason
            loaded.shutdown()
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"version {version} of {family} failed its warm-up: {exc!r}"[:500]) from exc
        self.verified[key] = loaded
        return loaded

    async def switch(self, family: str, version: str) -> None:
        self.state[family] = {"state": "loading", "target": version, "error": None}
        self.write_status()
        try:
            loaded = await self.verify(family, version)
        except Exception as exc:  # whatever went wrong, never "loading" for good: the admin call waits on it
            self.state[family] = {"state": "failed", "target": version, "error": refusal(exc)}
            log.error("family %s version %s refused: %s", family, version, exc, exc_info=not expected(exc))
            return
        self.verified.pop((family, version), None)
        self.core.activate(loaded)
        self.state.pop(family, None)
        log.info("family %s now serves version %s", family, version)

    async def confirm(self, family: str, version: str, fallback: tuple[str, str | None], rollout_id: str) -> str:
        """After a promotion: wait until every live worker serves `version`; if one refuses it
        (or the swap timeout passes), put `fallback` (active, previous) back and mark the
        rollout rolled back. The outcome."""
        deadline = time.monotonic() + self.core.settings.swap_timeout_s
        outcome = "timeout"
        while time.monotonic() < deadline:
            now = [s["families"].get(family, {}) for s in worker_states(self.core.directory)]
            if any(s.get("state") == "failed" and s.get("target") == version for s in now):
                outcome = "failed"
                break
            if now and all(s.get("active") == version and s.get("state") == "serving" for s in now):
                return "ok"
            await asyncio.sleep(0.1)
        await asyncio.to_thread(undo_promotion, self.core.directory, family, rollout_id, *fallback, outcome)
        await self.sync()
        log.error("promotion of %s %s %s on a worker: back on %s", family, version, outcome, fallback[0])
        return outcome

    def write_status(self) -> None:
        core = self.core
        families = {}
        for family, loaded in core.active.items():
            prev = core.previous.get(family)
            entry = {
                "active": loaded.version,
                "previous": prev.version if prev else None,
                "state": "serving",
                "target": loaded.version,
                "error": None,
            }
            entry.update(self.state.get(family, {}))
            held = core.candidates.get(family)
            entry.update(candidate=held.version if held else None, candidate_state="serving" if held else None)
            entry["candidate_error"] = None
            entry.update(self.candidate_state.get(family, {}))
            families[family] = entry
        payload = {"worker": worker_id(), "pid": os.getpid(), "heartbeat": time.time(), "families": families}
        folder = status_dir(core.directory)
        try:
            folder.mkdir(exist_ok=True)
            write_json_atomic(folder / f"{worker_id()}.json", payload)
        except OSError as exc:  # a read-only model directory: the admin API cannot be used
            log.debug("cannot write the worker status: %s", exc)
        self._last_write = time.monotonic()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(OSError):
            (status_dir(self.core.directory) / f"{worker_id()}.json").unlink()


def worker_states(directory: Path) -> list[dict]:
    """Every live worker's status (heartbeat within LIVE_S)."""
    import json

    out = []
    folder = status_dir(directory)
    if not folder.is_dir():
        return out
    now = time.time()
    for path in sorted(folder.glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if now - state.get("heartbeat", 0) <= LIVE_S:
            out.append(state)
    return out


async def watch_supervisor(drain, interval_s: float = 1.0) -> None:
    """Drain and exit when the process that started this worker is gone (no ghost workers).
    The supervisor's pid comes from the environment it set before starting the workers, so a
    supervisor killed while this worker was still starting is noticed too."""
    parent = int(os.environ.get("DEEPSERVE_SUPERVISOR_PID") or os.getppid())
    while True:
        if os.getppid() != parent:
            log.warning("the supervisor (pid %d) is gone: draining, then exiting", parent)
            drain.start()
            return
        await asyncio.sleep(interval_s)


class StartGuard:
    """Bounds a worker crash loop: BentoML respawns a worker that dies while starting, forever,
    behind a port that accepts connections and never answers. Each worker start is counted in
    a file shared by the server's workers (keyed by the supervisor's pid); a worker that is
    ready resets it; the start after `limit` failed ones in a row stops the whole server (SIGTERM
    to the supervisor) with one clear log line instead."""

    def __init__(self, limit: int, supervisor: int | None = None):
        import tempfile

        self.limit = limit
        self.supervisor = supervisor or int(os.environ.get("DEEPSERVE_SUPERVISOR_PID") or os.getppid())
        self.path = Path(tempfile.gettempdir()) / f"deepserve-starts-{self.supervisor}"

    def begin(self) -> None:
        with open(self.path, "ab") as f:
            f.write(b"x")
            failed = f.tell() - 1
        if failed >= self.limit:
            log.error(
                "deepserve: workers failed to start %d times in a row (see the errors above); stopping the server",
                failed,
            )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.supervisor, signal.SIGTERM)
            raise SystemExit(3)

    def succeeded(self) -> None:
        with contextlib.suppress(OSError):
            self.path.write_bytes(b"")
