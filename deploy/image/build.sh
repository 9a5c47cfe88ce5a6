#!/usr/bin/env bash
# make image / make image-gpu: the Bento and its image, the way a BentoML user builds them
# (`bentoml build` + `bentoml containerize`, BuildKit), on deepserve-base:bookworm (base.sh).
#   deploy/image/build.sh [bentofile]     prints the image tag (<bento name>:<bento version>),
#                                         also tagged <bento name>:latest
# BENTOML_HOME is honoured (the Bento store). A CA the package index is reached through (a
# proxy that re-signs TLS) goes in as a BuildKit secret, never into a layer: the PEM files in
# DEEPSERVE_BUILD_CA_FILES (default: the local CAs in /usr/local/share/ca-certificates).
set -euo pipefail
cd "$(dirname "$0")/../.."
BENTOFILE=${1:-bentofile.yaml}
BENTOML=${BENTOML:-.venv/bin/bentoml}

deploy/image/dockerd.sh
deploy/image/base.sh >&2
# BuildKit from the docker CLI needs the buildx plugin since Docker 23; Debian's 20.10 client
# (docker.io) has BuildKit built in
if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then
  export PATH="/usr/bin:$PATH"
fi
export DOCKER_BUILDKIT=1

tag=$("$BENTOML" build -f "$BENTOFILE" . --output tag 2>/dev/null | tail -1)
tag=${tag#__tag__:}
[[ "$tag" == *:* ]] || { echo "bentoml build failed" >&2; "$BENTOML" build -f "$BENTOFILE" . >&2; exit 1; }

# the bentofiles declare DEEPSERVE_BUILD_CA and SSL_CERT_FILE with stage: build: BentoML hands
# each to BuildKit as a secret (/run/secrets/<name>) and sets it for the build's RUN steps only
shopt -s nullglob
ca_files=(${DEEPSERVE_BUILD_CA_FILES:-/usr/local/share/ca-certificates/*.crt})
unset SSL_CERT_FILE DEEPSERVE_BUILD_CA
if [ ${#ca_files[@]} -gt 0 ]; then
  DEEPSERVE_BUILD_CA=$(cat "${ca_files[@]}")
  export DEEPSERVE_BUILD_CA SSL_CERT_FILE=/run/secrets/DEEPSERVE_BUILD_CA
fi
"$BENTOML" containerize "$tag" --image-tag "$tag" --opt progress=plain >&2
docker tag "$tag" "${tag%%:*}:latest"
echo "$tag"
