"""Benchmark of the Eq. 1 top-K cosine selection: Triton kernel vs PyTorch, as a Markdown table.

On CUDA (default bf16), per shape (B, P, R, C): median time (triton.testing.do_bench) of
  triton      topk_cosine(impl="triton"): one launch computes the scores, merges the reference
              splits and selects the K lowest (default norms, grid and loads)
  tri-persist the same on a persistent grid (one program per SM looping over the tiles)
  tri-tma     the same with tensor-descriptor (TMA) loads
  tri-pass    the same with the norms from a separate pass (fuse_norm=False)
  tri-fused   the same with the norms summed inside the kernel (fuse_norm=True)
  tri-2step   the earlier path: Triton scores, then the split merge and torch.sort in torch
  tri-scores  the Triton scores alone (nn_scores_triton), without the merge or the selection
  spec        topk_cosine(impl="torch"): the fp32 specification (normalise, chunked bmm, argmax)
  unfused     normalise -> bmm -> amax -> topk in the input dtype, materialising (B, P, R)
  bmm         cuBLAS torch.bmm(test, ref^T) alone, the matmul every variant has to do
with the ratios to bmm and of unfused to it, TFLOP/s (2 * B * P * R * C / t), the extra peak
memory (torch.cuda.max_memory_allocated above the allocation before the call, outputs
included), the mean fraction of the spec's K indices a variant also selects, and, per Triton
variant, the largest |s_i - spec s_i| over all B * P scores (the same kernel's: the single
launch writes every merged score back, topk_cosine_triton(all_scores=True)): a score error
near fp32 rounding (~1e-6) with a differing index is a near-tie, a large one a computation
error. A second table gives the spec's smallest gap between the K-th and (K+1)-th lowest
score of an image: a selection can differ from the spec's by rounding only where that gap is
below twice the score error. A variant that fails (e.g. does not compile) prints its error in
its row. Each Triton row autotunes over the module's tile list (minutes per shape). --sweep
adds the single-launch path by reference split n_split, norm placement and grid, tuned over
a short tile list (estimated ~3 min on an H200, unmeasured).
On CPU: a small smoke run without the Triton kernel (with TRITON_INTERPRET=1: the Triton rows
in the interpreter, for the tests; not timings).

Run: python -m sage.tools.bench.topk_cosine [--k 32] [--dtype bf16] [--shape 8,3328,3328,7168 ...]
"""

import argparse
import importlib
import statistics
import time

import torch
import torch.nn.functional as F

from sage.tools.args import Parser, at_least
from sage.tools.errors import run_main

# the module, not the function sage.kernels re-exports under the same name
K = importlib.import_module("sage.kernels.topk_cosine")

GPU_SHAPES = ["32,256,256,7168", "8,3328,3328,7168", "32,1024,1024,3200"]  # B,P,R,C
CPU_SHAPES = ["2,64,64,256"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SWEEP_CONFIGS = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4)]
TRITON_OPTIONS = {  # row -> options of topk_cosine_triton / nn_scores_triton
    "triton": {}, "tri-persist": {"persistent": True}, "tri-tma": {"tma": True},
    "tri-pass": {"fuse_norm": False}, "tri-fused": {"fuse_norm": True}, "tri-2step": {},
    "tri-scores": {}}


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


