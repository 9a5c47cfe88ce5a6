"""Datasets: a checksummed registry of the canonical files, parsers, and splits.

The data directory is `--data-dir`, else `$DEEPSERVE_DATA_DIR`, else
`~/.cache/deepserve/datasets`. Every file is checked (size, then sha256) before it is
read; a missing or corrupt file fails with a message naming it. `--download` fetches the
canonical files for users with internet; nothing downloads unless asked to.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.runtime import sha256_file


@dataclass(frozen=True)
class DataFile:
    name: str  # path relative to the data directory, e.g. "mnist/t10k-images-idx3-ubyte.gz"
    size: int
    sha256: str
    url: str  # canonical source; for SST-2 the GLUE zip member is extracted


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_GLUE_SST2_ZIP = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"

FILES: dict[str, DataFile] = {
    f.name: f
    for f in [
        DataFile(
            "mnist/train-images-idx3-ubyte.gz",
            9912422,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            _MNIST_URL + "train-images-idx3-ubyte.gz",
        ),
        DataFile(
            "mnist/train-labels-idx1-ubyte.gz",
            28881,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            _MNIST_URL + "train-labels-idx1-ubyte.gz",
        ),
        DataFile(
            "mnist/t10k-images-idx3-ubyte.gz",
            1648877,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            _MNIST_URL + "t10k-images-idx3-ubyte.gz",
        ),
        DataFile(
            "mnist/t10k-labels-idx1-ubyte.gz",
            4542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            _MNIST_URL + "t10k-labels-idx1-ubyte.gz",
        ),
        DataFile(
            "fashion-mnist/train-images-idx3-ubyte.gz",
            26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            _FASHION_URL + "train-images-idx3-ubyte.gz",
        ),
        DataFile(
            "fashion-mnist/train-labels-idx1-ubyte.gz",
            29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            _FASHION_URL + "train-labels-idx1-ubyte.gz",
        ),
        DataFile(
            "fashion-mnist/t10k-images-idx3-ubyte.gz",
            4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            _FASHION_URL + "t10k-images-idx3-ubyte.gz",
        ),
        DataFile(
            "fashion-mnist/t10k-labels-idx1-ubyte.gz",
            5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            _FASHION_URL + "t10k-labels-idx1-ubyte.gz",
        ),
        DataFile(
            "sst2/train.tsv",
            3806081,
            "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
            _GLUE_SST2_ZIP + "#SST-2/train.tsv",
        ),
        DataFile(
            "sst2/dev.tsv",
            94931,
            "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
            _GLUE_SST2_ZIP + "#SST-2/dev.tsv",
        ),
    ]
}

IMAGE_DATASETS = {"mnist": "mnist", "fashion": "fashion-mnist"}
FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGIT_LABELS = [str(d) for d in range(10)]


class DataError(RuntimeError):
    """A dataset file is missing, has the wrong size/checksum, or does not parse."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $DEEPSERVE_DATA_DIR, else the user cache directory."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("DEEPSERVE_DATA_DIR"):
        return Path(os.environ["DEEPSERVE_DATA_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "deepserve" / "datasets"


def verify(data_dir: Path, spec: DataFile, registry: dict[str, DataFile] | None = None) -> Path:
    """Path of a verified file, or DataError naming the missing or corrupt file."""
    path = data_dir / spec.name
    if not path.is_file():
        raise DataError(
            f"missing dataset file {path}: pass --data-dir, set DEEPSERVE_DATA_DIR, "
            f"or add --download to fetch it from {spec.url}"
        )
    size = path.stat().st_size
    if size != spec.size:
        raise DataError(f"corrupt dataset file {path}: {size} bytes, expected {spec.size}")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise DataError(f"corrupt dataset file {path}: sha256 {digest}, expected {spec.sha256}")
    return path


def download(data_dir: Path, spec: DataFile) -> Path:
    """Fetch one canonical file into data_dir and verify it (users with internet only)."""
    url, _, member = spec.url.partition("#")
    print(f"downloading {url}", flush=True)
    with urllib.request.urlopen(url, timeout=60) as resp:
        payload = resp.read()
    if member:
        payload = zipfile.ZipFile(io.BytesIO(payload)).read(member)
    path = data_dir / spec.name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_bytes(payload)
    tmp.replace(path)
    return verify(data_dir, spec)


def fetch(name: str, data_dir: Path, allow_download: bool = False) -> Path:
    """The verified path of registry file `name`, downloading it first if allowed."""
    spec = FILES[name]
    if allow_download and not (data_dir / name).is_file():
        return download(data_dir, spec)
    return verify(data_dir, spec)


def read_idx(path: Path) -> np.ndarray:
    """Parse a (gzipped) big-endian IDX file: magic 2051 images (N, H, W), 2049 labels (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise DataError(f"{path}: too short for an IDX header")
    magic, count = struct.unpack(">II", raw[:8])
    if magic == 2049:
        dims, offset = (count,), 8
    elif magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        dims, offset = (count, rows, cols), 16
    else:
        raise DataError(f"{path}: bad IDX magic {magic} (expected 2049 or 2051)")
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"{path}: {len(raw) - offset} payload bytes, header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def read_sst2(path: Path) -> tuple[list[str], np.ndarray]:
    """Parse a GLUE SST-2 `sentence<TAB>label` file -> (sentences, labels int64)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != ["sentence", "label"]:
        raise DataError(f"{path}: expected header 'sentence<TAB>label'")
    sentences, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        sentence, sep, label = line.rpartition("\t")
        if not sep or label not in ("0", "1"):
            raise DataError(f"{path}:{n}: expected '<sentence>\\t<0|1>'")
        sentences.append(sentence.strip())
        labels.append(int(label))
    return sentences, np.array(labels, dtype=np.int64)


def load_images(dataset: str, split: str, data_dir: Path, allow_download: bool = False):
    """(images (N, 28, 28) uint8, labels (N,) int64) for dataset 'mnist'|'fashion'."""
    folder = IMAGE_DATASETS[dataset]
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(fetch(f"{folder}/{prefix}-images-idx3-ubyte.gz", data_dir, allow_download))
    labels = read_idx(fetch(f"{folder}/{prefix}-labels-idx1-ubyte.gz", data_dir, allow_download))
    if len(images) != len(labels):
        raise DataError(f"{dataset}/{split}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def load_sst2(split: str, data_dir: Path, allow_download: bool = False):
    """(sentences, labels) for SST-2 'train' or 'dev' (dev is our reported test set)."""
    return read_sst2(fetch(f"sst2/{split}.tsv", data_dir, allow_download))


def dataset_checksums(folder: str) -> dict[str, str]:
    """{file: sha256} of the registry files under `folder`, for model metadata."""
    return {n: f.sha256 for n, f in FILES.items() if n.startswith(folder + "/")}


def split_indices(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (train, validation) split of range(n); the test set is never touched."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
