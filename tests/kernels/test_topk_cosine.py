"""Eq. 1 top-K cosine selection: torch spec and Triton kernel (TRITON_INTERPRET=1) vs a float64
reference, tie rules, bf16 tolerance, strided inputs, errors; the single-launch selection
(reference splits, persistent grid, tensor descriptors, fallback, reruns on one counter), the
sm_90 compile of every variant (CPU only, no GPU) and, on a GPU, the compiled kernels.
Run: python -m pytest -q tests/kernels/test_topk_cosine.py"""

import importlib
import inspect
import os
import re
import subprocess
import sys

# Triton builds its own jitted helpers (tl.max's combine function...) for the interpreter or the
# compiler when it is imported, so the switch goes first. Where triton was imported earlier
# without it (tests/conftest.py imports sage, which imports triton), the Triton tests rerun in
# a fresh process that has TRITON_INTERPRET=1 from its start.
INTERPRET_AT_IMPORT = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from sage.kernels import topk_cosine  # noqa: E402
from sage.kernels.topk_cosine import nn_scores_torch  # noqa: E402

K = importlib.import_module("sage.kernels.topk_cosine")  # the module (sage.kernels re-exports
# the function under the same name)

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def interpreter_takes_runtime_loop_bounds() -> bool:
    """Triton 3.6's interpreter turns a runtime int argument into a 1-element array and calls
    int() on it for range(); numpy >= 2.4 refuses that (compiled kernels are unaffected)."""
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, n):
        for i in range(0, n, 1):
            tl.store(x_ptr, i)
    try:
        probe[(1,)](torch.zeros(1, dtype=torch.int32), 2)
    except Exception:  # noqa: BLE001 (the interpreter wraps the TypeError)
        return False
    return True


SKIP_IMPORT_ORDER = ("triton was imported before TRITON_INTERPRET=1 (test_triton_in_fresh_process "
                     "runs these)")
SKIP_LOOP_BOUNDS = ("this Triton's interpreter cannot loop to a runtime bound (Triton 3.6 with "
                    "numpy >= 2.4; test_triton_compiled_on_cuda covers the compiled kernel)")
SKIP_REASON = ("triton is not installed" if not HAS_TRITON else
               SKIP_IMPORT_ORDER if not INTERPRET_AT_IMPORT else
               None if interpreter_takes_runtime_loop_bounds() else SKIP_LOOP_BOUNDS)
needs_triton = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]
FP32_TOL = 1e-5  # fp32 accumulation over C <= 64 terms of unit-norm rows
BF16_TOL = 2e-2  # bf16 rounding of the inputs (2**-9 relative per element) moves cos by < 2e-2


def reference(test, ref, k, mode="nn"):
    """Float64 Eq. 1 with the documented tie rules, written with Python loops.
    -> cos (B, P, R) f64, indices (B, K), scores (B, K) f64, ref_indices (B, K)."""
    def unit(x):
        x = x.double()
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = unit(test) @ unit(ref).transpose(1, 2)  # (B, P, R)
    sign = 1.0 if mode == "nn" else -1.0
    idx, scores, refs = [], [], []
    for c in cos.tolist():  # one batch element: c[i][j]
        best = [max(range(len(row)), key=lambda j: (sign * row[j], -j)) for row in c]  # lowest j
        s = [row[j] for row, j in zip(c, best)]
        order = sorted(range(len(s)), key=lambda i: (s[i], i))[:k]  # lowest s, then lowest i
        idx.append(order)
        scores.append([s[i] for i in order])
        refs.append([best[i] for i in order])
    return cos, torch.tensor(idx), torch.tensor(scores, dtype=torch.float64), torch.tensor(refs)


