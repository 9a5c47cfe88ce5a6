"""Declare once: a model of an existing task is served by adding its files and a manifest
entry, with no code change; a task with no model answers 404."""

from __future__ import annotations

import json
import shutil

import httpx

from service import repository
from tests.conftest import EXPORTED, FIXTURES
from tests.service.conftest import Server


def test_a_model_added_by_files_alone_is_served_listed_and_documented(tmp_path):
    root = tmp_path / "exported"
    shutil.copytree(EXPORTED, root, ignore=shutil.ignore_patterns(".status", ".manifest.lock"))
    m = repository.raw(root)
    version = m["families"]["digits"]["active"]
    src, dst = root / "digits" / version, root / "scribbles" / version
    dst.mkdir(parents=True)
    for ext in ("onnx", "smoke.npz"):
        shutil.copy(src / f"digits.{ext}", dst / f"scribbles.{ext}")
    meta = json.loads((src / "digits.json").read_text())
    meta.update(name="scribbles", family="scribbles", file="scribbles.onnx")
    meta["smoke"]["file"] = "scribbles.smoke.npz"
    (dst / "scribbles.json").write_text(json.dumps(meta))
    m["families"]["scribbles"] = {"active": version, "previous": None, "models": ["scribbles"]}
    m["models"]["scribbles"] = {
        "task": "image-classification",
        "family": "scribbles",
        "versions": {
            version: {
                "file": f"scribbles/{version}/scribbles.onnx",
                "metadata": f"scribbles/{version}/scribbles.json",
                "sha256": meta["sha256"],
            }
        },
    }
    del m["families"]["denoiser"], m["models"]["denoiser"]  # and one task with no model at all
    (root / "manifest.json").write_text(json.dumps(m))

    s = Server(env={"DEEPSERVE_EXPORTED_DIR": str(root)})
    try:
        seven = (FIXTURES / "mnist_test0_label7.png").read_bytes()
        r = httpx.post(s.url + "/classify", files={"image": ("7.png", seven, "image/png")}, data={"model": "scribbles"})
        assert r.status_code == 200 and r.json()["model"] == "scribbles" and r.json()["label"] == "7", r.text
        default = httpx.post(s.url + "/classify", files={"image": ("7.png", seven, "image/png")}).json()
        assert default["model"] == "digits"  # the manifest's default for the task
        names = {x["name"] for x in httpx.get(s.url + "/models").json()["models"]}
        assert "scribbles" in names and "denoiser" not in names
        doc = httpx.get(s.url + "/docs.json").json()
        form = doc["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert "scribbles" in form["properties"]["model"]["enum"]
        assert httpx.get(s.url + "/v2/models/scribbles").json()["inputs"][0]["name"] == "image"
        r = httpx.post(s.url + "/denoise", files={"image": ("7.png", seven, "image/png")})
        assert r.status_code == 404 and "no model for task 'image-denoising'" in r.json()["error"]
    finally:
        s.stop()
