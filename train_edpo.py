"""Stage 2: Entropy-aware DPO (E-DPO) preference alignment (paper §3.3; DESIGN §2).

Policy and frozen reference both start from the SFE export. InternViT, the fusion attention
and its head are frozen; the adapter and the LLM are trained. Per instance, the judge's
sub-scores give S_i (Eq. 3), the answer entropies H_i (Eq. 4) and two pairs (Eq. 5): the
extreme pair (a_1, a_L) with dH_max and the adjacent pair (a_i^, a_i^+1) with dH_min. Chosen
and rejected answers go through one forward; the loss is Eq. 6-7 averaged over all pairs.

    python -m sage.tools.mle --data data/synthad/edpo_train.jsonl --judge oracle --in_place
    python train_edpo.py                                  # tiny default, from runs/sfe/export
    torchrun --nproc_per_node=8 train_edpo.py --init runs/sfe40b/export --data data/adpl \\
        --split visa_train --ref_cache runs/edpo40b/ref_logps.json --activation_checkpointing
    python train_edpo.py --loss dpo                       # ablation: eta = 0, extreme pair only

Defaults: beta = 0.1, the usual DPO strength (the paper gives none); eta = 1.0. Under Eq. 4
every H_i lies in [0, 1/e], so dH <= 0.37 and eta = 1 shifts d by at most 0.37 nats: enough to
demand a larger reward margin on clearly separable pairs (dH_max) than on subtle ones (dH_min),
small against the beta-scaled margins the policy learns.
"""

import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

import torch

from sage.config import SageConfig
from sage.data import EDPOCollator, EDPODataset, ResumableDistributedSampler, load_jsonl
from sage.distributed import (all_reduce_sum, build_model, build_optimizer, cleanup,
                              gather_objects, init_distributed, print0)
from sage.inference import to_device
from sage.losses import answer_logprobs, dpo_rewards, edpo_loss
from sage.runs import check_run_dir, export_model, resume, save_checkpoint
from sage.tokenizer import Tokenizer
from sage.tools.args import Parser, add_optim_args, add_runtime_args
from sage.training import (MetricsLog, accumulation_steps, check_finite, eta, grad_norm_and_clip,
                           lr_at, resolve_recipe, seed_everything, status_line)

# ----------------------------------------------------------------------------- arguments
p = Parser(description=__doc__)
# model
p.add_argument("--init", default="runs/sfe/export", help="SFE export: policy and reference")
p.add_argument("--facts", choices=["fe", "hard", "none"], default=None,
               help="facts mode (None: the one the SFE export was trained with)")
# data
p.add_argument("--data", default="data/synthad", help="data root holding the JSONL splits")
p.add_argument("--split", default="edpo_train", help="JSONL split with 4 ranked answers + mle")
p.add_argument("--setting", choices=["one-shot", "zero-shot", "mixed"], default="mixed",
               help="reference given (one-shot), not (zero-shot), or alternating steps")
p.add_argument("--max_len", type=int, default=None, help="truncate sequences (tokens)")
# E-DPO
p.add_argument("--loss", choices=["edpo", "dpo"], default="edpo",
               help="edpo: both pairs with the entropy bias; dpo: eta = 0, extreme pair only")
p.add_argument("--beta", type=float, default=0.1, help="beta of Eq. 6-7 (DPO strength)")
p.add_argument("--eta", type=float, default=1.0, help="eta of Eq. 6 (entropy bias scale)")
p.add_argument("--tau", type=float, default=1.0, help="softmax temperature of Eq. 4")
p.add_argument("--ref_cache", default=None,
               help="JSON file of precomputed reference log-probs (computed if absent); "
                    "without it the reference model stays in memory")
# optimisation
add_optim_args(p)
# runtime
add_runtime_args(p, out="runs/edpo")
args = p.parse_args()

RECIPES = {"paper": dict(lr=2e-6, warmup=100, max_steps=2000),
           "tiny": dict(lr=5e-5, warmup=10, max_steps=60)}
