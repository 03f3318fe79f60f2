"""Stage 1: Self-Guided Fact Enhancement (SFE) fine-tuning (paper §3.2, §3.4; docs/design.md §2).

Trains the adapter, the fusion attention (Eq. 2) with its projection head (Eq. 9) and the LLM
on the answer tokens only (Eq. 8); InternViT stays frozen and runs without autograd. Also runs
the Table 3 ablations (`--facts hard|none`) and the Fig. 7 sweep (`--n_facts`, `--top_k`).
The tiny base VLM itself is trained by `python -m sage.tools.pretrain`; the per-rank memory
plan is printed by `python -m sage.tools.plan`.

    python train_sfe.py                                   # tiny default on SynthAD, CPU
    torchrun --nproc_per_node=2 train_sfe.py              # same, 2 gloo processes
    torchrun --nproc_per_node=8 train_sfe.py --init weights/InternVL2-40B \\
        --data data/adpl --split mvtec_train --activation_checkpointing   # real model, 8xA100
"""

import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch

from sage.config import LITERAL_FUSION, SageConfig
from sage.data import Collator, ResumableDistributedSampler, SFEDataset
from sage.data.images import image_cache
from sage.distributed import (all_reduce_sum, build_model, build_optimizer, cleanup,
                              init_distributed, print0)
from sage.inference import to_device
from sage.models.feature_cache import attach_vision_cache
from sage.runs import check_run_dir, export_model, resume, save_checkpoint, start_run
from sage.tokenizer import Tokenizer
from sage.tools.args import Parser, add_optim_args, add_runtime_args, load_records
from sage.tools.errors import report_errors
from sage.training import (MetricsLog, accumulation_steps, check_finite, eta, flops_per_token,
                           grad_norm_and_clip, lr_at, resolve_recipe, seed_everything,
                           status_line)

report_errors()  # an expected error: one line `error: ...`, exit 2 (--debug: traceback)

# ----------------------------------------------------------------------------- arguments
p = Parser(description=__doc__)
# model
p.add_argument("--init", default="weights/sage-tiny-base",
               help="InternVL2-layout directory to start from (the tiny base VLM)")
p.add_argument("--facts", choices=["fe", "hard", "none"], default="fe",
               help="fe: fusion attention; hard: facts as text; none: plain SFT")
p.add_argument("--fusion", choices=["default", "literal"], default="default",
               help="default: --init's fusion fields (the measured defaults); literal: Eq. 2 / "
                    "Eq. 9 as written (sage.config.LITERAL_FUSION)")
p.add_argument("--n_facts", type=int, default=None, help="N fact tokens (Eq. 2); None: --init's")
p.add_argument("--top_k", type=int, default=None, help="K selected patches (Eq. 1); None: --init's")
p.add_argument("--comparison", choices=["test", "both"], default=None,
               help="test: Eq. 1's test patches least matched in the reference; both: also the "
                    "reference patches least matched in the test (missing parts); None: --init's")
# data
p.add_argument("--data", default="data/synthad", help="data root holding the JSONL splits")
p.add_argument("--split", default="sfe_train", help="JSONL split")
p.add_argument("--setting", choices=["one-shot", "zero-shot", "mixed"], default="mixed",
               help="reference given (one-shot), not (zero-shot), or alternating micro-batches")
p.add_argument("--max_len", type=int, default=None, help="truncate sequences (tokens)")
# optimisation
add_optim_args(p)
# runtime
add_runtime_args(p, out="runs/sfe")
args = p.parse_args()

RECIPES = {"paper": dict(lr=2e-6, warmup=1000, max_steps=5000),
           "tiny": dict(lr=1e-3, warmup=30, max_steps=300)}
# The config is built once: the flags replace fields of --init's config, and
# SageConfig.__post_init__ checks them (e.g. --top_k beyond the image tokens) before any work.
overrides = {"n_facts": args.n_facts, "top_k": args.top_k, "comparison": args.comparison,
             "system_message": args.system_message,
             **(LITERAL_FUSION if args.fusion == "literal" else {})}
try:
    cfg = dataclasses.replace(SageConfig.from_pretrained(args.init), facts_mode=args.facts,
                              **{k: v for k, v in overrides.items() if v is not None})
except (ValueError, KeyError, FileNotFoundError) as e:
    p.error(str(e))

# ----------------------------------------------------------------------------- distributed, seeds
dist = init_distributed(args.device)
seed_everything(args.seed + dist.rank)
accum = accumulation_steps(args.global_batch, dist.world_size, args.micro_batch)
run_dir = Path(args.out)  # checked now; written only once every input has been read
check_run_dir(run_dir, args.resume, vars(args), args.resume_force)
data_file = Path(args.data) / f"{args.split}.jsonl"
records = load_records(data_file, "qa", args.skip_bad,  # every image checked before any work
                       min_facts=cfg.facts_needed)  # and every record's facts

