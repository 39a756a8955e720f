r"""What one round of the seed's Simulation Engine run costs on one GPU: the baseline of the side-by-side benchmark.

The seed ran the FlowerTune LLM template (General NLP) under Flower's Simulation Engine:
Ray actors with one whole GPU each (`client-resources.num-gpus = 1.0`), so on one GPU the
two sampled clients of a round train one after the other, and every client call rebuilds
its data, tokenizer and 4-bit model from scratch (`client_fn` + `get_model`). The server
aggregates (FedAvg, or FlexLoRA the dense way) and, every `save-every-round` rounds, loads
the whole base model once more just to `save_pretrained` the global adapter. This script
repeats exactly that work in one process, so its timings can sit next to our deployment's.

Included, per round: sample 2 of 20 IID partitions (fraction 0.1, random.Random(--seed));
for each client in turn, "build": partition load (`app.dataset.load_partition`),
tokenization (`app.dataset.tokenize_partition`, so token counts match our pipeline
exactly), tokenizer, the template's `get_model` (`bench.qlora_step_check.build_template`:
NF4, double quant, bf16 compute, eager attention, `prepare_model_for_kbit_training(
use_gradient_checkpointing=True)`, LoRA r=8 alpha=16 dropout 0.05 on q_proj,v_proj) and the
global adapter; "train": Trainer with the template's arguments (batch 2, accumulation 4,
--max-steps, logging every step, constant learning rate from the cross-round cosine,
gradient checkpointing, bf16 on the GPU); then the adapter out to the CPU in float32 and
the model freed. Then FedAvg (`app.aggregation.fedavg`) or dense FlexLoRA (every
B_k A_k formed on the GPU in float32, weighted sum, full SVD, B = U_r S_r, A = V_r^T, as
the FlowerTune benchmark's `FlexLoraLlm.distribute_weight_fast`), and the server's save
when round % --save-every == 0. The save is also timed once after the last round, so the
extrapolated 10-round job can count the template's saves (rounds 5 and 10).

Left out, compared with the real Simulation Engine: Ray (actor start-up, object store,
scheduling) and Flower's messages (NumPy serialisation of the adapter both ways); the
server's start-up `get_model`, which builds the initial adapter from a full model load
(here `app.models.initial_adapter`); evaluation rounds (the template runs none). Imports
happen once, before round 1, as in a long-lived Ray actor, and are reported apart. trl is
not installed, so `SFTTrainer` is replaced by the transformers `Trainer` it subclasses,
with our tokenized rows and `DataCollatorForSeq2Seq` (loss on the response only, as the
template's `DataCollatorForCompletionOnlyLM`): the same training loop, optimizer and steps.

Device command (one H100; bench/gpu_setup.sh makes the venv with datasets, flwr-datasets and
bitsandbytes, and both setup steps reuse what a warm machine kept in /var/tmp). FedAvg, 4
rounds, should take ~8 of the 10 minutes a call may run; FlexLoRA's dense step adds ~90 s a
round, so run it second, on the warm machine, with --flexlora --rounds 3 --json $OUT/seed_flexlora.json:
    run(command="bash bench/gpu_setup.sh /var/tmp/ftvenv && python3 bench/make_random_gemma2.py \
        --out /var/tmp/gemma2-9b-random --tokenizer .gpu-carry/tokenizer && PYTHONPATH=. HF_HUB_OFFLINE=1 \
        HF_DATASETS_OFFLINE=1 /var/tmp/ftvenv/bin/python bench/seed_mode.py --model /var/tmp/gemma2-9b-random \
        --data-files .gpu-carry/smoke-alpaca.json --quantization 4 --json $OUT/seed_fedavg.json",
        carry=[".gpu-carry/pack", ".gpu-carry/tokenizer", ".gpu-carry/smoke-alpaca.json"])
CPU dry run (tiny demo model from deploy/demo.py, no quantization, float32):
    PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python bench/seed_mode.py --model /tmp/seeddemo/tiny-gemma2 \
        --data-files /tmp/seeddemo/alpaca.json --quantization 0 --rounds 2 --max-steps 2 --seq-length 64 \
        --json /tmp/seed_fedavg.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Timed here, as a Ray actor pays them once: the heavy libraries, then our modules
# (datasets, flwr-datasets), which the template's ClientApp module imports too.
_start = time.perf_counter()
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments  # noqa: E402

LIBRARY_IMPORT_SECONDS = time.perf_counter() - _start

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
_start = time.perf_counter()
from app.aggregation import fedavg  # noqa: E402
from app.config import DatasetSettings, LoraSettings, ModelSettings, TrainSettings  # noqa: E402
from app.dataset import IGNORE_INDEX, load_partition, tokenize_partition  # noqa: E402
from app.models import initial_adapter, load_tokenizer  # noqa: E402
from app.train import cosine_learning_rate  # noqa: E402
from bench.qlora_step_check import build_template  # noqa: E402

APP_IMPORT_SECONDS = time.perf_counter() - _start

# The seed's settings (pyproject.toml [tool.flwr.app.config]).
DATASET = "vicgalle/alpaca-gpt4"
NUM_PARTITIONS = 20
FRACTION_TRAIN = 0.1
JOB_ROUNDS = 10  # num-server-rounds: the cosine's length and the extrapolated job's
BATCH_SIZE = 2
GRADIENT_ACCUMULATION = 4
LEARNING_RATE_MAX = 5e-5
LEARNING_RATE_MIN = 1e-6
LORA = LoraSettings(r=8, alpha=16, dropout=0.075, target_modules=("q_proj", "v_proj"))


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """The seed's: no EOS learned, one data order (the template's defaults)."""
    return TrainSettings(
        seq_length=args.seq_length,
        batch_size=BATCH_SIZE,
        gradient_accumulation_steps=GRADIENT_ACCUMULATION,
        logging_steps=1,
        max_steps=args.max_steps,
        learning_rate_max=LEARNING_RATE_MAX,
        learning_rate_min=LEARNING_RATE_MIN,
        save_every_round=5,
        seed=args.seed,
        max_trainings_per_gpu=0,
    )


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_client(
    partition_id: int,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    model_settings: ModelSettings,
    dataset_settings: DatasetSettings,
    args: argparse.Namespace,
) -> tuple[dict[str, torch.Tensor], int, dict]:
    """One template client call: everything rebuilt, --max-steps steps, the adapter back on the CPU."""
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    partition = load_partition(dataset_settings, partition_id, args.seed)
    tokenizer = load_tokenizer(model_settings)
    rows = tokenize_partition(partition, tokenizer, train_settings(args), dataset_settings, partition_id)
    model = build_template(model_settings, torch)
    set_peft_model_state_dict(model, global_state)
    synchronize()
    build_seconds = time.perf_counter() - start

    learning_rate = cosine_learning_rate(
        server_round, max(JOB_ROUNDS, args.rounds), LEARNING_RATE_MAX, LEARNING_RATE_MIN
    )
    with tempfile.TemporaryDirectory(prefix="seed-mode-trainer-") as scratch:
        training_args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=BATCH_SIZE,
            gradient_accumulation_steps=GRADIENT_ACCUMULATION,
            max_steps=args.max_steps,
            logging_steps=1,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            gradient_checkpointing=True,
            bf16=on_gpu,
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            include_num_input_tokens_seen="non_padding",
            disable_tqdm=True,
            dataloader_pin_memory=on_gpu,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=rows,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        )
        start = time.perf_counter()
        output = trainer.train()
        synchronize()
        train_seconds = time.perf_counter() - start
    tokens = int(trainer.state.num_input_tokens_seen)
    peak = torch.cuda.max_memory_allocated() if on_gpu else 0
    state = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(model).items()}
    # Reference counting alone frees the model here (checked on the CPU with a weakref), as when the
    # template's client object is dropped; no gc.collect, which the template never calls.
    del model, trainer
    torch.cuda.empty_cache()
    record = {
        "partition": partition_id,
        "num-examples": len(partition),
        "learning-rate": learning_rate,
        "train-loss": float(output.training_loss),
        "build-seconds": round(build_seconds, 4),
        "train-seconds": round(train_seconds, 4),
        "tokens": tokens,
        "tokens-per-second": round(tokens / train_seconds, 1),
        "peak-gpu-bytes": peak,
    }
    return state, len(partition), record


def dense_flexlora(
    states: list[dict[str, torch.Tensor]], weights: list[int], rank: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The seed's FlexLoRA: the full out x in update of every module, a full float32 SVD on it.

    All of S goes into B (B = U_r S_r, A = V_r^T), as the benchmark strategy does; our
    `app.aggregation.flexlora` gets the same B A from the factors alone.
    """
    total = sum(weights)
    result = {}
    for a_key in (key for key in states[0] if ".lora_A." in key):
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        delta = sum(w / total * (st[b_key].to(device) @ st[a_key].to(device)) for st, w in zip(states, weights))
        u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
        result[b_key] = (u[:, :rank] * sigma[:rank]).cpu()
        result[a_key] = vh[:rank].cpu()
    return {key: result[key] for key in states[0]}


