"""FlowerTune's General NLP score (MMLU: STEM, social sciences, humanities) of a run's adapter.

The leaderboard ranks a General NLP adapter by what Flower's benchmarks/flowertune-llm/evaluation/
general-nlp (eval.py, benchmarks.py, utils.py) measures; this puts the same numbers in the run's own
report: same category table, prompt, greedy decoding of as many tokens as the gold letter has, answer
rule (`utils.format_answer`) and 4-bit load. Differences: questions come from `cais/mmlu` (the test
questions of the reference's script dataset `lukaemon/mmlu`, which current `datasets` cannot load) or
local files, and prompts go through the model in left-padded batches, not one at a time. It reads and
writes what the app's runs leave (run.json, round-N adapters, summary.json), so it lives in the app;
`deploy eval` (deploy/evaluation.py) is only its command line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any


class EvaluationError(ValueError):
    """Questions, a model or a folder that cannot be evaluated: `deploy eval` prints the one-line
    message, which names the option to change, and exits 2."""


HUB_DATA = "cais/mmlu"
INSTRUCTION = "Answer the following multiple choice question."
LETTERS = "ABCD"
MMLU_CATEGORY = {  # the reference's benchmarks.MMLU_CATEGORY
    "stem": """abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science
        college_mathematics college_physics computer_security conceptual_physics electrical_engineering
        elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science
        high_school_mathematics high_school_physics high_school_statistics machine_learning""".split(),
    "social_sciences": """econometrics high_school_geography high_school_government_and_politics
        high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality
        professional_psychology public_relations security_studies sociology us_foreign_policy""".split(),
    "humanities": """formal_logic high_school_european_history high_school_us_history high_school_world_history
        international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory
        professional_law world_religions""".split(),
    "other": """business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing
        medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology""".split(),
}
SUBJECT_CATEGORY = {subject: cat for cat, subjects in MMLU_CATEGORY.items() for subject in subjects}
DEFAULT_CATEGORIES = ("stem", "social_sciences", "humanities")


def format_prompt(row: dict[str, Any]) -> str:
    """utils.format_example, benchmarks.infer_mmlu's instruction and inference()'s chat wrapper."""
    question = row["question"]
    if not question.endswith("?") and not question.endswith("."):
        question += "?"
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(row["choices"]))
    prompt = f"{INSTRUCTION}\nQuestion: {question}\n\nOptions:\n{options}\nThe answer is:\n"
    return f"<|im_start|>question\n{prompt}<|im_end|>\n<|im_start|>answer\n"


def extract_answer(text: str) -> str | None:
    """utils.format_answer for "mcq": the first character of the lowercased output once
    everything but letters and digits is gone (after a "\\n##" heading if there is one);
    an answer only if it is a-e. "C) 4" gives C, "The answer is C" gives None (T)."""
    output = text.lower()
    if "\n##" in output:
        output = output.split("\n##")[1].split("\n")[0].strip()
    output = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", output).strip())
    return output[0].upper() if output and output[0] in "abcde" else None


def tally(rows: Sequence[dict[str, Any]], predictions: Sequence[str | None]) -> dict[str, dict[str, int]]:
    """Correct and total answers per category, in MMLU_CATEGORY's order."""
    counts = {cat: {"correct": 0, "total": 0} for cat in MMLU_CATEGORY if any(r["category"] == cat for r in rows)}
    for row, predicted in zip(rows, predictions, strict=True):
        counts[row["category"]]["total"] += 1
        counts[row["category"]]["correct"] += int(predicted == row["answer"])
    return counts


def score(rows: Sequence[dict[str, Any]], predictions: Sequence[str | None]) -> dict[str, float]:
    """Accuracy per category (the reference's accuracy_score over one category's questions)
    and "average": the mean of the categories' accuracies, as the leaderboard's Avg column."""
    accuracy = {cat: c["correct"] / c["total"] for cat, c in tally(rows, predictions).items()}
    return {**accuracy, "average": sum(accuracy.values()) / len(accuracy) if accuracy else 0.0}


def _row(raw: dict[str, Any]) -> dict[str, Any]:
    """A cais/mmlu row (answer 0-3) with its category and gold letter."""
    if raw["answer"] not in range(4) or len(raw["choices"]) != 4:
        raise EvaluationError(f"--data: question {raw['question'][:40]!r} needs 4 choices and an answer 0-3")
    return {**raw, "category": SUBJECT_CATEGORY.get(raw["subject"], "other"), "answer": LETTERS[raw["answer"]]}


def _load_raw(data: str | None):
    import datasets

    if data is None:
        try:
            return datasets.load_dataset(HUB_DATA, "all", split="test")
        except Exception as err:  # offline, or the hub refused: say what to do instead
            raise EvaluationError(
                f"cannot load {HUB_DATA} ({type(err).__name__}); pass --data with local MMLU files"
            ) from None
    path = Path(data).expanduser()
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".parquet")) if path.is_dir() else [path]
    )
    if not files or not all(f.is_file() for f in files):
        raise EvaluationError(f"--data {data}: no such file, or a folder without .json/.jsonl/.parquet files")
    kind = "parquet" if files[0].suffix == ".parquet" else "json"
    dataset = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    if missing := {"question", "subject", "choices", "answer"} - set(dataset.column_names):
        raise EvaluationError(f"--data {data}: missing MMLU columns {', '.join(sorted(missing))}")
    return dataset


