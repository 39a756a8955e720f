#!/usr/bin/env bash
# The GPU machine's stand-in for docker/Dockerfile's default base (pytorch/pytorch, which
# no registry can bring there): an image made from the machine's own Python 3.12 and its
# CUDA torch venv, so the app image is built with the unchanged Dockerfile on
# `--build-arg BASE_IMAGE=<this tag>` and reuses that torch through --system-site-packages.
#   bash bench/docker_gpu/make_base.sh [TAG]        (root, engine up: start_engine.sh)
# What goes in, streamed by tar into `docker import` (nothing is copied on disk):
#   /usr (but not /usr/local: CUDA toolkit, profilers) and /etc, the merged-/usr links;
#   the torch venv that `python3` belongs to, without packages the app never imports (JAX,
#   CuPy, ONNX, ...);
#   a .pth that puts that venv's site-packages on the system Python's path, as the PyTorch
#   image's conda Python has torch on its own;
#   pip's wheel where Debian/Ubuntu's ensurepip looks (python3-venv's job), if it lacks one.
# What stays out: the NVIDIA driver's libraries and tools (libcuda, libnvidia-*, nvidia-smi).
# They must match the host's kernel module, so they come from the CDI spec at run time, bound
# at /usr/local/nvidia/lib64, which LD_LIBRARY_PATH names here as in the PyTorch image.
# Differences from pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime: Ubuntu 24.04 and Python
# 3.12 instead of 22.04 and conda's 3.11; torch 2.11.0+cu130 with its nvidia-* wheels instead
# of 2.9.1+cu128; transformers, peft, accelerate already present in the base (the app venv
# takes them as they are where they satisfy pyproject.toml, as it takes torch).
set -euo pipefail
TAG=${1:-flowertune-gpu-base:host}
PIP_WHEEL=${PIP_WHEEL:-$(ls .gpu-carry/engine/pip-*.whl 2>/dev/null | head -1)}
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
venv=$(python3 -c 'import sys; print(sys.prefix)')
base_py=$(readlink -f "$(python3 -c 'import sys; print(sys._base_executable)')")
ver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
echo "base: python3 is $base_py ($ver), torch venv $venv, site-packages $site"
[ "${venv#/usr}" = "$venv" ] || { echo "the torch environment lives under /usr; nothing to add" >&2; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/usr/lib/python3/dist-packages" "$stage/usr/share/python-wheels" "$stage/tmp" "$stage/var/tmp" \
  "$stage/proc" "$stage/sys" "$stage/dev" "$stage/run" "$stage/home" "$stage/root"
chmod 1777 "$stage/tmp" "$stage/var/tmp"
echo "import site; site.addsitedir('$site')" >"$stage/usr/lib/python3/dist-packages/zz_host_torch.pth"
if ! python3 - <<'PY' 2>/dev/null
import glob, sys
sys.exit(0 if glob.glob("/usr/share/python-wheels/pip-*.whl") else 1)
PY
then
  [ -n "$PIP_WHEEL" ] && cp "$PIP_WHEEL" "$stage/usr/share/python-wheels/"
fi
for l in bin lib lib64 sbin; do [ -L "/$l" ] && ln -s "usr/$l" "$stage/$l"; done
skip=(--exclude=usr/local --exclude=usr/share/doc --exclude=usr/share/man --exclude='libcuda.so*' --exclude='libnvidia-*'
  --exclude='libcudadebugger*' --exclude=usr/bin/nvidia-smi --exclude=etc/cdi --exclude=etc/docker)
for p in jax jaxlib 'jax_*' 'jax-*' cupy 'cupy_*' 'cupy-*' onnx 'onnx*' torch_geometric botorch gpytorch numpyro \
  sentence_transformers pytorch_lightning lightning 'lightning_*' torchvision torchaudio; do
  skip+=(--exclude="${site#/}/$p")
done
t0=$SECONDS
# Exit 1 is tar's "a file changed as it was read" (logs, caches): not a reason to stop.
{ tar -C / --numeric-owner --warning=no-file-changed --ignore-failed-read "${skip[@]}" -cf - usr etc "${venv#/}" ||
  [ $? -eq 1 ]; } | docker import - "$TAG-host" >/dev/null
# The staged files as a second layer (one tar may not hold a folder twice).
cid=$(docker create "$TAG-host" true)
docker cp "$stage/." "$cid:/"
docker commit --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64' "$cid" "$TAG" >/dev/null
docker rm "$cid" >/dev/null
echo "base: $TAG imported in $((SECONDS - t0)) s, $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.1f GB", $1/1e9}')"
docker run --rm --network none "$TAG" sh -c '
  python3 -c "import torch, transformers, peft; print(\"base: torch\", torch.__version__, \"transformers\", transformers.__version__, \"peft\", peft.__version__)"
  python3 -m venv --system-site-packages /tmp/v && /tmp/v/bin/python -m pip --version | sed "s/^/base: venv pip /"
  for t in useradd groupadd userdel groupdel getent; do command -v $t >/dev/null || echo "base: missing $t"; done'
