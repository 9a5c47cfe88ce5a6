#!/usr/bin/env bash
# Prepare this machine for deploy/swarm/stack.yml: dockerd running, a single-node swarm that
# listens on 127.0.0.1 only (control plane and published ports: docker_gwbridge is created
# first, binding published host-mode ports to 127.0.0.1), and the HAProxy image. Idempotent.
#   deploy/swarm/deploy.sh            then: docker stack deploy ... (stack.yml's header)
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/image/dockerd.sh
deploy/image/base.sh >/dev/null
if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
  if ! docker network inspect docker_gwbridge >/dev/null 2>&1; then
    docker network create \
      --opt com.docker.network.bridge.name=docker_gwbridge \
      --opt com.docker.network.bridge.enable_icc=false \
      --opt com.docker.network.bridge.enable_ip_masquerade=true \
      --opt com.docker.network.bridge.host_binding_ipv4=127.0.0.1 \
      docker_gwbridge >/dev/null
  fi
  docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377 >/dev/null
fi
binding=$(docker network inspect docker_gwbridge --format '{{index .Options "com.docker.network.bridge.host_binding_ipv4"}}')
[ "$binding" = 127.0.0.1 ] || { echo "docker_gwbridge binds published ports to '${binding:-0.0.0.0}', not 127.0.0.1" >&2; exit 1; }
# Debian's 20.10 client has BuildKit built in; the legacy builder needs nothing either
PATH="/usr/bin:$PATH" DOCKER_BUILDKIT=0 docker build -q -t deepserve-haproxy:latest \
  -f deploy/swarm/haproxy.Dockerfile deploy/swarm >/dev/null
echo "swarm active on 127.0.0.1; deepserve-haproxy:latest built"
