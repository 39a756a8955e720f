r"""Where a round's seconds go outside training, from Flower's own log timestamps.

Run the deployment with `FLWR_LOG_LEVEL=DEBUG` (Flower then stamps every line) and point
this at its logs folder (`superlink.log`, `supernode-*.log`). Per round it prints, in
seconds after the ServerApp pushed the round's messages, when each sampled SuperNode pulled
its message, had it whole, started `flwr-clientapp`, loaded our ClientApp, finished the
handler ("trained on"), began sending and was done; and when the ServerApp pushed the next
round. The gaps are Flower's: the SuperNode's pull interval, the SuperExec's task poll and
the ClientApp process's imports, the reply's poll and transfer.

    FLWR_LOG_LEVEL=DEBUG python bench/round_bench.py ... --workdir W --label L
    python bench/round_timeline.py W/L/logs --json timeline.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROUND = re.compile(r"partition \d+, round (\d+): trained")
RUN = re.compile(r"Requesting `Run` for run_id=(\d+)")
# A SuperNode's events in the order they happen in a round, and the text that marks each.
EVENTS = {
    "pulled": "Receiving: train message",
    "received": "Received successfully",
    "clientapp-started": "Start `flwr-clientapp` process",
    "app-loaded": "Loading ClientApp",
    "handler-done": "trained on warm trainer",
    "sending": "Sending: train message",
    "sent": "Sent successfully",
}


def stamped(path: Path):
    for line in path.read_text(errors="replace").splitlines():
        line = ANSI.sub("", line)
        if m := STAMP.search(line):
            yield datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), line


def node_events(path: Path) -> dict[int, dict[str, float]]:
    """Round -> event -> time, for one SuperNode: each message's lines run from its pull to
    its reply's send, and our ClientApp's own line among them names the round."""
    rounds: dict[int, dict[str, float]] = {}
    block: dict[str, float] = {}
    for t, line in stamped(path):
        if EVENTS["pulled"] in line:
            block = {}
        if m := ROUND.search(line):
            rounds[int(m.group(1))] = block
        for name, text in EVENTS.items():
            if text in line:
                block.setdefault(name, t)
    return rounds


def timeline(logs: Path) -> list[dict]:
    superlink = list(stamped(logs / "superlink.log"))
    # Rounds are told apart by number: the rounds of two runs would merge.
    runs = {m.group(1) for _, line in superlink if (m := RUN.search(line))}
    if len(runs) > 1:
        raise SystemExit(f"{logs}: {len(runs)} runs in these logs; give the logs of a deployment that served one")
    pushes = [t for t, line in superlink if "Runtime.PushMessages" in line]
    per_round: dict[int, dict[str, dict[str, float]]] = {}
    for path in sorted(logs.glob("supernode-*.log")):
        for rnd, events in node_events(path).items():
            if "pulled" in events:
                per_round.setdefault(rnd, {})[path.stem] = events
    rows = []
    for rnd in sorted(per_round):
        nodes = per_round[rnd]
        first_pull = min(e["pulled"] for e in nodes.values())
        start = max((t for t in pushes if t <= first_pull), default=first_pull)
        last_sent = max(e.get("sent", first_pull) for e in nodes.values())
        after = [t for t in pushes if t > last_sent]
        rows.append(
            {
                "round": rnd,
                "nodes": {
                    name: {k: round(v - start, 2) for k, v in sorted(e.items(), key=lambda kv: kv[1])}
                    for name, e in nodes.items()
                },
                "next-push": round(after[0] - start, 2) if after else None,
            }
        )
    return rows


# Flower's hops between those events; the handler's own time (queue and training) is ours.
HOPS = [
    ("pulled", "received"),
    ("received", "clientapp-started"),
    ("clientapp-started", "app-loaded"),
    ("handler-done", "sending"),
    ("sending", "sent"),
]


def gaps(rows: list[dict]) -> dict[str, float]:
    """Median seconds of each hop over every node and round: what each of Flower's hops costs."""
    out: dict[str, list[float]] = {}
    for row in rows:
        for events in row["nodes"].values():
            out.setdefault("push->pulled", []).append(events["pulled"])
            for a, b in HOPS:
                if a in events and b in events:
                    out.setdefault(f"{a}->{b}", []).append(events[b] - events[a])
        last = max((e.get("sent", 0.0) for e in row["nodes"].values()), default=0.0)
        if row["next-push"] is not None:
            out.setdefault("last-sent->next-push", []).append(row["next-push"] - last)
    return {k: round(statistics.median(v), 2) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = timeline(args.logs)
    for row in rows:
        print(f"round {row['round']}: next push at {row['next-push']} s")
        for name, events in row["nodes"].items():
            print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in events.items()))
    medians = gaps(rows)
    print("median seconds per hop: " + ", ".join(f"{k} {v}" for k, v in medians.items()))
    if args.json:
        args.json.write_text(json.dumps({"rounds": rows, "median-hops": medians}, indent=1))


if __name__ == "__main__":
    main()
