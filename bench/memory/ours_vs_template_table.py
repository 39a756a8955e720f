r"""Combine the per-run JSONs of ours_vs_template.sh into ours_vs_template.json and ours_vs_template.txt.

    python bench/memory/ours_vs_template_table.py --runs /tmp/ovt --smi-dir /tmp/ovt/smi --out $OUT \
        --build /tmp/model_build.json

Runs are named by configuration letter and repeat number (A1, C1, A2, C2, B1, D1, ...):
  A ours (app.models.build_model), checkpointing on    B ours, off
  C FlowerTune template (prepare_model_for_kbit_training), on    D template, off
The per-run JSONs of bench/qlora_step_check.py are embedded whole under "raw", so the
outputs are two files however many runs there were.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

CONFIGS = {
    "A": "ours (build_model), checkpointing on",
    "B": "ours (build_model), checkpointing off",
    "C": "template (prepare_model_for_kbit_training), checkpointing on",
    "D": "template (prepare_model_for_kbit_training), checkpointing off",
}
MEASURES = (
    "after_load_gib",
    "peak_allocated_gib",
    "peak_reserved_gib",
    "process_used_peak_gib",
    "nvidia_smi_peak_gib",
    "tokens_per_second",
    "warmup_step_seconds",
)
RATIO_PAIRS = (
    ("A", "C", "ours/template, checkpointing on (A/C)"),
    ("B", "D", "ours/template, checkpointing off (B/D)"),
    ("A", "B", "ours, checkpointing on/off (A/B)"),
    ("C", "D", "template, checkpointing on/off (C/D)"),
)


def smi_peak_gib(path: Path) -> float | None:
    """Largest memory.used (MiB) nvidia-smi sampled while the run went on."""
    if not path.is_file():
        return None
    values = []
    for line in path.read_text().splitlines():
        try:
            values.append(float(line.strip().split(",")[0]))
        except ValueError:
            continue
    return round(max(values) / 1024, 2) if values else None


def read_wall(path: Path) -> dict[str, float]:
    """Lines 'KEY SECONDS' written by the shell script: each fresh process's wall time."""
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = float(parts[1])
    return out


def stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    spread = max(values) - min(values)
    return {
        "values": values,
        "n": len(values),
        "mean": round(mean, 3),
        "spread": round(spread, 3),
        "spread_pct_of_mean": round(100 * spread / mean, 2) if mean else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="folder with the per-run JSONs (A1.json ...)")
    ap.add_argument("--smi-dir", type=Path, help="folder with smi_<run>.csv")
    ap.add_argument("--out", type=Path, required=True, help="where ours_vs_template.{json,txt} go")
    ap.add_argument("--build", type=Path, help="make_random_gemma2.py's JSON")
    ap.add_argument("--order", default="", help="the order the runs were started in, space-separated")
    ap.add_argument("--note", action="append", default=[], help="a line to add to the text (repeatable)")
    args = ap.parse_args()

    wall = read_wall(args.runs / "wall.txt")
    keys = args.order.split() or sorted(p.stem for p in args.runs.glob("*.json") if re.fullmatch(r"[ABCD]\d+", p.stem))
    rows, raw, missing = {}, {}, []
    for key in keys:
        path = args.runs / f"{key}.json"
        if not path.is_file():
            missing.append(key)
            rows[key] = {"config": CONFIGS[key[0]], "missing": True, "wall_seconds": wall.get(key)}
            continue
        r = raw[key] = json.loads(path.read_text())
        rows[key] = {
            "config": CONFIGS[key[0]],
            "variant": r["variant"],
            "gradient_checkpointing": r["gradient_checkpointing"],
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
            "wall_seconds": wall.get(key),
            "warmup_grad_check": r.get("warmup_grad_check"),
            "param_gib_by_type_dtype": r.get("param_gib_by_type_dtype"),
            "losses": r["losses"],
        }

    summary = {}
    for cfg in CONFIGS:
        present = [rows[k] for k in keys if k[0] == cfg and not rows[k].get("missing")]
        if not present:
            continue
        summary[cfg] = {
            m: stats([x[m] for x in present])
            for m in MEASURES
            if all(isinstance(x.get(m), (int, float)) for x in present)
        }
    ratios = {}
    for num, den, name in RATIO_PAIRS:
        if num in summary and den in summary:
            ratios[name] = {
                m: round(summary[num][m]["mean"] / summary[den][m]["mean"], 3)
                for m in MEASURES
                if m in summary[num] and m in summary[den] and summary[den][m]["mean"]
            }

    losses = {k: raw[k]["losses"] for k in keys if k in raw}

    def max_diff(a, b):
        n = min(len(losses[a]), len(losses[b]))
        return max(abs(x - y) for x, y in zip(losses[a][:n], losses[b][:n])) if n else None

    loss_check = {}
    for cfg in CONFIGS:
        same = [k for k in keys if k[0] == cfg and k in losses]
        for k in same[1:]:
            loss_check[f"max |{k} - {same[0]}|"] = max_diff(k, same[0])
    for a, b in (("A1", "C1"), ("B1", "D1"), ("A1", "B1")):
        if a in losses and b in losses:
            loss_check[f"max |{b} - {a}|"] = max_diff(b, a)

    meta = {}
    if raw:
        r = next(iter(raw.values()))
        meta = {
            "gpu": r["gpu"],
            "versions": r["versions"],
            "batch": r["batch"],
            "seq": r["seq"],
            "accum": r["accum"],
            "warmup_optimizer_steps": 1,
            "timed_optimizer_steps": r["timed_optimizer_steps"],
            "tokens_timed_per_run": r["tokens_timed"],
            "seed": r.get("seed"),
            "order": keys,
            "missing": missing,
        }
    combined = {
        "meta": meta,
        "configs": CONFIGS,
        "notes": args.note,
        "model_build": json.loads(args.build.read_text()) if args.build and args.build.is_file() else None,
        "runs": rows,
        "summary": summary,
        "ratios_of_means": ratios,
        "loss_check": loss_check,
        "raw": raw,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ours_vs_template.json").write_text(json.dumps(combined, indent=2) + "\n")

    def fmt(v):
        return "-" if v is None else str(v)

    lines = [
        f"GPU: {meta.get('gpu')}; versions: {meta.get('versions')}",
        f"batch {meta.get('batch')} x {meta.get('seq')} tokens, accumulation {meta.get('accum')}, AdamW, seed "
        f"{meta.get('seed')}, 1 warm-up + {meta.get('timed_optimizer_steps')} timed optimizer steps; one fresh "
        f"process per run, order {' '.join(keys)}" + (f" (missing: {' '.join(missing)})" if missing else ""),
        *(f"{k} = {v}" for k, v in CONFIGS.items() if any(x[0] == k for x in keys)),
        "",
        "| run | checkpoint kwargs | after load GiB | peak allocated GiB | peak reserved GiB | process GiB "
        "(mem_get_info) | nvidia-smi peak GiB | tokens/s | warm-up step s | process wall s | LoRA tensors with grad |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k in keys:
        r = rows[k]
        if r.get("missing"):
            lines.append(f"| {k} | missing | | | | | | | | {fmt(r.get('wall_seconds'))} | |")
            continue
        g = r.get("warmup_grad_check") or {}
        kwargs = r["checkpoint_kwargs"] if r["gradient_checkpointing"] else "off"
        lines.append(
            f"| {k} | {kwargs} | {r['after_load_gib']} | {r['peak_allocated_gib']} | {r['peak_reserved_gib']} | "
            f"{fmt(r['process_used_peak_gib'])} | {fmt(r['nvidia_smi_peak_gib'])} | {r['tokens_per_second']} | "
            f"{r['warmup_step_seconds']} | {fmt(r['wall_seconds'])} | "
            f"{g.get('tensors_with_grad')}/{g.get('trainable_tensors')} |"
        )
    lines += [
        "",
        "| config | measure | n | mean | spread (max-min) | values |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cfg, per in summary.items():
        for m, s in per.items():
            lines.append(
                f"| {cfg} | {m} | {s['n']} | {s['mean']} | {s['spread']} ({fmt(s['spread_pct_of_mean'])}%) | "
                f"{', '.join(str(v) for v in s['values'])} |"
            )
    if ratios:
        lines += ["", "| ratio of means | " + " | ".join(MEASURES) + " |", "| --- |" + " --- |" * len(MEASURES)]
        for name, r in ratios.items():
            lines.append(f"| {name} | " + " | ".join(fmt(r.get(m)) for m in MEASURES) + " |")
    lines += ["", "losses (warm-up step first):"]
    for k, v in losses.items():
        lines.append(f"  {k}: " + ", ".join(f"{x:.6f}" for x in v))
    if loss_check:
        lines.append("  " + "; ".join(f"{k} = {v:.3g}" for k, v in loss_check.items() if v is not None))
    for key in keys:
        r = rows[key]
        if not r.get("missing"):
            lines.append(f"{key}: params {r['param_gib_by_type_dtype']}; load {r['load_quantize_seconds']} s")
    lines += args.note
    text = "\n".join(lines) + "\n"
    (args.out / "ours_vs_template.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
