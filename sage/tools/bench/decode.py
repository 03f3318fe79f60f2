"""Decoding benchmark against the memory-bandwidth roofline: eager, static shapes, CUDA graph.

A slice of Yi-34B at full width (`--layers` decoder layers, the full 64k vocabulary head) in
bf16 decodes one token at a time with the KV cache after a `--prompt`-token prefill. Each step
must read all weights once (the embedding table excepted: B rows) plus the cached keys/values
of every row, so

    roofline time per step = (weight bytes + KV-cache bytes read) / measured bandwidth,

with the bandwidth measured in the same run by a device-to-device copy (bytes read + written
over time). Per batch size (`--batch`, default 1 and 8) and decoding path (`--modes`):

    eager    Llama.forward with the growing KV cache, one launch per kernel (Llama.generate)
    static   sage.models.decoding.StaticDecoder's step run eagerly (static shapes, whole cache)
    graph    that step recorded once and replayed as a CUDA graph (evaluate.py --decode graph)
    compile  torch.compile of the step, then recorded as a CUDA graph (not used by the scripts)

it prints ms per step, tokens/s (B per step) and the share of the roofline (goal: >= 70% at
batch 1). A path that fails (e.g. compilation) prints its error and the others still run.

    python -m sage.tools.bench.decode                     # on a GPU: 4 Yi-34B layers, bf16
    python -m sage.tools.bench.decode --preset tiny       # CPU smoke run (figures meaningless)
    torchrun --nproc_per_node 8 -m sage.tools.bench.decode  # tensor-parallel over 8 GPUs

Under torchrun the slice is sharded over all ranks with sage.tensor_parallel's plan (Yi-34B:
7 query heads and 1 KV head per rank of 8); the roofline then counts one rank's weights and KV
cache against one GPU's bandwidth (the all-reduces are what it leaves out).
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from torch.distributed.device_mesh import init_device_mesh

from sage.checkpoint import local_tensor
from sage.config import SageConfig
from sage.distributed import cleanup, init_distributed, print0
from sage.models.decoding import StaticDecoder
from sage.models.llama import Llama
from sage.tensor_parallel import check_divisible, shard_llm
from sage.tools.args import Parser, at_least, positive
from sage.tools.bench import print_profile
from sage.tools.errors import run_main

MODES = ("eager", "static", "graph", "compile")


def copy_bandwidth(device: torch.device, n_bytes: int, repeats: int, sync) -> float:
    """Bytes/s of a device-to-device copy: each copy reads and writes n_bytes."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def stepper(model: Llama, mode: str, B: int, max_len: int, dtype, device):
    """(prefill(ids) -> logits, step(tok) -> logits) for one decoding path."""
    if mode == "eager":
        cache = model.new_cache(B, max_len, dtype=dtype, device=device)

        def prefill(ids):
            cache.length = 0
            return model(input_ids=ids, cache=cache, logits_to_keep=1)[:, -1]

        def step(tok):
            return model(input_ids=tok[:, None], cache=cache, logits_to_keep=1)[:, -1]
        return prefill, step
    dec = StaticDecoder(model, B, max_len, dtype, device, cuda_graph=mode in ("graph", "compile"),
                        compile=mode == "compile")
    return dec.prefill, dec.step


