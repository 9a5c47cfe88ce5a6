"""The admin API: load a model version into the running service, or roll back.

Off (404) unless DEEPSERVE_ADMIN_KEY is set; then every call needs `Authorization: Bearer
<admin key>` (a key of its own, never the client key). The unit is the family: the codec's
encoder and decoder always change together.

    POST /admin/models/{family}/load      {"version": "...", "allow_below_bars": false}
    POST /admin/models/{family}/rollback
    GET  /admin/status                    every live worker's versions and state

A load verifies the candidate in the receiving worker first (sha256s, ONNX Runtime,
signatures against their tasks, the smoke set, a warm-up); only then is the manifest
updated, atomically. Every worker follows the manifest (service.versions) and checks the
version the same way; the call answers 200 once every live worker serves it, 409 with the
reason if any worker's check fails (the manifest is put back, so every worker stays on or
returns to the old version), and 504 with each worker's state after DEEPSERVE_SWAP_TIMEOUT_S.
Model endpoints are safe to retry; these are not (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import hmac
import time

from service import metrics
from service.errors import ApiError, bool_field, shown, str_field
from service.httpkit import Route, json_response
from service.metadata import Manifest, read_manifest, read_metadata
from service.repository import set_active
from service.runtime import ModelLoadError
from service.versions import worker_states


def install(app) -> None:
    lock = asyncio.Lock()  # one version change at a time per worker

    def authorize(req) -> None:
        key = app.settings.admin_key
        if not key:
            raise ApiError(404, "the admin API is off: set DEEPSERVE_ADMIN_KEY to turn it on", "unrouted")
        auth = req.header("authorization")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or wrong admin key: send 'Authorization: Bearer <admin key>'", "unauthorized")
        if app.core is None or not app.core.ready or getattr(app, "follower", None) is None:
            raise ApiError(503, "deepserve is starting", "not_ready")

    def states(family: str) -> list[dict]:
        return [{"worker": s["worker"], **s["families"].get(family, {})} for s in worker_states(app.core.directory)]

    async def wait_for(family: str, version: str, timeout: float) -> str:
        """'ok' once every live worker serves `version`, 'failed' if one refused it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = states(family)
            if any(s.get("state") == "failed" and s.get("target") == version for s in now):
                return "failed"
            if now and all(s.get("active") == version and s.get("state") == "serving" for s in now):
                return "ok"
            await asyncio.sleep(0.1)
        return "timeout"

    async def change(family: str, version: str, outcome_ok: str) -> object:
        core, follower, s = app.core, app.follower, app.settings
        manifest = read_manifest(core.directory)
        old = manifest.families[family]
        if old.active == version:
            return json_response({"family": family, "version": version, "changed": False, "workers": states(family)})
        try:
            await follower.verify(family, version)
        except (ModelLoadError, ValueError, OSError) as exc:
            metrics.get().swaps.labels(family, "refused").inc()
            raise ApiError(409, f"version {version} of {family} refused: {str(exc)[:400]}", "swap_refused") from None
        await asyncio.to_thread(set_active, core.directory, family, version, old.active)
        await follower.sync()  # this worker switches at once; the others follow the manifest
        result = await wait_for(family, version, s.swap_timeout_s)
        workers = states(family)
        if result == "ok":
            metrics.get().swaps.labels(family, outcome_ok).inc()
            return json_response(
                {"family": family, "version": version, "previous": old.active, "changed": True, "workers": workers}
            )
        if result == "failed":
            await asyncio.to_thread(set_active, core.directory, family, old.active, old.previous)
            await follower.sync()
            await wait_for(family, old.active, s.swap_timeout_s)
            metrics.get().swaps.labels(family, "failed").inc()
            reasons = sorted({w["error"] for w in workers if w.get("error")})
            raise ApiError(
                409,
                f"version {version} of {family} failed its checks on a worker: {'; '.join(reasons)[:400]}; "
                f"every worker is back on {old.active}",
                "swap_failed",
                workers=workers,
            )
        metrics.get().swaps.labels(family, "timeout").inc()
        raise ApiError(
            504,
            f"not every worker serves {version} of {family} after {s.swap_timeout_s:g} s",
            "swap_timeout",
            workers=workers,
        )

    def family_or_404(family: str) -> Manifest:
        manifest = read_manifest(app.core.directory)
        if family not in manifest.families:
            raise ApiError(404, f"no family {shown(family)}; families: {sorted(manifest.families)}", "not_served")
        return manifest

    async def load(req, family: str):
        authorize(req)
        payload = await req.json_body(64 * 1024)
        if not isinstance(payload, dict):
            raise ApiError(400, 'send a JSON object {"version": "..."}', "bad_json")
        unknown = sorted(set(payload) - {"version", "allow_below_bars"})
        if unknown:
            raise ApiError(400, f"unknown field(s) {shown(unknown)}", "unknown_field")
        version = str_field(payload.get("version"), "version")
        allow = bool_field(payload.get("allow_below_bars"), "allow_below_bars")
        manifest = family_or_404(family)
        available = manifest.family_versions(family)
        if version not in available:
            raise ApiError(404, f"{family} has no version {shown(version)}; on disk: {available}", "not_served")
        if not allow:
            for name in manifest.families[family].models:
                meta = read_metadata(app.core.directory / manifest.models[name].versions[version].metadata, name)
                if not meta.meets_bars:
                    metrics.get().swaps.labels(family, "below_bars").inc()
                    raise ApiError(
                        409,
                        f"version {version} of {family} is below its quality bars ({name}: "
                        f'{meta.metrics}); send "allow_below_bars": true to load it anyway',
                        "below_bars",
                    )
        async with lock:
            return await change(family, version, "ok")

    async def rollback(req, family: str):
        authorize(req)
        manifest = family_or_404(family)
        previous = manifest.families[family].previous
        if previous is None:
            raise ApiError(409, f"{family} has no previous version to roll back to", "no_previous")
        async with lock:
            return await change(family, previous, "rolled_back")

    async def status(req):
        authorize(req)
        manifest = read_manifest(app.core.directory)
        return json_response(
            {
                "families": {f: e.model_dump() for f, e in manifest.families.items()},
                "workers": worker_states(app.core.directory),
            }
        )

    routes = {
        "load": Route("/admin/models/{family}/load", ("POST",), load),
        "rollback": Route("/admin/models/{family}/rollback", ("POST",), rollback),
    }

    def match(path: str):
        parts = path.split("/")  # '', 'admin', 'models', family, action
        if len(parts) == 5 and parts[3] and parts[4] in routes:
            return routes[parts[4]], {"family": parts[3]}
        return None

    app.add("/admin/status", status)
    app.add_prefix("/admin/models/", match)
