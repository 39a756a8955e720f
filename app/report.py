"""A run's report: summary.json, summary.md and PNG plots, made from its metrics.jsonl.

The ServerApp rewrites the summaries after every round, so a run that dies still leaves
one, and draws the plots after the last round; `deploy report` redraws them from the
files alone and puts several runs on one chart (FedAvg against FlexLoRA).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import ConfigError

# The FlowerTune template's communication tracker counts the adapter bytes a run moves
# between server and clients against this budget.
BUDGET_BYTES = 200 * 10**9
SUMMARY_JSON, SUMMARY_MD, SETTINGS_JSON = "summary.json", "summary.md", "run.json"
LOSS_PNG, TIME_PNG = "loss.png", "round_time.png"
METRICS_JSONL = "metrics.jsonl"
RESUME_JSON = "resume.json"  # written after each round: what a resume starts from
# What `round_rows` reads of a line: a line without one of them is not a round's record.
ROUND_KEYS = (
    "round",
    "clients",
    "rejected",
    "failed",
    "aggregate",
    "aggregate-seconds",
    "checkpoint",
    "checkpoint-seconds",
    "elapsed-seconds",
)


class DamagedRunFolder(ConfigError):
    """A run folder's metrics file is damaged where no crash leaves it: a ConfigError, so that
    `deploy` and the ServerApp refuse it in their one line, which names the file and the line."""


@dataclass(frozen=True)
class Metrics:
    """A run's round records, and the one line that says a cut last line was left out."""

    rounds: list[dict[str, Any]]
    dropped: str | None = None


def read_metrics(run_dir: Path) -> Metrics:
    """The rounds of `metrics.jsonl`, which every reader of the file goes through.

    The file is appended a whole line per round, so a crash or a full disk can only cut its
    last line: that line is left out and `dropped` says so (what the round's durable state
    holds decides whether a resumed run trains it again). A line without its newline counts
    as cut even if its JSON is whole, since the crash came before the round's state was saved.
    Anything else no crash makes, a bad line before the last or a JSON line that is not a
    round's record, raises `DamagedRunFolder` naming the file and the line.
    """
    path = run_dir / METRICS_JSONL
    if not path.is_file():
        return Metrics([])
    *lines, cut = path.read_bytes().split(b"\n")  # `cut`: what follows the last newline, b"" when whole
    rounds = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if number == len(lines) and not cut.strip():
                cut = line + b"\n"
                break
            reason = getattr(err, "msg", type(err).__name__)
            raise DamagedRunFolder(
                f"{path}:{number}: not a JSON line ({reason}), and only the last line can be cut by a crash; "
                f"repair or delete line {number}"
            ) from None
        problem = _not_a_round(record)
        if problem:
            raise DamagedRunFolder(f"{path}:{number}: {problem}; repair or delete line {number}")
        rounds.append(record)
    if not cut.strip():
        return Metrics(rounds)
    after = f"after round {rounds[-1]['round']}" if rounds else "before any whole round"
    return Metrics(
        rounds,
        f"{path}: dropped a cut last line ({len(cut)} bytes) {after}; "
        "that round's durable state decides whether it is trained again",
    )


def _not_a_round(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a round's record"
    missing = [key for key in ROUND_KEYS if key not in record]
    if missing:
        return f"JSON but not a round's record (no {', '.join(repr(k) for k in missing[:3])})"
    if not isinstance(record["round"], int) or isinstance(record["round"], bool):
        return f"'round' is {record['round']!r}, not a round number"
    return None


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir).rounds


