#!/usr/bin/env bash
# The base image of deepserve's containers, made from Debian's packages (no image registry needed):
# debootstrap bookworm (minbase) + python3 (Debian 12's 3.11: BentoML's generated Dockerfile runs
# `uv venv --python 3.11` and would otherwise download a Python), the packages its first step
# installs on every Debian base (`apt-get install ca-certificates gnupg2 bash build-essential git`,
# _bentoml_sdk/images.py: so that step finds them installed), and the uv
# binary BentoML's Dockerfile looks for (`command -v uv || pip install uv`; Debian's pip refuses
# to install into the system Python, PEP 668). Built once per machine: the tag carries a hash of
# this script, so an unchanged script reuses the image and a changed one builds a new one;
# deepserve-base:bookworm (the bentofiles' docker.base_image) names the current one.
#   deploy/image/base.sh          build it unless it exists; prints the tag
set -euo pipefail
cd "$(dirname "$0")"
UV_VERSION=0.13.9
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NAME="deepserve-base:${SUITE}"
TAG="${NAME}-$(sha256sum base.sh | cut -c1-12)"

if docker image inspect "$TAG" >/dev/null 2>&1; then
  docker tag "$TAG" "$NAME"
  echo "$NAME"
  exit 0
fi
for tool in debootstrap docker; do
  command -v $tool >/dev/null || { echo "$tool missing: make tools installs it" >&2; exit 1; }
done
work=$(mktemp -d /var/tmp/deepserve-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
echo "debootstrap $SUITE -> $root" >&2
debootstrap --variant=minbase --include=python3,ca-certificates,gnupg2,build-essential,git "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
  { tail -30 "$work/debootstrap.log" >&2; exit 1; }
pip download "uv==$UV_VERSION" --no-deps --only-binary :all: --platform manylinux2014_x86_64 -d "$work/uv" -q >&2
python3 - "$work/uv"/uv-*.whl "$root/usr/local/bin" <<'PY'
import sys, zipfile, os
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.endswith(("/scripts/uv", "/scripts/uvx")):
            path = os.path.join(dest, os.path.basename(name))
            with open(path, "wb") as f:
                f.write(z.read(name))
            os.chmod(path, 0o755)
PY
# what an image does not need: apt's lists and caches, docs, man pages
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
tar --numeric-owner -C "$root" -c . |
  docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'CMD ["/bin/bash"]' \
    -m "debootstrap --variant=minbase $SUITE + python3 ca-certificates gnupg2 build-essential git, uv $UV_VERSION" - "$TAG" >/dev/null
docker tag "$TAG" "$NAME"
echo "$NAME"
