#!/usr/bin/env bash
# Start dockerd when it is not running (CI machines have nothing left running): in the
# background, its log in ${DOCKERD_LOG:-/var/log/dockerd.log}; waits for `docker info`.
set -euo pipefail
docker info >/dev/null 2>&1 && exit 0
command -v dockerd >/dev/null || { echo "dockerd missing: make tools installs docker.io" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "dockerd is not running and only root can start it" >&2; exit 1; }
log=${DOCKERD_LOG:-/var/log/dockerd.log}
nohup dockerd >>"$log" 2>&1 &
for _ in $(seq 120); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 0.5
done
echo "dockerd did not answer in 60 s: $log" >&2
tail -20 "$log" >&2
exit 1
