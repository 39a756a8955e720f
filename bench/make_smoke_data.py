"""Alpaca-format rows (instruction/input/output) with LONG outputs, for the real-size GPU smoke run.

With the tiny demo tokenizer (deploy/demo.py, vocab ~300) every demo word is about one
token, so ~600-word outputs make every row reach the 512-token truncation: each training
step then sees full 2 x 512 batches, as the real Alpaca data mostly would not, which makes
tokens/s comparable with the reference numbers in shared/README.md.

    python bench/make_smoke_data.py --rows 400 --out .gpu-carry/smoke-alpaca.json
    python bench/make_smoke_data.py --rows 1600 --words 10 --words-max 450 --out .gpu-carry/mix-alpaca.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.demo import alpaca_rows  # noqa: E402


def long_rows(count: int, seed: int, words: int, most: int | None = None) -> list[dict[str, str]]:
    """The demo's rows with outputs long enough to reach the 512-token truncation, or, with
    `most`, outputs of `words` to `most` words (issue 24's length mix: real Alpaca rows are
    mostly shorter than 512 tokens, and padding to the longest row differs by micro-batch)."""
    return alpaca_rows(count, seed, (words, most if most is not None else words + 100))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400, help="at least 20 partitions x 10 rows")
    ap.add_argument("--words", type=int, default=600, help="minimum words per output")
    ap.add_argument("--words-max", type=int, help="outputs of --words to this many words, uniform (a length mix)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(long_rows(args.rows, args.seed, args.words, args.words_max)))
    print(f"wrote {args.rows} rows to {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
