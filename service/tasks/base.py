"""The contract every task fulfils, and the registry of tasks (service.tasks lists the tasks).

A model declares its task in its metadata; the task decides everything else: which route
serves it and with which body, which request fields it takes (declared once: service.tasks
.fields), how a request is validated into a batch job, how jobs of many requests become one
ONNX run (`forward`, in the model's batch thread), what is computed from the raw outputs
(`finish`, also in the batch thread), how the answer is encoded, how the model is warmed up,
and which metadata it needs. It also declares the tensor signatures a model is served with
under the Open Inference Protocol (`signatures`), with the same finish step (metrics, trust).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from service import metadata as md
from service import preprocessing as pp
from service.runtime import Model
from service.tasks.fields import IMAGE_DESCRIPTION, RETURN_INPUT, Fields, Images


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
    request: ClassVar[Fields] = Fields()  # its request fields besides model / model_version
    fields: ClassVar[frozenset[str]] = frozenset()  # their names (files aside), from `request`
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.fields = cls.request.names()

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
        required ones, generated from the field declarations with the settings' limits."""
        return self.request.properties(s)


TASKS: dict[str, Task] = {}  # task name -> the task; filled by service.tasks, in the documents' order


def routes() -> dict[str, dict[str, Task]]:
    """route -> {body kind -> task}: /classify takes images (multipart) and text (JSON)."""
    out: dict[str, dict[str, Task]] = {}
    for task in TASKS.values():
        out.setdefault(task.route, {})[task.body] = task
    return out


def expect(model: Model, kind: str, names: dict[str, str], optional: dict[str, str] | None = None) -> None:
    """The model's inputs or outputs (`kind`) must be exactly `names` (name -> dtype), besides
    `optional` ones; ValueError naming the difference otherwise."""
    specs = {s.name: s.dtype for s in (model.meta.inputs if kind == "inputs" else model.meta.outputs)}
    for n, dt in names.items():
        if specs.get(n) != dt:
            raise ValueError(f"the task {model.task} needs {kind[:-1]} {n!r} of type {dt}; the model has {specs}")
    extra = set(specs) - set(names) - set(optional or {})
    if extra:
        raise ValueError(f"the task {model.task} does not know {kind} {sorted(extra)}")


def input_png(image: np.ndarray) -> str:
    """A (28, 28) model input in [0, 1] -> base64 PNG (return_input)."""
    return base64.b64encode(pp.png_bytes(image)).decode()


def run_job(model: Model, job: Job, max_rows: int = 512) -> Any:
    """One job through its task's forward and finish, without a batcher (evaluation, smoke)."""
    (out,) = TASKS[model.task].forward(model, [job], max_rows)
    return job.finish(out) if job.finish else out


class OneImage(Task):
    """A task of one uploaded image per HTTP request (the codec's encoder, the denoiser)."""

    body = "multipart"
    request = Fields((Images("image", IMAGE_DESCRIPTION), RETURN_INPUT), required=("image",))

    def max_rows(self, s) -> int:  # one image per HTTP request; up to max_images rows through /v2
        return s.max_images

    async def one_image(self, body: Body, model: Model, ctx: Context) -> tuple[np.ndarray, dict]:
        """The upload as the model's (1, 1, 28, 28) input, and the job info it implies."""
        files = self.request["image"].read(body.files, ctx.settings)
        (wanted,) = self.request.read(body.fields, ctx.settings, model, "return_input")
        images = await ctx.decode_images(files, model.meta.preprocessing)
        return images[:, None], ({"inputs": images} if wanted else {})
