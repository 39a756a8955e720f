# Sourced by the bench/gpu_*.sh device scripts: offline, unbuffered, everything logged
# under $OUT (what the device tool brings back), and a clock for the log.
#   . bench/gpu_common.sh LOGNAME
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}
mkdir -p "$O"
exec > >(tee "$O/$1") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stamp() { echo "=== [$(elapsed) s] $*"; }
# The 9B-shaped benchmarks' host: the venv (bench/gpu_setup.sh), the random Gemma2-9B
# (bench/make_random_gemma2.py, kept while the machine stays warm) and the names they use.
#   gemma2_host BUILD_JSON
gemma2_host() {
  export NCCL_NVLS_ENABLE=0
  VENV=${VENV:-/var/tmp/ftvenv}
  MODEL=${MODEL:-/var/tmp/gemma2-9b-random}
  DATA=$PWD/.gpu-carry/smoke-alpaca.json
  PY="env PYTHONPATH=$PWD $VENV/bin/python"
  stamp "setup"
  bash bench/gpu_setup.sh "$VENV" || exit 1
  [ -f "$MODEL/model.safetensors" ] || python3 bench/make_random_gemma2.py --out "$MODEL" --tokenizer .gpu-carry/tokenizer --json "$1" || exit 1
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
}
