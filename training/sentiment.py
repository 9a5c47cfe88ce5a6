"""`sentiment`: a BiLSTM trained from scratch on GLUE SST-2 (dev is the reported test set)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service import preprocessing as pp
from training import common, data
from training.export import ExportSpec

LABELS = ["negative", "positive"]


@dataclass
class Config:
    epochs: int = 7
    batch_size: int = 64
    lr: float = 2e-3
    emb_dim: int = 128
    hidden: int = 128
    dropout: float = 0.5
    min_freq: int = 2
    vocab_size: int = 0  # set from the training split; stored so the checkpoint rebuilds the model
    # validation: n_val whole training sentences and every phrase inside them held out (split="whole");
    # the first half picks the checkpoint, the second fits the temperature (training.ood_text).
    # "long" is the split of versions before 2026-11-30 (one set of long rows, some inside trained sentences)
    n_val: int = 1600
    split: str = "whole"
    seed: int = 0
    dry_run: bool = False
    data_dir: str = ""
    download: bool = False
    out: str = ""


class BiLSTM(nn.Module):
    """Embedding -> forward and backward LSTMs -> max+mean pooling over real tokens -> logits.

    The backward pass reverses each sequence within its own length (a gather), so padding
    never reaches a real token's state: a sentence scores the same alone or in any batch.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.emb_dim, padding_idx=pp.PAD)
        self.fwd = nn.LSTM(cfg.emb_dim, cfg.hidden, batch_first=True)
        self.bwd = nn.LSTM(cfg.emb_dim, cfg.hidden, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(4 * cfg.hidden, len(LABELS))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # tokens: (B, T) int64, lengths: (B,) int64 with 1 <= length <= T -> logits (B, 2)
        pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :]  # (1, T)
        mask = pos < lengths[:, None]  # (B, T)
        rev = torch.where(mask, lengths[:, None] - 1 - pos, pos)  # (B, T), its own inverse
        x = self.drop(self.embed(tokens))  # (B, T, E)
        h_fwd, _ = self.fwd(x)  # (B, T, H)
        x_rev = torch.gather(x, 1, rev[:, :, None].expand(-1, -1, x.shape[2]))
        h_bwd, _ = self.bwd(x_rev)
        h_bwd = torch.gather(h_bwd, 1, rev[:, :, None].expand(-1, -1, h_bwd.shape[2]))
        h = torch.cat([h_fwd, h_bwd], dim=2)  # (B, T, 2H)
        m = mask[:, :, None]
        h_max = h.masked_fill(~m, -1e4).amax(dim=1)  # (B, 2H)
        h_mean = (h * m).sum(dim=1) / lengths[:, None].to(h.dtype)  # (B, 2H)
        return self.head(self.drop(torch.cat([h_max, h_mean], dim=1)))


def bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Shuffled batches of similar length (less padding, faster epochs)."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sentence_split(sentences: list[str], n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The "long" split of versions before 2026-11-30, kept so their trust step can be refitted:
    validation holds long rows (>= 12 tokens) and every training phrase inside them is dropped.
    69% of those rows sit inside a longer row that stays in training (SST-2 train holds each
    sentence with its sub-phrases), so validation scored 87.8% where dev scores 83.5% and its
    temperature (1.80) was too low for dev."""
    tokens = [s.split() for s in sentences]
    long_ = np.flatnonzero(np.array([len(t) for t in tokens]) >= 12)
    val = np.sort(np.random.default_rng(seed).permutation(long_)[:n_val])
    return _without_phrases_of(tokens, val), val


def whole_sentence_split(sentences: list[str], n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, select, calibrate), shaped like dev: validation is n_val whole sentences (the
    6,885 rows that sit inside no other row; their lengths match dev's) and every row inside
    one of them leaves training, so the model never sees a piece of a validation sentence,
    as with dev. The first half picks the checkpoint, the second fits the temperature."""
    tokens = [tuple(s.split()) for s in sentences]
    rows = set(tokens)
    spans = ((t, a, b) for t in tokens for a in range(len(t)) for b in range(a + 1, len(t) + 1) if b - a < len(t))
    inner = {t[a:b] for t, a, b in spans if t[a:b] in rows}  # rows inside a longer row
    whole = np.array([i for i, t in enumerate(tokens) if t not in inner], dtype=np.int64)
    val = np.random.default_rng(seed).permutation(whole)[:n_val]
    half = len(val) // 2
    return _without_phrases_of(tokens, val), np.sort(val[:half]), np.sort(val[half:])


