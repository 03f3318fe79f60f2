"""Train the tiny preset's sentencepiece tokenizer on a text corpus (SynthAD's corpus.txt);
writes tokenizer.model (+ added_tokens.json) into --out (sage.tokenizer.Tokenizer.train).

    python -m sage.tools.tokenizer --corpus data/synthad/corpus.txt --out DIR --vocab_size 2048
"""

from __future__ import annotations

from pathlib import Path

from sage.tokenizer import Tokenizer
from sage.tools.args import Parser, at_least
from sage.tools.errors import run_main


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--corpus", required=True, help="text file, one sentence per line")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab_size", type=at_least(1), default=2048,
                   help="upper bound on the vocabulary")
    args = p.parse_args(argv)
    tok = Tokenizer.train(args.corpus, args.out, vocab_size=args.vocab_size)
    print(f"wrote {Path(args.out) / 'tokenizer.model'}: {tok.vocab_size} ids")


if __name__ == "__main__":
    run_main(main)
