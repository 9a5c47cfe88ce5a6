"""One request path behind every protocol (service.dataplane), in-process: /v2 describes and
runs every loaded version with that version's own signature, its classification traffic
moves the trust metrics exactly as /classify traffic does, and the checks both share answer
alike. Versions come from the manifest: a retrain may register new ones at any time."""

from __future__ import annotations

import json
import math

import numpy as np
import prometheus_client as prom
import pytest

from service import metrics
from service import preprocessing as pp
from tests.conftest import EXPORTED, FIXTURES, active_meta, manifest, png

DATATYPES = {"float32": "FP32", "int64": "INT64", "uint8": "UINT8"}
CLASSIFIERS = ("image-classification", "text-classification")
SAMPLES = {"digits": "mnist_test500.npz", "fashion": "fashion_test500.npz"}


def loaded_versions() -> list[tuple[str, str]]:
    """(model, "active" | "previous") for every version the manifest gives a model's family."""
    m = manifest()
    return [
        (name, which)
        for name, entry in m["models"].items()
        for which in ("active", "previous")
        if m["families"][entry["family"]][which] is not None
    ]


def version_meta(name: str, version: str) -> dict:
    return json.loads((EXPORTED / manifest()["models"][name]["versions"][version]["metadata"]).read_text())


def signature(specs: list[dict]) -> list[dict]:
    """Metadata tensor specs as /v2 describes them (named dimensions are -1)."""
    return [
        {
            "name": s["name"],
            "datatype": DATATYPES[s["dtype"]],
            "shape": [d if isinstance(d, int) else -1 for d in s["shape"]],
        }
        for s in specs
    ]


def filler(tensors: list[dict], rows: int = 2) -> list[dict]:
    """Valid input tensors for a signature: zeros, and ones for integers (token ids, lengths
    and digits all accept 1); variable dimensions get `rows` (the batch) or 3."""
    out = []
    for t in tensors:
        shape = [rows if i == 0 else (3 if d == -1 else d) for i, d in enumerate(t["shape"])]
        value = 0.0 if t["datatype"] == "FP32" else 1
        out.append({**t, "shape": shape, "data": [value] * math.prod(shape)})
    return out


@pytest.mark.parametrize("name, which", loaded_versions(), ids=[f"{n}-{w}" for n, w in loaded_versions()])
def test_v2_describes_and_runs_every_loaded_version_with_its_own_signature(inprocess, name, which):
    core = inprocess.core
    family = core.manifest.models[name].family
    version = getattr(core.manifest.families[family], which)  # what this core loaded
    meta = version_meta(name, version)
    c = inprocess.client
    r = c.get(f"/v2/models/{name}/versions/{version}")
    assert r.status_code == 200, r.text
    described = r.json()
    assert described["inputs"] == signature(meta["inputs"]) and described["outputs"] == signature(meta["outputs"])
    config = c.get(f"/v2/models/{name}/versions/{version}/config").json()
    assert [t["name"] for t in config["input"]] == [t["name"] for t in meta["inputs"]]
    r = c.post(f"/v2/models/{name}/versions/{version}/infer", json={"inputs": filler(described["inputs"])})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == version
    assert [o["name"] for o in body["outputs"]] == [o["name"] for o in meta["outputs"]]
    assert all(o["shape"][0] == 2 for o in body["outputs"])


def test_a_version_s_views_are_described_and_run_at_that_version(inprocess):
    version = active_meta("sentiment")["version"]
    c = inprocess.client
    assert c.get(f"/v2/models/sentiment_text/versions/{version}").json()["inputs"] == [
        {"name": "text", "datatype": "BYTES", "shape": [-1]}
    ]
    text = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a fine film"]}
    r = c.post(f"/v2/models/sentiment_text/versions/{version}/infer", json={"inputs": [text]})
    assert r.status_code == 200 and r.json()["model_version"] == version
    assert c.get("/v2/models/sentiment_text/versions/1999-no-such").status_code == 404


# --------------------------------------------------------------------------- the finish step


