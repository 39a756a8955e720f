#!/usr/bin/env bash
# Issue 13, the CUDA image: build the app and superlink images with docker/Dockerfile on a
# CUDA torch base, as `docker build` does on a GPU host, minus the registry, and run the CPU
# end-to-end (`deploy run`: the tiny demo, a SuperLink, a warm trainer and 20 SuperNodes as
# processes) inside the app image, so the pinned dependency set is proven to resolve and run
# next to torch 2.9.1+cu128. No GPU is needed or used.
#   bash bench/cuda_image/cuda_image.sh   (as root, with the Docker engine; 17-30 min and ~13 GB of
#                               disk on the shared 2-core machine, ~4 GB downloaded)
# The base, pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime, lives on Docker Hub, which this
# machine cannot reach; tests/docker/make_cuda_base.sh stands in for it (PyPI's CUDA 12.8
# torch 2.9.1 wheel on the debootstrap bookworm base). Then, from a copy of the repository
# without docker/wheelhouse/ (what a fresh clone builds; the checkout's own wheelhouse,
# which other builds use, is left alone), each build without layer cache ("cold"; pip's cache is off in the images):
#   1. superlink, dependencies from the package index;
#   2. app, dependencies from the package index (the classic builder builds every stage up
#      to --target, so this includes the superlink stages again);
#   3. the end-to-end in that app image, with --network none (the demo is offline);
#   4. TORCH_SPEC=none docker/wheelhouse.sh into the copy, the app built offline from it,
#      and the end-to-end again in that image.
# Writes bench/cuda_image/RESULTS.md, run.log (this console: build steps, the
# rounds, no pip progress) and e2e_summary*.md (the ServerApp's summary of each end-to-end).
# Environment:
#   FRESH_BASE=1   rebuild the CUDA base too (its time goes into RESULTS.md); 0 reuses it
#   WHEELHOUSE=1   step 4; 0 skips it
#   KEEP_IMAGES=0  1 keeps the app/superlink images it tagged (the base is always kept:
#                  `docker rmi flowertune-cuda-base:torch2.9.1-cu128` frees its 7 GB)
# Tags are its own (…:0.1.0-cuda*): flowertune-deploy/app:0.1.0 and superlink:0.1.0, which
# the Docker tests build and use, are never touched.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
R=$ROOT/bench/cuda_image
BASE=${BASE:-flowertune-base:bookworm}
CUDA_BASE=${CUDA_BASE:-flowertune-cuda-base:torch2.9.1-cu128}
APP=flowertune-deploy/app:0.1.0-cuda
SL=flowertune-deploy/superlink:0.1.0-cuda
APP_WH=flowertune-deploy/app:0.1.0-cuda-wheelhouse
FRESH_BASE=${FRESH_BASE:-1}
WHEELHOUSE=${WHEELHOUSE:-1}
KEEP_IMAGES=${KEEP_IMAGES:-0}

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
mkdir -p "$R"
W=$(mktemp -d /tmp/flowertune-cuda.XXXXXX)
sampler=
cleanup() {
  [ -z "$sampler" ] || kill "$sampler" 2>/dev/null || true
  rm -rf "$W"
  [ "$KEEP_IMAGES" = 1 ] && return
  docker rmi "$APP" "$SL" "$APP_WH" >/dev/null 2>&1 || true
  # The classic builder keeps every stage's image untagged; ours carry the base's label.
  # A stage image whose child stage still exists is refused, hence the rounds.
  local stages round
  for round in 1 2 3 4 5; do
    stages=$(docker images -q --filter dangling=true --filter "label=flowertune-deploy.cuda-standin")
    [ -z "$stages" ] && break
    docker rmi $stages >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT
exec > >(tee "$R/run.log") 2>&1
T0=$SECONDS
declare -A secs rc status from to
# The machine is shared (other people's tests run deployments on the same 2 cores): the
# 1-minute load average, every 10 s, says how contended each timed step was.
(while sleep 10; do echo "$(date +%s) $(cut -d' ' -f1 /proc/loadavg)"; done) >"$W/load.txt" &
sampler=$!
stamp() { echo "=== [$((SECONDS - T0)) s, load $(cut -d' ' -f1 /proc/loadavg)] $*"; }
begin() { from[$1]=$(date +%s); }
finish() { to[$1]=$(date +%s); secs[$1]=$((to[$1] - from[$1])); }
load() {  # STEP: median / max of the 1-minute load average sampled while it ran
  awk -v a="${from[$1]}" -v b="${to[$1]}" '$1 >= a && $1 <= b {print $2}' "$W/load.txt" | sort -n |
    awk '{v[NR] = $1} END {if (NR) printf "%.1f / %.1f", v[int((NR + 1) / 2)], v[NR]; else print "n/a"}'
}
# Full build output goes to $W; the console keeps what says where the time went.
build() {  # NAME docker-build-args...
  local name=$1; shift
  begin "$name"
  stamp "docker build $*"
  if ! docker build "$@" >"$W/$name.log" 2>&1; then
    tail -n 40 "$W/$name.log"; echo "build $name failed"; exit 1
  fi
  grep -E '^Step [0-9]+/[0-9]+ : (FROM|RUN)|^no docker/wheelhouse|^Successfully tagged' "$W/$name.log" || true
  finish "$name"
  stamp "$name built in ${secs[$name]} s"
}
size() {
  local b
  b=$(docker image inspect -f '{{.Size}}' "$1" 2>/dev/null) || { echo "not present"; return; }
  awk -v b="$b" 'BEGIN {printf "%.2f GB (%.0f bytes)", b / 1e9, b}'
}
biggest() {  # IMAGE: its five biggest layers as table rows
  docker history --no-trunc --human=false --format '{{.Size}}	{{.CreatedBy}}' "$1" | sort -rn | head -n 5 |
    while IFS=$'\t' read -r bytes cmd; do
      cmd=$(echo "$cmd" | sed -E 's@/bin/sh -c (#\(nop\) *)?@@; s/[|`]/ /g; s/ +/ /g' | cut -c1-110)
      [ -n "$cmd" ] || cmd="(no command: the debootstrap root filesystem, docker import)"
      awk -v b="$bytes" -v c="$cmd" 'BEGIN {printf "| %s | `%s` |\n", (b >= 1e9 ? sprintf("%.2f GB", b / 1e9) : sprintf("%.1f MB", b / 1e6)), c}'
    done
}
# The pinned dependencies as they resolved in IMAGE, where torch comes from, and whether
# transformers has the non-deprecated checkpointing call.
versions() {  # IMAGE OUT
  docker run --rm --network none "$1" sh -c '
    pip freeze 2>/dev/null | grep -i -E "^(torch|transformers|peft|bitsandbytes|trl|flwr|flwr-datasets|accelerate|numpy|datasets)==" | sort -f
    pip show trl >/dev/null 2>&1 || echo "trl: not installed (not a dependency of the project)"
    python - <<PY
import bitsandbytes, peft, torch, transformers
print("torch", torch.__version__, "| torch.version.cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version(),
      "| GPU visible", torch.cuda.is_available(), "| from", torch.__file__.rsplit("/torch/", 1)[0])
print("PreTrainedModel.activation_checkpointing_enable in transformers", transformers.__version__ + ":",
      hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable"))
PY
    echo "torch or nvidia-* inside /opt/venv (should be none): $(ls /opt/venv/lib/python3.11/site-packages | grep -i -E "^(torch|nvidia)" | tr "\n" " ")"
  ' | tee "$2"
}
e2e() {  # IMAGE NAME SUMMARY: deploy run in a copy of /app (root-owned in the image), as uid 1000
  local code=0
  begin "$2"
  stamp "end-to-end in $1"
  docker run --rm --network none "$1" sh -c '
    cp -r /app /tmp/app && cd /tmp/app && deploy --app /tmp/app run; rc=$?
    echo "=== summary.md"; cat /tmp/app/results/*/summary.md 2>/dev/null; exit $rc' >"$W/$2.log" 2>&1 || code=$?
  # Flower colours its log lines; the round lines are kept without the colour and prefix.
  sed -n '/^=== summary.md/q;p' "$W/$2.log" | sed -E 's/\x1b\[[0-9;]*m//g; s/^INFO *: *//' |
    grep -E '^(No GPU|SuperLink and|Run [0-9]+|round [0-9]+/|Results:)|[Ee]rror|Traceback' | cut -c1-240 || true
  sed -n '/^=== summary.md/,$p' "$W/$2.log" | tail -n +2 >"$R/$3"
  finish "$2"
  rc[$2]=$code
  status[$2]=$(grep -o -E 'Run [0-9]+: [a-z:]+' "$W/$2.log" | tail -n 1 || true)
  stamp "end-to-end exited $code in ${secs[$2]} s"
}

stamp "machine: $(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, no GPU; $(docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'); disk free $(df -h / | awk 'NR==2 {print $4}')"

# --- the CUDA base --------------------------------------------------------------------
base_how="reused (built earlier; FRESH_BASE=1 times it)"
if [ "$FRESH_BASE" = 1 ] && docker image inspect "$CUDA_BASE" >/dev/null 2>&1; then
  docker rmi "$CUDA_BASE" >/dev/null
fi
docker image inspect "$CUDA_BASE" >/dev/null 2>&1 || base_how=built
begin base
stamp "CUDA base ($base_how): bash tests/docker/make_cuda_base.sh $CUDA_BASE"
bash tests/docker/make_cuda_base.sh "$CUDA_BASE" >"$W/base.log" 2>&1 || { tail -n 40 "$W/base.log"; exit 1; }
# The build's own check line comes after the colour codes of torch's numpy warning.
grep -E '^(Step|built )|torch [0-9.]+\+cu[0-9]+ cuda' "$W/base.log" | sed -E 's/\x1b\[[0-9;]*m//g' || true
finish base
stamp "CUDA base ready in ${secs[base]} s"

# --- the images, from the package index (a fresh clone has no wheelhouse) ---------------
clone=$W/clone
mkdir -p "$clone"
tar -C "$ROOT" --exclude=docker/wheelhouse --exclude=__pycache__ -cf - \
  pyproject.toml README.md .dockerignore app deploy docker | tar -C "$clone" -xf -
common=(--no-cache --network host -f "$clone/docker/Dockerfile" --build-arg "BASE_IMAGE=$CUDA_BASE")
build superlink "${common[@]}" --target superlink -t "$SL" "$clone"
build app "${common[@]}" --target app -t "$APP" "$clone"
grep -q "installing the app image's dependencies from the package index" "$W/app.log"
docker run --rm --network none "$SL" flower-superlink --version | tee "$W/superlink-version.txt"
versions "$APP" "$W/versions-index.txt"
e2e "$APP" e2e_index e2e_summary.md

# --- the air-gapped path: a wheelhouse made for a PyTorch base ---------------------------
if [ "$WHEELHOUSE" = 1 ]; then
  begin wheelhouse
  stamp "TORCH_SPEC=none docker/wheelhouse.sh (in the copy)"
  # PIP_NO_CACHE_DIR: a cold fill, not one from the host pip cache that earlier runs warmed.
  TORCH_SPEC=none PIP_NO_CACHE_DIR=1 bash "$clone/docker/wheelhouse.sh" >"$W/wheelhouse.log" 2>&1 || { tail -n 40 "$W/wheelhouse.log"; exit 1; }
  tail -n 1 "$W/wheelhouse.log"
  finish wheelhouse
  wheelhouse_summary=$(tail -n 1 "$W/wheelhouse.log" | sed -E 's/^wheelhouse: //; s/ in .*//')
  # --network none: an offline build proves the wheelhouse is complete next to the base's torch.
  build app_wh --no-cache --network none -f "$clone/docker/Dockerfile" --build-arg "BASE_IMAGE=$CUDA_BASE" \
    --target app -t "$APP_WH" "$clone"
  versions "$APP_WH" "$W/versions-wheelhouse.txt"
  e2e "$APP_WH" e2e_wh e2e_summary_wheelhouse.md
fi

# --- every transformers release pyproject.toml allows: which have the new call? ---------
# The app still calls the deprecated gradient_checkpointing_enable; switching is safe only
# if every allowed release has activation_checkpointing_enable.
spec=$(python3 -c 'import tomllib; d=tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"]; print(next(x for x in d if x.startswith("transformers"))[len("transformers"):])')
stamp "transformers$spec, every release: activation_checkpointing_enable?"
docker run --rm -i --network host -e SPEC="$spec" "$APP" python - <<'PY' | tee "$W/ckpt-scan.txt" || echo "scan failed" | tee "$W/ckpt-scan.txt"
import glob, os, re, subprocess, zipfile
from packaging.specifiers import SpecifierSet
from packaging.version import Version

spec = SpecifierSet(os.environ["SPEC"])
listed = subprocess.run(["pip", "index", "versions", "transformers"], capture_output=True, text=True, check=True).stdout
versions = sorted((v for v in re.search(r"Available versions: (.*)", listed).group(1).split(", ") if v in spec), key=Version)
for v in versions:
    subprocess.run(["pip", "download", "-q", "--no-deps", "-d", "/tmp/t", f"transformers=={v}"], check=True, capture_output=True)
    wheel = glob.glob(f"/tmp/t/transformers-{v}-*.whl")[0]
    has = "def activation_checkpointing_enable(" in zipfile.ZipFile(wheel).read("transformers/modeling_utils.py").decode()
    print(f"{v}: {'yes' if has else 'no'}", flush=True)
    os.remove(wheel)
PY
ckpt_scan=$(paste -sd ';' "$W/ckpt-scan.txt" | sed 's/;/, /g')

# --- RESULTS.md ---------------------------------------------------------------------------
when=$(date -u +%Y-%m-%d)
runtime() { grep -o -m1 -E 'time: [0-9.]+ s' "$R/$1" | cut -d' ' -f2- || echo "n/a"; }
{
cat <<EOF
# The CUDA image, proven without a GPU or a registry (issue 13)

Measured $when at commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) on the 2-core CPU development machine ($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs),
$(free -g | awk '/Mem:/ {print $2}') GiB RAM, **no GPU**), Docker $(docker version --format '{{.Server.Version}}') (classic builder), by

    bash bench/cuda_image/cuda_image.sh      # FRESH_BASE=$FRESH_BASE WHEELHOUSE=$WHEELHOUSE

The Dockerfile's default base, \`pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime\`, is on Docker
Hub, which this machine cannot reach. \`tests/docker/make_cuda_base.sh\` stands in for it:
PyPI's Linux x86_64 \`torch==2.9.1\` wheel (the CUDA 12.8 build, with its nvidia-* CUDA,
cuDNN 9 and NCCL wheels and triton) in the system Python 3.11 of the debootstrap bookworm
base. The app venv reuses it through \`--system-site-packages\`, as it reuses the official
image's. What differs from a GPU host: Debian's Python instead of the image's conda Python,
no conda extras, and the base carries this machine's TLS-proxy CA as \`PIP_CERT\` so pip
inside the builds reaches PyPI. The images were built with \`docker/Dockerfile\` unchanged,
from a copy of the repository without \`docker/wheelhouse/\` (a fresh clone), exactly as
docker/README.md's GPU commands with \`--build-arg BASE_IMAGE=$CUDA_BASE\`.

The machine is shared: other people's tests and deployments ran on the same 2 cores during
this run. The "load" columns give the 1-minute load average sampled every 10 s while each
step ran (median / max; 2 means both cores busy), so the times below are wall clock under
that load, not on an idle machine.

## Build times (wall clock, measured)

"Cold": \`docker build --no-cache\` (no layer cache; pip's own cache is off in the images),
so every dependency is downloaded from PyPI (through this machine's proxy) and installed.

| step | command | seconds | load |
| --- | --- | --- | --- |
| CUDA base ($base_how; 4.1 GB of wheels from PyPI) | \`bash tests/docker/make_cuda_base.sh\` | ${secs[base]} | $(load base) |
| superlink, cold, from the index | \`docker build --no-cache --network host --target superlink --build-arg BASE_IMAGE=$CUDA_BASE\` | ${secs[superlink]} | $(load superlink) |
| app, cold, from the index (the classic builder builds the superlink stages again first) | \`docker build --no-cache --network host --target app --build-arg BASE_IMAGE=$CUDA_BASE\` | ${secs[app]} | $(load app) |
EOF
if [ "$WHEELHOUSE" = 1 ]; then cat <<EOF
| wheelhouse for a PyTorch base ($wheelhouse_summary; host pip without its cache) | \`TORCH_SPEC=none docker/wheelhouse.sh\` | ${secs[wheelhouse]} | $(load wheelhouse) |
| app, cold, offline from that wheelhouse | \`docker build --no-cache --network none --target app ...\` | ${secs[app_wh]} | $(load app_wh) |
EOF
fi
cat <<EOF

## Sizes (\`docker image inspect\` Size, uncompressed, measured)

| image | size |
| --- | --- |
| \`$BASE\` (debootstrap, no torch) | $(size "$BASE") |
| \`$CUDA_BASE\` (+ torch 2.9.1+cu128) | $(size "$CUDA_BASE") |
| \`$SL\` (on the CUDA base, see below) | $(size "$SL") |
| \`$APP\` (from the index) | $(size "$APP") |
EOF
[ "$WHEELHOUSE" = 1 ] && echo "| \`$APP_WH\` (from the wheelhouse) | $(size "$APP_WH") |"
cat <<EOF
| for comparison: \`flowertune-deploy/app:0.1.0\` (CPU, torch 2.13.0+cpu, the Docker tests' image, as found on the machine) | $(size flowertune-deploy/app:0.1.0) |

The five biggest layers of \`$APP\` (\`docker history\`):

| size | layer |
| --- | --- |
$(biggest "$APP")

The CUDA libraries are the base's one torch layer; the app adds only its venv (the
dependencies without torch) and the project, as on the CPU base. The SuperLink built on
the CUDA base carries a torch it never imports: it is built here only to show its stages
build there; docker/README.md builds it \`FROM python:3.11-slim-bookworm\` on GPU hosts.

## Resolved versions in the app image (measured)

From the index:

\`\`\`
$(cat "$W/versions-index.txt")
\`\`\`
EOF
if [ "$WHEELHOUSE" = 1 ]; then cat <<EOF

From the wheelhouse (\`TORCH_SPEC=none\`, resolved by the host's pip against a metadata-only
torch 2.9.1 stand-in):

\`\`\`
$(cat "$W/versions-wheelhouse.txt")
\`\`\`
EOF
fi
cat <<EOF

\`PreTrainedModel.activation_checkpointing_enable\` in every transformers release that
\`pyproject.toml\` allows (\`transformers$spec\`), each wheel downloaded from PyPI and its
\`modeling_utils.py\` searched for the definition: $ckpt_scan.

SuperLink image: \`$(cat "$W/superlink-version.txt")\`.

## End-to-end in the CUDA app image (measured)

    docker run --rm --network none $APP sh -c 'cp -r /app /tmp/app && cd /tmp/app && deploy --app /tmp/app run'

No GPU is visible, so \`deploy run\` runs the tiny embedded demo on the CPU: a SuperLink, a
warm trainer and 20 SuperNodes as processes inside the one container, 10 rounds of FedAvg,
offline (\`--network none\`).

| image | exit code | final status | container start to exit | the run itself (its summary.md) | load |
| --- | --- | --- | --- | --- | --- |
| \`$APP\` (index) | ${rc[e2e_index]} | \`${status[e2e_index]:-none printed}\` | ${secs[e2e_index]} s | $(runtime e2e_summary.md) | $(load e2e_index) |
EOF
[ "$WHEELHOUSE" = 1 ] && echo "| \`$APP_WH\` (wheelhouse) | ${rc[e2e_wh]} | \`${status[e2e_wh]:-none printed}\` | ${secs[e2e_wh]} s | $(runtime e2e_summary_wheelhouse.md) | $(load e2e_wh) |"
cat <<EOF

The ServerApp's \`summary.md\` of each run: \`e2e_summary.md\`$([ "$WHEELHOUSE" = 1 ] && echo ", \`e2e_summary_wheelhouse.md\`"); the
console of the whole run (build steps, the round lines, no pip output): \`run.log\`.
EOF
} >"$R/RESULTS.md"
stamp "wrote $R/RESULTS.md"
[ "${rc[e2e_index]}" = 0 ] && { [ "$WHEELHOUSE" != 1 ] || [ "${rc[e2e_wh]}" = 0 ]; }
