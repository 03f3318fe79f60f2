"""Training-step benchmark: a slice of InternVL2-40B at full width under FSDP2 (prints figures).

Forward + backward + AdamW step of SageModel with `--llm_layers` Yi-34B decoder layers and
`--vit_layers` InternViT-6B blocks (frozen, as in Stage 1), full vocabulary, bf16 parameters
with fp32 gradient reduction, on one GPU (a one-rank process group). Prints tokens/s, achieved
TFLOP/s, MFU against the GPU's dense bf16 peak, and the measured peak memory next to the
prediction of `sage.plan.plan_memory` (what `python -m sage.tools.plan` prints) for the same slice.
`--world N` runs one rank of an N-rank job in this one process: a "fake" process group (from
torch's own test utilities) whose collectives return at once, so FSDP2 shards every parameter
N ways and this process does exactly rank 0's work: the fp32-to-bf16 copy-in of its shards,
the full forward and backward of its micro-batch, the reduce-scatter copy-in, clipping and AdamW
on its 1/N. The gathered weights are whatever the buffers held (the loss means nothing; the
kernels and their sizes are those of the real job); the collectives' time is not counted (FSDP2
overlaps them with compute). Its peak memory is a rank's, compared with the plan for N ranks.
The phases of a step (forward + backward, clipping, AdamW) are also timed apart.

    python -m sage.tools.bench.train_step                 # on an H100: the 40B-width slice
    python -m sage.tools.bench.train_step --preset tiny   # CPU smoke run (figures meaningless)
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from sage.checkpoint import local_tensor
from sage.config import SageConfig
from sage.distributed import (DistInfo, build_model, build_optimizer, cleanup,
                              init_distributed)
from sage.inference import to_device
from sage.plan import count_params, format_plan, plan_memory
from sage.tools.args import Parser, at_least
from sage.tools.bench import print_profile
from sage.tools.errors import run_main
from sage.training import grad_norm_and_clip

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s


class _Tok:
    """Placeholder ids for a synthetic batch (no tokenizer file needed)."""

    def __init__(self, vocab: int):
        self.img_context_id, self.fact_context_id = vocab - 1, vocab - 2
        self.pad_id, self.stop_ids = 0, (2,)


def synthetic_batch(cfg: SageConfig, B: int, T: int, device, gen) -> dict:
    """Random one-shot SFE batch: one tile per image, N fact sentences, answer = last 64 tokens."""
    V, n_img = cfg.llm.vocab_size, cfg.n_image_tokens
    ids = torch.randint(10, V - 10, (B, T), generator=gen)
    ids[:, 4:4 + n_img] = V - 1  # <IMG_CONTEXT>
    ids[:, 8 + n_img:8 + n_img + cfg.n_facts] = V - 2  # <FACT_CONTEXT>
    labels = torch.full_like(ids, -100)
    labels[:, -64:] = ids[:, -64:]
    S = cfg.vision.image_size
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_test": torch.randn(B, 3, S, S, generator=gen),
             "tiles_test": torch.ones(B, dtype=torch.long),
             "pixel_ref": torch.randn(B, 3, S, S, generator=gen),
             "tiles_ref": torch.ones(B, dtype=torch.long),
             "fact_ids": torch.randint(10, V - 10, (B, cfg.n_facts, 16), generator=gen),
             "fact_mask": torch.ones(B, cfg.n_facts, 16, dtype=torch.long), "ids": None}
    return to_device(batch, device)


def step_flops(cfg: SageConfig, B: int, T: int) -> float:
    """Model FLOPs of one step: LLM fwd+bwd (6N per token + attention), frozen ViT forward on
    test and reference (2N per patch + attention), adapter fwd+bwd."""
    n = count_params(cfg)
    m, v = cfg.llm, cfg.vision
    llm_matmul = n["llm"] - n["embed"]  # the embedding lookup is not a matmul
    # causal attention: QK^T and AV, 2 T^2 C per layer forward after the causal half, x3 fwd+bwd
    llm = 6 * llm_matmul * B * T + 6 * m.n_layers * m.dim * T * T * B
    P = v.n_patches + 1
    vit = 2 * B * (2 * n["vision"] * P + 4 * v.n_layers * v.dim * P * P)  # test + reference
    adapter = 6 * n["adapter"] * 2 * B * cfg.n_image_tokens
    return float(llm + vit + adapter)


def report_cuda(cfg: SageConfig, args, flops: float, dt: float, dt_fb: float) -> None:
    """MFU of the step and of forward + backward alone; peak memory against the plan."""
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    if peak:
        print(f"MFU {100 * flops / dt / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s ({name}, rank 0 "
              f"of {args.world}); forward + backward alone {100 * flops / dt_fb / peak:.1f}%")
    measured = torch.cuda.max_memory_allocated() / 2**30
    plan = plan_memory(cfg, world=args.world, micro_batch=args.batch, seq_len=args.seq_len,
                       gpu_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                       stage="sfe", activation_checkpointing=args.activation_checkpointing)
    print(format_plan(plan, f"plan for this slice on {args.world} rank(s) (sage.plan.plan_memory):"))
    print(f"peak memory measured {measured:.2f} GiB vs planned {plan.total:.2f} GiB "
          f"({100 * (measured / plan.total - 1):+.1f}%)")


def fake_world(n: int) -> DistInfo:
    """Rank 0 of an n-rank world whose collectives do nothing (torch's "fake" backend, used
    by torch's own tests and memory estimators): FSDP2 shards n ways, nothing is sent."""
    import torch.distributed as td
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    td.init_process_group("fake", rank=0, world_size=n, store=FakeStore())
    cuda = torch.cuda.is_available()
    return DistInfo(0, n, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"))


def forward_backward(model, batch) -> None:
    """The SFE loss of one micro-batch (Eq. 8) and its gradients."""
    _, loss_sum, n_tok = model(batch)
    (loss_sum.sum() / n_tok.sum()).backward()


def phases(model, opt, batch, steps: int, sync) -> tuple[float, float, float]:
    """Seconds per step of forward + backward, clipping and AdamW, synchronised between the
    phases so that each is timed alone."""
    fb = clip = update = 0.0
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        forward_backward(model, batch)
        sync()
        t1 = time.perf_counter()
        grad_norm_and_clip(model, 1.0)
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        fb, clip, update = fb + t1 - t0, clip + t2 - t1, update + t3 - t2
    return fb / steps, clip / steps, update / steps


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--preset", default="internvl2-40b", help="SageConfig preset of the slice")
    p.add_argument("--llm_layers", type=at_least(1), default=2, help="decoder layers in the slice")
    p.add_argument("--vit_layers", type=at_least(1), default=1,
                   help="InternViT blocks in the slice")
    p.add_argument("--batch", type=at_least(1), default=2, help="micro-batch")
    p.add_argument("--seq_len", type=at_least(1), default=2048, help="tokens per sample")
    p.add_argument("--steps", type=at_least(1), default=10, help="timed steps (after 3 warm-up)")
    p.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction,
                   default=False, help="recompute each block in backward")
    p.add_argument("--world", type=at_least(1), default=1,
                   help="run rank 0 of an N-rank FSDP2 job in this process (collectives not "
                        "sent; the paper's setting: 8)")
    p.add_argument("--profile", type=at_least(0), default=0, metavar="N",
                   help="after timing, profile one step and print its N costliest kernels")
    args = p.parse_args(argv)

    dist = fake_world(args.world) if args.world > 1 else init_distributed()
    base = SageConfig.preset(args.preset)
    cfg = dataclasses.replace(
        base, vision=dataclasses.replace(base.vision, n_layers=args.vit_layers),
        llm=dataclasses.replace(base.llm, n_layers=args.llm_layers))
    if dist.device.type != "cuda":
        args.seq_len, args.steps = min(args.seq_len, cfg.n_image_tokens + 128), 2
    model = build_model(cfg, dist, None, stage="sfe",
                        activation_checkpointing=args.activation_checkpointing)
    model.tokenizer = _Tok(cfg.llm.vocab_size)
    opt = build_optimizer(model, 1e-5, 0.0, dist.device)
    gen = torch.Generator().manual_seed(0)
    batch = synthetic_batch(cfg, args.batch, args.seq_len, dist.device, gen)
    sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)

    def one_step():
        forward_backward(model, batch)
        grad_norm_and_clip(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed() -> float:  # seconds per step, the steps back to back
        t = time.perf_counter()
        for _ in range(args.steps):
            one_step()
        sync()
        return (time.perf_counter() - t) / args.steps

    for _ in range(3):
        one_step()
    sync()
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = timed()
    dt_fb, dt_clip, dt_opt = phases(model, opt, batch, args.steps, sync)
    flops = step_flops(cfg, args.batch, args.seq_len)
    tokens = args.batch * args.seq_len
    local = sum(local_tensor(p).numel() for p in model.parameters())
    print(f"slice: {args.preset} width, {args.llm_layers} LLM layers + {args.vit_layers} ViT "
          f"blocks, micro-batch {args.batch} x {args.seq_len} tokens, activation checkpointing "
          f"{args.activation_checkpointing}, device {dist.device}, torch {torch.__version__}")
    total = sum(p.numel() for p in model.parameters())  # a DTensor's numel is the global one
    print(f"rank 0 of {args.world}: holds {local:,} of {total:,} parameters")
    print(f"step {dt * 1000:.1f} ms | {tokens / dt:,.0f} tok/s | {flops / dt / 1e12:.1f} TFLOP/s")
    print(f"forward + backward alone {dt_fb * 1000:.1f} ms | {flops / dt_fb / 1e12:.1f} TFLOP/s")
    print(f"phases: forward + backward {dt_fb * 1000:.1f} ms, clipping {dt_clip * 1000:.1f} ms, "
          f"AdamW {dt_opt * 1000:.1f} ms")
    if args.profile:
        print_profile(lambda: (one_step(), sync()), args.profile, dist.device.type == "cuda")
    if dist.device.type == "cuda":
        report_cuda(cfg, args, flops, dt, dt_fb)
    cleanup()


if __name__ == "__main__":
    run_main(main)
