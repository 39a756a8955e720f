"""FlexLoRA's two singular-value splits against FedAvg, on a task the tiny model really learns.

Why: `app.aggregation.flexlora` puts all of S into B ("reference": the FlexLoRA code's and the
FlowerTune benchmark's) or sqrt(S) into each factor ("balanced"). B A is the same, but the next
round's Adam starts from the factors, so the split changes what is learned. This runs an
in-process federation on the production code (AppConfig from the pyproject defaults,
load_partition with IidPartitioner over 20 partitions, tokenize_partition, initial_adapter,
build_model once, train_round, fedavg / flexlora) on Alpaca rows whose output follows from the
instruction (classify / judge the length of the last word, count the words), and tracks the
global adapter's response loss on held-out rows (unseen instructions) after every round.
The demo model's tied embedding is scaled x10 (`scaled_copy`): as built, its logits are capped near
1.3 and q,v LoRA stalled at 5.8 nats from 6.3 (on a similar task). Run from the repo root (about 5 minutes on 2 cores):

    .venv/bin/python bench/flexlora_split/flexlora_split.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse  # noqa: E401
import contextlib
import io
import json
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from peft import set_peft_model_state_dict  # noqa: E402
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Gemma2ForCausalLM  # noqa: E402

from app.aggregation import fedavg, flexlora  # noqa: E402
from app.config import AppConfig  # noqa: E402
from app.dataset import IGNORE_INDEX, load_partition, tokenize_example, tokenize_partition  # noqa: E402
from app.models import build_model, initial_adapter, load_tokenizer  # noqa: E402
from app.train import train_round  # noqa: E402
from deploy.demo import WORDS, build_demo  # noqa: E402
from deploy.project import default_run_config  # noqa: E402

METHODS = ("fedavg", "flexlora-reference", "flexlora-balanced")
KINDS = ("a place", "a thing", "a season", "a person")
KIND = {w: KINDS[i % 4] for i, w in enumerate(WORDS)}  # a fixed, arbitrary word -> class map
NUMBERS = ("two", "three", "four", "five")
TASKS = {  # instruction head -> output from 2-5 random words: a lookup, a property, a count
    "Classify the last word:": lambda ws: f"It is {KIND[ws[-1]]}.",
    "Is the last word long:": lambda ws: "Yes, it is long." if len(ws[-1]) > 5 else "No, it is short.",
    "Count the words:": lambda ws: f"There are {NUMBERS[len(ws) - 2]} words.",
}


def learnable_rows(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < count:
        task, words = rng.choice(list(TASKS)), rng.sample(WORDS, rng.randint(2, 5))
        instruction = f"{task} {' '.join(words)}"
        if instruction not in seen:
            seen.add(instruction)
            rows.append({"instruction": instruction, "input": "", "output": TASKS[task](words)})
    return rows


def scaled_copy(src: Path, factor: float) -> Path:
    """The demo model with its tied embedding times `factor`. Gemma2's final RMSNorm fixes |h| at
    sqrt(64) = 8, so the demo's rows of norm 0.16 cap every logit near 1.3 nats; x10: ~13."""
    dst = src.with_name(f"{src.name}-embed-x{factor:g}")
    if not (dst / "config.json").is_file():
        model = Gemma2ForCausalLM.from_pretrained(src)
        model.get_input_embeddings().weight.data.mul_(factor)
        model.save_pretrained(dst)
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def eval_loss(model, tokenizer, rows, config: AppConfig, adapter) -> float:
    """Token-weighted response loss of `adapter` on `rows`, model in eval mode."""
    set_peft_model_state_dict(model, adapter)
    model.eval()
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    feats = [
        tokenize_example(r, tokenizer, config.train.seq_length, config.train.learn_eos, config.dataset.append_input)
        for r in rows
    ]
    total, count = 0.0, 0
    for batch in (collate(feats[i : i + 32]) for i in range(0, len(feats), 32)):
        with torch.no_grad():
            logits, labels = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1],
                batch["labels"][:, 1:],
            )
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    (
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4]),
        p.add_argument("--rounds", type=int, default=10),
    )
    p.add_argument("--clients", type=int, default=2, help="partitions per round (production: 0.1 x 20 = 2)")
    p.add_argument("--rows", type=int, default=2000), p.add_argument("--eval-rows", type=int, default=192)
    p.add_argument("--lr-max", type=float, default=1e-2), p.add_argument("--lr-min", type=float, default=1e-4)
    (
        p.add_argument("--steps", type=int, default=50),
        p.add_argument(
            "--batch", type=int, default=8, help="8 x accumulation 1: production's 2 x 4 per optimizer step"
        ),
    )
    p.add_argument("--embed-scale", type=float, default=10.0), p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--assets", type=Path, default=Path("/tmp/flexlora_split_assets"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "flexlora_split")
    args, started = p.parse_args(), time.perf_counter()
    torch.set_num_threads(2), args.assets.mkdir(parents=True, exist_ok=True)
    train_rows = learnable_rows(args.rows, seed=1000)
    data_file = args.assets / "alpaca.json"  # build_demo keeps these rows and trains its tokenizer on them
    if not data_file.is_file() or json.loads(data_file.read_text()) != train_rows:
        data_file.write_text(json.dumps(train_rows))
        for stale in args.assets.glob("tiny-gemma2*"):
            shutil.rmtree(stale)
    assets = build_demo(args.assets)
    held_out = learnable_rows(args.eval_rows, seed=2000, exclude={r["instruction"] for r in train_rows})
    base = {
        **default_run_config(ROOT),
        **assets.run_config(),
        "model.name": str(scaled_copy(assets.model_dir, args.embed_scale)),
        "num-server-rounds": args.rounds,
        "train.learning-rate-max": args.lr_max,
        "train.learning-rate-min": args.lr_min,
        "train.training-arguments.max-steps": args.steps,
        "train.training-arguments.per-device-train-batch-size": args.batch,
        "model.lora.peft-lora-target-modules": args.targets,
    }
    config0 = AppConfig.from_run_config(base)
    tokenizer, model = (
        load_tokenizer(config0.model),
        build_model(config0.model),
    )  # one model for the run, like a warm trainer
    npart, runs, start_loss = config0.dataset.num_partitions, {m: {} for m in args.methods}, {}
    for seed in args.seeds:  # train.seed = seed: partitioning, initial adapter, data order, dropout
        config = AppConfig.from_run_config({**base, "train.seed": seed})
        rng = random.Random(seed)
        schedule = [sorted(rng.sample(range(npart), args.clients)) for _ in range(args.rounds)]  # same for all methods
        loaded = {pid: load_partition(config.dataset, pid, seed) for pid in sorted({p for r in schedule for p in r})}
        parts = {
            pid: (len(rows), tokenize_partition(rows, tokenizer, config.train, config.dataset))
            for pid, rows in loaded.items()
        }
        init = initial_adapter(config.model, seed)
        start_loss[str(seed)] = eval_loss(model, tokenizer, held_out, config, init)
        for method in args.methods:
            adapter, evals, trains = init, [start_loss[str(seed)]], []
            for rnd, sampled in enumerate(schedule, start=1):
                states, losses = [], []
                for pid in sampled:
                    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's per-step log lines
                        state, metrics = train_round(model, tokenizer, parts[pid][1], config, rnd, adapter)
                    states.append(state)
                    losses.append(metrics["train-loss"])
                weights = [parts[pid][0] for pid in sampled]
                adapter = (
                    fedavg(states, weights)
                    if method == "fedavg"
                    else flexlora(states, weights, config.model.lora.r, method[len("flexlora-") :])
                )
                evals.append(eval_loss(model, tokenizer, held_out, config, adapter))
                trains.append(statistics.fmean(losses))
                print(
                    f"seed {seed} {method:18s} round {rnd:2d} {sampled} train {trains[-1]:.3f} "
                    f"eval {evals[-1]:.3f} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            runs[method][str(seed)] = {"partitions": schedule, "eval_loss": evals, "train_loss": trains}

    finals = {m: {seed: r["eval_loss"][-1] for seed, r in by_seed.items()} for m, by_seed in runs.items()}
    summary = {
        m: {
            "final_eval_mean": statistics.fmean(f.values()),
            "final_eval_std": statistics.stdev(f.values()) if len(f) > 1 else 0.0,
            "final_eval_min": min(f.values()),
            "final_eval_max": max(f.values()),
            "finals": list(f.values()),
            **{f"minus_{o}_per_seed": [f[seed] - finals[o][seed] for seed in f] for o in finals if o != m},
        }
        for m, f in finals.items()
    }
    settings = {
        "argv": sys.argv[1:],
        "args": {k: str(v) for k, v in vars(args).items()},
        "model": {
            k: getattr(model.config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
            )
        },
        "tokenizer_vocab": len(tokenizer),
        "train_rows": len(train_rows),
        "eval_rows": len(held_out),
        "partitions": npart,
        "lora": {**vars(config0.model.lora)},
        "seq_length": config0.train.seq_length,
        "grad_accum": config0.train.gradient_accumulation_steps,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started),
        "example_rows": train_rows[:3],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"settings": settings, "start_eval_loss": start_loss, "summary": summary, "runs": runs}, indent=1)
    )
    plot(runs, args.out / "eval_loss.png", settings)
    write_markdown(args.out / "RESULTS.md", summary, start_loss, settings)
    print(json.dumps(summary, indent=1))


