#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's default GPU base,
# pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime (Python 3.11, torch 2.9.1+cu128): Docker Hub
# is unreachable here, so we put PyPI's torch 2.9.1 wheel for Linux x86_64 (the CUDA 12.8
# build, which pulls its nvidia-* CUDA/cuDNN/NCCL wheels and triton) into the system
# Python 3.11 of the debootstrap base from make_base_image.sh. That is the part of the
# official image the app uses: a CUDA torch that the app venv reuses through
# --system-site-packages. No GPU is needed to build it, or to run it on the CPU.
# Usage: make_cuda_base.sh [TAG]   (default flowertune-cuda-base:torch2.9.1-cu128)
# Environment:
#   BASE=flowertune-base:bookworm    the debootstrap base (made here when missing)
#   TORCH_SPEC=torch==2.9.1          the torch the official tag ships
#   EXPECT_CUDA=12.8                 torch.version.cuda the build must report
#   HOST_CA=/etc/ssl/certs/ca-certificates.crt
#                                    CA bundle pip inside the image trusts; this machine
#                                    reaches PyPI through a TLS proxy with its own CA.
#                                    HOST_CA= leaves it out (pip then uses certifi's).
set -euo pipefail

TAG=${1:-flowertune-cuda-base:torch2.9.1-cu128}
BASE=${BASE:-flowertune-base:bookworm}
TORCH_SPEC=${TORCH_SPEC:-torch==2.9.1}
EXPECT_CUDA=${EXPECT_CUDA:-12.8}
HOST_CA=${HOST_CA-/etc/ssl/certs/ca-certificates.crt}
HERE=$(cd "$(dirname "$0")" && pwd)

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }

if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG already exists"
  docker image ls "$TAG" --format '{{.Repository}}:{{.Tag}} {{.Size}}'
  exit 0
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  bash "$HERE/make_base_image.sh" "$BASE"
fi

SECONDS=0
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
ca_lines=""
if [ -n "$HOST_CA" ]; then
  cp "$HOST_CA" "$ctx/host-ca.crt"
  # PIP_CERT stays set so the app build's pip (docker/install_deps.sh) trusts it too,
  # as the index-path test's base does; the official image needs no such line.
  ca_lines="COPY host-ca.crt /usr/local/share/host-ca.crt
ENV PIP_CERT=/usr/local/share/host-ca.crt"
fi
# PIP_CONFIG_FILE=/dev/null: nothing of a pip config (the host's /etc/xdg/pip caps torch
# and adds local indexes) may steer what this image resolves; the build context carries
# none anyway, this only makes it explicit. --break-system-packages: bookworm marks its
# Python externally managed (PEP 668); this image is a throwaway stand-in, not a Debian
# system to keep consistent. The check fails the build if pip picked a CPU-only torch.
cat >"$ctx/Dockerfile" <<EOF
FROM $BASE
$ca_lines
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN PIP_CONFIG_FILE=/dev/null python3 -m pip install --break-system-packages --root-user-action=ignore \\
      --progress-bar off '$TORCH_SPEC' \\
 && python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu visible', torch.cuda.is_available()); sys.exit(torch.version.cuda != '$EXPECT_CUDA')"
# flowertune-deploy.cuda-standin: every image built FROM this one inherits it, so
# bench/cuda_image/cuda_image.sh can find (and remove) the untagged stage images of its builds.
LABEL flowertune-deploy.cuda-standin="$TORCH_SPEC" \\
      org.opencontainers.image.title="flowertune CUDA torch base (local stand-in)" \\
      org.opencontainers.image.description="$BASE + PyPI $TORCH_SPEC (CUDA $EXPECT_CUDA), standing in for pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime"
EOF
# --network host: the classic builder's default bridge has no NAT here (dockerd runs
# with --iptables=false), so only the host's network reaches PyPI.
docker build --network host -t "$TAG" "$ctx"
echo "built $TAG in ${SECONDS}s"
docker image ls "$TAG" --format '{{.Repository}}:{{.Tag}} {{.Size}}'