eta_value = 0.0 if args.loss == "dpo" else args.eta
pairs = "extreme" if args.loss == "dpo" else "both"
# The config is built once: --init's, with --facts replacing facts_mode (checked by __post_init__)
try:
    cfg = SageConfig.from_pretrained(args.init)
    cfg = dataclasses.replace(cfg, facts_mode=args.facts or cfg.facts_mode)
except (ValueError, KeyError, FileNotFoundError) as e:
    p.error(str(e))

# ----------------------------------------------------------------------------- distributed, seeds
dist = init_distributed(args.device)
seed_everything(args.seed + dist.rank)
run_dir = Path(args.out)
check_run_dir(run_dir, args.resume)
run_dir.mkdir(parents=True, exist_ok=True)

# ----------------------------------------------------------------------------- model
tokenizer = Tokenizer.from_pretrained(args.init)
lr, warmup, max_steps = resolve_recipe(args, cfg, RECIPES)
print0(f"config: {json.dumps(cfg.to_dict())}")
print0(f"loss {args.loss}: beta {args.beta}, eta {eta_value}, pairs {pairs}; lr {lr:g}, "
       f"warmup {warmup}, steps {max_steps}")
(run_dir / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "args": vars(args)},
                                                indent=2))
model = build_model(cfg, dist, args.init, stage="edpo",
                    activation_checkpointing=args.activation_checkpointing,
                    cpu_offload=args.cpu_offload)
model.tokenizer = tokenizer
reference = build_model(cfg, dist, args.init, stage="frozen", cpu_offload=args.cpu_offload)
reference.tokenizer = tokenizer
reference.eval()
optimizer = build_optimizer(model, lr, args.weight_decay, dist.device)

# ----------------------------------------------------------------------------- data
records = load_jsonl(Path(args.data) / f"{args.split}.jsonl", kind="qa")
settings = ["one-shot", "zero-shot"] if args.setting == "mixed" else [args.setting]
datasets = {s: EDPODataset(records, args.data, cfg, setting=s) for s in settings}
collate = EDPOCollator(tokenizer, cfg, pairs=pairs, temperature=args.tau, max_len=args.max_len)
accum = accumulation_steps(args.global_batch, dist.world_size, args.micro_batch)
sampler = ResumableDistributedSampler(len(records), dist.rank, dist.world_size, seed=args.seed)


def answer_logps(net, batch: dict) -> torch.Tensor:
    """Sequence log-probs of every sequence in an E-DPO batch (chosen first, then rejected)."""
    logits, _, _ = net({k: v for k, v in batch.items() if k != "labels"})
    return answer_logprobs(logits, batch["labels"])  # (2M,)


def ref_key(rec_id: str, setting: str, rank: int) -> str:
    return f"{rec_id}|{setting}|{rank}"


# ----------------------------------------------------------------------------- reference log-probs
ref_table = None
if args.ref_cache:
    cache = Path(args.ref_cache)
    if cache.exists():
        ref_table = json.loads(cache.read_text())
        print0(f"reference log-probs: {len(ref_table)} from {cache}")
    else:
        # One pass of the frozen reference over every (record, setting, answer), split by rank.
        local = {}
        with torch.no_grad():
            for s in settings:
                for i in range(dist.rank, len(records), dist.world_size):
                    ex = datasets[s][i]
                    n = len(ex["answers"])
                    batch = to_device(collate.build([ex] * n, ex["answers"]), dist.device)
                    lp = answer_logps(reference, batch)
                    for r in range(n):
                        local[ref_key(ex["id"], s, r)] = float(lp[r])
        ref_table = {k: v for part in gather_objects(local) for k, v in part.items()}
        if dist.is_main:
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(ref_table))
            os.replace(tmp, cache)
        print0(f"reference log-probs: computed {len(ref_table)}, cached in {cache}")
    del reference  # the reference model need not stay in memory
    reference = None

# ----------------------------------------------------------------------------- resume
step = resume(run_dir, model, optimizer, sampler, dist.rank) if args.resume else 0

