"""Import external data into SAGE JSONL records (formats and assumptions: sage.data.convert).

    python -m sage.tools.convert llava  IN.json  OUT.jsonl [--root IMAGES]   kind "general"
    python -m sage.tools.convert manta  IN.json  OUT.jsonl [--root IMAGES]   kind "qa"
    python -m sage.tools.convert mmad   IN.json  OUT.jsonl [--root IMAGES]   kind "qa"
    python -m sage.tools.convert mvtec  MVTEC/   OUT.jsonl                   kind "qa"

--holdout F [--seed S] also splits the records into OUT_train.jsonl and OUT_test.jsonl beside
OUT: whole groups (a test image's questions), stratified by category x defect type, F of each
stratum held out for evaluation (sage.data.convert.holdout_split):

    python -m sage.tools.convert mvtec MVTEC/ data/mvtec/qa.jsonl --holdout 0.5 --seed 0
"""

from __future__ import annotations

import argparse
import json

from sage.data.convert import IMPORTERS, check_holdout, convert, holdout_paths
from sage.tools.args import Parser, at_least
from sage.tools.errors import run_main


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("format", choices=sorted(IMPORTERS), help="input format")
    p.add_argument("input", help="input JSON file (mvtec: the dataset folder)")
    p.add_argument("output", help="output JSONL; its folder is the data root of image paths")
    p.add_argument("--root", default=None,
                   help="folder the input's image paths are relative to (None: folder of "
                        "the input; mvtec: the input folder)")
    p.add_argument("--source", default=None, help="value of the records' 'source' field and "
                                                  "id prefix (None: the format name)")
    p.add_argument("--skip_bad", action=argparse.BooleanOptionalAction, default=False,
                   help="skip malformed items (counted) instead of stopping at the first")
    p.add_argument("--check_images", action=argparse.BooleanOptionalAction, default=False,
                   help="open every referenced image (exists and decodes)")
    p.add_argument("--holdout", type=float, default=None,
                   help="also write OUT_train.jsonl / OUT_test.jsonl: this share (0 < F < 1) "
                        "of each category x defect type's groups held out for evaluation")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the --holdout split")
    a = p.parse_args(argv)
    if a.holdout is not None:
        try:
            check_holdout(a.holdout)
        except ValueError as e:
            p.error(str(e))
    # a bad input: one line `error: ...`, exit 2
    n, n_skipped, errors = convert(a.format, a.input, a.output, a.root, a.source, a.skip_bad,
                                   a.check_images, a.holdout, a.seed)
    print(f"wrote {n} records to {a.output}; skipped {n_skipped} item(s)")
    for e in errors[:5]:
        print(f"  skipped: {e}")
    if a.holdout is not None:
        for path in holdout_paths(a.output):
            recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            groups = {r.get("group") or r["id"] for r in recs}
            print(f"wrote {len(recs)} records ({len(groups)} groups) to {path}")


if __name__ == "__main__":
    run_main(main)
