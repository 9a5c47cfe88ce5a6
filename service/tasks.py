"""What each task does, declared once: the task registry.

A model declares its task in its metadata; the task decides everything else: which route
serves it and with which body, how a request is validated into a batch job, how jobs of
many requests become one ONNX run (`forward`, in the model's batch thread), what is computed
from the raw outputs (`finish`, also in the batch thread), how the answer is encoded, how
the model is warmed up, and which metadata it needs. It also declares the tensor signatures
a model is served with under the Open Inference Protocol (`signatures`: the model's own, and
friendlier views such as text in, label out), with the same finish step (metrics, trust), so
service.v2 names no task. Nothing else in the service names a model: adding a model of an
existing task is its files plus a manifest entry.

The batch-in/batch-out functions at the bottom (`classify_images`, `generate`, ...) are the
same code `training.evaluate` measures the committed models with.
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import numpy as np

from service import metadata as md
from service import metrics, ood
from service import preprocessing as pp
from service.errors import ApiError, bool_field, int_field, shown, str_field
from service.runtime import Model

MAX_SEED = 2**63 - 1
TEXT_CHUNK = 64  # texts per ONNX run, sorted by length so padding stays small


# --------------------------------------------------------------------------- the contract


@dataclass(eq=False)
class Job:
    """One request's work for one model: canonical inputs (rows first) and what to compute
    from its outputs. The batcher runs many jobs as one ONNX batch and never splits a job
    across answers."""

    inputs: Any
    rows: int
    finish: Callable[[dict[str, np.ndarray]], Any] | None = None  # runs in the batch thread
    info: dict[str, Any] = field(default_factory=dict)  # what the answer needs (labels, seed, ...)
    queued_s: float = 0.0  # filled in by the batcher
    infer_s: float = 0.0


@dataclass
class Body:
    """A parsed request body: JSON fields, or form fields and image files."""

    fields: dict[str, Any]
    files: list[bytes] = field(default_factory=list)


@dataclass
class Answer:
    content: bytes | dict
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # "float32" | "int64" | "uint8" (as in the metadata) | "bytes" (UTF-8 text)
    shape: tuple[int, ...]  # -1 for a variable dimension (the first is the batch)


@dataclass(frozen=True)
class Signature:
    """Tensors in and out of one model version under the Open Inference Protocol: the model's
    own, or a friendlier view of it. `job` validates decoded input tensors (rows first) into
    a job whose finish step gives the output tensors by name. It holds no model (a protocol
    may keep it for as long as the version exists)."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    job: Callable[[Model, dict[str, np.ndarray], Any], Job]  # (model, tensors, settings) -> Job
    max_width: int = 0  # columns allowed in a variable second dimension (token ids); 0: none


def own_tensors(specs: Sequence[md.TensorSpec]) -> tuple[Tensor, ...]:
    """Metadata tensor specs -> Tensors (named dimensions are variable: -1)."""
    return tuple(Tensor(s.name, s.dtype, tuple(d if isinstance(d, int) else -1 for d in s.shape)) for s in specs)


class Context(Protocol):
    """What a task may ask of the HTTP layer while it parses a request."""

    settings: Any

    async def decode_images(self, files: list[bytes], pre) -> np.ndarray: ...