def quarter_rows(g, *shape):
    """Rows with four entries of +-1 (norm 2): every cosine is an exact multiple of 1/4, so fp32
    gives exact values and the data is full of exact ties in both max_j and the top-K."""
    *lead, C = shape
    x = torch.zeros(*lead, C)
    pos = torch.rand(*lead, C, generator=g).argsort(-1)[..., :4]
    sign = torch.randint(0, 2, (*lead, 4), generator=g).float() * 2 - 1
    return x.scatter_(-1, pos, sign)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,P,R,C,k,mode", [
    (2, 37, 29, 40, 5, "nn"),   # P, R, C not multiples of the 16-wide interpreter blocks
    (1, 19, 1, 24, 1, "nn"),    # B = 1, R = 1, K = 1
    (2, 17, 33, 64, 17, "min"),  # K = P, literal "min" reading
])
def test_matches_float64_reference(impl, B, P, R, C, k, mode):
    g = torch.Generator().manual_seed(P * 1000 + R)
    test, ref = torch.randn(B, P, C, generator=g), torch.randn(B, R, C, generator=g)
    test[:, 1] = 0  # zero row: cos = 0 with every j (F.normalize rule), so j* = 0 by the tie rule
    test[:, 2] *= 1e-3  # cosine is scale-invariant: small and large norms change nothing
    ref[:, -1] *= 1e3
    idx, s, j = topk_cosine(test, ref, k, impl=impl, mode=mode)
    assert idx.dtype == j.dtype == torch.int64 and s.dtype == torch.float32
    assert idx.shape == s.shape == j.shape == (B, k)
    _, idx64, s64, j64 = reference(test, ref, k, mode)
    torch.testing.assert_close(s.double(), s64, atol=FP32_TOL, rtol=0)
    assert torch.equal(idx, idx64) and torch.equal(j, j64)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["nn", "min"])
def test_ties_lowest_index_first(impl, mode):
    g = torch.Generator().manual_seed(7)
    test, ref = quarter_rows(g, 2, 40, 16), quarter_rows(g, 2, 37, 16)
    ref[:, 20] = ref[:, 3]  # duplicate reference rows in different 16-wide tiles
    test[:, 30] = test[:, 2]  # duplicate test rows
    cos, idx64, s64, j64 = reference(test, ref, 13, mode)
    # the data really has ties: equal scores inside the selection and several j at the max
    assert (s64[:, 1:] == s64[:, :-1]).any()
    ext = cos.amax(-1) if mode == "nn" else cos.amin(-1)
    assert ((cos == ext.unsqueeze(-1)).sum(-1) > 1).any()
    idx, s, j = topk_cosine(test, ref, 13, impl=impl, mode=mode)
    assert torch.equal(s.double(), s64)  # multiples of 1/4: exact in fp32
    assert torch.equal(idx, idx64) and torch.equal(j, j64)


@needs_triton
def test_triton_reference_split_keeps_tie_rule():
    from sage.kernels.topk_cosine import nn_scores_triton
    g = torch.Generator().manual_seed(3)
    test, ref = quarter_rows(g, 2, 21, 16), quarter_rows(g, 2, 50, 16)
    ref[:, 40] = ref[:, 1]  # the same maximum in the first and the last split
    for mode in ("nn", "min"):
        s_ref, j_ref = nn_scores_torch(test, ref, mode)
        s, j = nn_scores_triton(test, ref, mode, n_split=3)  # splits of 32 rows: [0,32), [32,50)
        assert torch.equal(s, s_ref) and torch.equal(j, j_ref), mode


