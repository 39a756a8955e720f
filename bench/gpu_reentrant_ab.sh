# Device command: run(command="bash bench/gpu_reentrant_ab.sh", carry=[".gpu-carry/tokenizer", ".gpu-carry/bnb"], timeout_s=330)
# Is use_reentrant the reason our client (checkpointing with use_reentrant=False) trained slower than the
# FlowerTune template's way (reentrant checkpointing, torch's default)? Each run a fresh process on one random
# Gemma2-9B-shaped 4-bit model built on the GPU and saved once, alternating A1 B1 A2 B2:
#   A ours (app.models.build_model) as is: use_reentrant=False
#   B ours, then checkpointing re-enabled with use_reentrant=True on the underlying transformers model (--reentrant)
# Batch 2 x 512, accumulation 4, AdamW, seed 0, 1 warm-up + 6 timed optimizer steps (bench/qlora_step_check.py).
# Outputs under $OUT: A1.json B1.json A2.json B2.json reentrant_ab.{json,txt} reentrant_ab.log (7 files).
# CPU dry run: MODEL_DIR=.gpu-carry/demo/tiny-gemma2 EXTRA="--quantization 0 --seq 32" PY=.venv/bin/python bash bench/gpu_reentrant_ab.sh
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}
mkdir -p "$O"
exec > >(tee "$O/reentrant_ab.log") 2>&1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
PY=${PY:-python3}
SMI=/tmp/smi_ab
mkdir -p "$SMI"
STEPS=${STEPS:-6}

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
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv

run_one() {  # key extra-args...
  local key=$1 smi_pid=""
  shift
  stamp "$key: ours checkpointing on $*"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$SMI/smi_$key.csv" 2>/dev/null &
    smi_pid=$!
  fi
  PYTHONPATH=.:/tmp/bnb-site timeout "${PER_RUN_S:-65}" $PY bench/qlora_step_check.py --model "$MODEL_DIR" \
    --variant ours --checkpointing on --steps "$STEPS" --seed 0 --label "$key" --json "$O/$key.json" "$@" ${EXTRA:-} \
    2>&1 | grep -vE "FutureWarning|warnings.warn|^Failed to load CPU gemm_4bit|^\s+\"Parameter|^\s+\"Params4bit" | grep -E '^\{|^\}|"(label|checkpoint_kwargs|use_reentrant|peak_|process_used|tokens_per_second|train_seconds|warmup_step_seconds|load_quantize_seconds|tensors_with|grad_norm)"|Error|error|Traceback' 
  echo "exit ${PIPESTATUS[0]}"
  [ -n "$smi_pid" ] && kill "$smi_pid" 2>/dev/null && wait "$smi_pid" 2>/dev/null
  return 0
}

run_one A1
run_one B1 --reentrant
run_one A2
run_one B2 --reentrant

stamp "table"
$PY bench/reentrant_ab_table.py --dir "$O" --smi-dir "$SMI"
stamp done
