"""ONNX graph surgery for the image classifiers' out-of-distribution score (training.ood has
the method): the detector's features read from the classifier's own tensors, the
Mahalanobis components and the outlier-exposure term fitted on them, the score nodes
appended to the graph, checks, and ORT sessions / timing to run the result."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service.runtime import session_options

OPSET = 17
SHRINKAGE = 1e-3  # covariance + SHRINKAGE * mean eigenvalue * I: keeps dead channels invertible
FEATURES = ("pool1_quadrant_std", "pool1_std", "penultimate")
PREFIX = "ood/"  # every node and initializer the trust step adds is named under it


def session(model: onnx.ModelProto | Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with the server's options (service.runtime.session_options)."""
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, session_options(threads), providers=["CPUExecutionProvider"])


def run_batches(sess: ort.InferenceSession, x: np.ndarray, outputs: list[str], batch: int = 500) -> dict:
    """Run (N, 1, 28, 28) normalised images in chunks; {output name: (N, ...) array}."""
    parts: dict[str, list] = {o: [] for o in outputs}
    for i in range(0, len(x), batch):
        for o, v in zip(outputs, sess.run(outputs, {"image": x[i : i + batch]})):
            parts[o].append(v)
    return {o: np.concatenate(v) for o, v in parts.items()}


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


@dataclass
class OutlierTerm:
    """Outlier exposure: alpha * softplus(features @ w + b), a logistic regression on the same
    features that tells framed non-subjects (printed glyphs) from the fitting set."""

    w: np.ndarray  # (D,), on raw features (the standardisation folded in)
    b: float
    alpha: float

    def value(self, f: np.ndarray) -> np.ndarray:
        """The term per row, float64 (the graph's twin)."""
        return self.alpha * np.logaddexp(0.0, np.asarray(f, dtype=np.float64) @ self.w + self.b)


def fit_outlier_term(
    groups: list[tuple[np.ndarray, float, int]], alpha: float, l2: float = 3e-4, iters: int = 30
) -> OutlierTerm:
    """L2-regularised logistic regression by Newton's method on standardised features.
    `groups`: (features (N, D), total weight of the group, label 1 = outlier / 0 = inlier);
    each group's rows share its weight equally, so a small set of outliers counts as much as
    the large fitting set."""
    f = np.concatenate([np.asarray(g, dtype=np.float64) for g, _, _ in groups])
    y = np.concatenate([np.full(len(g), lab, dtype=np.float64) for g, _, lab in groups])
    sw = np.concatenate([np.full(len(g), share / len(g)) for g, share, _ in groups])
    sw /= sw.sum()
    inl = y == 0
    mu, sd = f[inl].mean(0), f[inl].std(0) + 1e-6
    x = np.c_[(f - mu) / sd, np.ones(len(f))]  # (N, D + 1), the last column the bias
    theta = np.zeros(x.shape[1])
    reg = np.full(x.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        grad = x.T @ (sw * (p - y)) + reg * theta
        hess = (x * (sw * p * (1 - p))[:, None]).T @ x + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    w = theta[:-1] / sd
    return OutlierTerm(w=w, b=float(theta[-1] - mu @ w), alpha=float(alpha))


def add_score_nodes(
    model: onnx.ModelProto,
    features: str,
    cols: dict[str, np.ndarray],
    comps: list[Component],
    output: str = "ood_score",
    outlier: OutlierTerm | None = None,
) -> onnx.ModelProto:
    """Append the score as output `output` (float32, [batch]); the graph keeps only `logits`
    and `output` as outputs. Component f reads columns cols[f] of `features` (B, D); all
    components share one whitening MatMul, block-diagonal up to a row permutation (6 nodes):

        z = features @ W                                     (B, D)  z's columns grouped by component
        d = ((z - M) ** 2) @ S                               (C, B, F)  M: (C, 1, D), S[j, f] = 1/scale_f for j in f
        ood_score = sum_f min_c d[c, :, f]                   ("ood/distances" = min_c d, (B, F))

    Each term is a squared Mahalanobis distance over its validation standard deviation; the
    validation means (loc) are left out, a constant offset that would cost a node and
    changes no decision (the threshold is picked on the same scores). With an `outlier`
    term, alpha * softplus(features @ w + b) ("ood/outlier", (B, 1)) is added (5 nodes).
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
        ]
    )
    terms = "ood/distances"
    if outlier is not None:
        g.initializer.extend(
            [
                _const("ood/outlier_w", outlier.w.astype(np.float32)[:, None]),  # (D, 1)
                _const("ood/outlier_b", np.array([outlier.b], dtype=np.float32)),
                _const("ood/outlier_alpha", np.array([outlier.alpha], dtype=np.float32)),
            ]
        )
        g.node.extend(
            [
                helper.make_node(
                    "Gemm", [features, "ood/outlier_w", "ood/outlier_b"], ["ood/outlier_logit"], name="ood/Outlier"
                ),
                helper.make_node("Softplus", ["ood/outlier_logit"], ["ood/outlier_softplus"], name="ood/Softplus"),
                helper.make_node(
                    "Mul", ["ood/outlier_softplus", "ood/outlier_alpha"], ["ood/outlier"], name="ood/OutlierWeight"
                ),
                helper.make_node("Concat", ["ood/distances", "ood/outlier"], ["ood/terms"], axis=1, name="ood/Terms"),
            ]
        )
        terms = "ood/terms"
    g.node.append(helper.make_node("ReduceSum", [terms, "ood/axis1"], [output], keepdims=0, name="ood/Sum"))
    logits = next(o for o in model.graph.output if o.name == "logits")
    batch = logits.type.tensor_type.shape.dim[0]
    score = helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch.dim_param or batch.dim_value])
    del g.output[:]
    g.output.extend([logits, score])
    return out


def strip_trust(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without the trust step's nodes and initializers (named under
    PREFIX): the classifier as trained, `logits` its only output, for a refit."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    keep = [n for n in g.node if not n.name.startswith(PREFIX) and not any(o.startswith(PREFIX) for o in n.output)]
    keep = [n for n in keep if "ood_score" not in n.output]
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if not t.name.startswith(PREFIX)]
    del g.initializer[:]
    g.initializer.extend(inits)
    outputs = [o for o in g.output if o.name == "logits"]
    del g.output[:]
    g.output.extend(outputs)
    del g.value_info[:]
    return out


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes inferred, opset 17 kept, checked with full_check."""
    if [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] != [OPSET]:
        raise ValueError(f"expected opset {OPSET}")
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


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
