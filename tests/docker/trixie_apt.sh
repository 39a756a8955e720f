# Sourced by tests/docker/install_engine.sh and bench/docker_gpu/pack_engine.sh: apt pointed at
# Debian trixie through private sources, lists and cache, so the machine's own apt
# configuration and package state stay untouched (only Debian's mirror and PyPI are reachable
# from our machines). Defines MIRROR (DEBIAN_MIRROR overrides) and trixie_apt.

# The Debian mirror this machine already uses; either source format may be absent.
debian_mirror() {
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '/^[[:space:]]*#/ {next}
       $1 == "URIs:" && $2 ~ /\/debian\/?$/ {print $2; exit}
       $1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\/.*\/debian\/?$/) {print $i; exit}}' || true
}
MIRROR=${DEBIAN_MIRROR:-$(debian_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

# trixie_apt DIR: the private apt tree in DIR (handed to _apt, the user apt fetches as), the
# array apt_opts that points apt-get and apt-cache at it, and a fresh package list.
trixie_apt() {
  local dir=$1
  mkdir -p "$dir/sources.list.d" "$dir/lists/partial" "$dir/cache/archives/partial"
  : > "$dir/sources.list"
  cat > "$dir/sources.list.d/trixie.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  chmod 755 "$dir"
  chown -R _apt "$dir"
  apt_opts=(-o "Dir::Etc::sourcelist=$dir/sources.list"
            -o "Dir::Etc::sourceparts=$dir/sources.list.d"
            -o "Dir::State::Lists=$dir/lists"
            -o "Dir::Cache=$dir/cache"
            -o "Dir::State::status=/dev/null")
  apt-get "${apt_opts[@]}" update -q
}
