#!/usr/bin/env bash
# Device command (GPU smoke run): run(command="bash bench/gpu_smoke.sh", carry=[".gpu-carry/pack", ".gpu-carry/tokenizer", ".gpu-carry/smoke-alpaca.json"], timeout_s=600)
#
# Real-size smoke run through our launcher on one GPU: a Gemma2-9B-shaped model with
# random weights (bench/make_random_gemma2.py), long Alpaca rows (bench/make_smoke_data.py),
# 20 SuperNodes on GPU 0 (`--gpus 0`), 2 sampled per round (fraction-train 0.1), NF4 +
# LoRA r=8, gradient checkpointing on, batch 2 x 512, grad accumulation 4, 10 steps.
# Everything it records lands under $OUT: call2.log, gpu_mem.csv, summary.json,
# smoke_logs.tar.gz (.deploy/logs, metrics.jsonl, checkpoint listing).
. bench/gpu_common.sh call2.log
DEADLINE=$((T0 + ${BUDGET_S:-575}))
VENV=${VENV:-/var/tmp/ftvenv}
MODEL_DIR=${MODEL_DIR:-/var/tmp/gemma2-9b-random}
DATA=$PWD/.gpu-carry/smoke-alpaca.json
ROUNDS=${ROUNDS:-2}

stamp "setup venv"
bash bench/gpu_setup.sh "$VENV" || { echo "setup failed"; exit 1; }

stamp "model"
python3 bench/make_random_gemma2.py --out "$MODEL_DIR" --tokenizer .gpu-carry/tokenizer --json "$O/model_build.json" || exit 1
[ -f "$DATA" ] || python3 bench/make_smoke_data.py --rows 400 --out "$DATA"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv

rm -rf results .deploy
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 2 > "$O/gpu_mem.csv" 2>&1 &
SAMPLER=$!

left=$(( DEADLINE - $(date +%s) - 30 ))
stamp "deploy run ($left s left for it)"
timeout -k 25 -s TERM "$left" "$VENV/bin/python" -m deploy --app . run --gpus 0 \
  --run-config "model.name=\"$MODEL_DIR\" dataset.data-files=\"$DATA\" num-server-rounds=$ROUNDS"
rc=$?
stamp "deploy exited with $rc"
kill "$SAMPLER" 2>/dev/null
# Whatever outlived the launcher (only if it was killed): stop it by pid.
for pid in $(pgrep -f "$VENV/bin/" || true); do echo "leftover: $(ps -o pid=,args= -p "$pid" | cut -c1-120)"; kill "$pid" 2>/dev/null; done

RUN=$(ls -dt results/*/ 2>/dev/null | head -1)
if [ -n "$RUN" ]; then
  stamp "summary of $RUN"
  python3 bench/summarize_smoke.py "$RUN" --json "$O/summary.json"
  find "$RUN" -type f -printf '%p %s\n' > "$RUN/listing.txt"
fi
for f in .deploy/logs/*.log; do echo "--- tail $f"; tail -n 5 "$f"; done 2>/dev/null | tail -n 150
tar -czf "$O/smoke_logs.tar.gz" .deploy/logs ${RUN:+$RUN/metrics.jsonl} ${RUN:+$RUN/listing.txt} .deploy/run-config.toml 2>/dev/null
stamp "done (rc $rc)"
exit $rc
