"""`make evaluate`: recompute every model's metrics from the exported ONNX files.

Runs each family's models through service.tasks (the serving code path) on the official
test sets, compares the codec and denoiser with classic baselines, checks the quality bars
(training.families), and writes into each evaluated version's metadata its `metrics`,
`meets_bars` and a smoke set (golden inputs and outputs the server checks before it serves
the version); then saves the pictures to docs/img/ and regenerates docs/models.md.

    python -m training.evaluate [--data-dir DIR] [--only digits codec ...] [--limit N]
    python -m training.evaluate --only digits --version 2026-11-23-0a1b2c3d   # a published candidate
    python -m training.evaluate --smoke-only                                  # smoke sets, no metrics
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from service import preprocessing as pp
from service import tasks
from service.core import load_family
from service.metadata import read_manifest
from service.runtime import sha256_file
from training import common, data, ood_sets, wild, wild_eval
from training import ood_metrics as metrics
from training.families import FAMILIES, check_bars
from training.model_card import write_model_card


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(images: np.ndarray, path: Path, cols: int, scale: int = 3) -> None:
    """(N, 28, 28) in [0, 1] -> an upscaled PNG grid."""
    g = Image.fromarray(pp.to_uint8(pp.grid(images, cols=cols)))
    path.parent.mkdir(parents=True, exist_ok=True)
    g.resize((g.width * scale, g.height * scale), Image.Resampling.NEAREST).save(path)


def eval_classifier(name: str, ctx: dict) -> dict:
    model = ctx["load"](name)
    images, labels = data.load_images(FAMILIES[model.family].dataset, "test", ctx["data_dir"])
    images, labels = images[: ctx["limit"]], labels[: ctx["limit"]]
    probs = tasks.run_in_chunks(lambda x: tasks.classify_images(model, x), pp.scale_pixels(images))
    pred = probs.argmax(1)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    plot_confusion(confusion, model.meta.labels, ctx["img_dir"] / f"{name}_confusion.png", name)
    trust = eval_image_trust(name, model, pp.scale_pixels(images), labels, ctx)
    return {
        **trust,
        **eval_wild(name, model, ctx),
        "test_accuracy": float((pred == labels).mean()),
        "test_examples": int(len(labels)),
        "per_class_accuracy": {
            lab: round(float(confusion[i, i] / max(1, confusion[i].sum())), 4)
            for i, lab in enumerate(model.meta.labels)
        },
    }


def eval_image_trust(name: str, model, x: np.ndarray, labels: np.ndarray, ctx: dict) -> dict:
    """Calibration (ECE before/after, reliability diagram) and the out-of-distribution table
    (AUROC and false accepts at the model's threshold), printed glyphs of held-out fonts and
    characters (training.ood_sets) for a family fitted on glyphs, from the exported ONNX file."""
    out = {}
    run = lambda imgs: tasks.run_in_chunks(lambda b: _outputs_rows(model, b), imgs)
    res = run(x)
    if model.meta.calibration is not None:
        logits = res[:, :-1] if model.meta.ood else res
        before, after = pp.softmax(logits), tasks.calibrated(model, logits)
        out["ece_test_before"], out["ece_test"] = metrics.ece(before, labels), metrics.ece(after, labels)
        metrics.reliability_diagram(
            before,
            after,
            labels,
            ctx["img_dir"] / f"{name}_reliability.png",
            f"{name}: reliability on the test set (T = {model.meta.calibration.temperature:.3f})",
        )
    if model.meta.ood is not None:
        threshold = model.meta.ood.threshold
        scores = {"test": res[:, -1]}
        for key, imgs in ood_sets.ood_sets(name, ctx["data_dir"]).items():
            scores[key] = run(imgs[: ctx["limit"]])[:, -1]
        for key, v in scores.items():
            if key != "test":
                out[f"auroc_{key}"] = metrics.auroc(scores["test"], v)
                out[f"false_accept_rate_{key}"] = metrics.false_accept_rate(v, threshold)
        out["false_reject_rate_test"] = metrics.false_reject_rate(scores["test"], threshold)
        if FAMILIES[model.family].trust.glyphs:
            glyphs = ood_sets.glyph_sets(model.meta.preprocessing, cache=ood_sets.glyph_cache())
            held = {k: v for k, v in glyphs.items() if k != "fit"}
            for key, imgs in held.items():
                out[f"glyphs_{key}_flagged"] = float(np.mean(run(imgs[: ctx["limit"]])[:, -1] > threshold))
            out["glyphs_held_out_flagged"] = min(out[f"glyphs_{k}_flagged"] for k in held)
            old = ctx.get("replaced", {}).get(name)
            if old is not None:  # the same glyphs through the version this one replaced
                old_run = lambda imgs: tasks.run_in_chunks(lambda b: _outputs_rows(old, b), imgs)[:, -1]
                letters = wild_eval.outlier_suites(name, ctx["data_dir"], min(ctx["limit"] or 1000, 1000))
                seen = wild_eval.served_inputs(old, letters["letters_symbols"])
                out["glyphs_replaced"] = {
                    "version": old.version,
                    "letters_symbols": float(np.mean(old_run(seen) > old.meta.ood.threshold)),
                    **{k: float(np.mean(old_run(v[: ctx["limit"]]) > old.meta.ood.threshold)) for k, v in held.items()},
                }
    return out


def eval_wild(name: str, model, ctx: dict) -> dict:
    """The wild suites (training.wild_eval) through the served preprocessing: this version, the
    previous one as it served them (its own rule), and the previous one with this framing (what
    framing alone gives); the most confident mistakes as the model saw them in a picture."""
    n = min(ctx["limit"] or 1000, 1000)
    now, seen = wild_eval.evaluate(model, name, ctx["data_dir"], n, keep=True)
    out = {"wild": now}
    if "letters_symbols" in now:
        out["wild_letters_symbols_flagged"] = now["letters_symbols"]["flagged"]
    previous = ctx.get("previous", {}).get(name)
    if previous is not None:
        out["wild_previous"] = {"version": previous.version, **wild_eval.evaluate(previous, name, ctx["data_dir"], n)}
        framing = model.meta.preprocessing.framing
        if framing != previous.meta.preprocessing.framing:
            out["wild_previous_framed"] = wild_eval.evaluate(previous, name, ctx["data_dir"], n, framing=framing)
    grid, names = wild_eval.worst_failures(seen)
    save_grid(grid, ctx["img_dir"] / f"{name}_wild_failures.png", cols=10)
    out["wild_failures_rows"] = names
    for key, r in now.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "n")
        print(f"{name} wild {key:18s} {shown}", flush=True)
    return out


def _outputs_rows(model, images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) -> (N, C [+1]): the logits, and the ood_score as a last column when exported."""
    out = tasks.image_outputs(model, images)
    cols = [out["logits"]] + ([out[model.meta.ood.output][:, None]] if model.meta.ood else [])
    return np.concatenate(cols, axis=1)


def plot_confusion(confusion: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(np.log1p(confusion), cmap="Blues")
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="black" if i != j else "white")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: confusion matrix (test set)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_sentiment(name: str, ctx: dict) -> dict:
    model = ctx["load"](name)
    sentences, labels = data.load_sst2("dev", ctx["data_dir"])
    sentences, labels = sentences[: ctx["limit"]], labels[: ctx["limit"]]
    seqs = tasks.encode_texts(model, sentences)
    ids = [s or [pp.UNK] for s in seqs]
    logits = tasks.token_logits(model, ids)
    pred = logits.argmax(1)
    trust = {}
    if model.meta.calibration is not None:
        before, after = pp.softmax(logits), tasks.calibrated(model, logits)
        trust = {"ece_dev_before": metrics.ece(before, labels), "ece_dev": metrics.ece(after, labels)}
        metrics.reliability_diagram(
            before,
            after,
            labels,
            ctx["img_dir"] / f"{name}_reliability.png",
            f"{name}: reliability on SST-2 dev (T = {model.meta.calibration.temperature:.3f})",
        )
    if model.meta.ood is not None:
        rates = np.array([np.mean(np.array(s) == pp.UNK) for s in ids])
        trust["dev_flagged_out_of_distribution"] = float(np.mean(rates > model.meta.ood.threshold))
    return {
        **trust,
        **eval_text_wild(model, sentences, labels),
        "dev_accuracy": float((pred == labels).mean()),
        "dev_examples": int(len(labels)),
        "vocabulary_size": len(model.meta.vocabulary),
        "unknown_token_rate": float(np.mean([t == pp.UNK for s in seqs for t in s])),
    }


def eval_text_wild(model, dev: list[str], dev_labels: np.ndarray) -> dict:
    """Text as people write it (training.wild): SST-2 dev rewritten with capitals, joined
    contractions, "!!!", elongated words, entities, URLs and emoji, and hand-written reviews
    (training/wild_reviews.tsv); accuracy with the normalizing tokenizer and without it."""
    reviews, review_labels = wild.wild_reviews()
    sets = {"sst2_dev_as_people_write": (wild.people_texts(dev), dev_labels), "wild_reviews": (reviews, review_labels)}
    out = {}
    max_tokens = model.meta.preprocessing.max_tokens
    for key, (texts, labels) in sets.items():
        for normalize in (False, True):
            ids = [pp.encode(pp.tokenize(t, normalize), model.vocab_index, max_tokens) or [pp.UNK] for t in texts]
            acc = float((tasks.token_logits(model, ids).argmax(1) == labels).mean())
            out[f"{key}_accuracy{'' if normalize else '_unnormalized'}"] = acc
        out[f"{key}_examples"] = len(texts)
    return out


def inception_score(probs: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with the digits classifier as judge."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1)
    marginal = p.mean(0, keepdims=True)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1))))


