"""Lever 6 of issue 24: the loss of each run's saved global adapter on the same fixed rows.

Why: the runs of wire_loss.sh sample their nodes at random (Flower's sampling is not seeded),
so the clients' own train-loss compares different partitions. Every run's round-0 and
final adapters are scored here on all the rows of all 20 partitions, so the wire's effect
and the seed-to-seed spread are measured on one yardstick; round 0's loss says how far
10 rounds moved the model at all.

    .venv/bin/python bench/round_levers/wire_loss_eval.py --model .demo/tiny-gemma2 --data .demo/alpaca.json \
        --json OUT.json /tmp/wire-loss/*-seed*
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from microbatch import run_config  # noqa: E402  (this folder)

CPU = "model.quantization=0 train.seq-length=128"


def mean_loss(model, rows, batch: int = 16) -> float:
    """Token-weighted cross-entropy over the response tokens, as training weighs them."""
    import torch

    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in chunk])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in chunk])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total += float(losses)
        count += int((target != -100).sum())
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="round_bench.py workdirs (LABEL folders)")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from app.config import AppConfig
    from app.dataset import load_partition, tokenize_partition
    from app.models import build_model, load_tokenizer

    # the runs' CPU settings (wire_loss.sh): no quantization, seq-length 128
    cpu = argparse.Namespace(model=args.model, data=args.data, steps=10, run_config=CPU)
    config = AppConfig.from_run_config(run_config(cpu))
    tokenizer = load_tokenizer(config.model)
    rows = [
        row
        for pid in range(config.dataset.num_partitions)
        for row in tokenize_partition(
            load_partition(config.dataset, pid, config.train.seed), tokenizer, config.train, config.dataset, pid
        )
    ]
    model = build_model(config.model)
    model.eval()
    out = {"rows": len(rows), "model": str(args.model), "runs": {}}
    for run in args.runs:
        scores = {}
        for name in ("round-0", "round-10"):
            (adapter,) = run.glob(f"results-*/*/{name}/adapter_model.safetensors")
            set_peft_model_state_dict(model, load_file(adapter))
            scores[name] = round(mean_loss(model, rows), 6)
        out["runs"][run.name] = scores
        print(run.name, scores, flush=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
