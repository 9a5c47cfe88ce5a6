"""The image, started with docker as deploy/k8s runs it: the HTTP contract and probes, BentoML's
non-root user on a read-only root filesystem (only /tmp, a tmpfs, is writable), the models
from a mounted volume, threads sized from a CPU quota, and the hostile-traffic attacks under a
memory limit ending in 413/503 with no OOM kill."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURES, REPO
from tests.container.conftest import UID, docker
from tests.service.test_hostile import attack, blank_png
from tests.service.test_overload import flood

SEVEN = (FIXTURES / "mnist_test0_label7.png").read_bytes()
BENTO = "/home/bentoml/bento"  # BentoML's BENTO_PATH in the image


def test_probes_metrics_and_the_http_contract(container, models):
    print(f"\nstart to ready in the container: {container.ready_s:.1f} s")
    for probe in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(container.url + probe, timeout=10).status_code == 200, probe
    r = httpx.post(container.url + "/classify", files={"image": ("7.png", SEVEN, "image/png")}, timeout=30)
    assert r.status_code == 200 and r.json()["label"] == "7", r.text
    # the mounted volume's manifest chose digits' previous version; the image's own copy would serve the active one
    assert r.json()["model_version"] == models[1], r.json()
    bad = httpx.post(container.url + "/classify", files={"image": ("x.png", b"not an image", "image/png")}, timeout=30)
    assert 400 <= bad.status_code < 500 and bad.json()["error"], bad.text
    metrics = httpx.get(container.url + "/metrics", timeout=10).text
    assert re.search(r'^deepserve_model_info\{.*model="digits"', metrics, re.M), metrics[:2000]


def test_runs_as_bentoml_on_a_read_only_root_where_only_tmp_is_writable(container, image):
    """What deploy/k8s assumes of the image (tests/deploy/test_k8s.py checks the manifests say
    the same): BentoML's user 1034, port 3000, the Bento at BENTO_PATH with its models in
    src/exported (the init container's seed), BENTOML_HOME on /tmp."""
    config = json.loads(docker("inspect", image).stdout)[0]["Config"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert config["User"] == "bentoml" and "3000/tcp" in config["ExposedPorts"], config
    assert env["BENTO_PATH"] == BENTO and env["BENTOML_HOME"] == "/tmp/bentoml", env
    assert container.exec("test", "-f", f"{BENTO}/src/exported/manifest.json").returncode == 0
    assert container.inspect()["HostConfig"]["ReadonlyRootfs"] is True
    assert container.exec("id", "-u").stdout.strip() == str(UID)
    assert container.exec("sh", "-c", "echo $BENTOML_HOME").stdout.strip() == "/tmp/bentoml"
    for path in ("/", "/home/bentoml", BENTO, f"{BENTO}/src", "/app/.venv"):
        out = container.exec("touch", f"{path}/probe", check=False)
        assert out.returncode != 0 and "Read-only file system" in out.stderr, (path, out.stderr)
    assert container.exec("touch", "/tmp/probe").returncode == 0
    mounts = container.exec("cat", "/proc/mounts").stdout.splitlines()
    assert any(line.split()[1:3] == ["/tmp", "tmpfs"] for line in mounts), mounts
    # BentoML's home and the Prometheus multiprocess files live in the tmpfs
    files = container.exec("ls", "/tmp/bentoml/prometheus_multiproc_dir").stdout.split()
    assert any(f.endswith(".db") for f in files), files


def test_the_image_holds_the_service_package_with_its_sub_packages(container):
    """bentofile's include (service/**/*.py) ships every module of service/, sub-packages too:
    each one imports inside the image."""
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / "service").rglob("*.py")
        if "__pycache__" not in p.parts
    )
    script = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\nprint('ok')"
    out = container.exec("sh", "-c", f'cd {BENTO}/src && python -c "$0" "$@"', script, *modules, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_threads_follow_the_containers_cpu_quota(container):
    """`--cpus 1` on a 2-core machine: one ORT thread per model, sized from the cgroup quota
    (v1 here: cpu.cfs_quota_us; v2: cpu.max), not from the 2 cores the container can see."""
    threads = {int(n) for n in re.findall(r"(\d+) ORT threads", container.logs())}
    assert threads == {1}, threads
    py = "from service.settings import cgroup_cpu_quota, usable_cores; print(cgroup_cpu_quota(), usable_cores())"
    out = container.exec("sh", "-c", f'cd {BENTO}/src && python -c "{py}"')
    assert out.stdout.split() == ["1.0", "1"], out.stdout


def oom_kills(container) -> int:
    """OOM kills inside the container's memory cgroup (v1: memory.oom_control; v2: memory.events)."""
    for path, key in (
        ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill"),
        ("/sys/fs/cgroup/memory.events", "oom_kill"),
    ):
        out = container.exec("cat", path, check=False)
        if out.returncode == 0:
            return int(dict(line.split() for line in out.stdout.splitlines())[key])
    raise AssertionError("no memory cgroup in the container")


def test_large_images_and_floods_under_a_memory_limit_end_in_413_or_503(container):
    """The hostile-traffic tests' attacks against `--memory 1g`: the answers are 413/503 (or
    served), never the kernel's OOM killer; the container keeps running, unrestarted."""
    assert container.inspect()["HostConfig"]["Memory"] == 2**30
    big = blank_png(4000, 4000)  # ~20 KB on the wire, 16 M pixels decoded
    over_budget = httpx.post(
        container.url + "/classify", files=[("image", (f"{i}.png", big, "image/png")) for i in range(3)], timeout=60
    )
    assert over_budget.status_code == 413 and "pixels together" in over_budget.json()["error"], over_budget.text
    too_large = attack(container.url, [blank_png(5000, 5000)] * 4)
    assert set(too_large) == {413}, too_large
    statuses = []
    for _ in range(2):
        statuses += attack(container.url, [big] * 6)
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    counts, _, retry_after = asyncio.run(flood(container.url, 5, 64))
    assert counts[200] > 0 and set(counts) <= {200, 503}, counts
    assert retry_after
    state = container.state()
    assert state["Running"] and not state["OOMKilled"], state
    assert container.inspect()["RestartCount"] == 0
    assert oom_kills(container) == 0
    r = httpx.post(container.url + "/classify", files={"image": ("7.png", SEVEN, "image/png")}, timeout=30)
    assert r.status_code == 200 and r.json()["label"] == "7"


def test_the_build_ca_left_no_trace_in_the_image(image, tmp_path):
    """make image hands the local CAs to the build as BuildKit secrets: no layer, no history
    entry and no environment variable of the image holds them."""
    cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    if not cas:
        pytest.skip("no local CA on this machine: make image passed none to the build")
    config = json.loads(docker("inspect", image).stdout)[0]["Config"]
    assert not [e for e in config["Env"] if e.startswith(("SSL_CERT_FILE=", "DEEPSERVE_BUILD_CA="))], config["Env"]
    history = docker("history", "--no-trunc", image).stdout
    assert "BEGIN CERTIFICATE" not in history
    # a base64 line from the middle of each CA's body (its key): in any file or env var that holds the PEM
    patterns = tmp_path / "patterns"
    middle = lambda lines: lines[len(lines) // 2]
    patterns.write_text("".join(middle([s for s in ca.read_text().splitlines() if len(s) == 64]) + "\n" for ca in cas))
    saved = subprocess.run(
        f"docker save {image} | grep -a -c -F -f {patterns}", shell=True, capture_output=True, text=True, timeout=300
    )
    assert saved.stdout.strip() == "0", f"a CA is in the image's layers ({saved.stdout.strip()} lines)"