def eval_generator(name: str, ctx: dict) -> dict:
    model, judge = ctx["load"](name), ctx["judge"]()
    per_digit = max(10, (ctx["limit"] or 10000) // 10)
    z, _ = pp.sample_latents(10 * per_digit, model.meta.preprocessing.z_dim, seed=2026)
    digits = np.repeat(np.arange(10, dtype=np.int64), per_digit)
    images = tasks.run_in_chunks(lambda i: tasks.generate(model, z[i], digits[i]), np.arange(len(z)))
    probs = tasks.run_in_chunks(lambda x: tasks.classify_images(judge, x), images)
    real, _ = data.load_images("mnist", "test", ctx["data_dir"])
    real_probs = tasks.run_in_chunks(lambda x: tasks.classify_images(judge, x), pp.scale_pixels(real))
    save_grid(
        np.concatenate([images[d * per_digit : d * per_digit + 10] for d in range(10)]),
        ctx["img_dir"] / "generator_samples.png",
        cols=10,
    )
    return {
        "requested_digit_accuracy": float((probs.argmax(1) == digits).mean()),
        "inception_score": inception_score(probs),
        "inception_score_real_test_set": inception_score(real_probs),
        "samples": int(len(z)),
        "judge": f"digits {judge.version}",
    }


def _baseline_bytes_psnr(images: np.ndarray, fmt: str, quality: int) -> tuple[float, float]:
    sizes, recon = [], []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(pp.to_uint8(img), mode="L").save(buf, format=fmt, quality=quality)
        sizes.append(buf.tell())
        recon.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"), dtype=np.float32) / 255)
    return float(np.mean(sizes)), float(pp.psnr(images, np.stack(recon)).mean())


def eval_codec(name: str, ctx: dict) -> dict:
    encoder, decoder = ctx["load"]("encoder"), ctx["load"]("decoder")
    images, _ = data.load_images("mnist", "test", ctx["data_dir"])
    x = pp.scale_pixels(images[: ctx["limit"]])
    codes = tasks.run_in_chunks(lambda b: tasks.compress(encoder, b), x)
    recon = tasks.run_in_chunks(lambda c: tasks.decompress(decoder, c), codes)
    psnr = pp.psnr(x, recon)
    sub = x[:1000]
    baselines = []
    for fmt in ("JPEG", "WEBP"):
        for q in (1, 5, 10, 20, 30, 50, 70, 90):
            size, p = _baseline_bytes_psnr(sub, fmt, q)
            baselines.append({"codec": fmt.lower(), "quality": q, "bytes": round(size, 1), "psnr_db": round(p, 2)})
    metrics = {
        "psnr_db": float(psnr.mean()),
        "psnr_db_p10": float(np.percentile(psnr, 10)),
        "bytes_per_image": len(codes[0]),
        "original_bytes": 784,
        "ratio": 784 / len(codes[0]),
        "test_examples": int(len(x)),
        "baselines_first_1000": baselines,
    }
    save_grid(np.stack([x[:12], recon[:12]]).reshape(24, 28, 28), ctx["img_dir"] / "codec_pairs.png", cols=12)
    plot_rate_distortion(metrics, ctx["img_dir"] / "codec_rate_distortion.png")
    return metrics


def plot_rate_distortion(metrics: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for codec, marker in (("jpeg", "s"), ("webp", "^")):
        pts = [b for b in metrics["baselines_first_1000"] if b["codec"] == codec]
        ax.plot([b["bytes"] for b in pts], [b["psnr_db"] for b in pts], marker=marker, label=codec.upper())
    ax.scatter(
        [metrics["bytes_per_image"]],
        [metrics["psnr_db"]],
        s=90,
        c="red",
        zorder=5,
        label=f"deepserve codec ({metrics['bytes_per_image']} B)",
    )
    ax.set_xscale("log")
    ax.set_xlabel("bytes per 28×28 image (log)")
    ax.set_ylabel("mean PSNR (dB), MNIST test")
    ax.set_title("rate–distortion: learned codec vs JPEG/WebP")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_denoiser(name: str, ctx: dict) -> dict:
    from scipy import ndimage
    from skimage.restoration import denoise_nl_means

    model = ctx["load"](name)
    images, _ = data.load_images("mnist", "test", ctx["data_dir"])
    x = pp.scale_pixels(images[: ctx["limit"]])
    metrics, table = {"test_examples": int(len(x))}, {}
    for sigma in (0.3, 0.5):
        noisy = pp.add_gaussian_noise(x, sigma, np.random.default_rng(int(sigma * 100)))
        clean = tasks.run_in_chunks(lambda b: tasks.denoise(model, b), noisy)
        metrics[f"psnr_db_sigma_{sigma}"] = float(pp.psnr(x, clean).mean())
        n = min(500, len(x))  # NLM is slow; every method is also scored on the same 500
        nlm = np.stack(
            [
                denoise_nl_means(im, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=3, patch_distance=5)
                for im in noisy[:n]
            ]
        )
        table[sigma] = {
            "noisy input": pp.psnr(x[:n], noisy[:n]).mean(),
            "median 3×3": pp.psnr(x[:n], ndimage.median_filter(noisy[:n], size=(1, 3, 3))).mean(),
            "Gaussian blur σ=1": pp.psnr(x[:n], ndimage.gaussian_filter(noisy[:n], (0, 1, 1))).mean(),
            "non-local means": pp.psnr(x[:n], nlm).mean(),
            "deepserve U-Net": pp.psnr(x[:n], clean[:n]).mean(),
        }
        if sigma == 0.5:
            trip = np.stack([noisy[:10], clean[:10], x[:10]]).reshape(30, 28, 28)
            save_grid(trip, ctx["img_dir"] / "denoiser_triplets.png", cols=10)
    metrics["baselines_first_500"] = {
        f"sigma_{s}": {k: round(float(v), 2) for k, v in t.items()} for s, t in table.items()
    }
    plot_denoise_bars(table, ctx["img_dir"] / "denoiser_baselines.png")
    return metrics


def plot_denoise_bars(table: dict, path: Path) -> None:
    plt = _plt()
    methods = list(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(table)
    for k, (sigma, row) in enumerate(table.items()):
        ax.bar(np.arange(len(methods)) + k * width, [row[m] for m in methods], width, label=f"σ = {sigma}")
    ax.set_xticks(np.arange(len(methods)) + width / 2, methods, rotation=15)
    ax.set_ylabel("mean PSNR (dB), MNIST test[:500]")
    ax.set_title("denoising: U-Net vs classic filters")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EVALUATORS = {name: globals()[family.evaluator] for name, family in FAMILIES.items()}  # as declared
SMOKE_ROWS = 8


def smoke_feeds(model, ctx: dict) -> dict[str, np.ndarray]:
    """Real inputs for a model's smoke set, in its ONNX input space."""
    task = model.task
    if task in ("image-classification", "image-compression-encoder", "image-denoising"):
        x = pp.scale_pixels(data.load_images(FAMILIES[model.family].dataset, "test", ctx["data_dir"])[0][:SMOKE_ROWS])
        if task == "image-classification":
            pre = model.meta.preprocessing
            return {"image": pp.normalize(x, pre.mean, pre.std)[:, None]}
        if task == "image-denoising":
            x = pp.add_gaussian_noise(x, 0.3, np.random.default_rng(0))
        return {"image": x[:, None]}
    if task == "text-classification":
        sentences, _ = data.load_sst2("dev", ctx["data_dir"])
        tokens, lengths = pp.pad_batch([s or [pp.UNK] for s in tasks.encode_texts(model, sentences[:SMOKE_ROWS])])
        return {"tokens": tokens, "lengths": lengths}
    if task == "conditional-image-generation":
        z, digits = pp.sample_latents(SMOKE_ROWS, model.meta.preprocessing.z_dim, seed=0)
        if any(i.name == "class_weights" for i in model.meta.inputs):
            return {"z": z, "class_weights": np.eye(len(model.meta.labels), dtype=np.float32)[digits]}
        return {"z": z, "digit": digits}
    if task == "image-compression-decoder":
        c = model.meta.codec
        levels = np.random.default_rng(0).integers(0, 1 << c.bits, (SMOKE_ROWS, c.latent_dim), dtype=np.uint8)
        return {"latent": pp.dequantize(levels, c.bits)}
    raise ValueError(f"no smoke inputs for task {task}")


def write_smoke(model, directory: Path, ctx: dict) -> dict:
    """<model>.smoke.npz beside the model: inputs and the outputs this file gives for them."""
    feeds = smoke_feeds(model, ctx)
    outputs = model.run(**feeds)
    arrays = {f"in:{k}": v for k, v in feeds.items()} | {
        f"out:{o.name}": v for o, v in zip(model.meta.outputs, outputs)
    }
    path = directory / f"{model.name}.smoke.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return {"file": path.name, "sha256": sha256_file(path), "atol": 1e-3}


def before_framing(exported: Path, manifest, family: str) -> str | None:
    """The wild suites' "before" of a classifier family: the newest version whose framing
    differs from the active one's (what users got before framing), else the previous one."""
    fam, name = manifest.families[family], FAMILIES[family].models[0]
    framing = lambda v: json.loads((exported / manifest.models[name].versions[v].metadata).read_text())[
        "preprocessing"
    ].get("framing", "none")
    versions = list(manifest.models[name].versions)
    older = [v for v in versions[: versions.index(fam.active)] if framing(v) != framing(fam.active)]
    return older[-1] if older else fam.previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default="", help="dataset directory (see training.data)")
    parser.add_argument("--exported", default=str(common.EXPORTED), help="the model directory")
    parser.add_argument("--only", nargs="*", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument(
        "--version", default=None, help="evaluate this version of the (single) family, not the active one"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="first N test items (smoke runs; metrics are then not written back)"
    )
    parser.add_argument("--smoke-only", action="store_true", help="write the smoke sets only")
    args = parser.parse_args(argv)
    if args.version and len(args.only) != 1:
        parser.error("--version needs exactly one family in --only")
    exported = Path(args.exported)
    manifest = read_manifest(exported)
    versions = {f: args.version or manifest.families[f].active for f in args.only}
    loaded = {f: load_family(exported, manifest, f, versions[f], "cpu", 2) for f in args.only}
    judge = lambda: load_family(exported, manifest, "digits", manifest.families["digits"].active, "cpu", 2).models[
        "digits"
    ]
    classifiers = [f for f in args.only if FAMILIES[f].evaluator == "eval_classifier" and not args.version]
    load = lambda f, v: load_family(exported, manifest, f, v, "cpu", 2).models[f]
    before = {f: before_framing(exported, manifest, f) for f in classifiers}
    previous = {f: load(f, v) for f, v in before.items() if v}  # the wild suites' "before"
    replaced = {  # the version the active one replaced, when it is not that "before" (a trust refit)
        f: load(f, manifest.families[f].previous)
        for f in classifiers
        if manifest.families[f].previous and manifest.families[f].previous != before[f]
    }
    write = args.limit is None
    ctx = {
        "data_dir": data.resolve_data_dir(args.data_dir),
        "limit": args.limit,
        "judge": judge,
        "previous": previous,
        "replaced": replaced,
        "img_dir": common.IMG_DIR if write and not args.version else common.RUNS / "eval-smoke",
    }
    ctx["img_dir"].mkdir(parents=True, exist_ok=True)
    failed = False
    for name in args.only:
        family, fam = FAMILIES[name], loaded[name]
        ctx["load"] = lambda n, fam=fam: fam.models[n]
        directory = exported / name / fam.version
        metrics, ok = None, True
        if not args.smoke_only:
            start = time.perf_counter()
            metrics = EVALUATORS[name](name, ctx)
            metrics["evaluated"] = f"{common.today()} from the ONNX file, {time.perf_counter() - start:.0f} s"
            lines = check_bars(family, metrics)
            print("\n".join(line for line, _, _ in lines), flush=True)
            ok = all(bar for _, bar, _ in lines)
            trust = check_bars(family, metrics, family.trust_bars)
            print("\n".join(f"trust: {line}" for line, _, _ in trust), flush=True)
            failed |= not ok
        if not write:
            continue
        for model_name in family.models:
            meta_path = directory / f"{model_name}.json"
            meta = json.loads(meta_path.read_text())
            if metrics is not None:
                meta["metrics"], meta["meets_bars"] = metrics, ok
            meta["smoke"] = write_smoke(fam.models[model_name], directory, ctx)
            common.write_json(meta_path, meta)
        print(f"{name} {fam.version}: {'meets its bars' if ok else 'BELOW ITS BARS'}; smoke set written", flush=True)
    if write and not args.version and not args.smoke_only:
        write_model_card(exported)
    return 1 if failed and write else 0


if __name__ == "__main__":
    sys.exit(main())
