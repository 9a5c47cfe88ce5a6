"""deepserve's HTTP contract: a Starlette app mounted inside the BentoML service.

Every request is read under a body limit, validated into arrays, then handed to the core's
batchers. Every error is JSON `{"error": "...", "status": N}` with a 4xx status (503/504
for overload/timeout); an unexpected exception is logged with its traceback and answered
with a generic 500 body that never contains the traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import io
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from service import metrics
from service import preprocessing as pp
from service.batching import Overloaded
from service.core import Core

log = logging.getLogger("deepserve")

IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
# leading bytes of each supported format: a file that starts like one but cannot be opened
# is a damaged image (400), anything else is not an image at all (415)
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
IMAGE_MODELS = ("digits", "fashion")
MAX_SEED = 2**63 - 1
INLINE_DECODE_BYTES = 256 * 1024  # larger uploads are decoded off the event loop


class ApiError(Exception):
    """A client error: HTTP status, a message the client can act on, a metrics reason."""

    def __init__(self, status: int, message: str, reason: str, **extra):
        super().__init__(message)
        self.status, self.message, self.reason, self.extra = status, message, reason, extra


def error_response(status: int, message: str, **extra) -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status, headers=headers)


def core_of(request: Request) -> Core:
    return request.app.state.core


# --------------------------------------------------------------------------- plumbing


def endpoint(name: str, methods=("POST",)):
    """Wrap a handler: auth, readiness, the request timeout, and the error contract."""

    def wrap(handler: Callable[[Request, Core], Awaitable[Response]]) -> Route:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            core: Core | None = getattr(request.app.state, "core", None)
            drain = getattr(request.app.state, "drain", None)
            if drain is not None:
                drain.in_flight += 1
            try:
                if core is None or not core.ready:
                    raise ApiError(503, "deepserve is starting: models are not loaded yet", "not_ready")
                if drain is not None and drain.in_flight > core.settings.max_concurrency:
                    # shed at once: queueing past this only makes every waiting client later
                    raise ApiError(503, f"deepserve is at capacity ({core.settings.max_concurrency} requests "
                                        "in flight); retry shortly", "at_capacity")  # fmt: skip
                check_api_key(request, core)
                async with asyncio.timeout(core.settings.request_timeout_s):
                    return await handler(request, core)
            except ApiError as exc:
                metrics.reject(name, exc.reason)
                return error_response(exc.status, exc.message, **exc.extra)
            except Overloaded as exc:
                metrics.reject(name, "overloaded")
                return error_response(503, f"{exc}; retry shortly")
            except TimeoutError:
                metrics.reject(name, "timeout")
                limit = core.settings.request_timeout_s if core else 0
                return error_response(504, f"the request did not finish within {limit:g} s")
            except Exception:
                log.exception("unexpected error in %s", name)
                metrics.reject(name, "internal")
                return error_response(500, "internal error; the server log has the details")
            finally:
                if drain is not None:
                    drain.in_flight -= 1

        return Route(f"/{name}", run, methods=list(methods))

    return wrap


def check_api_key(request: Request, core: Core) -> None:
    key = core.settings.api_key
    if not key:
        return
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "unauthorized")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length is not a number", "bad_header")
        if int(declared) > limit:
            raise ApiError(413, f"request body is {int(declared)} bytes; the limit is {limit}", "too_large", limit=limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the {limit}-byte limit", "too_large", limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(request: Request, core: Core, allowed: set[str]) -> dict:
    if media_type(request) != "application/json":
        raise ApiError(415, "send a JSON body with Content-Type: application/json", "wrong_content_type")
    body = await read_body(request, core.settings.max_body_bytes)
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}", "bad_json") from None
    except (ValueError, RecursionError):  # a 5000-digit number, nesting 100,000 deep
        raise ApiError(400, "body is not valid JSON: a number is too long or it nests too deeply", "bad_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "body must be a JSON object", "bad_json")
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}", "unknown_field")
    return payload


async def read_form(request: Request, core: Core, allowed_fields: set[str]) -> tuple[list[UploadFile], dict[str, str]]:
    """multipart/form-data -> (the `image` parts, the other text fields)."""
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, "send the image as multipart/form-data with a file field 'image'", "wrong_content_type")
    body = await read_body(request, core.settings.max_body_bytes)

    async def replay():
        yield body
        yield b""

    parser = MultiPartParser(Headers(scope=request.scope), replay(), max_files=core.settings.max_images,
                             max_fields=16, max_part_size=64 * 1024)  # fmt: skip
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart body: {exc.message}", "bad_multipart") from None
    images, fields = [], {}
    for key, value in form.multi_items():
        if key == "image":
            if not isinstance(value, UploadFile):
                raise ApiError(400, "field 'image' must be a file part (with a filename)", "bad_field")
            images.append(value)
        elif key in allowed_fields:
            if isinstance(value, UploadFile):
                raise ApiError(400, f"field {key!r} must be a plain form field, not a file", "bad_field")
            if key in fields:
                raise ApiError(400, f"field {key!r} is given twice", "bad_field")
            fields[key] = value
        else:
            raise ApiError(400, f"unknown field {key!r}; allowed: {sorted({'image', *allowed_fields})}", "unknown_field")
    if not images:
        raise ApiError(400, "no file field 'image' in the form", "missing_image")
    return images, fields


async def decode_uploads(uploads: list[UploadFile], core: Core, invert: str) -> np.ndarray:
    """Uploaded files -> (N, 28, 28) float32 in [0, 1], each checked before its pixels are read."""
    datas = [await up.read() for up in uploads]
    labels = ["image" if len(datas) == 1 else f"image #{i + 1}" for i in range(len(datas))]
    limit = core.settings.max_image_pixels
    if sum(len(d) for d in datas) <= INLINE_DECODE_BYTES:
        arrays = [decode_image(d, lab, limit, invert) for d, lab in zip(datas, labels)]
    else:
        loop = asyncio.get_running_loop()
        arrays = await asyncio.gather(*(loop.run_in_executor(None, decode_image, d, lab, limit, invert)
                                        for d, lab in zip(datas, labels)))  # fmt: skip
    return np.stack(arrays)


async def one_image(request: Request, core: Core, model) -> np.ndarray:
    """A form with exactly one `image` and no other field -> (1, 28, 28) for `model`."""
    uploads, _ = await read_form(request, core, set())
    if len(uploads) != 1:
        raise ApiError(400, f"send exactly one image, got {len(uploads)}", "bad_field")
    return await decode_uploads(uploads, core, model.meta["preprocessing"]["invert"])


def decode_image(data: bytes, label: str, max_pixels: int, invert: str) -> np.ndarray:
    """One upload -> (28, 28) float32; 4xx ApiError for anything that is not a sane image."""
    if not data:
        raise ApiError(400, f"{label} is an empty file", "empty_image")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        if data.startswith(IMAGE_MAGIC):
            raise ApiError(400, f"{label} is truncated or corrupt: its header cannot be read", "corrupt_image") from None
        raise ApiError(415, f"{label} is not a supported image ({', '.join(IMAGE_FORMATS)})", "not_an_image") from None
    except Exception as exc:  # Pillow raises many types for hostile headers
        raise ApiError(400, f"{label} could not be read: {type(exc).__name__}", "corrupt_image") from None
    width, height = img.size  # from the header: a decompression bomb stops here, undecoded
    if width * height > max_pixels:
        raise ApiError(413, f"{label} is {width}×{height} = {width * height} pixels; the limit is {max_pixels}",
                       "too_many_pixels", limit=max_pixels)  # fmt: skip
    if width == 0 or height == 0:
        raise ApiError(400, f"{label} has no pixels", "corrupt_image")
    try:
        return pp.to_grey_square(img, invert)
    except Exception as exc:
        raise ApiError(400, f"{label} is truncated or corrupt ({img.format}: {type(exc).__name__})", "corrupt_image") from None


def int_field(value, name: str, lo: int, hi: int, default: int | None = None) -> int:
    """A JSON or form value that must be an integer in [lo, hi] (booleans are not integers)."""
    if value is None:
        if default is None:
            raise ApiError(400, f"{name} is required", "missing_field")
        return default
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ApiError(400, f"{name} must be an integer, got {value[:40]!r}", "bad_field") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {type(value).__name__}", "bad_field")
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value}", "out_of_range")
    return value


# --------------------------------------------------------------------------- results


def classification(model, probs: np.ndarray, top_k: int) -> dict:
    labels = model.meta["labels"]
    order = np.argsort(-probs, kind="stable")[: min(top_k, len(labels))]
    best = int(order[0])
    metrics.get().confidence.labels(model.name).observe(float(probs[best]))
    return {"model": model.name, "model_version": model.version, "label": labels[best], "index": best,
            "confidence": round(float(probs[best]), 6),
            "top_k": [{"label": labels[i], "index": int(i), "probability": round(float(probs[i]), 6)} for i in order]}  # fmt: skip


def results_body(results: list[dict], many: bool) -> dict:
    return {"results": results} if many else results[0]


def png_response(image: np.ndarray, **headers: str) -> Response:
    return Response(pp.png_bytes(image), media_type="image/png", headers=headers)


# --------------------------------------------------------------------------- endpoints


@endpoint("classify")
async def classify(request: Request, core: Core) -> Response:
    kind = media_type(request)
    if kind == "application/json":
        return await classify_text(request, core)
    if kind != "multipart/form-data":
        raise ApiError(415, "send an image as multipart/form-data (field 'image') or text as JSON "
                            '{"text": "..."}', "wrong_content_type")  # fmt: skip
    uploads, fields = await read_form(request, core, {"model", "top_k"})
    name = fields.get("model", "digits")
    if name not in IMAGE_MODELS:
        hint = " (text goes as JSON)" if name == "sentiment" else ""
        raise ApiError(400, f"model {name[:40]!r} does not classify images; choose one of {list(IMAGE_MODELS)}{hint}", "unknown_model")
    top_k = int_field(fields.get("top_k"), "top_k", 1, 10, default=3)
    model = core.models[name]
    images = await decode_uploads(uploads, core, model.meta["preprocessing"]["invert"])
    probs = await core.run(name, (images,))
    return JSONResponse(results_body([classification(model, p, top_k) for p in probs], len(uploads) > 1))


async def classify_text(request: Request, core: Core) -> Response:
    payload = await read_json(request, core, {"text", "texts", "top_k", "model"})
    if payload.get("model", "sentiment") != "sentiment":
        raise ApiError(400, "text is classified by the 'sentiment' model only; send images as multipart", "unknown_model")
    if ("text" in payload) == ("texts" in payload):
        raise ApiError(400, "send exactly one of 'text' (a string) or 'texts' (a list of strings)", "missing_field")
    many = "texts" in payload
    texts = payload["texts"] if many else [payload["text"]]
    s = core.settings
    if many and (not isinstance(texts, list) or not 1 <= len(texts) <= s.max_texts):
        raise ApiError(400, f"texts must be a list of 1 to {s.max_texts} strings", "bad_field")
    model = core.models["sentiment"]
    sequences = []
    for i, text in enumerate(texts):
        label = f"texts[{i}]" if many else "text"
        if not isinstance(text, str):
            raise ApiError(400, f"{label} must be a string, got {type(text).__name__}", "bad_field")
        if len(text) > s.max_text_chars:
            raise ApiError(413, f"{label} is {len(text)} characters; the limit is {s.max_text_chars}", "text_too_long",
                           limit=s.max_text_chars)  # fmt: skip
        if not text.strip():
            raise ApiError(400, f"{label} is empty or only whitespace", "empty_text")
        sequences.append(pp.encode(pp.tokenize(text), model.vocab_index, model.meta["preprocessing"]["max_tokens"]) or [pp.UNK])
    top_k = int_field(payload.get("top_k"), "top_k", 1, 10, default=2)
    probs = await core.run("sentiment", sequences)
    return JSONResponse(results_body([classification(model, p, top_k) for p in probs], many))


@endpoint("generate")
async def generate(request: Request, core: Core) -> Response:
    payload = await read_json(request, core, {"n", "digit", "seed", "format"})
    n = int_field(payload.get("n"), "n", 1, core.settings.max_generate, default=16)
    digit = payload.get("digit")
    if digit is not None:
        digit = int_field(digit, "digit", 0, 9)
    seed = payload.get("seed")
    seed = secrets.randbelow(2**31) if seed is None else int_field(seed, "seed", 0, MAX_SEED)
    fmt = payload.get("format", "png")
    if fmt not in ("png", "json"):
        raise ApiError(400, f"format must be 'png' or 'json', got {str(fmt)[:20]!r}", "bad_field")
    model = core.models["generator"]
    z, digits = pp.sample_latents(n, model.meta["preprocessing"]["z_dim"], seed, digit)
    images = await core.run("generator", (z, digits))
    if fmt == "json":
        return JSONResponse({"images": [base64.b64encode(pp.png_bytes(im)).decode() for im in images],
                             "seed": seed, "digits": digits.tolist(), "model_version": model.version})  # fmt: skip
    cols = math.ceil(math.sqrt(n))
    return png_response(pp.grid(images, cols=cols), **{"X-Seed": str(seed), "X-Digits": ",".join(map(str, digits))})


@endpoint("compress")
async def compress(request: Request, core: Core) -> Response:
    encoder = core.models["encoder"]
    (code,) = await core.run("encoder", (await one_image(request, core, encoder),))
    n = code.shape[0]
    return JSONResponse({"code": base64.b64encode(code.tobytes()).decode(), "bytes": n,
                         "original_bytes": pp.IMAGE_SIZE * pp.IMAGE_SIZE,
                         "ratio": round(pp.IMAGE_SIZE * pp.IMAGE_SIZE / n, 2), "model_version": encoder.version})  # fmt: skip


@endpoint("decompress")
async def decompress(request: Request, core: Core) -> Response:
    payload = await read_json(request, core, {"code"})
    code = payload.get("code")
    if not isinstance(code, str):
        raise ApiError(400, "code must be a base64 string (as returned by /compress)", "bad_field")
    n = core.models["decoder"].meta["codec"]["bytes"]
    if len(code) > 4 * n:
        raise ApiError(400, f"code is too long: a code is {n} bytes ({4 * math.ceil(n / 3)} base64 characters)", "bad_code")
    try:
        raw = base64.b64decode(code, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "code is not valid base64", "bad_code") from None
    if len(raw) != n:
        raise ApiError(400, f"code must decode to exactly {n} bytes, got {len(raw)}", "bad_code")
    (image,) = await core.run("decoder", (np.frombuffer(raw, dtype=np.uint8)[None],))
    return png_response(image)


@endpoint("denoise")
async def denoise(request: Request, core: Core) -> Response:
    (image,) = await core.run("denoiser", (await one_image(request, core, core.models["denoiser"]),))
    return png_response(image)


@endpoint("models", methods=("GET",))
async def models(request: Request, core: Core) -> Response:
    listing = []
    for m in core.models.values():
        meta = m.meta
        info = {"name": m.name, "task": meta["task"], "version": m.version, "sha256": meta["sha256"],
                "provider": m.provider, "inputs": meta["inputs"], "outputs": meta["outputs"],
                "preprocessing": meta["preprocessing"], "metrics": meta["metrics"],
                "trained_with": meta["training"]["command"]}  # fmt: skip
        if "labels" in meta:
            info["labels"] = meta["labels"]
        if "vocabulary" in meta:
            info["vocabulary_size"] = len(meta["vocabulary"])
        if "codec" in meta:
            info["codec"] = meta["codec"]
        listing.append(info)
    s = core.settings
    return JSONResponse({"models": listing, "device": s.device, "provider": core.provider,
                         "batching": {"enabled": s.batching, "max_batch_size": s.max_batch_size,
                                      "max_latency_ms": s.max_latency_ms}})  # fmt: skip


async def openapi_document(request: Request) -> Response:
    from service.openapi import document

    return JSONResponse(document())


async def docs_page(request: Request) -> Response:
    """/docs: the Swagger UI BentoML serves at /."""
    return RedirectResponse("/", status_code=307)


class JsonNotFound:
    """ASGI middleware: BentoML answers paths nobody routes with a plain-text 404; give those
    the JSON error contract too. Every other response passes through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        replaced = False

        async def send_json(message):
            nonlocal replaced
            if replaced:
                return  # the plain-text body that went with the 404
            if message["type"] == "http.response.start" and message["status"] == 404 and \
                    (b"content-type", b"text/plain; charset=utf-8") in message.get("headers", []):  # fmt: skip
                replaced = True
                path = scope.get("path", "")[:100]
                body = json.dumps({"error": f"no such path {path!r}; the API is described at /docs.json",
                                   "status": 404}).encode()  # fmt: skip
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_json)


async def http_error(request: Request, exc: HTTPException) -> Response:
    return error_response(exc.status_code, exc.detail if isinstance(exc.detail, str) else "request failed")


def build_app() -> Starlette:
    # Pillow's own bomb check is replaced by decode_image's header check against
    # DEEPSERVE_MAX_IMAGE_PIXELS, which answers 413 before any pixel is decoded.
    Image.MAX_IMAGE_PIXELS = None
    routes = [classify, generate, compress, decompress, denoise, models,
              Route("/docs.json", openapi_document), Route("/openapi.json", openapi_document),
              Route("/docs", docs_page)]  # fmt: skip
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


app = build_app()
