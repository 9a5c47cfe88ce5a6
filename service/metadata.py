"""The typed contract of the model directory: the manifest and each model's metadata.

Terms (used throughout the code and docs):
- **model**: one ONNX file plus its metadata (`digits`, `encoder`, `decoder`, ...).
- **family**: what one training run exports, sharing one version (`codec` -> `encoder` +
  `decoder`); the unit that is versioned, swapped and pinned.
- **task**: what a model does (`image-classification`, ...); it decides validation,
  batching, warm-up and answers (service.tasks).
- **view**: a derived model that reuses another's file, batcher and version
  (`sentiment_text`, the Open Inference Protocol's text-in view of `sentiment`).

The export (training.export) writes these models and the service reads them, so a missing
or ill-typed field stops the server at start-up with the model and the field named, instead
of failing a request later.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST = "manifest.json"
NAME = r"^[a-z][a-z0-9_-]{0,62}$"  # model and family names: also URL path segments
VERSION = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class MetadataError(ValueError):
    """A manifest or metadata file is missing, unreadable or does not match its type."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Open(BaseModel):
    """Free-form blocks written by training (config, metrics): kept, not interpreted."""

    model_config = ConfigDict(extra="allow", frozen=True)


class TensorSpec(_Strict):
    name: str
    dtype: Literal["float32", "int64", "uint8"]
    shape: list[int | str]  # a string is a variable dimension ("batch", "seq")


class Training(_Open):
    command: str
    seed: int
    epochs: int
    seconds: float
    date: str


