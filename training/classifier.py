"""CNN image classifiers: `digits` (MNIST) and `fashion` (Fashion-MNIST)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service import preprocessing as pp
from training import common, data, wild
from training.export import ExportSpec


@dataclass
class Config:
    dataset: str = "mnist"  # mnist | fashion
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    width: int = 24  # channels of the first conv block; doubled per block
    dropout: float = 0.3
    shift: int = 2  # random translation of up to ±shift pixels
    hflip: bool = False  # Fashion-MNIST is left/right symmetric; digits are not
    label_smoothing: float = 0.05
    # robustness to what framing cannot remove (stroke width, blur, low resolution, slant, noise)
    augment: bool = False
    wild: int = 0  # training-split images rendered as uploads (training.wild) and framed as served
    n_val: int = 5000
    seed: int = 0
    dry_run: bool = False
    data_dir: str = ""
    download: bool = False
    out: str = ""


class CNN(nn.Module):
    """Three conv blocks (28 -> 14 -> 7 -> 3) and a two-layer head; input is normalised pixels."""

    def __init__(self, cfg: Config):
        super().__init__()
        w = cfg.width

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(1, w), block(w, 2 * w), block(2 * w, 4 * w))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
            nn.Linear(4 * w * 3 * 3, 256),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(256, 10),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # image: (B, 1, 28, 28) normalised -> logits (B, 10)
        return self.head(self.features(image))


def augment(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """Random translation (pad + crop) and optional horizontal flip, per batch of (B, 1, 28, 28)."""
    if cfg.shift:
        s = cfg.shift
        padded = F.pad(x, (s, s, s, s))
        dx, dy = torch.randint(0, 2 * s + 1, (2,), generator=gen).tolist()
        x = padded[:, :, dy : dy + 28, dx : dx + 28]
    if cfg.hflip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def _affine(x: torch.Tensor, gen: torch.Generator, rot: float, shear: float, scale: tuple[float, float]):
    """Per-image random rotation (±rot rad), shear and scale about the centre."""
    b = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=gen)
    a, sh, sc = u(-rot, rot), u(-shear, shear), u(*scale)
    cos, sin = torch.cos(a) / sc, torch.sin(a) / sc
    theta = torch.stack(
        [torch.stack([cos, -sin + sh, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def robust(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """What framing cannot remove, on [0, 1] pixels (B, 1, 28, 28): slant and size, stroke width,
    blur, resolution loss with few grey levels, sensor noise. Each image gets each with some
    probability; strokes are renormalised to full strength as the server's framing does."""
    b = x.shape[0]
    pick = lambda p: (torch.rand(b, generator=gen) < p)[:, None, None, None]
    digits = cfg.dataset == "mnist"
    x = torch.where(pick(0.5), _affine(x, gen, 0.26 if digits else 0.12, 0.3 if digits else 0.1, (0.85, 1.1)), x)
    if digits:
        thick = F.max_pool2d(x, 3, 1, 1)
        thin = -F.max_pool2d(-x, 3, 1, 1)
        x = torch.where(pick(0.2), thick, torch.where(pick(0.15), torch.maximum(thin, 0.4 * x), x))
    low = int(torch.randint(8, 17 if digits else 21, (1,), generator=gen))
    levels = float(torch.randint(2, 7, (1,), generator=gen))
    small = F.interpolate(x, size=(low, low), mode="area")
    small = torch.where(pick(0.5), torch.round(small * (levels - 1)) / (levels - 1), small)
    x = torch.where(pick(0.25), F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False), x)
    x = torch.where(pick(0.15), F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1), x)
    peak = x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    x = torch.where(pick(0.5 if digits else 0.0), (x / peak).clamp(0, 1), x)
    noise = torch.randn(x.shape, generator=gen) * 0.08
    return torch.where(pick(0.1), (x + noise).clamp(0, 1), x)


