"""The codec's decoder: a code from /compress -> a 28×28 image."""

from __future__ import annotations

import numpy as np

from service import preprocessing as pp
from service.runtime import Model
from service.tasks.base import Answer, Body, Context, Job, Task, expect
from service.tasks.fields import Code, Fields


class Decompression(Task):
    name = "image-compression-decoder"
    route, body = "/decompress", "json"
    request = Fields(
        (
            Code(
                "code",
                "base64 of the code from /compress",
                size=lambda model: model.meta.codec.bytes,
                hint="as returned by /compress",
            ),
        ),
        required=("code",),
    )
    summary = "Decode a code from /compress to a 28×28 PNG"
    client_method, response = "decompress", "png"

    def max_rows(self, s) -> int:
        return s.max_images

    def check(self, model: Model) -> None:
        expect(model, "inputs", {"latent": "float32"})
        expect(model, "outputs", {"image": "float32"})
        if model.meta.inputs[0].shape[-1] != model.meta.codec.latent_dim:
            raise ValueError("latent input width differs from codec.latent_dim")

    def job(self, model: Model, codes: list[bytes]) -> Job:
        """Packed codes (each exactly codec.bytes long) -> images (N, 28, 28) in [0, 1]."""
        c = model.meta.codec
        latent = pp.dequantize(pp.unpack_codes(codes, c.latent_dim, c.bits), c.bits)
        return Job({"latent": latent}, len(codes), lambda out: out["image"][:, 0])

    def warmup(self, model: Model) -> Job:
        return self.job(model, [bytes(model.meta.codec.bytes)])

    async def parse(self, body: Body, model: Model, ctx: Context) -> Job:
        (raw,) = self.request.read(body.fields, ctx.settings, model, "code")
        return self.job(model, [raw])

    def answer(self, model: Model, job: Job, images: np.ndarray) -> Answer:
        return Answer(pp.png_bytes(images[0]), "image/png", {"X-Model-Version": model.version})

    def describe(self, model: Model) -> dict:
        return {"codec": model.meta.codec.model_dump(), "pair": model.meta.pair}
