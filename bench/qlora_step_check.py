"""One process, no Flower: load the model through app.models.build_model (NF4 + LoRA) and train a few steps.

Checks the GPU stack (transformers/peft there, bitsandbytes carried) before the federated
smoke run, and measures load time, memory after load, peak memory and tokens/s with the
seed's client settings (batch 2 x 512, grad accumulation 4, gradient checkpointing on).

Device command (inside bench/gpu_call1.sh):
    PYTHONPATH=.:/tmp/bnb-site python bench/qlora_step_check.py --model /var/tmp/gemma2-9b-random --json $OUT/qlora_check.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps (after one untimed step)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--no-gc", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    t0 = time.perf_counter()
    import torch
    import bitsandbytes
    import peft
    import transformers

    from app.config import LoraSettings, ModelSettings
    from app.models import build_model

    import_s = time.perf_counter() - t0
    settings = ModelSettings(
        name=args.model,
        quantization=4,
        gradient_checkpointing=not args.no_gc,
        lora=LoraSettings(r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj")),
    )
    t0 = time.perf_counter()
    model = build_model(settings)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    after_load = torch.cuda.memory_allocated()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step() -> float:
        total = 0.0
        for _ in range(args.accum):
            ids = torch.randint(3, 300, (args.batch, args.seq), device="cuda", generator=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / args.accum
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    torch.cuda.reset_peak_memory_stats()
    first_loss = step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    tokens = args.steps * args.accum * args.batch * args.seq
    result = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "gpu": torch.cuda.get_device_name(0),
        "import_seconds": round(import_s, 2),
        "load_quantize_seconds": round(load_s, 2),
        "gib_after_load": round(after_load / 2**30, 2),
        "trainable_params": trainable,
        "gradient_checkpointing": not args.no_gc,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "timed_optimizer_steps": args.steps,
        "tokens_timed": tokens,
        "train_seconds": round(train_s, 2),
        "tokens_per_second": round(tokens / train_s, 1),
        "losses": [first_loss, *losses],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