def load_questions(data: str | None, categories: Sequence[str], limit_per_category: int | None = None) -> list[dict]:
    """These categories' test questions, in MMLU_CATEGORY's order; with a limit, each subject's in turn."""
    rows = [_row(raw) for raw in _load_raw(data) if SUBJECT_CATEGORY.get(raw["subject"]) in categories]
    chosen = []
    for cat in (c for c in MMLU_CATEGORY if c in categories):
        by_subject = [[r for r in rows if r["subject"] == s] for s in MMLU_CATEGORY[cat]]
        order = chain.from_iterable(zip_longest(*by_subject) if limit_per_category else by_subject)
        picked = [r for r in order if r is not None]
        if not picked:
            raise EvaluationError(f"--categories {cat}: no questions of this category in {data or HUB_DATA}")
        chosen += picked[:limit_per_category]
    return chosen


def load_model(base: str, adapter: Path | None, quantization: int):
    """The reference's load for 4 (fp4, float32 compute) and 8 bits, on the GPU; 0: bf16 on
    a GPU, float32 on the CPU (bitsandbytes needs CUDA; bf16 matmuls on a CPU are slow)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from app.models import peft_quietly

    on_gpu = torch.cuda.is_available()
    if quantization and not on_gpu:
        raise EvaluationError(f"--quantization {quantization}: needs a CUDA GPU; pass --quantization 0 on the CPU")
    config = BitsAndBytesConfig(**{f"load_in_{quantization}bit": True}) if quantization else None
    dtype = {4: torch.float32, 8: torch.float16}.get(quantization, torch.bfloat16 if on_gpu else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(  # eager attention: Gemma2's soft-capping, exact
        base,
        quantization_config=config,
        dtype=dtype,
        device_map={"": 0} if on_gpu else None,
        attn_implementation="eager",
    )
    if adapter is not None:
        with peft_quietly():
            model = PeftModel.from_pretrained(model, str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def evaluate(
    model, tokenizer, questions: Sequence[dict], batch_size: int = 16, max_new_tokens: int | None = None
) -> dict:
    """Greedy answers to every question, batch by batch. Without max_new_tokens each batch
    generates as many tokens as its first gold letter has, as the reference does."""
    import torch

    predictions = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        new = max_new_tokens or len(tokenizer(batch[0]["answer"], add_special_tokens=False)["input_ids"])
        inputs = tokenizer([format_prompt(q) for q in batch], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for q, text in zip(
            batch, tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ):
            predictions.append(
                {
                    "subject": q["subject"],
                    "category": q["category"],
                    "answer": q["answer"],
                    "output": text,
                    "predicted": extract_answer(text),
                }
            )
    letters = [p["predicted"] for p in predictions]
    return {"scores": score(questions, letters), "counts": tally(questions, letters), "predictions": predictions}


def record(run_dir: Path, scores: dict[str, float]) -> Path:
    """Merge name -> accuracy into summary.json's "evaluation" and rewrite summary.md."""
    from app.report import SUMMARY_JSON, SUMMARY_MD, markdown, write_summary

    path = run_dir / SUMMARY_JSON
    summary = json.loads(path.read_text()) if path.is_file() else write_summary(run_dir)
    summary.setdefault("evaluation", {}).update(scores)
    path.write_text(json.dumps(summary, indent=1))
    (run_dir / SUMMARY_MD).write_text(markdown(summary))
    return path


def resolve_target(path: Path) -> tuple[Path | None, Path | None, str | None]:
    """(run folder or None, adapter or None, base model name) for a run folder, whose newest
    round-N adapter it takes, or for an adapter folder (a run's round-N, or any other)."""
    if (path / "run.json").is_file():
        rounds = [
            (int(m[1]), d)
            for d in path.iterdir()
            if (m := re.fullmatch(r"round-(\d+)", d.name)) and (d / "adapter_config.json").is_file()
        ]
        return path, max(rounds)[1] if rounds else None, json.loads((path / "run.json").read_text())["model"]["name"]
    if (path / "adapter_config.json").is_file():
        run = path.parent if (path.parent / "run.json").is_file() else None
        return run, path, json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    raise EvaluationError(
        f"RUN_OR_ADAPTER {path}: neither a run folder (run.json) nor an adapter folder (adapter_config.json)"
    )


def store(run: Path, key_prefix: str, result: dict) -> list[str]:
    """summary.json/.md's evaluation entries and the answers, as the reference's generation_*.jsonl."""
    scores = {f"{key_prefix}mmlu-{name.replace('_', '-')}": value for name, value in result["scores"].items()}
    with (run / f"{key_prefix}mmlu-generations.jsonl").open("w") as f:
        f.writelines(json.dumps(p) + "\n" for p in result["predictions"])
    record(run, scores)
    return list(scores)