class Task:
    name: ClassVar[str]
    route: ClassVar[str]  # the HTTP route that serves it
    body: ClassVar[str]  # "json" or "multipart"
    fields: ClassVar[frozenset[str]] = frozenset()  # body fields besides model / model_version
    summary: ClassVar[str] = ""

    def max_rows(self, settings) -> int:
        """Most rows one request may carry (also the Open Inference Protocol's limit)."""
        return 1

    def check(self, model: Model) -> None:
        """Task-specific expectations of a model's signature; raise ValueError if unmet."""

    def forward(self, model: Model, jobs: Sequence[Job], max_rows: int) -> list[dict[str, np.ndarray]]:
        """Jobs -> raw outputs per job. Default: concatenate tensors, run in chunks, split."""
        counts = [job.rows for job in jobs]
        columns = {k: np.concatenate([job.inputs[k] for job in jobs]) for k in jobs[0].inputs}
        total, names = sum(counts), model.output_names
        chunks = [model.run(**{k: v[i : i + max_rows] for k, v in columns.items()}) for i in range(0, total, max_rows)]
        outs = {n: np.concatenate([c[j] for c in chunks]) for j, n in enumerate(names)}
        bounds = np.cumsum(counts)[:-1]
        split = {n: np.split(v, bounds) for n, v in outs.items()}
        return [{n: split[n][i] for n in names} for i in range(len(jobs))]

    def warmup(self, model: Model) -> Job:
        raise NotImplementedError

    async def parse(self, body: Body, model: Model, ctx: Context) -> Job:
        raise NotImplementedError

    def answer(self, model: Model, job: Job, result: Any) -> Answer:
        raise NotImplementedError

    def describe(self, model: Model) -> dict:
        """Task-specific lines of /models (labels, codec, calibration, ...)."""
        return {}

    # Tensors in, tensors out (the Open Inference Protocol, service.v2)

    def signatures(self, model: Model) -> dict[str, Signature]:
        """The model's tensor signatures: "" is its own (as its metadata declares it), any
        other key a view served as `<model>_<key>`."""
        return {"": Signature(own_tensors(model.meta.inputs), own_tensors(model.meta.outputs), self.tensor_job)}

    def tensor_job(self, model: Model, tensors: dict[str, np.ndarray], s=None) -> Job:
        """A job from the model's own input tensors (already checked against its signature);
        its finish step gives the raw outputs."""
        return Job(tensors, len(next(iter(tensors.values()))))

    # The contract, for the generated OpenAPI document and BentoML's /schema.json
    client_method: ClassVar[str]  # the method name BentoML's client gets
    response: ClassVar[str] = "json"  # "json" (schema below) or "png"
    response_schema: ClassVar[str] = ""  # a components/schemas name

    def properties(self, s, models: list[str]) -> tuple[dict, list[str]]:
        """JSON-schema properties of the request body (besides model/model_version) and the
        required ones; limits come from the settings, so the document cannot drift."""
        return {}, []


TASKS: dict[str, Task] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls()
    return cls


def routes() -> dict[str, dict[str, Task]]:
    """route -> {body kind -> task}: /classify takes images (multipart) and text (JSON)."""
    out: dict[str, dict[str, Task]] = {}
    for task in TASKS.values():
        out.setdefault(task.route, {})[task.body] = task
    return out


def _expect(model: Model, kind: str, names: dict[str, str], optional: dict[str, str] | None = None) -> None:
    specs = {s.name: s.dtype for s in (model.meta.inputs if kind == "inputs" else model.meta.outputs)}
    for n, dt in names.items():
        if specs.get(n) != dt:
            raise ValueError(f"the task {model.task} needs {kind[:-1]} {n!r} of type {dt}; the model has {specs}")
    extra = set(specs) - set(names) - set(optional or {})
    if extra:
        raise ValueError(f"the task {model.task} does not know {kind} {sorted(extra)}")


# --------------------------------------------------------------------------- classification


def observe_trust(model: Model, top1: list[float], verdicts: list[bool] | None) -> None:
    """The metrics of a classifier's finish step, whatever the protocol: each row's top-1
    probability (deepserve_prediction_confidence) and whether it looked like the training
    data (deepserve_predictions_total{in_distribution}; not counted without a detector)."""
    metrics.aggregate.observe_many("confidence", (model.name,), top1)
    if verdicts is not None:
        flagged = verdicts.count(False)
        if flagged:
            metrics.aggregate.inc("ood", (model.name, "false"), flagged)
        if len(verdicts) > flagged:
            metrics.aggregate.inc("ood", (model.name, "true"), len(verdicts) - flagged)


def _classifications(model: Model, probs: np.ndarray, top_k: int, verdicts: list[bool] | None) -> list[dict]:
    """(N, C) probabilities -> one answer per row (sorted once for the whole batch, and
    built from Python numbers: per-row numpy calls cost more than the model here)."""
    labels = model.meta.labels
    k = min(top_k, len(labels))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.round(np.take_along_axis(probs, order, axis=1).astype(np.float64), 6).tolist()
    observe_trust(model, [p[0] for p in top], verdicts)
    out = []
    for idx, p in zip(order.tolist(), top):
        best = idx[0]
        out.append(
            {
                "model": model.name,
                "model_version": model.version,
                "label": labels[best],
                "index": best,
                "confidence": p[0],
                "top_k": [{"label": labels[i], "index": i, "probability": q} for i, q in zip(idx, p)],
            }
        )
    return out