class Calibration(_Strict):
    """Temperature scaling fitted on the validation split: probabilities = softmax(logits / T)."""

    temperature: float = Field(gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # the training's smoothing, inverted before T (service.ood)
    fitted_on: str
    ece_test_before: float | None = None
    ece_test_after: float | None = None


class ImageOOD(_Strict):
    """An out-of-distribution score computed by the ONNX graph itself (an extra output)."""

    method: str
    output: str = "ood_score"
    threshold: float
    validation_pass_rate: float = Field(ge=0, le=1)
    baseline_ood_rate: float = Field(ge=0, le=1)
    auroc: dict[str, float] = {}
    false_accept_rate: dict[str, float] = {}
    false_reject_rate_test: float | None = None


class TextOOD(_Strict):
    """Texts whose share of unknown tokens is above the validation split's 95th percentile."""

    method: Literal["unknown_token_rate"] = "unknown_token_rate"
    threshold: float = Field(ge=0, le=1)
    baseline_ood_rate: float = Field(ge=0, le=1)


class Smoke(_Strict):
    """Golden inputs and outputs stored beside the model, checked before a version is served."""

    file: str
    sha256: str
    atol: float = Field(gt=0)


class _Meta(_Strict):
    name: str = Field(pattern=NAME)
    family: str = Field(pattern=NAME)
    version: str = Field(pattern=VERSION)
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    training: Training
    metrics: dict[str, Any] = {}
    parity: dict[str, Any] = {}
    versions: dict[str, str] = {}
    size_bytes: int = Field(gt=0)
    meets_bars: bool = True  # False: published below its quality bars (make publish rehearsals)
    smoke: Smoke | None = None


class ImagePre(_Strict):
    kind: Literal["image"]
    size: Literal[28]
    scale: Literal["pixels/255"]
    invert: Literal["none", "always", "auto"]
    # how an upload of another size is framed (service.preprocessing.to_grey_square); models
    # exported before framing have none and keep the whole-picture rule they were trained with
    framing: Literal["none", "digit", "garment"] = "none"
    mean: float | None = None
    std: float | None = Field(None, gt=0)


class ClassifierPre(ImagePre):
    mean: float
    std: float = Field(gt=0)


class TextPre(_Strict):
    kind: Literal["text"]
    tokenizer: str
    lowercase: bool
    max_tokens: int = Field(ge=1, le=4096)
    pad_id: int
    unk_id: int
    truncation: str


class LatentPre(_Strict):
    kind: Literal["latent"]
    z_dim: int = Field(ge=1)
    distribution: str
    sampler: str
    output_range: list[float]


class CodePre(_Strict):
    kind: Literal["latent-code"]


class Codec(_Strict):
    latent_dim: int = Field(ge=1)
    bits: int = Field(ge=1, le=8)
    bytes: int = Field(ge=1)
    packing: str

    @model_validator(mode="after")
    def _size(self):
        if self.bytes != (self.latent_dim * self.bits + 7) // 8:
            raise ValueError(f"bytes {self.bytes} != ceil(latent_dim × bits / 8)")
        return self


class ImageClassifierMeta(_Meta):
    task: Literal["image-classification"]
    preprocessing: ClassifierPre
    labels: list[str] = Field(min_length=2)
    calibration: Calibration | None = None
    ood: ImageOOD | None = None


class TextClassifierMeta(_Meta):
    task: Literal["text-classification"]
    preprocessing: TextPre
    labels: list[str] = Field(min_length=2)
    vocabulary: list[str] = Field(min_length=2)
    calibration: Calibration | None = None
    ood: TextOOD | None = None


class GeneratorMeta(_Meta):
    task: Literal["conditional-image-generation"]
    preprocessing: LatentPre
    labels: list[str] = Field(min_length=1)


class EncoderMeta(_Meta):
    task: Literal["image-compression-encoder"]
    preprocessing: ImagePre
    codec: Codec
    pair: str


class DecoderMeta(_Meta):
    task: Literal["image-compression-decoder"]
    preprocessing: CodePre
    codec: Codec
    pair: str


class DenoiserMeta(_Meta):
    task: Literal["image-denoising"]
    preprocessing: ImagePre
    noise: dict[str, Any] = {}


Metadata = Annotated[
    ImageClassifierMeta | TextClassifierMeta | GeneratorMeta | EncoderMeta | DecoderMeta | DenoiserMeta,
    Field(discriminator="task"),
]
TASK_NAMES = tuple(m.model_fields["task"].annotation.__args__[0] for m in Metadata.__origin__.__args__)


class _MetaHolder(BaseModel):
    meta: Metadata


# --------------------------------------------------------------------------- the manifest


class VersionFiles(_Strict):
    """One model at one version: paths relative to the model directory."""

    file: str
    metadata: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ModelEntry(_Strict):
    task: str
    family: str = Field(pattern=NAME)
    versions: dict[str, VersionFiles] = Field(min_length=1)


class RolloutPolicy(_Strict):
    """When a rollout decides by itself (service.rollout): once `min_requests` requests were
    compared (shadow) or served by the candidate (canary), it promotes the candidate if every
    limit holds and rolls back otherwise."""

    min_requests: int = Field(200, ge=1, le=10_000_000)
    min_agreement: float = Field(0.95, ge=0.0, le=1.0)  # classifiers: share of rows with the same label
    min_psnr_db: float = Field(20.0, ge=0.0, le=100.0)  # images out: a row agrees at this PSNR between versions
    max_error_rate_increase: float = Field(0.01, ge=0.0, le=1.0)  # candidate's error rate minus the primary's
    max_latency_ratio: float = Field(2.0, gt=0.0, le=100.0)  # candidate's compute per row over the primary's
    # (2.0: shadow runs are small batches in leftover CPU: 1.8x measured for a same-architecture version)


class Rollout(_Strict):
    """A candidate version on live traffic: `shadow` of the family's requests mirrored to it,
    `canary` of its clients (sticky by client key) served by it."""

    id: str = Field(pattern=VERSION)
    candidate: str = Field(pattern=VERSION)
    shadow: float = Field(0.0, ge=0.0, le=1.0)
    canary: float = Field(0.0, ge=0.0, le=1.0)
    policy: RolloutPolicy | None = None  # None: an operator decides (promote / stop)
    state: Literal["running", "promoted", "rolled_back", "stopped"] = "running"
    started: float
    decided: float | None = None
    reason: str = ""
    evidence: dict[str, Any] | None = None


class FamilyEntry(_Strict):
    active: str = Field(pattern=VERSION)
    previous: str | None = None
    candidate: str | None = Field(None, pattern=VERSION)  # loaded by every worker, not serving unless a rollout says
    rollout: Rollout | None = None  # the running rollout, or the last one's decision
    models: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _rollout_has_candidate(self):
        r = self.rollout
        if r is not None and r.state == "running" and r.candidate != self.candidate:
            raise ValueError(
                f"rollout {r.id!r} runs candidate {r.candidate!r}, but the candidate is {self.candidate!r}"
            )
        if self.candidate is not None and self.candidate == self.active:
            raise ValueError(f"candidate {self.candidate!r} is the active version")
        return self


class Manifest(_Strict):
    """exported/manifest.json: the source of truth every worker follows.

    `families` says which version of each family is active (and which was, for rollback);
    `models` maps each model to its task, family and the files of every version on disk;
    `defaults` names the model a request gets for a task when it names none."""

    format: Literal[2] = 2
    defaults: dict[str, str] = {}
    families: dict[str, FamilyEntry]
    models: dict[str, ModelEntry]

    @model_validator(mode="after")
    def _consistent(self):
        for name, entry in self.models.items():
            if not re.match(NAME, name):
                raise ValueError(f"model name {name!r} must match {NAME}")
            if entry.task not in TASK_NAMES:
                raise ValueError(f"model {name!r}: unknown task {entry.task!r} (known: {', '.join(TASK_NAMES)})")
            fam = self.families.get(entry.family)
            if fam is None or name not in fam.models:
                raise ValueError(f"model {name!r}: family {entry.family!r} does not list it")
            for v in (fam.active, fam.previous, fam.candidate):
                if v is not None and v not in entry.versions:
                    raise ValueError(f"model {name!r}: family {entry.family!r} names version {v!r}, which it lacks")
        for fname, fam in self.families.items():
            for m in fam.models:
                if m not in self.models:
                    raise ValueError(f"family {fname!r} lists model {m!r}, which has no entry")
        for task, name in self.defaults.items():
            if name not in self.models or self.models[name].task != task:
                raise ValueError(f"default for task {task!r} is {name!r}, which is not a model of that task")
        return self

    def default_for(self, task: str) -> str | None:
        """The model a request for `task` gets: the named default, else the only one."""
        if task in self.defaults:
            return self.defaults[task]
        names = [n for n, m in self.models.items() if m.task == task]
        return names[0] if len(names) == 1 else None

    def family_versions(self, family: str) -> list[str]:
        """Every version of a family present for all its models, oldest name first."""
        fam = self.families[family]
        common = set.intersection(*(set(self.models[m].versions) for m in fam.models))
        return sorted(common)


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.is_file():
        raise MetadataError(f"{path} is missing: no models to serve")
    return parse_manifest(path.read_bytes(), path)


def parse_manifest(raw: bytes, path: Path) -> Manifest:
    """The manifest from bytes already read (`path` names it in errors)."""
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise MetadataError(f"{path}: {describe(exc)}") from None


def read_metadata(path: Path, model: str) -> Metadata:
    """One model's metadata, validated against its task's type."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise MetadataError(f"model {model!r}: metadata {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetadataError(f"model {model!r}: metadata {path} is not valid JSON ({exc})") from None
    try:
        return _MetaHolder(meta=raw).meta
    except ValidationError as exc:
        raise MetadataError(f"model {model!r}: metadata {path.name}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """Pydantic's errors as `field a.b: message; ...`, naming every bad field."""
    parts = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err["loc"] if p != "meta")
        # a discriminated union reports the branch (e.g. 'image-classification') first: drop it
        loc = re.sub(r"^(" + "|".join(map(re.escape, TASK_NAMES)) + r")\.?", "", loc) or "(root)"
        parts.append(f"field {loc!r}: {err['msg']}")
    return "; ".join(parts)
