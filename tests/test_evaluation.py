"""`deploy eval`: FlowerTune's MMLU prompt, answer rule and scoring, and real runs on the tiny Gemma2."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from app import evaluation
from app.checkpoint import save_adapter
from app.config import AppConfig
from app.evaluation import EvaluationError
from app.models import initial_adapter
from app.report import write_summary
from deploy.cli import parser
from deploy.errors import DeployError
from deploy.evaluation import cmd_eval

pytestmark = pytest.mark.unit

# Three subjects' questions per category, plus "other" ones a default run leaves out.
# Gold letters: stem A,A,B,C (2 of 4 are A), social sciences A,B,C,D (1 of 4), humanities A,A,A,A.
SUBJECTS = {
    "stem": [("anatomy", 0), ("astronomy", 0), ("machine_learning", 1), ("anatomy", 2)],
    "social_sciences": [("sociology", 0), ("econometrics", 1), ("sociology", 2), ("public_relations", 3)],
    "humanities": [("philosophy", 0), ("prehistory", 0), ("world_religions", 0), ("philosophy", 0)],
    "other": [("marketing", 0), ("virology", 1)],
}
ALL_A = {"stem": 0.5, "social_sciences": 0.25, "humanities": 1.0}  # accuracy of a model that always answers A


def mmlu_rows() -> list[dict]:
    words = "river mountain garden letter window planet engine market winter silver music paper".split()
    return [
        {
            "question": f"Which {words[i % 12]} is {words[(i + 5) % 12]}",
            "subject": subject,
            "choices": [words[(i + j) % len(words)] for j in range(4)],
            "answer": answer,
        }
        for i, (subject, answer) in enumerate(row for rows in SUBJECTS.values() for row in rows)
    ]


@pytest.fixture()
def mmlu_file(tmp_path):
    path = tmp_path / "mmlu.json"
    path.write_text(json.dumps(mmlu_rows()))
    return path


def eval_args(*argv) -> argparse.Namespace:
    """`deploy eval ...` as the deploy tool's own parser reads it."""
    return parser().parse_args(["eval", *map(str, argv)])


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "output, letter",
    [
        ("A", "A"),
        (" b", "B"),
        ("C) 4", "C"),
        ("(d).", "D"),
        ("**B**", "B"),
        ("ab", "A"),
        ("e", "E"),  # the reference accepts a-e; no MMLU answer is E, so it only ever scores wrong
        ("The answer is C", None),
        ("", None),
        (" \n ", None),
        ("1. A", None),
        ("yes", None),
        ("Answer: C", "A"),  # its first letter once the punctuation is gone: the reference's rule, kept
        ("Let me think\n## c. 4\nso", "C"),  # after a "\n##" heading, the heading's line
    ],
)
def test_extract_answer_follows_the_reference_rule(output, letter):
    assert evaluation.extract_answer(output) == letter


@pytest.mark.timeout(30)
def test_prompt_is_the_references():
    row = {"question": "What is 2+2", "choices": ["1", "2", "3", "4"]}
    assert evaluation.format_prompt(row) == (
        "<|im_start|>question\nAnswer the following multiple choice question.\nQuestion: What is 2+2?\n\n"
        "Options:\nA. 1\nB. 2\nC. 3\nD. 4\nThe answer is:\n<|im_end|>\n<|im_start|>answer\n"
    )
    # A question ending in "?" or "." gets no extra "?".
    assert "Question: Pick one.\n\n" in evaluation.format_prompt({**row, "question": "Pick one."})


@pytest.mark.timeout(30)
def test_category_table_covers_the_57_subjects_once():
    subjects = [s for names in evaluation.MMLU_CATEGORY.values() for s in names]
    assert len(subjects) == len(set(subjects)) == len(evaluation.SUBJECT_CATEGORY) == 57
    assert [len(evaluation.MMLU_CATEGORY[c]) for c in ("stem", "social_sciences", "humanities", "other")] == [
        19,
        12,
        13,
        13,
    ]
    assert evaluation.SUBJECT_CATEGORY["formal_logic"] == "humanities"
    assert evaluation.SUBJECT_CATEGORY["econometrics"] == "social_sciences"
    assert evaluation.SUBJECT_CATEGORY["computer_security"] == "stem"


@pytest.mark.timeout(30)
def test_score_is_per_category_and_averages_the_categories():
    rows = [
        {"category": c, "answer": a}
        for c, a in [
            ("stem", "A"),
            ("stem", "B"),
            ("stem", "C"),
            ("stem", "D"),
            ("humanities", "A"),
            ("social_sciences", "B"),
            ("social_sciences", "C"),
        ]
    ]
    predicted = ["A", "B", "C", None, "B", "B", "E"]
    assert evaluation.tally(rows, predicted) == {
        "stem": {"correct": 3, "total": 4},
        "social_sciences": {"correct": 1, "total": 2},
        "humanities": {"correct": 0, "total": 1},
    }
    scores = evaluation.score(rows, predicted)
    assert scores == pytest.approx({"stem": 0.75, "social_sciences": 0.5, "humanities": 0.0, "average": 1.25 / 3})
    assert scores["average"] != pytest.approx(4 / 7)  # not pooled over questions, as the leaderboard's Avg


