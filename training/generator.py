"""`generator`: a class-conditional DCGAN on MNIST (input: latent z + digit).

The discriminator scores (image, digit) pairs with a projection term and also classifies
the digit (an auxiliary head, as in AC-GAN); the generator is rewarded for both, which is
what makes "draw a 7" come out as a 7."""

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
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-4
    z_dim: int = 64
    embed_dim: int = 16
    ngf: int = 64  # generator width
    ndf: int = 32  # discriminator width
    aux_weight: float = 1.0
    seed: int = 0
    dry_run: bool = False
    data_dir: str = ""
    download: bool = False
    out: str = ""


class Generator(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        c = 2 * cfg.ngf
        self.embed = nn.Embedding(10, cfg.embed_dim)
        self.fc = nn.Sequential(
            nn.Linear(cfg.z_dim + cfg.embed_dim, c * 7 * 7, bias=False), nn.BatchNorm1d(c * 7 * 7), nn.ReLU()
        )
        self.net = nn.Sequential(
            nn.ConvTranspose2d(c, cfg.ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(cfg.ngf),
            nn.ReLU(),
            nn.ConvTranspose2d(cfg.ngf, 1, 4, 2, 1),
            nn.Tanh(),
        )
        self.channels = c

    def forward(self, z: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        # z: (B, z_dim), class_weights: (B, 10) (one-hot for a digit; blends in between)
        # -> images (B, 1, 28, 28) in [0, 1]. A product with the embedding table, not a
        # lookup, so the exported graph takes weights between classes (the playground's morph).
        h = self.fc(torch.cat([z, class_weights @ self.embed.weight], dim=1)).view(-1, self.channels, 7, 7)
        return (self.net(h) + 1) / 2


class Discriminator(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.ndf
        self.net = nn.Sequential(
            nn.Conv2d(1, d, 4, 2, 1),
            nn.LeakyReLU(0.2),  # 14×14
            nn.Conv2d(d, 2 * d, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * d),
            nn.LeakyReLU(0.2),  # 7×7
            nn.Flatten(),
        )
        feat = 2 * d * 7 * 7
        self.real = nn.Linear(feat, 1)
        self.project = nn.Embedding(10, feat)
        self.classify = nn.Linear(feat, 10)

    def forward(self, image: torch.Tensor, digit: torch.Tensor):
        # image (B, 1, 28, 28) in [0, 1] -> (realness logit (B,), digit logits (B, 10))
        f = self.net(image * 2 - 1)
        score = self.real(f).squeeze(1) + (self.project(digit) * f).sum(1) / f.shape[1] ** 0.5
        return score, self.classify(f)


def train(cfg: Config, family: str) -> common.Trained:
    """Adversarial training on all 60k MNIST train images (no labels are held out: the
    generator is judged by the `digits` classifier on fresh samples, not on a data split)."""
    common.set_seed(cfg.seed)
    data_dir = data.resolve_data_dir(cfg.data_dir)
    images, labels = data.load_images("mnist", "train", data_dir, cfg.download)
    x = torch.from_numpy(pp.scale_pixels(images)[:, None])
    y = torch.from_numpy(labels)
    G, D = Generator(cfg), Discriminator(cfg)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    epochs = 1 if cfg.dry_run else cfg.epochs
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    progress = common.Progress(family, epochs)
    for epoch in range(1, epochs + 1):
        G.train(), D.train()
        stats = []
        for idx in common.minibatches(len(x), cfg.batch_size, rng, 1 if cfg.dry_run else None):
            real, digit = x[idx], y[idx]
            z = torch.randn(len(idx), cfg.z_dim, generator=gen)
            fake_digit = torch.randint(0, 10, (len(idx),), generator=gen)
            fake = G(z, F.one_hot(fake_digit, 10).float())

            s_real, c_real = D(real, digit)
            s_fake, _ = D(fake.detach(), fake_digit)
            loss_d = (
                F.binary_cross_entropy_with_logits(s_real, torch.full_like(s_real, 0.9))
                + F.binary_cross_entropy_with_logits(s_fake, torch.zeros_like(s_fake))
                + cfg.aux_weight * F.cross_entropy(c_real, digit)
            )
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()

            s_fake, c_fake = D(fake, fake_digit)
            loss_g = F.binary_cross_entropy_with_logits(
                s_fake, torch.ones_like(s_fake)
            ) + cfg.aux_weight * F.cross_entropy(c_fake, fake_digit)
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            aux_acc = (c_fake.argmax(1) == fake_digit).float().mean().item()
            stats.append((loss_d.item(), loss_g.item(), aux_acc))
        loss_d, loss_g, aux_acc = np.mean(stats, axis=0)
        progress.epoch(epoch, loss_d=loss_d, loss_g=loss_g, fake_aux_acc=aux_acc)
    G.eval()

    common.save_checkpoint(common.RUNS / family / "model.pt", G, cfg)
    z, digits = pp.sample_latents(64, cfg.z_dim, seed=0)
    spec = ExportSpec(
        name=family,
        task="conditional-image-generation",
        inputs={"z": z, "class_weights": np.eye(10, dtype=np.float32)[digits]},
        outputs=["images"],
        dynamic_axes={},
        preprocessing={
            "kind": "latent",
            "z_dim": cfg.z_dim,
            "distribution": "standard normal",
            "sampler": "service.preprocessing.sample_latents",
            "output_range": [0, 1],
        },
        extra={"labels": data.DIGIT_LABELS},
    )
    training_meta = common.training_meta(
        family, cfg, epochs, progress.seconds, "MNIST (train)", data.dataset_checksums("mnist")
    )
    return common.Trained([(G, spec)], training_meta, progress.history)
