"""The contracts, generated from the task registry and the settings (never kept by hand):
the OpenAPI 3 document (/docs.json, /openapi.json) and the route description BentoML's own
client reads (/schema.json). Limits, model names and labels come from the same objects the
server enforces, so the documents cannot drift from what is served."""

from __future__ import annotations

from typing import Any

from service import __version__, v2
from service.settings import Settings
from service.tasks import TASKS, Task, routes

ERROR = {"$ref": "#/components/schemas/Error"}
ERROR_TEXT = {
    400: "invalid input (the message names the field and the problem)",
    401: "API key missing or wrong (only when DEEPSERVE_API_KEY is set)",
    404: "no such model, no model for this task, or the pinned model_version is not loaded",
    408: "the request body made no progress for DEEPSERVE_BODY_IDLE_TIMEOUT_S",
    413: "body, image pixels or text over a configured limit",
    415: "wrong Content-Type, or an upload that is not a supported image",
    422: "reject_ood was set and an input looks unlike the model's training data",
    503: "overloaded or still starting; retry after the Retry-After header",
    504: "the request did not finish within DEEPSERVE_REQUEST_TIMEOUT_S",
}
PNG = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
IMAGE_TYPES = "image/png, image/jpeg, image/gif, image/bmp, image/webp, image/tiff, application/octet-stream"


def errors(*codes: int) -> dict:
    return {
        str(c): {"description": ERROR_TEXT[c], "content": {"application/json": {"schema": ERROR}}}
        for c in sorted({*codes, 401, 503, 504})
    }


def model_names(core, task: Task) -> list[str]:
    return core.names_for(task.name) if core is not None else []


def common_fields(core, task: Task) -> dict:
    names = model_names(core, task)
    default = core.manifest.default_for(task.name) if core is not None else None
    model = {"type": "string", "description": f"which model of task {task.name} (default: {default})"}
    if names:
        model["enum"] = names
    return {
        "model": model,
        "model_version": {
            "type": "string",
            "description": "pin a loaded version (GET /models lists them); 404 names the loaded ones otherwise",
        },
    }


def request_body(settings: Settings, core, by_body: dict[str, Task]) -> dict:
    content = {}
    for kind, task in by_body.items():
        props, required = task.properties(settings, model_names(core, task))
        schema = {"type": "object", "properties": {**props, **common_fields(core, task)}, "additionalProperties": False}
        if required:
            schema["required"] = required
        if "text" in props and "texts" in props:
            schema["oneOf"] = [{"required": ["text"]}, {"required": ["texts"]}]
        if kind == "multipart":
            content["multipart/form-data"] = {"schema": schema, "encoding": {"image": {"contentType": IMAGE_TYPES}}}
        else:
            content["application/json"] = {"schema": schema}
    return {"required": True, "content": content}


def ok_response(by_body: dict[str, Task]) -> dict:
    content: dict[str, Any] = {}
    for task in by_body.values():
        if task.response == "png":
            content.update(PNG)
        if task.response_schema:
            content["application/json"] = {"schema": {"$ref": f"#/components/schemas/{task.response_schema}"}}
    return {"description": " / ".join(t.summary for t in by_body.values()), "content": content}


def document(settings: Settings, core=None) -> dict:
    paths: dict[str, Any] = {}
    for path, by_body in routes().items():
        codes = {400, 404, 408, 413, 415} | (
            {422} if any("reject_ood" in t.fields for t in by_body.values()) else set()
        )
        paths[path] = {
            "post": {
                "summary": "; ".join(t.summary for t in by_body.values()),
                "description": " ".join(
                    f"`{t.name}` ({'JSON' if t.body == 'json' else 'multipart/form-data'})" for t in by_body.values()
                ),
                "requestBody": request_body(settings, core, by_body),
                "responses": {"200": ok_response(by_body), **errors(*codes)},
            }
        }
    paths["/models"] = {
        "get": {
            "summary": "Every served model: versions, sha256, signature, metrics, execution provider, trust settings",
            "responses": {
                "200": {
                    "description": "the registry",
                    "content": {"application/json": {"schema": {"type": "object", "required": ["models", "provider"]}}},
                },
                **errors(),
            },
        }
    }
    for probe in ("/livez", "/healthz", "/readyz"):
        paths[probe] = {
            "get": {
                "summary": f"BentoML {probe[1:]} probe",
                "responses": {
                    "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "503": {
                        "description": "not ready/alive",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                },
            }
        }
    paths.update(v2.openapi_paths(settings, core))
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "deepserve",
            "version": __version__,
            "description": "Digits, fashion and sentiment classifiers, a digit generator, an image codec and "
            "a denoiser, on ONNX Runtime behind BentoML. Also speaks the Open Inference "
            "Protocol (KServe v2 / Triton) under /v2.",
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }


