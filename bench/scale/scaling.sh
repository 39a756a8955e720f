#!/usr/bin/env bash
# Device commands for issue 15: the 20-node job over 1, 2 and 4 GPUs of one host, at the
# leaderboard's fraction 0.1 and at 0.5 (leaderboard=false), two calls on a warm 4-GPU machine:
#   run(kind="nvidia-h100-x4", command="bash bench/scale/scaling.sh A", carry=[".gpu-carry/pack", ".gpu-carry/tokenizer", ".gpu-carry/smoke-alpaca.json"])
#   run(kind="nvidia-h100-x4", command="bash bench/scale/scaling.sh B", carry=[same])
#   run(kind="nvidia-h100-x4", command="bash bench/scale/scaling.sh C", carry=[same])
#   run(kind="nvidia-h100-x4", command="bash bench/scale/scaling.sh D", carry=[same])
# A: three deployments at once on disjoint GPUs (they share the host's cores, not a GPU):
#    GPU 0: 1 GPU at 0.5 | GPUs 1,2: 2 GPUs at 0.1, then at 0.5 | GPU 3: 1 GPU at 0.1.
# B: GPUs 0-3 alone: 4 GPUs at 0.1, then at 0.5.
# C: 1 GPU at 0.5 alone. A's run of it counted the trainers that fit from nvidia-smi's
#    memory total; the trainers measure torch's, a little smaller, so on an H200 A got 6
#    trainers and the trainers turned gradient checkpointing on. round_bench.py now uses the
#    trainers' own rule (app.gpu_admission.trainings_that_fit); C measures what it plans.
# D: 2 GPUs at 0.1 alone: in A, one client per GPU trained in 13.1 s against B's 9.5 s.
# Every layout is `deploy plan`'s (bench/round_bench.py builds it with deploy.topology.plan):
# at 0.1 its default trainers per GPU; at 0.5 the default capped at what fits a GPU without
# gradient checkpointing (--fit-trainers), since 10 trainers of ~20 GiB do not fit one GPU.
# Conditions: random Gemma2-9B-shaped weights (bench/make_random_gemma2.py), the tiny demo
# tokenizer, 1,600 long rows (every client trains its full 10 steps of 2 x 512 tokens), the
# template's FP4 + LoRA r=8 on q_proj,v_proj, FedAvg, 20 nodes, 4 rounds (round 1 the warm-up).
# What comes back: the call's log, a JSON per deployment (round_bench.py's) and every run's
# metrics.jsonl (metrics.tar.gz), which keeps the rounds of a deployment cut off by its limit.
. bench/gpu_common.sh "scaling_$1.log"
R=$O
gemma2_host "$R/model_build.json"
nproc
ours() {  # LIMIT LABEL GPUS RUNS [round_bench options...]
  local limit=$1 label=$2 gpus=$3 runs=$4; shift 4
  timeout -k 20 "$limit" $PY bench/round_bench.py --label "$label" --gpus "$gpus" --runs "$runs" --model "$MODEL" \
    --data "$DATA" --workdir /tmp/scaling --json "$R/$label.json" "$@" > "$R/$label.log" 2>&1
  echo "ours $label exited $?"; grep "^\[" "$R/$label.log"
}
case "$1" in
  S) ;;
  A)
    stamp "1 GPU at 0.5 (GPU 0) | 2 GPUs at 0.1 then 0.5 (GPUs 1,2) | 1 GPU at 0.1 (GPU 3)"
    ours 560 gpu1-f0.5 0 fedavg@0.5 --fit-trainers & X=$!
    (ours 170 gpu2-f0.1 1,2 fedavg; ours 320 gpu2-f0.5 1,2 fedavg@0.5 --fit-trainers) & Y=$!
    ours 170 gpu1-f0.1 3 fedavg
    wait $X $Y
    ;;
  C)
    stamp "1 GPU at 0.5 alone"
    ours 560 gpu1-f0.5-alone 0 fedavg@0.5 --fit-trainers
    ;;
  D)
    stamp "2 GPUs at 0.1 alone (A's ran beside two other deployments)"
    ours 200 gpu2-f0.1-alone 0,1 fedavg
    ;;
  B)
    stamp "4 GPUs at 0.1, then at 0.5"
    ours 170 gpu4-f0.1 0,1,2,3 fedavg
    ours 300 gpu4-f0.5 0,1,2,3 fedavg@0.5 --fit-trainers
    ;;
esac
nvidia-smi --query-gpu=index,memory.used --format=csv
[ -d /tmp/scaling ] && (cd /tmp/scaling && find . -name metrics.jsonl | tar -czf "$R/metrics_$1.tar.gz" -T -)
stamp "done"
