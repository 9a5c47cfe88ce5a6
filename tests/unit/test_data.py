import gzip
import struct

import numpy as np
import pytest

from training import data


def write_idx(path, array, magic=None):
    if array.ndim == 3:
        header = struct.pack(">IIII", magic or 2051, *array.shape)
    else:
        header = struct.pack(">II", magic or 2049, len(array))
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "lab.gz", np.array([3, 9], dtype=np.uint8))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "img.gz"), images)
    assert data.read_idx(tmp_path / "lab.gz").tolist() == [3, 9]


def test_idx_bad_magic_and_truncation_fail_clearly(tmp_path):
    write_idx(tmp_path / "bad.gz", np.zeros(3, np.uint8), magic=1234)
    with pytest.raises(data.DataError, match="bad IDX magic 1234"):
        data.read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, 10) + b"\x00" * 3)
    with pytest.raises(data.DataError, match="3 payload bytes, header says 10"):
        data.read_idx(tmp_path / "short.gz")


def test_sst2_parsing_and_header_check(tmp_path):
    p = tmp_path / "dev.tsv"
    p.write_text("sentence\tlabel\nit 's good . \t1\na dull , tab\tfull mess \t0\n")
    sentences, labels = data.read_sst2(p)
    assert sentences == ["it 's good .", "a dull , tab\tfull mess"]
    assert labels.tolist() == [1, 0]
    p.write_text("text\tlabel\nx\t1\n")
    with pytest.raises(data.DataError, match="expected header"):
        data.read_sst2(p)
    p.write_text("sentence\tlabel\nno label here\n")
    with pytest.raises(data.DataError, match=r"dev.tsv:2"):
        data.read_sst2(p)


def test_missing_and_corrupt_files_are_named(tmp_path, monkeypatch):
    spec = data.DataFile("mnist/t10k-labels-idx1-ubyte.gz", 5, "0" * 64, "http://example/x")
    with pytest.raises(data.DataError, match=r"missing dataset file .*t10k-labels.*--download"):
        data.verify(tmp_path, spec)
    (tmp_path / "mnist").mkdir()
    (tmp_path / spec.name).write_bytes(b"abc")
    with pytest.raises(data.DataError, match="corrupt dataset file .*3 bytes, expected 5"):
        data.verify(tmp_path, spec)
    (tmp_path / spec.name).write_bytes(b"abcde")
    with pytest.raises(data.DataError, match="sha256 .* expected 0000"):
        data.verify(tmp_path, spec)


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSERVE_DATA_DIR", str(tmp_path / "env"))
    assert data.resolve_data_dir("/explicit") == data.Path("/explicit")
    assert data.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("DEEPSERVE_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.resolve_data_dir(None) == tmp_path / "cache" / "deepserve" / "datasets"


def test_split_is_seeded_and_disjoint():
    tr, va = data.split_indices(100, 10, seed=3)
    tr2, va2 = data.split_indices(100, 10, seed=3)
    assert (tr == tr2).all() and (va == va2).all()
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 100


def test_registry_matches_the_shared_readme_checksums():
    """Every registry file against the size and sha256 in the datasets' own README (../shared)."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "README.md"
    if not readme.is_file():
        readme = data.resolve_data_dir() / "README.md"
    text = readme.read_text()
    folders = {"1. MNIST": "mnist", "2. Fashion-MNIST": "fashion-mnist", "3. SST-2": "sst2"}
    table: dict[str, tuple[int, str]] = {}
    for title, folder in folders.items():
        section = text[text.index(title) :]
        for m in re.finditer(r"^\| ([\w.-]+\.(?:gz|tsv)) \| (\d+) \|[^\n]*?\b([0-9a-f]{64})\b", section, re.M):
            table.setdefault(f"{folder}/{m.group(1)}", (int(m.group(2)), m.group(3)))
    for name, spec in data.FILES.items():
        assert table[name] == (spec.size, spec.sha256), name
