"""Stage onnxruntime-gpu and the serving packages a GPU device lacks, in parts that each fit
one call of the device tool (64 MiB per call, the working tree included). docs/gpu.md,
"Device runbook", says how the calls follow each other.

    python -m deploy.gpu.stage build            here (make gpu-stage): .stage/part*.bin + stage.json
    python3 -m deploy.gpu.stage receive N       on the device, in call N: part N -> /tmp/stage,
                                                sha256 checked; once every part is there, the
                                                payload is unpacked into /tmp/site

The payload is one tar.xz of a ready-made site-packages folder for CPython 3.12 on x86-64:
- onnxruntime from the onnxruntime-gpu wheel, trimmed to what Python needs (the .py files, the
  cp312 pybind module, libonnxruntime_providers_shared.so and the CUDA provider). The CUDA
  provider is 284 MB, 208 MB of it GPU code for six architectures (sm_75 ... sm_120), each
  kernel a zstd-compressed cubin; xz brings it to 186 MB only. By default every cubin that is
  not sm_90 (the H100/H200) is zeroed in place (same size, same offsets, only other cards'
  kernels lost), which xz then shrinks to nothing: 52 MB. `--all-archs` keeps the file as shipped.
- every package of deepserve's serving closure (read from this venv's metadata, for Python 3.12)
  that the device image lacks (its list: .library/device/KINDS.md, 2026-11-17), at the versions
  pinned here, plus prometheus-client at the pin (service.metrics uses its internals).

Standard library only: `receive` runs under the device's python3 before anything is installed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import lzma
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGE = REPO / ".stage"  # .gitignore: parts, stage.json, RUNBOOK.md (never committed)
WHEELS = REPO / ".whl"  # .gitignore: the downloaded wheels (cache)
DEVICE_STAGE = Path("/tmp/stage")  # on the device: the parts, checked, then joined
DEVICE_SITE = Path("/tmp/site")  # on the device: the unpacked packages (PYTHONPATH)
STAMP = ".deepserve-stage.json"  # in DEVICE_SITE: which payload was unpacked there

ORT_GPU = ("onnxruntime-gpu", "1.31.1")
PYTHON = "3.12"  # the device's python3 (Python 3.12.3)
ABI = "cp312"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64", "manylinux_2_24_x86_64"]
PLATFORMS += ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"]
CALL_LIMIT = 64 * 2**20  # the device tool: working tree + carried paths, per call
MARGIN = 2 * 2**20  # room for the tree to grow between `build` and the calls
KEEP_ARCH = 90  # the H200's (and H100's) compute capability 9.0: sm_90 / sm_90a cubins

# the device image's Python packages (KINDS.md, read 2026-11-17): a serving dependency listed
# there is not carried
DEVICE_PACKAGES = Path(__file__).with_name("device-packages.txt")
# carried even though the device has a version: deepserve depends on this exact one
CARRY_PINNED = {"prometheus-client": "service.metrics writes histogram buckets through its internals"}
NOT_CARRIED = {"onnxruntime"}  # replaced by the trimmed onnxruntime-gpu


class StageError(RuntimeError):
    """The stage cannot be built or received; the message says what to do."""


def say(msg: str) -> None:
    print(msg, flush=True)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- what to carry


def serving_closure(root: str = "deepserve") -> dict[str, str]:
    """name -> installed version of every distribution the serving install of `root` pulls in
    (no extras of root), with environment markers evaluated for the device's Python 3.12."""
    import importlib.metadata as md

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "python_version": PYTHON, "python_full_version": PYTHON + ".3"}
    found: dict[str, str] = {}
    todo = [(Requirement(r), "") for r in md.requires(root) or []]
    seen = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = norm(req.name)
        for ex in sorted(req.extras) or [""]:
            if (name, ex) in seen:
                continue
            seen.add((name, ex))
            try:
                dist = md.distribution(name)
            except md.PackageNotFoundError:
                raise StageError(f"{name} (needed by the serving install) is not installed in this venv") from None
            found[name] = dist.version
            todo += [(Requirement(r), ex) for r in dist.requires or []]
    return found


