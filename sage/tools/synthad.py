"""Generate the SynthAD benchmark (docs/design.md §7) into a directory: images, the JSONL splits,
corpus.txt, facts.jsonl and manifest.json (see sage.data.synthad).

    python -m sage.tools.synthad --out data/synthad --seed 0 [--size 224] [--scale 1.0]
"""

from __future__ import annotations

import time

from sage.data.synthad import generate
from sage.tools.args import Parser, at_least, positive
from sage.tools.errors import run_main


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="generator seed (deterministic)")
    p.add_argument("--size", type=at_least(1), default=224, help="image side in pixels")
    p.add_argument("--scale", type=positive(), default=1.0, help="multiplies every split's size")
    args = p.parse_args(argv)
    t = time.time()
    manifest = generate(args.out, args.seed, args.size, args.scale)
    print(f"SynthAD in {args.out}: {manifest['counts']} ({time.time() - t:.1f} s)")


if __name__ == "__main__":
    run_main(main)
