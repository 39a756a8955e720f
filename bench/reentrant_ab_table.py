"""Combine the A1 B1 A2 B2 JSONs of gpu_reentrant_ab.sh into reentrant_ab.json and reentrant_ab.txt.

    python bench/reentrant_ab_table.py --dir $OUT --smi-dir /tmp/smi_ab
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RUNS = ("A1", "B1", "A2", "B2")
NAMES = {"A": "ours as is (use_reentrant=False)", "B": "ours, checkpointing re-enabled with use_reentrant=True"}
MEASURES = ("peak_allocated_gib", "peak_reserved_gib", "process_used_peak_gib", "nvidia_smi_peak_gib", "tokens_per_second")


def smi_peak_gib(path: Path) -> float | None:
    if not path.is_file():
        return None
    values = []
    for line in path.read_text().splitlines():
        try:
            values.append(float(line.strip().split(",")[0]))
        except ValueError:
            continue
    return round(max(values) / 1024, 2) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--smi-dir", type=Path)
    args = ap.parse_args()

    rows, raw = {}, {}
    for key in RUNS:
        path = args.dir / f"{key}.json"
        if not path.is_file():
            rows[key] = {"missing": True}
            continue
        r = raw[key] = json.loads(path.read_text())
        rows[key] = {
            "config": NAMES[key[0]],
            "checkpoint_kwargs": r.get("checkpointing", {}).get("checkpoint_kwargs"),
            "after_load_gib": r["gib_after_load"],
            "peak_allocated_gib": r["peak_allocated_gib"],
            "peak_reserved_gib": r["peak_reserved_gib"],
            "process_used_peak_gib": r.get("process_used_peak_gib"),
            "nvidia_smi_peak_gib": smi_peak_gib(args.smi_dir / f"smi_{key}.csv") if args.smi_dir else None,
            "tokens_per_second": r["tokens_per_second"],
            "train_seconds": r["train_seconds"],
            "warmup_step_seconds": r["warmup_step_seconds"],
            "load_quantize_seconds": r["load_quantize_seconds"],
            "warmup_grad_check": r.get("warmup_grad_check"),
            "losses": r["losses"],
        }

    summary = {}
    for cfg in ("A", "B"):
        present = [rows[k] for k in RUNS if k.startswith(cfg) and not rows[k].get("missing")]
        summary[cfg] = {}
        for m in MEASURES:
            vals = [x[m] for x in present if isinstance(x.get(m), (int, float))]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            spread = max(vals) - min(vals)
            summary[cfg][m] = {"values": vals, "mean": round(mean, 3), "spread": round(spread, 3),
                               "spread_pct_of_mean": round(100 * spread / mean, 2) if mean else None}
    ratios = {}
    for m in MEASURES:
        a, b = summary["A"].get(m), summary["B"].get(m)
        if a and b and a["mean"]:
            ratios[m] = round(b["mean"] / a["mean"], 3)

    losses = {k: rows[k]["losses"] for k in RUNS if not rows[k].get("missing")}
    loss_check = {}
    if "A1" in losses:
        ref = losses["A1"]
        for k, v in losses.items():
            n = min(len(ref), len(v))
            loss_check[f"max |{k} - A1|"] = max(abs(x - y) for x, y in zip(ref[:n], v[:n])) if n else None

    meta = {}
    if raw:
        r = next(iter(raw.values()))
        meta = {"gpu": r["gpu"], "versions": r["versions"], "batch": r["batch"], "seq": r["seq"], "accum": r["accum"],
                "warmup_optimizer_steps": 1, "timed_optimizer_steps": r["timed_optimizer_steps"],
                "tokens_timed_per_run": r["tokens_timed"], "seed": r.get("seed"), "order": list(RUNS)}
    out = {"meta": meta, "runs": rows, "summary": summary, "ratio_B_over_A_of_means": ratios, "loss_check": loss_check}
    (args.dir / "reentrant_ab.json").write_text(json.dumps(out, indent=2) + "\n")

    def fmt(v):
        return "-" if v is None else str(v)

    lines = [f"GPU: {meta.get('gpu')}; versions: {meta.get('versions')}",
             f"batch {meta.get('batch')} x {meta.get('seq')} tokens, accumulation {meta.get('accum')}, AdamW, seed "
             f"{meta.get('seed')}, 1 warm-up + {meta.get('timed_optimizer_steps')} timed optimizer steps; one fresh "
             "process per run, order A1 B1 A2 B2",
             "A = ours as is (use_reentrant=False); B = ours, checkpointing re-enabled with use_reentrant=True", "",
             "| run | checkpoint kwargs | peak allocated GiB | peak reserved GiB | process used GiB | nvidia-smi peak GiB "
             "| tokens/s | warm-up step s | LoRA tensors with grad |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in RUNS:
        r = rows[k]
        if r.get("missing"):
            lines.append(f"| {k} | missing | | | | | | | |")
            continue
        g = r.get("warmup_grad_check") or {}
        lines.append(f"| {k} | {r['checkpoint_kwargs']} | {r['peak_allocated_gib']} | {r['peak_reserved_gib']} | "
                     f"{fmt(r['process_used_peak_gib'])} | {fmt(r['nvidia_smi_peak_gib'])} | {r['tokens_per_second']} | "
                     f"{r['warmup_step_seconds']} | {g.get('tensors_with_grad')}/{g.get('trainable_tensors')} |")
    lines += ["", "| measure | A mean | A spread (max-min) | B mean | B spread (max-min) | B/A |", "| --- | --- | --- | --- | --- | --- |"]
    for m in MEASURES:
        a, b = summary["A"].get(m, {}), summary["B"].get(m, {})
        lines.append(f"| {m} | {fmt(a.get('mean'))} | {fmt(a.get('spread'))} ({fmt(a.get('spread_pct_of_mean'))}%) | "
                     f"{fmt(b.get('mean'))} | {fmt(b.get('spread'))} ({fmt(b.get('spread_pct_of_mean'))}%) | {fmt(ratios.get(m))} |")
    lines += ["", "losses (warm-up step first):"]
    for k, v in losses.items():
        lines.append(f"  {k}: " + ", ".join(f"{x:.6f}" for x in v))
    lines.append("  " + "; ".join(f"{k} = {v:.3g}" for k, v in loss_check.items() if v is not None))
    text = "\n".join(lines) + "\n"
    (args.dir / "reentrant_ab.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
