#!/usr/bin/env bash
# Install and start a Docker engine with Compose v2 on a Debian bookworm host
# without systemd (CI/dev machine, root). Idempotent: every step is skipped when
# it is already done, so it is safe to run before each test session.
set -euo pipefail

PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }

. "$(dirname "$0")/trixie_apt.sh"  # MIRROR, trixie_apt

step() { echo "== $1"; SECONDS=0; }
done_in() { echo "   done in ${SECONDS}s"; }

# 1. Engine (docker.io 20.10 from bookworm) and debootstrap for the base image.
step "engine"
if command -v dockerd >/dev/null && command -v debootstrap >/dev/null; then
  echo "   already installed"
else
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    docker.io debootstrap
  done_in
fi

# 2. Compose v2: not packaged for bookworm, so take the plugin binary from
# trixie's docker-compose .deb. A private apt sources/lists/cache dir keeps the
# machine's own apt configuration and package state untouched.
step "compose plugin"
if [ -x "$PLUGIN_DIR/docker-compose" ]; then
  echo "   already installed"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  trixie_apt "$tmp"
  (cd "$tmp" && apt-get "${apt_opts[@]}" download docker-compose)
  dpkg-deb -x "$tmp"/docker-compose_*.deb "$tmp/root"
  install -D -m 755 "$tmp/root/usr/libexec/docker/cli-plugins/docker-compose" \
    "$PLUGIN_DIR/docker-compose"
  done_in
fi

# 3. Daemon. No systemd here, so start dockerd ourselves, detached in its own
# session so it outlives this script. iptables/masquerading are off because the
# machine has no outside network to NAT to; bridge networks still work.
step "daemon"
if docker info >/dev/null 2>&1; then
  echo "   already answering"
else
  setsid dockerd --iptables=false --ip-masq=false --storage-driver=overlay2 \
    </dev/null >>"$DOCKERD_LOG" 2>&1 &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || {
    echo "dockerd did not answer within 60s; last log lines:" >&2
    tail -n 20 "$DOCKERD_LOG" >&2
    exit 1
  }
  done_in
fi

docker version --format 'client {{.Client.Version}}, engine {{.Server.Version}}'
docker compose version
