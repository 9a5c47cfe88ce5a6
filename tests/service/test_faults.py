"""Start-up refuses what it cannot verify: a corrupt or missing model file, or metadata that
does not match its task's type, stops the server with a message naming the model and the
problem (BentoML would otherwise respawn a failing worker forever)."""

import json
import shutil

import pytest

from tests.conftest import EXPORTED, active_file, manifest
from tests.service.conftest import Server


def damage(root, how: str) -> None:
    target = root / active_file("denoiser").relative_to(EXPORTED)
    if how == "flip a byte":
        blob = bytearray(target.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        target.write_bytes(bytes(blob))
    elif how == "delete the file":
        target.unlink()
    elif how == "drop a metadata field":
        m = manifest()
        version = m["families"]["digits"]["active"]
        meta_path = root / m["models"]["digits"]["versions"][version]["metadata"]
        meta = json.loads(meta_path.read_text())
        del meta["preprocessing"]["mean"]
        meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "how, words",
    [
        ("flip a byte", ["denoiser", "refusing to serve an unverified model"]),
        ("delete the file", ["denoiser", "is missing"]),
        ("drop a metadata field", ["model 'digits'", "preprocessing.mean", "Field required"]),
    ],
)
def test_an_unverifiable_model_stops_startup_with_a_message(tmp_path, how, words):
    shutil.copytree(EXPORTED, tmp_path / "exported")
    damage(tmp_path / "exported", how)
    s = Server(env={"DEEPSERVE_EXPORTED_DIR": str(tmp_path / "exported")}, wait=False)
    try:
        code = s.proc.wait(timeout=90)
    finally:
        s.stop()
    assert code != 0
    log = s.log()
    assert "deepserve cannot start" in log, log[-2000:]
    for w in words:
        assert w in log, (w, log[-2000:])
