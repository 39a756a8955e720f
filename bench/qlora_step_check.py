r"""One process, no Flower: load the model (NF4 + LoRA) our way or the FlowerTune template's way, and train a few steps.

Checks the GPU stack (transformers/peft there, bitsandbytes carried) before the federated
smoke run, and measures load time, memory after load, peak memory and tokens/s with the
seed's client settings (batch 2 x 512, grad accumulation 4).

Variants (the training loop below is the same for both):
  ours      app.models.build_model: bf16 norms/embeddings, checkpointing with use_reentrant=True
            (False until the switch after bench/memory/reentrant_ab.txt)
  template  the FlowerTune template's get_model: same BitsAndBytesConfig and LoraConfig, but
            peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=...) first
            (it upcasts every non-4-bit parameter, the 256k-row embedding too, to float32)

Device commands (inside bench/memory/ours_vs_template.sh; the earlier gpu_call1.sh,
gpu_memory_side_by_side.sh and gpu_reentrant_ab.sh are in git history):
    PYTHONPATH=.:/tmp/bnb-site python bench/qlora_step_check.py --model /var/tmp/gemma2-9b-random \
        --json $OUT/qlora_check.json
    PYTHONPATH=.:/tmp/bnb-site python bench/qlora_step_check.py --model /var/tmp/gemma2-9b-random \
        --variant template --checkpointing off --json $OUT/D.json
Options:
  --seed N      torch.manual_seed(N) before the model is built, so LoRA init and dropout
                masks are the same in every process and the losses can be compared
CPU check of the logic (no quantization, tiny model):
    PYTHONPATH=. python bench/qlora_step_check.py --model .gpu-carry/demo/tiny-gemma2 --quantization 0 --seq 32 \
        --variant template
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


def build_template(settings, torch):
    """The FlowerTune template's models.get_model, with our BitsAndBytesConfig and from_pretrained arguments."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from app.models import _quantization, lora_config

    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        settings.name,
        quantization_config=_quantization(settings),
        dtype=torch.bfloat16 if on_gpu else torch.float32,
        device_map={"": 0} if on_gpu else None,
        attn_implementation="eager",  # same attention as ours, so only the preparation differs
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    if settings.gradient_checkpointing:
        model.config.use_cache = False
    return get_peft_model(model, lora_config(settings))


def checkpointing_info(model) -> dict:
    """Whether the decoder layers checkpoint, and the kwargs their checkpoint function got."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        return {}
    layer = layers[0]
    func = getattr(layer, "_gradient_checkpointing_func", None)
    keywords = dict(getattr(func, "keywords", {}) or {})
    return {
        "layer_gradient_checkpointing": bool(getattr(layer, "gradient_checkpointing", False)),
        "checkpoint_kwargs": {k: repr(v) for k, v in keywords.items()},
    }


def param_bytes_by_dtype(model) -> dict:
    out: dict[str, float] = {}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = f"{type(p).__name__}:{p.dtype}"
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return {k: round(v / GIB, 3) for k, v in sorted(out.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--variant", choices=("ours", "template"), default="ours")
    ap.add_argument("--checkpointing", choices=("on", "off"), default="on")
    ap.add_argument("--no-gc", action="store_true", help="same as --checkpointing off")
    ap.add_argument("--quantization", type=int, default=4, choices=(0, 4, 8), help="0 only for the CPU check")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps (after one untimed step)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument(
        "--max-token-id", type=int, default=300, help="random ids in [3, this): inside the tokenizer's vocab"
    )
    ap.add_argument("--label", default="", help="a name for this configuration in the JSON")
    ap.add_argument("--seed", type=int, default=None, help="torch.manual_seed before the model is built")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    gc_on = args.checkpointing == "on" and not args.no_gc

    t0 = time.perf_counter()
    import peft
    import torch
    import transformers

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        if args.quantization:
            raise
        bnb_version = None

    from app.config import LoraSettings, ModelSettings
    from app.models import build_model

    import_s = time.perf_counter() - t0
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    settings = ModelSettings(
        name=args.model,
        quantization=args.quantization,
        gradient_checkpointing=gc_on,
        lora=LoraSettings(r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj")),
    )
    process_used = [0]

    def sample_process_memory() -> None:
        # Device-wide used memory (CUDA context + caching allocator); this process is the GPU's only one.
        if on_gpu:
            free, total = torch.cuda.mem_get_info()
            process_used[0] = max(process_used[0], total - free)

    if args.seed is not None:
        torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = build_model(settings) if args.variant == "ours" else build_template(settings, torch)
    sync()
    load_s = time.perf_counter() - t0
    after_load = torch.cuda.memory_allocated() if on_gpu else 0
    reserved_after_load = torch.cuda.memory_reserved() if on_gpu else 0
    sample_process_memory()
    used_after_load = process_used[0]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    gen = torch.Generator(device=device).manual_seed(0)
    grad_check: dict = {}

    def step() -> float:
        total = 0.0
        for _ in range(args.accum):
            ids = torch.randint(3, args.max_token_id, (args.batch, args.seq), device=device, generator=gen)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss / args.accum
            loss.backward()
            sample_process_memory()
            total += loss.item()
        if not grad_check:
            # Once, in the warm-up step: do all LoRA tensors get gradients? (reentrant checkpointing
            # with inputs that don't require grad would silently leave them None and look fast).
            trainable_params = [p for p in model.parameters() if p.requires_grad]
            with_grad = [p for p in trainable_params if p.grad is not None]
            grad_check.update(
                trainable_tensors=len(trainable_params),
                tensors_with_grad=len(with_grad),
                tensors_with_nonzero_grad=sum(bool(p.grad.abs().sum() > 0) for p in with_grad),
                grad_norm=float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in with_grad])))
                if with_grad
                else 0.0,
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        sample_process_memory()
        return total

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first_loss = step()
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    sync()
    train_s = time.perf_counter() - t0
    tokens = args.steps * args.accum * args.batch * args.seq
    result = {
        "label": args.label,
        "variant": args.variant,
        "gradient_checkpointing": gc_on,
        "seed": args.seed,
        "quantization": args.quantization,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bnb_version,
        },
        "gpu": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "import_seconds": round(import_s, 2),
        "load_quantize_seconds": round(load_s, 2),
        "gib_after_load": round(after_load / GIB, 2),
        "reserved_gib_after_load": round(reserved_after_load / GIB, 2),
        "process_used_gib_after_load": round(used_after_load / GIB, 2),
        "param_gib_by_type_dtype": param_bytes_by_dtype(model),
        "checkpointing": checkpointing_info(model),
        "trainable_params": trainable,
        "input_embedding_forward_hooks": len(model.get_input_embeddings()._forward_hooks),
        "warmup_grad_check": grad_check,
        "batch": args.batch,
        "seq": args.seq,
        "accum": args.accum,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if on_gpu else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if on_gpu else None,
        "process_used_peak_gib": round(process_used[0] / GIB, 2) if on_gpu else None,
        "warmup_step_seconds": round(warmup_s, 2),
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
