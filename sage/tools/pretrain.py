"""Pretrain the tiny base VLM from scratch (the stand-in for InternVL2's own pretraining):
captions, general questions and fact prompts of SynthAD's `pretrain` split, no anomaly QA.
The adapter and the LLM train on the answer tokens (Eq. 8); InternViT stays frozen: random,
or the perceiving tower of `python -m sage.tools.perception` (--vision). No facts, no fusion.

    python -m sage.tools.pretrain --data data/synthad --tokenizer data/synthad/tokenizer \\
        --vision runs/vit --out runs/pretrain --max_steps 800 --warmup 40   # weights/README.md
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch

from sage.checkpoint import load_into
from sage.config import SageConfig
from sage.data import Collator, GeneralDataset, ResumableDistributedSampler
from sage.data.images import image_cache
from sage.distributed import (all_reduce_sum, build_model, build_optimizer, cleanup,
                              init_distributed, print0)
from sage.inference import to_device
from sage.models.feature_cache import attach_vision_cache
from sage.names import INTERNVIT_KEY_MAP
from sage.runs import check_run_dir, export_model, resume, save_checkpoint, start_run
from sage.tokenizer import Tokenizer
from sage.tools.args import Parser, add_optim_args, add_runtime_args, at_least, load_records
from sage.tools.errors import run_main
from sage.training import (MetricsLog, accumulation_steps, check_finite, eta, grad_norm_and_clip,
                           lr_at, resolve_recipe, seed_everything, status_line)

RECIPES = {"paper": dict(lr=2e-6, warmup=1000, max_steps=5000),
           "tiny": dict(lr=1e-3, warmup=30, max_steps=300)}


def main(argv: list[str] | None = None) -> None:
    # ------------------------------------------------------------------------- arguments
    p = Parser(description=__doc__)
    # model
    p.add_argument("--preset", default="tiny", help="SageConfig preset of the fresh VLM")
    p.add_argument("--tokenizer", default=None,
                   help="directory with tokenizer.model (None: --data)")
    p.add_argument("--vision", default=None,
                   help="InternViT directory (HF layout) to build on, e.g. from "
                        "`python -m sage.tools.perception`; it stays frozen (None: random)")
    # data
    p.add_argument("--data", default="data/synthad", help="data root holding the JSONL splits")
    p.add_argument("--split", default="pretrain", help="JSONL split (kind general)")
    p.add_argument("--max_len", type=at_least(1), default=None, help="truncate sequences (tokens)")
    # optimisation
    add_optim_args(p)
    # runtime
    add_runtime_args(p, out="runs/pretrain")
    args = p.parse_args(argv)
    cfg = SageConfig.preset(args.preset, facts_mode="none", **(
        {} if args.system_message is None else {"system_message": args.system_message}))
    # (an unknown preset fails here, before any work)

    # ------------------------------------------------------------------------- distributed, seeds
    dist = init_distributed(args.device)
    seed_everything(args.seed + dist.rank)
    accum = accumulation_steps(args.global_batch, dist.world_size, args.micro_batch)
    run_dir = Path(args.out)  # checked now; written only once every input has been read
    check_run_dir(run_dir, args.resume, vars(args), args.resume_force)
    data_file = Path(args.data) / f"{args.split}.jsonl"
    records = load_records(data_file, "general", args.skip_bad)  # images checked before work

    # ------------------------------------------------------------------------- model
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.data)
    # the embedding table follows the trained tokenizer's vocabulary
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm,
                                                           vocab_size=tokenizer.vocab_size))
    lr, warmup, max_steps = resolve_recipe(args, cfg, RECIPES)
    print0(f"config: {json.dumps(cfg.to_dict())}")
    print0(f"lr {lr:g}, warmup {warmup}, steps {max_steps}")
    model = build_model(cfg, dist, None, stage="pretrain",
                        activation_checkpointing=args.activation_checkpointing,
                        cpu_offload=args.cpu_offload)
    model.tokenizer = tokenizer
    if args.vision:  # a perceiving tower under the fresh VLM (the tiny stand-in for InternViT-6B)
        report = load_into(model.vision, args.vision, INTERNVIT_KEY_MAP)
        print0(f"loaded {args.vision}: {report}")
    attach_vision_cache(model, args.vision_cache_gb, agree=all_reduce_sum)  # after the tower
    optimizer = build_optimizer(model, lr, args.weight_decay, dist.device)

    # ------------------------------------------------------------------------- data
    images = image_cache(args.vision_cache_gb)
    dataset = GeneralDataset(records, args.data, cfg, images=images)
    collate = Collator(tokenizer, cfg, facts_mode="none", max_len=args.max_len)
    sampler = ResumableDistributedSampler(len(records), dist.rank, dist.world_size,
                                          seed=args.seed)
    print0(f"data: {len(records)} records from {data_file}; global batch {args.global_batch} = "
           f"{dist.world_size} ranks x {args.micro_batch} x {accum} accumulation steps")
    start_run(run_dir, vars(args), dist.rank, cfg.to_dict())  # lock, partial saves, config.json

    # ------------------------------------------------------------------------- resume
    step = resume(run_dir, model, optimizer, sampler, dist.rank) if args.resume else 0

    # ------------------------------------------------------------------------- loop
    stream = (i for _ in itertools.count() for i in sampler)  # endless, epoch after epoch
    log = MetricsLog(run_dir, dist.rank)
    model.train()
    t_last = time.time()
    while step < max_steps:
        # -- one optimiser step: micro-batches, loss / n_answer_tokens_global, backward
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, warmup, max_steps)
        batches = [collate([dataset[next(stream)] for _ in range(args.micro_batch)])
                   for _ in range(accum)]
        # normalised by the answer tokens of the global batch, as in train_sfe.py
        n_local = sum(int((b["labels"] != -100).sum()) for b in batches)
        n_global = all_reduce_sum(torch.tensor(float(n_local), device=dist.device)).item()
        loss_total, tokens = torch.zeros((), device=dist.device), 0
        for batch in batches:
            batch = to_device(batch, dist.device)
            _, loss_sum, _ = model(batch)
            loss = loss_sum.sum() * dist.world_size / n_global  # FSDP averages over ranks
            check_finite(loss, step, batch["ids"])
            loss.backward()
            loss_total += loss.detach() / dist.world_size
            tokens += int(batch["attention_mask"].sum())
        # -- clip, step, zero_grad
        gnorm = grad_norm_and_clip(model, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # -- log (rank 0): .item() only here
        if step % args.log_every == 0 or step == max_steps:
            loss_val = all_reduce_sum(loss_total).item()
            dt = (time.time() - t_last) / (args.log_every if step % args.log_every == 0 else 1)
            t_last = time.time()
            tok_s = tokens * dist.world_size / dt
            lr_now = optimizer.param_groups[0]["lr"]
            print0(status_line(step, max_steps, loss_val, lr_now, gnorm, dt, tok_s,
                               f" | ETA {eta(dt, max_steps - step)}"))
            log.log({"step": step, "loss": loss_val, "lr": lr_now, "gnorm": gnorm,
                     "step_ms": dt * 1000, "tok_s": tok_s})
        # -- checkpoint (all ranks take part), always after the last step
        if step == max_steps or (args.save_every and step % args.save_every == 0):
            save_checkpoint(run_dir, step, model, optimizer,
                            {"sampler": sampler.state_dict(), "args": vars(args)}, dist.rank,
                            keep_last=args.keep_last)

    # ------------------------------------------------------------------------- export, cleanup
    if model.vision_cache is not None:
        print0(f"rank 0's {model.vision_cache.stats()}")
    export_model(model, cfg, tokenizer, run_dir / "export", dist.rank,
                 dtype=getattr(torch, args.export_dtype))
    print0(f"exported {run_dir / 'export'}")
    log.close()
    cleanup()


if __name__ == "__main__":
    run_main(main)
