#!/usr/bin/env bash
# Fill the wheelhouse that docker/Dockerfile installs from: image builds have no
# package index (air-gapped hosts, CI containers without a route out), so every
# wheel both images need is fetched here, once, for the Python of the target base.
#
#   docker/wheelhouse.sh [DEST]          DEST defaults to docker/wheelhouse
#
# Environment (defaults match flowertune-base:bookworm and pytorch/pytorch:2.9.1-*):
#   PY_VERSION=3.11          the base image's Python (X.Y)
#   ARCH=x86_64              the base image's machine
#   GLIBC_MAX=2.35           newest manylinux accepted (Ubuntu 22.04: 2.35, bookworm: 2.36)
#   TORCH_SPEC=torch==2.13.0 torch for bases without one; "none" skips torch, for
#                            PyTorch base images (their torch is reused by the venv)
#   BASE_TORCH=2.9.1         with TORCH_SPEC=none: the base's torch, resolved against
#
# Re-running is cheap: unchanged inputs skip pip download entirely; the project's
# own wheel is always rebuilt (offline, from the hatchling kept in the wheelhouse).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$(realpath -m "${1:-$ROOT/docker/wheelhouse}")
PY_VERSION=${PY_VERSION:-3.11}
ARCH=${ARCH:-x86_64}
GLIBC_MAX=${GLIBC_MAX:-2.35}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
BASE_TORCH=${BASE_TORCH:-2.9.1}
PY=${PYTHON:-python3}
pip=("$PY" -m pip)
mkdir -p "$DEST"

# The images install from these lists, not from pyproject.toml, so that editing the
# run config there does not invalidate the layer that installs torch.
"$PY" - "$ROOT/pyproject.toml" "$DEST" <<'PY'
import re, sys
try:
    import tomllib
except ImportError:  # Python < 3.11: pip vendors the same parser
    from pip._vendor import tomli as tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
flwr = [d for d in deps if re.match(r"flwr\s*[<>=!~\[;]", d)]
for name, reqs in (("app", deps), ("superlink", flwr)):
    with open(f"{sys.argv[2]}/requirements-{name}.txt", "w") as f:
        f.write("\n".join(reqs) + "\n")
PY

# pip does not widen manylinux_2_X to older glibc tags by itself: list them all.
platforms=()
for ((minor = ${GLIBC_MAX#2.}; minor >= 17; minor--)); do
  platforms+=(--platform "manylinux_2_${minor}_${ARCH}")
done
platforms+=(--platform "manylinux2014_${ARCH}" --platform "manylinux2010_${ARCH}" --platform "manylinux1_${ARCH}")
abi=cp${PY_VERSION/./}
target=(--only-binary=:all: --implementation cp --python-version "$PY_VERSION" --abi "$abi" "${platforms[@]}")

torch=()
if [[ -n $TORCH_SPEC && $TORCH_SPEC != none ]]; then
  torch=("$TORCH_SPEC")
fi

inputs=$(printf '%s\n' "py=$PY_VERSION arch=$ARCH glibc=$GLIBC_MAX torch=${TORCH_SPEC:-none} base_torch=$BASE_TORCH" \
  "$(cat "$DEST/requirements-app.txt")")
if [[ -f $DEST/.inputs && $(cat "$DEST/.inputs") == "$inputs" ]]; then
  echo "wheelhouse: dependencies up to date in $DEST"
else
  new=$DEST/.partial
  rm -rf "$new" && mkdir -p "$new"
  stub=()
  if [[ ${#torch[@]} -eq 0 ]]; then
    # peft and bitsandbytes require torch, so resolving without one would fetch a
    # multi-GB CUDA build. Resolve against a metadata-only stand-in for the base's
    # torch instead (its local version label matches nothing on an index), then drop it.
    "$PY" - "$new/stub" "$BASE_TORCH+base" <<'PY'
import os, sys, zipfile
d, v = sys.argv[1:]
os.makedirs(d)
info = f"torch-{v}.dist-info"
with zipfile.ZipFile(f"{d}/torch-{v}-py3-none-any.whl", "w") as z:
    z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {v}\n")
    z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{info}/RECORD", "")
PY
    stub=(--find-links "$new/stub" "torch==$BASE_TORCH+base")
  fi
  # One resolution for both images keeps their shared packages (flwr, grpcio,
  # protobuf) at one version. Wheels already in DEST are reused via --find-links,
  # and the swap below drops any the new resolution no longer wants.
  # hatchling: builds the project's wheel offline, here and inside the image.
  "${pip[@]}" download -q --progress-bar off -d "$new" --find-links "$DEST" "${target[@]}" \
    -r "$DEST/requirements-app.txt" -r "$DEST/requirements-superlink.txt" hatchling \
    "${torch[@]}" "${stub[@]}"
  rm -rf "$new/stub" "$new"/torch-*+base-*.whl
  find "$DEST" -maxdepth 1 -name '*.whl' ! -name 'flowertune_deploy-*' -delete
  mv "$new"/*.whl "$DEST"/ && rmdir "$new"
  printf '%s\n' "$inputs" >"$DEST/.inputs"
fi

# The project's own wheel, for installs outside Docker (pip install --no-index
# --find-links DEST flowertune-deploy). The image builds its own from the copied
# sources, so /app and the installed package can never differ.
rm -f "$DEST"/flowertune_deploy-*.whl
"${pip[@]}" wheel -q --no-deps --no-index --find-links "$DEST" -w "$DEST" "$ROOT"

echo "wheelhouse: $(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
