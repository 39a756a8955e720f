"""The per-round breakdown of the side-by-side benchmark as one PNG chart.

Each bar is one mode's median over its measured rounds (round 1, the warm-up, left out),
split into what the round spent its time on. Seed mode's parts come from
bench/seed_mode.py, ours from bench/round_bench.py; both JSON files carry the per-round
split, so the chart is redrawn from committed results alone.

    python bench/round_time/plot_rounds.py bench/round_time --out bench/round_time/round_breakdown.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PARTS = ("start-up", "training", "aggregation", "exchange")
COLOURS = {"start-up": "#9e9e9e", "training": "#1f77b4", "aggregation": "#d62728", "exchange": "#ff7f0e"}
# (label, file, run): seed-mode files have no runs.
BARS = (
    ("seed mode\nFedAvg", "seed-fedavg.json", None),
    ("seed mode\nFlexLoRA", "seed-flexlora.json", None),
    ("warm trainers\nFedAvg", "warm-1gpu.json", "fedavg"),
    ("warm trainers\nFlexLoRA", "warm-1gpu.json", "flexlora"),
    ("warm trainers\nFedAvg, 2 GPUs", "warm-2gpu.json", "fedavg"),
)


def seed_parts(rounds: list[dict]) -> dict[str, float]:
    """Seed mode rebuilds each client's model: that is its start-up; `other` is its exchange."""
    keys = {"start-up": "startup", "training": "training", "aggregation": "aggregation", "exchange": "other"}
    return {part: statistics.median(r["split"][key] for r in rounds[1:]) for part, key in keys.items()}


def our_parts(rounds: list[dict]) -> dict[str, float]:
    keys = {"start-up": "client-start", "training": "training", "aggregation": "aggregation", "exchange": "exchange"}
    return {part: statistics.median(r[key] for r in rounds[1:]) for part, key in keys.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="Median round, random Gemma2-9B shapes, 2 of 20 nodes a round (NVIDIA H200)")
    args = ap.parse_args()

    labels, rows = [], []
    for label, name, run in BARS:
        data = json.loads((args.folder / name).read_text())
        rows.append(seed_parts(data["rounds"]) if run is None else our_parts(data["runs"][run]["rounds"]))
        labels.append(label)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    bottoms = [0.0] * len(rows)
    for part in PARTS:
        values = [row[part] for row in rows]
        ax.bar(labels, values, bottom=bottoms, label=part, color=COLOURS[part])
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for x, total in enumerate(bottoms):
        ax.text(x, total + 1, f"{total:.1f} s", ha="center")
    ax.set_ylabel("seconds per round (median of rounds 2-4)")
    ax.set_title(args.title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
