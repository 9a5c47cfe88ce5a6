"""/generate morphs between two (digit, seed) points; the generator version with a
class-weights input reproduces the old images exactly and blends classes."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import manifest


def frames(client, **body) -> list[bytes]:
    r = client.post("/generate", json={"format": "json", **body})
    assert r.status_code == 200, r.text
    return [base64.b64decode(b) for b in r.json()["images"]]


def single(client, digit: int, seed: int) -> bytes:
    return frames(client, n=1, digit=digit, seed=seed)[0]


def test_a_digit_morph_runs_from_one_drawing_to_the_other(client):
    out = frames(client, digit=3, seed=1, morph_to={"digit": 8, "seed": 1}, steps=9)
    assert len(out) == 9 and len(set(out)) == 9
    assert out[0] == single(client, 3, 1) and out[-1] == single(client, 8, 1)
    labels = [
        r["label"]
        for r in client.post(
            "/classify", files=[("image", (f"{i}.png", f, "image/png")) for i, f in enumerate(out)]
        ).json()["results"]
    ]
    assert labels[0] == "3" and labels[-1] == "8"
    assert out == frames(client, digit=3, seed=1, morph_to={"digit": 8, "seed": 1}, steps=9)  # reproducible


def test_a_seed_morph_keeps_the_digit(client):
    out = frames(client, digit=5, seed=1, morph_to={"seed": 2}, steps=5)
    assert out[0] == single(client, 5, 1) and out[-1] == single(client, 5, 2)
    body = client.post(
        "/generate", json={"digit": 5, "seed": 1, "morph_to": {"seed": 2}, "steps": 5, "format": "json"}
    ).json()
    assert body["morph"] == {"from": {"digit": 5, "seed": 1}, "to": {"digit": 5, "seed": 2}, "steps": 5}
    assert body["digits"] == [5] * 5


def test_a_morph_as_png_is_one_row_of_frames(client):
    from io import BytesIO

    from PIL import Image

    r = client.post("/generate", json={"digit": 3, "seed": 1, "morph_to": {"digit": 8}, "steps": 7})
    assert r.headers["content-type"] == "image/png"
    assert Image.open(BytesIO(r.content)).size == (7 * 30 + 2, 30 + 2)


def test_one_hot_class_weights_reproduce_the_previous_version_exactly(client):
    previous = manifest()["families"]["generator"]["previous"]
    old = client.post("/generate", json={"n": 16, "seed": 5, "model_version": previous})
    new = client.post("/generate", json={"n": 16, "seed": 5})
    assert old.status_code == 200 and old.content == new.content
    assert old.headers["x-model-version"] == previous != new.headers["x-model-version"]


def test_the_previous_version_morphs_seeds_but_not_digits(client):
    previous = manifest()["families"]["generator"]["previous"]
    ok = client.post(
        "/generate", json={"digit": 2, "seed": 1, "morph_to": {"seed": 9}, "steps": 5, "model_version": previous}
    )
    assert ok.status_code == 200 and ok.headers["x-model-version"] == previous
    frames = Image.open(io.BytesIO(ok.content))
    assert frames.size[0] > frames.size[1]  # one row of frames, not a blank or a square grid
    assert np.asarray(frames).std() > 10  # and they hold digits
    r = client.post("/generate", json={"digit": 2, "seed": 1, "morph_to": {"digit": 4}, "model_version": previous})
    assert r.status_code == 400 and "not between digits" in r.json()["error"]


@pytest.mark.parametrize(
    "body, words",
    [
        ({"seed": 1, "morph_to": {"digit": 8}}, "starts from a digit"),
        ({"digit": 1, "n": 4, "morph_to": {"digit": 8}}, "n does not go with morph_to"),
        ({"digit": 1, "morph_to": {"digit": 8}, "steps": 1}, "steps must be between 2"),
        ({"digit": 1, "morph_to": {"digit": 12}}, "morph_to.digit must be between 0 and 9"),
        ({"digit": 1, "morph_to": [8]}, "morph_to must be an object"),
        ({"digit": 1, "morph_to": {"colour": 2}}, "morph_to must be an object"),
        ({"digit": 1, "steps": 5}, "steps goes with morph_to"),
    ],
)
def test_bad_morphs_are_400(client, body, words):
    r = client.post("/generate", json=body)
    assert r.status_code == 400 and words in r.json()["error"], r.text
