"""Metrics and calibration for the trust step: AUROC, thresholds, false accept/reject rates,
expected calibration error, reliability diagrams and the temperature fit. numpy only
(matplotlib for the diagram)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from service import ood as serve_ood
from service import preprocessing as pp

PASS_RATE = 0.95  # the share of validation inputs that must pass the threshold


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


def calibration_report(l_val, y_val, l_test, y_test, eps, fitted_on, png: Path, name: str, log) -> dict:
    """The temperature fitted on validation logits, its effect on the test set, a reliability
    diagram at `png`: {"metadata": the calibration block, "evaluation": the numbers}."""
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
