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
