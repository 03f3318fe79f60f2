"""Perception pretraining of the tiny InternViT (sage.perception): the stand-in for
InternViT-6B's own pretraining, saved as an InternViT directory (HF layout) that
`python -m sage.tools.pretrain --vision DIR` builds the base VLM on.

    python -m sage.tools.perception --out runs/vit   # 6,000 renders, 2,400 steps: ~15 min, 2 cores
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sage.export import save_pretrained
from sage.config import SageConfig
from sage.models.intern_vit import InternViT
from sage.perception import make_pool, pretrain
from sage.tools.args import Parser, at_least, positive
from sage.tools.errors import run_main


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--preset", default="tiny", help="SageConfig preset whose vision tower to train")
    p.add_argument("--out", required=True, help="output InternViT directory (HF layout)")
    p.add_argument("--renders", type=at_least(1), default=6000,
                   help="training shots rendered up front")
    p.add_argument("--held_out", type=at_least(1), default=400,
                   help="held-out shots for the figures")
    p.add_argument("--steps", type=at_least(1), default=2400, help="optimiser steps")
    p.add_argument("--batch", type=at_least(1), default=32, help="shots per step")
    p.add_argument("--lr", type=positive(), default=1e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="render and init seed")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose another --out")
    cfg = SageConfig.preset(args.preset).vision
    torch.manual_seed(args.seed)
    vit = InternViT(cfg)
    vit.init_weights()
    t0 = time.time()
    train = make_pool(args.renders, cfg, seed=args.seed)
    held_out = make_pool(args.held_out, cfg, seed=args.seed + 10_000)
    print(f"rendered {args.renders} + {args.held_out} shots in {time.time() - t0:.0f} s")
    log = pretrain(vit, train, args.steps, args.lr, args.batch, held_out, seed=args.seed)
    save_pretrained(vit, out, layout="internvit")
    (out / "perception.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=2))
    print(f"saved {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    run_main(main)
