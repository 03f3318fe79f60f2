"""MMAD's multiple-choice evaluation (letter answers, accuracy per question type) of one model.

    python -m sage.tools.mmad --model DIR --data MMAD/mmad.json [--root MMAD] [--out runs/mmad]

Writes OUT/report.md (a row per question type), OUT/metrics.json and OUT/predictions.jsonl.
The library code is sage.mmad; the yes/no conversion is `python -m sage.tools.convert mmad`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import sage
from sage.mmad import answer_mmad, format_mmad_report, load_mmad, mmad_accuracy
from sage.models.sage import DECODES
from sage.tools.args import DECODE_HELP, Parser, check_decode
from sage.tools.errors import run_main


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--model", required=True, help="model directory (InternVL2 layout)")
    p.add_argument("--data", required=True, help="MMAD's mmad.json")
    p.add_argument("--root", default=None, help="folder of MMAD's images (None: --data's folder)")
    p.add_argument("--out", default="runs/mmad", help="output directory")
    p.add_argument("--limit", type=int, default=0, help="first N questions (0: all)")
    p.add_argument("--batch_size", type=int, default=8, help="questions per generate call")
    p.add_argument("--max_new_tokens", type=int, default=16, help="answer length cap")
    p.add_argument("--decode", choices=DECODES, default="eager", help=DECODE_HELP)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_decode(p, a.decode, device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    items = load_mmad(a.data)
    items = items[:a.limit] if a.limit else items
    model = sage.load_pretrained(a.model, dtype=dtype, device=device)
    rows = answer_mmad(model, items, a.root or Path(a.data).parent, batch_size=a.batch_size,
                       max_new_tokens=a.max_new_tokens, decode=a.decode)
    table = mmad_accuracy(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = format_mmad_report(table, Path(a.model).name)
    (out / "report.md").write_text(report)
    (out / "metrics.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                   for r in rows))
    print(report, end="")


if __name__ == "__main__":
    run_main(main)