def save_checkpoint(model_settings: ModelSettings, global_state: dict[str, torch.Tensor]) -> float:
    """The template's evaluate_fn save: a whole `get_model` just to write the adapter."""
    with tempfile.TemporaryDirectory(prefix="seed-mode-save-") as folder:
        start = time.perf_counter()
        model = build_template(model_settings, torch)
        set_peft_model_state_dict(model, global_state)
        model.save_pretrained(folder)
        synchronize()
        seconds = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return seconds


def saves_in_job(save_every: int) -> int:
    """The template saves when round % save-every-round == 0 and after the last round."""
    return sum(1 for r in range(1, JOB_ROUNDS + 1) if r % save_every == 0 or r == JOB_ROUNDS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="local model folder (config, weights, tokenizer)")
    ap.add_argument("--data-files", required=True, help="Alpaca-format json file(s), comma-separated")
    ap.add_argument("--quantization", type=int, choices=(0, 4), default=4, help="0 only for a CPU dry run")
    ap.add_argument("--rounds", type=int, default=4, help="rounds to run; the first is the warm-up")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--flexlora", action="store_true", help="dense FlexLoRA instead of FedAvg")
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    if args.quantization and not on_gpu:
        ap.error("--quantization 4 needs a CUDA GPU; use 0 for the CPU dry run")

    import_seconds = LIBRARY_IMPORT_SECONDS
    if args.quantization:
        start = time.perf_counter()
        import bitsandbytes  # noqa: F401  (transformers would import it at the first load)

        import_seconds += time.perf_counter() - start

    model_settings = ModelSettings(
        name=args.model, quantization=args.quantization, gradient_checkpointing=True, lora=LORA
    )
    dataset_settings = DatasetSettings(
        name=DATASET,
        num_partitions=NUM_PARTITIONS,
        data_files=tuple(f.strip() for f in args.data_files.split(",") if f.strip()),
    )
    clients_per_round = max(1, int(FRACTION_TRAIN * NUM_PARTITIONS))  # Flower's FedAvg sampling
    aggregation_device = torch.device("cuda" if on_gpu else "cpu")
    sampler = random.Random(args.seed)
    global_state = initial_adapter(model_settings, args.seed)

    rounds = []
    for server_round in range(1, args.rounds + 1):
        round_start = time.perf_counter()
        partitions = sampler.sample(range(NUM_PARTITIONS), clients_per_round)
        states, sizes, clients = [], [], []
        for partition_id in partitions:
            state, size, record = run_client(
                partition_id, server_round, global_state, model_settings, dataset_settings, args
            )
            states.append(state)
            sizes.append(size)
            clients.append(record)

        start = time.perf_counter()
        if args.flexlora:
            global_state = dense_flexlora(states, sizes, LORA.r, aggregation_device)
        else:
            global_state = fedavg(states, sizes)
        synchronize()
        aggregate_seconds = time.perf_counter() - start
        save_seconds = save_checkpoint(model_settings, global_state) if server_round % args.save_every == 0 else 0.0
        round_seconds = time.perf_counter() - round_start

        split = {
            "startup": round(sum(c["build-seconds"] for c in clients), 4),
            "training": round(sum(c["train-seconds"] for c in clients), 4),
            "aggregation": round(aggregate_seconds, 4),
            "save": round(save_seconds, 4),
        }
        # Trainer construction, the adapter's copy to the CPU, freeing the model: no phase above.
        split["other"] = round(round_seconds - sum(split.values()), 4)
        rounds.append(
            {
                "round": server_round,
                "partitions": partitions,
                "clients": clients,
                "aggregate-seconds": split["aggregation"],
                "save-seconds": split["save"],
                "round-seconds": round(round_seconds, 4),
                "split": split,
            }
        )
        print(
            f"round {server_round}: partitions {partitions} | {round_seconds:.1f} s = startup {split['startup']:.1f}"
            f" + training {split['training']:.1f} + aggregation {split['aggregation']:.2f} + save {split['save']:.1f}"
            f" + other {split['other']:.1f}"
            f" | tokens {sum(c['tokens'] for c in clients)}"
            f" | peak GiB {max(c['peak-gpu-bytes'] for c in clients) / 2**30:.2f}",
            flush=True,
        )

    final_save_seconds = save_checkpoint(model_settings, global_state)
    print(f"save (measured once, after round {args.rounds}): {final_save_seconds:.1f} s", flush=True)

    # Rounds without their save: the job's saves are counted apart, at the measured cost.
    without_save = [r["round-seconds"] - r["save-seconds"] for r in rounds]
    median_round = statistics.median(without_save[1:]) if len(rounds) > 1 else None
    job_saves = saves_in_job(args.save_every)
    extrapolated = None
    if median_round is not None:
        extrapolated = (
            import_seconds
            + APP_IMPORT_SECONDS
            + without_save[0]
            + (JOB_ROUNDS - 1) * median_round
            + job_saves * final_save_seconds
        )
    result = {
        "what": "the seed's Simulation Engine pipeline re-created in one process (bench/seed_mode.py)",
        "settings": {
            **{k.replace("_", "-"): v for k, v in vars(args).items() if k != "json"},
            "aggregation": "flexlora-dense" if args.flexlora else "fedavg",
            "dataset": DATASET,
            "num-partitions": NUM_PARTITIONS,
            "clients-per-round": clients_per_round,
            "batch-size": BATCH_SIZE,
            "gradient-accumulation-steps": GRADIENT_ACCUMULATION,
            "learning-rate-max": LEARNING_RATE_MAX,
            "learning-rate-min": LEARNING_RATE_MIN,
            "lora": {"r": LORA.r, "alpha": LORA.alpha, "dropout": LORA.dropout, "targets": list(LORA.target_modules)},
            "job-rounds": JOB_ROUNDS,
        },
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "import-seconds": round(import_seconds, 4),
        "import-modules": ["torch", "transformers", "peft"] + (["bitsandbytes"] if args.quantization else []),
        "app-import-seconds": round(APP_IMPORT_SECONDS, 4),
        "rounds": rounds,
        "median-round-seconds": None if median_round is None else round(median_round, 4),
        "median-round-note": "median over rounds 2.. (round 1 is the warm-up), each without its save",
        "save-seconds": round(final_save_seconds, 4),
        "save-measured-once": True,
        "saves-in-job": job_saves,
        "extrapolated-10-round-job-seconds": None if extrapolated is None else round(extrapolated, 1),
        # With --rounds 10 the whole job ran: imports and every round, with the saves of every
        # --save-every rounds (the template's 5 and 10 by default).
        "measured-job-seconds": round(import_seconds + APP_IMPORT_SECONDS + sum(r["round-seconds"] for r in rounds), 1)
        if args.rounds == JOB_ROUNDS
        else None,
        "extrapolation": (
            "EXTRAPOLATED, not measured: import-seconds + app-import-seconds + round 1 (without its save) "
            f"+ {JOB_ROUNDS - 1} x median-round-seconds + saves-in-job x save-seconds"
        ),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