def calibrated(model: Model, logits: np.ndarray) -> np.ndarray:
    """The probabilities clients get: softmax(logits / T), T fitted on the validation split
    (service.ood); uncalibrated where the metadata has no calibration."""
    cal = getattr(model.meta, "calibration", None)
    if cal is None:
        return pp.softmax(logits)
    return ood.calibrated_probabilities(logits, cal.temperature, cal.label_smoothing)


def input_png(image: np.ndarray) -> str:
    """A (28, 28) model input in [0, 1] -> base64 PNG (return_input)."""
    return base64.b64encode(pp.png_bytes(image)).decode()


class _Classifier(Task):
    """What the image and text classifiers share: the trust step (calibrated probabilities, a
    score and an in-distribution verdict per row) and, under the Open Inference Protocol, a
    finish step with the same metrics as their own routes'."""

    def trust(self, model: Model, inputs: Any, out: dict[str, np.ndarray]) -> tuple:
        """A batch's raw outputs -> (calibrated probabilities (N, C), each row's trust score,
        each row's verdict (None without a detector))."""
        raise NotImplementedError

    def tensor_finish(self, model: Model, inputs: Any, tensors=None) -> Callable:
        """The finish step of a tensor job: the trust metrics, then the raw outputs (or
        `tensors(probabilities)`, a view's outputs)."""

        def finish(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            probs, _, verdicts = self.trust(model, inputs, out)
            observe_trust(model, np.round(probs.max(1).astype(np.float64), 6).tolist(), verdicts)
            return out if tensors is None else tensors(probs)

        return finish


def _reject_ood(results: list[dict], many: bool, score: str) -> None:
    bad = [(i, r) for i, r in enumerate(results) if r.get("in_distribution") is False]
    if bad:
        names = [f"{'input #' + str(i + 1) if many else 'the input'} ({score} {r[score]:.3g})" for i, r in bad[:16]]
        raise ApiError(
            422,
            f"out of distribution: {', '.join(names)}; the model was not trained on inputs like "
            "these (send reject_ood=false to get labels anyway)",
            "out_of_distribution",
            out_of_distribution=[i for i, _ in bad],
        )


@register
class ImageClassification(_Classifier):
    name = "image-classification"
    route, body = "/classify", "multipart"
    fields = frozenset({"top_k", "reject_ood", "return_input"})
    summary = "Classify images: one or more `image` files (multipart)"

    def max_rows(self, s) -> int:
        return s.max_images

    def check(self, model: Model) -> None:
        _expect(model, "inputs", {"image": "float32"})
        ood = model.meta.ood.output if model.meta.ood else None
        _expect(model, "outputs", {"logits": "float32", **({ood: "float32"} if ood else {})})
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

    def job(self, model: Model, images: np.ndarray, top_k: int) -> Job:
        pre = model.meta.preprocessing
        x = pp.normalize(images, pre.mean, pre.std)[:, None]  # (N, 1, 28, 28)

        def finish(out: dict[str, np.ndarray]) -> list[dict]:
            probs, scores, verdicts = self.trust(model, None, out)
            results = _classifications(model, probs, top_k, verdicts)
            if scores is not None:
                for r, s, v in zip(results, scores, verdicts):
                    r["ood_score"] = round(s, 4)
                    r["in_distribution"] = v
            return results

        return Job({"image": x}, len(x), finish)

    def tensor_job(self, model: Model, tensors: dict[str, np.ndarray], s=None) -> Job:
        return Job(tensors, len(tensors["image"]), self.tensor_finish(model, None))

    async def parse(self, body: Body, model: Model, ctx: Context) -> Job:
        if not body.files:
            raise ApiError(400, "no file field 'image' in the form", "missing_image")
        top_k = int_field(body.fields.get("top_k"), "top_k", 1, 10, default=3)
        images = await ctx.decode_images(body.files, model.meta.preprocessing)
        job = self.job(model, images, top_k)
        job.info["many"] = len(body.files) > 1
        job.info["reject_ood"] = bool_field(body.fields.get("reject_ood"), "reject_ood")
        if bool_field(body.fields.get("return_input"), "return_input"):
            job.info["inputs"] = images
        return job

    def answer(self, model: Model, job: Job, result: list[dict]) -> Answer:
        if job.info["reject_ood"]:
            _reject_ood(result, job.info["many"], "ood_score")
        if "inputs" in job.info:
            for r, image in zip(result, job.info["inputs"]):
                r["input_png"] = input_png(image)
        return Answer({"results": result} if job.info["many"] else result[0])

    def describe(self, model: Model) -> dict:
        return {"labels": model.meta.labels}

    client_method, response_schema = "classify", "ClassificationResult"

    def properties(self, s, models):
        return {
            "image": {"type": "array", "items": IMAGE_FILE, "minItems": 1, "maxItems": s.max_images},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
            "reject_ood": REJECT_OOD,
            "return_input": RETURN_INPUT,
        }, ["image"]


IMAGE_FILE = {
    "type": "string",
    "format": "binary",
    "description": "PNG, JPEG, GIF, BMP, WebP or TIFF; grey or colour; any size up to the pixel limits",
}
RETURN_INPUT = {
    "type": "boolean",
    "default": False,
    "description": "also answer the 28×28 image the model received (after framing), as a base64 PNG (`input_png`)",
}
REJECT_OOD = {
    "type": "boolean",
    "default": False,
    "description": "answer 422 instead of labels when any input looks unlike the training data",
}


@register
class TextClassification(_Classifier):
    name = "text-classification"
    route, body = "/classify", "json"
    fields = frozenset({"text", "texts", "top_k", "reject_ood"})
    summary = 'Classify text: JSON {"text": "..."} or {"texts": [...]}'

    def max_rows(self, s) -> int:
        return s.max_texts

    def check(self, model: Model) -> None:
        _expect(model, "inputs", {"tokens": "int64", "lengths": "int64"})
        _expect(model, "outputs", {"logits": "float32"})

    def forward(self, model: Model, jobs: Sequence[Job], max_rows: int) -> list[dict[str, np.ndarray]]:
        seqs = [s for job in jobs for s in job.inputs]
        logits = token_logits(model, seqs, min(max_rows, TEXT_CHUNK))
        bounds = np.cumsum([job.rows for job in jobs])[:-1]
        return [{"logits": part} for part in np.split(logits, bounds)]

    def encode(self, model: Model, texts: Sequence[str]) -> list[list[int]]:
        max_tokens = model.meta.preprocessing.max_tokens
        return [pp.encode(pp.tokenize(t), model.vocab_index, max_tokens) or [pp.UNK] for t in texts]

    def warmup(self, model: Model) -> Job:
        return self.job(model, [[pp.UNK]], 2)

    def trust(self, model: Model, sequences: list[list[int]], out: dict[str, np.ndarray]) -> tuple:
        rates = [sum(t == pp.UNK for t in seq) / len(seq) for seq in sequences]
        ood = model.meta.ood
        return calibrated(model, out["logits"]), rates, ([r <= ood.threshold for r in rates] if ood else None)

    def job(self, model: Model, sequences: list[list[int]], top_k: int) -> Job:
        def finish(out: dict[str, np.ndarray]) -> list[dict]:
            probs, rates, verdicts = self.trust(model, sequences, out)
            results = _classifications(model, probs, top_k, verdicts)
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
            check_text(text, f"text[{i}]", s)
            texts.append(text)
        sequences = self.encode(model, texts)
        labels = np.array([x.encode() for x in model.meta.labels], dtype=object)

        def tensors(probs: np.ndarray) -> dict[str, np.ndarray]:
            return {"probabilities": probs, "label": labels[probs.argmax(1)]}

        return Job(sequences, len(sequences), self.tensor_finish(model, sequences, tensors))

    async def parse(self, body: Body, model: Model, ctx: Context) -> Job:
        payload, s = body.fields, ctx.settings
        if ("text" in payload) == ("texts" in payload):
            raise ApiError(400, "send exactly one of 'text' (a string) or 'texts' (a list of strings)", "missing_field")
        many = "texts" in payload
        texts = payload["texts"] if many else [payload["text"]]
        if many and (not isinstance(texts, list) or not 1 <= len(texts) <= s.max_texts):
            raise ApiError(400, f"texts must be a list of 1 to {s.max_texts} strings", "bad_field")
        for i, text in enumerate(texts):
            check_text(text, f"texts[{i}]" if many else "text", s)
        top_k = int_field(payload.get("top_k"), "top_k", 1, 10, default=2)
        job = self.job(model, self.encode(model, texts), top_k)
        job.info.update(many=many, reject_ood=bool_field(payload.get("reject_ood"), "reject_ood"))
        return job

    def answer(self, model: Model, job: Job, result: list[dict]) -> Answer:
        if job.info["reject_ood"]:
            _reject_ood(result, job.info["many"], "unknown_token_rate")
        return Answer({"results": result} if job.info["many"] else result[0])

    def describe(self, model: Model) -> dict:
        return {"labels": model.meta.labels, "vocabulary_size": len(model.meta.vocabulary)}

    client_method, response_schema = "classify", "ClassificationResult"  # one method with images (service.openapi)

    def properties(self, s, models):
        text = {"type": "string", "minLength": 1, "maxLength": s.max_text_chars, "pattern": r"\S"}
        return {
            "text": text,
            "texts": {"type": "array", "minItems": 1, "maxItems": s.max_texts, "items": text},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 10, "default": 2},
            "reject_ood": REJECT_OOD,
        }, []