def median_ms(fn, device: str, reps: int = 5) -> float:
    """do_bench's median on CUDA; on CPU the median of reps calls (1 in the interpreter)."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(1 if K._interpreting() else reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def variants(test, ref, k):
    """name -> call; the tri-* rows only where the kernel runs compiled."""
    fns = {"triton": lambda: K.topk_cosine(test, ref, k, impl="triton")}
    for name in ("tri-persist", "tri-tma", "tri-pass", "tri-fused"):
        fns[name] = lambda o=TRITON_OPTIONS[name]: K.topk_cosine_triton(test, ref, k, **o)
    fns.update({"tri-2step": lambda: K.select_lowest(*K.nn_scores_triton(test, ref), k),
                "tri-scores": lambda: K.nn_scores_triton(test, ref),
                "spec": lambda: K.topk_cosine(test, ref, k, impl="torch"),
                "unfused": lambda: unfused_torch(test, ref, k),
                "bmm": lambda: torch.bmm(test, ref.transpose(1, 2))})
    if not (test.is_cuda or K._interpreting()):  # CPU smoke run: no Triton rows
        fns = {n: f for n, f in fns.items() if not n.startswith("tri")}
    return fns


def overlap(idx, spec_idx) -> float:
    """Mean fraction of the spec's K indices per image that idx (B, K) also holds."""
    hit = (idx.unsqueeze(-1) == spec_idx.unsqueeze(1)).any(1)  # (B, K)
    return hit.float().mean().item()


def bench_shape(B, P, R, C, k, dtype, device):
    """Rows (name, ms, extra MiB, index overlap, max |s - spec s| or an error string)."""
    g = torch.Generator(device=device).manual_seed(0)
    test = torch.randn(B, P, C, generator=g, device=device).to(dtype)  # (B, P, C)
    ref = torch.randn(B, R, C, generator=g, device=device).to(dtype)  # (B, R, C)
    spec_s = K.nn_scores_torch(test, ref)[0]  # (B, P) fp32
    spec_idx = spec_s.sort(dim=1, stable=True).indices[:, :k]  # (B, K)
    rows = []
    for name, fn in variants(test, ref, k).items():
        try:
            out = fn()  # warm-up (and autotuning for the Triton kernel) before memory and timing
            agree = overlap(out[0], spec_idx) if name not in ("bmm", "tri-scores") else None
            err = None
            if name in ("tri-2step", "tri-scores"):  # all B * P scores of the same kernel
                err = (K.nn_scores_triton(test, ref)[0] - spec_s).abs().max().item()
            elif name in TRITON_OPTIONS:  # the single launch writes them back too
                s = K.topk_cosine_triton(test, ref, k, all_scores=True, **TRITON_OPTIONS[name])[3]
                err = (s - spec_s).abs().max().item()
            mem = extra_peak_mib(fn) if device == "cuda" else None
            ms = median_ms(fn, device)
            if name.startswith("tri") and device == "cuda":
                name += f" {K._kernels()[1].best_config}"  # the autotuned tile of the last launch
            rows.append((name, ms, mem, agree, err))
        except Exception as e:  # noqa: BLE001 (a failing variant must not stop the others)
            msg = " ".join(str(e).split())[:160]
            rows.append((name, None, None, None, f"{type(e).__name__}: {msg}"))
    low = spec_s.sort(1).values  # (B, P)
    gap = (low[:, k] - low[:, k - 1]).min().item() if k < P else float("nan")
    return rows, gap


def print_rows(shape, rows):
    ms_of = {r[0]: r[1] for r in rows}
    bmm_ms, unfused_ms = ms_of.get("bmm"), ms_of.get("unfused")
    B, P, R, C = shape
    flops = 2 * B * P * R * C
    for name, ms, mem, agree, err in rows:
        if ms is None:
            print(f"| {B}, {P}, {R}, {C} | {name} | failed: {err} | | | | | | |")
            continue
        cells = [f"{ms:.3f}", f"{ms / bmm_ms:.2f}" if bmm_ms else "-",
                 f"{unfused_ms / ms:.2f}" if unfused_ms else "-", f"{flops / ms / 1e9:.3g}",
                 f"{mem:.1f}" if mem is not None else "-",
                 f"{agree:.3f}" if agree is not None else "-",
                 f"{err:.2e}" if err is not None else "-"]
        print(f"| {B}, {P}, {R}, {C} | {name} | " + " | ".join(cells) + " |")


