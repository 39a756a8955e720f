#!/usr/bin/env bash
# Pack a compact, self-contained Docker engine for the offline GPU machine.
#
# Why: the GPU machine (Ubuntu 24.04, glibc 2.39, root) has no Docker, no
# internet and no NVIDIA container toolkit; GPUs reach containers only through
# CDI (dockerd >= 25 with features.cdi). Debian trixie ships docker.io 26.1.5
# (CDI-capable) and docker-compose 2.26.1, built against an older glibc than
# 2.39, so their binaries run there unchanged.
#
# What it needs: run as root on a Debian host with apt, dpkg-deb, xz and
# (optionally) binutils' strip; network access to the Debian mirror this
# machine's apt sources already use (DEBIAN_MIRROR overrides). The machine's
# own apt configuration and package state are left untouched: private
# sources/lists/cache dirs are used (same approach as
# tests/docker/install_engine.sh step 2).
#
# Output: .gpu-carry/engine/engine.tar.xz holding
#   bin/{dockerd,docker-proxy,containerd,containerd-shim-runc-v2,runc,docker,
#        docker-init}            (docker-init = tini-static, for `init: true`)
#   cli-plugins/docker-compose
#   bin/iptables-nft, bin/iptables-legacy   wrappers of lib/xtables-*-multi with lib/'s
#        libraries and extensions: dockerd's embedded DNS (service names on a
#        user-defined network) sets its redirect rules with `iptables` inside each
#        container's namespace even with "iptables": false, and the GPU machine has none.
#        start_engine.sh links the one the kernel takes as bin/iptables.
# On the target: untar, put bin/ on PATH (dockerd finds containerd, runc,
# docker-init, docker-proxy there) and point DOCKER_CONFIG (or ~/.docker) at a
# dir whose cli-plugins/ holds docker-compose.
set -euo pipefail

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }

REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT_DIR=$REPO/.gpu-carry/engine
OUT=$OUT_DIR/engine.tar.xz

# Keep .gpu-carry/ out of git without touching tracked files.
exclude=$(git -C "$REPO" rev-parse --git-path info/exclude 2>/dev/null || echo "$REPO/.git/info/exclude")
case $exclude in /*) ;; *) exclude=$REPO/$exclude ;; esac
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
grep -qxF '/.gpu-carry/' "$exclude" || echo '/.gpu-carry/' >> "$exclude"

. "$REPO/tests/docker/trixie_apt.sh"  # MIRROR, trixie_apt: the same private apt as the tests' engine

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
trixie_apt "$tmp"
mkdir -p "$tmp/debs" "$tmp/root" "$tmp/stage/bin" "$tmp/stage/cli-plugins" "$tmp/stage/lib"
chown _apt "$tmp/debs"  # apt-get download writes there as _apt

pkgs=(docker.io containerd runc docker-compose tini iptables)
# iptables' libraries (libc6 and netbase are the GPU machine's own).
pkgs+=($(apt-cache "${apt_opts[@]}" depends --no-recommends --no-suggests iptables |
  awk '$1 == "Depends:" && $2 !~ /^(<|libc6$|netbase$)/ {print $2}' | sort -u))
# docker-cli is split out of docker.io in some releases; take it when it exists.
if apt-cache "${apt_opts[@]}" show docker-cli >/dev/null 2>&1; then pkgs+=(docker-cli); fi
(cd "$tmp/debs" && apt-get "${apt_opts[@]}" download "${pkgs[@]}")
for deb in "$tmp"/debs/*.deb; do
  echo "   $(basename "$deb")"
  dpkg-deb -x "$deb" "$tmp/root"
done

# Locate each binary wherever the package put it.
find_bin() {
  local p
  for p in "$@"; do
    [ -f "$tmp/root/$p" ] && { echo "$tmp/root/$p"; return; }
  done
  echo "missing: $*" >&2; exit 1
}
S=$tmp/stage
install -m 755 "$(find_bin usr/sbin/dockerd usr/bin/dockerd)" "$S/bin/dockerd"
install -m 755 "$(find_bin usr/sbin/docker-proxy usr/bin/docker-proxy usr/libexec/docker/docker-proxy)" "$S/bin/docker-proxy"
install -m 755 "$(find_bin usr/bin/containerd)" "$S/bin/containerd"
install -m 755 "$(find_bin usr/bin/containerd-shim-runc-v2)" "$S/bin/containerd-shim-runc-v2"
install -m 755 "$(find_bin usr/sbin/runc usr/bin/runc)" "$S/bin/runc"
install -m 755 "$(find_bin usr/bin/docker)" "$S/bin/docker"
install -m 755 "$(find_bin usr/bin/tini-static)" "$S/bin/docker-init"
install -m 755 "$(find_bin usr/libexec/docker/cli-plugins/docker-compose usr/lib/docker/cli-plugins/docker-compose)" \
  "$S/cli-plugins/docker-compose"

install -m 755 "$(find_bin usr/sbin/xtables-nft-multi)" "$S/lib/xtables-nft-multi"
install -m 755 "$(find_bin usr/sbin/xtables-legacy-multi)" "$S/lib/xtables-legacy-multi"
cp -a "$tmp"/root/usr/lib/x86_64-linux-gnu/*.so* "$S/lib/"
cp -a "$tmp/root/usr/lib/x86_64-linux-gnu/xtables" "$S/lib/xtables"
for backend in nft legacy; do
  cat > "$S/bin/iptables-$backend" <<SH
#!/bin/sh
# iptables ($backend backend) from the carried libraries; see pack_engine.sh.
lib=\$(dirname "\$(readlink -f "\$0")")/../lib
LD_LIBRARY_PATH="\$lib" XTABLES_LIBDIR="\$lib/xtables" exec "\$lib/xtables-$backend-multi" iptables "\$@"
SH
  chmod 755 "$S/bin/iptables-$backend"
done

if command -v strip >/dev/null; then
  for f in "$S"/bin/* "$S"/cli-plugins/*; do strip --strip-unneeded "$f" 2>/dev/null || true; done
fi

echo "== binaries (raw bytes, max GLIBC symbol version)"
for f in "$S"/bin/* "$S"/cli-plugins/* "$S"/lib/*-multi; do
  g=$(objdump -T "$f" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1 || true)
  printf '   %-40s %10s  %s\n' "${f#"$S"/}" "$(stat -c %s "$f")" "${g:-static}"
done

mkdir -p "$OUT_DIR"
tar -C "$S" --owner=0 --group=0 -cf - bin cli-plugins lib | xz -9e -T0 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
printf '== %s: %s bytes (%s MiB)\n' "$OUT" "$(stat -c %s "$OUT")" \
  "$(awk -v b="$(stat -c %s "$OUT")" 'BEGIN {printf "%.1f", b/1048576}')"
