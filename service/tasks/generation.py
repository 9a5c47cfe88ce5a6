"""Conditional generation (the digit GAN): n digits, or a morph between two (digit, seed)."""

from __future__ import annotations

import base64
import math
import secrets

import numpy as np

from service import preprocessing as pp
from service.errors import ApiError
from service.runtime import Model
from service.tasks.base import Answer, Body, Context, Job, Task, expect
from service.tasks.fields import Choice, Fields, Integer, Point

MAX_SEED = 2**63 - 1


def last_class(s, model) -> int:
    """The highest digit a generator draws (the document, written without a model, shows the
    shipped generator's ten classes)."""
    return (len(model.meta.labels) if model is not None else 10) - 1


class ConditionalGeneration(Task):
    """Digits from a latent z and a class. Versions with a `class_weights` input (FP32, one
    weight per class) can also blend classes; older ones take an integer `digit`."""

    name = "conditional-image-generation"
    route, body = "/generate", "json"
    request = Fields(
        (
            Integer("n", "how many digits to draw", default=16, minimum=1, maximum="max_generate"),
            Integer(
                "digit",
                "the digit to draw; null or absent: a random digit per image",
                minimum=0,
                maximum=last_class,
                nullable=True,
            ),
            Integer("seed", "the same request always gives byte-identical images", minimum=0, maximum=MAX_SEED),
            Choice(
                "format",
                "png: one PNG of the digits in a grid (seed and digits in X- headers); json: each image as "
                "base64 PNG, with the seed and the digits",
                default="png",
                choices=("png", "json"),
            ),
            Point(
                "morph_to",
                "morph from (digit, seed) to this digit and/or seed: `steps` frames (n must be absent; digit is "
                "required). Seeds morph along the latents' great circle (slerp), digits by blending the class weights",
                parts=(Integer("digit", minimum=0, maximum=last_class), Integer("seed", minimum=0, maximum=MAX_SEED)),
                example='{"digit": 8, "seed": 1}',
            ),
            Integer("steps", "frames of a morph, both ends included", default=9, minimum=2, maximum="max_generate"),
        )
    )
    summary = "Draw digits with the conditional GAN, or morph from one (digit, seed) to another"
    client_method, response = "generate", "png"
    response_schema = "Generated"

    def max_rows(self, s) -> int:
        return s.max_generate

    def check(self, model: Model) -> None:
        names = {i.name for i in model.meta.inputs}
        cls = {"class_weights": "float32"} if "class_weights" in names else {"digit": "int64"}
        expect(model, "inputs", {"z": "float32", **cls})
        expect(model, "outputs", {"images": "float32"})

    @staticmethod
    def blends(model: Model) -> bool:
        return any(i.name == "class_weights" for i in model.meta.inputs)

    def warmup(self, model: Model) -> Job:
        z, digits = pp.sample_latents(1, model.meta.preprocessing.z_dim, 0, 0)
        return self.job(model, z, np.eye(len(model.meta.labels), dtype=np.float32)[digits])

    def job(self, model: Model, z: np.ndarray, weights: np.ndarray) -> Job:
        """Latents (N, z_dim) and class weights (N, classes; one-hot for a plain digit)."""
        if self.blends(model):
            feeds = {"z": z, "class_weights": weights.astype(np.float32)}
        else:
            feeds = {"z": z, "digit": weights.argmax(1).astype(np.int64)}
        return Job(feeds, len(z), lambda out: np.clip(out["images"][:, 0], 0.0, 1.0))

    async def parse(self, body: Body, model: Model, ctx: Context) -> Job:
        payload, s = body.fields, ctx.settings
        seed, fmt = self.request.read(payload, s, model, "seed", "format")
        seed = secrets.randbelow(2**31) if seed is None else seed
        if payload.get("morph_to") is not None:
            return self.morph(model, payload, seed, fmt, s)
        if "steps" in payload:
            raise ApiError(400, "steps goes with morph_to", "bad_field")
        n, digit = self.request.read(payload, s, model, "n", "digit")
        classes = len(model.meta.labels)
        z, digits = pp.sample_latents(n, model.meta.preprocessing.z_dim, seed, digit)
        job = self.job(model, z, np.eye(classes, dtype=np.float32)[digits])
        job.info.update(seed=seed, digits=digits.tolist(), format=fmt, cols=math.ceil(math.sqrt(n)))
        return job

    def morph(self, model: Model, payload: dict, seed: int, fmt: str, s) -> Job:
        """`steps` frames from (digit, seed) to morph_to's (digit, seed): latents on the great
        circle between the two (slerp), class weights on the line between the two digits."""
        if "n" in payload:
            raise ApiError(400, "n does not go with morph_to: the frames are `steps`", "bad_field")
        target = self.request["morph_to"].read(payload["morph_to"], s, model)
        if payload.get("digit") is None:
            raise ApiError(400, "a morph starts from a digit: give 'digit' with morph_to", "missing_field")
        d0, steps = self.request.read(payload, s, model, "digit", "steps")
        d1, s1 = target.get("digit", d0), target.get("seed", seed)
        d1, s1 = d0 if d1 is None else d1, seed if s1 is None else s1
        if d0 != d1 and not self.blends(model):
            raise ApiError(
                400,
                f"generator version {model.version} takes an integer digit: it can morph between "
                "seeds, not between digits",
                "bad_field",
            )
        classes = len(model.meta.labels)
        z, weights = pp.morph_inputs(model.meta.preprocessing.z_dim, classes, (d0, seed), (d1, s1), steps)
        job = self.job(model, z, weights)
        job.info.update(
            seed=seed,
            digits=weights.argmax(1).tolist(),
            format=fmt,
            cols=steps,
            morph={"from": {"digit": d0, "seed": seed}, "to": {"digit": d1, "seed": s1}, "steps": steps},
        )
        return job

    def answer(self, model: Model, job: Job, images: np.ndarray) -> Answer:
        info = job.info
        if info["format"] == "json":
            body = {
                "images": [base64.b64encode(pp.png_bytes(im)).decode() for im in images],
                "seed": info["seed"],
                "digits": info["digits"],
                "model_version": model.version,
            }
            if "morph" in info:
                body["morph"] = info["morph"]
            return Answer(body)
        headers = {
            "X-Seed": str(info["seed"]),
            "X-Digits": ",".join(map(str, info["digits"])),
            "X-Model-Version": model.version,
        }
        return Answer(pp.png_bytes(pp.grid(images, cols=info["cols"])), "image/png", headers)

    def describe(self, model: Model) -> dict:
        return {"labels": model.meta.labels, "blends_classes": self.blends(model)}