@needs_triton
@pytest.mark.parametrize("fuse_norm", [False, True])
def test_triton_norm_pass_and_fused_norms_agree(fuse_norm):
    # both ways to get 1/|x|: a separate pass (long reference splits) or squares of the dot's
    # tiles (short splits); several reference tiles per program, a zero test row, big scales
    from sage.kernels.topk_cosine import nn_scores_triton
    g = torch.Generator().manual_seed(13)
    test, ref = torch.randn(2, 35, 40, generator=g), torch.randn(2, 70, 40, generator=g)
    test[:, 4] = 0
    ref[:, 9] *= 1e3
    for mode in ("nn", "min"):
        s_ref, j_ref = nn_scores_torch(test, ref, mode)
        s, j = nn_scores_triton(test, ref, mode, n_split=2, fuse_norm=fuse_norm)
        torch.testing.assert_close(s, s_ref, atol=FP32_TOL, rtol=0)
        assert torch.equal(j, j_ref), mode


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_within_tolerance(impl):
    g = torch.Generator().manual_seed(11)
    test, ref = torch.randn(2, 33, 48, generator=g), torch.randn(2, 26, 48, generator=g)
    t16, r16 = test.bfloat16(), ref.bfloat16()
    idx, s, j = topk_cosine(t16, r16, 9, impl=impl)
    # the same bf16 values in float64: only fp32 accumulation error remains
    _, idx64, s64, j64 = reference(t16, r16, 9)
    torch.testing.assert_close(s.double(), s64, atol=FP32_TOL, rtol=0)
    assert torch.equal(idx, idx64) and torch.equal(j, j64)
    # against the unrounded fp32 data: scores within BF16_TOL, and the selection is a valid
    # K-lowest set / nearest neighbour wherever the float64 score gap exceeds the tolerance
    cos = reference(test, ref, 9)[0]  # (B, P, R)
    s_all = cos.amax(-1)  # (B, P)
    torch.testing.assert_close(s.double(), s_all.gather(1, idx), atol=BF16_TOL, rtol=0)
    chosen = torch.zeros_like(s_all, dtype=torch.bool).scatter_(1, idx, True)
    worst_in = s_all.masked_fill(~chosen, -2).amax(1)
    best_out = s_all.masked_fill(chosen, 2).amin(1)
    assert (worst_in <= best_out + BF16_TOL).all()
    cos_j = cos[torch.arange(2)[:, None], idx, j]  # (B, K): float64 cos at the returned j*
    assert (cos_j >= s_all.gather(1, idx) - BF16_TOL).all()


@needs_triton
def test_triton_strided_fp16_inputs():
    g = torch.Generator().manual_seed(5)
    test = torch.randn(2, 24, 35, generator=g).half().transpose(1, 2)  # (2, 35, 24), C stride P
    ref = torch.randn(2, 42, 24, generator=g).half()[:, ::2]  # (2, 21, 24), row stride 2C
    assert not test.is_contiguous() and not ref.is_contiguous()
    got = topk_cosine(test, ref, 6, impl="triton", mode="min")
    want = topk_cosine(test.contiguous(), ref.contiguous(), 6, impl="torch", mode="min")
    torch.testing.assert_close(got[1], want[1], atol=FP32_TOL, rtol=0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])


