"""Batch-1 decoding benchmark against the memory-bandwidth roofline (prints figures).

A slice of Yi-34B at full width (`--layers` decoder layers, the full 64k vocabulary head) in
bf16 decodes one token at a time with the KV cache after a `--prompt`-token prefill, in eager
mode. At batch 1 every step must read all weights once (the embedding table excepted: one row)
plus the cached keys/values, so

    roofline time per token = (weight bytes + KV-cache bytes read) / measured bandwidth,

with the bandwidth measured in the same run by a device-to-device copy (bytes read + written
over time). Prints ms/token for the model and for the roofline and their ratio (goal: the
model reaches >= 60% of the roofline).

    python -m sage.tools.bench.decode                     # on a GPU: 4 Yi-34B layers, bf16
    python -m sage.tools.bench.decode --preset tiny       # CPU smoke run (figures meaningless)
"""

from __future__ import annotations

import dataclasses
import time

import torch

from sage.config import SageConfig
from sage.models.llama import Llama
from sage.tools.args import Parser, at_least, positive
from sage.tools.bench import print_profile
from sage.tools.errors import run_main


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


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--preset", default="internvl2-40b", help="LLM width from this preset")
    p.add_argument("--layers", type=at_least(1), default=4, help="decoder layers in the slice")
    p.add_argument("--prompt", type=at_least(1), default=1024, help="prefilled prompt tokens")
    p.add_argument("--tokens", type=at_least(1), default=64,
                   help="timed decode steps (after 8 warm-up)")
    p.add_argument("--copy_gib", type=positive(), default=2.0, help="bandwidth probe size (GiB)")
    p.add_argument("--profile", type=at_least(0), default=0, metavar="N",
                   help="also profile 4 decode steps and print their N costliest kernels")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if not cuda:  # smoke configuration
        args.preset, args.layers, args.prompt, args.tokens = "tiny", 2, 64, 8
        args.copy_gib = min(args.copy_gib, 0.25)
    cfg = dataclasses.replace(SageConfig.preset(args.preset).llm, n_layers=args.layers)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    model.to(dtype).eval()

    warmup = 8
    extra = 4 if args.profile else 0  # the profiled steps
    cache = model.new_cache(1, args.prompt + warmup + args.tokens + extra, dtype=dtype,
                            device=device)
    ids = torch.randint(10, cfg.vocab_size, (1, args.prompt), device=device)

    def step(x: torch.Tensor) -> torch.Tensor:  # greedy next token (1, 1) with the cache
        return model(input_ids=x, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)

    with torch.no_grad():
        tok = step(ids)  # prefill
        for _ in range(warmup):
            tok = step(tok)
        sync()
        ctx0 = cache.length
        t = time.perf_counter()
        for _ in range(args.tokens):
            tok = step(tok)
        sync()
        per_token = (time.perf_counter() - t) / args.tokens
        if args.profile:
            def four_steps():
                t = tok
                for _ in range(4):
                    t = step(t)
                sync()
            print_profile(four_steps, args.profile, cuda)

    elt = torch.finfo(dtype).bits // 8
    n_weights = sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel()
    weight_bytes = n_weights * elt
    mean_ctx = ctx0 + (args.tokens + 1) / 2  # positions each timed step attends to, on average
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * mean_ctx * elt
    bw = copy_bandwidth(device, int(args.copy_gib * 2**30), 5, sync)
    roof = (weight_bytes + kv_bytes) / bw
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"slice: {args.preset} LLM width {cfg.dim}, {cfg.n_layers} layers, vocab "
          f"{cfg.vocab_size}, {dtype}, {name}; prompt {args.prompt}, {args.tokens} timed tokens")
    print(f"bytes per token: weights {weight_bytes / 2**30:.3f} GiB + KV cache "
          f"{kv_bytes / 2**20:.1f} MiB; copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"decode {per_token * 1e3:.3f} ms/token ({1 / per_token:.1f} tok/s) | roofline "
          f"{roof * 1e3:.3f} ms/token | {100 * roof / per_token:.1f}% of the roofline")


if __name__ == "__main__":
    run_main(main)
