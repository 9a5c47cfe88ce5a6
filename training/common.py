"""Helpers every training family shares: seeding, batching, progress, checkpoints, plots."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from training.families import command_for

REPO = Path(__file__).resolve().parent.parent
EXPORTED = REPO / "exported"
IMG_DIR = REPO / "docs" / "img"
RUNS = REPO / "runs"  # checkpoints and dry-run exports; git-ignored


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch; use every core for intra-op work."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))


def minibatches(n: int, batch_size: int, rng: np.random.Generator | None, limit: int | None = None):
    """Index arrays covering range(n), shuffled when rng is given; at most `limit` batches."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for count, start in enumerate(range(0, n, batch_size)):
        if limit is not None and count >= limit:
            return
        yield order[start : start + batch_size]


class Progress:
    """Per-epoch progress lines: `family epoch 3/8 loss 0.0312 val_acc 0.9912 (27.3 s)`."""

    def __init__(self, family: str, epochs: int):
        self.family, self.epochs, self.history = family, epochs, []
        self._t0 = time.perf_counter()

    def epoch(self, epoch: int, **metrics: float) -> None:
        elapsed = time.perf_counter() - self._t0
        self.history.append({"epoch": epoch, "seconds": round(elapsed, 1), **metrics})
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"{self.family} epoch {epoch}/{self.epochs}  {shown}  ({elapsed:.1f} s)", flush=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0


def save_checkpoint(path: Path, model: torch.nn.Module, cfg) -> None:
    """state_dict + config dataclass, never a pickled module."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config": asdict(cfg)}, path)


def load_checkpoint(path: Path, model_cls, cfg_cls):
    """Rebuild a model from its checkpoint's config, then load its weights."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = cfg_cls(**ckpt["config"])
    model = model_cls(cfg)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), cfg


def out_dirs(cfg) -> tuple[Path, Path]:
    """(export dir, picture dir): the repo's exported/ and docs/img/, or a scratch dir on dry runs."""
    if cfg.dry_run:
        scratch = Path(cfg.out or RUNS / "dry-run")
        return scratch, scratch / "img"
    return Path(cfg.out or EXPORTED), IMG_DIR


def training_command(family: str, cfg) -> str:
    """The command line that reproduces this run (non-default flags only)."""
    return command_for(family, cfg)


def training_meta(family: str, cfg, epochs: int, seconds: float, dataset: str, files: dict, best: dict | None = None):
    """The `training` block of a model's metadata: how to reproduce the run, what it read."""
    return {
        "command": training_command(family, cfg),
        "seed": cfg.seed,
        "epochs": epochs,
        **(best or {}),
        "seconds": round(seconds, 1),
        "date": today(),
        "config": vars(cfg) | {"data_dir": ""},
        "dataset": {"name": dataset, "files": files},
    }


@dataclass
class Trained:
    """What a family's `train` hands back: the modules to export with their specs, the
    training metadata, and the per-epoch history (for the curves)."""

    parts: list  # [(torch.nn.Module, training.export.ExportSpec)]
    training: dict
    history: list[dict]


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Training curves: every metric in the history against the epoch, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[0] if k not in ("epoch", "seconds")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, key in zip(axes[0], keys):
        ax.plot(epochs, [h[key] for h in history], marker="o")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def today() -> str:
    import datetime

    return datetime.date.today().isoformat()


def write_json(path: Path, payload: dict) -> None:
    """Pretty JSON with a trailing newline (stable diffs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
