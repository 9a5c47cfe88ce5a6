"""Every classification says whether to trust it: out-of-distribution flags and calibrated
confidence, checked on committed real samples (MNIST, Fashion-MNIST, SST-2) and generated
noise, with thresholds that fail if the detector or the calibration regress."""

from __future__ import annotations

import numpy as np
import pytest

from service import preprocessing as pp
from tests.conftest import active_meta, png


def classify_images(client, images: np.ndarray, model: str, **fields) -> list[dict]:
    out = []
    for start in range(0, len(images), 64):
        files = [("image", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images[start : start + 64])]
        r = client.post("/classify", files=files, data={"model": model, **fields})
        assert r.status_code == 200, r.text
        body = r.json()
        out += body.get("results", [body])
    return out


@pytest.mark.parametrize(
    "model, fixture, bar",
    [("digits", "mnist500", 0.93), ("fashion", "fashion500", 0.92)],
)
def test_in_distribution_images_mostly_pass(client, request, model, fixture, bar):
    images, _ = request.getfixturevalue(fixture)
    results = classify_images(client, images, model)
    assert all({"ood_score", "in_distribution"} <= set(r) for r in results)
    assert np.mean([r["in_distribution"] for r in results]) >= bar


@pytest.mark.parametrize(
    "model, fixture, bar",
    [("digits", "fashion500", 0.97), ("fashion", "mnist500", 0.95)],
)
def test_the_other_dataset_is_flagged(client, request, model, fixture, bar):
    images, _ = request.getfixturevalue(fixture)
    results = classify_images(client, images[:200], model)
    assert np.mean([not r["in_distribution"] for r in results]) >= bar


@pytest.mark.parametrize("model", ["digits", "fashion"])
def test_noise_blank_and_flat_images_are_flagged(client, model):
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    flat = np.stack([np.full((28, 28), v, np.uint8) for v in (0, 30, 90, 128, 200, 255)])
    results = classify_images(client, np.concatenate([noise, flat]), model)
    flagged = [not r["in_distribution"] for r in results]
    assert all(flagged), [r["ood_score"] for r in results]
    assert min(r["ood_score"] for r in results) > active_meta(model)["ood"]["threshold"]


def test_reject_ood_answers_422_naming_the_inputs_and_their_scores(client, mnist500):
    noise = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    images = np.stack([mnist500[0][0], mnist500[0][1], noise])
    files = [("image", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    r = client.post("/classify", files=files, data={"reject_ood": "true"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["out_of_distribution"] == [2] and "input #3 (ood_score" in body["error"]
    assert client.post("/classify", files=files[:2], data={"reject_ood": "true"}).status_code == 200
    assert client.post("/classify", files=files).status_code == 200  # the default: labels, flagged


def test_text_carries_its_unknown_token_rate_and_a_flag(client):
    fine = client.post("/classify", json={"text": "a gorgeous, witty and moving film"}).json()
    assert fine["unknown_token_rate"] == 0 and fine["in_distribution"] is True
    odd = client.post("/classify", json={"text": "zorblax quimfrith vellnor spazzle"}).json()
    assert odd["unknown_token_rate"] == 1 and odd["in_distribution"] is False
    r = client.post("/classify", json={"texts": ["great film", "zorblax quimfrith"], "reject_ood": True})
    assert r.status_code == 422 and r.json()["out_of_distribution"] == [1]


def test_clients_get_calibrated_probabilities(inprocess, mnist500):
    """The confidence is softmax(logits / T) with the metadata's T, not the raw softmax."""
    from service import tasks

    core = inprocess.core
    model = core.models["digits"]
    x = pp.scale_pixels(mnist500[0][:20])
    logits = tasks.image_outputs(model, x)["logits"]
    cal = active_meta("digits")["calibration"]
    want = pp.softmax(logits / np.float32(cal["temperature"]))
    results = classify_images(inprocess.client, mnist500[0][:20], "digits", top_k="1")
    got = np.array([r["confidence"] for r in results])
    np.testing.assert_allclose(got, want.max(1), atol=2e-6)
    assert not np.allclose(got, pp.softmax(logits).max(1), atol=1e-4) or cal["temperature"] == 1


def test_models_shows_each_classifier_s_trust_settings(client):
    by_name = {m["name"]: m for m in client.get("/models").json()["models"]}
    for name in ("digits", "fashion", "sentiment"):
        meta = active_meta(name)
        trust = by_name[name]["trust"]
        assert trust["temperature"] == meta["calibration"]["temperature"]
        assert trust["ood_threshold"] == meta["ood"]["threshold"]
        assert trust["baseline_ood_rate"] == meta["ood"]["baseline_ood_rate"]
    assert "trust" not in by_name["generator"]
