"""The trust step's metrics (training.ood_metrics) and graph surgery (training.ood_graph) on
synthetic data with known answers (no datasets)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service import ood as serve_ood
from service import preprocessing as pp
from training import ood_graph as graph
from training import ood_metrics as metrics
from training import ood_text

# --------------------------------------------------------------------------- AUROC


def brute_auroc(s_in, s_out):
    s_in, s_out = np.asarray(s_in, float), np.asarray(s_out, float)
    wins = (s_out[:, None] > s_in[None, :]).sum() + 0.5 * (s_out[:, None] == s_in[None, :]).sum()
    return wins / (len(s_in) * len(s_out))


def test_auroc_extremes_and_ties():
    assert metrics.auroc([0, 1, 2], [3, 4]) == 1.0
    assert metrics.auroc([3, 4], [0, 1, 2]) == 0.0
    assert metrics.auroc([1, 1, 1], [1, 1]) == 0.5
    # hand count: out=2 beats in {1}, ties in {2}: (1 + 0.5) / 2; out=3 beats both: 2 / 2
    assert metrics.auroc([1, 2], [2, 3]) == pytest.approx((1.5 + 2) / 4)


def test_auroc_matches_pairwise_count_with_many_ties():
    rng = np.random.default_rng(0)
    s_in = rng.integers(0, 6, 300)  # few distinct values: ties everywhere
    s_out = rng.integers(2, 9, 200)
    assert metrics.auroc(s_in, s_out) == pytest.approx(brute_auroc(s_in, s_out), abs=1e-12)


def test_auroc_is_rank_based():
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(0, 1, 500), rng.normal(1, 1, 400)
    assert metrics.auroc(s_in, s_out) == pytest.approx(metrics.auroc(np.exp(s_in), np.exp(s_out)))
    # two unit-variance Gaussians one sigma apart: AUROC = Phi(1 / sqrt 2) = 0.760
    assert metrics.auroc(s_in, s_out) == pytest.approx(0.760, abs=0.03)


def test_auroc_needs_both_sides():
    with pytest.raises(ValueError):
        metrics.auroc([], [1.0])


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rate", [0.95, 0.9, 0.5])
def test_threshold_passes_at_least_the_rate_and_is_the_smallest_such(seed, rate):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=997), 1)  # ties at the cut are likely
    t = metrics.pick_threshold(scores, rate)
    assert np.mean(scores <= t) >= rate
    below = scores[scores < t]
    if len(below):
        assert np.mean(scores <= below.max()) < rate
    assert metrics.false_reject_rate(scores, t) == pytest.approx(1 - np.mean(scores <= t))


@pytest.mark.parametrize("n", [20, 997, 5000])
def test_threshold_without_ties_is_the_ceil_quantile(n):
    scores = np.random.default_rng(n).permutation(n).astype(float)  # 0..n-1, no ties
    t = metrics.pick_threshold(scores, 0.95)
    assert t == np.ceil(0.95 * n) - 1  # exactly ceil(0.95 n) scores pass
    assert np.mean(scores <= t) >= 0.95 > np.mean(scores <= t - 1)


def test_false_accept_and_reject_rates():
    assert metrics.false_accept_rate([1, 2, 3, 4], 2.5) == 0.5
    assert metrics.false_accept_rate([1, 2, 3, 4], 2.0) == 0.5  # equal to the threshold passes
    assert metrics.false_reject_rate([1, 2, 3, 4], 3.0) == 0.25


# --------------------------------------------------------------------------- ECE


def test_ece_of_a_calibrated_predictor_is_zero_and_of_a_confident_wrong_one_is_one():
    # 10 rows at confidence 0.8 (bin 12 of 15), 8 of them right: perfectly calibrated
    probs = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert metrics.ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert metrics.ece(np.tile([1.0, 0.0], (5, 1)), np.ones(5, int)) == pytest.approx(1.0)


def test_ece_hand_computed_two_bins():
    # bin of conf 0.9 (4 rows, 2 right): gap 0.4; bin of conf 0.6 (4 rows, 4 right): gap 0.4
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 4)
    labels = np.array([0, 0, 1, 1, 0, 0, 0, 0])
    assert metrics.ece(probs, labels, bins=15) == pytest.approx(0.4)
    n, conf, acc = metrics.reliability(probs, labels, bins=15)
    assert n.sum() == 8 and n[13] == 4 and n[8] == 4  # 0.9 -> (13/15, 14/15], 0.6 -> (8/15, 9/15]
    assert acc[13] == 0.5 and conf[8] == pytest.approx(0.6)


def test_ece_bins_edges_are_right_closed():
    # confidence exactly 1/15*k belongs to bin k-1; 1.0 to the last bin
    assert metrics._bins(np.array([1 / 15, 1.0, 0.5]), 15).tolist() == [0, 14, 7]


# --------------------------------------------------------------------------- temperature


def synthetic_logits(n, k, true_t, seed):
    """Labels drawn from softmax(z); the model reports z * true_t (overconfident if > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, k))
    p = pp.softmax(z).astype(np.float64)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z * true_t, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_scale(true_t):
    logits, labels = synthetic_logits(20000, 5, true_t, seed=3)
    t = metrics.fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    before = metrics.ece(pp.softmax(logits), labels)
    after = metrics.ece(serve_ood.calibrated_probabilities(logits, t), labels)
    assert after < 0.02
    if true_t != 1.0:
        assert after < before


