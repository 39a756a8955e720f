"""Combine the four per-configuration JSONs of gpu_memory_side_by_side.sh into one JSON and a text table.

    python bench/memory_side_by_side_table.py --dir $OUT --smi-dir /tmp/smi --build /tmp/model_build.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CONFIGS = {
    "A": "ours, checkpointing on (the app)",
    "B": "ours, checkpointing off",
    "C": "template, checkpointing on",
    "D": "template, checkpointing off",
}
MIB_PER_GIB = 1024


def smi_peak_gib(path: Path) -> float | None:
    """Largest memory.used (MiB) nvidia-smi sampled while the configuration ran."""
    if not path.is_file():
        return None
    values = []
    for line in path.read_text().splitlines():
        try:
            values.append(float(line.strip().split(",")[0]))
        except ValueError:
            continue
    return round(max(values) / MIB_PER_GIB, 2) if values else None


def ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="folder with A.json .. D.json; the outputs go here too")
    ap.add_argument("--smi-dir", type=Path, help="folder with smi_A.csv .. smi_D.csv")
    ap.add_argument("--build", type=Path, help="make_random_gemma2.py's JSON")
    args = ap.parse_args()

    rows = {}
    for key, name in CONFIGS.items():
        path = args.dir / f"{key}.json"
        if not path.is_file():
            rows[key] = {"config": name, "missing": True}
            continue
        r = json.loads(path.read_text())
        rows[key] = {
            "config": name,
            "after_load_gib": r["gib_after_load"],
            "peak_allocated_gib": r["peak_allocated_gib"],
            "peak_reserved_gib": r["peak_reserved_gib"],
            "process_used_peak_gib": r.get("process_used_peak_gib"),
            "nvidia_smi_peak_gib": smi_peak_gib(args.smi_dir / f"smi_{key}.csv") if args.smi_dir else None,
            "tokens_per_second": r["tokens_per_second"],
            "load_quantize_seconds": r["load_quantize_seconds"],
            "warmup_step_seconds": r.get("warmup_step_seconds"),
            "layer_gradient_checkpointing": r.get("checkpointing", {}).get("layer_gradient_checkpointing"),
            "checkpoint_kwargs": r.get("checkpointing", {}).get("checkpoint_kwargs"),
            "param_gib_by_type_dtype": r.get("param_gib_by_type_dtype"),
            "losses": r.get("losses"),
        }
    meta = {}
    for r in (json.loads((args.dir / f"{k}.json").read_text()) for k in CONFIGS if (args.dir / f"{k}.json").is_file()):
        meta = {"gpu": r["gpu"], "versions": r["versions"], "batch": r.get("batch"), "seq": r.get("seq"),
                "accum": r.get("accum"), "timed_optimizer_steps": r["timed_optimizer_steps"]}
        break
    measures = ("after_load_gib", "peak_allocated_gib", "peak_reserved_gib", "process_used_peak_gib",
                "nvidia_smi_peak_gib", "tokens_per_second")
    ratios = {}
    for ours, tmpl, gc in (("A", "C", "on"), ("B", "D", "off")):
        ratios[f"ours/template, checkpointing {gc} ({ours}/{tmpl})"] = {
            m: ratio(rows[ours].get(m), rows[tmpl].get(m)) for m in measures
        }
    for on, off, v in (("A", "B", "ours"), ("C", "D", "template")):
        ratios[f"{v}, checkpointing on/off ({on}/{off})"] = {m: ratio(rows[on].get(m), rows[off].get(m)) for m in measures}
    combined = {"meta": meta, "model_build": json.loads(args.build.read_text()) if args.build and args.build.is_file() else None,
                "configs": rows, "ratios": ratios}
    (args.dir / "memory_side_by_side.json").write_text(json.dumps(combined, indent=2) + "\n")

    def fmt(v):
        return "-" if v is None else f"{v}"

    lines = [
        f"GPU: {meta.get('gpu', '?')}; versions: {meta.get('versions', {})}",
        f"batch {meta.get('batch')} x {meta.get('seq')} tokens, accumulation {meta.get('accum')}, AdamW, 1 warm-up + "
        f"{meta.get('timed_optimizer_steps')} timed optimizer steps; one fresh process per configuration",
        "",
        "| | configuration | after load GiB | peak allocated GiB | peak reserved GiB | process used GiB (mem_get_info) | nvidia-smi peak GiB | tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, row in rows.items():
        if row.get("missing"):
            lines.append(f"| {key} | {row['config']} | missing | | | | | |")
            continue
        lines.append("| " + " | ".join([key, row["config"], *(fmt(row[m]) for m in measures)]) + " |")
    lines += ["", "| ratio | after load | peak allocated | peak reserved | process used | nvidia-smi | tokens/s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in ratios.items():
        lines.append("| " + " | ".join([name, *(fmt(r[m]) for m in measures)]) + " |")
    lines.append("")
    for key, row in rows.items():
        if not row.get("missing"):
            lines.append(f"{key}: checkpointing in layers {row['layer_gradient_checkpointing']} {row['checkpoint_kwargs']}; "
                         f"params {row['param_gib_by_type_dtype']}; load {row['load_quantize_seconds']} s")
    text = "\n".join(lines) + "\n"
    (args.dir / "memory_side_by_side.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
