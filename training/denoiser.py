"""`denoiser`: a small U-Net that removes Gaussian noise (σ drawn from 0.1–0.6, clipped)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service import preprocessing as pp
from training import common, data
from training.export import ExportSpec


@dataclass
class Config:
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 16  # channels at 28×28; doubled at 14×14 and 7×7
    sigma_min: float = 0.1
    sigma_max: float = 0.6
    n_val: int = 2000
    seed: int = 0
    dry_run: bool = False
    data_dir: str = ""
    download: bool = False
    out: str = ""


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU()
    )


class UNet(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        w = cfg.width
        self.enc1, self.enc2 = _double_conv(1, w), _double_conv(w, 2 * w)
        self.mid = _double_conv(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), _double_conv(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, 2), _double_conv(2 * w, w)
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # image: (B, 1, 28, 28) noisy in [0, 1] -> (B, 1, 28, 28) clean estimate in [0, 1]
        e1 = self.enc1(image)  # (B, w, 28, 28)
        e2 = self.enc2(F.max_pool2d(e1, 2))  # (B, 2w, 14, 14)
        m = self.mid(F.max_pool2d(e2, 2))  # (B, 4w, 7, 7)
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))  # (B, 2w, 14, 14)
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))  # (B, w, 28, 28)
        return (image + self.out(d1)).clamp(0, 1)  # predict the correction (residual)


def noisy_batch(x: np.ndarray, cfg: Config, rng: np.random.Generator) -> np.ndarray:
    """Each image gets its own σ ~ U(sigma_min, sigma_max)."""
    sigma = rng.uniform(cfg.sigma_min, cfg.sigma_max, size=(len(x), 1, 1, 1)).astype(np.float32)
    noise = rng.standard_normal(x.shape, dtype=np.float32) * sigma
    return np.clip(x + noise, 0, 1).astype(np.float32)


def train(cfg: Config, family: str) -> common.Trained:
    """Train on MNIST train minus validation; keep the best validation PSNR at σ=0.3; export."""
    common.set_seed(cfg.seed)
    data_dir = data.resolve_data_dir(cfg.data_dir)
    images, _ = data.load_images("mnist", "train", data_dir, cfg.download)
    x_all = pp.scale_pixels(images)[:, None]
    tr, va = data.split_indices(len(x_all), cfg.n_val, cfg.seed)
    x_tr, x_va = x_all[tr], x_all[va][: 256 if cfg.dry_run else None]
    noisy_va = pp.add_gaussian_noise(x_va, 0.3, np.random.default_rng(cfg.seed + 1))
    model = UNet(cfg)
    epochs = 1 if cfg.dry_run else cfg.epochs
    steps = epochs * (1 if cfg.dry_run else -(-len(tr) // cfg.batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    rng = np.random.default_rng(cfg.seed)
    progress, best = common.Progress(family, epochs), (-1.0, None)
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for idx in common.minibatches(len(tr), cfg.batch_size, rng, 1 if cfg.dry_run else None):
            clean = x_tr[idx]
            out = model(torch.from_numpy(noisy_batch(clean, cfg, rng)))
            loss = F.mse_loss(out, torch.from_numpy(clean))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            val_psnr = float(pp.psnr(x_va, model(torch.from_numpy(noisy_va)).numpy()).mean())
        progress.epoch(epoch, loss=float(np.mean(losses)), val_psnr_s03=val_psnr)
        if val_psnr > best[0]:
            best = (val_psnr, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    model.eval()

    common.save_checkpoint(common.RUNS / family / "model.pt", model, cfg)
    test_images, _ = data.load_images("mnist", "test", data_dir, cfg.download)
    x_test = pp.add_gaussian_noise(pp.scale_pixels(test_images[:64])[:, None], 0.4, np.random.default_rng(0))
    training_meta = common.training_meta(
        family,
        cfg,
        epochs,
        progress.seconds,
        "MNIST + synthetic Gaussian noise",
        data.dataset_checksums("mnist"),
        best={"best_val_psnr_sigma_0.3": best[0]},
    )
    spec = ExportSpec(
        name=family,
        task="image-denoising",
        inputs={"image": x_test},
        outputs=["image_out"],
        dynamic_axes={},
        extra={"noise": {"kind": "gaussian", "sigma_range": [cfg.sigma_min, cfg.sigma_max], "clipped": [0, 1]}},
        preprocessing={"kind": "image", "size": pp.IMAGE_SIZE, "scale": "pixels/255", "invert": "none"},
    )
    return common.Trained([(model, spec)], training_meta, progress.history)
