"""The codec's encoder: one image -> a packed code of codec.bytes bytes."""

from __future__ import annotations

import base64

import numpy as np

from service import preprocessing as pp
from service.runtime import Model
from service.tasks.base import Answer, Body, Context, Job, OneImage, expect, input_png


class Compression(OneImage):
    name = "image-compression-encoder"
    route = "/compress"
    summary = "Compress one image to a 16-byte code"
    client_method, response_schema = "compress", "Code"

    def check(self, model: Model) -> None:
        expect(model, "inputs", {"image": "float32"})
        expect(model, "outputs", {"latent": "float32"})
        if model.meta.outputs[0].shape[-1] != model.meta.codec.latent_dim:
            raise ValueError("latent output width differs from codec.latent_dim")

    def job(self, model: Model, images: np.ndarray) -> Job:
        """(N, 1, 28, 28) in [0, 1] -> one packed code per image."""
        bits = model.meta.codec.bits
        return Job({"image": images}, len(images), lambda out: pp.pack_codes(pp.quantize(out["latent"], bits), bits))

    def warmup(self, model: Model) -> Job:
        return self.job(model, np.zeros((1, 1, pp.IMAGE_SIZE, pp.IMAGE_SIZE), np.float32))

    async def parse(self, body: Body, model: Model, ctx: Context) -> Job:
        images, info = await self.one_image(body, model, ctx)
        job = self.job(model, images)
        job.info.update(info)
        return job

    def answer(self, model: Model, job: Job, codes: list[bytes]) -> Answer:
        n, size = len(codes[0]), pp.IMAGE_SIZE * pp.IMAGE_SIZE
        body = {
            "code": base64.b64encode(codes[0]).decode(),
            "bytes": n,
            "original_bytes": size,
            "ratio": round(size / n, 2),
            "model_version": model.version,
        }
        if "inputs" in job.info:
            body["input_png"] = input_png(job.info["inputs"][0])
        return Answer(body)

    def describe(self, model: Model) -> dict:
        return {"codec": model.meta.codec.model_dump(), "pair": model.meta.pair}
