"""Summarise a run's results folder (metrics.jsonl + checkpoints) for the GPU smoke report.

    python bench/summarize_smoke.py results/<run folder> [--json out.json]

Per client: peak GPU memory (torch max_memory_allocated, GiB), tokens/s = train-tokens /
train-seconds. Per round: seconds (delta of elapsed-seconds; round 1 counts from the
ServerApp's start, so it includes the first ClientApps' start-up), and the round's
overhead = round seconds - slowest client's train-seconds (process start, imports, data,
model load + quantize, adapter exchange, aggregation). Checkpoints: which round-N folders
exist and whether their adapter files load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 2**30


def summarize(run_dir: Path) -> dict:
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out_rounds = []
    previous = 0.0
    for r in rounds:
        seconds = r["elapsed-seconds"] - previous
        previous = r["elapsed-seconds"]
        clients = [
            {
                "partition-id": c.get("partition-id"),
                "num-examples": c.get("num-examples"),
                "train-loss": round(float(c["train-loss"]), 4),
                "train-seconds": round(float(c["train-seconds"]), 2),
                "train-tokens": int(c["train-tokens"]),
                "tokens-per-second": round(float(c["train-tokens"]) / float(c["train-seconds"]), 1),
                "peak-gpu-gib": round(float(c["peak-gpu-bytes"]) / GIB, 2),
            }
            for c in r.get("clients", [])
        ]
        slowest = max((c["train-seconds"] for c in clients), default=0.0)
        out_rounds.append(
            {
                "round": r["round"],
                "aggregation": r.get("aggregation"),
                "round-seconds": round(seconds, 2),
                "overhead-seconds": round(seconds - slowest, 2),
                "clients": clients,
                "rejected": r.get("rejected"),
                "failed": r.get("failed"),
                "checkpoint": r.get("checkpoint"),
            }
        )
    checkpoints = {}
    for folder in sorted(run_dir.glob("round-*")):
        files = sorted(f.name for f in folder.iterdir())
        entry = {"files": files}
        weights = folder / "adapter_model.safetensors"
        if weights.is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(weights), "pt") as f:
                    keys = list(f.keys())
                entry["tensors"] = len(keys)
                entry["bytes"] = weights.stat().st_size
            except Exception as err:  # noqa: BLE001 - report, do not fail the summary
                entry["error"] = repr(err)
        checkpoints[folder.name] = entry
    return {"run_dir": str(run_dir), "rounds": out_rounds, "checkpoints": checkpoints}


def table(summary: dict) -> str:
    lines = [f"{'round':>5} {'part':>4} {'peak GiB':>8} {'tokens':>7} {'train s':>8} {'tok/s':>7} {'loss':>7}"]
    for r in summary["rounds"]:
        for c in r["clients"]:
            lines.append(
                f"{r['round']:>5} {c['partition-id']:>4} {c['peak-gpu-gib']:>8.2f} {c['train-tokens']:>7} "
                f"{c['train-seconds']:>8.2f} {c['tokens-per-second']:>7.1f} {c['train-loss']:>7.3f}"
            )
        lines.append(
            f"round {r['round']}: {r['round-seconds']:.1f} s (overhead beyond slowest client's training "
            f"{r['overhead-seconds']:.1f} s); rejected {len(r['rejected'] or [])}, failed {len(r['failed'] or [])}, "
            f"checkpoint {r['checkpoint']}"
        )
    for name, entry in summary["checkpoints"].items():
        lines.append(f"{name}: {entry}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, nargs="?", help="default: newest folder under results/")
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    run_dir = args.run_dir
    if run_dir is None:
        runs = sorted((p for p in args.results.glob("*") if (p / "metrics.jsonl").is_file()), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise SystemExit(f"no run with a metrics.jsonl under {args.results}")
        run_dir = runs[-1]
    summary = summarize(run_dir)
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
