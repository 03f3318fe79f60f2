"""Stage 2: Entropy-aware DPO (E-DPO) preference alignment (paper §3.3; docs/design.md §2).

Policy and frozen reference both start from the SFE export. InternViT, the fusion attention
and its head are frozen; the adapter and the LLM are trained. Per instance, the judge's
sub-scores give S_i (Eq. 3), the answer entropies H_i (Eq. 4) and two pairs (Eq. 5): the
extreme pair (a_1, a_L) with dH_max and the adjacent pair (a_i^, a_i^+1) with dH_min. An
instance is one packed row (its prompt once, each answer it needs as a segment), so chosen and
rejected answers go through one forward; the loss is Eq. 6-7 averaged over all pairs. With
--ref_cache the reference log-probs are computed in one batched pass before training
(`--tp N` shards that pass over N ranks per model copy) and the reference is then dropped.

    python -m sage.tools.mle --data data/synthad/edpo_train.jsonl --judge oracle --in_place
    python train_edpo.py                                  # tiny default, from runs/sfe/export
    torchrun --nproc_per_node=8 train_edpo.py --init runs/sfe40b/export --data data/adpl \\
        --split visa_train --ref_cache runs/edpo40b/ref_logps.json --tp 8 \\
        --micro_batch 4 --activation_checkpointing
    python train_edpo.py --loss dpo                       # ablation: eta = 0, extreme pair only

Defaults: beta = 0.1, the usual DPO strength (the paper gives none); eta = 1.0. Under Eq. 4
every H_i lies in [0, 1/e], so dH <= 0.37 and eta = 1 shifts d by at most 0.37 nats: enough to
demand a larger reward margin on clearly separable pairs (dH_max) than on subtle ones (dH_min),
small against the beta-scaled margins the policy learns.
"""

import dataclasses
import itertools
import json
import time
from pathlib import Path

import torch

from sage.config import SageConfig
from sage.data import EDPOCollator, EDPODataset, ResumableDistributedSampler
from sage.data.images import image_cache
from sage.distributed import (all_reduce_sum, build_model, build_optimizer, cleanup,
                              init_distributed, print0)
from sage.inference import to_device
from sage.losses import dpo_rewards, edpo_loss
from sage.models.feature_cache import attach_vision_cache
from sage.reference import cache_meta, load_cache, ref_key, reference_logps, save_cache
from sage.runs import check_run_dir, export_model, resume, save_checkpoint, start_run
from sage.tensor_parallel import load_sharded, model_copies
from sage.tokenizer import Tokenizer
from sage.tools.args import (Parser, add_optim_args, add_runtime_args, at_least, load_records,
                             positive)
from sage.tools.errors import report_errors
from sage.training import (MetricsLog, Progress, accumulation_steps, check_finite, eta,
                           grad_norm_and_clip, lr_at, resolve_recipe, seed_everything,
                           status_line)

report_errors()  # an expected error: one line `error: ...`, exit 2 (--debug: traceback)

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
p.add_argument("--beta", type=positive(), default=0.1, help="beta of Eq. 6-7 (DPO strength)")
p.add_argument("--eta", type=at_least(0.0, float), default=1.0,
               help="eta of Eq. 6 (entropy bias scale)")
p.add_argument("--tau", type=positive(), default=1.0, help="softmax temperature of Eq. 4")
p.add_argument("--ref_cache", default=None,
               help="JSON file of reference log-probs, computed if absent, refused if made from "
                    "another --init / data / setting / max_len; without it the reference "
                    "model stays in memory")
p.add_argument("--tp", type=at_least(1), default=1,
               help="tensor-parallel ranks per reference copy for the --ref_cache pass")
# optimisation
add_optim_args(p)
# runtime
add_runtime_args(p, out="runs/edpo")
args = p.parse_args()

RECIPES = {"paper": dict(lr=2e-6, warmup=100, max_steps=2000),
           # tiny: 5e-5 lost the decision ("So the answer is.") in 5 of 9 ablation runs;
           # 1e-5 in none of 3 (docs/experiments.md, "Table 3 over three seeds")
           "tiny": dict(lr=1e-5, warmup=10, max_steps=60)}
