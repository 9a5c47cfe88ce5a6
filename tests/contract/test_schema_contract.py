"""What /docs.json says a request means is what the server does with it: the defaults it
advertises are the ones served, and its bounds are where the server starts refusing (each
field is declared once, service/tasks/fields.py)."""

from __future__ import annotations

import pytest

from tests.conftest import FIXTURES

SEVEN = ("7.png", (FIXTURES / "mnist_test0_label7.png").read_bytes(), "image/png")


def request_schema(client, path: str, media: str) -> dict:
    doc = client.get("/docs.json").json()
    return doc["paths"][path]["post"]["requestBody"]["content"][media]["schema"]["properties"]


def test_classify_answers_as_many_classes_as_the_documented_top_k_default(client):
    images = request_schema(client, "/classify", "multipart/form-data")["top_k"]["default"]
    text = request_schema(client, "/classify", "application/json")["top_k"]["default"]
    r = client.post("/classify", files={"image": SEVEN})
    assert r.status_code == 200 and len(r.json()["top_k"]) == images
    labels = len(next(m for m in client.get("/models").json()["models"] if m["name"] == "sentiment")["labels"])
    r = client.post("/classify", json={"text": "a warm, funny film"})
    assert r.status_code == 200 and len(r.json()["top_k"]) == min(text, labels)


def test_generate_draws_the_documented_defaults(client):
    props = request_schema(client, "/generate", "application/json")
    r = client.post("/generate", json={"seed": 1, "format": "json"})
    assert r.status_code == 200 and len(r.json()["images"]) == props["n"]["default"]
    r = client.post("/generate", json={"seed": 1, "digit": 2, "morph_to": {"digit": 2, "seed": 5}, "format": "json"})
    assert r.status_code == 200 and r.json()["morph"]["steps"] == props["steps"]["default"]
    r = client.post("/generate", json={"n": 1, "seed": 1})  # format's default: the PNG
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" == f"image/{props['format']['default']}"


@pytest.mark.parametrize(
    "path, field, extra",
    [
        ("/generate", "n", {}),
        ("/generate", "digit", {}),
        ("/generate", "seed", {}),
        ("/generate", "steps", {"digit": 1, "morph_to": {"seed": 2}}),
        ("/classify", "top_k", {"text": "fine"}),
    ],
)
def test_integers_are_refused_exactly_past_their_documented_bounds(client, path, field, extra):
    spec = request_schema(client, path, "application/json")[field]
    for value in (spec["minimum"], spec["maximum"]):
        body = {**extra, field: value}
        if path == "/generate" and field in ("n", "steps"):
            body["format"] = "json"
        assert client.post(path, json=body).status_code == 200, (field, value)
    for value in (spec["minimum"] - 1, spec["maximum"] + 1):
        r = client.post(path, json={**extra, field: value})
        assert r.status_code == 400, (field, value)
        assert r.json()["error"].startswith(f"{field} must be between {spec['minimum']} and {spec['maximum']}")


def test_text_limits_are_the_documented_ones(client):
    props = request_schema(client, "/classify", "application/json")
    most = props["text"]["maxLength"]
    assert client.post("/classify", json={"text": "a" * most}).status_code == 200
    r = client.post("/classify", json={"text": "a" * (most + 1)})
    assert r.status_code == 413 and r.json()["limit"] == most
    many = props["texts"]["maxItems"]
    assert client.post("/classify", json={"texts": ["good"] * many}).status_code == 200
    r = client.post("/classify", json={"texts": ["good"] * (many + 1)})
    assert r.status_code == 400 and f"1 to {many} strings" in r.json()["error"]


def test_every_documented_field_is_accepted_and_no_other(client):
    for path, media in (("/generate", "application/json"), ("/classify", "application/json")):
        props = request_schema(client, path, media)
        r = client.post(path, json={"unheard_of": 1})
        assert r.status_code == 400 and r.json()["error"].startswith("unknown field")
        assert set(props) <= {*r.json()["error"].split("allowed: ", 1)[1].strip("[]").replace("'", "").split(", ")}
