#!/usr/bin/env bash
# Starts a Docker engine, with GPUs through CDI, on a host that has the NVIDIA driver but
# neither Docker nor NVIDIA's container toolkit (the lent GPU machine: Ubuntu 24.04, root,
# no package registry).
#   bash bench/docker_gpu/start_engine.sh [ENGINE_TARBALL]
# Needs: root; cgroup v2 and overlayfs (the kernel's); the tarball from pack_engine.sh
# (Debian trixie's dockerd 26.1.5, containerd, runc, docker CLI, compose 2.26.1, tini as
# docker-init: glibc 2.38 at most). Leaves dockerd running in its own session, so later
# commands on the same machine find it, and links the binaries into /usr/local/bin.
# The engine's settings: CDI on (`features.cdi`; specs in /etc/cdi, where `deploy cdi-spec`
# writes one), no host firewall rules (the machine has no way out; containers reach each
# other on a bridge and the host reaches published ports through docker-proxy), data under
# /var/tmp. An `iptables` binary is still needed: Docker's embedded DNS, which resolves
# compose service names (`superlink`, `trainer-gpu0`), sets its redirect rules with it inside
# each container's namespace, even with "iptables": false. Without one, dockerd logs
# "Resolver Start failed ... iptables not found" and containers cannot find each other by
# name. The pack carries both backends; the one this kernel accepts is linked as iptables.
set -euo pipefail
PACK=${1:-.gpu-carry/engine/engine.tar.xz}
ENGINE=${ENGINE_DIR:-/var/tmp/engine}
DATA=${DOCKER_DATA:-/var/tmp/docker-data}
LOG=${DOCKERD_LOG:-/var/tmp/dockerd.log}
if docker info >/dev/null 2>&1; then
  echo "engine: already running ($(docker version --format '{{.Server.Version}}'))"
  exit 0
fi
t0=$SECONDS
mkdir -p "$ENGINE" /etc/docker /etc/cdi /usr/local/lib/docker/cli-plugins
tar -xJf "$PACK" -C "$ENGINE"
for backend in nft legacy; do
  if "$ENGINE/bin/iptables-$backend" -t nat -S >/dev/null 2>&1; then
    ln -sf "$ENGINE/bin/iptables-$backend" "$ENGINE/bin/iptables"
    break
  fi
done
[ -e "$ENGINE/bin/iptables" ] || { echo "engine: neither iptables-nft nor iptables-legacy works here" >&2; exit 1; }
for b in "$ENGINE"/bin/*; do ln -sf "$b" /usr/local/bin/; done
ln -sf "$ENGINE/cli-plugins/docker-compose" /usr/local/lib/docker/cli-plugins/docker-compose
cat >/etc/docker/daemon.json <<JSON
{"features": {"cdi": true}, "cdi-spec-dirs": ["/etc/cdi"], "iptables": false, "ip-masq": false,
 "data-root": "$DATA", "storage-driver": "overlay2"}
JSON
export PATH="$ENGINE/bin:$PATH"  # dockerd finds containerd, runc, docker-proxy and docker-init here
setsid dockerd >"$LOG" 2>&1 </dev/null &
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
docker info >/dev/null 2>&1 || { tail -n 30 "$LOG"; echo "engine: dockerd did not answer in 60 s" >&2; exit 1; }
echo "engine: dockerd $(docker version --format '{{.Server.Version}}'), $(docker compose version --short 2>/dev/null || echo 'no compose'), $(readlink "$ENGINE/bin/iptables" | sed 's|.*/||'), up in $((SECONDS - t0)) s"