def device_has(path: Path = DEVICE_PACKAGES) -> frozenset[str]:
    lines = (ln.strip() for ln in path.read_text().splitlines())
    return frozenset(norm(ln) for ln in lines if ln and not ln.startswith("#"))


def to_carry(closure: dict[str, str], present: frozenset[str]) -> dict[str, str]:
    """The serving packages the device lacks, plus the pinned ones it must not mix."""
    return {
        n: v for n, v in sorted(closure.items()) if n not in NOT_CARRIED and (n not in present or n in CARRY_PINNED)
    }


def pip_platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp", "--abi", ABI]
    args += ["--abi", "abi3", "--abi", "none"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def download(pins: dict[str, str], dest: Path) -> list[Path]:
    """Wheels for the device's Python, one per pin, into dest (reused when already there)."""
    dest.mkdir(parents=True, exist_ok=True)

    def have(name: str, version: str) -> Path | None:
        stem = re.sub(r"[-_.]+", "_", name).lower() + "-" + version + "-"
        return next((w for w in dest.glob("*.whl") if w.name.lower().startswith(stem)), None)

    missing = [f"{n}=={v}" for n, v in pins.items() if have(n, v) is None]
    if missing:
        say(f"pip download ({len(missing)} wheels for CPython {PYTHON}, manylinux x86-64) into {dest}")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *pip_platform_args(), "-d", str(dest)]
        subprocess.run([*cmd, *missing], check=True)
    wheels = []
    for n, v in pins.items():
        w = have(n, v)
        if w is None:
            raise StageError(f"no wheel for {n}=={v} after pip download")
        wheels.append(w)
    return wheels


# --------------------------------------------------------------------------- the CUDA provider


