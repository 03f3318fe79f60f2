"""Top-K cosine patch selection (paper §3.2, Eq. 1): a PyTorch specification and a Triton kernel.

Eq. 1 (project reading, docs/design.md §1 step 2): for each test token v_t[i] its nearest-neighbour
similarity to the reference is s_i = max_j cos(v_t[i], v_r[j]); the K test tokens with the
*lowest* s_i are the most anomalous. We return their indices i, their scores s_i and the index
j* = argmax_j cos(v_t[i], v_r[j]) of each one's nearest reference token. mode="min" is the
literal reading of the paper's formula (ablation): s_i = min_j cos, j* = argmin_j cos.

    test (B, P, C), ref (B, R, C), k  ->  indices (B, K) int64, scores (B, K) fp32,
                                          ref_indices (B, K) int64, sorted by ascending score

Conventions shared by both implementations (the tests hold them to these):
- cos(a, b) = a.b / (max(|a|, EPS) * max(|b|, EPS)) with EPS = 1e-12, F.normalize's rule, so an
  all-zero row has cosine 0 with everything. Norms and dot products accumulate in fp32.
- Ties: the lowest reference index j wins the inner max (min); among test tokens with equal
  s_i the lowest index i is selected first (stable ascending sort).
- Inputs are assumed finite. Triton path: per image P * C and R * C must stay below 2**31
  (int32 offsets inside one image; the batch offset is int64).
- No autograd: the selection is index-only. Callers gather features with the indices, so
  gradients flow through the gathered features, never through this function.

impl="torch" normalises in fp32, then chunks over P (memory O(B * chunk_size * R)): bmm,
argmax, stable sort. impl="triton" computes inverse row norms in a small first launch (or,
when each program sees few reference rows, from the squares of the tiles it loads anyway:
fuse_norm, measured 2.4x faster at B=32, P=R=256 on an H200 and 1.4x slower at P=R=3328), then
tiles test x reference dot products (tl.dot, fp32 accumulation: tensor cores for bf16/fp16;
fp32 inputs use input_precision="ieee", no TF32, for accuracy) and keeps a running max/argmax
per test token across reference tiles, so the B x P x R matrix never exists; K lowest via
torch.sort over the (B, P) scores. For small B*P (P=256 gives few test tiles) the reference
axis is split over n_split programs whose partial (max, argmax) are merged in torch; splits
cover ascending j ranges, so the first split holding the max keeps the lowest-j tie rule.
Strided (non-contiguous) inputs are read in place through their strides, no copy; a contiguous
last dimension gives the vectorised loads. Accuracy (tests): against float64 on the same input
values both paths agree to 1e-5 for fp32, bf16 and fp16 inputs (bf16/fp16 products are exact
in fp32); bf16 rounding of fp32 features moves the scores by up to ~2e-2, and the selection
then only changes among tokens whose float64 scores lie within that of each other.

Usage: idx, s, j = topk_cosine(v_t, v_r, k=32)  # keys of Eq. 2: v_d = v_t[b, idx] - v_r[b, j]
"""

import contextlib
import operator
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU-only machines; impl="torch" still works
    triton = None

