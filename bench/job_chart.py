r"""A performance table and chart, from one machine's JSON files of one session (README's).

Each --row is `NAME=FILE`: a `bench/seed_mode.py` JSON (the seed's pipeline) or a
`bench/round_bench.py` JSON (our deployment; its first run). A job figure is printed as
measured only where the file measured the whole job (`measured-job-seconds`), else as
extrapolated, and the chart marks it so.

    python bench/job_chart.py --title "1 x H100, DATE" --png bench/round_time/engine_h100/job.png \
        --row "seed's pipeline=seed10.json" --row "ours=job-one-mb8-compiled.json" ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def figures(path: Path) -> dict:
    data = json.loads(path.read_text())
    run = next(iter(data["runs"].values())) if "runs" in data else data
    # A file measures the whole job only where it ran all 10 rounds (seed_mode and round_bench
    # write the figure only then); anything shorter is shown extrapolated.
    job = run.get("measured-job-seconds") if len(run["rounds"]) == 10 else None
    return {
        "round": run["median-round-seconds"],
        "job": job if job is not None else run["extrapolated-10-round-job-seconds"],
        "job-measured": job is not None,
    }


def table(rows: dict[str, dict]) -> str:
    first = next(iter(rows.values()))
    lines = [
        "| | median round (s) | 10-round job (s) | job against the first row |",
        "| --- | --- | --- | --- |",
    ]
    for name, f in rows.items():
        kind = "measured" if f["job-measured"] else "extrapolated"
        lines.append(f"| {name} | {f['round']:.1f} | {f['job']:.0f} ({kind}) | {first['job'] / f['job']:.2f}x |")
    return "\n".join(lines)


def chart(rows: dict[str, dict], title: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.7 * len(names) + 1.6))
    for ax, key, label in ((axes[0], "round", "median round (s)"), (axes[1], "job", "10-round job (s)")):
        values = [rows[n][key] for n in names]
        bars = ax.barh(names, values, color=["#999999", *["#2b6cb0"] * (len(names) - 1)])
        for bar, name in zip(bars, names, strict=True):
            extra = "" if key == "round" else " (measured)" if rows[name]["job-measured"] else " (extrapolated)"
            value = f"{bar.get_width():.1f}" if key == "round" else f"{bar.get_width():.0f}"
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value}{extra}", va="center")
        ax.set_xlabel(label)
        ax.invert_yaxis()
        ax.set_xlim(0, max(values) * 1.9)
    axes[1].set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", action="append", required=True, help="NAME=FILE; the first is the baseline")
    ap.add_argument("--title", required=True)
    ap.add_argument("--png", type=Path, required=True)
    args = ap.parse_args()
    rows = {name: figures(Path(file)) for name, _, file in (r.partition("=") for r in args.row)}
    print(table(rows))
    chart(rows, args.title, args.png)


if __name__ == "__main__":
    main()
