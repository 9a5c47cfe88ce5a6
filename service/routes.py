"""Every route of the front door, from the task registry: one model route per task route
(/classify, /generate, ...), the registry (/models), the generated contracts (/docs.json,
/schema.json), the docs and playground pages and their static files; `install` also wires
the Open Inference Protocol (service.v2) and the admin API (service.admin)."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from service import admin, compat, dataplane, openapi, v2
from service.errors import ApiError, shown, str_field
from service.httpkit import Response, Route, json_response
from service.tasks import TASKS, Answer, Body, Task, routes

STATIC = Path(__file__).resolve().parent / "static"
SWAGGER = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-light-32x32.png")
CSP = "default-src 'self'; img-src 'self' data: blob:"
COMMON_FIELDS = frozenset({"model", "model_version"})
WRONG_TYPE = {
    "json": "send a JSON body with Content-Type: application/json",
    "multipart": "send the image as multipart/form-data with a file field 'image'",
}


def install(app) -> None:
    for path, by_body in routes().items():
        app.add(path, model_handler(app, path, by_body), methods=("POST",), model_work=True)

    async def models(req):
        app.check_api_key(req)
        return json_response(registry(app))

    async def docs_json(req):
        return json_response(openapi.document(app.settings, app.core))

    async def schema_json(req):
        return json_response(openapi.bentoml_schema(app.settings, app.core))

    app.add("/models", models)
    app.add("/docs.json", docs_json)
    app.add("/openapi.json", docs_json)
    app.add("/schema.json", schema_json)

    files = static_files()

    async def static(req, name: str):
        path = files[name]
        headers = [
            (b"cache-control", b"public, max-age=300"),
            (b"content-security-policy", CSP.encode()),
            (b"x-content-type-options", b"nosniff"),
        ]
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if media.startswith("text/") or media in ("application/javascript",):
            media += "; charset=utf-8"
        return Response(200, path.read_bytes(), media, headers)

    def match_static(path: str):
        name = path.removeprefix("/static/")
        if name in files:
            return Route("/static/*", ("GET",), static), {"name": name}
        return None

    app.add_prefix("/static/", match_static)
    if "index.html" in files:
        app.add("/", lambda req: static(req, "index.html"), endpoint="/")
    if "docs.html" in files:
        app.add("/docs", lambda req: static(req, "docs.html"), endpoint="/docs")

    v2.install(app)
    admin.install(app)


def static_files() -> dict[str, Path]:
    """The fixed set of files under /static/: the playground's, and the Swagger UI's from
    BentoML's package (served from here so the docs page makes no third-party request)."""
    files = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()} if STATIC.is_dir() else {}
    bundled = compat.swagger_static_dir()
    if bundled is not None:
        files.update({f"swagger/{n}": bundled / n for n in SWAGGER if (bundled / n).is_file()})
    return files


def registry(app) -> dict:
    """GET /models: every model, its version(s), signature, metrics and provider."""
    core, s = app.core, app.settings
    listing = []
    for name, model in core.models.items():
        meta, task = model.meta, TASKS[model.task]
        family = core.manifest.families[model.family]
        info = {
            "name": name,
            "task": model.task,
            "family": model.family,
            "version": model.version,
            "versions": {
                "active": family.active,
                "previous": family.previous,
                "loaded": core.loaded_versions(name),
                "available": core.manifest.family_versions(model.family),
            },
            "default_for_task": core.manifest.default_for(model.task) == name,
            "sha256": meta.sha256,
            "provider": model.provider,
            "provider_reason": model.provider_reason or None,
            "inputs": [i.model_dump() for i in meta.inputs],
            "outputs": [o.model_dump() for o in meta.outputs],
            "preprocessing": meta.preprocessing.model_dump(),
            "metrics": meta.metrics,
            "meets_bars": meta.meets_bars,
            "trained_with": meta.training.command,
        }
        if family.rollout is not None:  # the running rollout, or the last one's decision (the playground's panel)
            info["rollout"] = rollout_view(core, model.family, family.rollout)
        info.update(task.describe(model))
        cal, ood = getattr(meta, "calibration", None), getattr(meta, "ood", None)
        if cal is not None or ood is not None:
            info["trust"] = {
                "temperature": cal.temperature if cal else None,
                "ood_method": ood.method if ood else None,
                "ood_threshold": ood.threshold if ood else None,
                "baseline_ood_rate": ood.baseline_ood_rate if ood else None,
            }
        listing.append(info)
    return {
        "models": listing,
        "device": s.device,
        "provider": core.provider,
        "defaults": {t: core.manifest.default_for(t) for t in TASKS if core.names_for(t)},
        "batching": {"enabled": s.batching, "max_batch_size": s.max_batch_size, "max_latency_ms": s.max_latency_ms},
    }