def test_torch_chunking_and_no_autograd():
    g = torch.Generator().manual_seed(2)
    test = torch.randn(2, 30, 16, generator=g, requires_grad=True)
    ref = torch.randn(2, 12, 16, generator=g, requires_grad=True)
    s_full, j_full = nn_scores_torch(test, ref, chunk_size=512)
    s_chunk, j_chunk = nn_scores_torch(test, ref, chunk_size=7)  # 7 does not divide P = 30
    torch.testing.assert_close(s_chunk, s_full, atol=1e-6, rtol=0)  # BLAS may round per shape
    assert torch.equal(j_full, j_chunk)
    idx, s, j = topk_cosine(test, ref, 4)  # auto on CPU tensors -> torch
    assert not s.requires_grad
    # the caller's gather carries the gradient (Eq. 2 keys v_d = v_t[idx] - v_r[j*])
    v_d = (test.gather(1, idx[..., None].expand(-1, -1, 16))
           - ref.gather(1, j[..., None].expand(-1, -1, 16)))  # (B, K, C)
    v_d.sum().backward()
    assert test.grad.abs().sum(-1).count_nonzero() == 2 * 4  # exactly the K rows per image


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.zeros(2, 5, 8), torch.zeros(2, 4, 8), 6), {}, r"k=6 must be an int in \[1, P=5\]"),
    ((torch.zeros(2, 5, 8), torch.zeros(2, 4, 8), 0), {}, r"k=0"),
    ((torch.zeros(2, 5, 8), torch.zeros(3, 4, 8), 1), {}, "batch/channel mismatch"),
    ((torch.zeros(2, 5, 8), torch.zeros(2, 4, 7), 1), {}, "batch/channel mismatch"),
    ((torch.zeros(5, 8), torch.zeros(4, 8), 1), {}, r"expected test \(B, P, C\)"),
    ((torch.zeros(2, 5, 8), torch.zeros(2, 0, 8), 1), {}, "empty input"),
    ((torch.zeros(2, 0, 8), torch.zeros(2, 4, 8), 1), {}, "empty input"),
    ((torch.zeros(2, 5, 8), torch.zeros(2, 4, 8).half(), 1), {}, "share one floating dtype"),
    ((torch.zeros(2, 5, 8), torch.zeros(2, 4, 8), 1), {"impl": "cuda"}, "impl='cuda'"),
    ((torch.zeros(2, 5, 8), torch.zeros(2, 4, 8), 1), {"mode": "max"}, "mode='max'"),
    ((torch.zeros(2, 5, 8).double(), torch.zeros(2, 4, 8).double(), 1), {"impl": "triton"},
     "impl='triton' takes"),
])
def test_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        topk_cosine(*args, **kwargs)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        topk_cosine(torch.zeros(1, 3, 4), torch.zeros(1, 2, 4), 1, impl="triton")


@pytest.mark.skipif(SKIP_REASON != SKIP_IMPORT_ORDER, reason="Triton tests run in-process")
def test_triton_in_fresh_process():
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__,
           "-k", "triton and not fresh_process and not compiled_on_cuda"]  # the GPU test: here
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # the only acceptable skips there: no CUDA, or an interpreter that cannot run the kernels
    skips = [line for line in out.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all("needs a CUDA GPU" in line or "runtime bound" in line for line in skips), skips
    passed = re.search(r"(\d+) passed", out.stdout)
    n_passed = int(passed.group(1)) if passed else 0  # a GPU machine's child may skip them all
    loop_bounds_skip = any("runtime bound" in line for line in skips)
    assert loop_bounds_skip or n_passed >= 20, out.stdout[-3000:]


# ---------------------------------------------------------------------------------------------
# The single launch: scores, split merge and K lowest in one kernel (interpreter)
# ---------------------------------------------------------------------------------------------

class LaunchSpy:
    """Wraps the jitted kernel of K._kernels() to record each launch's grid and arguments."""

    def __init__(self, monkeypatch):
        norm, self.nn, meta = K._kernels()
        self.launches = []  # (grid tuple, args, kwargs)
        monkeypatch.setattr(K, "_kernels", lambda: (norm, self, meta))

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid(kwargs), args, kwargs))
            return self.nn[grid](*args, **kwargs)
        return launch


OPTIONS = [  # topk_cosine_triton options: splits, persistent grids smaller than the tiles, TMA
    {}, {"n_split": 3}, {"persistent": True, "n_sm": 1},
    {"persistent": True, "n_sm": 2, "n_split": 2, "fuse_norm": False},
    {"tma": True, "n_split": 2}, {"tma": True, "persistent": True, "n_sm": 1, "fuse_norm": True}]


@needs_triton
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in
                                                                      o.items()) or "default")
