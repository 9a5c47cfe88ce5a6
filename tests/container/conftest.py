"""The image `make image` builds, started with docker: built once per session (on the cached
base image), one production-like container shared by the tests whose settings are not the test
(read-only root filesystem, /tmp a tmpfs, the models on a volume seeded the way deploy/k8s
seeds it, `--cpus 1 --memory 1g`), and containers of their own where the settings are."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from service import repository
from tests.conftest import REPO, free_port

BUILD = REPO / "deploy" / "image" / "build.sh"
DOCKERD = REPO / "deploy" / "image" / "dockerd.sh"
K8S = REPO / "deploy" / "k8s"
UID = 1034  # BentoML's user in its generated Dockerfile (bentoml/_internal/container/generate.py)
LIMITS = ["--cpus", "1", "--memory", "1g"]  # a replica's share of this 2-core machine


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise RuntimeError(f"docker {' '.join(args)}: {out.returncode}\n{out.stderr[-3000:]}")
    return out


def docker_or_skip() -> None:
    """Start dockerd when it is not running. Where docker cannot run (a tool missing, no
    daemon): a failure under CI (CI=true), else a skip naming why, never a silent pass."""
    missing = [t for t in ("docker", "dockerd", "debootstrap") if shutil.which(t) is None]
    reason = f"{', '.join(missing)} not installed: `make tools` installs it from Debian's packages"
    if not missing:
        out = subprocess.run([DOCKERD], capture_output=True, text=True, timeout=120)
        reason = f"docker cannot run here: {out.stderr.strip()[-500:]}" if out.returncode else ""
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI: {reason}")
    if reason:
        pytest.skip(reason)


class Container:
    """A `docker run -d` of the image, its port published on 127.0.0.1 only."""

    def __init__(self, image: str, *args: str, env: dict[str, str] | None = None, command: tuple[str, ...] = ()):
        self.name = f"deepserve-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        self.started = time.monotonic()
        docker("run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:3000", *args, *flags, image, *command)

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds from `docker run` to /readyz 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state()["Running"]:
                raise RuntimeError(f"container exited {self.state()}:\n{self.logs()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"container not ready in {timeout} s:\n{self.logs()[-3000:]}")

    def inspect(self) -> dict:
        return json.loads(docker("inspect", self.name).stdout)[0]

    def state(self) -> dict:
        return self.inspect()["State"]

    def logs(self) -> str:
        out = docker("logs", self.name, check=False)
        return out.stdout + out.stderr

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return docker("exec", self.name, *cmd, check=check)

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> str:
    """`make image` from this checkout (deploy/image/build.sh): the tag it built."""
    docker_or_skip()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml"))}
    out = subprocess.run([BUILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout.strip().splitlines()[-1]


def k8s_seed_command() -> list[str]:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    return deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]


def seeded_models(image: str, directory: Path) -> Path:
    """A model volume seeded the way deploy/k8s seeds it: its init container's command, run in
    the image as BentoML's user, on a directory that user owns (the pod's fsGroup)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chown(directory, UID, UID)
    command = k8s_seed_command()
    docker(
        "run", "--rm", "--user", str(UID), "-v", f"{directory}:/models", "--entrypoint", command[0], image, *command[1:]
    )
    return directory


def previous_digits(models: Path) -> str:
    """Make the volume's digits model its previous version (the image's own copy keeps the
    active one), so an answer's model_version shows which directory was served."""
    family = repository.raw(models)["families"]["digits"]
    repository.set_active(models, "digits", family["previous"], family["active"])
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(models)], check=True)
    return family["previous"]


@pytest.fixture(scope="session")
def models(image, tmp_path_factory) -> tuple[Path, str]:
    """The shared container's model volume and the digits version it serves."""
    directory = seeded_models(image, tmp_path_factory.mktemp("models") / "models")
    return directory, previous_digits(directory)


def production(image: str, models: Path, *extra: str, env: dict[str, str] | None = None) -> Container:
    """The image as deploy/k8s runs it: read-only root filesystem, /tmp a tmpfs, the models on
    a volume, BentoML's user, a CPU and memory limit."""
    return Container(
        image,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "-v",
        f"{models}:/models",
        *LIMITS,
        *extra,
        env={"DEEPSERVE_EXPORTED_DIR": "/models", **(env or {})},
    )


@pytest.fixture(scope="session")
def container(image, models):
    c = production(image, models[0])
    try:
        c.ready_s = c.wait_ready()
        yield c
    finally:
        c.remove()