def train(cfg: Config, family: str) -> common.Trained:
    """Train on train minus a validation split, keep the best epoch, export, evaluate on test."""
    common.set_seed(cfg.seed)
    data_dir = data.resolve_data_dir(cfg.data_dir)
    images, labels = data.load_images(cfg.dataset, "train", data_dir, cfg.download)
    x_all = pp.scale_pixels(images)
    mean, std = float(x_all.mean()), float(x_all.std())
    tr, va = data.split_indices(len(x_all), cfg.n_val, cfg.seed)
    x_tr, y_tr = x_all[tr][:, None], labels[tr]  # (N, 1, 28, 28) pixels in [0, 1]
    if cfg.wild:
        n = 64 if cfg.dry_run else cfg.wild
        wild_x, wild_y = training_wild(cfg, images[tr], labels[tr], n)
        x_tr, y_tr = np.concatenate([x_tr, pp.scale_pixels(wild_x)[:, None]]), np.concatenate([y_tr, wild_y])
    x_tr, y_tr = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    x_va = torch.from_numpy(pp.normalize(x_all[va], mean, std)[:, None])
    y_va = torch.from_numpy(labels[va])
    norm = lambda x: (x - mean) / std

    model = CNN(cfg)
    epochs = 1 if cfg.dry_run else cfg.epochs
    limit = 1 if cfg.dry_run else None
    steps = epochs * (1 if cfg.dry_run else -(-len(x_tr) // cfg.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    progress, best = common.Progress(family, epochs), (-1.0, None)
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for idx in common.minibatches(len(x_tr), cfg.batch_size, rng, limit):
            batch = x_tr[idx]
            if cfg.augment:
                batch = robust(batch, cfg, gen)
            logits = model(norm(augment(batch, cfg, gen)))
            loss = F.cross_entropy(logits, y_tr[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        val_acc = accuracy(model, x_va[: 256 if cfg.dry_run else None], y_va[: 256 if cfg.dry_run else None])
        progress.epoch(epoch, loss=float(np.mean(losses)), val_acc=val_acc)
        if val_acc > best[0]:
            best = (val_acc, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    model.eval()

    common.save_checkpoint(common.RUNS / family / "model.pt", model, cfg)
    labels_out = data.DIGIT_LABELS if cfg.dataset == "mnist" else data.FASHION_LABELS
    test_images, _ = data.load_images(cfg.dataset, "test", data_dir, cfg.download)
    spec = ExportSpec(
        name=family,
        task="image-classification",
        inputs={"image": pp.normalize(pp.scale_pixels(test_images[:64]), mean, std)[:, None]},
        outputs=["logits"],
        dynamic_axes={},
        preprocessing={
            "kind": "image",
            "size": pp.IMAGE_SIZE,
            "scale": "pixels/255",
            "mean": mean,
            "std": std,
            "invert": "auto",
            "framing": FRAMING[cfg.dataset],
        },
        extra={"labels": labels_out},
    )
    training_meta = common.training_meta(
        family,
        cfg,
        epochs,
        progress.seconds,
        "MNIST" if cfg.dataset == "mnist" else "Fashion-MNIST",
        data.dataset_checksums(data.IMAGE_DATASETS[cfg.dataset]),
        best={"best_val_acc": best[0]},
    )
    return common.Trained([(model, spec)], training_meta, progress.history)


FRAMING = {"mnist": "digit", "fashion": "garment"}  # service.preprocessing: the dataset's own recipe
WILD_FAMILIES = {"mnist": wild.DIGIT_FAMILIES, "fashion": wild.GARMENT_FAMILIES}


def training_wild(cfg: Config, images: np.ndarray, labels: np.ndarray, n: int):
    """n renderings of the training split (never validation or test), framed as served; cached."""
    cache = None if cfg.dry_run else common.RUNS / "wild" / f"{cfg.dataset}-train-{n}-{cfg.seed}.npz"
    print(f"rendering {n} wild {cfg.dataset} training images ({', '.join(WILD_FAMILIES[cfg.dataset])})", flush=True)
    return wild.framed_set(
        images, labels, WILD_FAMILIES[cfg.dataset], n, 10_000 + cfg.seed, FRAMING[cfg.dataset], cache
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean())
