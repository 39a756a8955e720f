"""Issue 15's scaling figures from bench/scale/scaling.sh's JSON files: a Markdown table and
a PNG (median round time against GPUs, one line per fraction, with ideal linear scaling).

    python bench/scale/scaling_table.py bench/scale
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (GPUs, fraction, file, call and company): the deployments the table reports. Not in it:
# gpu1-f0.5.json (6 trainers, checkpointing on: scaling.sh C says why) and
# gpu2-f0.1.json (beside two other deployments; D reran it alone).
RUNS = (
    (1, 0.1, "gpu1-f0.1", "A, beside 2 deployments"),
    (2, 0.1, "gpu2-f0.1-alone", "D, alone"),
    (4, 0.1, "gpu4-f0.1", "B, alone"),
    (1, 0.5, "gpu1-f0.5-alone", "C, alone"),
    (2, 0.5, "gpu2-f0.5", "A, beside 2 deployments"),
    (4, 0.5, "gpu4-f0.5", "B, alone"),
)


def row(folder: Path, gpus: int, fraction: float, name: str, call: str) -> dict:
    data = json.loads((folder / f"{name}.json").read_text())
    (run,) = data["runs"].values()
    measured = run["rounds"][1:]
    return {
        "gpus": gpus,
        "fraction": fraction,
        "file": name,
        "call": call,
        "trainers": data["trainers-per-gpu"],
        "round": run["median-round-seconds"],
        "rounds": [r["seconds"] for r in measured],
        "training": run["median-training-seconds"],
        "client-start": statistics.median(r["client-start"] for r in measured),
        "aggregation": statistics.median(r["aggregation"] for r in measured),
        "exchange": statistics.median(r["exchange"] for r in measured),
        "queued": f"{run['queued-clients']}/{run['clients-measured']}",
        "borrowed": run["overflow-clients"],
        "peak-gib": max(run["peak-gpu-mib"].values()) / 1024,
        "startup": data["startup-seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    folder = ap.parse_args().folder
    rows = [row(folder, *spec) for spec in RUNS]
    base = {r["fraction"]: r["round"] for r in rows if r["gpus"] == 1}
    lines = [
        "| GPUs | fraction (nodes a round) | trainers per GPU | median round, s (rounds 2-4) | training "
        "| client start (incl. queueing) "
        "| aggregation | exchange | speed-up | efficiency | clients queued for a trainer "
        "| borrowed another GPU's trainer "
        "| peak memory per GPU, GiB | start-up, s | call |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        speed = base[r["fraction"]] / r["round"]
        lines.append(
            f"| {r['gpus']} | {r['fraction']} ({int(r['fraction'] * 20)}) | {r['trainers']} | {r['round']:.1f} "
            f"({', '.join(f'{s:.1f}' for s in r['rounds'])}) | {r['training']:.1f} | {r['client-start']:.1f} "
            f"| {r['aggregation']:.2f} | {r['exchange']:.1f} | {speed:.2f}x | {speed / r['gpus']:.2f} | {r['queued']} "
            f"| {r['borrowed']} | {r['peak-gib']:.1f} | {r['startup']:.1f} | {r['call']} |"
        )
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, ax = plt.subplots(figsize=(6, 4))
    for fraction, colour in ((0.1, "#1f77b4"), (0.5, "#d62728")):
        points = [(r["gpus"], r["round"]) for r in rows if r["fraction"] == fraction]
        ax.plot(*zip(*points), "o-", color=colour, label=f"fraction {fraction} ({int(fraction * 20)} nodes a round)")
        ax.plot(
            [g for g, _ in points],
            [base[fraction] / g for g, _ in points],
            ":",
            color=colour,
            label="linear from 1 GPU",
        )
    ax.set_xticks([1, 2, 4])
    ax.set_xlabel("GPUs (H200, one host)")
    ax.set_ylabel("median round, s")
    ax.set_title("20 nodes, Gemma2-9B shapes, FP4 QLoRA (measured)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "round_time_by_gpus.png", dpi=120)


if __name__ == "__main__":
    main()
