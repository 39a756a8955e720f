"""Our client training step against the FlowerTune template's, loss by loss, on the CPU.

Why: the app claims to reproduce the FlowerTune LLM "General NLP" pipeline. This runs the
template's own client step (its dataset.py and models.py, rendered from the `flwr new`
templates of flwr 1.24.0, the last release that shipped them; trl 0.8.1's SFTTrainer and
DataCollatorForCompletionOnlyLM, the trl its pyproject pins) and ours (app.dataset,
app.models.build_model, app.train.train_round) on the same tiny random Gemma2, the same
partition rows, initial adapter, seed, learning rate, batch and steps, and reports the
per-step losses. Both share every value that is a run-config setting (read from our
pyproject at run time); the template keeps what it hard-codes (prompt, masking, LoRA
dropout 0.075, constant schedule, fp32, checkpointing). Pass the settings that make ours
behave like the template (or unlike it) with --run-config, Flower's syntax, and rerun.

    .venv/bin/python bench/fidelity/template_step.py --label today
    .venv/bin/python bench/fidelity/template_step.py --label learn-eos --run-config 'train.learn-eos=true'

First run: pip downloads flwr==1.24.0 (templates only, not installed) and installs
trl==0.8.1 + omegaconf 2.3.0 with --no-deps under --work; they go last on sys.path.
Not reproducible on a CPU: the template's 4-bit load (both sides load fp32 weights).
Output: bench/fidelity/<label>.json and .txt.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import string
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TEMPLATE_FLWR, TEMPLATE_TRL = "1.24.0", "0.8.1"
TPL = "flwr/cli/new/templates/app/"
RENDER = dict(
    project_name="tpl_app",
    import_name="tpl_app",
    package_name="tpl_app",
    username="flwrlabs",
    llm_challenge_str="generalnlp",
    fraction_train="0.1",
    dataset_name="flwrlabs/alpaca-gpt4",
    num_clients="20",
)


def fetch_template(work: Path) -> tuple[Path, dict]:
    """Render the template's dataset.py/models.py into an importable package; its pyproject's config."""
    pip = [sys.executable, "-m", "pip", "-q"]
    site, pkg = work / "site", work / "tpl_app"
    if not (site / "trl").is_dir():
        subprocess.run(
            pip
            + [
                "install",
                "--no-deps",
                "--target",
                str(site),
                f"trl=={TEMPLATE_TRL}",
                "omegaconf==2.3.0",
                "antlr4-python3-runtime==4.9.3",
            ],
            check=True,
        )
    wheel = work / f"flwr-{TEMPLATE_FLWR}-py3-none-any.whl"
    if not wheel.is_file():
        subprocess.run(pip + ["download", "--no-deps", "-d", str(work), f"flwr=={TEMPLATE_FLWR}"], check=True)
    pkg.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        read = lambda name: string.Template(zf.read(TPL + name).decode()).substitute(RENDER)  # noqa: E731
        (pkg / "__init__.py").write_text("")
        for mod in ("dataset", "models"):
            (pkg / f"{mod}.py").write_text(read(f"code/flwr_tune/{mod}.py.tpl"))
        pyproject = tomllib.loads(read("pyproject.flowertune.toml.tpl"))
    sys.path.append(str(site))  # last: trl/omegaconf come from here, everything else from the venv
    sys.path.insert(0, str(work))
    return pkg, pyproject["tool"]["flwr"]["app"]["config"]


def gemma_like_bos(model_dir: Path) -> None:
    """The demo tokenizer adds no BOS with add_special_tokens=True; Gemma's does. Make it so."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    tok.save(str(model_dir / "tokenizer.json"))


def run_config(args, assets) -> dict:
    """pyproject's run config; overrides found by key suffix so renamed sections still resolve."""
    from flwr.common.config import flatten_dict, parse_config_args

    flat = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])

    def key(suffix: str) -> str:
        hits = [k for k in flat if k == suffix or k.endswith("." + suffix)]
        if len(hits) != 1:
            raise SystemExit(f"pyproject run config: {len(hits)} keys end with {suffix!r}: {hits}")
        return hits[0]

    must = {
        key("model.name"): str(assets.model_dir),
        key("data-files"): str(assets.data_file),
        key("quantization"): 0,
        key("model.gradient-checkpointing"): False,
        key("max-steps"): args.steps,
    }
    user = parse_config_args([args.run_config]) if args.run_config else {}
    unknown = sorted(set(user) - set(flat))
    if unknown:
        raise SystemExit(f"--run-config: keys not in pyproject: {unknown}")
    return {**flat, **must, **user}


def losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


def call(fn, **available):
    """Call our function with the arguments its signature names (they change as the app does)."""
    return fn(**{k: v for k, v in available.items() if k in inspect.signature(fn).parameters})


def ours_step(config, rows, adapter, server_round):
    import app.train as train_mod
    from app.dataset import tokenize_partition
    from app.models import build_model, load_tokenizer

    seen = []

    class Recording(train_mod.Trainer):  # the same Trainer, its log history kept
        def train(self, *a, **k):
            out = super().train(*a, **k)
            seen.append((self.state.log_history, str(self.args.optim)))
            return out

    train_mod.Trainer = Recording
    tokenizer = load_tokenizer(config.model)
    data = call(
        tokenize_partition,
        partition=rows,
        tokenizer=tokenizer,
        train=config.train,
        dataset=config.dataset,
        seq_length=config.train.seq_length,
    )
    model = build_model(config.model)
    _, metrics = call(
        train_mod.train_round,
        model=model,
        tokenizer=tokenizer,
        dataset=data,
        config=config,
        server_round=server_round,
        adapter=adapter,
    )
    attn = model.base_model.model.config._attn_implementation
    return losses(seen[0][0]), metrics["learning-rate"], data, f"{attn}, optim {seen[0][1]}"


def template_step(config, rows, adapter, server_round, tpl_config, work):
    """The template's client_app.train, minus Flower messages and the CUDA-only 4-bit load."""
    import torch
    from omegaconf import DictConfig
    from peft import set_peft_model_state_dict
    from tpl_app import dataset as tds
    from tpl_app import models as tmodels
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from trl import SFTTrainer

    class CPULoader:  # models.get_model's from_pretrained without BitsAndBytes; fp32 like ours on CPU
        @staticmethod
        def from_pretrained(name, quantization_config=None, torch_dtype=None, **kw):
            return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kw)

    tmodels.AutoModelForCausalLM, tmodels.BitsAndBytesConfig = CPULoader, (lambda **kw: None)

    class TokenizerShim(Trainer):  # trl 0.8.1 passes tokenizer=, transformers 5 wants processing_class=
        def __init__(self, *a, tokenizer=None, **kw):
            super().__init__(*a, processing_class=tokenizer, **kw)

    TemplateSFT = type("TemplateSFT", (SFTTrainer, TokenizerShim), {})

    lora = config.model.lora
    trainset = tds.reformat(rows, llm_task=RENDER["llm_challenge_str"])
    tokenizer, collator, formatting = tds.get_tokenizer_and_data_collator_and_propt_formatting(config.model.name)
    model_cfg = DictConfig(
        {
            "name": config.model.name,
            "quantization": 4,
            "gradient_checkpointing": True,
            "lora": {"peft_lora_r": lora.r, "peft_lora_alpha": lora.alpha},
        }
    )
    model = tmodels.get_model(model_cfg)
    # What prepare_model_for_kbit_training does for a 4-bit model and skips for our fp32 one.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    set_peft_model_state_dict(model, adapter)
    lr = tmodels.cosine_annealing(
        server_round, config.strategy.num_rounds, config.train.learning_rate_max, config.train.learning_rate_min
    )
    targs = tds.replace_keys(tpl_config["train"]["training-arguments"])
    shared = dict(
        per_device_train_batch_size=config.train.batch_size,
        max_steps=config.train.max_steps,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        seed=config.train.seed,
    )
    extra = dict(
        learning_rate=lr,
        output_dir=str(work / "tpl_out"),
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        optim="adamw_torch",
    )  # transformers 4.50.3's default optimizer
    args = TrainingArguments(**{**targs, **shared, **extra})
    trainer = TemplateSFT(
        model=model,
        tokenizer=tokenizer,
        args=args,
        max_seq_length=config.train.seq_length,
        train_dataset=trainset,
        formatting_func=formatting,
        data_collator=collator,
    )
    trainer.train()
    attn = f"{model.base_model.model.config._attn_implementation}, optim {args.optim}"
    settings = {
        **targs,
        **shared,
        **extra,
        "lora_dropout": model.peft_config["default"].lora_dropout,
        "target_modules": sorted(model.peft_config["default"].target_modules),
        "response_template_ids": collator.response_token_ids,
        "response_template_tokens": tokenizer.convert_ids_to_tokens(collator.response_token_ids),
    }
    return losses(trainer.state.log_history), lr, trainer.train_dataset, collator, attn, settings


