"""Profile the ServerApp's aggregation step as `LoraFedAvg.aggregate_train` runs it.

Two client replies with Gemma2-9B's adapter (42 layers, r=8 on q_proj 3584->4096 and
v_proj 3584->2048, float32, PEFT's key names) are built as Flower Messages the way
app/client_app.py sends them: one packed safetensors Array (`app.wire.pack`) and a
MetricRecord with the metrics the strategy reads. Each stage of the strategy's path is
timed on its own (unpack_reply, find_problem, to_torch_state_dict, the math, the
ArrayRecord built from the result, summarize_round, the recorder, the next round's pack),
then the whole `aggregate_train` of a real LoraFedAvg, with the `aggregate-seconds`
window it reports, for FedAvg and FlexLoRA; then a cProfile of the FlexLoRA path; then
the effect of torch's thread count, alone and with N busy processes on the cores (the
real ServerApp shared a 32-core host with training processes).

    python bench/flexlora_aggregation/profile_flexlora.py                          # everything, this machine
    python bench/flexlora_aggregation/profile_flexlora.py --threads 1,2,4,16 --busy 16
    python bench/flexlora_aggregation/profile_flexlora.py --no-flwr --threads 1,16 --busy 16   # torch only

Without flwr importable (or with --no-flwr) only the torch part runs (math, threads).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import multiprocessing as mp
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
# The last commit before 82fda84 changed app/strategy.py: LoraFedAvg with Flower's FedAvg
# arithmetic and sqrt split, as in bench/round_time/historical_h100 (aggregation 4.1-7.2 s).
MEASURED_REV = "5f934c1"
# strategy.wire-dtype's default; the measured revision's adapters travelled in float32.
WIRE = "bfloat16"


def _app_source(argv: list[str]) -> Path:
    """Where `app` is imported from: a git revision of it. The default, MEASURED_REV, is the
    app the 4.1-7.2 s run used; the profile drives that revision's strategy and recorder,
    so later revisions (whose RunRecorder takes an AppConfig) are not profiled here: the
    deployment's own metrics (aggregate-seconds) time today's aggregation."""
    rev = MEASURED_REV
    for i, a in enumerate(argv):
        if a == "--app-rev" and i + 1 < len(argv):
            rev = argv[i + 1]
        elif a.startswith("--app-rev="):
            rev = a.split("=", 1)[1]
    import subprocess

    dest = Path(tempfile.mkdtemp(prefix="profile_flexlora_app_"))
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev, "app"], check=True, capture_output=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:  # no git there (device machine): the tree as sent
        print(f"(app from the working tree: git archive {rev} failed: {err})")
        return REPO
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest)
    print(f"(app imported from git {rev}, extracted to {dest})")
    return dest


sys.path.insert(0, str(_app_source(sys.argv[1:])))

from app.aggregation import flexlora  # noqa: E402

HIDDEN = 3584
TARGETS = {"q_proj": 4096, "v_proj": 2048}  # out features; in features = HIDDEN
METRICS = ("train-loss", "train-tokens", "train-seconds", "peak-gpu-bytes")


# ---------------------------------------------------------------- inputs


def adapter_keys(layers: int) -> list[tuple[str, tuple[int, int]]]:
    """PEFT's saved names and shapes, in `get_peft_model_state_dict` order."""
    out = []
    for i in range(layers):
        for proj, out_dim in TARGETS.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            out.append((f"{prefix}.lora_A.weight", (0, HIDDEN)))
            out.append((f"{prefix}.lora_B.weight", (out_dim, 0)))
    return out


def global_adapter(layers: int, rank: int, seed: int) -> dict[str, np.ndarray]:
    """PEFT's init as app.models.initial_adapter makes it: Kaiming-uniform A, zero B."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, (out_dim, in_dim) in adapter_keys(layers):
        if ".lora_A." in key:
            bound = 1.0 / math.sqrt(in_dim)  # kaiming_uniform_(a=sqrt(5))
            state[key] = rng.uniform(-bound, bound, (rank, in_dim)).astype(np.float32)
        else:
            state[key] = np.zeros((out_dim, rank), dtype=np.float32)
    return state


def client_adapter(base: dict[str, np.ndarray], seed: int, scale: float) -> dict[str, np.ndarray]:
    """A round of training: A moved a little, B grown from zero (Adam steps ~ lr each)."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.standard_normal(v.shape, dtype=np.float32) * scale).astype(np.float32) for k, v in base.items()}


