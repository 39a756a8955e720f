# Device command: run(command="bash bench/gpu_memory_side_by_side.sh", carry=[".gpu-carry/tokenizer", ".gpu-carry/bnb"], timeout_s=480)
# 4-bit client memory and speed, side by side, each configuration in its own fresh process,
# on one random Gemma2-9B-shaped model built on the GPU and saved once:
#   A ours (app.models.build_model), checkpointing on   B ours, off
#   C FlowerTune template (prepare_model_for_kbit_training), on   D template, off
# Batch 2 x 512, accumulation 4, AdamW, 1 warm-up + 3 timed optimizer steps (bench/qlora_step_check.py).
# Outputs under $OUT: A.json B.json C.json D.json memory_side_by_side.{json,txt} side_by_side.log (7 files).
# CPU dry run of the same script: MODEL_DIR=.gpu-carry/demo/tiny-gemma2 EXTRA="--quantization 0 --seq 32" bash bench/gpu_memory_side_by_side.sh
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}
mkdir -p "$O"
exec > >(tee "$O/side_by_side.log") 2>&1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
PY=${PY:-python3}
SMI=/tmp/smi
mkdir -p "$SMI"

stamp "bitsandbytes (trimmed wheel) -> /tmp/bnb-site"
$PY - <<'PYEOF'
import glob, zipfile
for w in glob.glob(".gpu-carry/bnb/*.whl"):
    zipfile.ZipFile(w).extractall("/tmp/bnb-site")
print("extracted")
PYEOF

MODEL_DIR=${MODEL_DIR:-/var/tmp/gemma2-9b-random}
if [ ! -f "$MODEL_DIR/config.json" ]; then
  stamp "build + save random Gemma2-9B -> $MODEL_DIR"
  $PY bench/make_random_gemma2.py --out "$MODEL_DIR" --tokenizer .gpu-carry/tokenizer --json /tmp/model_build.json || { echo "model build failed"; exit 1; }
fi
du -sh "$MODEL_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv

run_one() {  # key variant checkpointing
  local key=$1 variant=$2 gc=$3 smi_pid=""
  stamp "$key: variant=$variant checkpointing=$gc"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$SMI/smi_$key.csv" 2>/dev/null &
    smi_pid=$!
  fi
  PYTHONPATH=.:/tmp/bnb-site timeout "${PER_RUN_S:-150}" $PY bench/qlora_step_check.py --model "$MODEL_DIR" \
    --variant "$variant" --checkpointing "$gc" --label "$key" --json "$O/$key.json" ${EXTRA:-} \
    2>&1 | grep -vE "FutureWarning|warnings.warn|^Failed to load CPU gemm_4bit"
  echo "exit ${PIPESTATUS[0]}"
  [ -n "$smi_pid" ] && kill "$smi_pid" 2>/dev/null && wait "$smi_pid" 2>/dev/null
  return 0
}

run_one A ours on
run_one B ours off
run_one C template on
run_one D template off

stamp "table"
$PY bench/memory_side_by_side_table.py --dir "$O" --smi-dir "$SMI" --build /tmp/model_build.json
stamp done