def check_text(text, label: str, s) -> None:
    """One text of a request, on every protocol: a string of at most max_text_chars (413 with
    the limit) holding something besides whitespace."""
    str_field(text, label)
    if len(text) > s.max_text_chars:
        raise ApiError(
            413,
            f"{label} is {len(text)} characters; the limit is {s.max_text_chars}",
            "text_too_long",
            limit=s.max_text_chars,
        )
    if not text.strip():
        raise ApiError(400, f"{label} is empty or only whitespace", "empty_text")


# --------------------------------------------------------------------------- generation


@register
class ConditionalGeneration(Task):
    """Digits from a latent z and a class. Versions with a `class_weights` input (FP32, one
    weight per class) can also blend classes; older ones take an integer `digit`."""

    name = "conditional-image-generation"
    route, body = "/generate", "json"
    fields = frozenset({"n", "digit", "seed", "format", "morph_to", "steps"})
    summary = "Draw digits with the conditional GAN, or morph from one (digit, seed) to another"

    def max_rows(self, s) -> int:
        return s.max_generate

    def check(self, model: Model) -> None:
        names = {i.name for i in model.meta.inputs}
        cls = {"class_weights": "float32"} if "class_weights" in names else {"digit": "int64"}
        _expect(model, "inputs", {"z": "float32", **cls})
        _expect(model, "outputs", {"images": "float32"})

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
        classes = len(model.meta.labels)
        seed = payload.get("seed")
        seed = secrets.randbelow(2**31) if seed is None else int_field(seed, "seed", 0, MAX_SEED)
        fmt = payload.get("format", "png")
        if fmt not in ("png", "json"):
            raise ApiError(400, f"format must be 'png' or 'json', got {shown(fmt, 20)}", "bad_field")
        if payload.get("morph_to") is not None:
            return self.morph(model, payload, seed, fmt, s)
        if "steps" in payload:
            raise ApiError(400, "steps goes with morph_to", "bad_field")
        n = int_field(payload.get("n"), "n", 1, s.max_generate, default=16)
        digit = payload.get("digit")
        if digit is not None:
            digit = int_field(digit, "digit", 0, classes - 1)
        z, digits = pp.sample_latents(n, model.meta.preprocessing.z_dim, seed, digit)
        job = self.job(model, z, np.eye(classes, dtype=np.float32)[digits])
        job.info.update(seed=seed, digits=digits.tolist(), format=fmt, cols=math.ceil(math.sqrt(n)))
        return job

    def morph(self, model: Model, payload: dict, seed: int, fmt: str, s) -> Job:
        """`steps` frames from (digit, seed) to morph_to's (digit, seed): latents on the great
        circle between the two (slerp), class weights on the line between the two digits."""
        classes, target = len(model.meta.labels), payload["morph_to"]
        if "n" in payload:
            raise ApiError(400, "n does not go with morph_to: the frames are `steps`", "bad_field")
        if not isinstance(target, dict) or not set(target) <= {"digit", "seed"}:
            raise ApiError(400, 'morph_to must be an object like {"digit": 8, "seed": 1}', "bad_field")
        if payload.get("digit") is None:
            raise ApiError(400, "a morph starts from a digit: give 'digit' with morph_to", "missing_field")
        d0 = int_field(payload["digit"], "digit", 0, classes - 1)
        d1 = int_field(target.get("digit", d0), "morph_to.digit", 0, classes - 1)
        s1 = int_field(target.get("seed", seed), "morph_to.seed", 0, MAX_SEED)
        steps = int_field(payload.get("steps"), "steps", 2, s.max_generate, default=9)
        if d0 != d1 and not self.blends(model):
            raise ApiError(
                400,
                f"generator version {model.version} takes an integer digit: it can morph between "
                "seeds, not between digits",
                "bad_field",
            )
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

    client_method, response = "generate", "png"
    response_schema = "Generated"

    def properties(self, s, models):
        point = {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "digit": {"type": "integer", "minimum": 0, "maximum": 9},
                "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
            },
        }
        return {
            "n": {"type": "integer", "minimum": 1, "maximum": s.max_generate, "default": 16},
            "digit": {
                "type": "integer",
                "minimum": 0,
                "maximum": 9,
                "nullable": True,
                "description": "the digit to draw; null or absent: a random digit per image",
            },
            "seed": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_SEED,
                "description": "the same request always gives byte-identical images",
            },
            "format": {"type": "string", "enum": ["png", "json"], "default": "png"},
            "morph_to": {
                **point,
                "description": "morph from (digit, seed) to this digit and/or seed: `steps` "
                "frames (n must be absent; digit is required). Seeds morph along the latents' great "
                "circle (slerp), digits by blending the class weights",
            },
            "steps": {
                "type": "integer",
                "minimum": 2,
                "maximum": s.max_generate,
                "default": 9,
                "description": "frames of a morph, both ends included",
            },
        }, []


