"""Loop maths shared by the training scripts (train_sfe.py, train_edpo.py,
sage.tools.pretrain): recipe defaults, the learning-rate schedule, gradient accumulation,
seeding, the compute estimate for MFU, the finiteness check, gradient clipping, the status
line and metrics.jsonl. Model set-up under FSDP2 lives in sage.distributed, checkpoints and run
directories in sage.runs; nothing here parses arguments or picks a data set.

    lr = lr_at(step, peak=2e-6, warmup=1000, total=5000)
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from sage.config import SageConfig
from sage.distributed import trainable_params


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


# ---------------------------------------------------------------------- metrics


def check_finite(loss: torch.Tensor, step: int, ids: list[str]) -> None:
    """Stop on NaN/inf naming the step and the samples; the last checkpoint stays untouched."""
    if not torch.isfinite(loss).all():
        raise FloatingPointError(
            f"non-finite loss {loss.item()} at step {step} (samples: {', '.join(map(str, ids))}); the "
            f"checkpoints already written are kept: lower --lr or --grad_clip, then --resume "
            f"--resume_force")


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


class Progress:
    """Progress lines for a long loop: `label: done/total unit | rate unit/s | ETA`, at most
    one every `every` seconds, and always at the end."""

    def __init__(self, label: str, total: int, unit: str = "items", every: float = 10.0,
                 printer=print):
        self.label, self.total, self.unit, self.every, self.printer = (label, total, unit,
                                                                       every, printer)
        self.t0 = self.t_last = time.time()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.t_last < self.every and self.done < self.total:
            return
        self.t_last = now
        rate = self.done / max(now - self.t0, 1e-9)
        left = eta(1 / rate, self.total - self.done) if rate > 0 else "--"
        self.printer(f"{self.label}: {self.done}/{self.total} {self.unit} | "
                     f"{rate:.2f} {self.unit}/s | ETA {left}")


def grad_norm_and_clip(model, max_norm: float) -> float:
    """Global L2 gradient norm over trainable params (DTensor-aware), clipped to max_norm."""
    norm = torch.nn.utils.clip_grad_norm_(trainable_params(model), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


