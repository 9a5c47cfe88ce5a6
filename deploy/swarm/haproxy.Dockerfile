# HAProxy in front of the deepserve replicas (deploy/swarm/stack.yml): Debian 12's haproxy (2.6)
# on deepserve-base:bookworm, no image registry needed. Its config comes from the stack (a
# swarm config); built by deploy/swarm/deploy.sh.
FROM deepserve-base:bookworm
RUN apt-get update && apt-get install -y -q --no-install-recommends haproxy && rm -rf /var/lib/apt/lists/*
USER haproxy
ENTRYPOINT ["haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