# --------------------------------------------------------------------------- codec and denoiser


class _OneImage(Task):
    body = "multipart"
    fields = frozenset({"return_input"})

    def max_rows(self, s) -> int:  # one image per HTTP request; up to max_images rows through /v2
        return s.max_images

    def properties(self, s, models):
        return {"image": IMAGE_FILE, "return_input": RETURN_INPUT}, ["image"]

    async def one_image(self, body: Body, model: Model, ctx: Context) -> tuple[np.ndarray, dict]:
        """The upload as the model's (1, 1, 28, 28) input, and the job info it implies."""
        if len(body.files) != 1:
            if not body.files:
                raise ApiError(400, "no file field 'image' in the form", "missing_image")
            raise ApiError(400, f"send exactly one image, got {len(body.files)}", "bad_field")
        images = await ctx.decode_images(body.files, model.meta.preprocessing)
        wanted = bool_field(body.fields.get("return_input"), "return_input")
        return images[:, None], ({"inputs": images} if wanted else {})


@register
class Compression(_OneImage):
    name = "image-compression-encoder"
    route = "/compress"
    summary = "Compress one image to a 16-byte code"

    def check(self, model: Model) -> None:
        _expect(model, "inputs", {"image": "float32"})
        _expect(model, "outputs", {"latent": "float32"})
        if model.meta.outputs[0].shape[-1] != model.meta.codec.latent_dim:
            raise ValueError("latent output width differs from codec.latent_dim")

    def job(self, model: Model, images: np.ndarray) -> Job:
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

    client_method, response_schema = "compress", "Code"