def test_fit_temperature_minimises_the_nll():
    logits, labels = synthetic_logits(5000, 4, 1.7, seed=4)
    t = metrics.fit_temperature(logits, labels)
    best = metrics.nll(serve_ood.calibrated_probabilities(logits, t), labels)
    for other in (t * 0.9, t * 1.1):
        assert metrics.nll(serve_ood.calibrated_probabilities(logits, other), labels) > best


def test_label_smoothing_inversion_undoes_smoothed_targets():
    # a model that learned smoothed targets exactly: p_ls = (1 - eps) q + eps / K
    eps, k = 0.1, 5
    q = pp.softmax(np.random.default_rng(5).normal(0, 3, (50, k))).astype(np.float64)
    logits = np.log((1 - eps) * q + eps / k)
    np.testing.assert_allclose(serve_ood.calibrated_probabilities(logits, 1.0, eps), q, atol=2e-5)
    probs = serve_ood.calibrated_probabilities(logits, 0.7, eps)
    assert (probs.argmax(1) == logits.argmax(1)).all()


# --------------------------------------------------------------------------- service helpers


def test_calibrated_probabilities_is_a_tempered_softmax():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(serve_ood.calibrated_probabilities(logits, 1.0), pp.softmax(logits), atol=1e-7)
    p = serve_ood.calibrated_probabilities(logits, 2.0)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p, pp.softmax(logits / 2), atol=1e-7)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    big = serve_ood.calibrated_probabilities(np.array([[1e4, -1e4]], np.float32), 0.5)
    assert np.isfinite(big).all() and big[0, 0] == 1.0
    with pytest.raises(ValueError):
        serve_ood.calibrated_probabilities(logits, 0.0)


def test_unknown_token_rate():
    assert serve_ood.unknown_token_rate([5, 1, 7, 1], pp.UNK) == 0.5
    assert serve_ood.unknown_token_rate([pp.UNK], pp.UNK) == 1.0
    assert serve_ood.unknown_token_rate([], pp.UNK) == 0.0
    index = {"<pad>": 0, "<unk>": 1, "good": 2, "film": 3}
    rates = ood_text.unknown_token_rates(["Good film", "good zzz", "", "qqq www"], index)
    assert rates.tolist() == [0.0, 0.5, 1.0, 1.0]  # no tokens -> [UNK], as the service encodes it


# --------------------------------------------------------------------------- graph surgery


