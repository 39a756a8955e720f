#!/usr/bin/env bash
# Lever 6 of issue 24, the training side: does bfloat16 on the wire change where 10 rounds end?
# The tiny demo model on the CPU, Flower's Simulation Engine (round_bench.py --backend simulation),
# 10 optimizer steps of 2 x 4 rows a client, FedAvg, 10 rounds, train.seed 1, 2, 3; the same runs from a tree whose wire carries float32.
#   bash bench/round_levers/wire_loss.sh BASELINE_REV OUT_DIR
# BASELINE_REV: the last commit whose adapter travels in float32 (70e5a1c). PYTHONPATH puts each tree
# first: the venv's editable install would otherwise import this checkout's app/ for both sides.
# Each run's bytes-to-client (metrics.jsonl) is printed, proof of which wire it used.
set -eu
CPU="model.quantization=0 model.gradient-checkpointing=false train.seq-length=128"  # the demo's CPU settings, full 10 steps
base=$1 out=$(realpath -m "$2")
mkdir -p "$out"
tree=/tmp/wire-baseline
[ -d "$tree" ] || git worktree add --detach "$tree" "$base" >/dev/null
for seed in 1 2 3; do
  for side in float32:$tree bfloat16:$PWD; do
    name=${side%%:*} dir=${side#*:}
    (cd "$dir" && PYTHONPATH="$dir" timeout -k 10 900 "$OLDPWD/.venv/bin/python" bench/round_bench.py --label "$name-seed$seed" --gpus '' \
      --model "$OLDPWD/.demo/tiny-gemma2" --data "$OLDPWD/.demo/alpaca.json" --runs fedavg --rounds 10 \
      --backend simulation --run-config "train.seed=$seed $CPU" --workdir /tmp/wire-loss \
      --json "$out/$name-seed$seed.json" > "$out/$name-seed$seed.log" 2>&1) || echo "$name seed $seed failed"
    echo "$name seed $seed: $(grep -rhoE --include=metrics.jsonl '"bytes-to-client": [0-9]+' "/tmp/wire-loss/$name-seed$seed" | sort -u | tr '\n' ' ')"
  done
done
git worktree remove --force "$tree"
