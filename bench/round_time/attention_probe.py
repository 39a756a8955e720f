r"""One client's round with a given attention kernel and 4-bit kind: per-step losses, tokens/s, peak memory.

The deployments in bench/round_time/side_by_side.sh D measure speed in the mode that runs (two
trainers per GPU), but their sampled partitions differ from run to run, so their losses
cannot show that flex_attention computes what eager does. This probe trains one fixed
partition from the same initial adapter with the production code (`app.models.build_model`,
`app.train.build_trainer`), so two calls differ only in the setting under test.

    python bench/round_time/attention_probe.py --model DIR --data FILE \
        --run-config "model.attention='flex_attention'" --json OUT.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from flwr.common.config import parse_config_args  # noqa: E402
from peft import set_peft_model_state_dict  # noqa: E402

from app.config import AppConfig  # noqa: E402
from app.dataset import load_partition, tokenize_partition  # noqa: E402
from app.models import build_model, initial_adapter, load_tokenizer  # noqa: E402
from app.train import build_trainer, cosine_learning_rate  # noqa: E402
from deploy.project import default_run_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--run-config", default="", help="the settings under test, 'key=value ...'")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    overrides = {"model.name": args.model, "dataset.data-files": args.data, "model.gradient-checkpointing": False}
    overrides.update(parse_config_args([args.run_config]) if args.run_config else {})
    if not torch.cuda.is_available():
        overrides["model.quantization"] = 0
    config = AppConfig.from_run_config({**default_run_config(ROOT), **overrides})
    tokenizer = load_tokenizer(config.model)
    data = tokenize_partition(
        load_partition(config.dataset, args.partition, config.train.seed), tokenizer, config.train, config.dataset
    )
    start = time.perf_counter()
    model = build_model(config.model)
    load_seconds = time.perf_counter() - start
    set_peft_model_state_dict(model, initial_adapter(config.model, config.train.seed))
    rate = cosine_learning_rate(
        1, config.strategy.num_rounds, config.train.learning_rate_max, config.train.learning_rate_min
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(model, tokenizer, data, config.train, rate, 1, scratch)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    result = {
        "settings": args.run_config,
        "model": dataclasses.asdict(config.model),
        "partition": args.partition,
        "rows": len(data),
        "load-seconds": round(load_seconds, 2),
        "train-seconds": round(seconds, 2),
        "tokens": int(trainer.state.num_input_tokens_seen),
        "tokens-per-second": round(trainer.state.num_input_tokens_seen / seconds, 1),
        "peak-allocated-gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0,
        "step-losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "model"}))


if __name__ == "__main__":
    main()
