"""Import external data into SAGE JSONL records (formats and assumptions: sage.data.convert).

    python -m sage.tools.convert llava  IN.json  OUT.jsonl [--root IMAGES]   kind "general"
    python -m sage.tools.convert manta  IN.json  OUT.jsonl [--root IMAGES]   kind "qa"
    python -m sage.tools.convert mmad   IN.json  OUT.jsonl [--root IMAGES]   kind "qa"
    python -m sage.tools.convert mvtec  MVTEC/   OUT.jsonl                   kind "qa"
"""

from __future__ import annotations

import argparse

from sage.data.convert import IMPORTERS, convert
from sage.tools.args import Parser
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
    a = p.parse_args(argv)
    n, n_skipped, errors = convert(a.format, a.input, a.output, a.root, a.source, a.skip_bad,
                                   a.check_images)  # a bad input: one line `error: ...`, exit 2
    print(f"wrote {n} records to {a.output}; skipped {n_skipped} item(s)")
    for e in errors[:5]:
        print(f"  skipped: {e}")


if __name__ == "__main__":
    run_main(main)