def client_metrics(examples: int, seed: int) -> dict[str, Any]:
    """What a warm trainer's reply carries (app/trainer.py + app/client_app.py)."""
    return {
        "train-loss": 12.0 + seed * 0.01,
        "train-seconds": 17.0,
        "train-tokens": 40960,
        "peak-gpu-bytes": 21003888640,
        "learning-rate": 4.28e-05,
        "num-examples": examples,
        "prepare-seconds": 0.2,
        "trainer-pid": 2585 + seed,
        "trainer-model-loads": 1,
        "trainer-partition-loads": 1,
        "queue-seconds": 0.01,
        "trainer-overflow": 0,
        "partition-id": seed,
        "client-seconds": 18.0,
    }


# ---------------------------------------------------------------- helpers


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def spin() -> None:  # a busy core, as a training process or another ServerApp would keep it
    x = 0
    while True:
        x += 1


class Busy:
    """N busy-looping processes for the duration of a `with`, ended by their own pids."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self) -> Busy:
        ctx = mp.get_context("fork")
        self.procs = [ctx.Process(target=spin, daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        time.sleep(0.3 if self.n else 0)
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join()


def torch_states(layers: int, rank: int, n_clients: int, seed: int, scale: float):
    base = global_adapter(layers, rank, seed)
    states = [
        {k: torch.from_numpy(v) for k, v in client_adapter(base, seed + 1 + c, scale).items()} for c in range(n_clients)
    ]
    return base, states, [80.0 + c for c in range(n_clients)]


# ---------------------------------------------------------------- torch only


def thread_sweep(
    states, weights, rank, threads: list[int], busy: list[int], repeats: int, full_path: Callable[[], float] | None
) -> list[dict[str, Any]]:
    rows = []
    default = torch.get_num_threads()
    for n_busy in busy:
        with Busy(n_busy):
            for t in threads:
                torch.set_num_threads(t)
                flexlora(states, weights, rank)  # warm-up for this thread count
                times = [timed(lambda: flexlora(states, weights, rank))[1] for _ in range(repeats)]
                row = {
                    "busy": n_busy,
                    "threads": t,
                    "flexlora_median_s": statistics.median(times),
                    "flexlora_min_s": min(times),
                    "flexlora_max_s": max(times),
                }
                if full_path is not None:
                    win = [full_path() for _ in range(max(1, repeats // 2))]
                    row["aggregate_seconds_median"] = statistics.median(win)
                rows.append(row)
                print(
                    f"  busy={n_busy:3d} threads={t:3d}: flexlora median {row['flexlora_median_s']:.3f} s "
                    f"(min {row['flexlora_min_s']:.3f}, max {row['flexlora_max_s']:.3f})"
                    + (f"; aggregate-seconds window {row['aggregate_seconds_median']:.3f} s" if full_path else ""),
                    flush=True,
                )
    torch.set_num_threads(default)
    return rows


def op_breakdown(states, weights, rank) -> str:
    """torch.profiler's view of one flexlora call: which ATen ops the time goes to."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        flexlora(states, weights, rank)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


# ---------------------------------------------------------------- Flower path


