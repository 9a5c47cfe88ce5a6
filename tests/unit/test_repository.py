"""The model repository's one owner (service.repository): concurrent writers lose nothing."""

from __future__ import annotations

import multiprocessing as mp
import shutil

from service import repository
from tests.conftest import EXPORTED


def _copy_manifest(tmp_path):
    shutil.copy(EXPORTED / "manifest.json", tmp_path / "manifest.json")
    return tmp_path


def _publisher(directory: str, n: int) -> None:  # `make publish`: registrations of new versions
    m = repository.raw(directory)
    digest = m["models"]["digits"]["versions"][m["families"]["digits"]["active"]]["sha256"]
    for i in range(n):
        repository.register_version(
            directory, "digits", f"2099-01-01-{i:08x}", [("digits", "image-classification")], [digest], False
        )


def _admin(directory: str, n: int, versions: list[str]) -> None:  # load / rollback, back and forth
    for i in range(n):
        a, b = versions[i % 2], versions[(i + 1) % 2]
        repository.set_active(directory, "digits", a, b)


def test_registration_racing_load_and_rollback_loses_no_update(tmp_path):
    directory = _copy_manifest(tmp_path)
    m = repository.raw(directory)
    versions = [m["families"]["digits"]["active"], m["families"]["digits"]["previous"]]
    ctx = mp.get_context("spawn")  # fork would copy the locks of threads other tests started
    procs = [ctx.Process(target=_publisher, args=(str(directory), 60))] + [
        ctx.Process(target=_admin, args=(str(directory), 60, versions)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    final = repository.read(directory)  # still a valid manifest
    registered = [v for v in final.models["digits"].versions if v.startswith("2099-")]
    assert len(registered) == 60  # every registration survived the concurrent rewrites
    assert final.families["digits"].active in versions and final.families["digits"].previous in versions
    assert not list(directory.glob(".manifest.json.*.tmp"))  # no temp file left behind


def test_an_invalid_change_is_refused_and_leaves_the_manifest_as_it_was(tmp_path):
    import pytest
    from pydantic import ValidationError

    directory = _copy_manifest(tmp_path)
    before = (directory / "manifest.json").read_text()
    with pytest.raises(ValidationError):
        repository.set_active(directory, "digits", "no-such-version", None)
    assert (directory / "manifest.json").read_text() == before


def test_a_worker_notices_every_manifest_change_even_one_the_file_clock_cannot_see(tmp_path):
    """Two writes of the same size within one tick of the file clock (the same mtime): a
    worker that compared stat fields missed the second; it must see every change."""
    import os
    from types import SimpleNamespace

    from service.versions import Follower

    path = tmp_path / "manifest.json"
    path.write_text('{"candidate": "2099-01-01-aaaa"}')
    follower = Follower(SimpleNamespace(directory=tmp_path, rollouts=SimpleNamespace()), poll_s=1.0)
    first = follower._stamp()
    st = path.stat()
    path.write_text('{"candidate": "2099-01-01-bbbb"}')  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert follower._stamp() != first
    path.write_text('{"candidate": "2099-01-01-aaaa"}')
    assert follower._stamp() == first  # the same content is no change
