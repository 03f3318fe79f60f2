"""Generate the SynthAD benchmark (docs/design.md §7) into a directory: images, the JSONL splits,
corpus.txt, facts.jsonl and manifest.json (see sage.data.synthad).

    python -m sage.tools.synthad --out data/synthad --seed 0 [--size 224] [--scale 1.0]
        [--sfe_groups 900]    # a larger SFE training split, every other split unchanged
        [--extra_categories]  # ... whose added groups also show 6 training-only categories
        [--shared_marks 0.5]  # ... half of whose pairs show one mark on test and reference alike
"""

from __future__ import annotations

import argparse
import time

from sage.data.synthad import EXTRA_CATEGORIES, generate
from sage.tools.args import Parser, at_least, positive
from sage.tools.errors import run_main


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="generator seed (deterministic)")
    p.add_argument("--size", type=at_least(1), default=224, help="image side in pixels")
    p.add_argument("--scale", type=positive(), default=1.0, help="multiplies every split's size")
    p.add_argument("--sfe_groups", type=at_least(1), default=None,
                   help="SFE training groups (5 questions each; default 300 x scale); those "
                        "beyond the default are drawn after the rest, which stays the same")
    p.add_argument("--extra_categories", action=argparse.BooleanOptionalAction, default=False,
                   help="the SFE groups beyond the default also cycle over the training-only "
                        f"categories {', '.join(c.name for c in EXTRA_CATEGORIES)} (no effect "
                        "without --sfe_groups above the default)")
    p.add_argument("--shared_marks", type=at_least(0.0, float, most=1.0), default=0.0,
                   help="share (0-1) of the SFE pairs beyond the default whose test and "
                        "reference both carry the same surface mark: part of the product, "
                        "so only the comparison tells the label")
    args = p.parse_args(argv)
    t = time.time()
    manifest = generate(args.out, args.seed, args.size, args.scale, args.sfe_groups,
                        args.extra_categories, args.shared_marks)
    print(f"SynthAD in {args.out}: {manifest['counts']} ({time.time() - t:.1f} s)")


if __name__ == "__main__":
    run_main(main)
