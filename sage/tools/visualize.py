"""Patch-selection pictures (Eq. 1) of a model on one-shot records (sage.visualize): test and
reference side by side, the K selected test patches outlined, and a heat map of 1 - s_i.

    python -m sage.tools.visualize --model runs/quickstart/sfe/export --data data/synthad \\
        --split test_unseen --n 4 --out runs/selection
"""

from __future__ import annotations

from pathlib import Path

import torch

import sage
from sage.data import SFEDataset, load_jsonl
from sage.tools.args import Parser, at_least
from sage.tools.errors import run_main
from sage.visualize import visualize_selection


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--model", required=True, help="InternVL2-layout model directory")
    p.add_argument("--data", default="data/synthad", help="data root holding the JSONL splits")
    p.add_argument("--split", default="test_unseen", help="JSONL split")
    p.add_argument("--n", type=at_least(1), default=4,
                   help="pictures: the first N records with a reference image")
    p.add_argument("--out", default="runs/selection", help="output folder of the PNGs")
    args = p.parse_args(argv)

    records = [r for r in load_jsonl(Path(args.data) / f"{args.split}.jsonl", kind="qa")
               if r.get("reference_image")][:args.n]
    if not records:
        raise ValueError(f"{args.data}/{args.split}.jsonl: no record with a reference image")
    model = sage.load_pretrained(args.model, dtype=torch.float32, device="cpu").eval()
    dataset = SFEDataset(records, args.data, model.cfg, setting="one-shot")
    for i, rec in enumerate(records):
        png = visualize_selection(model, dataset[i], Path(args.data) / rec["test_image"],
                                  Path(args.data) / rec["reference_image"],
                                  Path(args.out) / f"selection_{rec['id']}.png")
        print(f"wrote {png}")


if __name__ == "__main__":
    run_main(main)
