# Device command: run(command="bash bench/memory/ours_vs_template.sh", carry=[".gpu-carry/tokenizer", ".gpu-carry/bnb"], timeout_s=330, kind="nvidia-h100-x1")
# Ours against the FlowerTune template's loading, after build_model switched to use_reentrant=True.
# Each run a fresh process on one random Gemma2-9B-shaped 4-bit model built on the GPU and saved once:
#   A ours (app.models.build_model), checkpointing on     B ours, off
#   C template (prepare_model_for_kbit_training), on       D template, off
# Order A1 C1 A2 C2 (REPEAT pairs), then B1 D1 if the time left allows (OFF=0 skips them).
# Batch 2 x 512, accumulation 4, AdamW, seed 0, 1 warm-up + STEPS (6) timed optimizer steps (bench/qlora_step_check.py).
# Per-run JSONs and nvidia-smi samples stay in /tmp/ovt; everything is embedded in the outputs under $OUT:
#   ours_vs_template.{json,txt} ours_vs_template.log (3 files).
# An optional run starts only while elapsed + the longest run so far + 10 s stays under DEADLINE_S (315).
# CPU dry run: MODEL_DIR=.gpu-carry/demo/tiny-gemma2 EXTRA="--quantization 0 --seq 32" PY=.venv/bin/python bash bench/memory/ours_vs_template.sh
. bench/gpu_common.sh ours_vs_template.log
PY=${PY:-python3}
RUNS=${RUNS_DIR:-/tmp/ovt}
rm -rf "$RUNS"
mkdir -p "$RUNS/smi"
STEPS=${STEPS:-6}
REPEAT=${REPEAT:-2}
OFF=${OFF:-1}
DEADLINE_S=${DEADLINE_S:-315}
ORDER=""
LONGEST=0
NOTES=()

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

run_one() {  # key variant checkpointing
  local key=$1 variant=$2 gc=$3 smi_pid="" t1 dt
  stamp "$key: variant=$variant checkpointing=$gc"
  ORDER="$ORDER $key"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$RUNS/smi/smi_$key.csv" 2>/dev/null &
    smi_pid=$!
  fi
  t1=$(date +%s)
  PYTHONPATH=.:/tmp/bnb-site timeout "${PER_RUN_S:-75}" $PY bench/qlora_step_check.py --model "$MODEL_DIR" \
    --variant "$variant" --checkpointing "$gc" --steps "$STEPS" --seed 0 --label "$key" --json "$RUNS/$key.json" ${EXTRA:-} \
    2>&1 | grep -vE "FutureWarning|warnings.warn|^Failed to load CPU gemm_4bit|^\s+\"Parameter|^\s+\"Params4bit" | grep -E '^\{|^\}|"(label|checkpoint_kwargs|use_reentrant|gib_after_load|peak_|process_used|tokens_per_second|train_seconds|warmup_step_seconds|load_quantize_seconds|tensors_with|grad_norm)"|Error|error|Traceback'
  echo "exit ${PIPESTATUS[0]}"
  dt=$(( $(date +%s) - t1 ))
  echo "$key $dt" >> "$RUNS/wall.txt"
  [ "$dt" -gt "$LONGEST" ] && LONGEST=$dt
  [ -n "$smi_pid" ] && kill "$smi_pid" 2>/dev/null && wait "$smi_pid" 2>/dev/null
  return 0
}

fits() {  # is there time for one more run?
  [ $(( $(elapsed) + LONGEST + 10 )) -le "$DEADLINE_S" ]
}

for i in $(seq 1 "$REPEAT"); do
  run_one "A$i" ours on
  run_one "C$i" template on
done
if [ "$OFF" = 1 ]; then
  for pair in "B1 ours" "D1 template"; do
    set -- $pair
    if fits; then
      run_one "$1" "$2" off
    else
      stamp "skip $1: elapsed $(elapsed) s + longest run $LONGEST s + 10 > deadline $DEADLINE_S s"
      NOTES+=("$1 not run: elapsed $(elapsed) s + longest run $LONGEST s + 10 s > deadline $DEADLINE_S s")
    fi
  done
fi

stamp "table"
NOTE_ARGS=()
for n in "${NOTES[@]+"${NOTES[@]}"}"; do NOTE_ARGS+=(--note "$n"); done
NOTE_ARGS+=(--note "script wall $(elapsed) s")
$PY bench/memory/ours_vs_template_table.py --runs "$RUNS" --smi-dir "$RUNS/smi" --out "$O" --build /tmp/model_build.json \
  --order "$ORDER" "${NOTE_ARGS[@]}"
stamp done
