#!/usr/bin/env bash
# Build the local Debian bookworm + Python 3.11 base image. No container
# registry is reachable, so `docker pull debian` is impossible: we debootstrap a
# root filesystem from the Debian mirror and `docker import` it instead.
# Usage: make_base_image.sh [TAG]   (default flowertune-base:bookworm)
set -euo pipefail

TAG=${1:-flowertune-base:bookworm}

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }

if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG already exists"
else
  # Same mirror lookup as install_engine.sh; DEBIAN_MIRROR overrides.
  MIRROR=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^[[:space:]]*#/ {next}
       $1 == "URIs:" && $2 ~ /\/debian\/?$/ {print $2; exit}
       $1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\/.*\/debian\/?$/) {print $i; exit}}' || true)}
  MIRROR=${MIRROR:-http://deb.debian.org/debian}

  SECONDS=0
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$MIRROR"
  # Downloaded .debs and package lists are dead weight in the image.
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
         "$rootfs"/var/log/*.log "$rootfs"/tmp/*
  tar -C "$rootfs" --numeric-owner -c . | docker import - "$TAG" >/dev/null
  echo "built $TAG in ${SECONDS}s"
fi

docker image ls "$TAG" --format '{{.Repository}}:{{.Tag}} {{.Size}}'
