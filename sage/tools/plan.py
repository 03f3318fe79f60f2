"""Per-rank GPU memory of every job of the recipe, from the config alone (nothing is
allocated; sage.plan): SFE and E-DPO training (FSDP2 over --world ranks, answer-only logits,
packed E-DPO rows, activation checkpointing, one micro-batch per step), E-DPO's reference
pass, evaluation and fact generation (tensor-parallel), each with the options it assumes.

    python -m sage.tools.plan --preset internvl2-40b --world 8 --gpu_gib 80 [--json]
"""

from __future__ import annotations

import argparse
import json

from sage.config import SageConfig
from sage.plan import format_plan, plan_jobs
from sage.tools.args import Parser, at_least, positive
from sage.tools.errors import run_main


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--preset", default="internvl2-40b", help="SageConfig preset")
    p.add_argument("--world", type=at_least(1), default=8, help="number of ranks (GPUs)")
    p.add_argument("--gpu_gib", type=positive(), default=80.0, help="memory per GPU (GiB)")
    p.add_argument("--seq_len", type=at_least(1), default=2048,
                   help="tokens per sequence (prompt with its image tokens + one answer)")
    p.add_argument("--answer_tokens", type=at_least(1), default=128,
                   help="answer tokens per sequence (where training computes logits)")
    p.add_argument("--global_batch", type=at_least(1), default=32,
                   help="samples (SFE) / instances (E-DPO) per optimizer step")
    p.add_argument("--cpu_offload", action=argparse.BooleanOptionalAction, default=False,
                   help="FSDP2 CPU offload of params, grads and optimizer state (training)")
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                   help="print the plans as one JSON object")
    args = p.parse_args(argv)
    try:
        jobs = plan_jobs(SageConfig.preset(args.preset), world=args.world,
                         gpu_gib=args.gpu_gib, global_batch=args.global_batch,
                         seq_len=args.seq_len, answer_tokens=args.answer_tokens,
                         cpu_offload=args.cpu_offload)
    except ValueError as e:
        p.error(str(e))
    if args.json:
        print(json.dumps({name: {"gib_per_rank": round(plan.total, 2), "fits": plan.fits,
                                 "budget_gib": plan.budget, **options,
                                 "rows": {k: round(v, 3) for k, v, _ in plan.rows}}
                          for name, (plan, options) in jobs.items()}, indent=2))
        return
    for name, (plan, options) in jobs.items():
        opts = ", ".join(f"{k} {v}" for k, v in options.items())
        print(format_plan(plan, f"{args.preset} {name}: {args.world} ranks x "
                                f"{args.gpu_gib:g} GiB; {opts}"))
    print("\n| job | GiB per rank | fits |\n|---|---:|---|")
    for name, (plan, options) in jobs.items():
        print(f"| {name} | {plan.total:.1f} | {'yes' if plan.fits else 'NO'} |")


if __name__ == "__main__":
    run_main(main)