# ----------------------------------------------------------------------------- loop
stream = (i for _ in itertools.count() for i in sampler)  # endless, epoch after epoch
log = MetricsLog(run_dir, dist.rank)
model.train()
t_last = time.time()
while step < max_steps:
    # -- one optimiser step over all micro-batches; the loss is the mean over the pairs of
    # the global batch (both pairs of every instance, all ranks)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, lr, warmup, max_steps)
    setting = settings[step % len(settings)]
    batches = [collate([datasets[setting][next(stream)] for _ in range(args.micro_batch)])
               for _ in range(accum)]
    n_pairs = all_reduce_sum(torch.tensor(float(sum(b["n_pairs"] for b in batches)),
                                          device=dist.device)).item()
    stats = torch.zeros(6, device=dist.device)  # loss, margin, acc, dH_max, dH_min, tokens
    for batch in batches:
        batch = to_device(batch, dist.device)
        M = batch["n_pairs"]
        if ref_table is not None:
            keys = [ref_key(rid, setting, int(r)) for rid, r in
                    zip(batch["ids"], batch["pair_ranks"].T.reshape(-1).tolist())]
            ref = torch.tensor([ref_table[k] for k in keys], device=dist.device)  # (2M,)
        else:
            with torch.no_grad():
                ref = answer_logps(reference, batch)  # (2M,)
        # reduce-scatter every micro-batch (sharded accumulation): see train_sfe.py
        pol = answer_logps(model, batch)  # (2M,): chosen then rejected
        losses = edpo_loss(pol[:M], pol[M:], ref[:M], ref[M:], batch["pair_delta_h"],
                           args.beta, eta_value)  # Eq. 6-7: (M,)
        loss = losses.sum() * dist.world_size / n_pairs  # FSDP averages over ranks
        check_finite(loss, step, batch["ids"][:M])
        loss.backward()
        with torch.no_grad():
            margin = (dpo_rewards(pol[:M], ref[:M], args.beta)
                      - dpo_rewards(pol[M:], ref[M:], args.beta))  # (M,)
            extreme = torch.tensor([k == "extreme" for k in batch["pair_kind"]],
                                   device=dist.device)
            dh = batch["pair_delta_h"]
            stats += torch.stack([losses.sum(), margin.sum(), (margin > 0).float().sum(),
                                  dh[extreme].sum(), dh[~extreme].sum(),
                                  batch["attention_mask"].sum().float()])
    # -- clip, step, zero_grad
    gnorm = grad_norm_and_clip(model, args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    # -- log (rank 0): .item() only here
    if step % args.log_every == 0 or step == max_steps:
        s = all_reduce_sum(stats).tolist()
        n_inst = args.global_batch
        n_adj = n_pairs - n_inst
        dt = (time.time() - t_last) / (args.log_every if step % args.log_every == 0 else 1)
        t_last = time.time()
        rec = {"step": step, "loss": s[0] / n_pairs, "reward_margin": s[1] / n_pairs,
               "reward_acc": s[2] / n_pairs, "dh_max": s[3] / n_inst,
               "dh_min": s[4] / n_adj if n_adj else None, "lr": optimizer.param_groups[0]["lr"],
               "gnorm": gnorm, "step_ms": dt * 1000, "tok_s": s[5] / dt, "setting": setting}
        extra = (f" | margin {rec['reward_margin']:+.3f} | acc {rec['reward_acc']:.2f} | "
                 f"dH_max {rec['dh_max']:.3f}"
                 + (f" | dH_min {rec['dh_min']:.3f}" if n_adj else "")
                 + f" | ETA {eta(dt, max_steps - step)}")
        print0(status_line(step, max_steps, rec["loss"], rec["lr"], gnorm, dt, rec["tok_s"],
                           extra))
        log.log(rec)
    # -- checkpoint (all ranks take part), always after the last step
    if step == max_steps or (args.save_every and step % args.save_every == 0):
        save_checkpoint(run_dir, step, model, optimizer,
                        {"sampler": sampler.state_dict(), "args": vars(args)}, dist.rank,
                        keep_last=args.keep_last)

# ----------------------------------------------------------------------------- export, cleanup
export_model(model, cfg, tokenizer, run_dir / "export", dist.rank)
print0(f"exported {run_dir / 'export'}")
log.close()
cleanup()
