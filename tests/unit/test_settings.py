import pytest
from pydantic import ValidationError

from service.settings import Settings, settings_table


def test_env_prefix_and_validation(monkeypatch):
    monkeypatch.setenv("DEEPSERVE_MAX_BATCH_SIZE", "8")
    assert Settings().max_batch_size == 8
    monkeypatch.setenv("DEEPSERVE_WORKERS", "0")
    with pytest.raises(ValidationError, match="workers"):
        Settings()


def test_unknown_device_and_missing_models_are_rejected(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSERVE_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()
    monkeypatch.delenv("DEEPSERVE_DEVICE")
    monkeypatch.setenv("DEEPSERVE_EXPORTED_DIR", str(tmp_path))
    with pytest.raises(ValidationError, match="no manifest.json"):
        Settings()


def test_threads_default_to_usable_cores_per_worker(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))  # e.g. a cpuset of 8
    assert Settings(workers=2).ort_threads() == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {1})  # taskset -c 1
    assert Settings(workers=1).ort_threads() == 1
    assert Settings(workers=2, threads=3).ort_threads() == 3


def test_readme_documents_every_setting():
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    for line in settings_table().splitlines()[2:]:
        assert line in readme, f"README settings table is stale: {line}"
