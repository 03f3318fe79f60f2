"""Pieces shared by train_sfe.py and train_edpo.py: model set-up under FSDP2, the learning-rate
schedule, resumable sharded checkpoints, export, metrics and the compute estimate for MFU.

The scripts stay flat and call these in order: build_model -> optimizer -> (resume) -> loop
-> export. Nothing here parses arguments or picks a data set.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from argparse import ArgumentParser, BooleanOptionalAction
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)

from sage.checkpoint import INTERNVL_KEY_MAP, load_into, save_state_dict
from sage.config import SageConfig
from sage.distributed import DistInfo, barrier, print0, shard_model
from sage.models.sage import SageModel

# Trainable groups (DESIGN §2): InternViT is frozen in both stages.
TRAINABLE = {
    "pretrain": ("adapter.", "llm."),
    "sfe": ("adapter.", "fusion.", "fact_proj.", "llm."),
    "edpo": ("adapter.", "llm."),
    "frozen": (),  # the E-DPO reference model
}
NEW_MODULES = ("fusion.", "fact_proj.")  # SAGE's own keys: absent from a plain InternVL2 dir


def add_optim_args(p: ArgumentParser) -> None:
    """`# optimisation` flags shared by train_sfe.py and train_edpo.py."""
    p.add_argument("--recipe", choices=["auto", "paper", "tiny"], default="auto",
                   help="defaults for lr/warmup/steps: paper (the real model) or tiny; "
                        "auto = tiny for a model of width < 1024")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--global_batch", type=int, default=32, help="samples per optimizer step")
    p.add_argument("--micro_batch", type=int, default=8, help="samples per forward per rank")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")


def add_runtime_args(p: ArgumentParser, out: str) -> None:
    """`# runtime` flags shared by train_sfe.py and train_edpo.py."""
    p.add_argument("--out", default=out, help="run directory (checkpoints, metrics, export)")
    p.add_argument("--save_every", type=int, default=0,
                   help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--keep_last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", action=BooleanOptionalAction, default=False,
                   help="continue from the newest complete checkpoint in --out")
    p.add_argument("--activation_checkpointing", action=BooleanOptionalAction, default=False,
                   help="recompute each block in backward")
    p.add_argument("--cpu_offload", action=BooleanOptionalAction, default=False,
                   help="FSDP2 CPU offload of params, grads and optimizer state")
    p.add_argument("--log_every", type=int, default=10, help="status line every N steps")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


def resolve_recipe(args, cfg: SageConfig, recipes: dict) -> tuple[float, int, int]:
    """(lr, warmup, max_steps): explicit flags win over the recipe's defaults."""
    name = args.recipe if args.recipe != "auto" else ("tiny" if cfg.llm.dim < 1024 else "paper")
    r = recipes[name]
    lr = args.lr or r["lr"]
    warmup = args.warmup if args.warmup is not None else r["warmup"]
    return lr, warmup, args.max_steps or r["max_steps"]


def accumulation_steps(global_batch: int, world: int, micro_batch: int) -> int:
    """Micro-batches per rank per optimizer step so that the global batch is exact."""
    if global_batch % (world * micro_batch):
        raise ValueError(f"--global_batch {global_batch} must be a multiple of world size "
                         f"{world} x --micro_batch {micro_batch}")
    return global_batch // (world * micro_batch)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warmup over `warmup` steps to `peak`, then linear decay to min_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * max(0.0, 1 - frac))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_trainable(model: torch.nn.Module, prefixes: tuple[str, ...]) -> tuple[int, int]:
    """requires_grad = True exactly for parameters under `prefixes`; -> (trainable, frozen) counts."""
    n_train = n_frozen = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        n_train += p.numel() if p.requires_grad else 0
        n_frozen += 0 if p.requires_grad else p.numel()
    return n_train, n_frozen


def build_model(cfg: SageConfig, dist: DistInfo, init_dir: str | None, stage: str,
                activation_checkpointing: bool = False, cpu_offload: bool = False,
                bf16: bool | None = None) -> SageModel:
    """Meta build -> freeze -> FSDP2 shard -> materialise -> fill this rank's shards.

    init_dir None: fresh weights (the tiny `--stage pretrain` run). Otherwise an InternVL2-layout
    directory; SAGE's fusion/head keys may be absent (a plain InternVL2 checkpoint) and are
    then initialised fresh and reported.
    """
    with torch.device("meta"):
        model = SageModel(cfg)
    set_trainable(model, TRAINABLE[stage])
    shard_model(model, dist.device, bf16=bf16, activation_checkpointing=activation_checkpointing,
                cpu_offload=cpu_offload)
    model.to_empty(device=dist.device)
    with torch.no_grad():
        model.init_weights()
    if init_dir is not None:
        report = load_into(model, init_dir, INTERNVL_KEY_MAP, strict=True, new_ok=NEW_MODULES)
        print0(f"loaded {init_dir}: {report}")
    return model


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model, lr: float, weight_decay: float, device: torch.device):
    """AdamW over trainable parameters only (fused on CUDA); no decay on norms and biases."""
    decay, no_decay = [], []
    for p in trainable_params(model):
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


