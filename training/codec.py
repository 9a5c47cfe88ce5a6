"""`encoder` + `decoder`: a convolutional autoencoder compressor for 28×28 images.

The encoder's sigmoid latent is quantized to `bits` per value (service.preprocessing), so
a code is latent_dim * bits / 8 bytes: 32 × 4 bits = 16 bytes per image. Training adds
uniform quantization noise first, then switches to straight-through rounding, so the
decoder learns on exactly the values it will be given."""

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
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    latent_dim: int = 32
    bits: int = 4
    hard_from: float = 0.6  # fraction of training after which rounding is straight-through
    n_val: int = 5000
    seed: int = 0
    dry_run: bool = False
    data_dir: str = ""
    download: bool = False
    out: str = ""


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1),
            nn.ReLU(),  # 14×14
            nn.Conv2d(32, 64, 4, 2, 1),
            nn.ReLU(),  # 7×7
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 256),
            nn.ReLU(),
            # BatchNorm keeps every latent spread over the sigmoid's range: without it the
            # latents saturate at 1 within a few hundred steps and the codec collapses
            nn.Linear(256, cfg.latent_dim),
            nn.BatchNorm1d(cfg.latent_dim),
            nn.Sigmoid(),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # image: (B, 1, 28, 28) in [0, 1] -> latent (B, D) in [0, 1]
        return self.net(image)


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, 256), nn.ReLU(), nn.Linear(256, 64 * 7 * 7), nn.ReLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, 2, 1),
            nn.ReLU(),  # 14×14
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, 2, 1),
            nn.ReLU(),  # 28×28
            nn.Conv2d(16, 1, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        # latent: (B, D) dequantized, in [0, 1] -> image (B, 1, 28, 28) in [0, 1]
        return self.net(self.fc(latent).view(-1, 64, 7, 7))


def quantize_train(latent: torch.Tensor, bits: int, hard: bool) -> torch.Tensor:
    """Differentiable stand-in for pp.quantize -> pp.dequantize."""
    levels = (1 << bits) - 1
    if hard:  # straight-through: forward rounds exactly as the service does
        return latent + (torch.round(latent * levels) / levels - latent).detach()
    return (latent + (torch.rand_like(latent) - 0.5) / levels).clamp(0, 1)


def train(cfg: Config, family: str) -> common.Trained:
    """Train on MNIST train minus validation; keep the best validation PSNR; export both halves."""
    common.set_seed(cfg.seed)
    data_dir = data.resolve_data_dir(cfg.data_dir)
    images, _ = data.load_images("mnist", "train", data_dir, cfg.download)
    x_all = torch.from_numpy(pp.scale_pixels(images)[:, None])
    tr, va = data.split_indices(len(x_all), cfg.n_val, cfg.seed)
    x_tr, x_va = x_all[tr], x_all[va][: 256 if cfg.dry_run else None]
    enc, dec = Encoder(cfg), Decoder(cfg)
    params = list(enc.parameters()) + list(dec.parameters())
    epochs = 1 if cfg.dry_run else cfg.epochs
    steps = epochs * (1 if cfg.dry_run else -(-len(tr) // cfg.batch_size))
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    rng = np.random.default_rng(cfg.seed)
    progress, best = common.Progress(family, epochs), (-1.0, None)
    for epoch in range(1, epochs + 1):
        enc.train(), dec.train()
        hard = epoch > cfg.hard_from * epochs
        losses = []
        for idx in common.minibatches(len(tr), cfg.batch_size, rng, 1 if cfg.dry_run else None):
            x = x_tr[idx]
            loss = F.mse_loss(dec(quantize_train(enc(x), cfg.bits, hard)), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        val_psnr = validate(enc, dec, x_va, cfg.bits)
        progress.epoch(epoch, loss=float(np.mean(losses)), val_psnr=val_psnr)
        if hard and val_psnr > best[0] or best[1] is None:
            best = (val_psnr, [{k: v.clone() for k, v in m.state_dict().items()} for m in (enc, dec)])
    enc.load_state_dict(best[1][0]), dec.load_state_dict(best[1][1])
    enc.eval(), dec.eval()

    common.save_checkpoint(common.RUNS / family / "encoder.pt", enc, cfg)
    common.save_checkpoint(common.RUNS / family / "decoder.pt", dec, cfg)
    test_images, _ = data.load_images("mnist", "test", data_dir, cfg.download)
    x_test = pp.scale_pixels(test_images[:64])[:, None]
    with torch.no_grad():
        latent = enc(torch.from_numpy(x_test)).numpy()
    codec = {
        "latent_dim": cfg.latent_dim,
        "bits": cfg.bits,
        "bytes": pp.code_bytes(cfg.latent_dim, cfg.bits),
        "packing": "service.preprocessing.pack_codes (big-endian bit planes)",
    }
    training_meta = common.training_meta(
        family, cfg, epochs, progress.seconds, "MNIST", data.dataset_checksums("mnist"), best={"best_val_psnr": best[0]}
    )
    image_pre = {"kind": "image", "size": pp.IMAGE_SIZE, "scale": "pixels/255", "invert": "none"}
    enc_spec = ExportSpec(
        name="encoder",
        task="image-compression-encoder",
        inputs={"image": x_test},
        outputs=["latent"],
        dynamic_axes={},
        preprocessing=image_pre,
        extra={"codec": codec, "pair": "decoder"},
    )
    dec_spec = ExportSpec(
        name="decoder",
        task="image-compression-decoder",
        inputs={"latent": pp.dequantize(pp.quantize(latent, cfg.bits), cfg.bits)},
        outputs=["image"],
        dynamic_axes={},
        preprocessing={"kind": "latent-code"},
        extra={"codec": codec, "pair": "encoder"},
    )
    return common.Trained([(enc, enc_spec), (dec, dec_spec)], training_meta, progress.history)


def validate(enc: nn.Module, dec: nn.Module, x: torch.Tensor, bits: int) -> float:
    """Mean PSNR through the exact service quantization (numpy round trip)."""
    enc.eval(), dec.eval()
    with torch.no_grad():
        codes = pp.quantize(enc(x).numpy(), bits)
        recon = dec(torch.from_numpy(pp.dequantize(codes, bits))).numpy()
    return float(pp.psnr(x.numpy(), recon).mean())
