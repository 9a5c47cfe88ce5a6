"""`bentoml build` works offline and the built Bento serves the verified models."""

import os
import subprocess
import sys

import httpx
import yaml

from tests.conftest import FIXTURES, REPO
from tests.service.conftest import Server


def test_build_then_serve_the_bento(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("deepserve:")
    src = tmp_path / "bentoml" / "bentos" / "deepserve" / tag.split(":")[1] / "src"
    assert (src / "exported" / "manifest.json").is_file() and not (src / "training").exists()
    server = Server(target=tag, cwd=tmp_path, env={"BENTOML_HOME": str(tmp_path / "bentoml")}, pythonpath=False)
    try:
        seven = (FIXTURES / "mnist_test0_label7.png").read_bytes()
        r = httpx.post(server.url + "/classify", files={"image": ("7.png", seven, "image/png")}, timeout=30)
        assert r.status_code == 200 and r.json()["label"] == "7"
    finally:
        server.stop()


def test_the_gpu_bento_builds_with_onnxruntime_gpu_and_cuda(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", "deploy/bentofile-gpu.yaml", ".", "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    bento = tmp_path / "bentoml" / "bentos" / "deepserve-gpu" / tag.split(":")[1]
    manifest = (bento / "bento.yaml").read_text()
    assert "onnxruntime-gpu==1.31.1" in (bento / "env" / "python" / "requirements.txt").read_text()
    envs = {e["name"]: e.get("value") for e in yaml.safe_load(manifest).get("envs", [])}
    assert envs.get("DEEPSERVE_DEVICE") == "cuda", envs
