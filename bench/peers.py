"""The peers and ceilings deepserve is measured against, over the same models and the same
preprocessing (service.preprocessing, service.tasks): nothing here is tuned beyond what a user
would write in an afternoon.

    python -m bench.peers fastapi|litserve|noop PORT   (LitServe: bench/litserve_peer.py)
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' real type hints
import math
import sys

import numpy as np

from bench.common import decode, top
from bench.common import models as load_models
from service import preprocessing as pp
from service import tasks


def generate_png(models, n: int, digit, seed: int) -> bytes:
    z, digits = pp.sample_latents(n, models["generator"].meta.preprocessing.z_dim, seed, digit)
    images = tasks.generate(models["generator"], z, digits)
    return pp.png_bytes(pp.grid(images, cols=math.ceil(math.sqrt(n))))


def fastapi_app():
    """One request at a time per call, no batching: the afternoon version."""
    from fastapi import FastAPI, Request, Response, UploadFile

    models = load_models()
    app = FastAPI()

    @app.post("/classify")
    async def classify(request: Request):
        if request.headers.get("content-type", "").startswith("application/json"):
            text = (await request.json())["text"]
            m = models["sentiment"]
            ids = tasks.encode_texts(m, [text])[0] or [pp.UNK]
            return top(m, tasks.classify_token_ids(m, [ids])[0])
        form = await request.form()
        upload: UploadFile = form["image"]
        m = models[form.get("model", "digits")]
        probs = tasks.classify_images(m, decode(await upload.read(), m.meta.preprocessing.invert))
        return top(m, probs[0])

    @app.post("/generate")
    async def generate(body: dict):
        return Response(
            generate_png(models, body.get("n", 16), body.get("digit"), body.get("seed", 0)), media_type="image/png"
        )

    @app.post("/denoise")
    async def denoise(image: UploadFile):
        out = tasks.denoise(models["denoiser"], decode(await image.read(), "none"))
        return Response(pp.png_bytes(out[0]), media_type="image/png")

    return app


def noop_app():
    """Accepts the same uploads and returns a fixed answer: the HTTP ceiling."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    fixed = {"model": "digits", "label": "7", "index": 7, "confidence": 1.0}
    png = pp.png_bytes(np.zeros((28, 28), np.float32))

    async def classify(request: Request):
        if request.headers.get("content-type", "").startswith("multipart/"):
            await (await request.form())["image"].read()
        else:
            await request.body()
        return JSONResponse(fixed)

    async def image(request: Request):
        await request.body()
        return Response(png, media_type="image/png")

    return Starlette(
        routes=[
            Route("/classify", classify, methods=["POST"]),
            Route("/generate", image, methods=["POST"]),
            Route("/denoise", image, methods=["POST"]),
        ]
    )


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "litserve":
        from bench.litserve_peer import serve

        serve(port)
        return
    import uvicorn

    app = fastapi_app() if kind == "fastapi" else noop_app()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
