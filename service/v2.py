"""The Open Inference Protocol (KServe v2 / Triton HTTP/REST) under /v2.

Every served model is there under its name with its ONNX signature: normalized inputs and
raw outputs exactly as its metadata declares (variable dimensions as -1), plus views that
reuse a model's batcher and version with a friendlier signature (`sentiment_text`: text in,
probabilities and label out, tokenized by the same code as /classify). Both come from the
model's task (`Task.signatures`) for the version asked for: a pinned version is described
and run with its own signature. This module only decodes tensors and encodes them;
service.dataplane runs the request, as for every other model endpoint: the same version
resolution, batchers, limits, API key, shedding, drain, timings and finish step (the
classifiers' confidence and in-distribution metrics). Rows are capped by the matching
endpoint's limit, element counts are checked against shapes before anything is allocated,
and a request of 64 rows is one batch item.

JSON tensors and the binary tensor data extension (`Inference-Header-Content-Length`,
`binary_data_size`, `binary_data_output`, BYTES as 4-byte little-endian length prefixes)
are understood in both directions; any Content-Type is accepted on infer.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service import __version__, dataplane, tasks
from service.errors import ApiError, shown
from service.httpkit import Response, Route, json_response, parse_json
from service.runtime import Model
from service.tasks import TASKS, Job

DATATYPES = {"float32": "FP32", "int64": "INT64", "uint8": "UINT8", "bytes": "BYTES"}
NUMPY = {
    "FP32": np.float32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "FP64": np.float64,
    "INT32": np.int32,
    "FP16": np.float16,
    "INT8": np.int8,
    "INT16": np.int16,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "BOOL": np.bool_,
}
TRITON_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "UINT8": "TYPE_UINT8", "BYTES": "TYPE_STRING"}
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
MAX_TEXT_BYTES = 1 << 20


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]  # -1 for a variable dimension (the first is the batch)


@dataclass
class View:
    """What /v2 serves under one name at one model version: the model's own signature, or a
    view of it (`<model>_<key>`)."""

    name: str
    model: str  # the underlying model (its batcher and version)
    inputs: list[Tensor]
    outputs: list[Tensor]
    to_job: Callable[[Model, dict[str, np.ndarray], Any], Job]  # (model, tensors, settings)
    max_seq: int = 0  # for a variable second dimension (token ids)


def names(core) -> dict[str, tuple[str, str]]:
    """Every /v2 name this worker serves -> (model, signature key), from the active versions."""
    out = {}
    for name, model in core.models.items():
        for key in TASKS[model.task].signatures(model):
            out[f"{name}_{key}" if key else name] = (name, key)
    return out


def view(model: Model, name: str, key: str) -> View | None:
    """The view `name` of this model version (None if this version has no such signature)."""
    sig = TASKS[model.task].signatures(model).get(key)
    if sig is None:
        return None

    def wire(t: tasks.Tensor) -> Tensor:
        return Tensor(t.name, DATATYPES[t.dtype], list(t.shape))

    return View(name, model.name, [wire(t) for t in sig.inputs], [wire(t) for t in sig.outputs], sig.job, sig.max_width)


# --------------------------------------------------------------------------- decoding


def parse_request(body: bytes, header_length: str) -> tuple[dict, bytes]:
    """Split a request into its JSON header and the binary data that follows it."""
    if header_length:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(400, "Inference-Header-Content-Length is not a length within the body", "bad_header")
        n = int(header_length)
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    payload = parse_json(head)
    if not isinstance(payload, dict):
        raise ApiError(400, "the inference request must be a JSON object", "bad_json")
    return payload, binary


def _count(data) -> int:
    """Elements of a (possibly nested) JSON list, without building anything."""
    if isinstance(data, list):
        return sum(_count(x) for x in data)
    return 1


def _flatten(data, out: list) -> list:
    if isinstance(data, list):
        for x in data:
            _flatten(x, out)
    else:
        out.append(data)
    return out


def decode_inputs(view: View, payload: dict, binary: bytes, max_rows: int) -> dict[str, np.ndarray]:
    """The request's input tensors, each checked against the view's signature and the row
    limit before its data is read."""
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, "'inputs' must be a non-empty list of tensors", "bad_tensor")
    specs = {t.name: t for t in view.inputs}
    given = {}
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ApiError(400, "every input needs a 'name'", "bad_tensor")
        name = tensor["name"]
        spec = specs.get(name)
        if spec is None:
            raise ApiError(
                400,
                f"unexpected input {shown(name)} for model '{view.name}'; it takes {[t.name for t in view.inputs]}",
                "bad_tensor",
            )
        if name in given:
            raise ApiError(400, f"input '{name}' is given twice", "bad_tensor")
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        if datatype != spec.datatype:
            raise ApiError(
                400,
                f"input '{name}' has datatype {shown(datatype)}; model '{view.name}' expects {spec.datatype}",
                "bad_tensor",
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ApiError(400, f"input '{name}' needs a shape: a list of integers", "bad_tensor")
        check_shape(view, spec, shape, max_rows)
        count = math.prod(shape)
        params = tensor.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ApiError(400, f"input '{name}': binary_data_size does not fit the binary data", "bad_tensor")
            given[name] = _from_binary(spec, shape, count, binary[offset : offset + size])
            offset += size
        else:
            if "data" not in tensor:
                raise ApiError(400, f"input '{name}' has neither 'data' nor binary_data_size", "bad_tensor")
            given[name] = _from_json(spec, shape, count, tensor["data"])
    missing = [t.name for t in view.inputs if t.name not in given]
    if missing:
        raise ApiError(400, f"model '{view.name}' needs inputs {missing}", "bad_tensor")
    rows = {a.shape[0] for a in given.values()}
    if len(rows) != 1:
        raise ApiError(400, "the inputs disagree on the batch size (their first dimension)", "bad_tensor")
    if offset != len(binary):
        raise ApiError(400, f"{len(binary) - offset} bytes of binary data belong to no input", "bad_tensor")
    return given


def check_shape(view: View, spec: Tensor, shape: list[int], max_rows: int) -> None:
    name = spec.name
    if len(shape) != len(spec.shape):
        raise ApiError(
            400, f"input '{name}' has shape {shown(shape, 60)}; model '{view.name}' expects {spec.shape}", "bad_tensor"
        )
    for want, got in zip(spec.shape, shape):
        if got < 0 or (want != -1 and got != want):
            raise ApiError(
                400,
                f"input '{name}' has shape {shown(shape, 60)}; model '{view.name}' expects {spec.shape}",
                "bad_tensor",
            )
    if not 1 <= shape[0] <= max_rows:
        raise ApiError(
            400,
            f"input '{name}' has {shape[0]} rows; model '{view.name}' takes 1 to {max_rows} per request",
            "too_many_rows",
        )
    if len(shape) > 1 and spec.shape[1] == -1:
        limit = view.max_seq or 0
        if not 1 <= shape[1] <= limit:
            raise ApiError(400, f"input '{name}' has {shape[1]} columns; 1 to {limit} are allowed", "bad_tensor")


def _from_binary(spec: Tensor, shape: list[int], count: int, raw: bytes) -> np.ndarray:
    if spec.datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise ApiError(400, f"input '{spec.name}': a BYTES length prefix is cut off", "bad_tensor")
            (n,) = struct.unpack_from("<I", raw, pos)
            if n > MAX_TEXT_BYTES or pos + 4 + n > len(raw):
                raise ApiError(400, f"input '{spec.name}': a BYTES element runs past the data", "bad_tensor")
            items.append(raw[pos + 4 : pos + 4 + n])
            pos += 4 + n
        if len(items) != count:
            raise ApiError(
                400, f"input '{spec.name}' has {len(items)} elements; its shape {shape} needs {count}", "bad_tensor"
            )
        return np.array(items, dtype=object).reshape(shape)
    dtype = NUMPY[spec.datatype]
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise ApiError(
            400,
            f"input '{spec.name}' has {len(raw)} bytes; its shape {shape} needs {count * np.dtype(dtype).itemsize}",
            "bad_tensor",
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _from_json(spec: Tensor, shape: list[int], count: int, data) -> np.ndarray:
    got = _count(data)
    if got != count:
        raise ApiError(400, f"input '{spec.name}' has {got} elements; its shape {shape} needs {count}", "bad_tensor")
    flat = _flatten(data, [])
    if spec.datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise ApiError(400, f"input '{spec.name}' (BYTES) must hold strings", "bad_tensor")
        return np.array([x.encode() for x in flat], dtype=object).reshape(shape)
    kind = int if spec.datatype in ("INT64", "UINT8") else (int, float)
    if not all(isinstance(x, kind) and not isinstance(x, bool) for x in flat):
        raise ApiError(400, f"input '{spec.name}' ({spec.datatype}) must hold numbers of that type", "bad_tensor")
    try:
        arr = np.array(flat, dtype=NUMPY[spec.datatype])
    except (OverflowError, ValueError):
        raise ApiError(
            400, f"input '{spec.name}' holds values out of range for {spec.datatype}", "bad_tensor"
        ) from None
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ApiError(400, f"input '{spec.name}' holds NaN or infinite values", "bad_tensor")
    return arr.reshape(shape)


# --------------------------------------------------------------------------- encoding


def encode_outputs(view: View, payload: dict, outputs: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """The response: JSON tensors, or binary data after the JSON header where asked for."""
    params = payload.get("parameters") if isinstance(payload.get("parameters"), dict) else {}
    all_binary = bool(params.get("binary_data_output", False))
    wanted = payload.get("outputs")
    known = {t.name: t for t in view.outputs}
    if wanted is None:
        selection = [(t.name, all_binary) for t in view.outputs]
    else:
        if not isinstance(wanted, list):
            raise ApiError(400, "'outputs' must be a list", "bad_tensor")
        selection = []
        for o in wanted:
            name = o.get("name") if isinstance(o, dict) else None
            if name not in known:
                raise ApiError(
                    400, f"unknown output {shown(name)} for model '{view.name}'; it has {list(known)}", "bad_tensor"
                )
            p = o.get("parameters") if isinstance(o.get("parameters"), dict) else {}
            selection.append((name, bool(p.get("binary_data", all_binary))))
    tensors, blobs = [], []
    for name, binary in selection:
        arr, spec = outputs[name], known[name]
        entry = {"name": name, "datatype": spec.datatype, "shape": list(arr.shape)}
        if binary:
            raw = _to_binary(arr, spec.datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = [x.decode() for x in arr.ravel()] if spec.datatype == "BYTES" else arr.ravel().tolist()
        tensors.append(entry)
    head = {"model_name": view.name, "outputs": tensors}
    return head, b"".join(blobs)


def _to_binary(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(x)) + x for x in arr.ravel())
    return np.ascontiguousarray(arr, dtype=NUMPY[datatype]).tobytes()


# --------------------------------------------------------------------------- routes


def install(app) -> None:
    tables: dict[tuple, dict[str, tuple[str, str]]] = {}
    views: dict[tuple[str, str, str], View | None] = {}  # (model, version, name) -> its view

    def lookup(name: str) -> tuple[str, str]:
        """The model and signature key behind a /v2 name (404 before any body is read)."""
        core = app.core
        if core is None:
            raise ApiError(503, "deepserve is starting: models are not loaded yet", "not_ready")
        key = tuple((n, m.version) for n, m in core.models.items())  # changes when a version is swapped in
        if key not in tables:
            tables.clear()
            tables[key] = names(core)
        table = tables[key]
        if name not in table:
            raise ApiError(404, f"unknown model {shown(name)}; served: {sorted(table)}", "not_served")
        return table[name]

    def view_of(model: Model, name: str, key: str) -> View:
        """The view of the resolved version: its own signature, pinned or active."""
        cached = (model.name, model.version, name)
        if cached not in views:
            if len(views) > 256:  # versions come and go: keep what is in use
                views.clear()
            views[cached] = view(model, name, key)
        found = views[cached]
        if found is None:
            raise ApiError(404, f"version {model.version} of {model.name!r} has no view {shown(name)}", "not_served")
        return found

    def find(name: str, version: str | None) -> tuple[View, Model]:
        model_name, key = lookup(name)
        model, _ = app.core.resolve(model_name, version)
        return view_of(model, name, key), model

    async def server_metadata(req) -> Response:
        return json_response({"name": "deepserve", "version": __version__, "extensions": EXTENSIONS})

    async def live(req) -> Response:
        return json_response({"live": True})

    async def ready(req) -> Response:
        ok = app.core is not None and app.core.ready and not (app.drain is not None and app.drain.draining)
        return json_response({"ready": ok}, 200 if ok else 503)

    async def model_metadata(req, name: str, version: str | None = None) -> Response:
        app.check_api_key(req)
        view, model = find(name, version)
        return json_response(
            {
                "name": view.name,
                "versions": app.core.loaded_versions(view.model),
                "platform": "onnxruntime_onnx",
                "inputs": [t.__dict__ for t in view.inputs],
                "outputs": [t.__dict__ for t in view.outputs],
            }
        )

    async def model_ready(req, name: str, version: str | None = None) -> Response:
        app.check_api_key(req)
        view, model = find(name, version)
        ok = app.core.ready and not (app.drain is not None and app.drain.draining)
        return json_response({"name": view.name, "ready": ok}, 200 if ok else 503)

    async def model_config(req, name: str, version: str | None = None) -> Response:
        app.check_api_key(req)
        view, model = find(name, version)
        s = app.settings
        rows = TASKS[model.task].max_rows(s)

        def dims(t: Tensor) -> dict:
            return {"name": t.name, "data_type": TRITON_TYPES[t.datatype], "dims": t.shape[1:] or [1]}

        return json_response(
            {
                "name": view.name,
                "platform": "onnxruntime_onnx",
                "backend": "onnxruntime",
                "max_batch_size": rows,
                "input": [dims(t) for t in view.inputs],
                "output": [dims(t) for t in view.outputs],
                "version_policy": {"specific": {"versions": app.core.loaded_versions(view.model)}},
                "dynamic_batching": {"max_queue_delay_microseconds": 0, "preferred_batch_size": [s.max_batch_size]},
                "parameters": {"task": {"string_value": model.task}, "family": {"string_value": model.family}},
            }
        )

    async def infer(req, name: str, version: str | None = None) -> Response:
        model_name, key = lookup(name)
        s = app.settings
        body = await req.body(s.max_body_bytes)
        if len(body) > 65536:
            payload, binary = await app.offload(parse_request, body, req.header("inference-header-content-length"))
        else:
            payload, binary = parse_request(body, req.header("inference-header-content-length"))

        async def decode(model: Model, ctx=req) -> Job:
            started = time.perf_counter()
            v = view_of(model, name, key)
            job = v.to_job(model, decode_inputs(v, payload, binary, TASKS[model.task].max_rows(s)), s)
            ctx.stage("decode", started)
            return job

        def encode(model: Model, job: Job, outputs: dict[str, np.ndarray]) -> Response:
            head, blob = encode_outputs(view_of(model, name, key), payload, outputs)
            if "id" in payload:
                head["id"] = payload["id"]
            head["model_version"] = model.version
            text = orjson.dumps(head)
            if blob:
                headers = [(b"inference-header-content-length", str(len(text)).encode())]
                return Response(200, text + blob, "application/octet-stream", headers)
            return Response(200, text, "application/json")

        # tensors are shaped for one signature: a candidate with another gets no canary or shadow share
        return await dataplane.infer(app, req, model_name, version, decode, encode, tensors=True)

    app.add("/v2", server_metadata)
    app.add("/v2/health/live", live)
    app.add("/v2/health/ready", ready)

    handlers = {"": model_metadata, "/ready": model_ready, "/config": model_config, "/infer": infer}
    routes = {}
    for suffix, handler in handlers.items():
        infer_route = suffix == "/infer"
        methods = ("POST",) if infer_route else ("GET",)
        for versioned in (False, True):
            template = "/v2/models/{name}" + ("/versions/{version}" if versioned else "") + suffix
            routes[(versioned, suffix)] = Route(template, methods, handler, model_work=infer_route)

    def match(path: str):
        parts = path.split("/")[3:]  # after '', 'v2', 'models'
        if not parts or not parts[0]:
            return None
        name, rest = parts[0], parts[1:]
        params = {"name": name}
        versioned = len(rest) >= 2 and rest[0] == "versions" and rest[1] != ""
        if versioned:
            params["version"], rest = rest[1], rest[2:]
        if len(rest) > 1:
            return None
        suffix = "/" + rest[0] if rest else ""
        route = routes.get((versioned, suffix))
        return (route, params) if route is not None else None

    app.add_prefix("/v2/models/", match)


def openapi_paths(settings, core) -> dict:
    """The /v2 routes in the OpenAPI document (the protocol's own schema is KServe's)."""
    err = {
        "description": "Triton-style error",
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
            }
        },
    }
    obj = {"application/json": {"schema": {"type": "object"}}}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    tensor_request = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "shape", "datatype"],
                    "properties": {
                        "name": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "datatype": {"type": "string"},
                        "parameters": {"type": "object"},
                        "data": {"type": "array"},
                    },
                },
            },
            "outputs": {"type": "array", "items": {"type": "object"}},
        },
    }
    paths = {
        "/v2": {
            "get": {
                "summary": "Open Inference Protocol: server metadata",
                "responses": {"200": {"description": "metadata", "content": obj}},
            }
        },
        "/v2/health/live": {
            "get": {"summary": "liveness", "responses": {"200": {"description": "live", "content": obj}}}
        },
        "/v2/health/ready": {
            "get": {
                "summary": "readiness (503 while starting or draining)",
                "responses": {
                    "200": {"description": "ready", "content": obj},
                    "503": {"description": "not ready", "content": obj},
                },
            }
        },
    }
    for versioned in (False, True):
        base = "/v2/models/{name}" + ("/versions/{version}" if versioned else "")
        params = [name, version] if versioned else [name]
        codes = {"401": err, "404": err, "503": err}
        paths[base] = {
            "get": {
                "summary": "model metadata: its tensors",
                "parameters": params,
                "responses": {"200": {"description": "metadata", "content": obj}, **codes},
            }
        }
        paths[base + "/ready"] = {
            "get": {
                "summary": "model readiness",
                "parameters": params,
                "responses": {"200": {"description": "ready", "content": obj}, **codes},
            }
        }
        paths[base + "/config"] = {
            "get": {
                "summary": "Triton-style model configuration",
                "parameters": params,
                "responses": {"200": {"description": "config", "content": obj}, **codes},
            }
        }
        paths[base + "/infer"] = {
            "post": {
                "summary": "inference with JSON tensors or the binary tensor data extension",
                "parameters": params,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": tensor_request},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    "200": {
                        "description": "output tensors",
                        "content": {
                            **obj,
                            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "400": err,
                    **codes,
                    "408": err,
                    "413": err,
                    "504": err,
                },
            }
        }
    return paths
