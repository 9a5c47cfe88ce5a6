"""`make gpu-verify` in CPU mode with a tiny budget (it starts the real server twice), and the
staging that carries onnxruntime-gpu to a device in parts (docs/gpu.md, "Device runbook")."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from deploy.gpu import stage
from service.metadata import read_manifest
from tests.conftest import EXPORTED, REPO

ENDPOINT_MODEL = {"classify-image": "digits", "classify-text": "sentiment", "generate-16": "generator"}
ENDPOINT_MODEL["denoise"] = "denoiser"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-verify")
    args = ["--device", "cpu", "--quick", "--out", str(out), "--sweep", "1,4", "--concurrency", "2"]
    args += ["--load-seconds", "0.5", "--warmup-seconds", "0.1", "--point-seconds", "0.02"]
    run = subprocess.run(
        [sys.executable, "-m", "deploy.gpu.verify", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert (out / "gpu-verify.json").is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((out / "gpu-verify.json").read_text())
    data["_rc"], data["_md"] = run.returncode, (out / "gpu-verify.md").read_text()
    return data


def test_cpu_run_passes_and_names_the_machine(report):
    assert report["_rc"] == 0 and report["ok"] and report["complete"], report["problems"]
    m = report["machine"]
    for key in ("python", "numpy", "pillow", "onnxruntime"):
        assert m[key], key
    assert "CPUExecutionProvider" in m["onnxruntime_providers"]
    assert m["requirement_problems"] == []
    for title in ("## Parity with the CPU", "## Batch-size sweep", "## Server, batching on", "## Does adaptive"):
        assert title in report["_md"]


def test_every_active_model_has_parity_and_a_sweep(report):
    active = set(read_manifest(EXPORTED).models)
    assert set(report["models"]) == active
    for name, entry in report["models"].items():
        assert entry["provider"] == "CPUExecutionProvider", name
        assert entry["parity"]["ok"] and entry["parity"]["max_abs_diff"] <= 1e-6, (name, entry["parity"])
        assert [p["rows"] for p in entry["sweep"]] == [1, 4], name
        assert all(p["device"]["rows_per_s"] > 0 and p["device"]["runs"] >= 3 for p in entry["sweep"]), name
        assert entry["shape_change"]["alternating_ms"] > 0, name


def test_server_ran_with_batching_on_and_off_on_the_cpu(report):
    for key, batching in (("batching_on", True), ("batching_off", False)):
        section = report["server"][key]
        assert section["batching"] is batching and "error" not in section, section.get("error")
        assert section["provider"] == "CPUExecutionProvider"
        assert set(section["models_provider"].values()) == {"CPUExecutionProvider"}
        assert section["batching_settings"]["enabled"] is batching
        points = {p["endpoint"]: p for p in section["points"]}
        assert set(points) == set(ENDPOINT_MODEL), key
        for endpoint, point in points.items():
            assert point["rps"] > 0 and point["errors"] == {}, (key, endpoint, point)
            assert point["p99_ms"] >= point["p50_ms"] > 0
            # the rows per batch come from the server's own histograms, for the model behind it
            stats = point["models"][ENDPOINT_MODEL[endpoint]]
            assert stats["batches"] > 0 and stats["rows_per_batch"] >= 1
            if not batching:
                assert stats["requests_per_batch"] == 1.0
    gains = {(g["endpoint"], g["concurrency"]) for g in report["gain"]}
    assert gains == {(e, 2) for e in ENDPOINT_MODEL}


# --------------------------------------------------------------------------- staging


def test_serving_closure_carries_what_the_device_lacks_and_the_pins():
    closure = {"bentoml": "1.4.39", "numpy": "2.4.6", "onnxruntime": "1.31.1", "prometheus-client": "0.26.0"}
    carried = stage.to_carry(closure, frozenset({"numpy", "prometheus-client", "onnxruntime"}))
    assert carried == {"bentoml": "1.4.39", "prometheus-client": "0.26.0"}
    assert {"numpy", "aiohttp", "httpx", "nvidia-cudnn-cu13"} <= stage.device_has()


def test_parts_travel_and_unpack_with_their_sha256_checked(tmp_path):
    site = tmp_path / "build"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (site / "pkg" / "blob.bin").write_bytes(bytes(range(256)) * 300)
    payload = tmp_path / "payload.tar.xz"
    stage.pack(site, payload, preset=1)
    carried = tmp_path / ".stage"
    carried.mkdir()
    parts = stage.split(payload, carried, part_bytes=max(1, payload.stat().st_size // 3))
    assert len(parts) >= 3 and sum(p["bytes"] for p in parts) == payload.stat().st_size
    info = {"created": "now", "parts": parts, "payload": {"sha256": stage.sha256(payload), "unpacked_bytes": 1}}
    (carried / "stage.json").write_text(json.dumps(info))
    dest, target = tmp_path / "device-stage", tmp_path / "device-site"
    common = ["--stage", str(carried), "--dest", str(dest), "--site", str(target)]

    # the last call alone: the earlier parts are missing (the machine went back between calls)
    assert stage.main(["receive", str(len(parts)), *common]) == 2
    for i in range(1, len(parts)):
        assert stage.main(["receive", str(i), *common]) == 0
    assert (target / "pkg" / "__init__.py").read_text() == "VALUE = 1\n"
    assert json.loads((target / stage.STAMP).read_text())["sha256"] == info["payload"]["sha256"]

    # a part that changed on the way is refused
    (carried / "part1.bin").write_bytes(b"not the part")
    assert stage.main(["receive", "1", *common]) == 2


def fake_cuda_library(entries: list[tuple[int, bytes]]) -> bytearray:
    """A minimal ELF64 with a .nv_fatbin section holding one fat binary of (arch, payload)."""
    body = b""
    for arch, payload in entries:
        header = struct.pack("<HHIQQ", 2, 0x0101, 64, len(payload), len(payload))
        header += struct.pack("<HHI", 8, 1, arch) + bytes(64 - 32)
        body += header + payload
    fatbin = struct.pack("<IHHQ", stage.FATBIN_MAGIC, 1, 16, len(body)) + body
    names = b"\0.nv_fatbin\0.shstrtab\0"
    fat_off = 64
    names_off = fat_off + len(fatbin)
    sh_off = names_off + len(names)
    sh_off += -sh_off % 8
    elf = bytearray(b"\x7fELF\x02\x01\x01" + bytes(9))
    elf += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 2)
    elf += fatbin + names
    elf += bytes(sh_off - len(elf))
    elf += bytes(64)  # the null section
    elf += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, fat_off, len(fatbin), 0, 0, 8, 0)
    elf += struct.pack("<IIQQQQIIQQ", 12, 3, 0, 0, names_off, len(names), 0, 0, 1, 0)
    return elf


def test_pruning_zeroes_other_gpus_kernels_and_keeps_sm90_and_every_header():
    sm80, sm90, sm120 = b"\x11" * 96, b"\x22" * 80, b"\x33" * 64
    lib = fake_cuda_library([(80, sm80), (90, sm90), (120, sm120)])
    before = bytes(lib)
    stats = stage.prune_fatbin(lib)
    assert len(lib) == len(before)
    assert sm90 in lib and sm80 not in lib and sm120 not in lib
    changed = [i for i, (a, b) in enumerate(zip(before, lib)) if a != b]
    assert len(changed) == len(sm80) + len(sm120)  # payload bytes only: headers, offsets intact
    assert set(stats["kept_mib"]) == {"sm_90"} and set(stats["zeroed_mib"]) == {"sm_80", "sm_120"}
    with pytest.raises(stage.StageError, match="no sm_90"):
        stage.prune_fatbin(fake_cuda_library([(80, sm80)]))