def assert_refused(reliability, what: str, message: str, call, *args) -> None:
    """`call(*args)` stops with a one-line error matching `message`, which `deploy eval` prints
    before exiting 2: a bad input refused."""
    with pytest.raises((DeployError, EvaluationError), match=message) as error:
        call(*args)
    assert "\n" not in str(error.value)
    reliability.record("bad input", what, str(error.value))


@pytest.mark.timeout(120)
def test_load_questions_from_local_files(mmlu_file, tmp_path, reliability):
    questions = evaluation.load_questions(str(mmlu_file), evaluation.DEFAULT_CATEGORIES)
    assert [q["category"] for q in questions] == ["stem"] * 4 + ["social_sciences"] * 4 + ["humanities"] * 4
    assert [q["answer"] for q in questions[:4]] == ["A", "C", "A", "B"]
    # Ordered by the category table's subjects; a limit takes each subject's questions in turn.
    assert [q["subject"] for q in questions[:4]] == ["anatomy", "anatomy", "astronomy", "machine_learning"]
    limited = evaluation.load_questions(str(mmlu_file), ["stem", "other"], limit_per_category=3)
    assert [q["subject"] for q in limited] == ["anatomy", "astronomy", "machine_learning", "marketing", "virology"]

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "part.jsonl").write_text("\n".join(json.dumps(r) for r in mmlu_rows()))
    assert evaluation.load_questions(str(tmp_path / "folder"), ["humanities"]) == questions[8:]

    stem_only = str(_write(tmp_path / "stem.json", mmlu_rows()[:4]))
    no_answers = str(_write(tmp_path / "bad.json", [{"question": "q", "subject": "anatomy"}]))
    for what, message, data, categories in [
        ("MMLU questions with none of the asked category", "--categories other: no questions", stem_only, ["other"]),
        ("MMLU rows without answer and choices", "missing MMLU columns answer, choices", no_answers, ["stem"]),
        ("MMLU data that does not exist", "--data .*no such file", str(tmp_path / "missing.json"), ["stem"]),
    ]:
        assert_refused(reliability, f"deploy eval: {what}", message, evaluation.load_questions, data, categories)


def _write(path, rows):
    path.write_text(json.dumps(rows))
    return path


def make_run(run_config, folder):
    """A run folder as RunRecorder leaves it before round 1: run.json, an empty metrics.jsonl."""
    config = AppConfig.from_run_config(run_config)
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(dataclasses.asdict(config), default=str))
    (folder / "metrics.jsonl").write_text("")
    return config