# ----------------------------------------------------------------------------- model
tokenizer = Tokenizer.from_pretrained(args.init)
lr, warmup, max_steps = resolve_recipe(args, cfg, RECIPES)
print0(f"config: {json.dumps(cfg.to_dict())}")
print0(f"lr {lr:g}, warmup {warmup}, steps {max_steps}")
model = build_model(cfg, dist, args.init, stage="sfe",
                    activation_checkpointing=args.activation_checkpointing,
                    cpu_offload=args.cpu_offload, init_seed=args.seed)
model.tokenizer = tokenizer
attach_vision_cache(model, args.vision_cache_gb, agree=all_reduce_sum)  # a frozen encoder
optimizer = build_optimizer(model, lr, args.weight_decay, dist.device)

# ----------------------------------------------------------------------------- data
settings = ["one-shot", "zero-shot"] if args.setting == "mixed" else [args.setting]
images = image_cache(args.vision_cache_gb)
datasets = {s: SFEDataset(records, args.data, cfg, setting=s, images=images) for s in settings}
collate = Collator(tokenizer, cfg, facts_mode=cfg.facts_mode, max_len=args.max_len)
sampler = ResumableDistributedSampler(len(records), dist.rank, dist.world_size, seed=args.seed)
print0(f"data: {len(records)} records from {data_file}; global batch {args.global_batch} = "
       f"{dist.world_size} ranks x {args.micro_batch} x {accum} accumulation steps")
start_run(run_dir, vars(args), dist.rank, cfg.to_dict())  # lock, clean partial saves, config.json

# ----------------------------------------------------------------------------- resume
step = resume(run_dir, model, optimizer, sampler, dist.rank) if args.resume else 0

# ----------------------------------------------------------------------------- loop
stream = (i for _ in itertools.count() for i in sampler)  # endless, epoch after epoch
log = MetricsLog(run_dir, dist.rank)
flops_tok = flops_per_token(cfg, seq_len=512)
peak_flops = 989e12 if dist.device.type == "cuda" else None  # H100 bf16 dense; for MFU only
model.train()
t_last = time.time()
while step < max_steps:
    # -- one optimiser step: micro-batches, loss / n_answer_tokens_global, backward
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, lr, warmup, max_steps)
    setting = settings[step % len(settings)]  # "mixed" alternates the setting per step
    batches = []
    for _ in range(accum):
        idx = [next(stream) for _ in range(args.micro_batch)]
        batches.append(collate([datasets[setting][i] for i in idx]))
    # Normalise by the answer tokens of the *global* batch (all micro-batches, all ranks), so
    # every answer token weighs the same whatever the world size and accumulation.
    n_local = sum(int((b["labels"] != -100).sum()) for b in batches)
    n_global = all_reduce_sum(torch.tensor(float(n_local), device=dist.device)).item()
    loss_total, tokens = torch.zeros((), device=dist.device), 0
    for batch in batches:
        batch = to_device(batch, dist.device)
        # No set_requires_gradient_sync(False) on the first micro-batches: FSDP2 would then
        # hold every rank's unsharded gradients in fp32 (sage.plan: 130 GiB for 40B); each
        # micro-batch is reduce-scattered and the sharded gradients accumulate instead.
        _, loss_sum, _ = model(batch, answer_only=True)  # LM head at answer tokens only
        # FSDP averages gradients over ranks; x world_size turns that into a global token sum
        loss = loss_sum.sum() * dist.world_size / n_global
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
        extra = f" | {args.global_batch / dt:.1f} samples/s | ETA {eta(dt, max_steps - step)}"
        if peak_flops:
            extra += f" | MFU {100 * tok_s * flops_tok / (peak_flops * dist.world_size):.1f}%"
        print0(status_line(step, max_steps, loss_val, optimizer.param_groups[0]["lr"], gnorm,
                           dt, tok_s, extra))
        log.log({"step": step, "loss": loss_val, "lr": optimizer.param_groups[0]["lr"],
                 "gnorm": gnorm, "step_ms": dt * 1000, "tok_s": tok_s, "setting": setting})
    # -- checkpoint (all ranks take part), always after the last step
    if step == max_steps or (args.save_every and step % args.save_every == 0):
        save_checkpoint(run_dir, step, model, optimizer,
                        {"sampler": sampler.state_dict(), "args": vars(args)}, dist.rank,
                        keep_last=args.keep_last)

# ----------------------------------------------------------------------------- export, cleanup
export_model(model, cfg, tokenizer, run_dir / "export", dist.rank,
             dtype=getattr(torch, args.export_dtype))
print0(f"exported {run_dir / 'export'}")
if model.vision_cache is not None:
    print0(f"rank 0's {model.vision_cache.stats()}")
log.close()
cleanup()