def plot(runs, path: Path, s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, by_seed in runs.items():
        for ax, key, x0 in ((axes[0], "eval_loss", 0), (axes[1], "train_loss", 1)):
            curves = list(zip(*(r[key] for r in by_seed.values())))
            xs = range(x0, x0 + len(curves))
            (line,) = ax.plot(xs, [statistics.fmean(c) for c in curves], marker="o", ms=3, label=method)
            ax.fill_between(xs, [min(c) for c in curves], [max(c) for c in curves], alpha=0.2, color=line.get_color())
    axes[0].set_title("held-out response loss of the global adapter (round 0: initial)")
    axes[1].set_title("mean client train loss in the round")
    for ax in axes:
        (
            ax.set(xlabel="round", ylabel="loss (nats/token, log scale)", yscale="log"),
            ax.grid(alpha=0.3, which="both"),
            ax.legend(),
        )
    fig.suptitle(
        f"tiny Gemma2, LoRA r={s['lora']['r']} on {','.join(s['lora']['target_modules'])}, {s['args']['clients']} "
        f"clients/round, seeds {s['args']['seeds']}: mean line, min-max band",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_markdown(path: Path, summary, start_loss, s: dict) -> None:
    """Regenerates everything but a hand-written "## Interpretation" section, which is kept."""
    kept = re.search(r"^## Interpretation\n.*", path.read_text() if path.is_file() else "", re.S | re.M)
    a, start = s["args"], statistics.fmean(start_loss.values())
    lines = [
        "# FlexLoRA split (reference vs balanced) against FedAvg: tiny model, learnable task",
        "",
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} at commit {_commit()}.",
        "",
        f"Command, from the repo root ({s['seconds']} s on the 2-core CPU development machine):",
        "",
        f"    .venv/bin/python bench/flexlora_split/flexlora_split.py {' '.join(s['argv'])}",
        "",
        "![eval loss per round](eval_loss.png)",
        "",
        "| method | final held-out loss, mean ± std | min - max over seeds "
        "| minus FedAvg, paired: mean (seeds < 0) | start loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m, r in summary.items():
        d = r.get("minus_fedavg_per_seed")
        paired = f"{statistics.fmean(d):+.3f} ({sum(x < 0 for x in d)} of {len(d)})" if d else "-"
        lines.append(
            f"| {m} | {r['final_eval_mean']:.3f} ± {r['final_eval_std']:.3f} | {r['final_eval_min']:.3f} - "
            f"{r['final_eval_max']:.3f} | {paired} | {start:.3f} |"
        )
    lines += [
        "",
        "## Conditions",
        "",
        f"- Model: `deploy/demo.py`'s tiny random Gemma2 ({s['model']}), tied embedding scaled x{a['embed_scale']} "
        f"(`scaled_copy`), float32, torch {s['torch']} on the CPU, {s['torch_threads']} threads. Tokenizer: the demo's "
        f"Gemma-like BPE, {s['tokenizer_vocab']} tokens, trained on the training rows.",
        f"- Data: {s['train_rows']} generated Alpaca rows ({', '.join(TASKS)}; 2-5 of the demo's 24 words), "
        f"IidPartitioner over {s['partitions']} partitions; held-out: {s['eval_rows']} rows of the same tasks with "
        f"instructions not in training. Example: `{s['example_rows'][0]}`.",
        f"- Federation: seeds {a['seeds']} (train.seed = seed), {a['rounds']} rounds, "
        f"{a['clients']} of {s['partitions']} "
        "partitions per round drawn by random.Random(seed), the same draws for every method; weights = partition rows.",
        f"- Training (app.train.train_round): LoRA r={s['lora']['r']} alpha={s['lora']['alpha']} "
        f"dropout={s['lora']['dropout']} "
        f"on {','.join(s['lora']['target_modules'])}; {a['steps']} steps x batch {a['batch']} "
        f"x accumulation {s['grad_accum']}, "
        f"seq-length {s['seq_length']}; lr cosine over rounds {a['lr_max']} -> {a['lr_min']}, "
        "constant in a round, fresh AdamW.",
        "- Loss: token-weighted cross-entropy on the response tokens (labels as tokenize_partition makes them) of the "
        "aggregated adapter, model in eval mode. `results.json`: every method, seed and round.",
        "",
    ]
    path.write_text("\n".join(lines) + "\n" + (kept.group(0) if kept else "## Interpretation\n\n(to be written)\n"))


if __name__ == "__main__":
    main()
