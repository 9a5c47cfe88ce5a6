"""Every family trains one step, exports, and passes the ONNX parity check (`--dry-run`)."""

import json
import os
import subprocess
import sys

import pytest

from service.core import load_family
from service.metadata import read_manifest
from tests.conftest import REPO
from training.families import FAMILIES

DATA = os.environ.get("DEEPSERVE_DATA_DIR", str(REPO.parent / "shared" / "datasets"))


def one_core() -> None:
    """The training process keeps to one core (torch's and ONNX Runtime's threads alike): a dry
    run is then a busy neighbour of one core at most, which the timing tests allow beside
    them under make test's two workers (tests/conftest.py), not a `heavy` test."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def run_training(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=300,
        preexec_fn=one_core,
    )


@pytest.mark.skipif(  # under CI the datasets must be there: the run fails naming the missing file
    not os.path.isdir(DATA) and not os.environ.get("CI"), reason=f"real datasets not present at {DATA}"
)
@pytest.mark.parametrize("family", FAMILIES)
def test_dry_run_trains_exports_and_passes_parity(family, tmp_path):
    out = run_training(family, "--dry-run", "--out", str(tmp_path), "--data-dir", DATA)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{family} epoch 1/1" in out.stdout
    version = out.stdout.split(f"VERSION {family} ")[1].split()[0]
    manifest = read_manifest(tmp_path)  # typed: the export writes what the service reads
    assert manifest.families[family].active == version
    loaded = load_family(tmp_path, manifest, family, version, "cpu", 1)  # sha, signature, task
    assert set(loaded.models) == set(FAMILIES[family].models)
    for name in FAMILIES[family].models:
        meta = json.loads((tmp_path / family / version / f"{name}.json").read_text())
        parity = meta["parity"]["max_abs_diff"]
        assert set(parity) == {"batch_1", "batch_64"}
        assert max(parity.values()) <= 1e-4
        assert meta["parity"]["exporter"] == "torch.onnx.export(dynamo=False)"
        assert (tmp_path / family / version / f"{name}.onnx").stat().st_size == meta["size_bytes"]
        assert not (tmp_path / family / version / f"{name}.onnx.data").exists()  # single-file ONNX


def test_missing_data_fails_with_a_message_naming_the_file(tmp_path):
    out = run_training("digits", "--dry-run", "--out", str(tmp_path), "--data-dir", str(tmp_path / "nowhere"))
    assert out.returncode == 2
    assert "missing dataset file" in out.stderr and "train-images-idx3-ubyte.gz" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_lists_the_config_flags_with_defaults():
    out = run_training("codec", "--help")
    assert out.returncode == 0
    assert "--latent-dim" in out.stdout and "(default: 32)" in out.stdout and "--dry-run" in out.stdout