EPS = 1e-12  # F.normalize's default: |x| is clamped to EPS before dividing
MODES = ("nn", "min")
IMPLS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Specification (plain PyTorch, kept forever)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def nn_scores_torch(test: torch.Tensor, ref: torch.Tensor, mode: str = "nn",
                    chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 inner operator: s_i = max_j cos(v_t[i], v_r[j]) (mode "nn") or min_j (mode "min").
    test (B, P, C), ref (B, R, C) -> s (B, P) fp32, j* (B, P) int64 (lowest j on ties)."""
    v_r = F.normalize(ref.detach().float(), dim=-1, eps=EPS)  # (B, R, C)
    s, j = [], []
    for p0 in range(0, test.shape[1], chunk_size):  # chunks bound memory to B*chunk*R floats
        v_t = F.normalize(test[:, p0:p0 + chunk_size].detach().float(), dim=-1, eps=EPS)
        sim = torch.bmm(v_t, v_r.transpose(1, 2))  # (B, chunk, R)
        # argmax/argmin return the first occurrence of the extreme value: lowest j on ties
        j_c = sim.argmax(-1) if mode == "nn" else sim.argmin(-1)  # (B, chunk)
        s.append(sim.gather(-1, j_c.unsqueeze(-1)).squeeze(-1))
        j.append(j_c)
    return torch.cat(s, 1), torch.cat(j, 1)  # (B, P), (B, P)


def select_lowest(s: torch.Tensor, j: torch.Tensor, k: int):
    """Argtop-K of Eq. 1: the K lowest scores per row, lowest index first among equal scores.
    s (B, P) fp32, j (B, P) int64 -> indices (B, K), scores (B, K), ref_indices (B, K)."""
    # a stable ascending sort keeps equal scores in index order (torch.topk does not promise it)
    scores, order = torch.sort(s, dim=1, stable=True)
    idx = order[:, :k]  # (B, K)
    return idx, scores[:, :k].contiguous(), j.gather(1, idx)


# ---------------------------------------------------------------------------------------------
# Triton kernels (jitted on first use; TRITON_INTERPRET=1 must be set before triton's import)
# ---------------------------------------------------------------------------------------------

if triton is not None:

    def _inv_norm_kernel(x_ptr, out_ptr, N, C, stride_b, stride_n, stride_c,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[b, n] = 1 / max(|x[b, n, :]|_2, EPS), sum of squares in fp32."""
        pid_n, b = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, BLOCK_C)
        base = x_ptr + b.to(tl.int64) * stride_b  # int64: B * P * C may pass 2**31
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            mask = (offs_n[:, None] < N) & (c0 + offs_c[None, :] < C)
            x = tl.load(base + offs_n[:, None] * stride_n + (c0 + offs_c[None, :]) * stride_c,
                        mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_C)
            acc += tl.sum(x * x, axis=1)
        inv = 1.0 / tl.maximum(tl.sqrt(acc), 1e-12)  # = EPS, F.normalize's clamp
        tl.store(out_ptr + b * N + offs_n, inv, mask=offs_n < N)

    def _nn_cosine_kernel(t_ptr, r_ptr, inv_t_ptr, inv_r_ptr, best_ptr, arg_ptr,
                          B, P, R, C, R_SPLIT,
                          st_b, st_p, st_c, sr_b, sr_r, sr_c,
                          MODE_MIN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          FUSE_NORM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr):
        """Running max_j (or min_j) of cos(test[b, i], ref[b, j]) over j in this program's split.
        Grid (cdiv(P, BLOCK_P), n_split, B); writes best/arg[split, b, i] (fp32, int32).
        FUSE_NORM: sum the squares of the tiles already loaded for the dot instead of reading
        the inverse norms of _inv_norm_kernel (saves a pass over the inputs; costs CUDA-core
        work per tile, so it pays when a program sees few reference tiles).
        max_j (t.r_j / |r_j|) / |t| = max_j cos: 1/|t_i| > 0 is applied once at the end."""
        pid_p, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.arange(0, BLOCK_C)
        mask_p = offs_p < P
        t_base = t_ptr + b.to(tl.int64) * st_b
        r_base = r_ptr + b.to(tl.int64) * sr_b
        r_lo = split * R_SPLIT
        r_end = r_lo + R_SPLIT  # the last split may reach past R: those rows are masked
        best = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        best_j = tl.zeros([BLOCK_P], dtype=tl.int32)
        sq_t = tl.zeros([BLOCK_P], dtype=tl.float32)  # FUSE_NORM: |t_i|^2 (carried out of the loop)
        for dr in range(0, R_SPLIT, BLOCK_R):  # reference tiles in ascending j order
            r0 = r_lo + dr
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = (offs_r < R) & (offs_r < r_end)
            acc = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
            sq_t = tl.zeros([BLOCK_P], dtype=tl.float32)
            sq_r = tl.zeros([BLOCK_R], dtype=tl.float32)  # FUSE_NORM: |r_j|^2
            for c0 in range(0, C, BLOCK_C):  # any C: masked tail chunk contributes zeros
                mask_c = c0 + offs_c < C
                a = tl.load(t_base + offs_p[:, None] * st_p + (c0 + offs_c[None, :]) * st_c,
                            mask=mask_p[:, None] & mask_c[None, :], other=0.0)  # (BLOCK_P, BLOCK_C)
                r = tl.load(r_base + offs_r[:, None] * sr_r + (c0 + offs_c[None, :]) * sr_c,
                            mask=mask_r[:, None] & mask_c[None, :], other=0.0)  # (BLOCK_R, BLOCK_C)
                if UPCAST:  # exact bf16 -> fp32, only for the interpreter (see nn_scores_triton)
                    a, r = a.to(tl.float32), r.to(tl.float32)
                acc = tl.dot(a, tl.trans(r), acc, input_precision=PRECISION)  # (BLOCK_P, BLOCK_R)
                if FUSE_NORM:
                    a32, r32 = a.to(tl.float32), r.to(tl.float32)
                    sq_t += tl.sum(a32 * a32, axis=1)
                    sq_r += tl.sum(r32 * r32, axis=1)
            if FUSE_NORM:
                inv_r = 1.0 / tl.maximum(tl.sqrt(sq_r), 1e-12)  # = EPS
            else:
                inv_r = tl.load(inv_r_ptr + b * R + offs_r, mask=mask_r, other=0.0)
            cos = acc * inv_r[None, :]  # (BLOCK_P, BLOCK_R): cos * |t_i|, same argmax over j
            if MODE_MIN:
                cos = -cos  # min_j cos = -max_j(-cos); the same tie rule then picks the lowest j
            cos = tl.where(mask_r[None, :], cos, float("-inf"))
            # lowest j in the tile on ties (the interpreter always breaks ties this way, so
            # only tests/kernels' CUDA test checks this flag on compiled code)
            tile_best, tile_j = tl.max(cos, axis=1, return_indices=True,
                                       return_indices_tie_break_left=True)
            # strict '>': an equal value in a later (higher-j) tile never replaces the earlier one
            take = tile_best > best
            best = tl.where(take, tile_best, best)
            best_j = tl.where(take, tile_j + r0, best_j)
        if FUSE_NORM:  # every tile summed the same test rows: sq_t of the last one will do
            inv_t = 1.0 / tl.maximum(tl.sqrt(sq_t), 1e-12)
        else:
            inv_t = tl.load(inv_t_ptr + b * P + offs_p, mask=mask_p, other=0.0)  # (BLOCK_P,)
        best = best * inv_t
        if MODE_MIN:
            best = -best
        out = (split * B + b) * P + offs_p
        tl.store(best_ptr + out, best, mask=mask_p)
        tl.store(arg_ptr + out, best_j, mask=mask_p)


