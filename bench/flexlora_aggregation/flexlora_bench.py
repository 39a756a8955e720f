"""Time FlexLoRA the factored way (app.aggregation.flexlora) against the naive dense way.

The inputs are random LoRA states with Gemma2-9B's shapes (42 layers, r=8 on q_proj and
v_proj, two clients, float32), so the numbers say what one server round costs without
needing the model. The dense way materialises every B_k A_k and their weighted sum as
an out x in matrix and runs a float32 SVD on it, as the FlowerTune FlexLoRA strategy does.

    python bench/flexlora_aggregation/flexlora_bench.py --dense-device cuda --threads 16
    python bench/flexlora_aggregation/flexlora_bench.py --dense-device cpu --dense-modules 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.aggregation import flexlora  # noqa: E402

HIDDEN = 3584
TARGETS = {"q_proj": 4096, "v_proj": 2048}  # out features; in features = HIDDEN


def module_prefixes(layers: int) -> list[tuple[str, int, int]]:
    return [
        (f"base_model.model.model.layers.{i}.self_attn.{proj}", out_dim, HIDDEN)
        for i in range(layers)
        for proj, out_dim in TARGETS.items()
    ]


def build_states(
    n_clients: int, layers: int, rank: int, seed: int
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    gen = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(n_clients):
        state = {}
        for prefix, out_dim, in_dim in module_prefixes(layers):
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) / in_dim**0.5
            state[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.02
        states.append(state)
    counts = torch.randint(500, 5000, (n_clients,), generator=gen)
    return states, [float(c) for c in counts]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_module(
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    probs: list[float],
    rank: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive way: full out x in update, float32 SVD, truncate, sqrt split."""
    delta = None
    for a, b, p in zip(a_list, b_list, probs):
        prod = b.to(device) @ a.to(device)
        delta = prod.mul_(p) if delta is None else delta.add_(prod, alpha=p)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    b_new = u[:, :rank] * root
    a_new = root.unsqueeze(1) * vh[:rank]
    return a_new.cpu(), b_new.cpu()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def rel_product_error(a1, b1, a2, b2) -> float:
    p1 = b1.double() @ a1.double()
    p2 = b2.double() @ a2.double()
    return ((p1 - p2).norm() / p2.norm()).item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch CPU threads (flexlora always runs on the CPU)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed flexlora repeats")
    parser.add_argument(
        "--dense-modules",
        type=int,
        default=0,
        help="time the dense way on only the first N modules and extrapolate (0 = all modules)",
    )
    parser.add_argument(
        "--check-modules", type=int, default=2, help="modules whose products are compared in float64 on the CPU"
    )
    parser.add_argument(
        "--ref64",
        action="store_true",
        help="also compare both results with a float64 dense truncation (slow on the CPU) to show which one is off",
    )
    parser.add_argument("--layers", type=int, default=42)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dense_device = torch.device(args.dense_device)
    states, weights = build_states(args.clients, args.layers, args.rank, args.seed)
    probs = [w / sum(weights) for w in weights]
    modules = module_prefixes(args.layers)

    # FlexLoRA, factored, on the CPU. The first call pays one-off costs (LAPACK
    # workspace, thread pool start), so it is reported but not counted.
    t0 = time.perf_counter()
    flex = flexlora(states, weights, rank=args.rank)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        flex = flexlora(states, weights, rank=args.rank)
        times.append(time.perf_counter() - t0)
    flex_best, flex_median = min(times), statistics.median(times)

    # Dense, once, on --dense-device; warm up the solver first so its start-up is not
    # billed to the first module.
    warm = torch.randn(64, 64, device=dense_device)
    torch.linalg.svd(warm @ warm, full_matrices=False)
    sync(dense_device)
    n_dense = len(modules) if args.dense_modules <= 0 else min(args.dense_modules, len(modules))
    dense = {}
    per_module = []
    for prefix, out_dim, in_dim in modules[:n_dense]:
        a_list = [s[f"{prefix}.lora_A.weight"] for s in states]
        b_list = [s[f"{prefix}.lora_B.weight"] for s in states]
        sync(dense_device)
        t0 = time.perf_counter()
        dense[prefix] = dense_module(a_list, b_list, probs, args.rank, dense_device)
        sync(dense_device)
        per_module.append(((out_dim, in_dim), time.perf_counter() - t0))
    measured = sum(t for _, t in per_module)
    extrapolated = n_dense < len(modules)
    if extrapolated:
        by_shape: dict[tuple[int, int], list[float]] = {}
        for shape, t in per_module:
            by_shape.setdefault(shape, []).append(t)
        overall = measured / n_dense
        dense_seconds = sum(statistics.mean(by_shape[(o, i)]) if (o, i) in by_shape else overall for _, o, i in modules)
    else:
        dense_seconds = measured

    errors = []
    for prefix, _, _ in modules[: min(args.check_modules, n_dense)]:
        a_f, b_f = flex[f"{prefix}.lora_A.weight"], flex[f"{prefix}.lora_B.weight"]
        a_d, b_d = dense[prefix]
        entry = {"module": prefix, "flexlora_vs_dense": rel_product_error(a_f, b_f, a_d, b_d)}
        if args.ref64:
            a64 = [s[f"{prefix}.lora_A.weight"].double() for s in states]
            b64 = [s[f"{prefix}.lora_B.weight"].double() for s in states]
            a_r, b_r = dense_module(a64, b64, probs, args.rank, torch.device("cpu"))
            entry["flexlora_vs_float64_dense"] = rel_product_error(a_f, b_f, a_r, b_r)
            entry["dense_vs_float64_dense"] = rel_product_error(a_d, b_d, a_r, b_r)
        errors.append(entry)

    cpu_label = f"cpu ({args.threads} threads)"
    dense_label = "cpu" if dense_device.type == "cpu" else str(dense_device)
    if dense_device.type == "cpu":
        dense_label = cpu_label
    result = {
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": args.threads,
        "dense_device": str(dense_device),
        "dense_device_name": device_name(dense_device),
        "layers": args.layers,
        "clients": args.clients,
        "rank": args.rank,
        "modules": len(modules),
        "flexlora_first_s": first,
        "flexlora_times_s": times,
        "flexlora_best_s": flex_best,
        "flexlora_median_s": flex_median,
        "dense_s": dense_seconds,
        "dense_measured_s": measured,
        "dense_modules_timed": n_dense,
        "dense_extrapolated": extrapolated,
        "dense_per_module_s": [t for _, t in per_module],
        "ratio_dense_over_flexlora_best": dense_seconds / flex_best,
        "errors": errors,
    }

    print(
        f"torch {result['torch']}; CPU: {result['cpu']}; cpu_count {result['cpu_count']} "
        f"(usable {result['cpu_affinity']}); torch threads {args.threads}"
    )
    print(f"dense device: {dense_device} ({result['dense_device_name']})")
    print(
        f"inputs: {args.layers} layers x {list(TARGETS)} = {len(modules)} LoRA modules, "
        f"{args.clients} clients, r={args.rank}, float32, seed {args.seed}"
    )
    print()
    rows = [
        ("flexlora QR + core SVD (float64), best", cpu_label, flex_best, 1.0),
        (
            f"flexlora QR + core SVD (float64), median of {args.repeats}",
            cpu_label,
            flex_median,
            flex_median / flex_best,
        ),
        (
            "dense out x in + full SVD (float32)" + (" *" if extrapolated else ""),
            dense_label,
            dense_seconds,
            dense_seconds / flex_best,
        ),
    ]
    width = max(len(r[0]) for r in rows)
    dwidth = max(len(r[1]) for r in rows)
    print(f"{'method':<{width}}  {'device':<{dwidth}}  {'seconds':>10}  {'ratio':>9}")
    for name, dev, sec, ratio in rows:
        print(f"{name:<{width}}  {dev:<{dwidth}}  {sec:>10.4f}  {ratio:>8.1f}x")
    print(f"(flexlora first call, not counted: {first:.4f} s)")
    if extrapolated:
        print(
            f"* EXTRAPOLATED: dense timed on {n_dense} of {len(modules)} modules "
            f"({measured:.2f} s measured), scaled per module shape to all {len(modules)}."
        )
    print()
    print("relative Frobenius error of the products B A, float64 on the CPU:")
    for e in errors:
        line = f"  {e['module']}: flexlora vs dense {e['flexlora_vs_dense']:.3e}"
        if "flexlora_vs_float64_dense" in e:
            line += (
                f"; vs float64 dense: flexlora {e['flexlora_vs_float64_dense']:.3e}, "
                f"dense float32 {e['dense_vs_float64_dense']:.3e}"
            )
        print(line)
    if errors:
        print(f"  max flexlora vs dense: {max(e['flexlora_vs_dense'] for e in errors):.3e}")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