def train_always_a(demo, config, questions):
    """A LoRA adapter (the run's own settings) trained until the tiny model's first answer
    token to every prompt reads as answer A: its MMLU accuracies are then known, ALL_A.
    The token is a word such as "and": the tiny tokenizer's "A" is a byte token, special,
    which decoding drops as the reference's `skip_special_tokens=True` does."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.models import lora_config

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(demo.model_dir)
    reads = [evaluation.extract_answer(tokenizer.decode([i], skip_special_tokens=True)) for i in range(len(tokenizer))]
    target = reads.index("A")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo.model_dir), lora_config(config.model)).eval()
    prompts = [tokenizer(evaluation.format_prompt(q), return_tensors="pt") for q in questions]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(100):
        last = torch.cat([model(**p).logits[:, -1] for p in prompts])
        if bool((last.argmax(-1) == target).all()):
            return get_peft_model_state_dict(model)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(last, torch.full((len(prompts),), target)).backward()
        optimizer.step()
    raise AssertionError("the adapter did not learn to answer A")


@pytest.mark.timeout(300)
def test_evaluate_generates_through_the_model_batch_invariant(demo, mmlu_file):
    questions = evaluation.load_questions(str(mmlu_file), evaluation.DEFAULT_CATEGORIES)
    model, tokenizer = evaluation.load_model(str(demo.model_dir), None, 0)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    result = evaluation.evaluate(model, tokenizer, questions, batch_size=4, max_new_tokens=3)
    assert set(result) == {"scores", "counts", "predictions"}
    assert list(result["scores"]) == ["stem", "social_sciences", "humanities", "average"]
    predictions = result["predictions"]
    assert len(predictions) == len(questions)
    assert all(p["predicted"] == evaluation.extract_answer(p["output"]) for p in predictions)
    for category, counts in result["counts"].items():
        mine = [p for p in predictions if p["category"] == category]
        assert counts == {"correct": sum(p["predicted"] == p["answer"] for p in mine), "total": len(mine)}
        assert 0.0 <= result["scores"][category] == counts["correct"] / counts["total"] <= 1.0
    assert result["scores"]["average"] == pytest.approx(sum(result["scores"][c] for c in result["counts"]) / 3)
    # Left padding changes nothing: batches of 4 answer exactly as one prompt at a time.
    single = evaluation.evaluate(model, tokenizer, questions, batch_size=1, max_new_tokens=3)
    assert [p["output"] for p in single["predictions"]] == [p["output"] for p in predictions]


@pytest.mark.timeout(300)
def test_deploy_eval_records_scores_in_the_run_summary(demo, run_config, mmlu_file, tmp_path, reliability):
    run = tmp_path / "results" / "run1"
    config = make_run(run_config, run)
    assert_refused(
        reliability,
        "deploy eval of a run folder with no round-N adapter yet",
        "without a round-N adapter",
        cmd_eval,
        eval_args(run, "--data", mmlu_file, "--quantization", 0),
    )
    questions = evaluation.load_questions(str(mmlu_file), evaluation.DEFAULT_CATEGORIES)
    save_adapter(initial_adapter(config.model, 1), config.model, run / "round-1")
    save_adapter(train_always_a(demo, config, questions), config.model, run / "round-10")  # newest: 10, not 2 by name
    save_adapter(initial_adapter(config.model, 2), config.model, run / "round-2")

    assert cmd_eval(eval_args(run, "--data", mmlu_file, "--quantization", 0, "--batch-size", 4)) == 0
    evaluated = json.loads((run / "summary.json").read_text())["evaluation"]
    expected = {"mmlu-stem": 0.5, "mmlu-social-sciences": 0.25, "mmlu-humanities": 1.0, "mmlu-average": 1.75 / 3}
    assert evaluated == pytest.approx(expected)
    answers = [json.loads(line) for line in (run / "mmlu-generations.jsonl").read_text().splitlines()]
    assert len(answers) == 12 and all(a["predicted"] == "A" and a["output"].strip() for a in answers)

    # The base alone, and round 1 (LoRA B still zero) on 2 questions a category, get keys of their own.
    assert cmd_eval(eval_args(run, "--base-only", "--data", mmlu_file, "--quantization", 0)) == 0
    assert cmd_eval(eval_args(run / "round-1", "--data", mmlu_file, "--quantization", 0, "--limit", 2)) == 0
    evaluated = json.loads((run / "summary.json").read_text())["evaluation"]
    assert set(evaluated) == {
        f"{p}mmlu-{c}"
        for p in ("", "base-", "round-1-limit2-")
        for c in ("stem", "social-sciences", "humanities", "average")
    }
    assert {k: v for k, v in evaluated.items() if k.startswith("mmlu-")} == pytest.approx(expected)
    assert all(0.0 <= v <= 1.0 for v in evaluated.values())
    markdown = (run / "summary.md").read_text()
    assert "| mmlu-stem | 0.5000 |" in markdown and "| mmlu-average | 0.5833 |" in markdown
    assert "| base-mmlu-humanities |" in markdown
    # The ServerApp's next rewrite of the summary keeps the scores.
    assert write_summary(run)["evaluation"] == evaluated
    assert "| mmlu-humanities | 1.0000 |" in (run / "summary.md").read_text()


@pytest.mark.timeout(120)
def test_bad_input_is_one_line_deploy_error(demo, run_config, tmp_path, mmlu_file, reliability, capsys):
    run = tmp_path / "run"
    make_run(run_config, run)
    cases = [
        ((), "RUN_OR_ADAPTER: required unless --base-only"),
        (("--base-only",), "--model: needed"),
        ((tmp_path,), "neither a run folder"),
        (
            (run, "--base-only", "--categories", "stem,arts"),
            "--categories 'stem,arts': a comma-separated choice of stem,",
        ),
        ((run, "--base-only", "--batch-size", 0), "--batch-size 0: must be a positive integer"),
        ((run, "--base-only", "--limit", -1), "--limit -1: must be a positive integer"),
        ((run, "--base-only", "--data", tmp_path / "none.json"), "--data .*none.json: no such file"),
    ]
    for argv, message in cases:
        command = " ".join(["deploy eval", *map(str, argv)])
        assert_refused(reliability, command, message, cmd_eval, eval_args(*argv))
    with pytest.raises(SystemExit) as exit_:  # argparse: "invalid choice: 3 (choose from 4, 8, 0)", exit 2
        eval_args(run, "--quantization", 3)
    assert exit_.value.code == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]  # after the usage lines
    reliability.record("bad input", f"deploy eval {run} --quantization 3", f"exit {exit_.value.code}: {said}")
    import torch

    if not torch.cuda.is_available():
        assert_refused(
            reliability,
            f"deploy eval {run} --base-only (4-bit) without a CUDA GPU",
            "--quantization 4: needs a CUDA GPU",
            cmd_eval,
            eval_args(run, "--base-only", "--data", mmlu_file),
        )