def rollout_view(core, family: str, r) -> dict:
    """A rollout as /models shows it: shares, state, decision, and its numbers so far."""
    live = core.rollouts.evidence(family, r.id) if r.state == "running" else r.evidence
    return {
        "id": r.id,
        "candidate": r.candidate,
        "shadow": r.shadow,
        "canary": r.canary,
        "automatic": r.policy is not None,
        "state": r.state,
        "reason": r.reason,
        "summary": (live or {}).get("summary"),
    }


def model_handler(app, path: str, by_body: dict[str, Task]):
    """POST handler of one model route: the body names the task (by its kind) and the model;
    the task parses it into a job and makes the answer; service.dataplane does the rest."""

    async def handle(req) -> Response:
        media = req.media_type()
        urlencoded = media == "application/x-www-form-urlencoded" and "json" in by_body and "multipart" in by_body
        kind = (
            "multipart" if urlencoded else {"application/json": "json", "multipart/form-data": "multipart"}.get(media)
        )
        task = by_body.get(kind)
        if task is None:
            if len(by_body) > 1:
                raise ApiError(
                    415,
                    'send an image as multipart/form-data (field \'image\') or text as JSON {"text": "..."}',
                    "wrong_content_type",
                )
            raise ApiError(415, WRONG_TYPE[next(iter(by_body))], "wrong_content_type")
        s, core = app.settings, app.core
        if kind == "json":
            payload = await req.json_body(s.max_body_bytes)
            if not isinstance(payload, dict):
                raise ApiError(400, "body must be a JSON object", "bad_json")
            body = Body(payload)
            unknown = sorted(set(payload) - task.fields - COMMON_FIELDS)
            if unknown:
                raise ApiError(
                    400,
                    f"unknown field(s) {shown(unknown, 80)}; allowed: {sorted(task.fields | COMMON_FIELDS)}",
                    "unknown_field",
                )
        else:
            if urlencoded:  # form fields and no file: BentoML's client sending text to /classify
                files, fields = [], await req.urlencoded(s.max_body_bytes)
                if "text" not in fields and "texts" not in fields:
                    raise ApiError(
                        415,
                        "send an image as multipart/form-data (field 'image'); url-encoded forms carry only "
                        "text ('text' or 'texts')",
                        "wrong_content_type",
                    )
            else:
                files, fields = await req.form(s.max_body_bytes, max_files=s.max_images)
            text_task = by_body.get("json")
            if not files and text_task is not None and ("text" in fields or "texts" in fields):
                task = text_task  # text as form fields (BentoML's client sends multipart): the text task
            unknown = sorted(set(fields) - task.fields - COMMON_FIELDS)
            if unknown:
                raise ApiError(
                    400,
                    f"unknown field {shown(unknown[0])}; allowed: {sorted({'image', *task.fields, *COMMON_FIELDS})}",
                    "unknown_field",
                )
            body = Body(fields, files)
        name, version = model_asked(core, task, by_body, body.fields)

        if "seed" in task.fields:

            async def decode(model, ctx=req):
                job = await task.parse(body, model, ctx)
                body.fields.setdefault("seed", job.info.get("seed"))  # a shadow of it draws the same latents
                return job
        else:

            def decode(model, ctx=req):  # the coroutine itself: no extra frame per request
                return task.parse(body, model, ctx)

        def encode(model, job, result) -> Response:
            return response(task.answer(model, job, result))

        return await dataplane.infer(app, req, name, version, decode, encode)

    handle.__name__ = f"post_{path.strip('/')}"
    return handle


def response(answer: Answer) -> Response:
    if isinstance(answer.content, dict):
        return json_response(answer.content, 200, answer.headers)
    headers = [(k.lower().encode(), v.encode()) for k, v in answer.headers.items()]
    return Response(200, answer.content, answer.media_type, headers)


def model_asked(core, task: Task, by_body: dict[str, Task], fields: dict) -> tuple[str, str | None]:
    """The model a request asks for: `model` or the task's default (which must serve the
    task), and the pinned `model_version` (None: the active one)."""
    name = fields.get("model")
    if name is None:
        name = core.default_model(task.name)
    name = str_field(name, "model")
    entry = core.manifest.models.get(name)
    if entry is None or entry.task != task.name:
        others = [t for t in by_body.values() if t is not task]
        hint = ""
        if entry is not None and others and entry.task == others[0].name:
            hint = " (text goes as JSON)" if others[0].body == "json" else " (images go as multipart/form-data)"
        choices = core.names_for(task.name)
        raise ApiError(
            400, f"model {shown(name)} does not serve {task.name}; choose one of {choices}{hint}", "unknown_model"
        )
    version = fields.get("model_version")
    if version is not None:
        version = str_field(version, "model_version")
    return name, version