class FlowerPath:
    def __init__(self, base: dict[str, np.ndarray], clients: list[dict[str, np.ndarray]], weights, rank: int):
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        from app.wire import pack

        # Messages read the sender's identity from the runtime (as tests/test_strategy.py sets it).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.ArrayRecord, self.Message, self.MetricRecord, self.RecordDict = (
            ArrayRecord,
            Message,
            MetricRecord,
            RecordDict,
        )
        self.rank = rank
        self.base = ArrayRecord({k: torch.from_numpy(v) for k, v in base.items()})  # as server_app.py
        self.packed = [pack(c, WIRE) for c in clients]  # client side: not timed
        self.metrics = [client_metrics(int(w), i) for i, w in enumerate(weights)]
        self.recorder_dir = Path(tempfile.mkdtemp(prefix="profile_flexlora_"))

    def replies(self) -> list:
        """Fresh replies each time: unpack_reply replaces the packed record in place."""
        from app.wire import KEY

        out = []
        for i, (packed, metrics) in enumerate(zip(self.packed, self.metrics)):
            instruction = self.Message(self.RecordDict(), dst_node_id=1000 + i, message_type="train")
            arrays = self.ArrayRecord({KEY: packed[KEY]})
            content = self.RecordDict({"arrays": arrays, "metrics": self.MetricRecord(dict(metrics))})
            out.append(self.Message(content, reply_to=instruction))
        return out

    def strategy(self, use_flexlora: bool, on_round: Callable | None = None):
        import inspect

        import app.strategy as st

        cls = getattr(st, "LoraFedAvg", None) or st.FedAvgOrFlexLora  # renamed after HEAD
        params = inspect.signature(cls).parameters
        extra = {k: v for k, v in {"flexlora_split": "reference", "wire_dtype": WIRE}.items() if k in params}
        reports = []
        s = cls(
            use_flexlora=use_flexlora,
            lora_rank=self.rank,
            on_round=on_round or reports.append,
            fraction_train=0.1,
            **extra,
        )
        s.current = self.base
        return s, reports

    def stages(self, use_flexlora: bool) -> dict[str, float]:
        """The strategy's steps one by one, same calls, same order."""
        import inspect

        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

        from app.aggregation import flexlora as flex
        from app.strategy import WEIGHT_KEY, _metrics_of, summarize_round
        from app.wire import pack

        s, _ = self.strategy(use_flexlora)
        msgs = self.replies()
        t: dict[str, float] = {}
        _, t["check_and_log_replies"] = timed(lambda: s._check_and_log_replies(msgs, is_train=True, validate=False))
        t["unpack_reply (all clients)"] = sum(timed(lambda m=m: s.unpack_reply(m))[1] for m in msgs)
        problems = []
        t["find_problem (all clients)"] = sum(
            timed(lambda m=m: problems.append(s.find_problem(m.content)))[1] for m in msgs
        )
        assert not any(problems), problems
        contents = [m.content for m in msgs]
        torch_fedavg = "aggregate_arrayrecords" not in inspect.getsource(type(s)._aggregate_arrays)
        w0 = time.perf_counter()
        if use_flexlora or torch_fedavg:  # the same calls as _aggregate_arrays makes
            states, t["to_torch_state_dict"] = timed(
                lambda: [next(iter(c.array_records.values())).to_torch_state_dict() for c in contents]
            )
            weights = [float(_metrics_of(c)[WEIGHT_KEY]) for c in contents]
            if use_flexlora:
                extra = {"split": "reference"} if "split" in inspect.signature(flex).parameters else {}
                result, t["flexlora math"] = timed(lambda: flex(states, weights, self.rank, **extra))
            else:
                from app.aggregation import fedavg

                result, t["fedavg math (app.aggregation)"] = timed(lambda: fedavg(states, weights))
            arrays, t["ArrayRecord(result)"] = timed(lambda: self.ArrayRecord(result))
        else:
            arrays, t["aggregate_arrayrecords (flwr)"] = timed(lambda: aggregate_arrayrecords(contents, WEIGHT_KEY))
        _, t["summarize_round"] = timed(lambda: summarize_round(contents, WEIGHT_KEY))
        t["= aggregate-seconds window (sum of the above)"] = time.perf_counter() - w0
        _, t["_aggregate_arrays, called whole"] = timed(lambda: s._aggregate_arrays(contents))
        _, t["on_round: recorder, no checkpoint"] = timed(lambda: self.recorder(1)(self.report(arrays, 1)))
        _, t["on_round: recorder, checkpoint round"] = timed(lambda: self.recorder(1)(self.report(arrays, 2)))
        _, t["next configure_train: pack(arrays)"] = timed(lambda: pack(arrays, WIRE))
        return t

    def recorder(self, save_every_unused: int):
        from app.checkpoint import RunRecorder
        from app.config import LoraSettings, ModelSettings

        if not hasattr(self, "_recorder"):
            model = ModelSettings("google/gemma-2-9b", 4, False, LoraSettings(self.rank, 16, 0.05, tuple(TARGETS)))
            self._recorder = RunRecorder(self.recorder_dir, model, save_every=2, num_rounds=10, aggregation="flexlora")
        return self._recorder

    @staticmethod
    def report(arrays, server_round):
        from app.strategy import RoundReport

        return RoundReport(server_round=server_round, arrays=arrays, clients=[{"node-id": 1}], aggregate={})

    def aggregate_train(self, use_flexlora: bool) -> tuple[float, float]:
        """(aggregate_train wall seconds, the aggregate_seconds its report says)."""
        s, reports = self.strategy(use_flexlora)
        msgs = self.replies()
        (_, _), wall = timed(lambda: s.aggregate_train(1, msgs))
        return wall, reports[0].aggregate_seconds

    def window(self) -> float:
        return self.aggregate_train(True)[1]

    def cprofile(self, use_flexlora: bool, top: int) -> str:
        s, _ = self.strategy(use_flexlora)
        msgs = self.replies()
        prof = cProfile.Profile()
        prof.enable()
        s.aggregate_train(1, msgs)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("cumulative").print_stats(top)
        return buf.getvalue()


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=42)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--scale", type=float, default=5e-4, help="size of one round's change to A and B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", default="", help="comma list of torch thread counts (default: 1 and the default)")
    p.add_argument("--busy", default="0", help="comma list of busy-process counts to sweep under")
    p.add_argument(
        "--ops-busy", type=int, default=0, help="also profile (cProfile, torch.profiler) under N busy processes"
    )
    p.add_argument("--top", type=int, default=25, help="cProfile lines")
    p.add_argument("--no-flwr", action="store_true")
    p.add_argument(
        "--app-rev",
        default=MEASURED_REV,
        help="git revision of app/ to profile (one with the strategy API of MEASURED_REV)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import logging

    logging.getLogger("flwr").disabled = True  # one INFO line per aggregate_train otherwise
    default_threads = torch.get_num_threads()
    threads = [int(x) for x in args.threads.split(",") if x] or sorted({1, default_threads})
    busy = [int(x) for x in args.busy.split(",") if x]
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, cpu_count {os.cpu_count()}, "
        f"affinity {len(os.sched_getaffinity(0))}, torch default threads {default_threads}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print(
        f"inputs: {args.layers} layers x {list(TARGETS)}, r={args.rank}, {args.clients} clients, float32, "
        f"{len(adapter_keys(args.layers))} tensors per client"
    )
    base, states, weights = torch_states(args.layers, args.rank, args.clients, args.seed, args.scale)
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "default_threads": default_threads,
    }

    flower = None
    if not args.no_flwr:
        try:
            import flwr  # noqa: F401

            clients = [{k: v.numpy() for k, v in s.items()} for s in states]
            flower = FlowerPath(base, clients, weights, args.rank)
        except ImportError as err:
            print(f"(flwr not importable: {err}; torch part only)")

    if flower is not None:
        for use_flex in (False, True):
            name = "flexlora" if use_flex else "fedavg"
            flower.stages(use_flex)  # warm-up (imports, LAPACK workspace, allocator)
            runs = [flower.stages(use_flex) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            walls = [flower.aggregate_train(use_flex) for _ in range(args.repeats)]
            med["LoraFedAvg.aggregate_train (whole, wall)"] = statistics.median(w for w, _ in walls)
            med["LoraFedAvg.aggregate_train: its aggregate_seconds"] = statistics.median(a for _, a in walls)
            result[f"stages_{name}"] = med
            print(f"\n{name}: median of {args.repeats}, torch threads {torch.get_num_threads()}")
            for k, v in med.items():
                print(f"  {k:<52s} {v:8.4f} s")
        for n_busy in sorted({0, args.ops_busy}):
            with Busy(n_busy):
                text = flower.cprofile(True, args.top)
            print(
                f"\ncProfile of the strategy's aggregate_train (FlexLoRA), {n_busy} busy processes, "
                f"{torch.get_num_threads()} torch threads, top {args.top} by cumulative time:"
            )
            print(text)
            result[f"cprofile_flexlora_busy{n_busy}"] = text

    for n_busy in sorted({0, args.ops_busy}):
        with Busy(n_busy):
            flexlora(states, weights, args.rank)
            print(
                f"torch.profiler, one flexlora call, {n_busy} busy processes, "
                f"{torch.get_num_threads()} torch threads (self CPU time):"
            )
            table = op_breakdown(states, weights, args.rank)
        print(table)
        result[f"ops_busy{n_busy}"] = table

    print("thread sweep (flexlora math; aggregate-seconds window of a real LoraFedAvg where flwr is there):")
    result["thread_sweep"] = thread_sweep(
        states, weights, args.rank, threads, busy, args.repeats, flower.window if flower is not None else None
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
