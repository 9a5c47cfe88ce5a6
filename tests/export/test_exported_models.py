"""The committed models: verified files, the signature their metadata claims, and quality
on committed real test samples (tests/fixtures) — these assertions fail if a worse model
is committed."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from service import preprocessing as pp
from service import tasks
from service.core import load_all
from service.metadata import read_manifest
from service.runtime import sha256_file
from tests.conftest import EXPORTED
from training.families import FAMILIES

MANIFEST = read_manifest(EXPORTED)
EXPECTED = {m for f in FAMILIES.values() for m in f.models}


def test_the_manifest_serves_every_family_of_the_registry():
    assert set(MANIFEST.families) == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert MANIFEST.families[name].models == list(family.models)
    assert set(MANIFEST.models) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_file_metadata_and_signature_agree(name):
    entry = MANIFEST.models[name]
    files = entry.versions[MANIFEST.families[entry.family].active]
    meta = json.loads((EXPORTED / files.metadata).read_text())
    path = EXPORTED / files.file
    assert sha256_file(path) == meta["sha256"] == files.sha256
    assert meta["family"] == entry.family and meta["task"] == entry.task
    assert meta["meets_bars"] is True  # written by make evaluate; absent means never evaluated
    assert path.stat().st_size < 10 * 1024 * 1024  # well under the 25 MB limit
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = [(i.name, i.type) for i in session.get_inputs()]
    want = [(s["name"], f"tensor({'float' if s['dtype'] == 'float32' else s['dtype']})") for s in meta["inputs"]]
    assert got == want
    assert [o.name for o in session.get_outputs()] == [s["name"] for s in meta["outputs"]]
    for spec, inp in zip(meta["inputs"], session.get_inputs()):
        assert inp.shape[0] == "batch" and len(inp.shape) == len(spec["shape"])
    assert meta["training"]["command"].startswith("python -m training")
    assert meta["metrics"], "run `make evaluate` to record metrics"
    # recomputed, not read back: the file on disk still gives the outputs recorded beside it
    smoke = np.load(path.parent / meta["smoke"]["file"])
    feeds = {k.removeprefix("in:"): smoke[k] for k in smoke.files if k.startswith("in:")}
    outs = session.run(None, feeds)
    for spec, got_out in zip(meta["outputs"], outs):
        want_out = smoke[f"out:{spec['name']}"]
        assert got_out.shape == want_out.shape
        assert float(np.abs(got_out - want_out).max()) <= meta["smoke"]["atol"], spec["name"]


@pytest.fixture(scope="module")
def models():
    _, loaded = load_all(EXPORTED)  # every model verified: sha256, signature, task, smoke set
    return {n: m for fam in loaded.values() for n, m in fam.models.items()}


@pytest.mark.parametrize("name, bar", [("digits", 0.993), ("fashion", 0.92)])
def test_classifiers_reach_their_bar_on_500_real_test_images(models, name, bar, mnist500, fashion500):
    images, labels = mnist500 if name == "digits" else fashion500
    probs = tasks.classify_images(models[name], pp.scale_pixels(images))
    assert (probs.argmax(1) == labels).mean() >= bar


def test_sentiment_on_200_real_dev_sentences(models, sst2_dev200):
    sentences, labels = sst2_dev200
    seqs = [s or [pp.UNK] for s in tasks.encode_texts(models["sentiment"], sentences)]
    acc = (tasks.classify_token_ids(models["sentiment"], seqs).argmax(1) == labels).mean()
    # bar 0.83 on all 872 dev sentences; 200 sentences carry ±2.7% standard error
    assert acc >= 0.80


def test_sentiment_confidence_is_calibrated_on_200_real_dev_sentences(models, sst2_dev200):
    from training.ood_metrics import ece

    m = models["sentiment"]
    sentences, labels = sst2_dev200
    logits = tasks.token_logits(m, [s or [pp.UNK] for s in tasks.encode_texts(m, sentences)])
    raw, calibrated = ece(pp.softmax(logits), labels), ece(tasks.calibrated(m, logits), labels)
    # bar: ECE <= 0.04 on all 872 dev sentences (make evaluate records it); 200 sentences add binning
    # noise (the shipped T = 2.59 gives 0.051 here, the older split's T = 1.80 would give 0.061)
    assert calibrated <= 0.06 and calibrated < raw / 2
    op, bar, _ = FAMILIES["sentiment"].trust.bars["ece_dev"]
    assert op == "<=" and m.meta.metrics["ece_dev"] <= bar


def test_sentiment_is_exact_under_padding(models):
    m = models["sentiment"]
    short, long_ = tasks.encode_texts(m, ["great film", "a long , dull and utterly pointless exercise in tedium"])
    alone = tasks.classify_token_ids(m, [short])
    together = tasks.classify_token_ids(m, [short, long_])[:1]
    np.testing.assert_allclose(alone, together, atol=1e-6)


def test_generator_draws_the_requested_digits(models):
    z, digits = pp.sample_latents(200, models["generator"].meta.preprocessing.z_dim, seed=11)
    images = tasks.generate(models["generator"], z, digits)
    assert images.shape == (200, 28, 28) and images.min() >= 0 and images.max() <= 1
    judged = tasks.classify_images(models["digits"], images).argmax(1)
    assert (judged == digits).mean() >= 0.95


def test_codec_round_trip_reaches_21_db_at_16_bytes(models, mnist500):
    x = pp.scale_pixels(mnist500[0])
    codes = tasks.compress(models["encoder"], x)
    assert {len(c) for c in codes} == {16}
    recon = tasks.decompress(models["decoder"], codes)
    assert pp.psnr(x, recon).mean() >= 21.0


@pytest.mark.parametrize("sigma, bar", [(0.3, 22.5), (0.5, 18.5)])
def test_denoiser_reaches_its_bar(models, mnist500, sigma, bar):
    x = pp.scale_pixels(mnist500[0])
    noisy = pp.add_gaussian_noise(x, sigma, np.random.default_rng(0))
    clean = tasks.denoise(models["denoiser"], noisy)
    assert pp.psnr(x, clean).mean() >= bar
    assert pp.psnr(x, clean).mean() > pp.psnr(x, noisy).mean() + 5
