#!/usr/bin/env bash
# Device command (first GPU call): run(command="bash bench/gpu_call1.sh", carry=[".gpu-carry/tokenizer", ".gpu-carry/bnb"], timeout_s=600)
#
# 1. inventory of the GPU machine (python, pip list, nvidia-smi, disk, cores)
# 2. FlexLoRA benchmark: factored on the CPU with 16 and 2 threads, dense on the GPU
# 3. random Gemma2-9B-shaped model built on the GPU and saved (timed), then one process
#    loads it through app.models.build_model (NF4 + LoRA) and trains a few steps: checks
#    transformers 5.17 / peft 0.21 there with the carried (trimmed) bitsandbytes wheel.
. bench/gpu_common.sh call1.log

stamp inventory
{
  python3 -c "import sys; print(sys.version); print(sys.executable)"
  command -v python3 pip pip3 uv || true
  python3 -m pip --version || echo "NO python3 -m pip"
  nvidia-smi
  df -h
  echo "nproc: $(nproc)"
  free -g
  uname -a
  python3 -m pip list 2>/dev/null || uv pip list --python "$(command -v python3)" 2>/dev/null
} > "$O/inventory.txt" 2>&1
head -5 "$O/inventory.txt"
grep -iE "^(pyarrow|pandas|xxhash|multiprocess|dill|grpcio|fastapi|uvicorn|sqlalchemy|matplotlib|seaborn|aiohttp|pydantic|cryptography|datasets|bitsandbytes|flwr|rich|typer|click|protobuf|requests|httpx|tomli|pyyaml|fsspec|pillow|packaging) " "$O/inventory.txt"
df -h / /tmp /var/tmp 2>/dev/null

stamp "flexlora 16 threads, dense on the GPU (all modules)"
PYTHONPATH=. timeout 300 python3 bench/flexlora_bench.py --dense-device cuda --threads 16 --json "$O/flexlora_t16.json" 2>&1 | tee "$O/flexlora.log"
stamp "flexlora 2 threads (dense part limited to 2 modules; see the 16-thread run for the full dense time)"
PYTHONPATH=. timeout 150 python3 bench/flexlora_bench.py --dense-device cuda --threads 2 --dense-modules 2 --json "$O/flexlora_t2.json" 2>&1 | tee -a "$O/flexlora.log"

stamp "bitsandbytes (trimmed wheel) -> /tmp/bnb-site"
python3 - <<'EOF'
import glob, zipfile
for w in glob.glob(".gpu-carry/bnb/*.whl"):
    zipfile.ZipFile(w).extractall("/tmp/bnb-site")
print("extracted")
EOF

MODEL_DIR=${MODEL_DIR:-/var/tmp/gemma2-9b-random}
stamp "build + save random Gemma2-9B -> $MODEL_DIR"
python3 bench/make_random_gemma2.py --out "$MODEL_DIR" --tokenizer .gpu-carry/tokenizer --json "$O/model_build.json"
ls -la "$MODEL_DIR"; du -sh "$MODEL_DIR"

stamp "QLoRA single-process check (gradient checkpointing on)"
PYTHONPATH=.:/tmp/bnb-site timeout 240 python3 bench/qlora_step_check.py --model "$MODEL_DIR" --json "$O/qlora_check.json"
stamp done
