"""Issue 24, lever 1: one client's optimizer steps at other micro-batch shapes, same effective batch.

Why: the leaderboard's step is 8 rows, as 2 rows x 4 accumulation steps. transformers divides
the loss by the label tokens of all 8 rows however they are split (`num_items_in_batch`), and
the sampler hands out the same 8 rows in the same order, so 8 x 1 or 4 x 2 is the same
optimizer step, with bitsandbytes dequantising each 4-bit weight once per micro-batch
instead of four times. This runs our own step (app.models.build_model, app.train.train_round)
once per shape on the same model, rows, initial adapter and seed, and reports the per-step
losses, the adapter's largest difference from the first shape's, seconds, tokens/s and peak
memory. LoRA dropout is 0 unless --run-config sets it: dropout draws differ by shape, so with
it on the steps agree only in distribution.

    # CPU, the tiny demo model (fp32): the equality
    .venv/bin/python bench/round_levers/microbatch.py --shapes 2x4,8x1,4x2 --json /tmp/mb.json
    # lever 6: the same step from the initial adapter rounded to bfloat16 by the wire
    .venv/bin/python bench/round_levers/microbatch.py --shapes 2x4 --steps 10 --wire bfloat16 --json /tmp/mb-bf16.json
    # GPU, the 9B-shaped model (the app's FP4 and seq-length 512, bf16): speed and memory at each shape
    python bench/round_levers/microbatch.py --model DIR --data FILE --shapes 2x4,8x1,4x2 --json OUT.json
    # lever 2 at 8 x 1 (the first shape warms the kernels up): Liger, torch.compile, flex attention
    python bench/round_levers/microbatch.py --model DIR --data FILE --shapes 8x1,8x1 --kernel liger --json OUT.json
    python bench/round_levers/microbatch.py ... --run-config "model.compile=true" --json OUT.json
    python bench/round_levers/microbatch.py ... --run-config "model.attention='flex_attention'" --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def shapes(text: str) -> list[tuple[int, int]]:
    out = [tuple(int(n) for n in s.split("x")) for s in text.split(",")]
    if len({b * a for b, a in out}) != 1:
        raise SystemExit(f"--shapes {text}: every shape must make the same effective batch")
    return out


def run_config(args) -> dict:
    from flwr.common.config import flatten_dict, parse_config_args

    flat = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    if args.model:
        model, data = str(args.model), str(args.data)
    else:
        from deploy.demo import build_demo

        assets = build_demo(Path(tempfile.mkdtemp(prefix="microbatch-")) / "demo")
        model, data = str(assets.model_dir), str(assets.data_file)
    cpu = {} if args.model else {"model.quantization": 0, "train.seq-length": 128}
    base = {
        **flat,
        "model.name": model,
        "dataset.data-files": data,
        "model.gradient-checkpointing": False,
        "model.lora.peft-lora-dropout": 0.0,
        "train.training-arguments.max-steps": args.steps,
        **cpu,
    }
    return {**base, **(parse_config_args([args.run_config]) if args.run_config else {})}


def recorded_losses() -> list[dict]:
    """Our Trainer, its log history kept: app.train builds the Trainer itself, so it is swapped
    once for a subclass that appends to the returned list (cleared by the caller per shape)."""
    import app.train as train_mod

    history: list[dict] = []

    class Recording(train_mod.Trainer):
        def train(self, *a, **k):
            out = super().train(*a, **k)
            history.extend(self.state.log_history)
            return out

    train_mod.Trainer = Recording
    return history


def use_kernel(kernel: str | None) -> None:
    """Lever 2, before any model is built: Liger's Triton kernels patch transformers' Gemma2
    classes (RoPE, RMSNorm, GeGLU, and the LM head fused with the loss, so the 256k-wide
    logits of 8 x 512 tokens are never held whole)."""
    if kernel == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_gemma2

        apply_liger_kernel_to_gemma2(rope=True, rms_norm=True, geglu=True, fused_linear_cross_entropy=True)


def one_shape(config, tokenizer, data, adapter, history: list[dict], batch: int, accumulation: int) -> dict:
    from dataclasses import replace

    import torch

    from app.models import build_model
    from app.train import train_round

    history.clear()
    config = replace(config, train=replace(config.train, batch_size=batch, gradient_accumulation_steps=accumulation))
    torch.manual_seed(config.train.seed)
    model = build_model(config.model)
    state, metrics = train_round(model, tokenizer, data, config, 1, adapter)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "shape": f"{batch}x{accumulation}",
        "losses": [h["loss"] for h in history if "loss" in h],
        "seconds": round(metrics["train-seconds"], 3),
        "tokens": metrics["train-tokens"],
        "tokens-per-second": round(metrics["train-tokens"] / metrics["train-seconds"], 1),
        "peak-gib": round(metrics["peak-gpu-bytes"] / 2**30, 2),
        "adapter": state,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=shapes, default=shapes("2x4,8x1,4x2"), help="BATCHxACCUMULATION,...")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--model", type=Path, help="a model folder (else the tiny demo, built)")
    ap.add_argument("--data", type=Path, help="Alpaca-format json rows, with --model")
    ap.add_argument("--run-config", default="", help="extra overrides, Flower's syntax")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--kernel", choices=("liger",), help="lever 2: Liger's kernels (torch.compile: model.compile=true)")
    ap.add_argument("--wire", help="start from the initial adapter as it arrives over the wire in this dtype (lever 6)")
    args = ap.parse_args()
    import torch

    from app.config import AppConfig
    from app.dataset import load_partition, tokenize_partition
    from app.models import initial_adapter, load_tokenizer

    config = AppConfig.from_run_config(run_config(args))
    use_kernel(args.kernel)
    tokenizer = load_tokenizer(config.model)
    # the rows and their tokens do not depend on the shape: made once
    data = tokenize_partition(
        load_partition(config.dataset, 0, config.train.seed), tokenizer, config.train, config.dataset, 0
    )
    adapter = initial_adapter(config.model, config.train.seed)
    if args.wire:
        from app.wire import decode, encode

        adapter = decode(encode(adapter, args.wire), args.wire)
    history = recorded_losses()
    results: list[dict] = []
    for batch, accumulation in args.shapes:  # written after each shape: a cut-off run keeps what it measured
        r = one_shape(config, tokenizer, data, {k: v.clone() for k, v in adapter.items()}, history, batch, accumulation)
        first = (results or [r])[0]
        r["max-adapter-diff"] = max(
            float((r["adapter"][k] - first["adapter"][k]).abs().max()) for k in first["adapter"]
        )
        r["max-loss-diff"] = max(abs(x - y) for x, y in zip(r["losses"], first["losses"]))
        results.append(r)
        print(
            f"{r['shape']}: {r['seconds']} s, {r['tokens-per-second']} tokens/s, peak {r['peak-gib']} GiB, "
            f"loss diff {r['max-loss-diff']:.2e}, adapter diff {r['max-adapter-diff']:.2e}, losses {r['losses']}",
            flush=True,
        )
        out = {
            "model": config.model.name,
            "quantization": config.model.quantization,
            "seq-length": config.train.seq_length,
            "steps": config.train.max_steps,
            "lora-dropout": config.model.lora.dropout,
            "wire": args.wire or "float32 (not through the wire)",
            "attention": config.model.attention,
            "kernel": args.kernel or "none",
            "compiled": config.model.compile,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "shapes": [{k: v for k, v in x.items() if k != "adapter"} for x in results],
        }
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
