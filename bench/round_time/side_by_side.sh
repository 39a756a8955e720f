#!/usr/bin/env bash
# Device commands for the side-by-side round benchmark (bench/README.md, "Warm trainers"),
# on a 2-GPU machine, two calls on the same warm machine:
#   run(kind="nvidia-h100-x2", command="bash bench/round_time/side_by_side.sh A", carry=[".gpu-carry/pack", ".gpu-carry/tokenizer", ".gpu-carry/smoke-alpaca.json"])
#   run(command="bash bench/round_time/side_by_side.sh B", carry=[same])
#   run(kind="nvidia-h100-x2", command="bash bench/round_time/side_by_side.sh C", carry=[same])
#   run(kind="nvidia-h100-x2", command="bash bench/round_time/side_by_side.sh D", carry=[same])
# A: warm trainers on GPU 0 (FedAvg then FlexLoRA on one deployment) while GPU 1 runs the
#    seed mode with FedAvg; then warm trainers on GPUs 0,1 (FedAvg).
# B: ours in process (today's path: a fresh ClientApp per round, checkpointing on) on GPU 0
#    while GPU 1 runs the seed mode with dense FlexLoRA (2 rounds: ~150 s each).
# C: after the adapter travels packed (app/wire.py): warm trainers on GPU 0 (FedAvg, FlexLoRA)
#    while GPU 1 runs ours in process; then warm trainers on GPUs 0,1 (FedAvg).
# D: attention and 4-bit kind in the mode that runs (warm trainers, 2 per GPU, FedAvg):
#    GPU 0 eager, GPU 1 flex_attention, each first with NF4 + double quant + dropout 0.05
#    (our choice before issue 12) and then with the template's FP4, no double quant, 0.075;
#    the FP4 eager deployment also runs FlexLoRA (one-thread aggregation); once GPU 1 is done,
#    bench/round_time/attention_probe.py trains one fixed partition from the same adapter there, eager
#    then flex_attention, for the per-step losses.
# E (issue 26; one GPU, e.g. nvidia-h100-x1; carry [".gpu-carry/pack", ".gpu-carry/ray",
#    ".gpu-carry/tokenizer", ".gpu-carry/smoke-alpaca.json"]): Flower's Simulation Engine itself
#    (`flwr run . local-simulation`, round_bench.py --backend simulation), FedAvg, 3 rounds, GPU 0.
# F (right after E, same warm machine and carry): the seed mode's re-creation (2 rounds), then
#    our warm trainers (3 rounds), one after the other on GPU 0, FedAvg.
# A and B ran before the packing: their warm and in-process rounds paid ~45 s of transfers.
# The two GPUs' jobs share the host's 32 cores and memory, not a GPU.
# What comes back: the call's log and results_<A|B>.tar.gz (JSON, logs of every process).
# Conditions: random Gemma2-9B-shaped weights (bench/make_random_gemma2.py), the tiny demo
# tokenizer, 1,600 long rows (80 a partition: every client trains its full 10 steps of
# 2 x 512 tokens), NF4 + LoRA r=8 on q_proj,v_proj, 20 nodes, 2 sampled a round, 4 rounds.
. bench/gpu_common.sh "side_by_side_$1.log"
R=/tmp/bench-results
mkdir -p "$R"
gemma2_host "$R/model_build_$1.json"
ours() {  # LABEL GPUS RUNS [round_bench options...]
  local label=$1 gpus=$2 runs=$3; shift 3
  timeout -k 20 "$LIMIT" $PY bench/round_bench.py --label "$label" --gpus "$gpus" --runs "$runs" --model "$MODEL" \
    --data "$DATA" --workdir /tmp/round-bench --json "$R/$label.json" "$@" > "$R/$label.log" 2>&1
  echo "ours $label exited $?"; grep "^\[" "$R/$label.log"
}
seed() {  # NAME GPU [seed_mode options...]
  local name=$1 gpu=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 20 "$LIMIT" $PY bench/seed_mode.py --model "$MODEL" --data-files "$DATA" \
    --quantization 4 --json "$R/$name.json" "$@" > "$R/$name.log" 2>&1
  echo "seed $name exited $?"; grep -E "^round|^save|import" "$R/$name.log"
}
pack() {  # PHASE: the JSON and logs of every process so far, the databases and round folders left out
  tar -czf "$O/results_$1.tar.gz" -C /tmp --exclude='*.db*' --exclude='round-[0-9]*' bench-results round-bench 2>/dev/null
}
case "$1" in
  A)
    stamp "warm trainers on GPU 0 | seed mode FedAvg on GPU 1"
    LIMIT=330 seed seed-fedavg 1 --rounds 4 & S=$!
    LIMIT=330 ours warm-1gpu 0 fedavg,flexlora
    wait $S
    stamp "warm trainers on GPUs 0,1"
    LIMIT=170 ours warm-2gpu 0,1 fedavg
    ;;
  B)
    stamp "in process on GPU 0 | seed mode FlexLoRA on GPU 1"
    LIMIT=480 seed seed-flexlora 1 --flexlora --rounds 2 & S=$!
    LIMIT=480 ours in-process-1gpu 0 fedavg --trainers-per-gpu 0 --run-config "model.gradient-checkpointing=true"
    wait $S
    ;;
  C)
    stamp "warm trainers on GPU 0 | ours in process on GPU 1 (adapter packed, checkpointing auto)"
    LIMIT=290 ours in-process-packed 1 fedavg --trainers-per-gpu 0 & S=$!
    LIMIT=290 ours warm-1gpu 0 fedavg,flexlora
    wait $S
    stamp "warm trainers on GPUs 0,1"
    LIMIT=170 ours warm-2gpu 0,1 fedavg
    ;;
  D)
    OURS="model.quantization-type='nf4' model.double-quantization=true model.lora.peft-lora-dropout=0.05"
    stamp "eager on GPU 0 | flex_attention on GPU 1: NF4 + double quant (3 rounds)"
    LIMIT=170 ours flex-nf4 1 fedavg --rounds 3 --run-config "model.attention='flex_attention' $OURS" & S=$!
    LIMIT=170 ours eager-nf4 0 fedavg --rounds 3 --run-config "$OURS"
    wait $S
    stamp "eager on GPU 0 (FedAvg, FlexLoRA) | flex_attention on GPU 1 (FedAvg), then the loss probe: the template's FP4"
    (
      LIMIT=170 ours flex-fp4 1 fedavg --run-config "model.attention='flex_attention'"
      for a in eager flex_attention; do
        CUDA_VISIBLE_DEVICES=1 timeout -k 10 60 $PY bench/round_time/attention_probe.py --model "$MODEL" --data "$DATA" \
          --run-config "model.attention='$a'" --json "$R/probe-$a.json" > "$R/probe-$a.log" 2>&1
        tail -n 1 "$R/probe-$a.log"
      done
    ) & S=$!
    LIMIT=300 ours eager-fp4 0 fedavg,flexlora
    wait $S
    ;;
  E)  # the results are packed after each phase: a call cut at its limit still brings back the phases done
    stamp "Flower's Simulation Engine (FedAvg, 3 rounds)"
    LIMIT=280 ours engine-fedavg 0 fedavg --rounds 3 --backend simulation
    ;;
  F)  # after E on the same warm machine; E's engine leaves Ray's workers and its local SuperLink behind
    pkill -f 'ftvenv/bin/[p]ython' || true
    stamp "the seed mode's re-creation (FedAvg, 2 rounds)"
    LIMIT=220 seed seed-fedavg-e 0 --rounds 2; pack "$1"
    stamp "warm trainers (FedAvg, 3 rounds)"
    LIMIT=220 ours warm-fedavg-e 0 fedavg --rounds 3
    ;;
esac
pack "$1"
stamp "done"