def elf_section(data: bytes | bytearray, name: str) -> tuple[int, int] | None:
    """(file offset, size) of an ELF64 little-endian section, read from the section headers."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise StageError("not an ELF64 little-endian file")
    shoff, shentsize, shnum, shstrndx = (
        struct.unpack_from("<Q", data, 0x28)[0],
        *struct.unpack_from("<HHH", data, 0x3A),
    )
    names_off = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)[0]
    for i in range(shnum):
        h = shoff + i * shentsize
        name_idx = struct.unpack_from("<I", data, h)[0]
        end = data.index(b"\0", names_off + name_idx)
        if data[names_off + name_idx : end].decode() == name:
            off, size = struct.unpack_from("<QQ", data, h + 0x18)
            return off, size
    return None


FATBIN_MAGIC = 0xBA55ED50


def prune_fatbin(data: bytearray, keep_arch: int = KEEP_ARCH) -> dict:
    """Zero, in place, every GPU-code entry of the .nv_fatbin section whose architecture is not
    `keep_arch`. Each entry's header (kind, arch, sizes) is kept, so the CUDA driver, which
    picks the entry matching the device from those headers, still finds the sm_90 one; only
    the payloads of entries no H200 can run become zeros. Returns MiB kept and zeroed per arch."""
    where = elf_section(data, ".nv_fatbin")
    if where is None:
        raise StageError("no .nv_fatbin section: not a CUDA library")
    start, size = where
    stats: dict[str, dict[int, float]] = {"kept_mib": {}, "zeroed_mib": {}}
    pos, end = start, start + size
    while pos + 16 <= end:
        magic, _version, header, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned inside the section
            continue
        entry, fat_end = pos + header, pos + header + fat_size
        while entry < fat_end:
            kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            body = entry + entry_header
            if kind not in (1, 2) or body + payload > fat_end:
                raise StageError(f"unexpected fatbin entry at {entry:#x} (kind {kind}): not pruning")
            mib = payload / 2**20
            if arch == keep_arch:
                stats["kept_mib"][arch] = stats["kept_mib"].get(arch, 0) + mib
            else:
                data[body : body + payload] = bytes(payload)
                stats["zeroed_mib"][arch] = stats["zeroed_mib"].get(arch, 0) + mib
            entry = body + payload
        pos = fat_end
    if not stats["kept_mib"]:
        raise StageError(f"the fatbin has no sm_{keep_arch} code: pruning would leave no kernels")
    return {k: {f"sm_{a}": round(m, 1) for a, m in sorted(v.items())} for k, v in stats.items()}


def trim_onnxruntime(wheel: Path, site: Path, prune: bool) -> dict:
    """onnxruntime/ from the onnxruntime-gpu wheel into site: .py files, the cp312 pybind module,
    the shared provider bridge and the CUDA provider (pruned unless prune=False)."""
    keep_libs = {"libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so"}
    info: dict = {"wheel": wheel.name, "files": 0, "bytes": 0}
    with zipfile.ZipFile(wheel) as z:
        for item in z.infolist():
            name = item.filename
            base = name.rsplit("/", 1)[-1]
            dist_info = name.split("/", 1)[0].endswith(".dist-info")
            wanted = (
                (name.startswith("onnxruntime/") and name.endswith(".py"))
                or (
                    name.startswith("onnxruntime/capi/")
                    and (base in keep_libs or base.startswith(f"onnxruntime_pybind11_state.cpython-{ABI[2:]}"))
                )
                or (dist_info and base in ("METADATA", "WHEEL", "top_level.txt"))
            )
            if not wanted:
                continue
            data = bytearray(z.read(item))
            if base == "libonnxruntime_providers_cuda.so" and prune:
                info["pruned"] = prune_fatbin(data)
            target = site / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            if base.endswith(".so"):
                target.chmod(0o755)
            info["files"] += 1
            info["bytes"] += len(data)
    if not (site / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so").is_file():
        raise StageError(f"{wheel.name} has no CUDA provider")
    return info


# --------------------------------------------------------------------------- build (here)


def tree_bytes(repo: Path = REPO) -> int:
    """What the device tool sends on every call: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    total = 0
    for name in set(out.decode().split("\0")) - {""}:
        p = repo / name
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def split(payload: Path, dest: Path, part_bytes: int) -> list[dict]:
    """payload -> dest/part1.bin, part2.bin, ... each at most part_bytes, with their sha256."""
    parts = []
    with open(payload, "rb") as f:
        i = 0
        while chunk := f.read(part_bytes):
            i += 1
            path = dest / f"part{i}.bin"
            path.write_bytes(chunk)
            parts.append({"file": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return parts


def pack(site: Path, payload: Path, preset: int) -> None:
    """site/ as an xz-compressed tar (Python's lzma: the device needs no xz binary)."""
    with lzma.open(payload, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for p in sorted(site.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(site)), recursive=False)


def runbook(stage: dict) -> str:
    """The device calls, each ready to issue as soon as the previous one returns."""
    n = len(stage["parts"])
    lines = [
        f"# Device runbook, staged {stage['created']} ({n} calls; the machine stays warm ~30 s between calls:",
        "# issue each call as soon as the previous returns, or /tmp/stage is lost and it starts again at call 1)",
        "",
    ]
    for i, part in enumerate(stage["parts"], 1):
        carry = [".stage/stage.json", f".stage/{part['file']}"]
        if i < n:
            cmd = f"python3 -m deploy.gpu.stage receive {i}"
            timeout = 120
        else:
            cmd = (
                f"set -o pipefail; python3 -m deploy.gpu.stage receive {i} && PYTHONUNBUFFERED=1 "
                "python3 -m deploy.gpu.verify --device cuda --out $OUT 2>&1 | tee $OUT/verify.log"
            )
            timeout = 540
        mib = (stage["tree_bytes"] + part["bytes"]) / 2**20
        lines.append(
            f"call {i}/{n}: sends {mib:.1f} MiB (tree {stage['tree_bytes'] / 2**20:.1f} + part {part['bytes'] / 2**20:.1f})"
        )
        lines.append(json.dumps({"command": cmd, "carry": carry, "timeout_s": timeout}))
        lines.append("")
    return "\n".join(lines)


def build(args) -> int:
    """make gpu-stage: download, trim, pack, split; write .stage/stage.json and RUNBOOK.md."""
    started = datetime.datetime.now()
    stage_dir = Path(args.stage)
    closure = serving_closure()
    carry = to_carry(closure, device_has())
    say(
        f"serving closure: {len(closure)} distributions; the device lacks {len(carry) - len(CARRY_PINNED)}, carried with {', '.join(CARRY_PINNED)} (pinned)"
    )
    wheels = download({ORT_GPU[0]: ORT_GPU[1], **carry}, Path(args.wheels))
    ort_wheel, serving = wheels[0], wheels[1:]
    tree = tree_bytes()
    part_bytes = CALL_LIMIT - tree - MARGIN - 64 * 1024  # stage.json travels too
    if part_bytes < 4 * 2**20:
        raise StageError(f"the working tree is {tree / 2**20:.1f} MiB: too little room left in a 64 MiB call")
    with tempfile.TemporaryDirectory(prefix="deepserve-stage-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        ort = trim_onnxruntime(ort_wheel, site, prune=not args.all_archs)
        say(
            f"onnxruntime-gpu trimmed: {ort['files']} files, {ort['bytes'] / 2**20:.1f} MiB unpacked; pruned: {ort.get('pruned', 'no')}"
        )
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--no-index",
            "--target",
            str(site),
        ]
        subprocess.run([*cmd, *pip_platform_args(), *map(str, serving)], check=True)
        for extra in ("bin",):  # console scripts: the device runs `python3 -m bentoml`
            shutil.rmtree(site / extra, ignore_errors=True)
        unpacked = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
        if stage_dir.exists():
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True)
        payload = Path(tmp) / "payload.tar.xz"
        say(f"packing {unpacked / 2**20:.1f} MiB with xz -{args.preset} (about a minute per 50 MiB on one core)")
        pack(site, payload, args.preset)
        parts = split(payload, stage_dir, part_bytes)
        stage = {
            "created": started.isoformat(timespec="seconds"),
            "payload": {"bytes": payload.stat().st_size, "sha256": sha256(payload), "unpacked_bytes": unpacked},
            "parts": parts,
            "tree_bytes": tree,
            "part_limit_bytes": part_bytes,
            "onnxruntime": {"package": f"{ORT_GPU[0]}=={ORT_GPU[1]}", **ort, "all_archs": bool(args.all_archs)},
            "wheels": {w.name: w.stat().st_size for w in serving},
            "wheels_bytes": sum(w.stat().st_size for w in serving),
            "pack_seconds": round((datetime.datetime.now() - started).total_seconds(), 1),
        }
    (stage_dir / "stage.json").write_text(json.dumps(stage, indent=2) + "\n")
    book = runbook(stage)
    (stage_dir / "RUNBOOK.md").write_text(book + "\n")
    say(
        f"\npayload {stage['payload']['bytes'] / 2**20:.1f} MiB (xz) from {unpacked / 2**20:.1f} MiB; "
        f"serving wheels {stage['wheels_bytes'] / 2**20:.1f} MiB ({len(serving)}); working tree {tree / 2**20:.1f} MiB; "
        f"{len(parts)} parts of at most {part_bytes / 2**20:.1f} MiB -> {stage_dir}\n"
    )
    say(book)
    return 0


# --------------------------------------------------------------------------- receive (device)


def receive(args) -> int:
    """Move part N to /tmp/stage with its sha256 checked; unpack once every part is there."""
    stage_dir, dest, site = Path(args.stage), Path(args.dest), Path(args.site)
    stage = json.loads((stage_dir / "stage.json").read_text())
    parts = stage["parts"]
    n = args.part
    if not 1 <= n <= len(parts):
        raise StageError(f"part {n}: this stage has parts 1..{len(parts)}")
    dest.mkdir(parents=True, exist_ok=True)
    held = dest / "stage.json"
    if held.is_file() and json.loads(held.read_text())["payload"]["sha256"] != stage["payload"]["sha256"]:
        say(f"{dest} holds parts of another stage: cleared")
        shutil.rmtree(dest)
        dest.mkdir()
    shutil.copy(stage_dir / "stage.json", held)
    want = parts[n - 1]
    src = stage_dir / want["file"]
    if not src.is_file():
        raise StageError(f"{src} did not travel: carry .stage/{want['file']} in this call")
    got = sha256(src)
    if got != want["sha256"]:
        raise StageError(f"{want['file']}: sha256 {got[:16]}..., expected {want['sha256'][:16]}...: restage")
    shutil.move(src, dest / want["file"])
    have = [p for p in parts if (dest / p["file"]).is_file() and (dest / p["file"]).stat().st_size == p["bytes"]]
    missing = [i for i, p in enumerate(parts, 1) if p not in have]
    say(
        f"part {n}/{len(parts)} ({want['bytes'] / 2**20:.1f} MiB) checked and moved to {dest}; missing: {missing or 'none'}"
    )
    if missing:
        if n == len(parts):
            raise StageError(
                f"parts {missing} are not in {dest}: the machine was given back between calls; begin again at call 1"
            )
        return 0
    unpack(stage, dest, site)
    return 0


def unpack(stage: dict, dest: Path, site: Path) -> None:
    """Join the parts, check the payload's sha256, and extract it into a fresh site folder."""
    stamp = site / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == stage["payload"]["sha256"]:
        say(f"{site} already holds this payload")
        return
    h = hashlib.sha256()
    joined = dest / "payload.tar.xz"
    with open(joined, "wb") as out:
        for p in stage["parts"]:
            data = (dest / p["file"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != p["sha256"]:
                raise StageError(f"{p['file']} changed in {dest}: begin again at call 1")
            h.update(data)
            out.write(data)
    if h.hexdigest() != stage["payload"]["sha256"]:
        raise StageError("the joined payload's sha256 does not match stage.json: begin again at call 1")
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    with tarfile.open(joined, mode="r:xz") as tar:
        tar.extractall(site, filter="data")
    stamp.write_text(json.dumps({"sha256": stage["payload"]["sha256"], "created": stage["created"]}) + "\n")
    say(f"unpacked {stage['payload']['unpacked_bytes'] / 2**20:.1f} MiB into {site}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="here: download, trim, pack and split into .stage/ (make gpu-stage)")
    b.add_argument("--stage", default=str(STAGE), help="output folder (default .stage/, ignored by git)")
    b.add_argument("--wheels", default=str(WHEELS), help="wheel cache (default .whl/, ignored by git)")
    b.add_argument("--all-archs", action="store_true", help="keep every GPU architecture's kernels (186 MB more)")
    b.add_argument("--preset", type=int, default=9, help="xz preset (default 9)")
    r = sub.add_parser("receive", help="on the device: part N -> /tmp/stage; unpack when complete")
    r.add_argument("part", type=int)
    r.add_argument("--stage", default=str(STAGE))
    r.add_argument("--dest", default=str(DEVICE_STAGE))
    r.add_argument("--site", default=str(DEVICE_SITE))
    args = ap.parse_args(argv)
    try:
        return build(args) if args.cmd == "build" else receive(args)
    except (StageError, OSError, subprocess.CalledProcessError) as exc:
        say(f"gpu-stage: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
