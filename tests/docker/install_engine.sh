#!/usr/bin/env bash
# Install and start a Docker engine with Compose v2 on a Debian bookworm host
# without systemd (CI/dev machine, root). Idempotent: every step is skipped when
# it is already done, so it is safe to run before each test session.
set -euo pipefail

PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }

# The Debian mirror this machine already uses (registries other than Debian's
# apt sources and PyPI are unreachable). DEBIAN_MIRROR overrides.
debian_mirror() {
  # Either format may be absent (one-line .list vs deb822 .sources): cat skips it.
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '/^[[:space:]]*#/ {next}
       $1 == "URIs:" && $2 ~ /\/debian\/?$/ {print $2; exit}
       $1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\/.*\/debian\/?$/) {print $i; exit}}' || true
}
MIRROR=${DEBIAN_MIRROR:-$(debian_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

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
  mkdir -p "$tmp/sources.list.d" "$tmp/lists/partial" "$tmp/cache/archives/partial"
  : > "$tmp/sources.list"
  # apt fetches as the unprivileged _apt user; give it the dirs it writes to.
  chmod 755 "$tmp"
  chown -R _apt "$tmp"
  cat > "$tmp/sources.list.d/trixie.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt_opts=(-o "Dir::Etc::sourcelist=$tmp/sources.list"
            -o "Dir::Etc::sourceparts=$tmp/sources.list.d"
            -o "Dir::State::Lists=$tmp/lists"
            -o "Dir::Cache=$tmp/cache")
  apt-get "${apt_opts[@]}" update -q
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