if args.tp > 1 and not args.ref_cache:
    p.error("--tp shards the reference for the one --ref_cache pass; pass --ref_cache FILE")
eta_value = 0.0 if args.loss == "dpo" else args.eta
pairs = "extreme" if args.loss == "dpo" else "both"
# The config is built once: --init's, with --facts replacing facts_mode (checked by __post_init__)
try:
    cfg = SageConfig.from_pretrained(args.init)
    cfg = dataclasses.replace(cfg, facts_mode=args.facts or cfg.facts_mode,
                              system_message=(cfg.system_message if args.system_message is None
                                              else args.system_message))
except (ValueError, KeyError, FileNotFoundError) as e:
    p.error(str(e))

# ----------------------------------------------------------------------------- distributed, seeds
dist = init_distributed(args.device)
seed_everything(args.seed + dist.rank)
accum = accumulation_steps(args.global_batch, dist.world_size, args.micro_batch)
run_dir = Path(args.out)  # checked now; written only once every input has been read
check_run_dir(run_dir, args.resume, vars(args), args.resume_force)
records = load_records(Path(args.data) / f"{args.split}.jsonl", "qa", args.skip_bad,
                       min_facts=cfg.facts_needed)

# ----------------------------------------------------------------------------- data
tokenizer = Tokenizer.from_pretrained(args.init)
settings = ["one-shot", "zero-shot"] if args.setting == "mixed" else [args.setting]
images = image_cache(args.vision_cache_gb)
datasets = {s: EDPODataset(records, args.data, cfg, setting=s, images=images) for s in settings}
collate = EDPOCollator(tokenizer, cfg, pairs=pairs, temperature=args.tau, max_len=args.max_len)
sampler = ResumableDistributedSampler(len(records), dist.rank, dist.world_size, seed=args.seed)

# ----------------------------------------------------------------------------- reference (Eq. 6-7)
# log pi_ref from a cache made from these very inputs, or one batched pass of the frozen
# reference written to --ref_cache, or (no --ref_cache) the reference kept beside the policy.
ref_table, reference = None, None
if args.ref_cache:
    meta = cache_meta(args.init, Path(args.data) / f"{args.split}.jsonl", settings, args.max_len)
    ref_table = load_cache(args.ref_cache, meta)  # None when absent, an error when stale
    if ref_table is not None:
        print0(f"reference log-probs: {len(ref_table)} from {args.ref_cache}")
if ref_table is None:
    copies = model_copies(dist, args.tp)  # tp > 1: inference-only sharding for the pass
    if copies.tp_mesh is not None:
        reference = load_sharded(args.init, copies.tp_mesh, cfg=cfg, device=dist.device,
                                 dtype=torch.bfloat16 if dist.device.type == "cuda" else None)
    else:  # FSDP2-sharded over the world, bf16 on CUDA
        reference = build_model(cfg, dist, args.init, stage="frozen",
                                cpu_offload=args.cpu_offload, init_seed=args.seed)
    reference.tokenizer = tokenizer
    reference.eval()
    # FSDP over the world: the ranks run the encoder together; a --tp copy's ranks share batches
    attach_vision_cache(reference, args.vision_cache_gb,
                        agree=all_reduce_sum if copies.tp_mesh is None else None)
if args.ref_cache and ref_table is None:
    progress = Progress("reference log-probs", len(records) * len(settings), "records",
                        printer=print0)
    ref_table = reference_logps(reference, datasets, collate, args.micro_batch,
                                copies.dp_rank, copies.dp_size, copies.writer, dist.device,
                                progress.update)
    if dist.is_main:
        save_cache(args.ref_cache, meta, ref_table)
    print0(f"reference log-probs: computed {len(ref_table)}, cached in {args.ref_cache}")
    reference = None  # the reference model need not stay in memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

# ----------------------------------------------------------------------------- model
lr, warmup, max_steps = resolve_recipe(args, cfg, RECIPES)
print0(f"config: {json.dumps(cfg.to_dict())}")
print0(f"loss {args.loss}: beta {args.beta}, eta {eta_value}, pairs {pairs}; lr {lr:g}, "
       f"warmup {warmup}, steps {max_steps}")