@register
class Decompression(Task):
    name = "image-compression-decoder"
    route, body = "/decompress", "json"
    fields = frozenset({"code"})
    summary = "Decode a code from /compress to a 28×28 PNG"

    def max_rows(self, s) -> int:
        return s.max_images

    def check(self, model: Model) -> None:
        _expect(model, "inputs", {"latent": "float32"})
        _expect(model, "outputs", {"image": "float32"})
        if model.meta.inputs[0].shape[-1] != model.meta.codec.latent_dim:
            raise ValueError("latent input width differs from codec.latent_dim")

    def job(self, model: Model, codes: list[bytes]) -> Job:
        c = model.meta.codec
        latent = pp.dequantize(pp.unpack_codes(codes, c.latent_dim, c.bits), c.bits)
        return Job({"latent": latent}, len(codes), lambda out: out["image"][:, 0])

    def warmup(self, model: Model) -> Job:
        return self.job(model, [bytes(model.meta.codec.bytes)])

    async def parse(self, body: Body, model: Model, ctx: Context) -> Job:
        code = body.fields.get("code")
        if not isinstance(code, str):
            raise ApiError(400, "code must be a base64 string (as returned by /compress)", "bad_field")
        n = model.meta.codec.bytes
        if len(code) > 4 * n:
            raise ApiError(
                400, f"code is too long: a code is {n} bytes ({4 * math.ceil(n / 3)} base64 characters)", "bad_code"
            )
        try:
            raw = base64.b64decode(code, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "code is not valid base64", "bad_code") from None
        if len(raw) != n:
            raise ApiError(400, f"code must decode to exactly {n} bytes, got {len(raw)}", "bad_code")
        return self.job(model, [raw])

    def answer(self, model: Model, job: Job, images: np.ndarray) -> Answer:
        return Answer(pp.png_bytes(images[0]), "image/png", {"X-Model-Version": model.version})

    def describe(self, model: Model) -> dict:
        return {"codec": model.meta.codec.model_dump(), "pair": model.meta.pair}

    client_method, response = "decompress", "png"

    def properties(self, s, models):
        return {"code": {"type": "string", "format": "byte", "description": "base64 of the code from /compress"}}, [
            "code"
        ]


