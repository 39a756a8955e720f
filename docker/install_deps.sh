#!/bin/sh
# What the images' dependency layers run. With docker/wheelhouse filled by wheelhouse.sh:
# offline, from its wheels (air-gapped hosts, CI). Without it (a fresh clone, plain
# `docker compose up` on a host with internet): from the package index, the same
# dependency list read from pyproject.toml.
#   install_deps.sh superlink|app   the image's dependencies into /opt/venv
#   install_deps.sh wheel SRC DEST  the project's own wheel
set -eu
house=/build/docker/wheelhouse
if [ "$1" = wheel ]; then
  if [ -d "$house" ]; then
    exec pip wheel --no-deps --no-index --find-links "$house" -w "$3" "$2"
  fi
  exec pip wheel --no-deps -w "$3" "$2"
fi
if [ -f "$house/requirements-$1.txt" ]; then
  exec pip install --no-index --find-links "$house" -r "$house/requirements-$1.txt"
fi
echo "no docker/wheelhouse: installing the $1 image's dependencies from the package index"
python3 - "$1" >/tmp/requirements.txt <<'PY'
import re, sys, tomllib
deps = tomllib.load(open("/build/pyproject.toml", "rb"))["project"]["dependencies"]
if sys.argv[1] == "superlink":
    deps = [d for d in deps if re.match(r"flwr\s*[<>=!~\[;]", d)]
print("\n".join(deps))
PY
exec pip install -r /tmp/requirements.txt
