"""`deploy eval`: the command line of the app's MMLU evaluation (app/evaluation.py) for a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from app import evaluation
from deploy.errors import DeployError


def _categories(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names or set(names) - set(evaluation.MMLU_CATEGORY):
        raise DeployError(f"--categories {text!r}: a comma-separated choice of {','.join(evaluation.MMLU_CATEGORY)}")
    return names


def _table(result: dict) -> str:
    lines = ["| category | correct | total | accuracy |", "| --- | --- | --- | --- |"]
    for cat, c in result["counts"].items():
        lines.append(f"| {cat} | {c['correct']} | {c['total']} | {result['scores'][cat]:.4f} |")
    return "\n".join(lines + [f"| average | | | {result['scores']['average']:.4f} |"])


def cmd_eval(args: argparse.Namespace) -> int:
    categories = _categories(args.categories)
    for name in ("limit", "batch_size", "max_new_tokens"):
        if (value := getattr(args, name)) is not None and value < 1:
            raise DeployError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    if args.run is None and not args.base_only:
        raise DeployError("RUN_OR_ADAPTER: required unless --base-only (then with --model)")
    run, adapter, base = evaluation.resolve_target(args.run.resolve()) if args.run else (None, None, None)
    if adapter is None and not args.base_only:
        raise DeployError(f"RUN_OR_ADAPTER {args.run}: a run folder without a round-N adapter yet")
    if not (base := args.model or base):
        raise DeployError("--model: needed, as no run.json or adapter_config.json names the base model")
    questions = evaluation.load_questions(args.data, categories, args.limit)
    adapter = None if args.base_only else adapter
    print(f"MMLU: {len(questions)} questions; base {base}" + (f", adapter {adapter}" if adapter else " alone"))
    model, tokenizer = evaluation.load_model(base, adapter, args.quantization)
    result = evaluation.evaluate(model, tokenizer, questions, args.batch_size, args.max_new_tokens)
    print(_table(result))
    if run is None:
        print("Not recorded: no run folder (run.json) holds this adapter.")
        return 0
    # The newest adapter's full scores are the run's; the base's, an earlier round's or a --limit run's are named so.
    prefix = (
        "base-" if adapter is None else ("" if adapter == evaluation.resolve_target(run)[1] else f"{adapter.name}-")
    )
    prefix += f"limit{args.limit}-" if args.limit else ""
    print(f"Recorded {', '.join(evaluation.store(run, prefix, result))} in {run}/summary.json and summary.md")
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval", help="FlowerTune General NLP score: MMLU accuracy per category, into the run's summary"
    )
    p.add_argument(
        "run",
        metavar="RUN_OR_ADAPTER",
        type=Path,
        nargs="?",
        help="a run folder (its newest round-N adapter) or an adapter folder",
    )
    p.add_argument("--base-only", action="store_true", help="the base model alone, for the reference score")
    p.add_argument("--model", help="base model (default: run.json's model.name or the adapter's base)")
    p.add_argument(
        "--data", help=f"local MMLU files: .json/.jsonl/.parquet, or a folder of them (default: {evaluation.HUB_DATA})"
    )
    p.add_argument(
        "--categories",
        default=",".join(evaluation.DEFAULT_CATEGORIES),
        help=f"some of {', '.join(evaluation.MMLU_CATEGORY)}",
    )
    p.add_argument("--limit", type=int, help="questions per category, for a quick run (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    p.add_argument("--max-new-tokens", type=int, help="(default: the gold letter's tokens, as the reference)")
    p.add_argument(
        "--quantization", type=int, choices=(4, 8, 0), default=4, help="bits; 4: the leaderboard's (default)"
    )
    p.set_defaults(func=cmd_eval)