def _interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# H100 configs (bf16/fp16 via wgmma); shared memory per stage = (BLOCK_P + BLOCK_R) * BLOCK_C * 2 B.
# Configs that do not fit (e.g. large fp32 tiles) fail to compile and autotune skips them.
_GPU_CONFIGS = [  # (BLOCK_P, BLOCK_R, BLOCK_C, num_warps, num_stages)
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 4),
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 128, 8, 3), (64, 64, 128, 4, 3),
]
_INTERPRET_META = dict(BLOCK_P=16, BLOCK_R=16, BLOCK_C=16)  # one small config (tl.dot needs >= 16)
_NORM_META = dict(BLOCK_N=32, BLOCK_C=128)
_KERNELS: dict = {}


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (they only waste compile and tuning time)."""
    def fits(block, n):
        return block <= max(64, triton.next_power_of_2(n))
    def small(c):  # fp32 "ieee" dots run on CUDA cores: big tiles compile for minutes
        return c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_R"] <= 128 * 64 and c.kwargs["BLOCK_C"] <= 64
    fp32 = named_args["t_ptr"].dtype == torch.float32
    kept = [c for c in configs if fits(c.kwargs["BLOCK_P"], named_args["P"])
            and fits(c.kwargs["BLOCK_R"], named_args["R_SPLIT"])
            and fits(c.kwargs["BLOCK_C"], named_args["C"]) and (small(c) or not fp32)]
    return kept or configs[-1:]


def _kernels():
    """(norm_kernel, nn_kernel, nn_meta) jitted for the current TRITON_INTERPRET setting."""
    if triton is None:
        raise ImportError("sage/kernels/topk_cosine.py: impl='triton' needs the triton package")
    interpret = _interpreting()
    if interpret not in _KERNELS:
        norm = triton.jit(_inv_norm_kernel)
        nn = triton.jit(_nn_cosine_kernel)
        meta = dict(_INTERPRET_META)
        if not interpret:  # autotuned on the GPU, keyed on the shape (and dtypes, implicitly)
            configs = [triton.Config(dict(BLOCK_P=bp, BLOCK_R=br, BLOCK_C=bc), num_warps=w,
                                     num_stages=s) for bp, br, bc, w, s in _GPU_CONFIGS]
            nn = triton.autotune(configs, key=["P", "R", "C", "R_SPLIT", "FUSE_NORM", "MODE_MIN"],
                                 prune_configs_by={"early_config_prune": _prune_configs})(nn)
            meta = {}
        _KERNELS[interpret] = (norm, nn, meta)
    return _KERNELS[interpret]


def _default_n_split(B: int, P: int, R: int, device: torch.device) -> int:
    """Split the reference axis when B * cdiv(P, 128) test tiles cannot fill about 2 waves."""
    if device.type != "cuda":
        return 1
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = B * -(-P // 128)
    return max(1, min(-(-2 * n_sm // tiles), -(-R // 128)))


FUSE_NORM_MAX_R_SPLIT = 256  # fuse the norms when a program sees at most this many ref rows


@torch.no_grad()
def nn_scores_triton(test: torch.Tensor, ref: torch.Tensor, mode: str = "nn",
                     n_split: int | None = None, fuse_norm: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of nn_scores_torch (same results up to fp32 rounding, same tie rules).
    test (B, P, C), ref (B, R, C) strided, fp32/bf16/fp16 -> s (B, P) fp32, j* (B, P) int64.
    n_split: programs along the reference axis (None: enough to fill the GPU; 1 on CPU).
    fuse_norm: norms inside the main kernel (None: when each program sees few reference rows,
    i.e. the memory-bound shapes; a separate norm pass for the long, matmul-bound ones)."""
    norm_kernel, nn_kernel, meta = _kernels()
    (B, P, C), R = test.shape, ref.shape[1]
    n_split = n_split or _default_n_split(B, P, R, test.device)
    r_split = -(-R // n_split)
    r_split = -(-r_split // 16) * 16  # split boundaries on 16-row steps keep loads aligned
    n_split = -(-R // r_split)  # no empty split
    if fuse_norm is None:
        fuse_norm = r_split <= FUSE_NORM_MAX_R_SPLIT
    inv_t = inv_r = test  # unused placeholders when the kernel computes the norms itself
    if not fuse_norm:
        inv_t = torch.empty(B, P, device=test.device, dtype=torch.float32)
        inv_r = torch.empty(B, R, device=test.device, dtype=torch.float32)
        for x, inv, n in ((test, inv_t, P), (ref, inv_r, R)):
            grid = (triton.cdiv(n, _NORM_META["BLOCK_N"]), B)
            norm_kernel[grid](x, inv, n, C, *x.stride(), **_NORM_META)
    best = torch.empty(n_split, B, P, device=test.device, dtype=torch.float32)
    arg = torch.empty(n_split, B, P, device=test.device, dtype=torch.int32)
    # Triton 3.8's interpreter gets tl.dot on bf16 wrong (values off by ~1e9), so there the
    # operands are upcast to fp32 (exact) first; compiled kernels use the native bf16 dot.
    upcast = _interpreting() and test.dtype == torch.bfloat16
    # fp32: "ieee" (no TF32) for accuracy; for bf16/fp16 the setting has no effect
    precision = "ieee" if test.dtype == torch.float32 or upcast else "tf32"
    grid = lambda m: (triton.cdiv(P, m["BLOCK_P"]), n_split, B)  # noqa: E731
    nn_kernel[grid](test, ref, inv_t, inv_r, best, arg, B, P, R, C, r_split,
                    *test.stride(), *ref.stride(), MODE_MIN=(mode == "min"),
                    PRECISION=precision, UPCAST=upcast, FUSE_NORM=fuse_norm, **meta)
    if n_split == 1:
        return best[0], arg[0].long()
    # merge the splits: best value over splits; the first split holding it has the lowest j
    s = best.amax(0) if mode == "nn" else best.amin(0)  # (B, P)
    first = (best == s).int().argmax(0, keepdim=True)  # (1, B, P), argmax -> first True
    return s, arg.gather(0, first)[0].long()


# ---------------------------------------------------------------------------------------------
# Dispatcher (public API)
# ---------------------------------------------------------------------------------------------

def _check_inputs(test, ref, k, impl, mode):
    where = "sage/kernels/topk_cosine.py: topk_cosine"
    if impl not in IMPLS:
        raise ValueError(f"{where}: impl={impl!r} must be one of {IMPLS}")
    if mode not in MODES:
        raise ValueError(f"{where}: mode={mode!r} must be one of {MODES}")
    if test.dim() != 3 or ref.dim() != 3:
        raise ValueError(f"{where}: expected test (B, P, C) and ref (B, R, C), got "
                         f"{tuple(test.shape)} and {tuple(ref.shape)}")
    (B, P, C), (B_r, R, C_r) = test.shape, ref.shape
    if B != B_r or C != C_r:
        raise ValueError(f"{where}: batch/channel mismatch: test {tuple(test.shape)} vs ref "
                         f"{tuple(ref.shape)} (need the same B and C)")
    if B == 0 or P == 0 or R == 0 or C == 0:
        raise ValueError(f"{where}: empty input: test {tuple(test.shape)}, ref {tuple(ref.shape)}")
    if not (test.is_floating_point() and ref.is_floating_point()) or test.dtype != ref.dtype:
        raise ValueError(f"{where}: test and ref must share one floating dtype, got "
                         f"{test.dtype} and {ref.dtype}")
    if test.device != ref.device:
        raise ValueError(f"{where}: test on {test.device} but ref on {ref.device}")
    try:
        k_ok = not isinstance(k, bool) and 1 <= operator.index(k) <= P
    except TypeError:
        k_ok = False
    if not k_ok:
        raise ValueError(f"{where}: k={k!r} must be an int in [1, P={P}]")


def topk_cosine(test: torch.Tensor, ref: torch.Tensor, k: int, impl: str = "auto",
                mode: str = "nn") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 1: the K test tokens least similar to their nearest reference token.
    test (B, P, C), ref (B, R, C) -> indices (B, K) int64, scores (B, K) fp32 ascending,
    ref_indices (B, K) int64 (j* of each selected token). impl "auto" = Triton on CUDA tensors,
    torch elsewhere; mode "nn" (s_i = max_j cos, default) or "min" (literal reading, ablation)."""
    _check_inputs(test, ref, k, impl, mode)
    if impl == "auto":  # Triton where it runs compiled; the spec for CPU tensors and float64
        use_triton = test.is_cuda and triton is not None and test.dtype in TRITON_DTYPES
        impl = "triton" if use_triton else "torch"
    if impl == "torch":
        s, j = nn_scores_torch(test, ref, mode)
    else:
        if test.dtype not in TRITON_DTYPES:
            raise ValueError(f"sage/kernels/topk_cosine.py: impl='triton' takes {TRITON_DTYPES}, "
                             f"got {test.dtype}")
        if not test.is_cuda and not _interpreting():
            raise ValueError("sage/kernels/topk_cosine.py: impl='triton' needs CUDA tensors "
                             "(or TRITON_INTERPRET=1 for the CPU interpreter)")
        with torch.cuda.device(test.device) if test.is_cuda else contextlib.nullcontext():
            s, j = nn_scores_triton(test, ref, mode)  # launches go to the tensors' GPU
    with torch.no_grad():
        return select_lowest(s, j, operator.index(k))
