"""Every deepserve setting, read from `DEEPSERVE_*` environment variables in one place.

The README's settings table is generated from this class (`python -m service.settings`),
so the two cannot disagree.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_", extra="forbid")

    exported_dir: Path = Field(REPO / "exported", description="folder with manifest.json and the ONNX models")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when it really loads, else CPU; cuda: fail if it does not"
    )
    workers: int = Field(1, ge=1, le=64, description="BentoML worker processes")
    threads: int = Field(0, ge=0, le=64, description="ONNX Runtime intra-op threads per session; 0 = cores / workers")
    batching: bool = Field(True, description="adaptive batching on every model path (off: one request per ONNX run)")
    max_batch_size: int = Field(64, ge=2, le=1024, description="most requests merged into one ONNX run")
    max_latency_ms: int = Field(
        2000, ge=10, le=60000, description="batcher sheds (503) requests it predicts will wait longer"
    )
    max_batch_rows: int = Field(
        512,
        ge=1,
        le=8192,
        description="most rows (images, texts) per batch and per ONNX run; a larger single request is split",
    )
    request_timeout_s: float = Field(30.0, gt=0, le=600, description="a request still running after this gets 504")
    max_concurrency: int = Field(
        128,
        ge=1,
        le=100000,
        description="model requests in flight per worker; past it a request waits for a slot until SHED_HOLD_MS after it arrived, then 503",
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_image_pixels: int = Field(
        16_000_000, ge=784, description="larger images (width × height, read from the header) get 413"
    )
    max_request_pixels: int = Field(
        32_000_000,
        ge=784,
        description="most decoded pixels (all images of one request together, from their headers) before 413",
    )
    decode_threads: int = Field(
        0,
        ge=0,
        le=64,
        description="threads that decode large images off the event loop; 0 = the cores this process may use",
    )
    decode_backlog_pixels: int = Field(
        64_000_000, ge=784, description="pixels waiting for a decode thread, past which large-image requests get 503"
    )
    body_idle_timeout_s: float = Field(
        5.0, gt=0, le=600, description="a request body that makes no progress for this long gets 408"
    )
    body_min_rate: int = Field(
        1024,
        ge=0,
        description="bytes/s a request body must average after body_rate_grace_s, else 408 and the connection closes (0: off; nginx/Apache minrate)",
    )
    body_rate_grace_s: float = Field(
        5.0,
        ge=0,
        le=600,
        description="the time every body gets before body_min_rate applies (slow starts, TCP ramp-up)",
    )
    keep_alive_s: int = Field(
        65,
        ge=1,
        le=3600,
        description="idle keep-alive connections are closed after this; longer than clients' and load balancers' idle timeouts, so the server never closes a connection a client is about to reuse",
    )
    drain_quiet_s: float = Field(
        0.25,
        ge=0.0,
        le=60,
        description="on SIGTERM, the queue and the handlers must stay empty this long before the worker closes its connections",
    )
    drain_fresh_connection_s: float = Field(
        1.0,
        ge=0.0,
        le=60,
        description="while draining, a connection accepted with no request yet counts as busy this long (a client that has just reconnected is writing one)",
    )
    graceful_shutdown_s: int = Field(
        10,
        ge=1,
        le=600,
        description="after the drain, how long uvicorn waits for the last connections before closing them",
    )
    shed_hold_ms: int = Field(
        500,
        ge=0,
        le=5000,
        description="at capacity, a request waits for a slot (first come, first served) until this long after it arrived; no overload 503 leaves earlier: clients that retry at once cannot spin",
    )
    max_images: int = Field(64, ge=1, le=1024, description="most images in one /classify request")
    max_texts: int = Field(64, ge=1, le=1024, description="most texts in one /classify request")
    max_text_chars: int = Field(
        20_000, ge=1, description="longer texts get 413; texts are tokenized then cut to the model's max_tokens"
    )
    max_generate: int = Field(64, ge=1, le=1024, description="largest n for /generate")
    api_key: str = Field(
        "", description="if set, every model endpoint needs header `Authorization: Bearer <key>` or `X-API-Key`"
    )
    api_key_file: Path | None = Field(
        None,
        description="file holding the API key (a mounted Secret); wins over DEEPSERVE_API_KEY; surrounding whitespace is stripped",
    )
    admin_key: str = Field(
        "",
        description="if set, the admin API (/admin: load and roll back model versions) is on, with header `Authorization: Bearer <admin key>`; off (404) otherwise",
    )
    admin_key_file: Path | None = Field(
        None, description="file holding the admin key (a mounted Secret); wins over DEEPSERVE_ADMIN_KEY"
    )
    max_worker_starts: int = Field(
        5,
        ge=1,
        le=1000,
        description="a worker that fails to start this many times in a row stops the server (no silent crash loop behind an open port)",
    )
    manifest_poll_s: float = Field(
        0.5, gt=0, le=60, description="how often each worker checks the manifest for a new active version"
    )
    swap_timeout_s: float = Field(
        60.0,
        gt=0,
        le=600,
        description="how long an admin load or rollback waits for every worker before it answers 504",
    )
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty = CORS off")
    server_timing: bool = Field(
        True,
        description="Server-Timing headers on model answers and the deepserve_stage_seconds histogram (off: neither)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="deepserve's own log level")
    access_log: bool = Field(
        False,
        description="one log line per request (method, endpoint, status, milliseconds, request id); off: metrics count every request",
    )

    priority_max_wait_ms: int = Field(
        100,
        ge=1,
        le=60000,
        description="a batch-class batch waits at most this long for interactive work before it runs anyway (no starvation; service/priority.py)",
    )
    priority_chunk_rows: int = Field(
        64,
        ge=1,
        le=8192,
        description="most rows in one batch-class or shadow batch: lower-class work reaches the CPU in short runs",
    )
    shadow_max_wait_ms: int = Field(
        1000, ge=1, le=60000, description="a shadow request still queued after this is dropped (never run late)"
    )
    shadow_max_inflight: int = Field(
        16, ge=1, le=1024, description="most shadow requests in flight per worker; past it a mirror is dropped"
    )
    shadow_cpu_share: float = Field(
        0.05,
        gt=0,
        le=64,
        description="cores a worker's shadow work may use on average (model runs of mirrored requests): past it mirrors are dropped, so a 100% shadow is sampled down as load rises (service/priority.py)",
    )
    rollout_check_s: float = Field(
        1.0, gt=0, le=600, description="how often a worker saves its rollout tally and checks the rollout's policy"
    )

    @model_validator(mode="after")
    def _keys_from_files(self):
        """Keys from mounted Secrets or the environment, stripped the same way as the key a
        client sends; a key file that is missing or empty stops the server (fail closed)."""
        for name in ("api_key", "admin_key"):
            path = getattr(self, f"{name}_file")
            if path is not None:
                try:
                    object.__setattr__(self, name, path.read_text())
                except OSError as exc:
                    raise ValueError(f"{name}_file {path}: {exc.strerror}") from None
            object.__setattr__(self, name, getattr(self, name).strip())
            if path is not None and not getattr(self, name):
                raise ValueError(f"{name}_file {path} is empty")
        if self.admin_key and self.admin_key == self.api_key:
            raise ValueError("admin_key must differ from api_key")
        return self

    @field_validator("exported_dir")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        if not (v / "manifest.json").is_file():
            raise ValueError(f"{v} has no manifest.json")
        return v

    def ort_threads(self) -> int:
        """Intra-op threads for each ONNX session in this worker."""
        return self.threads or max(1, usable_cores() // self.workers)


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity (taskset, cpusets) capped by a cgroup CPU
    quota (a Kubernetes CPU limit, `docker run --cpus`), never the host's count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup CPU quota; None when unlimited. cgroup v2: cpu.max ("200000
    100000" -> 2.0); cgroup v1 (Docker on a v1 host): cpu.cfs_quota_us / cpu.cfs_period_us in
    the cpu controller's directory (-1: unlimited)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for controller in ("cpu", "cpu,cpuacct"):
        try:
            quota = int((root / controller / "cpu.cfs_quota_us").read_text())
            period = int((root / controller / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def settings_table() -> str:
    """The README's settings table, as Markdown."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if name == "exported_dir":
            default = "exported/ (in the repo)"
        if default is None:
            default = ""
        rows.append(f"| `DEEPSERVE_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