model = build_model(cfg, dist, args.init, stage="edpo",
                    activation_checkpointing=args.activation_checkpointing,
                    cpu_offload=args.cpu_offload, init_seed=args.seed)
model.tokenizer = tokenizer
attach_vision_cache(model, args.vision_cache_gb, agree=all_reduce_sum)  # a frozen InternViT
optimizer = build_optimizer(model, lr, args.weight_decay, dist.device)
start_run(run_dir, vars(args), dist.rank, cfg.to_dict())  # lock, clean partial saves, config.json


def answer_logps(net, batch: dict) -> torch.Tensor:
    """log pi(a|x) of every sequence of a packed E-DPO batch (LM head at answer tokens only)."""
    _, loss_sum, _ = net(batch, answer_only=True)
    return -loss_sum  # (S,)


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
    stats = torch.zeros(7, device=dist.device)  # loss, margin, acc, dH_max, dH_min, tokens, r_w
    for batch in batches:
        batch = to_device(batch, dist.device)
        w, l = batch["pair_w"], batch["pair_l"]  # (M,) each: sequences of a_w and a_l
        if ref_table is not None:
            rows = [batch["ids"][b] for b in batch["pair_index"].tolist()]
            ref_w, ref_l = (torch.tensor([ref_table[ref_key(rid, setting, r)] for rid, r in
                                          zip(rows, batch["pair_ranks"][:, k].tolist())],
                                         device=dist.device) for k in (0, 1))  # (M,) each
        else:
            with torch.no_grad():
                ref = answer_logps(reference, batch)  # (S,)
            ref_w, ref_l = ref[w], ref[l]
        # reduce-scatter every micro-batch (sharded accumulation): see train_sfe.py
        pol = answer_logps(model, batch)  # (S,): every answer sequence of the packed rows
        losses = edpo_loss(pol[w], pol[l], ref_w, ref_l, batch["pair_delta_h"],
                           args.beta, eta_value)  # Eq. 6-7: (M,)
        loss = losses.sum() * dist.world_size / n_pairs  # FSDP averages over ranks
        check_finite(loss, step, batch["ids"])
        loss.backward()
        with torch.no_grad():
            chosen = dpo_rewards(pol[w], ref_w, args.beta)  # (M,)
            margin = chosen - dpo_rewards(pol[l], ref_l, args.beta)  # (M,)
            extreme = torch.tensor([k == "extreme" for k in batch["pair_kind"]],
                                   device=dist.device)
            dh = batch["pair_delta_h"]
            stats += torch.stack([losses.sum(), margin.sum(), (margin > 0).float().sum(),
                                  dh[extreme].sum(), dh[~extreme].sum(),
                                  (batch["position_ids"] >= 0).sum().float(), chosen.sum()])
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
        # reward_chosen < 0: the chosen answers lose likelihood too (the margin grows by
        # pushing both down; decisions can then vanish from generated answers)
        rec = {"step": step, "loss": s[0] / n_pairs, "reward_margin": s[1] / n_pairs,
               "reward_chosen": s[6] / n_pairs,
               "reward_acc": s[2] / n_pairs, "dh_max": s[3] / n_inst,
               "dh_min": s[4] / n_adj if n_adj else None, "lr": optimizer.param_groups[0]["lr"],
               "gnorm": gnorm, "step_ms": dt * 1000, "tok_s": s[5] / dt, "setting": setting}
        extra = (f" | margin {rec['reward_margin']:+.3f} | chosen {rec['reward_chosen']:+.3f}"
                 f" | acc {rec['reward_acc']:.2f} | "
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
if model.vision_cache is not None:
    print0(f"rank 0's policy {model.vision_cache.stats()}")
export_model(model, cfg, tokenizer, run_dir / "export", dist.rank,
             dtype=getattr(torch, args.export_dtype))
print0(f"exported {run_dir / 'export'}")
log.close()
cleanup()
