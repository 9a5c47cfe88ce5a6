"""The admin API: load a model version into the running service, or roll back.

Off (404) unless DEEPSERVE_ADMIN_KEY is set; then every call needs `Authorization: Bearer
<admin key>` (a key of its own, never the client key). The unit is the family: the codec's
encoder and decoder always change together.

    POST   /admin/models/{family}/load       {"version": "...", "allow_below_bars": false}
    POST   /admin/models/{family}/rollback
    POST   /admin/models/{family}/candidate  {"version": "...", "allow_below_bars": false}: load, serve nothing
    DELETE /admin/models/{family}/candidate  drop it (stops its rollout)
    POST   /admin/models/{family}/rollout    {"shadow": 0.5, "canary": 0.1, "policy": {...} | null}
    DELETE /admin/models/{family}/rollout    stop it: the candidate is dropped (rolled back)
    POST   /admin/models/{family}/promote    the candidate becomes active (the load path's checks)
    GET    /admin/status                     every live worker's versions and state, every rollout's tally

Rollouts (service.rollout): the candidate is verified like a load, then held by every worker;
a rollout mirrors (shadow) and/or serves (canary) a share of the family's traffic; with a
policy it promotes or rolls back by itself once the evidence is in.

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

from pydantic import ValidationError

from service import metrics, repository, rollout
from service.errors import ApiError, bool_field, shown, str_field
from service.httpkit import Route, json_response
from service.metadata import Manifest, Rollout, RolloutPolicy, describe, read_manifest, read_metadata
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
        payload = await json_object(req, {"version", "allow_below_bars"})
        version = str_field(payload.get("version"), "version")
        allow = bool_field(payload.get("allow_below_bars"), "allow_below_bars")
        check_version(family, version, allow)
        async with lock:
            return await change(family, version, "ok")

    def check_version(family: str, version: str, allow_below_bars: bool) -> Manifest:
        """The version exists for every model of the family and meets its bars (unless allowed)."""
        manifest = family_or_404(family)
        available = manifest.family_versions(family)
        if version not in available:
            raise ApiError(404, f"{family} has no version {shown(version)}; on disk: {available}", "not_served")
        if not allow_below_bars:
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
        return manifest

    async def json_object(req, allowed: set[str]) -> dict:
        payload = await req.json_body(64 * 1024)
        if not isinstance(payload, dict):
            raise ApiError(400, f"send a JSON object with fields {sorted(allowed)}", "bad_json")
        unknown = sorted(set(payload) - allowed)
        if unknown:
            raise ApiError(400, f"unknown field(s) {shown(unknown)}; allowed: {sorted(allowed)}", "unknown_field")
        return payload

    async def wait_candidate(family: str, version: str | None, timeout: float) -> str:
        """'ok' once every live worker holds `version` as the candidate (None: holds none),
        'failed' if one refused it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = states(family)
            if version and any(s.get("candidate_state") == "failed" and s.get("candidate") == version for s in now):
                return "failed"
            if now and all(
                s.get("candidate") == version and s.get("candidate_state") in ("serving", None) for s in now
            ):
                return "ok"
            await asyncio.sleep(0.1)
        return "timeout"

    async def candidate(req, family: str):
        authorize(req)
        core, follower, s = app.core, app.follower, app.settings
        if req.method == "DELETE":
            family_or_404(family)
            async with lock:
                before = read_manifest(core.directory).families[family]
                await asyncio.to_thread(repository.set_candidate, core.directory, family, None)
                if before.rollout is not None and before.rollout.state == "running":
                    metrics.get().rollout_decisions.labels(family, "stopped", "operator").inc()
                await follower.sync()
                await wait_candidate(family, None, s.swap_timeout_s)
            return json_response({"family": family, "candidate": None, "dropped": before.candidate})
        payload = await json_object(req, {"version", "allow_below_bars"})
        version = str_field(payload.get("version"), "version")
        manifest = check_version(family, version, bool_field(payload.get("allow_below_bars"), "allow_below_bars"))
        if version == manifest.families[family].active:
            raise ApiError(409, f"{version} is the active version of {family}", "already_active")
        async with lock:
            try:
                await follower.verify(family, version)
            except (ModelLoadError, ValueError, OSError) as exc:
                raise ApiError(
                    409, f"candidate {version} of {family} refused: {str(exc)[:400]}", "swap_refused"
                ) from None
            await asyncio.to_thread(repository.set_candidate, core.directory, family, version)
            await follower.sync()
            result = await wait_candidate(family, version, s.swap_timeout_s)
            workers = states(family)
            if result == "ok":
                return json_response({"family": family, "candidate": version, "workers": workers})
            await asyncio.to_thread(repository.set_candidate, core.directory, family, None)
            await follower.sync()
            if result == "failed":
                reasons = sorted({w["candidate_error"] for w in workers if w.get("candidate_error")})
                raise ApiError(
                    409,
                    f"candidate {version} of {family} failed its checks on a worker: {'; '.join(reasons)[:400]}",
                    "swap_failed",
                    workers=workers,
                )
            raise ApiError(
                504,
                f"not every worker holds candidate {version} of {family} after {s.swap_timeout_s:g} s",
                "swap_timeout",
                workers=workers,
            )

    async def rollout_call(req, family: str):
        authorize(req)
        core, follower = app.core, app.follower
        if req.method == "DELETE":
            manifest = family_or_404(family)
            r = manifest.families[family].rollout
            if r is None or r.state != "running":
                raise ApiError(409, f"{family} has no running rollout", "no_rollout")
            async with lock:
                evidence = core.rollouts.evidence(family, r.id)
                try:
                    await asyncio.to_thread(
                        repository.decide_rollout,
                        core.directory,
                        family,
                        r.id,
                        "rolled_back",
                        "stopped by an operator",
                        evidence,
                    )
                except repository.Conflict as exc:
                    raise ApiError(409, str(exc), "no_rollout") from None
                metrics.get().rollout_decisions.labels(family, "rolled_back", "operator").inc()
                await follower.sync()
                await wait_candidate(family, None, app.settings.swap_timeout_s)
            return json_response({"family": family, "rollout": r.id, "state": "rolled_back", "evidence": evidence})
        payload = await json_object(req, {"shadow", "canary", "policy"})
        manifest = family_or_404(family)
        entry = manifest.families[family]
        if entry.candidate is None:
            raise ApiError(
                409, f"{family} has no candidate: POST /admin/models/{family}/candidate first", "no_candidate"
            )
        old = entry.rollout if entry.rollout is not None and entry.rollout.state == "running" else None
        fields = {
            "id": old.id if old is not None else rollout.new_rollout_id(entry.candidate),
            "candidate": entry.candidate,
            "shadow": payload.get("shadow", 0.0),
            "canary": payload.get("canary", 0.0),
            "policy": payload.get("policy"),
            "started": old.started if old is not None else time.time(),
        }
        try:
            if fields["policy"] is not None:
                fields["policy"] = RolloutPolicy.model_validate(fields["policy"]).model_dump()
        except ValidationError as exc:
            raise ApiError(400, f"bad rollout policy: {describe(exc)}", "bad_field") from None
        try:
            spec = Rollout.model_validate(fields)
        except ValidationError as exc:
            raise ApiError(400, f"bad rollout: {describe(exc)}", "bad_field") from None
        async with lock:
            try:
                await asyncio.to_thread(
                    repository.start_rollout, core.directory, family, spec.model_dump(exclude_none=True)
                )
            except repository.Conflict as exc:
                raise ApiError(409, str(exc), "no_candidate") from None
            await follower.sync()
        return json_response({"family": family, "rollout": spec.model_dump()})

    async def promote(req, family: str):
        authorize(req)
        manifest = family_or_404(family)
        entry = manifest.families[family]
        if entry.candidate is None:
            raise ApiError(409, f"{family} has no candidate to promote", "no_candidate")
        r = entry.rollout
        async with lock:
            if r is not None and r.state == "running":
                evidence = app.core.rollouts.evidence(family, r.id)
                try:
                    await asyncio.to_thread(
                        repository.decide_rollout,
                        app.core.directory,
                        family,
                        r.id,
                        "promoted",
                        "promoted by an operator",
                        evidence,
                    )
                except repository.Conflict as exc:
                    raise ApiError(409, str(exc), "no_rollout") from None
                metrics.get().rollout_decisions.labels(family, "promoted", "operator").inc()
                await app.follower.sync()
                result = await wait_for(family, entry.candidate, app.settings.swap_timeout_s)
                if result != "ok":
                    await asyncio.to_thread(
                        repository.undo_promotion,
                        app.core.directory,
                        family,
                        r.id,
                        entry.active,
                        entry.previous,
                        result,
                    )
                    metrics.get().rollout_decisions.labels(family, "promotion_failed", "operator").inc()
                    await app.follower.sync()
                    raise ApiError(
                        409 if result == "failed" else 504,
                        f"promoting {entry.candidate} of {family}: {result} on a worker; every worker is back on "
                        f"{entry.active}",
                        "swap_failed",
                        workers=states(family),
                    )
                return json_response(
                    {"family": family, "version": entry.candidate, "previous": entry.active, "changed": True}
                )
            return await change(family, entry.candidate, "ok")

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
        families = {}
        for f, e in manifest.families.items():
            families[f] = e.model_dump()
            if e.rollout is not None and e.rollout.state == "running":
                families[f]["rollout"]["live"] = app.core.rollouts.evidence(f, e.rollout.id)
        return json_response({"families": families, "workers": worker_states(app.core.directory)})

    routes = {
        "load": Route("/admin/models/{family}/load", ("POST",), load),
        "rollback": Route("/admin/models/{family}/rollback", ("POST",), rollback),
        "candidate": Route("/admin/models/{family}/candidate", ("POST", "DELETE"), candidate),
        "rollout": Route("/admin/models/{family}/rollout", ("POST", "DELETE"), rollout_call),
        "promote": Route("/admin/models/{family}/promote", ("POST",), promote),
    }

    def match(path: str):
        parts = path.split("/")  # '', 'admin', 'models', family, action
        if len(parts) == 5 and parts[3] and parts[4] in routes:
            return routes[parts[4]], {"family": parts[3]}
        return None

    app.add("/admin/status", status)
    app.add_prefix("/admin/models/", match)