def sweep_shape(B, P, R, C, k, dtype, splits=(1, 2, 4, 8)):
    """Median ms of the single-launch path by n_split and (norm pass, fused norms, default
    norms on the persistent grid), each tuned over SWEEP_CONFIGS (CUDA)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    test = torch.randn(B, P, C, generator=g, device="cuda").to(dtype)
    ref = torch.randn(B, R, C, generator=g, device="cuda").to(dtype)
    out = {}
    for n in splits:
        if n > -(-R // 128):  # splits under 128 reference rows: not worth the tuning time
            continue
        for col, o in enumerate(({"fuse_norm": False}, {"fuse_norm": True}, {"persistent": True})):
            fn = lambda o=o: K.topk_cosine_triton(test, ref, k, n_split=n, **o)  # noqa: E731
            try:
                fn()  # autotune for this key
                out[n, col] = f"{median_ms(fn, 'cuda'):.3f}"
            except Exception as e:  # noqa: BLE001
                out[n, col] = f"failed: {type(e).__name__}"
    return out


def run_sweep(shapes, k, dtype):
    K._GPU_CONFIGS, K._KERNELS = SWEEP_CONFIGS, {}  # a short tile list keeps tuning in minutes
    print(f"\nSingle-launch path by reference split, median ms (tiles {SWEEP_CONFIGS})")
    print("| B, P, R, C | n_split | norm pass | fused norms | persistent |")
    print("|---|---:|---:|---:|---:|")
    for shape in shapes:
        B, P, R, C = (int(x) for x in shape.split(","))
        times = sweep_shape(B, P, R, C, k, dtype)
        for n in sorted({n for n, _ in times}):
            print(f"| {B}, {P}, {R}, {C} | {n} | " + " | ".join(times[n, c] for c in range(3))
                  + " |")


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__)
    parser.add_argument("--k", type=at_least(1), default=32,
                        help="K selected tokens (SageConfig.top_k)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=False,
                        help="also time the single-launch path for n_split 1..8, norms fused "
                             "or not, persistent grid")
    parser.add_argument("--tiles", choices=("all", "short"), default="all",
                        help="autotune the main table over the module's whole tile list "
                             "(minutes per shape) or the sweep's three tiles (the GPU suite)")
    parser.add_argument("--sweep_only", action=argparse.BooleanOptionalAction, default=False,
                        help="only the --sweep table")
    parser.add_argument("--shape", action="append", default=None,
                        help="B,P,R,C (repeatable); None: the InternVL2-40B-like shapes on "
                             "CUDA, a small smoke shape on CPU")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    if args.tiles == "short":  # before the first launch builds the autotuner
        K._GPU_CONFIGS = list(SWEEP_CONFIGS)
    shapes = args.shape or (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    if device == "cuda":
        import triton
        print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"triton {triton.__version__} | {args.dtype} | K = {args.k}\n")
    else:
        print(f"no CUDA device: CPU smoke run without the Triton kernel ({args.dtype}, "
              f"K = {args.k}); the Triton kernel is checked for correctness on CPU by the "
              "tests (TRITON_INTERPRET=1), not timed\n")
    if args.sweep_only:
        if device == "cuda":
            run_sweep(shapes, args.k, dtype)
        return
    print("| B, P, R, C | impl | median ms | x bmm | unfused / impl | TFLOP/s | extra peak MiB "
          "| idx = spec | max abs s - spec |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    gaps = []
    for shape in shapes:
        B, P, R, C = (int(x) for x in shape.split(","))
        rows, gap = bench_shape(B, P, R, C, min(args.k, P), dtype, device)
        print_rows((B, P, R, C), rows)
        gaps.append((shape, gap))
    print("\n| B, P, R, C | spec: smallest gap s_(K+1) - s_(K) over the images |\n|---|---:|")
    for shape, gap in gaps:
        print(f"| {shape.replace(',', ', ')} | {gap:.2e} |")
    if args.sweep and device == "cuda":
        run_sweep(shapes, args.k, dtype)


if __name__ == "__main__":
    run_main(main)