def round_rows(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each round's time split: the slowest client's training, aggregation with its
    checkpoint, and the rest (Flower's exchange, client start-up)."""
    rows, previous = [], 0.0
    for r in rounds:
        seconds = r["elapsed-seconds"] - previous
        previous = r["elapsed-seconds"]
        clients = r["clients"]
        training = max((c["train-seconds"] for c in clients), default=0.0)
        aggregation = r["aggregate-seconds"] + r["checkpoint-seconds"]
        rows.append(
            {
                "round": r["round"],
                "seconds": round(seconds, 2),
                "training": round(training, 2),
                "aggregation": round(aggregation, 3),
                "other": round(max(seconds - training - aggregation, 0.0), 2),
                "loss": r["aggregate"].get("train-loss"),
                "clients": [
                    {
                        "node-id": c["node-id"],
                        "partition-id": c.get("partition-id"),
                        "gpu": c.get("gpu", -1),
                        "loss": c["train-loss"],
                        "seconds": round(c["train-seconds"], 2),
                        "tokens": c["train-tokens"],
                        "bytes-to-client": c.get("bytes-to-client", 0),
                        "bytes-from-client": c.get("bytes-from-client", 0),
                        # the handler's whole time, and what of it waited for a free trainer
                        "client-seconds": round(c.get("client-seconds", c["train-seconds"]), 2),
                        "queue-seconds": round(c.get("queue-seconds", 0.0), 2),
                        "trainer-overflow": bool(c.get("trainer-overflow", False)),
                        "peak-gpu-bytes": c.get("peak-gpu-bytes", 0),
                        "rows-without-label": c.get("rows-without-label", 0),
                    }
                    for c in clients
                ],
                "bytes-to-clients": sum(c.get("bytes-to-client", 0) for c in clients),
                "bytes-from-clients": sum(c.get("bytes-from-client", 0) for c in clients),
                "rejected": len(r["rejected"]),
                "failed": len(r["failed"]),
                "checkpoint": r["checkpoint"],
            }
        )
    return rows


def summarize(run_dir: Path) -> dict[str, Any]:
    settings_file = run_dir / SETTINGS_JSON
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    rounds = read_rounds(run_dir)
    rows = round_rows(rounds)
    clients = [c for r in rows for c in r["clients"]]
    to_clients = sum(r["bytes-to-clients"] for r in rows)
    from_clients = sum(r["bytes-from-clients"] for r in rows)
    earlier = run_dir / SUMMARY_JSON
    evaluation = json.loads(earlier.read_text()).get("evaluation", {}) if earlier.is_file() else {}
    return {
        "run": run_dir.name,
        "settings": settings,
        "rounds-completed": len(rows),
        "rounds-planned": settings.get("strategy", {}).get("num_rounds"),
        "seconds-total": round(sum(r["seconds"] for r in rows), 2),
        "seconds": {part: round(sum(r[part] for r in rows), 2) for part in ("training", "aggregation", "other")},
        "final-loss": rows[-1]["loss"] if rows else None,
        "bytes": {
            "to-clients": to_clients,
            "from-clients": from_clients,
            "total": to_clients + from_clients,
            "per-client-round-to-client": round(to_clients / len(clients)) if clients else 0,
            "per-client-round-from-client": round(from_clients / len(clients)) if clients else 0,
            "budget": BUDGET_BYTES,
            "share-of-budget": (to_clients + from_clients) / BUDGET_BYTES,
        },
        # Rows a node's partition has with nothing to learn (`app.dataset.tokenize_partition`),
        # as each partition last reported them.
        "rows-without-label": {
            str(c["partition-id"]): c["rows-without-label"] for c in clients if c["rows-without-label"]
        },
        # Each node that failed a round (a host lost, a node that died), named: the run went on without it.
        "nodes-failed": [{"round": r["round"], **f} for r in rounds for f in r["failed"]],
        # Scores that `deploy eval` added to an earlier summary survive a rewrite.
        "evaluation": evaluation,
        "rounds": rows,
    }


def markdown(summary: dict[str, Any]) -> str:
    b, s = summary["bytes"], summary["seconds"]
    model = summary["settings"].get("model", {})
    strategy = summary["settings"].get("strategy", {})
    lines = [
        f"# Run {summary['run']}",
        "",
        f"- model: `{model.get('name', '?')}`, aggregation: {'FlexLoRA' if strategy.get('use_flexlora') else 'FedAvg'}",
        "- leaderboard settings: "
        + (
            "pinned"
            if summary["settings"].get("leaderboard", True)
            else "**off** (leaderboard=false: not comparable with the FlowerTune leaderboard)"
        ),
        f"- rounds: {summary['rounds-completed']} of {summary['rounds-planned']}, final aggregate loss: "
        + (f"{summary['final-loss']:.4f}" if summary["final-loss"] is not None else "none"),
        f"- time: {summary['seconds-total']:.1f} s = training {s['training']:.1f} + aggregation and checkpoints "
        f"{s['aggregation']:.1f} + other {s['other']:.1f} (exchange, client start-up)",
        f"- communication: {_size(b['total'])} in total ({_size(b['to-clients'])} to clients, "
        f"{_size(b['from-clients'])} from clients; {_size(b['per-client-round-to-client'])} down and "
        f"{_size(b['per-client-round-from-client'])} up "
        f"per client and round), {100 * b['share-of-budget']:.5f} % of the FlowerTune budget of {_size(b['budget'])}",
        "",
    ]
    if summary["rows-without-label"]:
        counts = ", ".join(f"partition {p}: {n}" for p, n in summary["rows-without-label"].items())
        lines[-1:-1] = [f"- rows with nothing to learn, left out of training: {counts}"]
    if summary["nodes-failed"]:
        failed = "; ".join(_failure(f) for f in summary["nodes-failed"])
        lines[-1:-1] = [f"- nodes that failed, left out of their round: {failed}"]
    if summary["evaluation"]:
        lines += ["| evaluation | accuracy |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4f} |" for name, value in summary["evaluation"].items()] + [""]
    lines += [
        "| round | seconds | training | aggregation | other | loss | clients (partition: loss, s) | bytes down / up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["rounds"]:
        clients = "; ".join(f"{c['partition-id']}: {c['loss']:.3f}, {c['seconds']:.1f} s" for c in r["clients"])
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "kept"
        lines.append(
            f"| {r['round']} | {r['seconds']:.1f} | {r['training']:.1f} | {r['aggregation']:.2f} | {r['other']:.1f} "
            f"| {loss} | {clients or 'none'} | {r['bytes-to-clients']:,} / {r['bytes-from-clients']:,} |"
        )
    return "\n".join(lines) + "\n"


def _failure(failed: dict[str, Any]) -> str:
    """A node that never replied has no known partition; Flower's reason keeps its first clause."""
    partition = "?" if failed["partition-id"] is None else failed["partition-id"]
    reason = failed["reason"].split(" — ")[0].removeprefix("Error: ")
    return f"round {failed['round']}: node {failed['node-id']} (partition {partition}, {reason})"


def write_summary(run_dir: Path) -> dict[str, Any]:
    summary = summarize(run_dir)
    (run_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=1))
    (run_dir / SUMMARY_MD).write_text(markdown(summary))
    return summary


def write_plots(run_dirs: Sequence[Path], out_dir: Path) -> list[Path]:
    """Loss per round (the aggregate, and each client's for a single run) and the round-time
    breakdown (stacked for one run, total per round for several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(d.name, round_rows(read_rounds(d))) for d in run_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in runs:
        done = [r for r in rows if r["loss"] is not None]
        ax.plot([r["round"] for r in done], [r["loss"] for r in done], marker="o", label=f"{name} (aggregate)")
        if len(runs) == 1:
            points = [(r["round"], c["loss"]) for r in rows for c in r["clients"]]
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, color="grey", label="clients")
    _save(fig, ax, "training loss", out_dir / LOSS_PNG)

    fig, ax = plt.subplots(figsize=(7, 4))
    if len(runs) == 1:
        rows = runs[0][1]
        bottom = [0.0] * len(rows)
        for part in ("training", "aggregation", "other"):
            values = [r[part] for r in rows]
            ax.bar([r["round"] for r in rows], values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
    else:
        for name, rows in runs:
            ax.plot([r["round"] for r in rows], [r["seconds"] for r in rows], marker="o", label=name)
    _save(fig, ax, "seconds", out_dir / TIME_PNG)
    return [out_dir / LOSS_PNG, out_dir / TIME_PNG]


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _on_gpu(gpu: int) -> str:
    return f" on GPU {gpu}" if gpu >= 0 else ""


def _save(fig: Any, ax: Any, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_line(summary: dict[str, Any]) -> str:
    """One plain line per round for the ServerApp's log, which `deploy run`, the `submit`
    service and `deploy logs serverapp` all show."""
    row = summary["rounds"][-1]
    done, planned = summary["rounds-completed"], summary["rounds-planned"] or summary["rounds-completed"]
    elapsed = summary["seconds-total"]
    eta = elapsed / done * (planned - done)
    clients = (
        "; ".join(
            f"partition {c['partition-id']}{_on_gpu(c['gpu'])}: loss {c['loss']:.4f} in {c['seconds']:.1f} s"
            for c in row["clients"]
        )
        or "no update"
    )
    loss = f"{row['loss']:.4f}" if row["loss"] is not None else "adapter kept"
    return (
        f"round {done}/{planned}: {clients}; aggregate loss {loss}; {row['seconds']:.1f} s, elapsed {elapsed:.0f} s, "
        f"ETA {eta:.0f} s; {_size(row['bytes-to-clients'])} sent, {_size(row['bytes-from-clients'])} received"
    )