def trust_metrics(model: str) -> dict:
    """The trust metrics of one model, in-process (the default registry), after a flush."""
    metrics.aggregate.flush()
    out = {}
    for family in prom.REGISTRY.collect():
        if family.name in ("deepserve_prediction_confidence", "deepserve_predictions"):
            for s in family.samples:
                if s.labels.get("model") == model and not s.name.endswith(("_created", "_sum")):
                    out[(s.name, s.labels.get("le"), s.labels.get("in_distribution"))] = s.value
    return out


def delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def moved(model: str, send) -> dict:
    before = trust_metrics(model)
    send()
    return delta(before, trust_metrics(model))


def rows_counted(d: dict) -> tuple[float, float]:
    """(classifications in the confidence histogram, classifications by in_distribution)."""
    confidence = d.get(("deepserve_prediction_confidence_count", None, None), 0)
    verdicts = sum(v for k, v in d.items() if k[0] == "deepserve_predictions_total")
    return confidence, verdicts


def classifiers(task: str) -> list[str]:
    return [n for n, e in manifest()["models"].items() if e["task"] == task]


@pytest.mark.parametrize("model", classifiers("image-classification"))
def test_v2_image_traffic_moves_the_trust_metrics_exactly_as_classify(inprocess, model):
    c = inprocess.client
    own = SAMPLES.get(model, "mnist_test500.npz")
    other = next(f for f in SAMPLES.values() if f != own)
    # in distribution and not (the other data set); 28×28 uploads reach the model unframed
    images = np.concatenate([np.load(FIXTURES / own)["images"][:10], np.load(FIXTURES / other)["images"][:4]])
    files = [("image", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]

    def classify():
        assert c.post("/classify", files=files, data={"model": model}).status_code == 200

    pre = active_meta(model)["preprocessing"]
    x = ((pp.scale_pixels(images) - pre["mean"]) / pre["std"]).astype(np.float32)[:, None]
    tensor = {"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}

    def v2():
        assert c.post(f"/v2/models/{model}/infer", json={"inputs": [tensor]}).status_code == 200

    by_classify, by_v2 = moved(model, classify), moved(model, v2)
    assert rows_counted(by_v2) == (len(images), len(images))
    assert {k[2] for k in by_v2 if k[2]} == {"true", "false"}  # both verdicts were counted
    assert by_v2 == by_classify


@pytest.mark.parametrize("model", classifiers("text-classification"))
def test_v2_text_traffic_moves_the_trust_metrics_exactly_as_classify(inprocess, model):
    c = inprocess.client
    texts = ["a gorgeous, witty and moving film", "a tedious mess", "zorblax quimfrith vellnor", "fine"]

    def classify():
        assert c.post("/classify", json={"texts": texts, "model": model}).status_code == 200

    def text_view():
        text = {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}
        assert c.post(f"/v2/models/{model}_text/infer", json={"inputs": [text]}).status_code == 200

    m = inprocess.core.models[model]
    max_tokens = m.meta.preprocessing.max_tokens
    tokens, lengths = pp.pad_batch([pp.encode(pp.tokenize(t), m.vocab_index, max_tokens) or [pp.UNK] for t in texts])

    def token_ids():
        inputs = [
            {"name": "tokens", "datatype": "INT64", "shape": list(tokens.shape), "data": tokens.ravel().tolist()},
            {"name": "lengths", "datatype": "INT64", "shape": [len(texts)], "data": lengths.tolist()},
        ]
        assert c.post(f"/v2/models/{model}/infer", json={"inputs": inputs}).status_code == 200

    by_classify = moved(model, classify)
    assert rows_counted(by_classify) == (len(texts), len(texts))
    assert moved(model, text_view) == by_classify
    assert moved(model, token_ids) == by_classify


def test_text_limits_answer_alike_on_every_protocol(inprocess):
    c, limit = inprocess.client, inprocess.settings.max_text_chars
    long = "word " * (limit // 5 + 1)
    http = c.post("/classify", json={"text": long})
    text = {"name": "text", "datatype": "BYTES", "shape": [1], "data": [long]}
    v2 = c.post("/v2/models/sentiment_text/infer", json={"inputs": [text]})
    assert http.status_code == v2.status_code == 413
    assert http.json()["limit"] == v2.json()["limit"] == limit
    blank = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["   "]}
    r = c.post("/v2/models/sentiment_text/infer", json={"inputs": [blank]})
    assert r.status_code == 400 and "empty or only whitespace" in r.json()["error"]
