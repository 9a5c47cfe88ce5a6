"""The denoiser: one noisy digit image -> the cleaned 28×28 image."""

from __future__ import annotations

import numpy as np

from service import preprocessing as pp
from service.runtime import Model
from service.tasks.base import Answer, Body, Context, Job, OneImage, expect, input_png


class Denoising(OneImage):
    name = "image-denoising"
    route = "/denoise"
    summary = "Remove noise from a digit image; returns 28×28"
    client_method, response = "denoise", "png"

    def check(self, model: Model) -> None:
        expect(model, "inputs", {"image": "float32"})
        expect(model, "outputs", {"image_out": "float32"})

    def job(self, images: np.ndarray) -> Job:
        """(N, 1, 28, 28) noisy in [0, 1] -> (N, 28, 28) cleaned."""
        return Job({"image": images}, len(images), lambda out: out["image_out"][:, 0])

    def warmup(self, model: Model) -> Job:
        return self.job(np.zeros((1, 1, pp.IMAGE_SIZE, pp.IMAGE_SIZE), np.float32))

    async def parse(self, body: Body, model: Model, ctx: Context) -> Job:
        images, info = await self.one_image(body, model, ctx)
        job = self.job(images)
        job.info.update(info)
        return job

    def answer(self, model: Model, job: Job, images: np.ndarray) -> Answer:
        headers = {"X-Model-Version": model.version}
        if "inputs" in job.info:  # the answer is the PNG itself: what the model saw rides in a header
            headers["X-Model-Input"] = input_png(job.info["inputs"][0])
        return Answer(pp.png_bytes(images[0]), "image/png", headers)
