"""The clients teams already run, against the real server: Triton's (tritonclient, the Open
Inference Protocol under /v2) and BentoML's own (SyncHTTPClient, from /schema.json)."""

from __future__ import annotations

import io
import json
import re

import bentoml
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.conftest import EXPORTED, FIXTURES, active_meta, manifest, png

SEVEN = FIXTURES / "mnist_test0_label7.png"


@pytest.fixture(scope="module")
def tc(server):
    with triton.InferenceServerClient(f"127.0.0.1:{server.port}") as c:
        yield c


def normalized(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> the digits model's input: (N, 1, 28, 28) normalized with its metadata."""
    pre = active_meta("digits")["preprocessing"]
    return ((images.astype(np.float32) / 255 - pre["mean"]) / pre["std"]).astype(np.float32)[:, None]


def test_tritonclient_health_metadata_and_config(tc, server):
    assert tc.is_server_live() and tc.is_server_ready()
    assert tc.is_model_ready("digits") and tc.is_model_ready("sentiment_text")
    version = active_meta("digits")["version"]
    assert tc.is_model_ready("digits", version) and not _ready_or_false(tc, server, "digits", "no-such-version")
    meta = tc.get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    assert meta["versions"][0] == version and manifest()["families"]["digits"]["previous"] in meta["versions"]
    config = tc.get_model_config("digits")
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [1, 28, 28]
    assert set(tc.get_server_metadata()["extensions"]) == {"binary_tensor_data", "model_configuration"}
    text = tc.get_model_metadata("sentiment_text")
    assert text["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in text["outputs"]] == ["probabilities", "label"]


def _ready_or_false(tc, server, name: str, version: str) -> bool:
    """Triton's client raises on a non-200 ready answer: only the protocol's own "not ready"
    (404 for an unknown version) counts as False; anything else (a 500) fails the test."""
    import httpx

    try:
        return tc.is_model_ready(name, version)
    except InferenceServerException:
        status = httpx.get(f"{server.url}/v2/models/{name}/versions/{version}/ready", timeout=10).status_code
        assert status == 404, f"ready answered {status}, not the protocol's 404"
        return False


@pytest.mark.parametrize("binary", [True, False], ids=["binary tensors", "JSON tensors"])
def test_tritonclient_infer_matches_classify_on_500_real_digits(server, tc, mnist500, binary):
    import httpx

    images, labels = mnist500
    via_v2, via_classify = [], []
    for start in range(0, 500, 64):
        batch = images[start : start + 64]
        x = normalized(batch)
        inp = triton.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput("logits", binary_data=binary)
        r = tc.infer("digits", [inp], outputs=[out], request_id=f"batch-{start}")
        assert r.get_response()["id"] == f"batch-{start}"
        via_v2 += r.as_numpy("logits").argmax(1).tolist()
        files = [("image", (f"{i}.png", png(img), "image/png")) for i, img in enumerate(batch)]
        body = httpx.post(server.url + "/classify", files=files, data={"top_k": "1"}, timeout=60).json()
        via_classify += [x["index"] for x in (body.get("results", [body]))]
    assert via_v2 == via_classify
    assert np.mean(np.array(via_v2) == labels) >= 0.99


def test_tritonclient_sentiment_text_agrees_with_classify(server, tc, sst2_dev200):
    import httpx

    sentences, _ = sst2_dev200
    labels_v2 = []
    for start in range(0, 200, 50):
        t = triton.InferInput("text", [len(sentences[start : start + 50])], "BYTES")
        t.set_data_from_numpy(np.array([s.encode() for s in sentences[start : start + 50]], dtype=object))
        labels_v2 += [x.decode() for x in tc.infer("sentiment_text", [t]).as_numpy("label")]
    labels_http = []
    for start in range(0, 200, 50):
        r = httpx.post(server.url + "/classify", json={"texts": sentences[start : start + 50]}, timeout=60)
        labels_http += [x["label"] for x in r.json()["results"]]
    assert labels_v2 == labels_http


def test_tritonclient_raw_models_generate_compress_and_denoise(tc):
    z = np.random.default_rng(0).standard_normal((4, 64), dtype=np.float32)
    zi, di = triton.InferInput("z", [4, 64], "FP32"), triton.InferInput("class_weights", [4, 10], "FP32")
    zi.set_data_from_numpy(z)
    di.set_data_from_numpy(np.eye(10, dtype=np.float32)[[3, 3, 8, 8]])
    images = tc.infer("generator", [zi, di]).as_numpy("images")
    assert images.shape == (4, 1, 28, 28)
    x = triton.InferInput("image", [4, 1, 28, 28], "FP32")
    x.set_data_from_numpy(np.clip(images, 0, 1).astype(np.float32))
    latent = tc.infer("encoder", [x]).as_numpy("latent")
    assert latent.shape == (4, 32) and latent.min() >= 0 and latent.max() <= 1
    assert tc.infer("denoiser", [x]).as_numpy("image_out").shape == (4, 1, 28, 28)


LOADED = [
    (name, which)
    for name, entry in manifest()["models"].items()
    for which in ("active", "previous")
    if manifest()["families"][entry["family"]][which] is not None
]


@pytest.mark.parametrize("name, which", LOADED, ids=[f"{n}-{w}" for n, w in LOADED])
def test_tritonclient_describes_and_runs_every_loaded_version_with_its_own_signature(tc, name, which):
    m = manifest()  # read now: a retrain may have registered a version since collection
    entry = m["models"][name]
    version = m["families"][entry["family"]][which]
    meta = json.loads((EXPORTED / entry["versions"][version]["metadata"]).read_text())
    dtypes = {"float32": "FP32", "int64": "INT64"}
    want = [
        {
            "name": t["name"],
            "datatype": dtypes[t["dtype"]],
            "shape": [d if isinstance(d, int) else -1 for d in t["shape"]],
        }
        for t in meta["inputs"]
    ]
    described = tc.get_model_metadata(name, version)
    assert described["inputs"] == want
    assert [o["name"] for o in described["outputs"]] == [o["name"] for o in meta["outputs"]]
    inputs = []
    for t in want:  # zeros, and ones for integers (token ids, lengths and digits all accept 1)
        shape = [2 if i == 0 else (3 if d == -1 else d) for i, d in enumerate(t["shape"])]
        inp = triton.InferInput(t["name"], shape, t["datatype"])
        inp.set_data_from_numpy(np.zeros(shape, np.float32) if t["datatype"] == "FP32" else np.ones(shape, np.int64))
        inputs.append(inp)
    r = tc.infer(name, inputs, model_version=version).get_response()
    assert r["model_version"] == version
    assert [o["name"] for o in r["outputs"]] == [o["name"] for o in meta["outputs"]]


def trust_counts(server, model: str) -> tuple[float, float]:
    """(classifications in deepserve_prediction_confidence, in deepserve_predictions_total)
    of one model, from /metrics (the scrape flushes the worker's aggregated metrics)."""
    confidence = verdicts = 0.0
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        found = re.match(
            r"^(deepserve_prediction_confidence_count|deepserve_predictions_total)\{([^}]*)\} (\S+)$", line
        )
        if found and f'model="{model}"' in found.group(2).split(","):
            if found.group(1) == "deepserve_predictions_total":
                verdicts += float(found.group(3))
            else:
                confidence += float(found.group(3))
    return confidence, verdicts


@pytest.mark.parametrize(
    "model",
    [n for n, e in manifest()["models"].items() if e["task"] in ("image-classification", "text-classification")],
)
def test_v2_classifications_feed_the_trust_metrics_by_the_rows_sent(server, tc, model, sst2_dev200):
    task = manifest()["models"][model]["task"]
    if task == "image-classification":
        samples = {"fashion": "fashion_test500.npz"}.get(model, "mnist_test500.npz")
        pre = active_meta(model)["preprocessing"]
        images = np.load(FIXTURES / samples)["images"][:40]
        x = ((images.astype(np.float32) / 255 - pre["mean"]) / pre["std"]).astype(np.float32)[:, None]
        inp = triton.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        name, rows = model, len(x)
    else:
        texts = sst2_dev200[0][:30]
        inp = triton.InferInput("text", [len(texts)], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        name, rows = f"{model}_text", len(texts)
    before = trust_counts(server, model)
    tc.infer(name, [inp])
    tc.infer(name, [inp])
    after = trust_counts(server, model)
    assert (after[0] - before[0], after[1] - before[1]) == (2 * rows, 2 * rows)


@pytest.mark.parametrize(
    "name, tensor, words",
    [
        ("digitz", ("image", [1, 1, 28, 28], "FP32"), "unknown model 'digitz'"),
        ("digits", ("image", [1, 1, 28, 27], "FP32"), "expects [-1, 1, 28, 28]"),
        ("digits", ("image", [1, 1, 28, 28], "FP64"), "expects FP32"),
        ("digits", ("picture", [1, 1, 28, 28], "FP32"), "unexpected input 'picture'"),
        ("digits", ("image", [65, 1, 28, 28], "FP32"), "1 to 64 per request"),
    ],
    ids=["wrong name", "wrong shape", "wrong datatype", "wrong input", "too many rows"],
)
def test_tritonclient_errors_say_what_was_wrong(tc, name, tensor, words):
    tname, shape, dtype = tensor
    inp = triton.InferInput(tname, shape, dtype)
    inp.set_data_from_numpy(np.zeros(shape, np.float64 if dtype == "FP64" else np.float32))
    with pytest.raises(InferenceServerException) as err:
        tc.infer(name, [inp])
    assert words in err.value.message(), err.value.message()
    assert err.value.status() in ("400", "404")


# --------------------------------------------------------------------------- BentoML's client


@pytest.fixture(scope="module")
def bento(server):
    with bentoml.SyncHTTPClient(server.url, timeout=60) as c:
        yield c


def test_bentoml_client_classifies_images_and_text(bento, tmp_path, fashion500):
    assert bento.classify(image=SEVEN)["label"] == "7"
    shoe = tmp_path / "shoe.png"
    shoe.write_bytes(png(fashion500[0][0]))
    body = bento.classify(image=[SEVEN, shoe], model="fashion", top_k=1)
    assert len(body["results"]) == 2 and body["results"][1]["label"] == "Ankle boot"
    # text through the same method: the client sends multipart form fields, /classify reads them
    assert bento.classify(text="A gorgeous, witty and moving film.")["label"] == "positive"
    many = bento.classify(texts=["a tedious mess", "wonderful"], top_k=1)
    assert [r["label"] for r in many["results"]] == ["negative", "positive"]
    assert not hasattr(bento, "classify_text")  # one method per route


def test_text_as_form_fields_on_classify(server):
    """What BentoML's client sends for text, and what curl -F sends: multipart, no image."""
    r = httpx.post(server.url + "/classify", files={"text": (None, "A gorgeous, witty film.")})
    assert r.status_code == 200 and r.json()["label"] == "positive", r.text
    r = httpx.post(server.url + "/classify", files={"text": (None, "42"), "top_k": (None, "1")})
    assert r.status_code == 200 and len(r.json()["top_k"]) == 1, r.text  # "42" stays a text
    r = httpx.post(server.url + "/classify", files={"texts": (None, '["a tedious mess", "wonderful"]')})
    assert [x["label"] for x in r.json()["results"]] == ["negative", "positive"], r.text
    # url-encoded, as BentoML's client sends a call with no file; other routes still want their type
    r = httpx.post(server.url + "/classify", data={"text": '"A gorgeous, witty film."', "top_k": "1"})
    assert r.status_code == 200 and r.json()["label"] == "positive", r.text
    r = httpx.post(server.url + "/classify", data={"text": "x", "image": "y"})
    assert r.status_code == 400 and "image" in r.json()["error"], r.text
    r = httpx.post(server.url + "/compress", data={"code": "x"})
    assert r.status_code == 415, r.text


def test_bentoml_client_generates_compresses_decompresses_and_denoises(bento, server, tmp_path):
    grid = bento.generate(n=4, digit=3, seed=1)
    assert isinstance(grid, Image.Image) and grid.size == (2 * 30 + 2, 2 * 30 + 2)
    code = bento.compress(image=SEVEN)
    assert code["bytes"] == 16
    back = bento.decompress(code=code["code"])
    assert isinstance(back, Image.Image) and back.size == (28, 28)
    noisy = tmp_path / "noisy.png"
    noisy.write_bytes(SEVEN.read_bytes())
    clean = bento.denoise(image=noisy)
    assert clean.size == (28, 28)
    # the same pixels as plain HTTP gives for the same request
    plain = httpx.post(server.url + "/generate", json={"n": 4, "digit": 3, "seed": 1}, timeout=60)
    np.testing.assert_array_equal(np.asarray(grid.convert("L")), np.asarray(Image.open(io.BytesIO(plain.content))))


def test_bentoml_client_errors_carry_the_json_message(bento):
    with pytest.raises(bentoml.exceptions.InvalidArgument) as err:
        bento.classify(image=SEVEN, top_k=0)
    assert "top_k must be between 1 and 10" in err.value.message
