"""Out-of-distribution scores and calibrated confidence for the classifiers.

Image classifiers (`digits`, `fashion`) get an `ood_score` output computed by the ONNX graph
itself, so the service reads it from the same run as `logits` (the batch thread, no numpy work
on the event loop). `logits` are left untouched: the generator's judge sees the same numbers.

The score (method "multi-layer Mahalanobis"): three feature vectors are read from the
classifier, each scored by its class-conditional Mahalanobis distance (Lee et al., 2018:
class means and one shared covariance, fitted on the training split, i.e. the 55,000 training
images minus the 5,000-image validation split), and the three distances are summed after
dividing each by its standard deviation on the validation split:

    pool1_quadrant_std  per-channel spatial standard deviation of block 1's output within each
                        quadrant: the stroke/texture statistics of the image (thin pen
                        strokes vs cloth, blank pages, noise) and where they are; the best
                        single signal for MNIST vs Fashion-MNIST
    pool1_std           the same over the whole map
    penultimate         the 256-d activation before the final Linear (the classic feature)

    ood_score = sum_f min_c ||W_f (x_f - mu_{f,c})||^2 / scale_f   (higher = less typical)

The threshold is the smallest validation score such that >= 95% of the validation images pass
(in_distribution = ood_score <= threshold). The temperature is fitted by minimising the NLL of
the validation logits; for a model trained with label smoothing eps the smoothing is first
inverted (q = max((softmax(z) - eps/K) / (1 - eps), 1e-6)), because a smoothed model's softmax
estimates the smoothed targets, which one temperature cannot map onto accuracies (see
`service.ood.calibrated_probabilities`). Text (`sentiment`): the unknown-token rate per text
and its 95th percentile on SST-2's validation split, plus a temperature.

    python -m training.ood {digits,fashion,sentiment} --out DIR [--exported DIR] [--data-dir DIR]

writes DIR/<name>.onnx (image models), DIR/<name>.ood.json (the metadata blocks plus an
`evaluation` block for the model card) and DIR/<name>_reliability.png. numpy, onnx and
onnxruntime only (the sentiment validation split is `training.sentiment.sentence_split`,
imported lazily).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service import ood as serve_ood
from service import preprocessing as pp
from training import data

OPSET = 17
SHRINKAGE = 1e-3  # covariance + SHRINKAGE * mean eigenvalue * I: keeps dead channels invertible
PASS_RATE = 0.95  # the share of validation inputs that must pass the threshold
RUNS_WILD = Path(__file__).resolve().parent.parent / "runs" / "wild"  # cached renderings (git-ignored)
N_VAL, SPLIT_SEED = 5000, 0  # the classifiers' validation split: split_indices(60000, 5000, 0)

# --------------------------------------------------------------------------- metrics


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """P(score_out > score_in) + P(tie) / 2: the rank-based (Mann-Whitney) AUROC of telling
    out-of-distribution inputs (positives, higher score) from in-distribution ones."""
    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if not len(s_in) or not len(s_out):
        raise ValueError("auroc needs at least one score on each side")
    allv = np.concatenate([s_in, s_out])
    order = np.argsort(allv, kind="mergesort")
    sorted_v = allv[order]
    ranks = np.empty(len(allv), dtype=np.float64)
    # average rank (1-based) over each run of ties
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], len(allv)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    n_out, n_in = len(s_out), len(s_in)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))


def pick_threshold(scores_val: np.ndarray, pass_rate: float = PASS_RATE) -> float:
    """The smallest observed score t such that mean(scores_val <= t) >= pass_rate."""
    s = np.sort(np.asarray(scores_val).ravel())
    k = max(1, math.ceil(pass_rate * len(s) - 1e-9))
    return float(s[k - 1])


def false_accept_rate(scores_out: np.ndarray, threshold: float) -> float:
    """Share of out-of-distribution inputs that pass (score <= threshold)."""
    return float(np.mean(np.asarray(scores_out) <= threshold))


def false_reject_rate(scores_in: np.ndarray, threshold: float) -> float:
    """Share of in-distribution inputs flagged (score > threshold)."""
    return float(np.mean(np.asarray(scores_in) > threshold))


def _bins(conf: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin index of each confidence: (k/bins, (k+1)/bins] -> k; 0 goes to bin 0."""
    return np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top label: sum_b |B_b|/N * |acc(B_b) - conf(B_b)|."""
    probs = np.asarray(probs, dtype=np.float64)
    conf, correct = probs.max(1), probs.argmax(1) == np.asarray(labels)
    idx = _bins(conf, bins)
    gap = np.abs(np.bincount(idx, correct, bins) - np.bincount(idx, conf, bins))
    return float(gap.sum() / len(conf))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15):
    """Per-bin (count, mean confidence, accuracy) for a reliability diagram."""
    probs = np.asarray(probs, dtype=np.float64)
    conf, correct = probs.max(1), probs.argmax(1) == np.asarray(labels)
    idx = _bins(conf, bins)
    n = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return n, np.bincount(idx, conf, bins) / n, np.bincount(idx, correct, bins) / n


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(p, 1e-300))))


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    label_smoothing: float = 0.0,
    lo: float = 0.05,
    hi: float = 20.0,
    iters: int = 100,
) -> float:
    """T minimising the validation NLL of service.ood.calibrated_probabilities(logits, T, eps).

    The NLL is convex in beta = 1/T (a log-sum-exp of functions linear in beta), so a
    golden-section search over beta in [1/hi, 1/lo] finds the global minimum.
    """
    z = serve_ood.calibration_logits(np.asarray(logits, dtype=np.float64), label_smoothing)
    y = np.asarray(labels)
    rows = np.arange(len(y))

    def loss(beta: float) -> float:
        s = z * beta
        s = s - s.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(1)) - s[rows, y]))

    a, b = 1.0 / hi, 1.0 / lo
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return float(1.0 / ((a + b) / 2))


def reliability_diagram(
    probs_before: np.ndarray, probs_after: np.ndarray, labels: np.ndarray, path: Path, title: str, bins: int = 15
) -> None:
    """Two reliability diagrams (before / after calibration) side by side, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    width = 1.0 / bins
    centers = (np.arange(bins) + 0.5) * width
    for ax, probs, name in zip(axes, (probs_before, probs_after), ("before (softmax of logits)", "after (calibrated)")):
        n, conf, acc = reliability(probs, labels, bins)
        has = n > 0
        ax.bar(centers[has], acc[has], width=width, edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy")
        ax.bar(
            centers[has],
            (conf - acc)[has],
            bottom=acc[has],
            width=width,
            edgecolor="tab:red",
            color="tab:red",
            alpha=0.3,
            hatch="//",
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top label)")
        ax.set_title(f"{name}\nECE({bins} bins) = {ece(probs, labels, bins):.4f}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("accuracy")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- model files


def resolve_model(exported: Path, name: str) -> tuple[Path, Path]:
    """(onnx path, metadata path) of the active version of `name` in a model directory."""
    from service import repository

    manifest = repository.read(exported)
    entry = manifest.models[name]
    files = entry.versions[manifest.families[entry.family].active]
    return exported / files.file, exported / files.metadata


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def session(model: onnx.ModelProto | Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run_batches(sess: ort.InferenceSession, x: np.ndarray, outputs: list[str], batch: int = 500) -> dict:
    """Run (N, 1, 28, 28) normalised images in chunks; {output name: (N, ...) array}."""
    parts: dict[str, list] = {o: [] for o in outputs}
    for i in range(0, len(x), batch):
        for o, v in zip(outputs, sess.run(outputs, {"image": x[i : i + batch]})):
            parts[o].append(v)
    return {o: np.concatenate(v) for o, v in parts.items()}


# --------------------------------------------------------------------------- graph surgery


def expose(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of `model` with intermediate tensors added as graph outputs (shapes inferred)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(out)
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    have = {o.name for o in out.graph.output}
    for t in tensors:
        if t in have:
            continue
        if t in known:
            out.graph.output.append(known[t])
        else:
            out.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    return out


def classifier_taps(model: onnx.ModelProto) -> dict[str, str]:
    """The tensors the detector reads, found by structure: the first MaxPool's output (block
    1) and the input of the final Gemm/MatMul that produces `logits` (the penultimate)."""
    nodes = list(model.graph.node)
    pools = [n.output[0] for n in nodes if n.op_type == "MaxPool"]
    final = [n for n in nodes if "logits" in n.output]
    if not pools or len(final) != 1 or final[0].op_type not in ("Gemm", "MatMul"):
        raise ValueError("not the CNN classifier layout: need a MaxPool and a final Gemm -> logits")
    return {"pool1": pools[0], "penultimate": final[0].input[0]}


FEATURES = ("pool1_quadrant_std", "pool1_std", "penultimate")


def _const(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _shape(model: onnx.ModelProto, tensor: str) -> list[int]:
    """Static dims of a tensor (0 for a symbolic one), from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        if v.name == tensor:
            return [d.dim_value for d in v.type.tensor_type.shape.dim]
    raise ValueError(f"no inferred shape for {tensor}")


def add_feature_nodes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str, dict[str, np.ndarray]]:
    """A copy of `model` that also computes the detector's feature vector `ood/features` (B, D):

        pool1_quadrant_std  (4*C1)  per-channel spatial std of block 1's output in each quadrant
        pool1_std           (C1)    the same over the whole map
        penultimate         (256)   the activation before the final Linear

    Returns (model, "ood/features", {feature: its column indices}). The standard deviations
    are sqrt(relu(E[x^2] - E[x]^2)): AveragePools give each quadrant's moments and one small
    MatMul per moment adds the whole map's (the mean of its quadrants'), so the features cost
    12 nodes and two streaming passes over block 1's output. (Per-node overhead dominates
    batch-1 latency; a broadcast Sub over a 6-d quadrant view, or a grouped Conv whose kernel
    spans the map, is ~5-10x slower than the AveragePools.)
    Columns: quadrant (c, q) is 4c+q, channel c's whole-map std 4*C1+c, then the 256.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taps = classifier_taps(model)
    _, c1, h1, w1 = _shape(model, taps["pool1"])
    pen = _shape(model, taps["penultimate"])[-1]
    if not all((c1, h1, w1, pen)) or h1 % 2 or w1 % 2:
        raise ValueError(f"block 1 output {c1}x{h1}x{w1}, penultimate {pen}: need static shapes, even sides")
    q = np.arange(4 * c1)
    to_cols = np.zeros((4 * c1, 5 * c1), dtype=np.float32)  # [quadrants | whole map]
    to_cols[q, q] = 1.0
    to_cols[q, 4 * c1 + q // 4] = 0.25  # (B, C1, 2, 2) flattens channel-major
    g = out.graph
    g.initializer.extend(
        [_const("ood/flat", np.array([0, -1], dtype=np.int64)), _const("ood/quadrants_to_columns", to_cols)]
    )

    def node(op: str, ins: list[str], name: str, **kw) -> str:
        g.node.append(helper.make_node(op, ins, [name], name=name, **kw))
        return name

    x1, k = taps["pool1"], [h1 // 2, w1 // 2]
    sq = node("Mul", [x1, x1], "ood/pool1_sq")
    qm = node("AveragePool", [x1], "ood/quadrant_mean", kernel_shape=k, strides=k)  # (B, C1, 2, 2)
    qs = node("AveragePool", [sq], "ood/quadrant_mean_sq", kernel_shape=k, strides=k)
    qm = node("Reshape", [qm, "ood/flat"], "ood/quadrant_mean_flat")
    qs = node("Reshape", [qs, "ood/flat"], "ood/quadrant_mean_sq_flat")
    mean = node("MatMul", [qm, "ood/quadrants_to_columns"], "ood/mean")  # (B, 5*C1)
    mean_sq = node("MatMul", [qs, "ood/quadrants_to_columns"], "ood/mean_sq")
    mean2 = node("Mul", [mean, mean], "ood/mean2")
    var = node("Sub", [mean_sq, mean2], "ood/var_raw")
    var = node("Relu", [var], "ood/var")  # rounding can leave -1e-8 on a flat map
    std = node("Sqrt", [var], "ood/std")
    node("Concat", [std, taps["penultimate"]], "ood/features", axis=1)
    cols = {"pool1_quadrant_std": q, "pool1_std": 4 * c1 + np.arange(c1), "penultimate": 5 * c1 + np.arange(pen)}
    return out, "ood/features", cols


@dataclass
class Component:
    """One Mahalanobis term: whitening W (d, d), whitened class means M (C, d), standardisation."""

    feature: str
    whiten: np.ndarray
    means: np.ndarray
    loc: float = 0.0
    scale: float = 1.0

    def distance(self, f: np.ndarray) -> np.ndarray:
        """min over classes of the squared Mahalanobis distance, float64 (the graph's twin)."""
        z = np.asarray(f, dtype=np.float64) @ self.whiten
        return np.min([((z - m) ** 2).sum(1) for m in self.means], axis=0)


def fit_component(feature: str, f: np.ndarray, y: np.ndarray, shrinkage: float = SHRINKAGE) -> Component:
    """Class means and a shared, shrunk covariance of training features -> whitening."""
    f = np.asarray(f, dtype=np.float64)
    classes = np.unique(y)
    mu = np.stack([f[y == c].mean(0) for c in classes])
    centered = f - mu[np.searchsorted(classes, y)]
    cov = centered.T @ centered / len(f)
    cov += shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    w, v = np.linalg.eigh(cov)
    whiten = v / np.sqrt(w)[None, :]  # cov^-1 = whiten @ whiten.T
    return Component(feature, whiten, mu @ whiten)


def add_score_nodes(
    model: onnx.ModelProto,
    features: str,
    cols: dict[str, np.ndarray],
    comps: list[Component],
    output: str = "ood_score",
) -> onnx.ModelProto:
    """Append the score as output `output` (float32, [batch]); the graph keeps only `logits`
    and `output` as outputs. Component f reads columns cols[f] of `features` (B, D); all
    components share one whitening MatMul, block-diagonal up to a row permutation (6 nodes):

        z = features @ W                                     (B, D)  z's columns grouped by component
        d = ((z - M) ** 2) @ S                               (C, B, F)  M: (C, 1, D), S[j, f] = 1/scale_f for j in f
        ood_score = sum_f min_c d[c, :, f]                   ("ood/distances" = min_c d, (B, F))

    Each term is a squared Mahalanobis distance over its validation standard deviation; the
    validation means (loc) are left out, a constant offset that would cost a node and
    changes no decision (the threshold is picked on the same scores).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    dims = [c.whiten.shape[0] for c in comps]
    total, n_cls = sum(dims), comps[0].means.shape[0]
    if sorted(np.concatenate([cols[c.feature] for c in comps]).tolist()) != list(range(total)):
        raise ValueError("the components' columns must cover the features exactly once")
    w = np.zeros((total, total))
    m = np.zeros((n_cls, total))
    sel = np.zeros((total, len(comps)))
    at = 0
    for j, c in enumerate(comps):
        d = dims[j]
        w[np.ix_(cols[c.feature], np.arange(at, at + d))] = c.whiten
        m[:, at : at + d] = c.means
        sel[at : at + d, j] = 1.0 / c.scale
        at += d
    g.initializer.extend(
        [
            _const("ood/W", w.astype(np.float32)),
            _const("ood/M", m.astype(np.float32)[:, None, :]),  # (C, 1, D)
            _const("ood/S", sel.astype(np.float32)),
            _const("ood/axis1", np.array([1], dtype=np.int64)),
        ]
    )
    g.node.extend(
        [
            helper.make_node("MatMul", [features, "ood/W"], ["ood/z"], name="ood/Whiten"),
            helper.make_node("Sub", ["ood/z", "ood/M"], ["ood/diff"], name="ood/SubMeans"),  # (C, B, D)
            helper.make_node("Mul", ["ood/diff", "ood/diff"], ["ood/sq"], name="ood/Square"),
            helper.make_node("MatMul", ["ood/sq", "ood/S"], ["ood/d"], name="ood/PerFeature"),  # (C, B, F)
            helper.make_node(
                "ReduceMin", ["ood/d"], ["ood/distances"], axes=[0], keepdims=0, name="ood/MinOverClasses"
            ),
            helper.make_node("ReduceSum", ["ood/distances", "ood/axis1"], [output], keepdims=0, name="ood/Sum"),
        ]
    )
    logits = next(o for o in model.graph.output if o.name == "logits")
    batch = logits.type.tensor_type.shape.dim[0]
    score = helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch.dim_param or batch.dim_value])
    del g.output[:]
    g.output.extend([logits, score])
    return out


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes inferred, opset 17 kept, checked with full_check."""
    if [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] != [OPSET]:
        raise ValueError(f"expected opset {OPSET}")
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------- evaluation sets


def blank_images(seed: int = 1301) -> np.ndarray:
    """Blank pages, 602 images in [0, 1]: all-black and all-white, then for sensor noise sigma
    in (0.01, 0.02, 0.04) 100 black pages with |N(0, sigma)| and 100 white pages with
    1 - |N(0, sigma)| (the server inverts white pages, so both polarities are covered)."""
    rng = np.random.default_rng(seed)
    pages = [np.zeros((1, 28, 28)), np.ones((1, 28, 28))]
    for sigma in (0.01, 0.02, 0.04):
        noise = np.abs(rng.normal(0.0, sigma, (200, 28, 28)))
        pages += [noise[:100], 1.0 - noise[100:]]
    return np.clip(np.concatenate(pages), 0, 1).astype(np.float32)


def constant_images() -> np.ndarray:
    """Every grey level 0..255 as a flat 28x28 image (256 images)."""
    return np.repeat((np.arange(256, dtype=np.float32) / 255.0)[:, None, None], 28, 1).repeat(28, 2)


def noise_images(n: int = 2000, seed: int = 1302) -> np.ndarray:
    """Uniform noise: every pixel U[0, 1], seeded."""
    return np.random.default_rng(seed).random((n, 28, 28), dtype=np.float32)


def ood_sets(name: str, data_dir: Path) -> dict[str, np.ndarray]:
    """The evaluation sets (pixels in [0, 1]); the first is the issue's other-dataset row."""
    other = "fashion" if name == "digits" else "mnist"
    images, _ = data.load_images(other, "test", data_dir)
    key = "fashion_mnist_test" if name == "digits" else "mnist_test"
    return {
        key: pp.scale_pixels(images),
        "uniform_noise": noise_images(),
        "blank": blank_images(),
        "constant": constant_images(),
    }


# the trust bars: (set, minimum AUROC); fashion's blank/constant rows are informative only
AUROC_BARS = {
    "digits": {"fashion_mnist_test": 0.99, "uniform_noise": 0.99, "blank": 0.99, "constant": 0.99},
    "fashion": {"mnist_test": 0.97, "uniform_noise": 0.99},
}
ECE_BARS = {"digits": 0.01, "fashion": 0.015, "sentiment": 0.04}
FRR_BAR = 0.05
ACC_BARS = {"digits": 0.993, "fashion": 0.920}


def _ood_table(scores: dict[str, np.ndarray], threshold: float) -> dict:
    out = {"auroc": {}, "false_accept_rate": {}}
    for k, v in scores.items():
        if k in ("val", "test"):
            continue
        out["auroc"][k] = round(auroc(scores["test"], v), 5)
        out["false_accept_rate"][k] = round(false_accept_rate(v, threshold), 5)
    out["false_reject_rate_test"] = round(false_reject_rate(scores["test"], threshold), 5)
    return out


def timing(old: onnx.ModelProto | Path, new: onnx.ModelProto, x: np.ndarray, runs: int = 300) -> dict:
    """Median ORT latency (1 intra-op thread) of the old and new graphs on batches of 1 and 64,
    interleaved so both see the same machine load; per image in microseconds."""
    s_old, s_new = session(old), session(new)
    res = {}
    for b in (1, 64):
        xb = x[:b]
        for s in (s_old, s_new):
            for _ in range(20):
                s.run(None, {"image": xb})
        t_old, t_new = [], []
        for _ in range(runs):
            for s, acc in ((s_old, t_old), (s_new, t_new)):
                t0 = time.perf_counter()
                s.run(None, {"image": xb})
                acc.append(time.perf_counter() - t0)
        mo, mn = float(np.median(t_old)), float(np.median(t_new))
        res[f"batch_{b}"] = {
            "before_us_per_image": round(mo / b * 1e6, 1),
            "after_us_per_image": round(mn / b * 1e6, 1),
            "overhead": round(mn / mo - 1, 4),
            "runs": runs,
        }
    return res


def build_image(
    name: str,
    onnx_path: Path,
    meta: dict,
    data_dir: Path,
    out_dir: Path,
    pass_rate: float = PASS_RATE,
    calibration: str = "auto",
    timing_runs: int = 300,
    limit: int | None = None,
) -> dict:
    t_start = time.time()
    log = lambda msg: print(f"[{name} {time.time() - t_start:6.1f}s] {msg}", flush=True)
    pre = meta["preprocessing"]
    original = onnx.load(str(onnx_path))
    dataset = "mnist" if name == "digits" else "fashion"
    norm = lambda x: pp.normalize(x, pre["mean"], pre["std"])[:, None]

    images, labels = data.load_images(dataset, "train", data_dir)
    test_images, y_test = data.load_images(dataset, "test", data_dir)
    tr, va = data.split_indices(len(images), N_VAL, SPLIT_SEED)
    x_tr, y_tr = norm(pp.scale_pixels(images[tr])), labels[tr]
    x_va, y_va = norm(pp.scale_pixels(images[va])), labels[va]
    x_te = norm(pp.scale_pixels(test_images))
    framing = pre.get("framing", "none")
    if framing != "none":  # uploads as people send them, framed as served, are in distribution too
        from training import wild

        fams = wild.DIGIT_FAMILIES if framing == "digit" else wild.GARMENT_FAMILIES
        n_tr, n_va = (256, 128) if limit else (6000, 2000)
        cache = None if limit else RUNS_WILD
        w_tr, wy_tr = wild.framed_set(
            images[tr], labels[tr], fams, n_tr, 30_000, framing, cache and cache / f"{dataset}-ood-train.npz"
        )
        w_va, wy_va = wild.framed_set(
            images[va], labels[va], fams, n_va, 40_000, framing, cache and cache / f"{dataset}-ood-val.npz"
        )
        x_tr, y_tr = np.concatenate([x_tr, norm(pp.scale_pixels(w_tr))]), np.concatenate([y_tr, wy_tr])
        x_va, y_va = np.concatenate([x_va, norm(pp.scale_pixels(w_va))]), np.concatenate([y_va, wy_va])
        log(f"+ {len(w_tr)} / {len(w_va)} wild renderings ({', '.join(fams)}) in the fitting / validation sets")
    if limit:  # a smoke run (training --dry-run): the same steps on a slice of every set
        x_tr, y_tr, x_va, y_va, x_te, y_test = (
            x_tr[:limit],
            y_tr[:limit],
            x_va[:limit],
            y_va[:limit],
            x_te[:limit],
            y_test[:limit],
        )
    log(f"{onnx_path} ({len(tr)} train / {len(va)} validation / {len(x_te)} test)")

    # 1. features, computed by the graph, on the training split -> detector parameters
    feat_model, feat_name, cols = add_feature_nodes(original)
    sess = session(expose(feat_model, [feat_name]))
    f_tr = run_batches(sess, x_tr, [feat_name])[feat_name]
    f_va = run_batches(sess, x_va, [feat_name])[feat_name]
    comps = [fit_component(f, f_tr[:, cols[f]], y_tr) for f in FEATURES]
    for c in comps:
        d = c.distance(f_va[:, cols[c.feature]])
        c.loc, c.scale = float(d.mean()), float(d.std())
    log("fitted " + ", ".join(f"{c.feature} ({c.whiten.shape[0]}-d)" for c in comps))

    # 2. the new graph: logits unchanged + ood_score; checked; logits parity
    new = finalize(add_score_nodes(feat_model, feat_name, cols, comps))
    analysis = session(expose(new, ["ood/distances"]))
    a_outs = ["logits", "ood_score", "ood/distances"]
    old_sess = session(onnx_path)
    ref = old_sess.run(["logits"], {"image": x_te[:1000]})[0]
    got = session(new).run(["logits"], {"image": x_te[:1000]})[0]
    parity = float(np.abs(ref - got).max())
    if parity > 1e-6:
        raise RuntimeError(f"logits changed by {parity} on 1,000 test images")
    log(f"graph checked (opset {OPSET}, full_check); logits max |diff| on 1,000 test images = {parity}")

    sets = {"val": x_va, "test": x_te, **{k: norm(v[:limit]) for k, v in ood_sets(name, data_dir).items()}}
    res = {k: run_batches(analysis, v, a_outs) for k, v in sets.items()}
    logits_old_test = run_batches(old_sess, x_te, ["logits"])["logits"]
    acc_old = float((logits_old_test.argmax(1) == y_test).mean())
    acc_new = float((res["test"]["logits"].argmax(1) == y_test).mean())
    log(f"test accuracy: old ONNX {acc_old:.4f}, new ONNX {acc_new:.4f}")

    # 3. threshold, OOD table, baselines
    score = {k: r["ood_score"] for k, r in res.items()}
    threshold = pick_threshold(score["val"], pass_rate)
    table = _ood_table(score, threshold)
    log(f"threshold {threshold:.4f}; false rejects on test {table['false_reject_rate_test']:.4f}")
    for k in table["auroc"]:
        log(f"  vs {k:20s} AUROC {table['auroc'][k]:.4f}  false accepts {table['false_accept_rate'][k]:.4f}")

    def lse(z):
        z = z.astype(np.float64)
        m = z.max(1)
        return m + np.log(np.exp(z - m[:, None]).sum(1))

    baselines = {
        "max_softmax": {k: -pp.softmax(r["logits"]).max(1).astype(np.float64) for k, r in res.items()},
        "energy": {k: -lse(r["logits"]) for k, r in res.items()},
        **{f"mahalanobis_{f}": {k: r["ood/distances"][:, j] for k, r in res.items()} for j, f in enumerate(FEATURES)},
    }
    baseline_tables = {}
    for b, s in baselines.items():
        baseline_tables[b] = _ood_table(s, pick_threshold(s["val"], pass_rate))
        log(
            f"  baseline {b:24s} "
            + "  ".join(f"{k} {v:.4f}" for k, v in baseline_tables[b]["auroc"].items())
            + f"  frr {baseline_tables[b]['false_reject_rate_test']:.4f}"
        )

    # 4. calibration
    eps = float(meta.get("training", {}).get("config", {}).get("label_smoothing", 0.0) or 0.0)
    if calibration == "temperature":
        eps = 0.0
    cal = _calibration(
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
    cost = timing(onnx_path, new, x_te, timing_runs)
    for k, v in cost.items():
        log(f"  {k}: {v['before_us_per_image']} -> {v['after_us_per_image']} us/image ({v['overhead']:+.1%})")
    val_pass = float(np.mean(score["val"] <= threshold))
    block = {
        "model": name,
        "source": {"file": str(onnx_path), "sha256": sha256(onnx_path)},
        "file": {"path": str(new_path), "sha256": sha256(new_path), "size_bytes": new_path.stat().st_size},
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", 10]},
            {"name": "ood_score", "dtype": "float32", "shape": ["batch"]},
        ],
        "calibration": cal["metadata"],
        "ood": {
            "method": "multi-layer Mahalanobis: class-conditional Mahalanobis distances (shared covariance, "
            f"fitted on the training split{' and framed wild renderings of it' if framing != 'none' else ''}) "
            "of the per-channel spatial std of block 1's output (per quadrant and whole map) and of the 256-d "
            "penultimate activation, each divided by its standard deviation on the validation split, summed; "
            "computed in the ONNX graph",
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
            "ood_sets": {k: int(len(v)) for k, v in sets.items() if k not in ("val", "test")},
            "ood_baselines": baseline_tables,
            "components": [
                {"feature": c.feature, "dim": int(c.whiten.shape[0]), "loc": c.loc, "scale": c.scale} for c in comps
            ],
            "timing": cost,
            "bars": _bars(name, table, cal["evaluation"]["ece_test_after"], acc_new),
            "seconds": round(time.time() - t_start, 1),
        },
    }
    return block


def _bars(name: str, table: dict, ece_after: float, acc: float | None) -> dict:
    bars = {f"auroc_{k}>={v}": table["auroc"][k] >= v for k, v in AUROC_BARS.get(name, {}).items()}
    if "false_reject_rate_test" in table:
        bars[f"false_reject_rate_test<={FRR_BAR}"] = table["false_reject_rate_test"] <= FRR_BAR
    bars[f"ece_test_after<={ECE_BARS[name]}"] = ece_after <= ECE_BARS[name]
    if name in ACC_BARS and acc is not None:
        bars[f"test_accuracy>={ACC_BARS[name]}"] = acc >= ACC_BARS[name]
    return bars


def _calibration(l_val, y_val, l_test, y_test, eps, fitted_on, png: Path, name: str, log) -> dict:
    t = fit_temperature(l_val, y_val, eps)
    before = pp.softmax(l_test)
    after = serve_ood.calibrated_probabilities(l_test, t, eps)
    t_plain = fit_temperature(l_val, y_val, 0.0)
    plain = serve_ood.calibrated_probabilities(l_test, t_plain, 0.0)
    ev = {
        "temperature": t,
        "label_smoothing_inverted": eps,
        "ece_test_before": ece(before, y_test),
        "ece_test_after": ece(after, y_test),
        "ece_val_before": ece(pp.softmax(l_val), y_val),
        "ece_val_after": ece(serve_ood.calibrated_probabilities(l_val, t, eps), y_val),
        "nll_test_before": nll(before, y_test),
        "nll_test_after": nll(after, y_test),
        "plain_temperature": {
            "temperature": t_plain,
            "ece_test_after": ece(plain, y_test),
            "nll_test_after": nll(plain, y_test),
        },
        "argmax_preserved": bool((after.argmax(1) == before.argmax(1)).all()),
    }
    log(
        f"temperature {t:.4f} (label smoothing inverted: {eps}); ECE test {ev['ece_test_before']:.4f} -> "
        f"{ev['ece_test_after']:.4f}; plain temperature {t_plain:.4f} -> ECE {ev['plain_temperature']['ece_test_after']:.4f}"
    )
    title = f"{name}: reliability on the test set (T = {t:.3f}" + (f", label smoothing {eps} inverted)" if eps else ")")
    reliability_diagram(before, after, y_test, png, title)
    md = {
        "temperature": round(t, 6),
        "fitted_on": fitted_on,
        "ece_test_before": round(ev["ece_test_before"], 5),
        "ece_test_after": round(ev["ece_test_after"], 5),
    }
    if eps:
        md["label_smoothing"] = eps  # needs the one-field addition to service.metadata.Calibration
    return {"metadata": md, "evaluation": ev}


# --------------------------------------------------------------------------- sentiment


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


def build_sentiment(onnx_path: Path, meta: dict, data_dir: Path, out_dir: Path, pass_rate: float = PASS_RATE) -> dict:
    from training.sentiment import sentence_split  # imports torch; the split must stay the training one

    t_start = time.time()
    log = lambda msg: print(f"[sentiment {time.time() - t_start:6.1f}s] {msg}", flush=True)
    index = {tok: i for i, tok in enumerate(meta["vocabulary"])}
    max_tokens = meta["preprocessing"]["max_tokens"]
    sentences, labels = data.load_sst2("train", data_dir)
    dev, y_dev = data.load_sst2("dev", data_dir)
    _, va = sentence_split(sentences, 2000, 0)
    val = [sentences[i] for i in va]
    y_val = labels[va]
    log(f"{onnx_path}: {len(val)} validation sentences, {len(dev)} dev sentences")

    rates_val = unknown_token_rates(val, index, max_tokens)
    rates_dev = unknown_token_rates(dev, index, max_tokens)
    threshold = pick_threshold(rates_val, pass_rate)
    val_pass = float(np.mean(rates_val <= threshold))
    log(
        f"unknown-token rate: validation p95 {threshold:.4f} (mean {rates_val.mean():.4f}); "
        f"dev flagged {np.mean(rates_dev > threshold):.4f}"
    )

    sess = session(onnx_path)
    enc = lambda texts: [pp.encode(pp.tokenize(t), index, max_tokens) or [pp.UNK] for t in texts]
    l_val, l_dev = sentiment_logits(sess, enc(val)), sentiment_logits(sess, enc(dev))
    log(f"dev accuracy {np.mean(l_dev.argmax(1) == y_dev):.4f}")
    cal = _calibration(
        l_val,
        y_val,
        l_dev,
        y_dev,
        0.0,
        f"validation split ({len(val)} sentences)",
        out_dir / "sentiment_reliability.png",
        "sentiment",
        log,
    )
    return {
        "model": "sentiment",
        "source": {"file": str(onnx_path), "sha256": sha256(onnx_path)},
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
            "bars": _bars("sentiment", {}, cal["evaluation"]["ece_test_after"], None),
            "seconds": round(time.time() - t_start, 1),
        },
    }


# --------------------------------------------------------------------------- the export step


def attach(name: str, staging: Path, meta: dict, data_dir: Path, limit: int | None = None) -> dict:
    """Give a staged classifier its trust settings, in place, before it is hashed and
    versioned (training.export.export_family): image models get the `ood_score` output in
    their graph; every classifier gets `calibration` and `ood` blocks in its metadata.
    Returns the evaluation block (for the log)."""
    import shutil

    onnx_path, scratch = staging / f"{name}.onnx", staging / ".trust"
    scratch.mkdir(exist_ok=True)
    try:
        if meta["task"] == "text-classification":
            block = build_sentiment(onnx_path, meta, data_dir, scratch)
        else:
            block = build_image(name, onnx_path, meta, data_dir, scratch, timing_runs=1, limit=limit)
            Path(block["file"]["path"]).replace(onnx_path)
            meta["outputs"] = block["outputs"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # make evaluate draws the card's diagrams from the exported files
    meta["calibration"], meta["ood"] = block["calibration"], block["ood"]
    return block["evaluation"]


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.ood", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=["digits", "fashion", "sentiment"])
    ap.add_argument("--out", required=True, type=Path, help="scratch directory for the new files")
    ap.add_argument("--exported", type=Path, default=Path("exported"), help="model directory to read")
    ap.add_argument("--data-dir", default="", help="datasets (else $DEEPSERVE_DATA_DIR)")
    ap.add_argument("--pass-rate", type=float, default=PASS_RATE)
    ap.add_argument(
        "--calibration",
        choices=["auto", "temperature"],
        default="auto",
        help="auto: invert the training's label smoothing before the temperature",
    )
    ap.add_argument("--timing-runs", type=int, default=300)
    args = ap.parse_args(argv)
    data_dir = data.resolve_data_dir(args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path, meta_path = resolve_model(args.exported, args.model)
    meta = json.loads(meta_path.read_text())
    if args.model == "sentiment":
        block = build_sentiment(onnx_path, meta, data_dir, args.out, args.pass_rate)
    else:
        block = build_image(
            args.model, onnx_path, meta, data_dir, args.out, args.pass_rate, args.calibration, args.timing_runs
        )
    block["evaluation"]["command"] = "python -m training.ood " + " ".join(argv if argv is not None else sys.argv[1:])
    path = args.out / f"{args.model}.ood.json"
    path.write_text(json.dumps(block, indent=2) + "\n")
    failed = [k for k, ok in block["evaluation"]["bars"].items() if not ok]
    print(f"wrote {path}" + (f"; BARS MISSED: {', '.join(failed)}" if failed else "; every bar met"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