def token_compare(ours_data, tpl_data, collator) -> dict:
    """Per row: same input ids? same supervised (label) positions and ids?"""
    out = {"rows_ours": len(ours_data), "rows_template": len(tpl_data)}
    if len(ours_data) != len(tpl_data):
        return out
    same_ids = same_labels = sup_o = sup_t = 0
    for o, t in zip(ours_data, tpl_data):
        lab_t = collator([{"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}])["labels"][0].tolist()
        same_ids += o["input_ids"] == t["input_ids"]
        same_labels += o["labels"] == lab_t
        sup_o += sum(x != -100 for x in o["labels"])
        sup_t += sum(x != -100 for x in lab_t)
    return {
        **out,
        "same_input_ids": same_ids,
        "same_labels": same_labels,
        "supervised_tokens_ours": sup_o,
        "supervised_tokens_template": sup_t,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-config", default="", help="Flower-style 'key=value ...' overrides for OUR side")
    ap.add_argument("--label", default="today")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--server-round", type=int, default=1)
    ap.add_argument("--assets", type=Path, help="reuse this folder's tiny-gemma2/ and alpaca.json (else built)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flowertune-template-step")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/fidelity")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    _, tpl_config = fetch_template(args.work)
    import torch

    from app.config import AppConfig
    from app.dataset import load_partition
    from app.models import initial_adapter
    from deploy.demo import DemoAssets, build_demo

    torch.set_num_threads(2)
    if args.assets:
        assets = DemoAssets(args.assets / "tiny-gemma2", args.assets / "alpaca.json")
    else:
        shutil.rmtree(args.work / "demo", ignore_errors=True)  # deploy/demo.py may have changed since
        assets = build_demo(args.work / "demo")
    gemma_like_bos(assets.model_dir)  # idempotent
    config = AppConfig.from_run_config(run_config(args, assets))
    rows = load_partition(config.dataset, args.partition, config.train.seed)
    adapter = initial_adapter(config.model, config.train.seed)
    ours, lr_o, ours_data, attn_o = ours_step(
        config, rows, {k: v.clone() for k, v in adapter.items()}, args.server_round
    )
    tpl, lr_t, tpl_data, collator, attn_t, tpl_settings = template_step(
        config, rows, {k: v.clone() for k, v in adapter.items()}, args.server_round, tpl_config, args.work
    )
    diffs = [abs(a - b) for a, b in zip(ours, tpl)]
    rels = [d / abs(b) for d, b in zip(diffs, tpl) if b] or [float("nan")]
    result = {
        "label": args.label,
        "run_config_overrides": args.run_config,
        "partition": args.partition,
        "rows": len(rows),
        "server_round": args.server_round,
        "learning_rate": {"ours": lr_o, "template": lr_t},
        "losses": {"ours": ours, "template": tpl},
        "max_abs_diff": max(diffs),
        "max_rel_diff": max(rels),
        "mean_abs_diff": sum(diffs) / len(diffs),
        "tokens": token_compare(ours_data, tpl_data, collator),
        "attention_optim": {"ours": attn_o, "template": attn_t},
        "ours_settings": {k: repr(v) for k, v in vars(config).items()},
        "template_settings": tpl_settings,
        "template_defaults": tpl_config,
        "versions": {
            p: metadata.version(p) for p in ("torch", "transformers", "peft", "flwr", "datasets", "accelerate")
        }
        | {"trl(template side)": __import__("trl").__version__, "template flwr": TEMPLATE_FLWR},
    }
    lines = [f"{'step':>4} {'ours':>10} {'template':>10} {'|diff|':>10}"]
    lines += [f"{i + 1:>4} {a:>10.5f} {b:>10.5f} {d:>10.5f}" for i, (a, b, d) in enumerate(zip(ours, tpl, diffs))]
    lines += [
        f"max |diff| {result['max_abs_diff']:.5f}  max rel {result['max_rel_diff']:.4f}  lr {lr_o:.4g} / {lr_t:.4g}",
        f"tokens: {json.dumps(result['tokens'])}",
        f"attention/optimizer: ours {attn_o}; template {attn_t}",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.label}.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / f"{args.label}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
