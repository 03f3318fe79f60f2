"""Fact sentences for SFE (paper §3.2): ask a local SageModel or an OpenAI-compatible VLM the
fixed fact prompts about every test image of a JSONL file, cache the answers (resumable), and
optionally write the records back with their `facts` field (sage.facts).

    python -m sage.tools.facts --data data/train.jsonl --out data/facts.jsonl --model weights/base
    python -m sage.tools.facts --data data/train.jsonl --out data/facts.jsonl --openai \\
        --model_name gpt-4o --n_facts 8 --fill        # adds "facts" to data/train.jsonl
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import sage
from sage.config import SageConfig
from sage.data.schema import load_jsonl
from sage.facts import FactCache, collect_facts, fill_records, model_asker, openai_asker
from sage.tools.args import Parser


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    # data
    p.add_argument("--data", required=True, help="JSONL records whose test images get facts")
    p.add_argument("--kind", default="qa", choices=("qa", "general"), help="record kind")
    p.add_argument("--out", required=True, help="fact cache (JSONL), appended to")
    p.add_argument("--n_facts", type=int, default=None,
                   help="N: fact sentences kept per image (None: n_facts of --model's "
                        "config, else 8 as for InternVL2-40B)")
    p.add_argument("--fill", nargs="?", const="", default=None,
                   help="also write the records with their 'facts' field: to this JSONL beside "
                        "--data, or with no value back into --data (temporary file + rename)")
    # asker
    p.add_argument("--model", default=None, help="local SageModel directory (InternVL2 layout)")
    p.add_argument("--openai", action="store_true", help="ask an OpenAI-compatible endpoint")
    p.add_argument("--model_name", default="gpt-4o", help="endpoint model name (--openai)")
    p.add_argument("--base_url", default=None, help="endpoint URL (None: OPENAI_BASE_URL)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="answer length per prompt")
    # runtime
    p.add_argument("--batch_size", type=int, default=4, help="images per generate call (--model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the local model")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   help="dtype of the local model")
    a = p.parse_args(argv)
    if a.model and a.openai:
        p.error("give either --model DIR or --openai, not both")
    n_facts = a.n_facts
    if n_facts is None:
        n_facts = SageConfig.from_pretrained(a.model).n_facts if a.model else 8

    data = Path(a.data)
    records = load_jsonl(data, kind=a.kind)
    root = data.parent
    cache = FactCache(a.out)
    ask, source = None, ""
    todo = [r["test_image"] for r in records if r["test_image"] not in cache]
    if todo and a.model:
        model = sage.load_pretrained(a.model, dtype=getattr(torch, a.dtype), device=a.device)
        model.eval()
        ask, source = model_asker(model, root, a.max_new_tokens), f"model:{a.model}"
    elif todo and a.openai:
        ask = openai_asker(root, a.model_name, a.base_url, a.max_new_tokens)
        source = f"openai:{a.model_name}"
    try:
        n = collect_facts((r["test_image"] for r in records), cache, ask, source, n_facts,
                          a.batch_size if a.model else 1)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"facts: {n} image(s) asked, {len(cache)} cached in {a.out}")
    if a.fill is not None:
        out = Path(a.fill) if a.fill else data
        if Path(os.path.abspath(out.parent)) != Path(os.path.abspath(data.parent)):
            sys.exit(f"error: --fill {out} must be in the folder of --data ({data.parent}) so "
                     "the records' relative image paths keep their data root")
        fill_records(records, cache, n_facts, out)
        print(f"wrote {len(records)} records with facts to {out}")


if __name__ == "__main__":
    main()
