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


def write(root, files: dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    "files, cpus",
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2 (a Kubernetes limit of 1500m)
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0),  # docker --cpus 1 on v1
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1 unlimited
        ({}, None),  # no cgroup filesystem
    ],
)
def test_cgroup_cpu_quota_reads_v2_and_v1(tmp_path, files, cpus):
    from service.settings import cgroup_cpu_quota

    assert cgroup_cpu_quota(write(tmp_path, files)) == cpus


def test_usable_cores_follow_the_quota(monkeypatch):
    import service.settings as settings

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # a 2-core host seen from a container
    monkeypatch.setattr(settings, "cgroup_cpu_quota", lambda: 1.0)  # docker run --cpus 1
    assert settings.usable_cores() == 1
    assert Settings(workers=1).ort_threads() == 1
    monkeypatch.setattr(settings, "cgroup_cpu_quota", lambda: 1.5)  # a fraction rounds up
    assert settings.usable_cores() == 2
    monkeypatch.setattr(settings, "cgroup_cpu_quota", lambda: None)
    assert settings.usable_cores() == 2