@pytest.mark.parametrize("B,P,R,C,k,mode", [
    (2, 37, 29, 40, 5, "nn"),  # P, R, C not multiples of the 16-wide interpreter blocks
    (2, 17, 33, 24, 17, "min"),  # K = P, literal "min" reading
    (1, 19, 1, 16, 1, "nn"),  # R = 1, K = 1
])
def test_triton_single_launch_matches_reference(options, B, P, R, C, k, mode):
    g = torch.Generator().manual_seed(P * 1000 + R)
    test, ref = torch.randn(B, P, C, generator=g), torch.randn(B, R, C, generator=g)
    test[:, 1] = 0  # zero row: cosine 0 with every j, so j* = 0
    ref[:, -1] *= 1e3
    idx, s, j, s_all, j_all = K.topk_cosine_triton(test, ref, k, mode, all_scores=True, **options)
    assert idx.dtype == j.dtype == torch.int64 and s.dtype == torch.float32
    s_spec, j_spec = nn_scores_torch(test, ref, mode)  # every token's merged score and j*
    torch.testing.assert_close(s_all, s_spec, atol=FP32_TOL, rtol=0)
    assert torch.equal(j_all, j_spec)
    _, idx64, s64, j64 = reference(test, ref, k, mode)
    torch.testing.assert_close(s.double(), s64, atol=FP32_TOL, rtol=0)
    assert torch.equal(idx, idx64) and torch.equal(j, j64)
    want = topk_cosine(test, ref, k, impl="torch", mode=mode)
    assert torch.equal(idx, want[0]) and torch.equal(j, want[2])


@needs_triton
@pytest.mark.parametrize("options", OPTIONS[1:4])
@pytest.mark.parametrize("mode", ["nn", "min"])
def test_triton_single_launch_ties(options, mode):
    g = torch.Generator().manual_seed(7)
    test, ref = quarter_rows(g, 2, 40, 16), quarter_rows(g, 2, 37, 16)
    ref[:, 20] = ref[:, 3]  # the same maximum in different splits and tiles
    test[:, 30] = test[:, 2]  # equal scores in the selection
    _, idx64, s64, j64 = reference(test, ref, 40, mode)  # K = P: every tie is in the output
    idx, s, j = K.topk_cosine_triton(test, ref, 40, mode, **options)
    assert torch.equal(s.double(), s64)  # multiples of 1/4: exact in fp32
    assert torch.equal(idx, idx64) and torch.equal(j, j64)


@needs_triton
def test_triton_persistent_programs_loop_over_tiles(monkeypatch):
    spy = LaunchSpy(monkeypatch)
    g = torch.Generator().manual_seed(4)
    test, ref = torch.randn(3, 40, 16, generator=g), torch.randn(3, 50, 16, generator=g)
    got = K.topk_cosine_triton(test, ref, 6, n_split=2, persistent=True, n_sm=2)
    (grid, _, kwargs), = spy.launches
    tiles = 3 * 3 * 2  # B * cdiv(P, 16) * n_split
    assert kwargs["PERSISTENT"] and kwargs["SELECT"] and grid == (2 * K.PROGRAMS_PER_SM,) < (tiles,)
    want = topk_cosine(test, ref, 6, impl="torch")
    assert all(torch.equal(x, y) for x, y in zip(got[::2], want[::2]))
    torch.testing.assert_close(got[1], want[1], atol=FP32_TOL, rtol=0)


