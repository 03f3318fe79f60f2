"""Benchmark of the Eq. 1 top-K cosine selection: Triton kernel vs PyTorch, as a Markdown table.

On CUDA (default bf16), per shape (B, P, R, C): median time (triton.testing.do_bench) of
  triton   topk_cosine(impl="triton"): fused cosine + running max/argmax, K lowest
  tri-pass   the same with the norms from a separate pass (fuse_norm=False)
  tri-fused  the same with the norms summed from the dot's tiles (fuse_norm=True)
  tri-scores the Triton scores alone (default norm choice), without the K-lowest sort
  spec     topk_cosine(impl="torch"): the fp32 specification (normalise, chunked bmm, argmax)
  unfused  normalise -> bmm -> amax -> topk in the input dtype, materialising (B, P, R)
  bmm      cuBLAS torch.bmm(test, ref^T) alone, the matmul every variant has to do
with the ratio to bmm, achieved TFLOP/s (2 * B * P * R * C / t), the extra peak memory
(torch.cuda.max_memory_allocated minus the allocation before the call, outputs included) and
the fraction of selected indices equal to the spec's. On CPU: a small smoke run without the
Triton kernel (the interpreter is for correctness, not speed).

Run: python -m sage.tools.bench.topk_cosine [--k 32] [--dtype bf16] [--shape 8,3328,3328,7168 ...]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sage.kernels.topk_cosine import _kernels, nn_scores_triton, select_lowest, topk_cosine
from sage.tools.args import Parser, at_least
from sage.tools.errors import run_main

GPU_SHAPES = ["32,256,256,7168", "8,3328,3328,7168", "32,1024,1024,3200"]  # B,P,R,C
CPU_SHAPES = ["2,64,64,256"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def unfused_torch(test, ref, k):
    """Eq. 1 the plain way in the input dtype: the (B, P, R) similarity matrix exists."""
    sim = torch.bmm(F.normalize(test, dim=-1), F.normalize(ref, dim=-1).transpose(1, 2))  # (B,P,R)
    s, j = sim.max(-1)  # (B, P)
    s, idx = s.float().topk(k, dim=1, largest=False)  # (B, K)
    return idx, s, j.gather(1, idx)


def extra_peak_mib(fn) -> float:
    """Peak CUDA memory of one call above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def median_ms_cpu(fn, reps: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_shape(B, P, R, C, k, dtype, device):
    """Rows (name, ms, extra MiB or None, index agreement with the spec or None) for one shape."""
    g = torch.Generator(device=device).manual_seed(0)
    test = torch.randn(B, P, C, generator=g, device=device).to(dtype)  # (B, P, C)
    ref = torch.randn(B, R, C, generator=g, device=device).to(dtype)  # (B, R, C)
    variants = {"triton": lambda: topk_cosine(test, ref, k, impl="triton"),
                "tri-pass": lambda: select_lowest(*nn_scores_triton(test, ref, fuse_norm=False), k),
                "tri-fused": lambda: select_lowest(*nn_scores_triton(test, ref, fuse_norm=True), k),
                "tri-scores": lambda: nn_scores_triton(test, ref),
                "spec": lambda: topk_cosine(test, ref, k, impl="torch"),
                "unfused": lambda: unfused_torch(test, ref, k),
                "bmm": lambda: torch.bmm(test, ref.transpose(1, 2))}
    if device != "cuda":  # the interpreter is far too slow to time
        variants = {n: f for n, f in variants.items() if not n.startswith("tri")}
    spec_idx = variants["spec"]()[0].sort(1).values
    rows = []
    for name, fn in variants.items():
        out = fn()  # warm-up (and autotuning for the Triton kernel) before memory and timing
        agree = None
        if name not in ("bmm", "tri-scores"):
            agree = (out[0].sort(1).values == spec_idx).float().mean().item()
        if device == "cuda":
            import triton.testing
            mem = extra_peak_mib(fn)
            ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
            if name.startswith("tri"):
                name += f" {_kernels()[1].best_config}"  # the autotuned tile of the last launch
        else:
            mem, ms = None, median_ms_cpu(fn)
        rows.append((name, ms, mem, agree))
    return rows


def split_sweep(B, P, R, C, dtype, splits=(1, 2, 4, 8)):
    """Median ms of the Triton scores for each reference split and norm placement (CUDA)."""
    import triton.testing
    g = torch.Generator(device="cuda").manual_seed(0)
    test = torch.randn(B, P, C, generator=g, device="cuda").to(dtype)
    ref = torch.randn(B, R, C, generator=g, device="cuda").to(dtype)
    out = {}
    for n in splits:
        if n > -(-R // 16):
            continue
        for fuse in (False, True):
            fn = lambda: nn_scores_triton(test, ref, n_split=n, fuse_norm=fuse)  # noqa: E731
            fn()  # autotune for this key
            out[n, fuse] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__)
    parser.add_argument("--k", type=at_least(1), default=32,
                        help="K selected tokens (SageConfig.top_k)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=False,
                        help="also time the Triton scores for n_split 1..8, norms fused or not")
    parser.add_argument("--shape", action="append", default=None,
                        help="B,P,R,C (repeatable); None: the InternVL2-40B-like shapes on "
                             "CUDA, a small smoke shape on CPU")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    shapes = args.shape or (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    if device == "cuda":
        import triton
        print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"triton {triton.__version__} | {args.dtype} | K = {args.k}\n")
    else:
        print(f"no CUDA device: CPU smoke run without the Triton kernel ({args.dtype}, "
              f"K = {args.k}); "
              "the Triton kernel is checked for correctness on CPU by the tests "
              "(TRITON_INTERPRET=1), not timed\n")
    print("| B, P, R, C | impl | median ms | x bmm | TFLOP/s | extra peak MiB | idx = spec |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape in shapes:
        B, P, R, C = (int(x) for x in shape.split(","))
        rows = bench_shape(B, P, R, C, args.k, dtype, device)
        bmm_ms = dict((r[0], r[1]) for r in rows).get("bmm")
        flops = 2 * B * P * R * C
        for name, ms, mem, agree in rows:
            ratio = f"{ms / bmm_ms:.2f}" if bmm_ms else "-"
            mem_s = f"{mem:.1f}" if mem is not None else "-"
            agree_s = f"{agree:.3f}" if agree is not None else "-"
            print(f"| {B}, {P}, {R}, {C} | {name} | {ms:.3f} | {ratio} | "
                  f"{flops / ms / 1e9:.3g} | {mem_s} | {agree_s} |")
    if args.sweep and device == "cuda":
        print("\nTriton scores (no sort), median ms by reference split n_split and norm placement")
        print("| B, P, R, C | n_split | norm pass | fused norms |\n|---|---:|---:|---:|")
        for shape in shapes:
            B, P, R, C = (int(x) for x in shape.split(","))
            times = split_sweep(B, P, R, C, dtype)
            for n in sorted({n for n, _ in times}):
                print(f"| {B}, {P}, {R}, {C} | {n} | {times[n, False]:.3f} | "
                      f"{times[n, True]:.3f} |")


if __name__ == "__main__":
    run_main(main)
