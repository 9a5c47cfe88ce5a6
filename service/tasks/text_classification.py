"""Text classification (sentiment): a text or a list of texts -> labels, with trust.

`encode_texts` and `token_logits` are the tokenization and the batched ONNX run the server
uses; training.evaluate measures the committed models with them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from service import preprocessing as pp
from service.errors import ApiError
from service.runtime import Model
from service.tasks.base import Answer, Body, Context, Job, Signature, Tensor, expect
from service.tasks.classification import Classifier, calibrated, classifications, reject_ood
from service.tasks.fields import REJECT_OOD, Fields, Text, Texts, top_k

TEXT_CHUNK = 64  # texts per ONNX run, sorted by length so padding stays small


def encode_texts(model: Model, texts: Sequence[str]) -> list[list[int]]:
    """Texts -> token id lists (truncated to the model's max_tokens); [] for no tokens."""
    max_tokens = model.meta.preprocessing.max_tokens
    return [pp.encode(pp.tokenize(t), model.vocab_index, max_tokens) for t in texts]


def texts_to_ids(model: Model, texts: Sequence[str]) -> list[list[int]]:
    """Texts -> the id lists the model is fed: a text with no tokens is one unknown token."""
    return [ids or [pp.UNK] for ids in encode_texts(model, texts)]


def token_logits(model: Model, sequences: Sequence[Sequence[int]], chunk: int = TEXT_CHUNK) -> np.ndarray:
    """Non-empty id lists -> logits (N, C). Sorted by length so padding stays small; the model
    is exact under padding, so grouping never changes a result."""
    order = np.argsort([len(s) for s in sequences], kind="stable")
    logits = np.empty((len(sequences), len(model.meta.labels)), dtype=np.float32)
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        tokens, lengths = pp.pad_batch([sequences[i] for i in part])
        logits[part] = model.run(tokens=tokens, lengths=lengths)[0]
    return logits


TEXT = Text("text", "one text (an answer of its own)")


class TextClassification(Classifier):
    name = "text-classification"
    route, body = "/classify", "json"
    request = Fields(
        (
            TEXT,
            Texts("texts", "several texts: one answer each, under `results`", item=TEXT),
            top_k(default=2),
            REJECT_OOD,
        )
    )  # one of text / texts
    summary = 'Classify text: JSON {"text": "..."} or {"texts": [...]}'
    client_method, response_schema = "classify", "ClassificationResult"  # one method with images (service.openapi)

    def max_rows(self, s) -> int:
        return s.max_texts

    def check(self, model: Model) -> None:
        expect(model, "inputs", {"tokens": "int64", "lengths": "int64"})
        expect(model, "outputs", {"logits": "float32"})

    def forward(self, model: Model, jobs: Sequence[Job], max_rows: int) -> list[dict[str, np.ndarray]]:
        seqs = [s for job in jobs for s in job.inputs]
        logits = token_logits(model, seqs, min(max_rows, TEXT_CHUNK))
        bounds = np.cumsum([job.rows for job in jobs])[:-1]
        return [{"logits": part} for part in np.split(logits, bounds)]

    def warmup(self, model: Model) -> Job:
        return self.job(model, [[pp.UNK]], 2)

    def trust(self, model: Model, sequences: list[list[int]], out: dict[str, np.ndarray]) -> tuple:
        rates = [sum(t == pp.UNK for t in seq) / len(seq) for seq in sequences]
        ood = model.meta.ood
        return calibrated(model, out["logits"]), rates, ([r <= ood.threshold for r in rates] if ood else None)

    def job(self, model: Model, sequences: list[list[int]], top_k: int) -> Job:
        def finish(out: dict[str, np.ndarray]) -> list[dict]:
            probs, rates, verdicts = self.trust(model, sequences, out)
            results = classifications(model, probs, top_k, verdicts)
            for i, r in enumerate(results):
                r["unknown_token_rate"] = round(rates[i], 4)
                if verdicts is not None:
                    r["in_distribution"] = verdicts[i]
            return results

        return Job(sequences, len(sequences), finish)

    def signatures(self, model: Model) -> dict[str, Signature]:
        own, classes = super().signatures(model)[""], len(model.meta.labels)
        text = Signature(
            (Tensor("text", "bytes", (-1,)),),
            (Tensor("probabilities", "float32", (-1, classes)), Tensor("label", "bytes", (-1,))),
            self.text_job,
        )
        return {"": replace(own, max_width=model.meta.preprocessing.max_tokens), "text": text}

    def tensor_job(self, model: Model, tensors: dict[str, np.ndarray], s=None) -> Job:
        """Token ids (B, T) and lengths (B,) -> the id lists /classify would have made."""
        tokens, lengths = tensors["tokens"], tensors["lengths"]
        if np.any(lengths < 1) or np.any(lengths > tokens.shape[1]):
            raise ApiError(400, f"lengths must be between 1 and {tokens.shape[1]} (the tokens' width)", "bad_tensor")
        vocab = len(model.meta.vocabulary)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ApiError(400, f"token ids must be between 0 and {vocab - 1}", "bad_tensor")
        sequences = [row[:n].tolist() for row, n in zip(tokens, lengths)]
        return Job(sequences, len(sequences), self.tensor_finish(model, sequences))

    def text_job(self, model: Model, tensors: dict[str, np.ndarray], s) -> Job:
        """UTF-8 texts (a BYTES tensor) -> probabilities and labels, checked as /classify checks them."""
        texts = []
        for i, item in enumerate(tensors["text"]):
            try:
                text = item.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, f"text[{i}] is not UTF-8", "bad_tensor") from None
            texts.append(TEXT.read(text, s, model, f"text[{i}]"))
        sequences = texts_to_ids(model, texts)
        labels = np.array([x.encode() for x in model.meta.labels], dtype=object)

        def tensors(probs: np.ndarray) -> dict[str, np.ndarray]:
            return {"probabilities": probs, "label": labels[probs.argmax(1)]}

        return Job(sequences, len(sequences), self.tensor_finish(model, sequences, tensors))

    async def parse(self, body: Body, model: Model, ctx: Context) -> Job:
        payload, s = body.fields, ctx.settings
        if ("text" in payload) == ("texts" in payload):
            raise ApiError(400, "send exactly one of 'text' (a string) or 'texts' (a list of strings)", "missing_field")
        many = "texts" in payload
        texts = self.request["texts"].read(payload["texts"], s, model) if many else [TEXT.read(payload["text"], s)]
        top, reject = self.request.read(payload, s, model, "top_k", "reject_ood")
        job = self.job(model, texts_to_ids(model, texts), top)
        job.info.update(many=many, reject_ood=reject)
        return job

    def answer(self, model: Model, job: Job, result: list[dict]) -> Answer:
        if job.info["reject_ood"]:
            reject_ood(result, job.info["many"], "unknown_token_rate")
        return Answer({"results": result} if job.info["many"] else result[0])

    def describe(self, model: Model) -> dict:
        return {"labels": model.meta.labels, "vocabulary_size": len(model.meta.vocabulary)}
