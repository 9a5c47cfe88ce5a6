"""The trust step of an image classifier (training.ood has the method): fit the detector on
the training split, append `ood_score` to the graph, pick the threshold, fit the temperature,
measure everything on the test split and the out-of-distribution sets."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx

from service import preprocessing as pp
from service.metadata import ImagePre
from service.runtime import sha256_file
from training import data, wild
from training import ood_graph as graph
from training import ood_metrics as metrics
from training import ood_sets as sets
from training.families import FAMILIES, Family, check_bars

RUNS_WILD = Path(__file__).resolve().parent.parent / "runs" / "wild"  # cached renderings (git-ignored)
OUTLIER_ALPHA = 5.0  # the glyph term's weight against the summed Mahalanobis distances (each ~1 per unit)
OUTLIER_SHARES = (0.25, 0.25, 0.5)  # logistic fit weights: official training images, wild renderings, glyphs


def splits(family: Family, meta: dict) -> tuple[int, int]:
    """(n_val, seed) of the validation split the model was trained with (its metadata's
    training config, else the family's)."""
    cfg = meta.get("training", {}).get("config", {})
    base = family.config()
    return int(cfg.get("n_val", base.n_val)), int(cfg.get("seed", base.seed))


def ood_table(scores: dict[str, np.ndarray], threshold: float) -> dict:
    """AUROC and false accepts of every set against "test"; false rejects of "test"."""
    out = {"auroc": {}, "false_accept_rate": {}}
    for k, v in scores.items():
        if k in ("val", "val_official", "test"):
            continue
        out["auroc"][k] = round(metrics.auroc(scores["test"], v), 5)
        out["false_accept_rate"][k] = round(metrics.false_accept_rate(v, threshold), 5)
    out["false_reject_rate_test"] = round(metrics.false_reject_rate(scores["test"], threshold), 5)
    return out


def trust_bars(family: Family, measured: dict) -> dict[str, bool]:
    """{"<metric><op><bar>": met} for the family's trust bars and quality bars that `measured` has."""
    out = {}
    for bars in (family.trust_bars, family.bars):
        for key, (op, bar, _) in bars.items():
            if key in measured:
                out[f"{key}{op}{bar}"] = check_bars(family, measured, {key: (op, bar, bar)})[0][1]
    return out


def threshold_for(score_val: np.ndarray, official: np.ndarray, family: Family, pass_rate: float) -> float:
    """The larger of: the score `pass_rate` of the validation split passes, and the score
    `Trust.official_pass_rate` of its official images alone pass."""
    return max(
        metrics.pick_threshold(score_val, pass_rate),
        metrics.pick_threshold(score_val[official], family.trust.official_pass_rate),
    )


def build_image(
    name: str,
    onnx_path: Path,
    meta: dict,
    data_dir: Path,
    out_dir: Path,
    pass_rate: float | None = None,
    calibration: str = "auto",
    timing_runs: int = 300,
    limit: int | None = None,
    heldout_fonts: Path | None = None,
) -> dict:
    t_start = time.time()
    log = lambda msg: print(f"[{name} {time.time() - t_start:6.1f}s] {msg}", flush=True)
    family = FAMILIES[name]
    pass_rate = family.trust.pass_rate if pass_rate is None else pass_rate
    pre = meta["preprocessing"]
    loaded = onnx.load(str(onnx_path))
    original = graph.strip_trust(loaded)  # a refit starts from the classifier as trained
    norm = lambda x: pp.normalize(x, pre["mean"], pre["std"])[:, None]

    images, labels = data.load_images(family.dataset, "train", data_dir)
    test_images, y_test = data.load_images(family.dataset, "test", data_dir)
    n_val, seed = splits(family, meta)
    tr, va = data.split_indices(len(images), n_val, seed)
    x_tr, y_tr = norm(pp.scale_pixels(images[tr])), labels[tr]
    x_va, y_va = norm(pp.scale_pixels(images[va])), labels[va]
    x_te = norm(pp.scale_pixels(test_images))
    n_tr_official = len(x_tr)
    framing = pre.get("framing", "none")
    if framing != "none":  # uploads as people send them, framed as served, are in distribution too
        fams = wild.DIGIT_FAMILIES if framing == "digit" else wild.GARMENT_FAMILIES
        n_tr, n_va = (64, 32) if limit else (6000, 2000)
        cache = None if limit else RUNS_WILD
        w_tr, wy_tr = wild.framed_set(
            images[tr], labels[tr], fams, n_tr, 30_000, framing, cache and cache / f"{family.dataset}-ood-train.npz"
        )
        w_va, wy_va = wild.framed_set(
            images[va], labels[va], fams, n_va, 40_000, framing, cache and cache / f"{family.dataset}-ood-val.npz"
        )
        x_tr, y_tr = np.concatenate([x_tr, norm(pp.scale_pixels(w_tr))]), np.concatenate([y_tr, wy_tr])
        x_va, y_va = np.concatenate([x_va, norm(pp.scale_pixels(w_va))]), np.concatenate([y_va, wy_va])
        log(f"+ {len(w_tr)} / {len(w_va)} wild renderings ({', '.join(fams)}) in the fitting / validation sets")
    official_va = np.arange(len(x_va)) < len(va)
    if limit:  # a smoke run (training --dry-run): the same steps on a slice of every set
        keep_tr = np.r_[np.arange(min(limit, n_tr_official)), np.arange(n_tr_official, len(x_tr))[:limit]]
        keep_va = np.r_[np.arange(min(limit, len(va))), np.arange(len(va), len(x_va))[:limit]]
        x_tr, y_tr, x_va, y_va, official_va = (
            x_tr[keep_tr],
            y_tr[keep_tr],
            x_va[keep_va],
            y_va[keep_va],
            official_va[keep_va],
        )
        n_tr_official = min(limit, n_tr_official)
        x_te, y_test = x_te[:limit], y_test[:limit]
    log(f"{onnx_path} ({len(tr)} train / {len(va)} validation / {len(x_te)} test)")

    # 1. features, computed by the graph, on the training split -> detector parameters
    feat_model, feat_name, cols = graph.add_feature_nodes(original)
    sess = graph.session(graph.expose(feat_model, [feat_name]))
    f_tr = graph.run_batches(sess, x_tr, [feat_name])[feat_name]
    f_va = graph.run_batches(sess, x_va, [feat_name])[feat_name]
    comps = [graph.fit_component(f, f_tr[:, cols[f]], y_tr) for f in graph.FEATURES]
    for c in comps:
        d = c.distance(f_va[:, cols[c.feature]])
        c.loc, c.scale = float(d.mean()), float(d.std())
    log("fitted " + ", ".join(f"{c.feature} ({c.whiten.shape[0]}-d)" for c in comps))

    # 1b. outlier exposure: a logistic term fitted on glyphs of the fit fonts and characters
    outlier, glyphs = None, {}
    if family.trust.glyphs:
        image_pre = ImagePre(**{k: v for k, v in pre.items() if k in ImagePre.model_fields})
        heldout_fonts = sets.heldout_fonts(heldout_fonts)
        n_glyphs = 20 * 6 if limit else sets.GLYPH_N
        cache = None if limit else sets.glyph_cache(n_glyphs, heldout_fonts)
        glyphs = {k: norm(v) for k, v in sets.glyph_sets(image_pre, n_glyphs, heldout_fonts, cache).items()}
        f_glyph = graph.run_batches(sess, glyphs["fit"], [feat_name])[feat_name]
        groups = [(f_tr[:n_tr_official], OUTLIER_SHARES[0], 0), (f_glyph, OUTLIER_SHARES[2], 1)]
        if len(f_tr) > n_tr_official:
            groups.insert(1, (f_tr[n_tr_official:], OUTLIER_SHARES[1], 0))
        outlier = graph.fit_outlier_term(groups, OUTLIER_ALPHA)
        log(f"outlier term fitted on {len(f_glyph)} glyphs ({len(sets.FIT_CHARS)} characters) and {len(f_tr)} inliers")

    # 2. the new graph: logits unchanged + ood_score; checked; logits parity
    new = graph.finalize(graph.add_score_nodes(feat_model, feat_name, cols, comps, outlier=outlier))
    extra_outs = ["ood/distances"] + (["ood/outlier"] if outlier else [])
    analysis = graph.session(graph.expose(new, extra_outs))
    a_outs = ["logits", "ood_score", *extra_outs]
    old_sess = graph.session(original)
    ref = old_sess.run(["logits"], {"image": x_te[:1000]})[0]
    got = graph.session(new).run(["logits"], {"image": x_te[:1000]})[0]
    parity = float(np.abs(ref - got).max())
    if parity > 1e-6:
        raise RuntimeError(f"logits changed by {parity} on 1,000 test images")
    log(f"graph checked (opset {graph.OPSET}, full_check); logits max |diff| on 1,000 test images = {parity}")

    evaluated = {"val": x_va, "test": x_te, **{k: norm(v[:limit]) for k, v in sets.ood_sets(name, data_dir).items()}}
    evaluated.update({f"glyphs_{k}": v for k, v in glyphs.items()})
    res = {k: graph.run_batches(analysis, v, a_outs) for k, v in evaluated.items()}
    logits_old_test = graph.run_batches(old_sess, x_te, ["logits"])["logits"]
    acc_old = float((logits_old_test.argmax(1) == y_test).mean())
    acc_new = float((res["test"]["logits"].argmax(1) == y_test).mean())
    log(f"test accuracy: old ONNX {acc_old:.4f}, new ONNX {acc_new:.4f}")

    # 3. threshold, OOD table, baselines
    score = {k: r["ood_score"] for k, r in res.items()}
    threshold = threshold_for(score["val"], official_va, family, pass_rate)
    table = ood_table({k: v for k, v in score.items() if not k.startswith("glyphs_")}, threshold)
    log(f"threshold {threshold:.4f}; false rejects on test {table['false_reject_rate_test']:.4f}")
    for k in table["auroc"]:
        log(f"  vs {k:20s} AUROC {table['auroc'][k]:.4f}  false accepts {table['false_accept_rate'][k]:.4f}")
    glyph_flagged = {
        k[len("glyphs_") :]: round(float(np.mean(v > threshold)), 5)
        for k, v in score.items()
        if k.startswith("glyphs_")
    }
    for k, v in glyph_flagged.items():
        log(f"  glyphs {k:28s} flagged {v:.4f}")
    val_wild = res["val"]["ood_score"][~official_va]
    wild_pass = (
        {
            f: round(float(np.mean(val_wild[np.arange(len(val_wild)) % len(fams) == i] <= threshold)), 4)
            for i, f in enumerate(fams)
        }
        if len(val_wild) and framing != "none"
        else {}
    )
    if wild_pass:
        log("  validation wild renderings pass: " + ", ".join(f"{k} {v:.3f}" for k, v in wild_pass.items()))

    def lse(z):
        z = z.astype(np.float64)
        m = z.max(1)
        return m + np.log(np.exp(z - m[:, None]).sum(1))

    plain = {k: r for k, r in res.items() if not k.startswith("glyphs_")}
    baselines = {
        "max_softmax": {k: -pp.softmax(r["logits"]).max(1).astype(np.float64) for k, r in plain.items()},
        "energy": {k: -lse(r["logits"]) for k, r in plain.items()},
        **{
            f"mahalanobis_{f}": {k: r["ood/distances"][:, j] for k, r in plain.items()}
            for j, f in enumerate(graph.FEATURES)
        },
    }
    if outlier:
        baselines["mahalanobis_sum_without_outlier_term"] = {k: r["ood/distances"].sum(1) for k, r in plain.items()}
    baseline_tables = {}
    for b, s in baselines.items():
        baseline_tables[b] = ood_table(s, metrics.pick_threshold(s["val"], pass_rate))
        log(
            f"  baseline {b:24s} "
            + "  ".join(f"{k} {v:.4f}" for k, v in baseline_tables[b]["auroc"].items())
            + f"  frr {baseline_tables[b]['false_reject_rate_test']:.4f}"
        )

    # 4. calibration
    eps = float(meta.get("training", {}).get("config", {}).get("label_smoothing", 0.0) or 0.0)
    if calibration == "temperature":
        eps = 0.0
    cal = metrics.calibration_report(
        res["val"]["logits"],
        y_va,
        res["test"]["logits"],
        y_test,
        eps,
        f"validation split ({len(va)} images)",
        out_dir / f"{name}_reliability.png",
        name,
        log,
    )

    # 5. write
    out_dir.mkdir(parents=True, exist_ok=True)
    new_path = out_dir / f"{name}.onnx"
    onnx.save(new, str(new_path))
    log(f"timing ({timing_runs} runs per batch size, 1 thread)")
    cost = graph.timing(original, new, x_te, timing_runs)
    for k, v in cost.items():
        log(f"  {k}: {v['before_us_per_image']} -> {v['after_us_per_image']} us/image ({v['overhead']:+.1%})")
    val_pass = float(np.mean(score["val"] <= threshold))
    held_out = [v for k, v in glyph_flagged.items() if k != "fit"]
    measured = {
        **{f"auroc_{k}": v for k, v in table["auroc"].items()},
        "false_reject_rate_test": table["false_reject_rate_test"],
        "ece_test": cal["evaluation"]["ece_test_after"],
        "test_accuracy": acc_new,
        **({"glyphs_held_out_flagged": min(held_out)} if held_out else {}),
    }
    method = (
        "multi-layer Mahalanobis: class-conditional Mahalanobis distances (shared covariance, "
        f"fitted on the training split{' and framed wild renderings of it' if framing != 'none' else ''}) "
        "of the per-channel spatial std of block 1's output (per quadrant and whole map) and of the 256-d "
        "penultimate activation, each divided by its standard deviation on the validation split, summed"
    )
    if outlier:
        method += (
            f"; plus {OUTLIER_ALPHA:g} × softplus of a logistic regression on the same features fitted to tell "
            "printed letters and symbols (DejaVu Sans and Serif, two thirds of the characters) from the "
            "training split (outlier exposure; checked on held-out fonts and characters)"
        )
    block = {
        "model": name,
        "source": {"file": str(onnx_path), "sha256": sha256_file(onnx_path)},
        "file": {"path": str(new_path), "sha256": sha256_file(new_path), "size_bytes": new_path.stat().st_size},
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", 10]},
            {"name": "ood_score", "dtype": "float32", "shape": ["batch"]},
        ],
        "calibration": cal["metadata"],
        "ood": {
            "method": method + "; computed in the ONNX graph",
            "output": "ood_score",
            "threshold": threshold,
            "validation_pass_rate": round(val_pass, 5),
            "baseline_ood_rate": round(1.0 - val_pass, 5),
            "auroc": table["auroc"],
            "false_accept_rate": table["false_accept_rate"],
            "false_reject_rate_test": table["false_reject_rate_test"],
        },
        "evaluation": {
            "test_accuracy_before": acc_old,
            "test_accuracy_after": acc_new,
            "logits_max_abs_diff_1000_test": parity,
            "calibration": cal["evaluation"],
            "threshold_rule": f"the larger of: {pass_rate:.0%} of the validation split passes, "
            f"{family.trust.official_pass_rate:.0%} of its official images pass",
            "validation_pass_rate_official": round(float(np.mean(score["val"][official_va] <= threshold)), 5),
            "validation_wild_pass_rate": wild_pass,
            "ood_sets": {k: int(len(v)) for k, v in evaluated.items() if k not in ("val", "test")},
            "ood_baselines": baseline_tables,
            "components": [
                {"feature": c.feature, "dim": int(c.whiten.shape[0]), "loc": c.loc, "scale": c.scale} for c in comps
            ],
            **(
                {
                    "outlier_exposure": {
                        "alpha": OUTLIER_ALPHA,
                        "fit_weights": dict(zip(("official", "wild", "glyphs"), OUTLIER_SHARES)),
                        "fit_characters": sets.FIT_CHARS,
                        "held_out_characters": sets.HELD_OUT_CHARS,
                        "fit_fonts": [Path(f).name for f in sets.fit_fonts(wild.font_files())],
                        "held_out_fonts": [
                            Path(f).name for f in wild.font_files() if f not in sets.fit_fonts(wild.font_files())
                        ],
                        "extra_held_out_fonts": str(heldout_fonts) if heldout_fonts else None,
                        "glyphs_flagged": glyph_flagged,
                    }
                }
                if outlier
                else {}
            ),
            "timing": cost,
            "bars": trust_bars(family, measured),
            "seconds": round(time.time() - t_start, 1),
        },
    }
    return block