def tiny_classifier(seed=0, width=4):
    """The CNN layout (two conv/pool blocks, Flatten, Gemm, Relu, Gemm -> logits), random weights."""
    rng = np.random.default_rng(seed)
    w = lambda *s: numpy_helper.from_array(rng.normal(0, 0.5, s).astype(np.float32))
    inits = []
    for name, shape in [("c1", (width, 1, 3, 3)), ("c2", (2 * width, width, 3, 3)), ("c3", (2 * width, 2 * width, 3, 3)),
                        ("g1", (2 * width * 3 * 3, 16)), ("g2", (16, 10))]:  # fmt: skip
        t = w(*shape)
        t.name = name
        inits.append(t)
    nodes = [
        helper.make_node("Conv", ["image", "c1"], ["a1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),  # 14x14
        helper.make_node("Conv", ["p1", "c2"], ["a2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),  # 7x7
        helper.make_node("Conv", ["p2", "c3"], ["a3"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a3"], ["r3"]),
        helper.make_node("MaxPool", ["r3"], ["p3"], kernel_shape=[2, 2], strides=[2, 2]),  # 3x3
        helper.make_node("Flatten", ["p3"], ["flat"]),
        helper.make_node("Gemm", ["flat", "g1"], ["h"]),
        helper.make_node("Relu", ["h"], ["pen"]),
        helper.make_node("Gemm", ["pen", "g2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def numpy_features(p1, pen):
    """Columns as add_feature_nodes lays them out: quadrant stds (channel-major), whole-map
    stds, then the penultimate activation."""
    b, c1 = p1.shape[:2]
    quad = p1.reshape(b, c1, 2, 7, 2, 7).std(axis=(3, 5)).reshape(b, -1)
    return np.concatenate([quad, p1.std(axis=(2, 3)), pen], axis=1)


def test_feature_and_score_subgraph_match_numpy_and_keep_logits():
    model = tiny_classifier()
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (200, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 200)
    feat_model, feat_name, cols = graph.add_feature_nodes(model)
    assert list(cols) == list(graph.FEATURES)
    taps = graph.session(graph.expose(feat_model, ["p1", "pen", feat_name]))
    p1, pen, feats = taps.run(["p1", "pen", feat_name], {"image": x})
    np.testing.assert_allclose(feats, numpy_features(p1, pen), rtol=1e-3, atol=1e-3)
    assert sorted(np.concatenate(list(cols.values())).tolist()) == list(range(feats.shape[1]))

    comps = [graph.fit_component(f, feats[:150, cols[f]], y[:150]) for f in graph.FEATURES]
    for c in comps:
        c.scale = float(c.distance(feats[150:, cols[c.feature]]).std())
    new = graph.finalize(graph.add_score_nodes(feat_model, feat_name, cols, comps))
    assert [o.name for o in new.graph.output] == ["logits", "ood_score"]
    assert new.graph.output[1].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.version for o in new.opset_import if o.domain in ("", "ai.onnx")] == [17]

    logits_old = graph.session(model).run(["logits"], {"image": x})[0]
    logits_new, score = graph.session(new).run(["logits", "ood_score"], {"image": x})
    assert score.shape == (200,) and score.dtype == np.float32
    np.testing.assert_array_equal(logits_new, logits_old)
    expected = sum(c.distance(feats[:, cols[c.feature]]) / c.scale for c in comps)
    np.testing.assert_allclose(score, expected, rtol=2e-3, atol=1e-3)
    # the batch axis is dynamic and rows are independent
    one = graph.session(new).run(["ood_score"], {"image": x[:1]})[0]
    np.testing.assert_allclose(one, score[:1], rtol=1e-5)


def test_flat_images_give_a_finite_score():
    """A constant page makes every spatial variance 0 (or -1e-8 after rounding): no NaN."""
    model = tiny_classifier()
    feat_model, feat_name, cols = graph.add_feature_nodes(model)
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (100, 1, 28, 28)).astype(np.float32)
    feats = graph.session(graph.expose(feat_model, [feat_name])).run([feat_name], {"image": x})[0]
    comps = [graph.fit_component(f, feats[:, cols[f]], rng.integers(0, 10, 100)) for f in graph.FEATURES]
    new = graph.finalize(graph.add_score_nodes(feat_model, feat_name, cols, comps))
    flat = np.stack([np.full((1, 28, 28), v, np.float32) for v in (-0.42, 0.0, 1.7, 2.82)])
    score = graph.session(new).run(["ood_score"], {"image": flat})[0]
    assert np.isfinite(score).all()


def test_fit_component_whitens_the_shared_covariance():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 30000)
    means = np.array([[0, 0], [5, 0], [0, 5]], float)
    a = np.array([[2.0, 0.0], [1.0, 0.5]])
    f = means[y] + rng.normal(size=(30000, 2)) @ a.T
    c = graph.fit_component("f", f, y, shrinkage=0.0)
    inv = np.linalg.inv(a @ a.T)
    point = np.array([[1.0, 1.0]])
    want = min(float(((point - m) @ inv @ (point - m).T).item()) for m in means)
    assert c.distance(point)[0] == pytest.approx(want, rel=0.05)


def test_reliability_diagram_writes_a_png(tmp_path):
    logits, labels = synthetic_logits(500, 3, 2.0, seed=6)
    path = tmp_path / "rel.png"
    metrics.reliability_diagram(pp.softmax(logits), serve_ood.calibrated_probabilities(logits, 2.0), labels, path, "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- outlier exposure


def test_outlier_term_separates_a_shifted_cluster_and_folds_the_standardisation():
    rng = np.random.default_rng(3)
    inliers = rng.normal(0, 1, (2000, 6)) * [1, 10, 100, 1, 1, 1]  # scales differ: standardised inside
    outliers = rng.normal(0, 1, (200, 6)) * [1, 10, 100, 1, 1, 1] + [0, 0, 0, 4, 0, 0]
    term = graph.fit_outlier_term([(inliers, 0.5, 0), (outliers, 0.5, 1)], alpha=2.0)
    assert term.w.shape == (6,)
    per_sd = np.abs(term.w) * [1, 10, 100, 1, 1, 1]  # weight per standard deviation of each column
    assert per_sd[3] > 5 * np.delete(per_sd, 3).max()  # the one informative column
    v_in, v_out = term.value(inliers), term.value(outliers)
    assert metrics.auroc(v_in, v_out) > 0.99
    assert (v_in >= 0).all() and np.median(v_in) < 0.1 < np.median(v_out)  # softplus: never lowers a score


def test_outlier_term_in_the_graph_matches_numpy_and_adds_to_the_mahalanobis_sum():
    model = tiny_classifier()
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (200, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 200)
    feat_model, feat_name, cols = graph.add_feature_nodes(model)
    feats = graph.session(graph.expose(feat_model, [feat_name])).run([feat_name], {"image": x})[0]
    comps = [graph.fit_component(f, feats[:, cols[f]], y) for f in graph.FEATURES]
    term = graph.fit_outlier_term([(feats[:150], 0.5, 0), (feats[150:], 0.5, 1)], alpha=3.0)
    plain = graph.finalize(graph.add_score_nodes(feat_model, feat_name, cols, comps))
    new = graph.finalize(graph.add_score_nodes(feat_model, feat_name, cols, comps, outlier=term))
    assert [o.name for o in new.graph.output] == ["logits", "ood_score"]
    s_plain = graph.session(plain).run(["ood_score"], {"image": x})[0]
    s_new, extra = graph.session(graph.expose(new, ["ood/outlier"])).run(["ood_score", "ood/outlier"], {"image": x})
    np.testing.assert_allclose(extra[:, 0], term.value(feats), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(s_new, s_plain + term.value(feats), rtol=1e-3, atol=1e-3)


def test_strip_trust_gives_back_the_classifier_as_trained():
    """A refit starts from the plain classifier: stripping a fitted graph leaves the original
    nodes, initializers and outputs, and fitting again gives the same graph."""
    model = tiny_classifier()
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (120, 1, 28, 28)).astype(np.float32)
    feat_model, feat_name, cols = graph.add_feature_nodes(model)
    feats = graph.session(graph.expose(feat_model, [feat_name])).run([feat_name], {"image": x})[0]
    comps = [graph.fit_component(f, feats[:, cols[f]], rng.integers(0, 10, 120)) for f in graph.FEATURES]
    term = graph.fit_outlier_term([(feats[:60], 0.5, 0), (feats[60:], 0.5, 1)], alpha=1.0)
    fitted = graph.finalize(graph.add_score_nodes(feat_model, feat_name, cols, comps, outlier=term))
    stripped = graph.strip_trust(fitted)
    assert [n.name for n in stripped.graph.node] == [n.name for n in model.graph.node]
    assert {t.name for t in stripped.graph.initializer} == {t.name for t in model.graph.initializer}
    assert [o.name for o in stripped.graph.output] == ["logits"]
    onnx.checker.check_model(stripped, full_check=True)
    again_feat, _, _ = graph.add_feature_nodes(stripped)
    again = graph.finalize(graph.add_score_nodes(again_feat, feat_name, cols, comps, outlier=term))
    np.testing.assert_array_equal(
        graph.session(again).run(["ood_score"], {"image": x})[0],
        graph.session(fitted).run(["ood_score"], {"image": x})[0],
    )