@register
class Denoising(_OneImage):
    name = "image-denoising"
    route = "/denoise"
    summary = "Remove noise from a digit image; returns 28×28"

    def check(self, model: Model) -> None:
        _expect(model, "inputs", {"image": "float32"})
        _expect(model, "outputs", {"image_out": "float32"})

    def job(self, images: np.ndarray) -> Job:
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

    client_method, response = "denoise", "png"


assert set(TASKS) == set(md.TASK_NAMES), "every metadata type needs a task, and every task a metadata type"


# --------------------------------------------------------------------------- batch in, batch out
# The serving code path, also used by training.evaluate on whole test sets.


def run_job(model: Model, job: Job, max_rows: int = 512) -> Any:
    """One job through its task's forward and finish, without a batcher (evaluation, smoke)."""
    (out,) = TASKS[model.task].forward(model, [job], max_rows)
    return job.finish(out) if job.finish else out


def classify_images(model: Model, images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) pixels in [0, 1] -> uncalibrated class probabilities (N, C) (the judge's view)."""
    pre = model.meta.preprocessing
    return pp.softmax(model.run(image=pp.normalize(images, pre.mean, pre.std)[:, None])[0])


def image_outputs(model: Model, images: np.ndarray) -> dict[str, np.ndarray]:
    """(N, 28, 28) pixels in [0, 1] -> every raw output (logits, ood_score if exported)."""
    pre = model.meta.preprocessing
    out = model.run(image=pp.normalize(images, pre.mean, pre.std)[:, None])
    return dict(zip(model.output_names, out))


def encode_texts(model: Model, texts: Sequence[str]) -> list[list[int]]:
    """Texts -> token id lists (truncated to the model's max_tokens); [] for no tokens."""
    max_tokens = model.meta.preprocessing.max_tokens
    return [pp.encode(pp.tokenize(t), model.vocab_index, max_tokens) for t in texts]


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


def classify_token_ids(model: Model, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Non-empty id lists -> uncalibrated probabilities (N, C)."""
    return pp.softmax(token_logits(model, sequences))


def generate(model: Model, z: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Latents (N, z_dim) and digits (N,) -> images (N, 28, 28) in [0, 1]."""
    weights = np.eye(len(model.meta.labels), dtype=np.float32)[digits]
    return run_job(model, TASKS[model.task].job(model, z, weights))


def compress(encoder: Model, images: np.ndarray) -> list[bytes]:
    """(N, 28, 28) in [0, 1] -> one packed code per image."""
    return run_job(encoder, TASKS[encoder.task].job(encoder, images[:, None]))


def decompress(decoder: Model, codes: Sequence[bytes]) -> np.ndarray:
    """Packed codes (each exactly codec.bytes long) -> images (N, 28, 28) in [0, 1]."""
    return run_job(decoder, TASKS[decoder.task].job(decoder, list(codes)))


def denoise(model: Model, images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) noisy in [0, 1] -> (N, 28, 28) cleaned."""
    return run_job(model, TASKS[model.task].job(images[:, None]))


def run_in_chunks(fn, items, size: int = 512):
    """Apply a batch function to a large array/list in chunks (evaluation, not serving)."""
    parts = [fn(items[i : i + size]) for i in range(0, len(items), size)]
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else sum(parts, [])
