"""A Gemma2-9B-shaped model with random weights, built on the GPU in bf16 and saved as safetensors.

Device command (inside bench/gpu_common.sh's gemma2_host):
    python bench/make_random_gemma2.py --out /var/tmp/gemma2-9b-random --tokenizer .gpu-carry/tokenizer

Shapes are Gemma2-9B's (9.24 B parameters, 42 layers, vocab 256000); the tokenizer is the
tiny demo one (its ids < 400 are a subset of the 256000-row vocabulary), copied next to
config.json so `AutoTokenizer.from_pretrained(model dir)` finds it, as the app expects.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig


def gemma2_9b_config(pad: int, eos: int, bos: int) -> Gemma2Config:
    return Gemma2Config(
        vocab_size=256000,
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        tie_word_embeddings=True,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=bos,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json + tokenizer_config.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", type=Path, help="write timings here")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny-test", action="store_true", help="2 layers, small widths: checks the script on a CPU")
    args = ap.parse_args()

    if (args.out / "config.json").is_file() and not args.force:
        print(f"{args.out} exists; reusing it")
        return
    tok_cfg = json.loads((args.tokenizer / "tokenizer_config.json").read_text())
    vocab = json.loads((args.tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    ids = {name: vocab[tok_cfg[f"{name}_token"]] for name in ("pad", "eos", "bos")}
    config = gemma2_9b_config(**ids)
    if args.tiny_test:
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 64, 128
        config.layer_types = config.layer_types[:2]
        config.vocab_size = 512

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        model = Gemma2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config = GenerationConfig(
        cache_implementation="hybrid", bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})

    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    model.save_pretrained(partial)
    save_s = time.perf_counter() - t0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(args.tokenizer / name, partial / name)
    if args.out.exists():
        shutil.rmtree(args.out)
    partial.rename(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    result = {
        "params": n_params,
        "dtypes": dtypes,
        "build_seconds": round(build_s, 2),
        "save_seconds": round(save_s, 2),
        "bytes_on_disk": size,
        "files": sorted(f.name for f in args.out.iterdir()),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