@needs_triton
def test_triton_counter_resets_for_a_rerun(monkeypatch):
    # the last program of each image sets its counter back to 0: the autotuner reruns a launch
    # on the same buffers, and the second run must select again
    spy = LaunchSpy(monkeypatch)
    g = torch.Generator().manual_seed(6)
    test, ref = torch.randn(2, 20, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    want = topk_cosine(test, ref, 7, impl="torch", mode="min")
    got = K.topk_cosine_triton(test, ref, 7, "min", n_split=3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    (grid, args, kwargs), = spy.launches
    cnt, outs = args[6], args[7:10]  # counter (B,), indices, scores, ref_indices
    assert cnt.tolist() == [0, 0]
    for out in outs:
        out.fill_(-1)
    spy.nn[lambda _: grid](*args, **kwargs)  # the same launch again, on the same counter
    assert torch.equal(outs[0], want[0]) and torch.equal(outs[2], want[2])
    again = K.topk_cosine_triton(test, ref, 7, "min", n_split=3)  # and a fresh call
    assert all(torch.equal(x, y) for x, y in zip(again, got))


@needs_triton
@pytest.mark.parametrize("limit", [{"SELECT_MAX_K": 4}, {"SELECT_MAX_P": 32}])
def test_triton_fallback_beyond_in_launch_limits(monkeypatch, limit):
    for name, value in limit.items():
        monkeypatch.setattr(K, name, value)
    spy = LaunchSpy(monkeypatch)
    g = torch.Generator().manual_seed(8)
    test, ref = torch.randn(2, 37, 16, generator=g), torch.randn(2, 20, 16, generator=g)
    got = K.topk_cosine_triton(test, ref, 5, n_split=2)  # K = 5 > 4, or P_ALL = 64 > 32
    assert [launch[2]["SELECT"] for launch in spy.launches] == [False]  # the two-step path
    want = topk_cosine(test, ref, 5, impl="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])


@needs_triton
def test_triton_bench_rows_in_interpreter(capsys):
    # every Triton row of the benchmark runs (the GPU run times them; here: no error rows)
    from sage.tools.bench import topk_cosine as bench
    bench.main(["--shape", "1,16,16,16", "--k", "2", "--dtype", "fp32"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines()
            if line.startswith("| 1, 16, 16, 16 | ") and line.count("|") > 4]  # main table
    assert [r.split(" | ")[1] for r in rows] == list(bench.TRITON_OPTIONS) + [
        "spec", "unfused", "bmm"], out
    assert "failed" not in out and "| 1.000 | " in rows[0], out


# ---------------------------------------------------------------------------------------------
# Compiled code: sm_90 TTGIR on the CPU (Triton's bundled ptxas, no GPU), and the GPU itself
# ---------------------------------------------------------------------------------------------

HOPPER_SCRIPT = r"""
import importlib, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
K = importlib.import_module("sage.kernels.topk_cosine")
fn = K._nn_cosine_kernel
sig = {n: "i32" for n in fn.arg_names}
sig.update(t_ptr="*bf16", r_ptr="*bf16", inv_t_ptr="*fp32", inv_r_ptr="*fp32", best_ptr="*fp32",
           arg_ptr="*i32", cnt_ptr="*i32", idx_ptr="*i64", score_ptr="*fp32", ref_idx_ptr="*i64")
sig.update({p.name: "constexpr" for p in fn.params if p.is_constexpr}, st_c="constexpr",
           sr_c="constexpr")  # the launcher specialises stride 1 to a constant
aligned = ["t_ptr", "r_ptr", "best_ptr", "arg_ptr", "C", "st_b", "st_p", "sr_b", "sr_r"]
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
for flags in [dict(FUSE_NORM=True), dict(FUSE_NORM=False), dict(FUSE_NORM=True, USE_TMA=True),
              dict(FUSE_NORM=True, PERSISTENT=True, MODE_MIN=True, P_ALL=8192)]:
    const = dict(MODE_MIN=False, PRECISION="tf32", UPCAST=False, USE_TMA=False, SELECT=True,
                 PERSISTENT=False, P_ALL=256, BLOCK_P=128, BLOCK_R=128, BLOCK_C=64, st_c=1,
                 sr_c=1)
    const.update(flags)
    src = ASTSource(fn, signature=sig, constexprs=const, attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=8, num_stages=3))
    ttgir = out.asm["ttgir"]
    bufs = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x64xbf16", ttgir)
    pendings = re.findall(r"warp_group_dot_wait .*pendings = (\d+)", ttgir)
    print(flags, "buffers", bufs, "wgmma pendings", pendings)
    # an async wgmma left pending (1) needs a buffer per stage: num_stages - 1 lets the next
    # copy land in the tile the running wgmma reads
    assert bufs == ["3", "3"] and "1" in pendings, (flags, bufs, pendings)
print("ok")
"""


def hopper_backend() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not (HAS_TRITON and hopper_backend()), reason="no Triton NVIDIA backend")
def test_hopper_compile_gives_each_stage_a_buffer():
    """Every kernel variant compiles for sm_90, and the fused norms no longer share the dot's
    tiles: with that second use, Triton 3.6 pipelined them through num_stages - 1 shared
    buffers while the async wgmma still read one (a race; see _sq_rows)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", HOPPER_SCRIPT], capture_output=True, text=True,
                         env=env, cwd=root, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


CUDA_SCRIPT = """
import importlib
import torch
K = importlib.import_module("sage.kernels.topk_cosine")  # not sage.kernels' re-exported function
from sage.kernels import topk_cosine
from sage.kernels.topk_cosine import nn_scores_torch, nn_scores_triton, topk_cosine_triton
# one large and one small tile: the full autotuning list spends minutes compiling the many
# tuned keys below; the benchmark covers the other tiles
K._GPU_CONFIGS = [(128, 128, 64, 8, 3), (64, 64, 64, 4, 4)]
{quarter_rows}
def same(a, b):
    return all(torch.equal(x.cpu(), y) for x, y in zip(a, b))
g = torch.Generator().manual_seed(0)
for B, P, R, C in [(3, 300, 200, 136), (1, 40, 700, 16)]:  # few test tiles -> reference split
    t, r = quarter_rows(g, B, P, C), quarter_rows(g, B, R, C)  # exact ties everywhere
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for mode in ("nn", "min"):  # the single launch (in-kernel merge and selection)
            a = topk_cosine(t.cuda().to(dtype), r.cuda().to(dtype), 37, impl="triton", mode=mode)
            b = topk_cosine(t.to(dtype), r.to(dtype), 37, impl="torch", mode=mode)
            assert same(a, b), (B, P, R, C, dtype, mode)
    tc, rc, b = t.cuda().half(), r.cuda().half(), topk_cosine(t.half(), r.half(), 37, impl="torch")
    for o in [dict(persistent=True, n_sm=2), dict(tma=True), dict(tma=True, persistent=True),
              dict(n_split=3, fuse_norm=False)]:  # several tiles per program; descriptor loads
        assert same(topk_cosine_triton(tc, rc, 37, **o), b), (B, P, R, C, o)
    if P >= 150:  # K = 150 > SELECT_MAX_K: the two-step path
        assert same(topk_cosine_triton(tc, rc, 150), topk_cosine(t.half(), r.half(), 150,
                                                                 impl="torch")), "K > 128"
t, r = torch.randn(4, 520, 200, generator=g), torch.randn(4, 900, 200, generator=g)
for fuse in (False, True):  # both norm paths, several reference tiles per program
    s, j = nn_scores_triton(t.cuda(), r.cuda(), "nn", n_split=2, fuse_norm=fuse)
    s0, j0 = nn_scores_torch(t, r, "nn")
    assert (s.cpu() - s0).abs().max() < 1e-5 and torch.equal(j.cpu(), j0), fuse
# fused norms over long reference splits and C (the case whose shared buffers raced): every
# score within fp32 rounding of the spec's, three times over
t, r = torch.randn(4, 1024, 4096, device="cuda").bfloat16(), torch.randn(4, 1024, 4096,
                                                                          device="cuda").bfloat16()
s0 = nn_scores_torch(t, r)[0]
for _ in range(3):
    s = nn_scores_triton(t, r, n_split=2, fuse_norm=True)[0]
    assert (s - s0).abs().max() < 1e-4, (s - s0).abs().max()
print("ok")
"""


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU")
def test_triton_compiled_on_cuda():
    # compiled kernels (no interpreter): the GPU's tie-breaking reductions and autotuned configs
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = CUDA_SCRIPT.format(quarter_rows=inspect.getsource(quarter_rows))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=root, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
