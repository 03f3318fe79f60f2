"""Fact sentences for SFE (paper §3.2): ask a local SageModel or an OpenAI-compatible VLM the
fixed fact prompts about every test image of a JSONL file, cache the answers (resumable), and
optionally write the records back with their `facts` field (sage.facts).

    python -m sage.tools.facts --data data/train.jsonl --out data/facts.jsonl --model weights/base
    python -m sage.tools.facts --data data/train.jsonl --out data/facts.jsonl --openai \\
        --model_name gpt-4o --n_facts 8 --fill        # adds "facts" to data/train.jsonl
    torchrun --nproc_per_node=8 -m sage.tools.facts --data data/adpl/mvtec_train.jsonl \
        --out data/facts_40b.jsonl --model weights/InternVL2-40B --tp 8 --fill

Under torchrun, model copies of --tp ranks each ask their share of the images (8 GPUs: --tp 8
holds InternVL2-40B in 10 GiB per GPU; --tp 4 gives two copies); rank 0 writes the cache.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import sage
from sage.config import SageConfig
from sage.distributed import cleanup, gather_objects, init_distributed, print0
from sage.facts import FactCache, collect_facts, fill_records, model_asker, openai_asker
from sage.models.sage import DECODES
from sage.tensor_parallel import load_sharded, model_copies
from sage.tools.args import DECODE_HELP, Parser, at_least, check_decode, load_records
from sage.tools.errors import run_main
from sage.training import Progress


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    # data
    p.add_argument("--data", required=True, help="JSONL records whose test images get facts")
    p.add_argument("--kind", default="qa", choices=("qa", "general"), help="record kind")
    p.add_argument("--out", required=True, help="fact cache (JSONL), appended to")
    p.add_argument("--n_facts", type=at_least(1), default=None,
                   help="N: fact sentences kept per image (None: n_facts of --model's "
                        "config, else 8 as for InternVL2-40B)")
    p.add_argument("--fill", nargs="?", const="", default=None,
                   help="also write the records with their 'facts' field: to this JSONL beside "
                        "--data, or with no value back into --data (temporary file + rename)")
    # asker
    p.add_argument("--model", default=None, help="local SageModel directory (InternVL2 layout)")
    p.add_argument("--openai", action=argparse.BooleanOptionalAction, default=False,
                   help="ask an OpenAI-compatible endpoint")
    p.add_argument("--model_name", default="gpt-4o", help="endpoint model name (--openai)")
    p.add_argument("--base_url", default=None, help="endpoint URL (None: OPENAI_BASE_URL)")
    p.add_argument("--max_new_tokens", type=at_least(1), default=128,
                   help="answer length per prompt")
    p.add_argument("--decode", choices=DECODES, default="eager", help=DECODE_HELP)
    # runtime
    p.add_argument("--batch_size", type=at_least(1), default=4,
                   help="images per generate call (--model)")
    p.add_argument("--device", default=None,
                   help="cuda or cpu for the local model (default: cuda if available)")
    p.add_argument("--tp", type=at_least(1), default=1,
                   help="tensor-parallel ranks per model copy under torchrun "
                        "(world = data-parallel x tp)")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   help="dtype of the local model")
    p.add_argument("--skip_bad", action=argparse.BooleanOptionalAction, default=False,
                   help="drop bad records of --data (counted, reported once) instead of stopping")
    a = p.parse_args(argv)
    if a.model and a.openai:
        p.error("give either --model DIR or --openai, not both")
    if a.skip_bad and a.fill == "":
        p.error("--skip_bad with --fill back into --data would drop the bad records from it; "
                "give --fill a new file")
    n_facts = a.n_facts
    if n_facts is None:
        n_facts = SageConfig.from_pretrained(a.model).n_facts if a.model else 8

    data = Path(a.data)
    records = load_records(data, a.kind, a.skip_bad)  # every test image checked at load
    root = data.parent
    # under torchrun: model copies of --tp ranks split the images; rank 0 writes the cache
    dist = init_distributed(a.device)
    copies = model_copies(dist, a.tp)
    if a.model:
        check_decode(p, a.decode, dist.device.type, a.tp)
    cache = FactCache(a.out, write=dist.is_main)
    ask, source = None, ""
    todo = [r["test_image"] for r in records if r["test_image"] not in cache]
    if todo and a.model:
        dtype = getattr(torch, a.dtype)
        model = (load_sharded(a.model, copies.tp_mesh, dtype=dtype, device=dist.device)
                 if copies.tp_mesh is not None else
                 sage.load_pretrained(a.model, dtype=dtype, device=dist.device))
        ask, source = model_asker(model, root, a.max_new_tokens, a.decode), f"model:{a.model}"
    elif todo and a.openai:
        ask = openai_asker(root, a.model_name, a.base_url, a.max_new_tokens)
        source = f"openai:{a.model_name}"
    progress = Progress("facts", len(set(todo)), "images", printer=print0)
    n = collect_facts((r["test_image"] for r in records), cache, ask, source, n_facts,
                      a.batch_size if a.model else 1, dp_rank=copies.dp_rank,
                      dp_size=copies.dp_size,
                      exchange=((lambda got: gather_objects(got if copies.writer else []))
                                if dist.world_size > 1 else None),
                      progress=progress.update)
    print0(f"facts: {n} image(s) asked, {len(cache)} cached in {a.out}")
    if a.fill is not None and dist.is_main:
        out = Path(a.fill) if a.fill else data
        if Path(os.path.abspath(out.parent)) != Path(os.path.abspath(data.parent)):
            raise ValueError(f"--fill {out} must be in the folder of --data ({data.parent}) so "
                             "the records' relative image paths keep their data root")
        fill_records(records, cache, n_facts, out)
        print(f"wrote {len(records)} records with facts to {out}")
    cleanup()


if __name__ == "__main__":
    run_main(main)
