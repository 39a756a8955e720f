#!/usr/bin/env bash
# Issue 24's levers on the lent GPU machine, one at a time, on one warm machine (chain the calls):
#   M  run(command="bash bench/round_levers/run.sh M", carry=[".gpu-carry/pack", ".gpu-carry/tokenizer", ".gpu-carry/smoke-alpaca.json"])
#      one client's step at 2x4, 8x1, 4x2 and 2x4 again, warm (microbatch.py; JSON written after each shape)
#   L  same carry: the round at 2x4 (today) and 8x1
#   W  same carry: Flower's fixed waits shortened (waits_probe/ and FLWR_SUPEREXEC_TASK_POLL_INTERVAL), at 2x4 and 8x1
#   N  same carry, one call right after side_by_side.sh E on the same warm machine (whose warm-fedavg-e is
#      the round at 2x4 with bfloat16 on the wire): the step at 2x4 and 8x1, the round at 8x1, the round
#      at 2x4 with float32 on the wire (lever 6's time side)
#   S  same carry: lever 3 side by side: the round at 2x4 with two trainings at once (today), then 8x1
#      with one trainer on the GPU (the sampled clients one after the other, the whole GPU each)
#   K  carry also .gpu-carry/liger and .gpu-carry/mix-alpaca.json: one client's step: 2x4 and 8x1 eager,
#      2x4 from the bfloat16 wire (lever 6 on the 9B shapes), 8x1 with Liger, flex attention and
#      torch.compile (lever 2; each shape twice, the first warms up), 2x4 and 8x1 on the length mix (lever 7)
#   X  carry as K: the 8x1 one-trainer round with Flower's waits shortened (lever 4), and the rounds of S
#      on the length mix (lever 7; bench/make_smoke_data.py --words 10 --words-max 450)
#   C  carry as K: lever 2 in the round: 8x1 with one trainer and model.compile=true on the long rows and
#      on the length mix (recompiles per padded length); Flower's logs stamped (FLWR_LOG_LEVEL=DEBUG) and
#      each round's hops appended to the log (bench/round_timeline.py)
#   J  carry as K: the whole 10-round job in the layout of C on the long rows, measured from the
#      deployment's start to the run's end, stamped
#   Q  carry as K, right after J: the seed's re-created pipeline, the whole 10-round FedAvg job
#      (bench/seed_mode.py --rounds 10, ~630 s), started in its own session so it outlives this call
#   R  carry as K, right after Q: waits for Q's job to end and brings back its JSON and log, then
#      today's layout (2x4, two trainings at once, 3 rounds, stamped) on the same machine; BASE=0 leaves
#      that out (`BASE=0 bash bench/round_levers/run.sh R`)
#   G  carry as K, right after J where device time is too short for Q and R: the seed's pipeline for 3
#      rounds (~230 s; SEED_ROUNDS=2 ~150 s), its 10-round job extrapolated from imports, round 1 and the
#      median; in one call with J: `bash bench/round_levers/run.sh J; SEED_ROUNDS=2 LIMIT=170 bash ... G`
# Conditions as bench/docker_gpu/run.sh: random Gemma2-9B-shaped weights, the demo tokenizer,
# 1,600 long rows, FP4 + LoRA r=8 on q_proj,v_proj, 20 nodes, 2 a round, FedAvg, 3 rounds.
. bench/gpu_common.sh "round_levers_$1.log"
R=/var/tmp/round-levers
mkdir -p "$R"
gemma2_host "$R/model_build.json"
MB8="train.training-arguments.per-device-train-batch-size=8 train.training-arguments.gradient-accumulation-steps=1"
round() {  # LABEL [round_bench options...]
  local label=$1; shift
  timeout -k 30 "${RLIMIT:-280}" env ${STAMPED:+FLWR_LOG_LEVEL=DEBUG} $PY bench/round_bench.py --label "$label" --gpus 0 \
    --runs fedavg --rounds "${ROUNDS:-3}" --model "$MODEL" --data "$DATA" --workdir "/var/tmp/round-bench-$label" \
    --json "$R/$label.json" "$@" > "$R/$label.log" 2>&1
  echo "$label exited $?"
  # Flower's own hops in each round (pull, ClientApp process start, reply), from its stamped logs
  [ -n "${STAMPED:-}" ] && $PY bench/round_timeline.py "/var/tmp/round-bench-$label/$label/logs" >> "$R/$label.log" 2>&1
  # the trainers' own model-load seconds, beside the deployment's start-up timeline
  grep -h "loaded" /var/tmp/round-bench-"$label"/"$label"/logs/trainer*.log >> "$R/$label.log" 2>/dev/null
  grep -E "^\[|loaded|^median seconds" "$R/$label.log"
  cp "$R/$label.json" "$R/$label.log" "$O/" 2>/dev/null  # this call's files only: at most 8 come back
}
MIX=$PWD/.gpu-carry/mix-alpaca.json
ONE=(--trainers-per-gpu 1 --run-config "$MB8")
ONE_COMPILED=(--trainers-per-gpu 1 --run-config "$MB8 model.compile=true")
seed10_wait() {  # SECONDS: until phase Q's job has ended, at most that long
  for _ in $(seq 1 "$1"); do [ -f "$R/seed10.done" ] && break; sleep 1; done
  cat "$R/seed10.done" 2>/dev/null; grep -E "^round|^save|import" "$R/seed10.log"
}
step() {  # LABEL [microbatch options...]: one client, 10 steps
  local label=$1; shift
  stamp "one client: $label"
  timeout -k 30 "${LIMIT:-150}" $PY bench/round_levers/microbatch.py --model "$MODEL" --data "$DATA" --steps 10 \
    --json "$O/step-$label.json" "$@" 2>&1 | grep -E '^[0-9]+x|Error'
}
case "$1" in
  M)
    stamp "one client, 10 steps at each micro-batch shape"
    timeout -k 30 "${LIMIT:-240}" $PY bench/round_levers/microbatch.py --model "$MODEL" --data "$DATA" --steps 10 \
      --shapes "${SHAPES:-2x4,8x1,4x2,2x4}" --json "$O/microbatch.json" 2>&1 | grep -E '^[0-9]+x|Error'
    ;;
  L)
    stamp "rounds at 2x4 (today)"; round base
    stamp "rounds at 8x1"; round mb8 --run-config "$MB8"
    ;;
  N)
    stamp "one client, 10 steps at 2x4 and 8x1"
    timeout -k 30 170 $PY bench/round_levers/microbatch.py --model "$MODEL" --data "$DATA" --steps 10 \
      --shapes 2x4,8x1 --json "$O/microbatch.json" 2>&1 | grep -E '^[0-9]+x|Error'
    stamp "rounds at 8x1"; RLIMIT=250 round mb8 --run-config "$MB8"
    stamp "rounds at 2x4, float32 on the wire"; RLIMIT=250 round wire-f32 --run-config "strategy.wire-dtype='float32'"
    ;;
  S)
    stamp "rounds at 2x4, two trainings at once"; RLIMIT=250 round base
    stamp "rounds at 8x1, one trainer"; RLIMIT=250 round one-mb8 "${ONE[@]}"
    ;;
  K)
    $PY -c 'import liger_kernel' 2>/dev/null || $PY "$(ls .gpu-carry/pack/pip-*.whl | head -1)/pip" install \
      --no-index --no-deps --disable-pip-version-check -q .gpu-carry/liger/*.whl
    step eager --shapes 2x4,8x1
    step wire-bf16 --shapes 2x4 --wire bfloat16
    step liger --shapes 8x1,8x1 --kernel liger
    step flex --shapes 8x1,8x1 --run-config "model.attention='flex_attention'"
    LIMIT=200 step compile --shapes 8x1,8x1 --run-config "model.compile=true"
    DATA=$MIX step mix --shapes 2x4,8x1
    ;;
  X)
    PYW="env PYTHONPATH=$PWD:$PWD/bench/round_levers/waits_probe FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 $VENV/bin/python"
    stamp "rounds at 8x1, one trainer, waits shortened"; PY=$PYW RLIMIT=200 round waits-one-mb8 "${ONE[@]}"
    stamp "length mix: rounds at 2x4, two at once"; DATA=$MIX RLIMIT=170 round mix-base
    stamp "length mix: rounds at 8x1, one trainer"; DATA=$MIX RLIMIT=170 round mix-one-mb8 "${ONE[@]}"
    ;;
  C)
    export STAMPED=1
    stamp "rounds at 8x1, one trainer, compiled"; RLIMIT=220 round one-mb8-compiled "${ONE_COMPILED[@]}"
    stamp "length mix: rounds at 8x1, one trainer, compiled"; DATA=$MIX RLIMIT=220 round mix-one-mb8-compiled "${ONE_COMPILED[@]}"
    ;;
  J)
    export STAMPED=1
    stamp "the 10-round job at 8x1, one trainer, compiled"; ROUNDS=10 RLIMIT=420 round job-one-mb8-compiled "${ONE_COMPILED[@]}"
    ;;
  Q)
    stamp "the seed's pipeline: the 10-round FedAvg job, in its own session"
    rm -f "$R/seed10.json" "$R/seed10.done"
    # its own copy of the rows: the next call's carry replaces .gpu-carry while the job reads them
    cp "$DATA" "$R/seed-data.json"
    # single quotes: the inner shell expands these, exported for it
    export PY MODEL R
    setsid bash -c 'start=$(date +%s); $PY bench/seed_mode.py --model "$MODEL" --data-files "$R/seed-data.json" \
      --quantization 4 --rounds 10 --json "$R/seed10.json" > "$R/seed10.log" 2>&1; \
      echo "exit $? wall $(( $(date +%s) - start )) s" > "$R/seed10.done"' < /dev/null > /dev/null 2>&1 &
    seed10_wait "${WAIT:-480}"
    ;;
  R)
    stamp "waiting for the seed's 10-round job"
    seed10_wait "${WAIT:-300}"
    cp "$R/seed10.json" "$R/seed10.log" "$R/seed10.done" "$O/" 2>/dev/null
    # today's layout needs the GPU to itself
    [ -f "$R/seed10.done" ] || { echo "the seed's job is still running: no baseline round in this call"; exit 1; }
    # BASE=0: the seed's job only, where device time is short
    [ "${BASE:-1}" = 1 ] || { stamp "done"; exit 0; }
    export STAMPED=1
    stamp "rounds at 2x4, two trainings at once (today's layout)"; RLIMIT=${BASE_LIMIT:-200} round base
    ;;
  G)
    n=${SEED_ROUNDS:-3}
    stamp "the seed's pipeline: $n FedAvg rounds, its 10-round job extrapolated"
    timeout -k 30 "${LIMIT:-300}" $PY bench/seed_mode.py --model "$MODEL" --data-files "$DATA" \
      --quantization 4 --rounds "$n" --json "$O/seed$n.json" 2>&1 | grep -E "^round|^save|import|Error"
    ;;
  W)
    PY="env PYTHONPATH=$PWD:$PWD/bench/round_levers/waits_probe FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 $VENV/bin/python"
    stamp "rounds at 2x4, waits shortened"; round waits
    stamp "rounds at 8x1, waits shortened"; round waits-mb8 --run-config "$MB8"
    ;;
esac
stamp "done"
