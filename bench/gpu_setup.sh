#!/usr/bin/env bash
# Device helper, called by bench/gpu_common.sh's gemma2_host: bash bench/gpu_setup.sh /var/tmp/ftvenv
#
# A venv on the GPU machine that sees the image's torch / transformers / peft / accelerate
# (a .pth file adds the image's site-packages AFTER the venv's own, via site.addsitedir) and holds what the
# image lacks: flwr 1.42, flwr-datasets, datasets, bitsandbytes, ... from the carried
# .gpu-carry/pack/wheels.tar.xz (bench/pack_wheels.py makes it). The venv's bin/ then has
# python next to flwr, flower-superlink, flower-supernode, flower-superexec, flwr-clientapp
# and flwr-serverapp, as deploy/backends/process.py expects. Reused if already complete
# (a warm machine keeps /var/tmp). Where a call carries .gpu-carry/ray (`pack_wheels.py --ray`),
# Ray joins the venv too, for Flower's Simulation Engine.
set -eu
VENV=${1:-/var/tmp/ftvenv}
PACK=${PACK:-.gpu-carry/pack}
RAY=${RAY:-.gpu-carry/ray}
PIPWHL=$(ls "$PACK"/pip-*.whl | head -1)
check='import flwr, flwr_datasets, datasets, bitsandbytes, pyarrow, docker, yaml, tomli_w, cryptography'
add_ray() {
  if [ -f "$RAY/wheels.tar.xz" ] && ! "$VENV/bin/python" -c 'import ray' 2>/dev/null; then
    rm -rf /tmp/ftray && mkdir -p /tmp/ftray && tar -xJf "$RAY/wheels.tar.xz" -C /tmp/ftray
    "$VENV/bin/python" "$PIPWHL/pip" install --no-index --no-deps --no-compile \
      --disable-pip-version-check -q /tmp/ftray/wheels/*.whl
    "$VENV/bin/python" -c 'import ray; print("gpu_setup: ray", ray.__version__)'
  fi
}
if [ -x "$VENV/bin/flower-superlink" ] && "$VENV/bin/python" -c "$check" 2>/dev/null; then
  add_ray
  echo "gpu_setup: $VENV already complete"
  exit 0
fi
t0=$(date +%s)
OUTER=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$VENV" /tmp/ftwheels
mkdir -p /tmp/ftwheels
tar -xJf "$PACK/wheels.tar.xz" -C /tmp/ftwheels
python3 -m venv --without-pip "$VENV"
PURE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a bare path line) so the image's own .pth files are honoured too.
echo "import site; site.addsitedir('$OUTER')" > "$PURE/zz_device_image.pth"
"$VENV/bin/python" "$PIPWHL/pip" install --no-index --no-deps --no-compile --ignore-installed --disable-pip-version-check -q /tmp/ftwheels/wheels/*.whl
"$VENV/bin/python" - <<'PY'
import importlib, sys
print(sys.version)
for m in ("flwr", "flwr_datasets", "datasets", "bitsandbytes", "pyarrow", "pandas", "torch", "transformers", "peft", "accelerate"):
    mod = importlib.import_module(m)
    print(f"  {m:14s} {getattr(mod, '__version__', '?'):12s} {mod.__file__}")
PY
add_ray
ls "$VENV/bin" | tr '\n' ' '; echo
echo "gpu_setup: done in $(( $(date +%s) - t0 )) s"
