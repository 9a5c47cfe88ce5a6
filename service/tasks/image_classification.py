"""Image classification (digits, fashion): one or more uploads -> labels, with trust."""

from __future__ import annotations

from typing import Any

import numpy as np

from service import preprocessing as pp
from service.runtime import Model
from service.tasks.base import Answer, Body, Context, Job, expect, input_png
from service.tasks.classification import Classifier, calibrated, classifications, reject_ood
from service.tasks.fields import IMAGE_DESCRIPTION, REJECT_OOD, RETURN_INPUT, Fields, Images, top_k


class ImageClassification(Classifier):
    name = "image-classification"
    route, body = "/classify", "multipart"
    request = Fields(
        (Images("image", IMAGE_DESCRIPTION, many=True), top_k(default=3), REJECT_OOD, RETURN_INPUT),
        required=("image",),
    )
    summary = "Classify images: one or more `image` files (multipart)"
    client_method, response_schema = "classify", "ClassificationResult"

    def max_rows(self, s) -> int:
        return s.max_images

    def check(self, model: Model) -> None:
        expect(model, "inputs", {"image": "float32"})
        ood = model.meta.ood.output if model.meta.ood else None
        expect(model, "outputs", {"logits": "float32", **({ood: "float32"} if ood else {})})
        if model.meta.outputs[0].shape[-1] != len(model.meta.labels):
            raise ValueError(f"{len(model.meta.labels)} labels but {model.meta.outputs[0].shape[-1]} logits")

    def warmup(self, model: Model) -> Job:
        return self.job(model, np.zeros((1, pp.IMAGE_SIZE, pp.IMAGE_SIZE), np.float32), 3)

    def trust(self, model: Model, inputs: Any, out: dict[str, np.ndarray]) -> tuple:
        probs, ood = calibrated(model, out["logits"]), model.meta.ood
        if ood is None:
            return probs, None, None
        scores = out[ood.output]  # (N,), computed by the ONNX graph
        return probs, scores.tolist(), (scores <= ood.threshold).tolist()

    def feeds(self, model: Model, images: np.ndarray) -> dict[str, np.ndarray]:
        """(N, 28, 28) pixels in [0, 1] -> the model's input, normalized (N, 1, 28, 28)."""
        pre = model.meta.preprocessing
        return {"image": pp.normalize(images, pre.mean, pre.std)[:, None]}

    def job(self, model: Model, images: np.ndarray, top_k: int) -> Job:
        feeds = self.feeds(model, images)

        def finish(out: dict[str, np.ndarray]) -> list[dict]:
            probs, scores, verdicts = self.trust(model, None, out)
            results = classifications(model, probs, top_k, verdicts)
            if scores is not None:
                for r, s, v in zip(results, scores, verdicts):
                    r["ood_score"] = round(s, 4)
                    r["in_distribution"] = v
            return results

        return Job(feeds, len(images), finish)

    def tensor_job(self, model: Model, tensors: dict[str, np.ndarray], s=None) -> Job:
        return Job(tensors, len(tensors["image"]), self.tensor_finish(model, None))

    async def parse(self, body: Body, model: Model, ctx: Context) -> Job:
        s = ctx.settings
        files = self.request["image"].read(body.files, s)
        top, reject, wanted = self.request.read(body.fields, s, model, "top_k", "reject_ood", "return_input")
        images = await ctx.decode_images(files, model.meta.preprocessing)
        job = self.job(model, images, top)
        job.info["many"] = len(files) > 1
        job.info["reject_ood"] = reject
        if wanted:
            job.info["inputs"] = images
        return job

    def answer(self, model: Model, job: Job, result: list[dict]) -> Answer:
        if job.info["reject_ood"]:
            reject_ood(result, job.info["many"], "ood_score")
        if "inputs" in job.info:
            for r, image in zip(result, job.info["inputs"]):
                r["input_png"] = input_png(image)
        return Answer({"results": result} if job.info["many"] else result[0])
