"""The small embedded default: a tiny random Gemma2, an offline tokenizer, Alpaca-style rows.

It lets the whole deployment run on a CPU with no hub access, through exactly the
loading code the real model and dataset use (a local folder, `json` data files).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "river mountain garden letter window planet engine market winter silver music paper "
    "doctor island bridge forest coffee school summer animal basket candle mirror rocket"
).split()
TASKS = ("Describe", "Summarize", "Explain", "List three facts about", "Write a short poem about")


@dataclass(frozen=True)
class DemoAssets:
    model_dir: Path
    data_file: Path

    def run_config(self) -> dict[str, object]:
        """Overrides that point the app at these assets and keep a CPU round short."""
        return {
            "model.name": str(self.model_dir),
            "model.quantization": 0,
            "model.gradient-checkpointing": False,
            "dataset.data-files": str(self.data_file),
            "train.seq-length": 128,
            "train.training-arguments.max-steps": 2,
            "train.training-arguments.gradient-accumulation-steps": 1,
        }


def alpaca_rows(count: int, seed: int, output_words: tuple[int, int] = (5, 30)) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        topic = " ".join(rng.sample(WORDS, 2))
        rows.append(
            {
                "instruction": f"{rng.choice(TASKS)} {topic}.",
                "input": "" if i % 3 else f"Context: {' '.join(rng.sample(WORDS, 4))}.",
                "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*output_words))) + ".",
            }
        )
    return rows


def build_demo(folder: Path, rows: int = 400, seed: int = 0) -> DemoAssets:
    """Idempotent: reuses what an earlier call wrote into the same folder."""
    assets = DemoAssets(model_dir=folder / "tiny-gemma2", data_file=folder / "alpaca.json")
    if not assets.data_file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        assets.data_file.write_text(json.dumps(alpaca_rows(rows, seed)))
    if not (assets.model_dir / "config.json").is_file():
        _write_tiny_model(assets.model_dir, assets.data_file, seed)
    # Containers read these as another user; transformers writes its weights 0600.
    for path in (folder, *folder.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return assets


def gemma_like_tokenizer(corpus: list[str], vocab_size: int = 384):
    """A SentencePiece-style BPE built offline, with Gemma's rules: spaces become "▁" and
    stick to the word after them (no dummy prefix), unknown characters fall back to bytes.
    Under these rules a prompt ending in a space tokenizes differently alone than inside
    the whole text, which is what `app.dataset.tokenize_example` must get right."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(byte_tokens), special_tokens=specials + byte_tokens, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def _write_tiny_model(model_dir: Path, data_file: Path, seed: int) -> None:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    from app.dataset import prompt_and_response

    corpus = ["".join(prompt_and_response(row, append_input=True)) for row in json.loads(data_file.read_text())]
    tokenizer = gemma_like_tokenizer(corpus)
    tokenizer.save_pretrained(model_dir)

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = Gemma2ForCausalLM(config)
    # The real checkpoint ships this generation setting; keep it so the tiny model trips
    # the same transformers warning path the 9B one would.
    model.generation_config = GenerationConfig(
        cache_implementation="hybrid",
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    # A one-shard progress bar on stderr would sit above the first line a user reads.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(model_dir)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
