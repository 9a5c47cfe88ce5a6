"""Every deepserve setting, read from `DEEPSERVE_*` environment variables in one place.

The README's settings table is generated from this class (`python -m service.settings`),
so the two cannot disagree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_", extra="forbid")

    exported_dir: Path = Field(REPO / "exported", description="folder with manifest.json and the ONNX models")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when it really loads, else CPU; cuda: fail if it does not")
    workers: int = Field(1, ge=1, le=64, description="BentoML worker processes")
    threads: int = Field(0, ge=0, le=64, description="ONNX Runtime intra-op threads per session; 0 = cores / workers")
    batching: bool = Field(True, description="adaptive batching on every model path (off: one request per ONNX run)")
    max_batch_size: int = Field(64, ge=2, le=1024, description="most requests merged into one ONNX run")
    max_latency_ms: int = Field(2000, ge=10, le=60000, description="batcher sheds (503) requests it predicts will wait longer")
    max_batch_rows: int = Field(512, ge=1, le=8192, description="most rows (images, texts) per ONNX run; larger batches are split")
    request_timeout_s: float = Field(30.0, gt=0, le=600, description="a request still running after this gets 504")
    max_concurrency: int = Field(128, ge=1, le=100000, description="model requests in flight per worker; more are answered 503 at once")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_image_pixels: int = Field(16_000_000, ge=784, description="larger images (width × height, read from the header) get 413")
    max_images: int = Field(64, ge=1, le=1024, description="most images in one /classify request")
    max_texts: int = Field(64, ge=1, le=1024, description="most texts in one /classify request")
    max_text_chars: int = Field(20_000, ge=1, description="longer texts get 413; texts are tokenized then cut to the model's max_tokens")
    max_generate: int = Field(64, ge=1, le=1024, description="largest n for /generate")
    api_key: str = Field("", description="if set, every model endpoint needs header `Authorization: Bearer <key>` or `X-API-Key`")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty = CORS off")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="deepserve's own log level")
    access_log: bool = Field(False, description="BentoML's per-request access log lines (off: they cost throughput; metrics count every request)")

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
    """Cores this process may run on (its CPU affinity: taskset, cpusets), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def settings_table() -> str:
    """The README's settings table, as Markdown."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if name == "exported_dir":
            default = "exported/ (in the repo)"
        rows.append(f"| `DEEPSERVE_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
