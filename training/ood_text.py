"""The trust step of the text classifier (training.ood has the method): the unknown-token
rate's threshold, fitted on the whole validation split the model was trained with, and the
temperature, fitted on its calibration half: whole training sentences the model never saw a
piece of and that did not pick the checkpoint (training.sentiment.validation_split)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service import ood as serve_ood
from service import preprocessing as pp
from service.runtime import sha256_file
from training import data
from training import ood_graph as graph
from training import ood_metrics as metrics
from training.families import FAMILIES
from training.ood_image import splits, trust_bars


def unknown_token_rates(texts: list[str], index: dict[str, int], max_tokens: int = pp.MAX_TOKENS) -> np.ndarray:
    """Per text: the share of its tokens that map to UNK, as the service encodes it (a text
    without tokens becomes [UNK], rate 1)."""
    return np.array(
        [serve_ood.unknown_token_rate(pp.encode(pp.tokenize(t), index, max_tokens) or [pp.UNK], pp.UNK) for t in texts]
    )


def sentiment_logits(sess: ort.InferenceSession, seqs: list[list[int]]) -> np.ndarray:
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = np.empty((len(seqs), 2), dtype=np.float32)
    for i in range(0, len(order), 64):
        chunk = order[i : i + 64]
        tokens, lengths = pp.pad_batch([seqs[j] for j in chunk])
        out[chunk] = sess.run(["logits"], {"tokens": tokens, "lengths": lengths})[0]
    return out


def build_sentiment(onnx_path: Path, meta: dict, data_dir: Path, out_dir: Path, pass_rate: float | None = None) -> dict:
    from training.sentiment import validation_split  # imports torch (the rest of the trust step does not)

    family = FAMILIES["sentiment"]
    pass_rate = family.trust.pass_rate if pass_rate is None else pass_rate
    n_val, seed = splits(family, meta)

    t_start = time.time()
    log = lambda msg: print(f"[sentiment {time.time() - t_start:6.1f}s] {msg}", flush=True)
    index = {tok: i for i, tok in enumerate(meta["vocabulary"])}
    max_tokens = meta["preprocessing"]["max_tokens"]
    sentences, labels = data.load_sst2("train", data_dir)
    dev, y_dev = data.load_sst2("dev", data_dir)
    kind = meta.get("training", {}).get("config", {}).get("split", "long")  # versions before the field: "long"
    _, select, cal_idx = validation_split(sentences, kind, n_val, seed)
    va = np.union1d(select, cal_idx)
    val = [sentences[i] for i in va]
    log(
        f"{onnx_path}: {len(val)} validation sentences ({kind} split, {len(cal_idx)} fit the temperature), {len(dev)} dev"
    )

    rates_val = unknown_token_rates(val, index, max_tokens)
    rates_dev = unknown_token_rates(dev, index, max_tokens)
    threshold = metrics.pick_threshold(rates_val, pass_rate)
    val_pass = float(np.mean(rates_val <= threshold))
    log(
        f"unknown-token rate: validation p95 {threshold:.4f} (mean {rates_val.mean():.4f}); "
        f"dev flagged {np.mean(rates_dev > threshold):.4f}"
    )

    sess = graph.session(onnx_path)
    enc = lambda texts: [pp.encode(pp.tokenize(t), index, max_tokens) or [pp.UNK] for t in texts]
    l_cal, l_dev = sentiment_logits(sess, enc([sentences[i] for i in cal_idx])), sentiment_logits(sess, enc(dev))
    log(f"dev accuracy {np.mean(l_dev.argmax(1) == y_dev):.4f}")
    fitted_on = (
        f"calibration half of the validation split ({len(cal_idx)} whole training sentences, held out with every "
        "phrase inside them, not used to pick the checkpoint)"
        if kind == "whole"
        else f"validation split ({len(cal_idx)} sentences)"
    )
    cal = metrics.calibration_report(
        l_cal,
        labels[cal_idx],
        l_dev,
        y_dev,
        0.0,
        fitted_on,
        out_dir / "sentiment_reliability.png",
        "sentiment",
        log,
    )
    return {
        "model": "sentiment",
        "source": {"file": str(onnx_path), "sha256": sha256_file(onnx_path)},
        "calibration": cal["metadata"],
        "ood": {"method": "unknown_token_rate", "threshold": threshold, "baseline_ood_rate": round(1.0 - val_pass, 5)},
        "evaluation": {
            "dev_accuracy": float(np.mean(l_dev.argmax(1) == y_dev)),
            "calibration": cal["evaluation"],
            "unknown_token_rate": {
                "validation_p95": threshold,
                "validation_mean": float(rates_val.mean()),
                "validation_pass_rate": val_pass,
                "dev_mean": float(rates_dev.mean()),
                "dev_flagged": float(np.mean(rates_dev > threshold)),
            },
            "bars": trust_bars(family, {"ece_dev": cal["evaluation"]["ece_test_after"]}),
            "seconds": round(time.time() - t_start, 1),
        },
    }