# ---------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, extra: dict, rank: int,
                    keep_last: int = 2) -> Path:
    """Sharded DCP checkpoint `run_dir/step_XXXXXX/`, written atomically and pruned to keep_last.

    All ranks write into `.tmp_step_XXXXXX`; rank 0 adds meta.json (marked complete) and renames
    it. A directory without a complete meta.json is never resumed from (see latest_checkpoint).
    """
    final = run_dir / f"step_{step:06d}"
    tmp = run_dir / f".tmp_step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this same step
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank:03d}.pt")
    barrier()
    if rank == 0:
        meta = {"step": step, "complete": True, "time": time.time(), **extra}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, final)
        ckpts = sorted(p for p in run_dir.glob("step_*") if _is_complete(p))
        for old in ckpts[:-keep_last]:
            shutil.rmtree(old)  # our own earlier training checkpoints only
    barrier()
    return final


def _is_complete(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text()).get("complete") is True
    except (OSError, json.JSONDecodeError):
        return False


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete `step_*` directory (half-written or corrupted ones are skipped)."""
    ckpts = sorted(p for p in run_dir.glob("step_*") if p.is_dir() and _is_complete(p))
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, model, optimizer, rank: int) -> dict:
    """Restore model, optimizer and this rank's RNG from a DCP checkpoint; -> its meta dict."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    rng = path / f"rng_rank{rank:03d}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "meta.json").read_text())


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to start a new run over an earlier run's checkpoints (it would crash at the
    first save onto an existing step, and pruning would delete the earlier run's)."""
    ckpt = None if resume else latest_checkpoint(run_dir)
    if ckpt is not None:
        raise SystemExit(f"{run_dir} holds checkpoints of an earlier run ({ckpt.name}); pass "
                         "--resume to continue it or choose another --out (nothing was changed)")


def keep_aside(path: Path) -> Path | None:
    """Rename an existing run directory to `<path>.<timestamp>` so a new run can use the
    name; -> the new name (None when there was nothing). Nothing is deleted."""
    if not path.exists():
        return None
    stamp = f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = path.with_name(stamp), 1
    while aside.exists():
        aside, n = path.with_name(f"{stamp}-{n}"), n + 1
    path.rename(aside)
    return aside


def new_run_dir(path: Path) -> None:
    """Create `path` for a new run of a driver (quickstart, ablations), first moving an earlier
    run there aside with `keep_aside` and saying so."""
    aside = keep_aside(path)
    if aside:
        print(f"kept the earlier run {path} as {aside}")
    path.mkdir(parents=True)


def resume(run_dir: Path, model, optimizer, sampler, rank: int) -> int:
    """--resume: restore the newest complete checkpoint (model, optimizer, RNG, data position);
    -> the step to continue from (0 when there is none yet)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        print0(f"--resume: no complete checkpoint in {run_dir}; starting at step 0")
        return 0
    meta = load_checkpoint(ckpt, model, optimizer, rank)
    sampler.load_state_dict(meta["sampler"])
    print0(f"resumed from {ckpt} at step {meta['step']}")
    return meta["step"]


def export_model(model, cfg: SageConfig, tokenizer, out_dir: Path, rank: int) -> None:
    """Gather the full state dict (CPU, rank 0) and write the InternVL2 layout + sage.* keys."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    if rank == 0:
        save_state_dict(sd, cfg, out_dir, tokenizer=tokenizer, overwrite=True)
    barrier()


# ---------------------------------------------------------------------- metrics


def check_finite(loss: torch.Tensor, step: int, ids: list[str]) -> None:
    """Stop on NaN/inf naming the step and the samples; the last checkpoint stays untouched."""
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; samples: {ids}")


def flops_per_token(cfg: SageConfig, seq_len: int, trainable_vision: bool = False) -> float:
    """Training FLOPs per LLM token: 6 N (weights) + 12 L d T (attention), the usual estimate."""
    m = cfg.llm
    n_llm = m.n_layers * (2 * m.dim * m.dim + 2 * m.dim * m.n_kv_heads * m.head_dim
                          + 3 * m.dim * m.ffn_dim) + m.dim * m.vocab_size
    return 6 * n_llm + 12 * m.n_layers * m.dim * seq_len


class MetricsLog:
    """metrics.jsonl in the run directory (rank 0) plus the fixed-order status line."""

    def __init__(self, run_dir: Path, rank: int):
        self.rank = rank
        self.file = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None

    def log(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def status_line(step: int, total: int, loss: float, lr: float, gnorm: float, dt: float,
                tok_s: float, extra: str = "") -> str:
    mem = (f" | {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
           if torch.cuda.is_available() else "")
    return (f"step {step:05d}/{total:05d} | loss {loss:.4f} | lr {lr:.1e} | gnorm {gnorm:.2f} | "
            f"{dt * 1000:.0f} ms | {tok_s:,.0f} tok/s{mem}{extra}")


def eta(seconds_per_step: float, steps_left: int) -> str:
    s = int(seconds_per_step * steps_left)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def grad_norm_and_clip(model, max_norm: float) -> float:
    """Global L2 gradient norm over trainable params (DTensor-aware), clipped to max_norm."""
    norm = torch.nn.utils.clip_grad_norm_(trainable_params(model), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


