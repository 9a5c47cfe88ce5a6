"""The OpenAPI 3.0 document for deepserve's routes, served at /docs.json and /openapi.json."""

from __future__ import annotations

import functools

ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*codes: int) -> dict:
    text = {400: "invalid input (the message names the field and the problem)",
            401: "API key missing or wrong (only when DEEPSERVE_API_KEY is set)",
            413: "body, image pixels or text over a configured limit",
            415: "wrong Content-Type, or an upload that is not a supported image",
            503: "overloaded or still starting; retry after the Retry-After header",
            504: "the request did not finish within DEEPSERVE_REQUEST_TIMEOUT_S"}  # fmt: skip
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": ERROR}}}
            for c in (*codes, 401, 503, 504)}  # fmt: skip


def _png(desc: str) -> dict:
    return {"description": desc, "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}


def _image_form(extra: dict | None = None, many: bool = False) -> dict:
    image = {"type": "string", "format": "binary",
             "description": "PNG, JPEG, GIF, BMP, WebP or TIFF; grey or colour; any size up to the pixel limit"}  # fmt: skip
    props = {"image": {"type": "array", "items": image, "minItems": 1, "maxItems": 64} if many else image}
    props.update(extra or {})
    return {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["image"], "properties": props, "additionalProperties": False},
        "encoding": {"image": {"contentType": "image/png, image/jpeg, image/gif, image/bmp, image/webp, image/tiff"}}}}}  # fmt: skip


@functools.cache
def document() -> dict:
    top_k = {"type": "integer", "minimum": 1, "maximum": 10}
    text_body = {"type": "object", "additionalProperties": False, "properties": {
        "text": {"type": "string", "minLength": 1, "maxLength": 20000, "pattern": r"\S"},
        "texts": {"type": "array", "minItems": 1, "maxItems": 64,
                  "items": {"type": "string", "minLength": 1, "maxLength": 20000, "pattern": r"\S"}},
        "top_k": top_k, "model": {"type": "string", "enum": ["sentiment"]}},
        "oneOf": [{"required": ["text"]}, {"required": ["texts"]}]}  # fmt: skip
    classify_ok = {"description": "one result, or {results: [...]} for several images or `texts`",
                   "content": {"application/json": {"schema": {"oneOf": [
                       {"$ref": "#/components/schemas/Classification"},
                       {"type": "object", "required": ["results"], "properties": {
                           "results": {"type": "array", "items": {"$ref": "#/components/schemas/Classification"}}}}]}}}}  # fmt: skip
    paths = {
        "/classify": {"post": {
            "summary": "Classify images (digits, fashion) or text (sentiment)",
            "description": "Images as multipart/form-data (repeat `image` for several); text as JSON. "
                           "Dark-on-light images are inverted automatically; every image is fitted to 28×28.",
            "requestBody": {"required": True, "content": {
                **_image_form({"model": {"type": "string", "enum": ["digits", "fashion"], "default": "digits"},
                               "top_k": {**top_k, "default": 3}}, many=True)["content"],
                "application/json": {"schema": text_body}}},
            "responses": {"200": classify_ok, **_errors(400, 413, 415)}}},
        "/generate": {"post": {
            "summary": "Draw digits with the conditional GAN",
            "description": "The same n, digit and seed always give byte-identical images.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "properties": {
                    "n": {"type": "integer", "minimum": 1, "maximum": 64, "default": 16},
                    "digit": {"type": "integer", "minimum": 0, "maximum": 9, "nullable": True},
                    "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                    "format": {"type": "string", "enum": ["png", "json"], "default": "png"}}}}}},
            "responses": {"200": {"description": "a PNG grid (format=png; seed in X-Seed) or JSON", "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"$ref": "#/components/schemas/Generated"}}}},
                **_errors(400, 413, 415)}}},
        "/compress": {"post": {
            "summary": "Compress one image to a 16-byte code",
            "requestBody": _image_form(),
            "responses": {"200": {"description": "the code", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Code"}}}}, **_errors(400, 413, 415)}}},
        "/decompress": {"post": {
            "summary": "Decode a code from /compress to a 28×28 PNG",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["code"], "additionalProperties": False,
                "properties": {"code": {"type": "string", "format": "byte", "description": "base64 of 16 bytes"}}}}}},
            "responses": {"200": _png("the 28×28 reconstruction"), **_errors(400, 413, 415)}}},
        "/denoise": {"post": {
            "summary": "Remove noise from a digit image; returns 28×28 (inputs of other sizes are fitted to 28×28 first)",
            "requestBody": _image_form(),
            "responses": {"200": _png("the 28×28 cleaned image"), **_errors(400, 413, 415)}}},
        "/models": {"get": {
            "summary": "Every served model: version, sha256, signature, metrics, execution provider",
            "responses": {"200": {"description": "the registry", "content": {"application/json": {
                "schema": {"type": "object", "required": ["models", "provider"]}}}}, **_errors()}}},
    }  # fmt: skip
    for probe in ("/livez", "/healthz", "/readyz"):
        paths[probe] = {"get": {"summary": f"BentoML {probe[1:]} probe", "responses": {
            "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}},
            "503": {"description": "not ready/alive", "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
    components = {"schemas": {
        "Error": {"type": "object", "required": ["error", "status"], "properties": {
            "error": {"type": "string"}, "status": {"type": "integer"}, "limit": {"type": "number"}}},
        "Classification": {"type": "object", "required": ["model", "model_version", "label", "index", "confidence", "top_k"],
            "properties": {"model": {"type": "string"}, "model_version": {"type": "string"}, "label": {"type": "string"},
                "index": {"type": "integer"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "top_k": {"type": "array", "items": {"type": "object", "required": ["label", "index", "probability"],
                    "properties": {"label": {"type": "string"}, "index": {"type": "integer"},
                                   "probability": {"type": "number", "minimum": 0, "maximum": 1}}}}}},
        "Generated": {"type": "object", "required": ["images", "seed", "digits"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
            "seed": {"type": "integer"}, "digits": {"type": "array", "items": {"type": "integer"}},
            "model_version": {"type": "string"}}},
        "Code": {"type": "object", "required": ["code", "bytes", "original_bytes", "ratio", "model_version"], "properties": {
            "code": {"type": "string", "format": "byte"}, "bytes": {"type": "integer"},
            "original_bytes": {"type": "integer"}, "ratio": {"type": "number"}, "model_version": {"type": "string"}}},
    }}  # fmt: skip
    return {"openapi": "3.0.3", "info": {"title": "deepserve", "version": "0.1.0",
            "description": "Digits, fashion and sentiment classifiers, a digit generator, an image "
                           "codec and a denoiser, on ONNX Runtime behind BentoML."},
            "paths": paths, "components": components}  # fmt: skip