CLASSIFICATION = {
    "type": "object",
    "required": ["model", "model_version", "label", "index", "confidence", "top_k"],
    "properties": {
        "model": {"type": "string"},
        "model_version": {"type": "string"},
        "label": {"type": "string"},
        "index": {"type": "integer"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["label", "index", "probability"],
                "properties": {
                    "label": {"type": "string"},
                    "index": {"type": "integer"},
                    "probability": {"type": "number", "minimum": 0, "maximum": 1},
                },
            },
        },
        "ood_score": {"type": "number", "description": "images: higher = less like the training data"},
        "unknown_token_rate": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "texts: share of words the model does not know",
        },
        "in_distribution": {
            "type": "boolean",
            "description": "false: do not trust this answer; the input looks unlike what the model was trained on",
        },
    },
}
SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error", "status"],
        "properties": {
            "error": {"type": "string"},
            "status": {"type": "integer"},
            "request_id": {"type": "string"},
            "limit": {"type": "number"},
        },
    },
    "Classification": CLASSIFICATION,
    "ClassificationResult": {
        "oneOf": [
            {"$ref": "#/components/schemas/Classification"},
            {
                "type": "object",
                "required": ["results"],
                "properties": {"results": {"type": "array", "items": {"$ref": "#/components/schemas/Classification"}}},
            },
        ]
    },
    "Generated": {
        "type": "object",
        "required": ["images", "seed", "digits"],
        "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
            "seed": {"type": "integer"},
            "digits": {"type": "array", "items": {"type": "integer"}},
            "model_version": {"type": "string"},
        },
    },
    "Code": {
        "type": "object",
        "required": ["code", "bytes", "original_bytes", "ratio", "model_version"],
        "properties": {
            "code": {"type": "string", "format": "byte"},
            "bytes": {"type": "integer"},
            "original_bytes": {"type": "integer"},
            "ratio": {"type": "number"},
            "model_version": {"type": "string"},
        },
    },
}


def bentoml_schema(settings: Settings, core=None) -> dict:
    """/schema.json as BentoML's own client reads it: one method per route. /classify is one
    method, `classify`, for images and text alike: the client sends multipart whenever the
    schema has a file property, so text goes as form fields (`text`, `texts`), which /classify
    accepts as it accepts `model` and `top_k`. The PNG routes return what their schema says:
    a PIL image (so `generate` gives the grid; JSON output is for plain HTTP)."""
    out = []
    for path, by_body in routes().items():
        props, required, first = {}, None, None
        for kind, task in sorted(by_body.items(), key=lambda kv: kv[0] != "multipart"):
            task_props, task_required = task.properties(settings, model_names(core, task))
            task_props = {**task_props, **common_fields(core, task)}
            if kind == "multipart":  # the client sends a property as a file when its type is "file"
                image = task_props["image"]
                task_props["image"] = (
                    {"type": "array", "items": {"type": "file", "format": "image"}}
                    if image.get("type") == "array"
                    else {"type": "file", "format": "image"}
                )
            for name, spec in task_props.items():
                props.setdefault(name, spec)
            # several tasks on one route: none of their fields alone is required
            required = task_required if required is None else []
            first = first or task
        if first.response == "png":
            props.pop("format", None)  # the client expects what the schema says: the PNG
            output = {"type": "file", "format": "image", "pil": True, "content_type": "image/png"}
        else:
            output = {"type": "object"}
        doc = " / ".join(t.summary for t in by_body.values())
        out.append(
            {
                "name": first.client_method,
                "route": path,
                "doc": doc,
                "input": {"type": "object", "properties": props, "required": required},
                "output": output,
                "is_task": False,
            }
        )
    return {"name": "deepserve", "type": "service", "routes": out}


__all__ = ["TASKS", "bentoml_schema", "document"]
