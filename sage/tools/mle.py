"""Fill the `mle` field (judge sub-scores type / location / logic, Eq. 3) of every record of a
JSONL file, with SynthAD's oracle judge or an OpenAI-compatible LLM judge (sage.mle).

    python -m sage.tools.mle --data train.jsonl --judge oracle --out train.mle.jsonl
    python -m sage.tools.mle --data data/synthad/edpo_train.jsonl --judge oracle --in_place
    OPENAI_API_KEY=... python -m sage.tools.mle --data visa.jsonl --judge openai --workers 8

Exit status 1 if any answer could not be scored (its record keeps no `mle`, or with --rescore
the `mle` it had); a bad input or argument: one line `error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sage.data.schema import load_jsonl, write_jsonl
from sage.mle import Judge, OpenAIJudge, OracleJudge, score_records
from sage.tools.args import Parser, at_least, positive
from sage.tools.errors import run_main


def main(argv: list[str] | None = None) -> int:
    """-> the exit status (1 if any answer failed)."""
    p = Parser(description=__doc__)
    # data
    p.add_argument("--data", required=True, help="input JSONL (docs/design.md §6, kind qa)")
    p.add_argument("--out", default=None, help="output JSONL (None: DATA stem + .mle.jsonl)")
    p.add_argument("--in_place", action=argparse.BooleanOptionalAction, default=False,
                   help="replace the input file (atomically) instead of writing --out")
    p.add_argument("--rescore", action=argparse.BooleanOptionalAction, default=False,
                   help="score records that already have `mle` too")
    # judge
    p.add_argument("--judge", required=True, choices=("openai", "oracle"), help="which judge")
    p.add_argument("--model", default="gpt-4o", help="openai: judge model name")
    p.add_argument("--base_url", default=None,
                   help="openai: endpoint (None: OPENAI_BASE_URL, else api.openai.com); "
                        "the key comes only from OPENAI_API_KEY, never from a flag")
    p.add_argument("--cache", default=None,
                   help="openai: JSONL cache of scores (None: DATA stem + .mle_cache.jsonl)")
    p.add_argument("--workers", type=at_least(1), default=8, help="concurrent judge requests")
    p.add_argument("--max_retries", type=at_least(0), default=5,
                   help="openai: client retries with backoff on 429 / 5xx / timeouts")
    p.add_argument("--timeout", type=positive(), default=60.0, help="openai: seconds per request")
    p.add_argument("--parse_retries", type=at_least(0), default=2,
                   help="openai: re-asks after an unusable reply before recording a failure")
    p.add_argument("--json_mode", action=argparse.BooleanOptionalAction, default=False,
                   help="openai: request response_format json_object")
    args = p.parse_args(argv)

    data = Path(args.data)
    stem = data.with_suffix("") if data.suffix == ".jsonl" else data
    if args.in_place:
        if args.out is not None:
            p.error("--in_place and --out exclude each other")
        out = data
    else:
        out = Path(args.out) if args.out else Path(f"{stem}.mle.jsonl")
        if out.resolve() == data.resolve():
            p.error(f"--out {out} is the input file; pass --in_place to replace it")
    records = load_jsonl(data, kind="qa")
    if args.judge == "oracle":
        judge: Judge = OracleJudge()
    else:
        judge = OpenAIJudge(model=args.model, base_url=args.base_url,
                            cache=args.cache or f"{stem}.mle_cache.jsonl",
                            max_retries=args.max_retries, timeout=args.timeout,
                            parse_retries=args.parse_retries, json_mode=args.json_mode)
        print(f"judge {args.model} at {judge.base_url or 'api.openai.com'}, "
              f"cache {judge.cache.path}, {args.workers} workers")

    def progress(done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            print(f"  {done}/{total} answers", file=sys.stderr, flush=True)

    rep = score_records(records, judge, workers=args.workers, rescore=args.rescore,
                        progress=progress)
    write_jsonl(records, out)
    print(f"{len(records)} records -> {out}: scored {rep.n_judged + rep.n_cached} answers "
          f"(judged {rep.n_judged}, cached {rep.n_cached}), failed {rep.n_failed}, "
          f"kept {rep.n_kept} records already scored"
          + (f", {rep.n_kept_old} kept their earlier score" if rep.n_kept_old else ""))
    for rid, i, why in rep.failures:
        print(f"  failed: record {rid} answer {i}: {why}")
    return 1 if rep.n_failed else 0


if __name__ == "__main__":
    run_main(main)
