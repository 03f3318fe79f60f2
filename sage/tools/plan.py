"""Per-rank GPU memory plan of FSDP2 training, from the config alone (nothing is allocated;
sage.plan): SFE with and without activation checkpointing, then E-DPO (chosen + rejected)
with the reference log-probs in memory and cached (train_edpo.py --ref_cache).

    python -m sage.tools.plan --preset internvl2-40b --world 8 --gpu_gib 80 [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from sage.config import SageConfig
from sage.plan import format_plan, plan_memory
from sage.tools.args import Parser
from sage.training import accumulation_steps


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--preset", default="internvl2-40b", help="SageConfig preset")
    p.add_argument("--world", type=int, default=8, help="number of ranks (GPUs)")
    p.add_argument("--gpu_gib", type=float, default=80.0, help="memory per GPU (GiB)")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per sample")
    p.add_argument("--global_batch", type=int, default=32, help="samples per optimizer step")
    p.add_argument("--cpu_offload", action=argparse.BooleanOptionalAction, default=False,
                   help="FSDP2 CPU offload of params, grads and optimizer state")
    p.add_argument("--json", action="store_true", help="print the plans as one JSON object")
    args = p.parse_args(argv)
    try:
        cfg = SageConfig.preset(args.preset)
        accum = accumulation_steps(args.global_batch, args.world, 1)  # micro-batch 1
    except ValueError as e:
        p.error(str(e))
    common = dict(world=args.world, gpu_gib=args.gpu_gib, micro_batch=1, seq_len=args.seq_len,
                  cpu_offload=args.cpu_offload, accumulation=accum)
    plans = {}
    for ac in (False, True):
        plans[f"sfe, activation checkpointing {ac}"] = plan_memory(
            cfg, stage="sfe", activation_checkpointing=ac, **common)
    for ref_cache in (False, True):
        plans[f"edpo, reference log-probs {'cached' if ref_cache else 'in memory'}"] = \
            plan_memory(cfg, stage="edpo", ref_cache=ref_cache, **common)
    if args.json:
        print(json.dumps({k: dataclasses.asdict(v) for k, v in plans.items()}, indent=2))
        return
    for name, plan in plans.items():
        print(format_plan(plan, f"{args.preset} {name}; {args.world} ranks x {args.gpu_gib:g} "
                                f"GiB, micro-batch 1 x {accum} accumulation, {args.seq_len} "
                                "tokens"))


if __name__ == "__main__":
    main()