def time_mode(model, mode, B, args, dtype, device, sync):
    """Seconds per decode step after a prefill and 8 warm-up steps, the mean context length,
    and (with --profile, batch 1, eager / graph) a function running 4 more steps for the
    profiler (None otherwise)."""
    warmup, extra = 8, 4 if args.profile else 0
    max_len = args.prompt + warmup + args.tokens + extra + 1
    prefill, step = stepper(model, mode, B, max_len, dtype, device)
    ids = torch.randint(10, model.cfg.vocab_size, (B, args.prompt), device=device)
    with torch.no_grad():
        tok = prefill(ids).argmax(-1)  # (B,)
        for _ in range(warmup):
            tok = step(tok).argmax(-1)
        sync()
        t = time.perf_counter()
        for _ in range(args.tokens):
            tok = step(tok).argmax(-1)
        sync()
        per_step = (time.perf_counter() - t) / args.tokens

    @torch.no_grad()
    def four_steps():
        t = tok
        for _ in range(4):
            t = step(t).argmax(-1)
        sync()
    profiled = args.profile and B == 1 and mode in ("eager", "graph")
    return per_step, args.prompt + warmup + (args.tokens + 1) / 2, four_steps if profiled else None


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--preset", default="internvl2-40b", help="LLM width from this preset")
    p.add_argument("--layers", type=at_least(1), default=4, help="decoder layers in the slice")
    p.add_argument("--prompt", type=at_least(1), default=1024, help="prefilled prompt tokens")
    p.add_argument("--tokens", type=at_least(1), default=64,
                   help="timed decode steps (after 8 warm-up)")
    p.add_argument("--batch", type=at_least(1), nargs="+", default=[1, 8],
                   help="batch sizes (rows decoded together)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="decoding paths to time (graph and compile need CUDA)")
    p.add_argument("--copy_gib", type=positive(), default=2.0, help="bandwidth probe size (GiB)")
    p.add_argument("--profile", type=at_least(0), default=0, metavar="N",
                   help="also profile 4 batch-1 steps of eager and graph, print N kernels each")
    args = p.parse_args(argv)

    # under torchrun: the slice tensor-parallel over all ranks (sage.tensor_parallel's plan)
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    dist = init_distributed() if tp > 1 else None
    device = dist.device if dist else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if not cuda:  # smoke configuration
        args.preset, args.layers, args.prompt, args.tokens = "tiny", 2, 64, 8
        args.copy_gib = min(args.copy_gib, 0.25)
        args.modes = [m for m in args.modes if m in ("eager", "static")]
    base = SageConfig.preset(args.preset)
    cfg = dataclasses.replace(base.llm, n_layers=args.layers)
    torch.manual_seed(0)  # the same weights and prompts on every rank
    with torch.device("meta"):
        model = Llama(cfg).to(dtype)
    if tp > 1:
        check_divisible(dataclasses.replace(base, llm=cfg), tp)
        shard_llm(model, init_device_mesh(device.type, (tp,)))
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    model.eval()

    elt = torch.finfo(dtype).bits // 8
    n_weights = (sum(local_tensor(p).numel() for p in model.parameters())  # this rank's share
                 - local_tensor(model.embed_tokens.weight).numel())
    weight_bytes = n_weights * elt
    bw = copy_bandwidth(device, int(args.copy_gib * 2**30), 5, sync)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print0(f"slice: {args.preset} LLM width {cfg.dim}, {cfg.n_layers} layers, vocab "
           f"{cfg.vocab_size}, {dtype}, {name}, torch {torch.__version__}, tensor-parallel {tp}; "
           f"prompt {args.prompt}, {args.tokens} timed steps; weights per rank "
           f"{weight_bytes / 2**30:.3f} GiB; copy bandwidth {bw / 1e9:.0f} GB/s\n")
    print0("| batch | path | ms / step | tokens / s | roofline ms | % of roofline |")
    print0("|---:|---|---:|---:|---:|---:|")
    profiles = []
    for B in args.batch:
        for mode in args.modes:
            try:
                per_step, ctx, four_steps = time_mode(model, mode, B, args, dtype, device, sync)
            except Exception as e:  # noqa: BLE001 (one failing path must not hide the others)
                print0(f"| {B} | {mode} | failed: {type(e).__name__}: {str(e)[:200]} | | | |")
                continue
            kv_bytes = 2 * B * cfg.n_layers * cfg.n_kv_heads // tp * cfg.head_dim * ctx * elt
            roof = (weight_bytes + kv_bytes) / bw
            print0(f"| {B} | {mode} | {per_step * 1e3:.3f} | {B / per_step:,.1f} | "
                   f"{roof * 1e3:.3f} | {100 * roof / per_step:.1f}% |")
            if four_steps is not None:
                profiles.append((mode, four_steps))
    for mode, four_steps in profiles:  # after the table, so that it reads as one
        if dist and dist.rank:  # the other ranks take part in the collectives only
            four_steps()
            continue
        print(f"\nprofile: {mode}, batch 1, 4 steps")
        print_profile(four_steps, args.profile, cuda)
    if dist:
        cleanup()


if __name__ == "__main__":
    run_main(main)