def validation_split(sentences: list[str], kind: str, n_val: int, seed: int):
    """(train, select, calibrate) of a split kind ("whole", or "long" where one set does both)."""
    if kind == "whole":
        return whole_sentence_split(sentences, n_val, seed)
    if kind == "long":
        train, val = sentence_split(sentences, n_val, seed)
        return train, val, val
    raise ValueError(f"unknown sentiment split {kind!r} (whole, long)")


def _without_phrases_of(tokens: list, val: np.ndarray) -> np.ndarray:
    """Indices of the rows that are not a phrase (contiguous tokens) of a validation row."""
    inside = set()
    for i in val:
        t = tuple(tokens[i])
        inside.update(t[a:b] for a in range(len(t)) for b in range(a + 1, len(t) + 1))
    return np.array([i for i, t in enumerate(tokens) if tuple(t) not in inside], dtype=np.int64)


def encode_all(sentences: list[str], index: dict[str, int]) -> list[list[int]]:
    return [pp.encode(pp.tokenize(s), index) or [pp.UNK] for s in sentences]


def evaluate(model: nn.Module, seqs: list[list[int]], labels: np.ndarray) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(seqs), 256):
            tokens, lengths = pp.pad_batch(seqs[i : i + 256])
            pred = model(torch.from_numpy(tokens), torch.from_numpy(lengths)).argmax(1).numpy()
            correct += int((pred == labels[i : i + 256]).sum())
    return correct / len(seqs)


def train(cfg: Config, family: str) -> common.Trained:
    """Train on SST-2 train minus a validation split; keep the best epoch; export; evaluate on dev."""
    common.set_seed(cfg.seed)
    data_dir = data.resolve_data_dir(cfg.data_dir)
    sentences, labels = data.load_sst2("train", data_dir, cfg.download)
    dev_sentences, _ = data.load_sst2("dev", data_dir, cfg.download)
    tr, va, cal = validation_split(sentences, cfg.split, cfg.n_val, cfg.seed)  # cal: training.ood_text
    vocab = pp.build_vocab((pp.tokenize(sentences[i]) for i in tr), cfg.min_freq)
    cfg.vocab_size = len(vocab)
    index = {tok: i for i, tok in enumerate(vocab)}
    seqs = encode_all(sentences, index)
    seq_tr, y_tr = [seqs[i] for i in tr], labels[tr]
    seq_va, y_va = [seqs[i] for i in va], labels[va]
    lengths_tr = np.array([len(s) for s in seq_tr])
    print(
        f"sentiment: vocabulary {len(vocab)} tokens, {len(tr)} train / {len(va)} validation (checkpoint) / "
        f"{len(cal)} calibration ({cfg.split} split)",
        flush=True,
    )

    model = BiLSTM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    epochs = 1 if cfg.dry_run else cfg.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)  # stepped per epoch
    rng = np.random.default_rng(cfg.seed)
    progress, best = common.Progress(family, epochs), (-1.0, None)
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        batches = bucketed_batches(lengths_tr, cfg.batch_size, rng)
        for idx in batches[:1] if cfg.dry_run else batches:
            tokens, lengths = pp.pad_batch([seq_tr[i] for i in idx])
            logits = model(torch.from_numpy(tokens), torch.from_numpy(lengths))
            loss = F.cross_entropy(logits, torch.from_numpy(y_tr[idx]))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            losses.append(loss.item())
        sched.step()
        n_eval = 256 if cfg.dry_run else None
        val_acc = evaluate(model, seq_va[:n_eval], y_va[:n_eval])
        progress.epoch(epoch, loss=float(np.mean(losses)), val_acc=val_acc)
        if val_acc > best[0]:
            best = (val_acc, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    model.eval()

    common.save_checkpoint(common.RUNS / family / "model.pt", model, cfg)
    tokens, lengths = pp.pad_batch(encode_all(dev_sentences[:64], index))
    spec = ExportSpec(
        name=family,
        task="text-classification",
        inputs={"tokens": tokens, "lengths": lengths},
        outputs=["logits"],
        dynamic_axes={"tokens": {1: "seq"}},
        preprocessing={
            "kind": "text",
            "tokenizer": "service.preprocessing.tokenize",
            "lowercase": True,
            "max_tokens": pp.MAX_TOKENS,
            "pad_id": pp.PAD,
            "unk_id": pp.UNK,
            "truncation": "first max_tokens tokens are kept",
        },
        extra={"labels": LABELS, "vocabulary": vocab},
    )
    training_meta = common.training_meta(
        family,
        cfg,
        epochs,
        progress.seconds,
        "GLUE SST-2 (train; dev is the reported test set)",
        data.dataset_checksums("sst2"),
        best={"best_val_acc": best[0]},
    )
    return common.Trained([(model, spec)], training_meta, progress.history)
