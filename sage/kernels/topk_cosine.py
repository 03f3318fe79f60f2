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
argmax, stable sort. impl="triton" is one launch of _nn_cosine_kernel (plus, for long reference
splits, a small norm pass _inv_norm_kernel) and the output allocations. Each program takes a
work item (image b, BLOCK_P test rows, one of n_split ascending reference ranges), tiles test x
reference dot products (tl.dot, fp32 accumulation: tensor cores for bf16/fp16; fp32 inputs use
input_precision="ieee", no TF32, for accuracy) and keeps a running max/argmax per test token
over the reference tiles, so the B x P x R matrix never exists; it stores its partial (max,
argmax) and bumps image b's counter (atomic, acq_rel). The program that finishes b's last work
item merges the splits (the first split holding the max keeps the lowest-j rule) and takes the
K lowest scores by K argmins (lowest index on ties), writing indices, scores and ref_indices
in output order. Limits of that in-launch selection: next_power_of_2(P) <= SELECT_MAX_P and
K <= SELECT_MAX_K; beyond them, the two-step path nn_scores_triton (partials, merge in torch)
+ select_lowest. Options (topk_cosine_triton): n_split (None: enough work items for about two
waves), fuse_norm (norms summed inside the kernel when each program sees at most
FUSE_NORM_MAX_R_SPLIT reference rows; measured, before it got its own loads (_sq_rows), 2.4x
faster at B=32, P=R=256 on an H200, 1.4x slower at P=R=3328), persistent (one program per SM
looping over the work items), tma (tensor-descriptor loads, Hopper+). Strided (non-contiguous)
inputs are read in place through their strides, no copy; a contiguous last dimension gives the
vectorised loads.
Accuracy (tests): against float64 on the same input values both paths agree to 1e-5 for fp32,
bf16 and fp16 inputs (bf16/fp16 products are exact in fp32); bf16 rounding of fp32 features
moves the scores by up to ~2e-2, and the selection then only changes among tokens whose
float64 scores lie within that of each other.

Usage: idx, s, j = topk_cosine(v_t, v_r, k=32)  # keys of Eq. 2: v_d = v_t[b, idx] - v_r[b, j]
"""

import contextlib
import functools
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
# Triton kernels (TRITON_INTERPRET=1 must be set before triton's import: triton.language's own
# jitted helpers, tl.max included, are built for one mode when triton is imported)
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
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

    @triton.jit
    def _sq_rows(base, offs_n, mask_n, stride_n, c0, offs_c, C, stride_c):
        """sum_c x[n, c]^2 over one (BLOCK_N, BLOCK_C) chunk, fp32 -> (BLOCK_N,). FUSE_NORM loads
        its chunks here rather than squaring the dot's operand tiles: with that second use,
        Triton 3.6 (and 3.8) pipelines the tile through one shared buffer too few (2 for
        num_stages=3: the async copy of chunk c + 2 overwrites the buffer the still-running
        async wgmma of chunk c reads, seen in the sm_90 TTGIR) -- a race that can corrupt dot
        products, the likely cause of the fused-norm indices that differed from the spec's on
        an H200 (tests/kernels: test_hopper_compile_gives_each_stage_a_buffer)."""
        mask = mask_n[:, None] & (c0 + offs_c[None, :] < C)
        x = tl.load(base + offs_n[:, None] * stride_n + (c0 + offs_c[None, :]) * stride_c,
                    mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_C)
        return tl.sum(x * x, axis=1)

    @triton.jit
    def _dot_tile(t_base, r_base, t_src, r_src, b, p0, r0, offs_p, mask_p, offs_r, mask_r, P, R,
                  C, st_p, st_c, sr_r, sr_c, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  FUSE_NORM: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """test rows p0.. x reference rows r0.. of image b over all C -> dot products acc
        (BLOCK_P, BLOCK_R) fp32 and, with FUSE_NORM, |r_j|^2 (BLOCK_R,). USE_TMA: t_src/r_src
        are (B*P, C)/(B*R, C) tensor descriptors; rows past P or R then come from the next
        image (zeros past the end) and are masked by the caller like the pointer path's."""
        offs_c = tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
        sq_r = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):  # any C: masked tail chunk contributes zeros
            if USE_TMA:
                a = t_src.load([b * P + p0, c0])  # (BLOCK_P, BLOCK_C)
                r = r_src.load([b * R + r0, c0])  # (BLOCK_R, BLOCK_C)
            else:
                mask_c = c0 + offs_c < C
                a = tl.load(t_base + offs_p[:, None] * st_p + (c0 + offs_c[None, :]) * st_c,
                            mask=mask_p[:, None] & mask_c[None, :], other=0.0)
                r = tl.load(r_base + offs_r[:, None] * sr_r + (c0 + offs_c[None, :]) * sr_c,
                            mask=mask_r[:, None] & mask_c[None, :], other=0.0)
            if UPCAST:  # exact bf16 -> fp32, only for the interpreter (see _launch)
                a, r = a.to(tl.float32), r.to(tl.float32)
            acc = tl.dot(a, tl.trans(r), acc, input_precision=PRECISION)  # (BLOCK_P, BLOCK_R)
            if FUSE_NORM:  # its own load of the tile (an L2 hit), see _sq_rows
                sq_r += _sq_rows(r_base, offs_r, mask_r, sr_r, c0, offs_c, C, sr_c)
        return acc, sq_r

    @triton.jit
    def _nn_tile(t_ptr, r_ptr, t_src, r_src, inv_t_ptr, inv_r_ptr, b, pid_p, split, P, R, C,
                 R_SPLIT, st_b, st_p, st_c, sr_b, sr_r, sr_c,
                 MODE_MIN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 FUSE_NORM: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """One work item: running max_j (min_j) of cos(test[b, i], ref[b, j]) for the BLOCK_P test
        rows of tile pid_p over the reference rows of this split -> best (BLOCK_P,) fp32 (the
        score s_i), best_j (BLOCK_P,) int32. FUSE_NORM: sum the squares of the rows here
        (_sq_rows) instead of reading _inv_norm_kernel's inverse norms.
        max_j (t.r_j / |r_j|) / |t| = max_j cos: 1/|t_i| > 0 is applied once at the end."""
        p0 = pid_p * BLOCK_P
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        t_base = t_ptr + b.to(tl.int64) * st_b  # int64: B * P * C may pass 2**31
        r_base = r_ptr + b.to(tl.int64) * sr_b
        r_lo = split * R_SPLIT
        r_end = r_lo + R_SPLIT  # the last split may reach past R: those rows are masked
        best = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        best_j = tl.zeros([BLOCK_P], dtype=tl.int32)
        if FUSE_NORM:  # |t_i|^2 once per work item (its rows are then in L2 for the dots)
            sq_t = tl.zeros([BLOCK_P], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                sq_t += _sq_rows(t_base, offs_p, mask_p, st_p, c0, tl.arange(0, BLOCK_C), C, st_c)
        for dr in range(0, R_SPLIT, BLOCK_R):  # reference tiles in ascending j order
            r0 = r_lo + dr
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = (offs_r < R) & (offs_r < r_end)
            acc, sq_r = _dot_tile(t_base, r_base, t_src, r_src, b, p0, r0, offs_p, mask_p, offs_r,
                                  mask_r, P, R, C, st_p, st_c, sr_r, sr_c, PRECISION, UPCAST,
                                  FUSE_NORM, USE_TMA, BLOCK_P, BLOCK_R, BLOCK_C)
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
        if FUSE_NORM:
            inv_t = 1.0 / tl.maximum(tl.sqrt(sq_t), 1e-12)
        else:
            inv_t = tl.load(inv_t_ptr + b * P + offs_p, mask=mask_p, other=0.0)  # (BLOCK_P,)
        best = best * inv_t
        if MODE_MIN:
            best = -best
        return best, best_j

    @triton.jit
    def _merge_select(best_ptr, arg_ptr, idx_ptr, score_ptr, ref_idx_ptr, b, B, P, N_SPLIT, K,
                      MODE_MIN: tl.constexpr, P_ALL: tl.constexpr):
        """Image b's partials (N_SPLIT, P) -> its K lowest scores, written in output order:
        idx/score/ref_idx[b, :K]; the merged s_i, j* of all P tokens go back into split 0's
        partials (a few KiB; the benchmark reads them). Loads bypass L1 (.cg): other programs
        wrote the partials."""
        offs = tl.arange(0, P_ALL)
        mask = offs < P
        s = tl.full([P_ALL], float("-inf"), dtype=tl.float32)  # merged on the max scale
        j = tl.zeros([P_ALL], dtype=tl.int32)
        for split in range(0, N_SPLIT):  # ascending j ranges: strict '>' keeps the first's j
            row = (split * B + b) * P + offs
            v = tl.load(best_ptr + row, mask=mask, other=0.0, cache_modifier=".cg")  # (P_ALL,)
            a = tl.load(arg_ptr + row, mask=mask, other=0, cache_modifier=".cg")
            if MODE_MIN:
                v = -v  # min over splits = -max(-v), the same first-split rule
            take = v > s
            s = tl.where(take, v, s)
            j = tl.where(take, a, j)
        if MODE_MIN:
            s = -s
        tl.store(best_ptr + b * P + offs, s, mask=mask)  # split 0, read above by this program only
        tl.store(arg_ptr + b * P + offs, j, mask=mask)
        key = tl.where(mask, s, float("inf"))  # padding is never taken: K <= P real entries
        for k in range(0, K):  # K argmins; the lowest index wins among equal scores
            m, i = tl.min(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
            hit = offs == i
            j_i = tl.max(tl.where(hit, j, -1), axis=0)  # j[i]
            tl.store(idx_ptr + b * K + k, i.to(tl.int64))
            tl.store(score_ptr + b * K + k, m)
            tl.store(ref_idx_ptr + b * K + k, j_i.to(tl.int64))
            key = tl.where(hit, float("inf"), key)

    @triton.jit
    def _work_item(tile, t_ptr, r_ptr, t_src, r_src, inv_t_ptr, inv_r_ptr, best_ptr, arg_ptr,
                   cnt_ptr, idx_ptr, score_ptr, ref_idx_ptr, B, P, R, C, R_SPLIT, N_SPLIT, K,
                   st_b, st_p, st_c, sr_b, sr_r, sr_c,
                   MODE_MIN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   FUSE_NORM: tl.constexpr, USE_TMA: tl.constexpr, SELECT: tl.constexpr,
                   P_ALL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):
        """Tile id -> (b, split, pid_p) (consecutive ids share b and the reference rows); store
        its partial best/arg[split, b, i]; SELECT: the last of image b's tiles to finish merges
        and selects. The counter is the only cross-program communication: the stores, then a
        CTA barrier (all threads' stores issued), then an acq_rel atomic (releases ours,
        acquires the others'). The interpreter runs programs one after another, so the tests
        exercise this logic (last one selects, reset) but never a race."""
        n_p = tl.cdiv(P, BLOCK_P)
        per_b = n_p * N_SPLIT  # tiles per image
        b = tile // per_b
        split = (tile % per_b) // n_p
        pid_p = tile % n_p
        best, best_j = _nn_tile(t_ptr, r_ptr, t_src, r_src, inv_t_ptr, inv_r_ptr, b, pid_p, split,
                                P, R, C, R_SPLIT, st_b, st_p, st_c, sr_b, sr_r, sr_c, MODE_MIN,
                                PRECISION, UPCAST, FUSE_NORM, USE_TMA, BLOCK_P, BLOCK_R, BLOCK_C)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        out = (split * B + b) * P + offs_p  # into (N_SPLIT, B, P)
        tl.store(best_ptr + out, best, mask=offs_p < P)
        tl.store(arg_ptr + out, best_j, mask=offs_p < P)
        if SELECT:
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel")  # tiles of b finished before us
            if done == per_b - 1:
                _merge_select(best_ptr, arg_ptr, idx_ptr, score_ptr, ref_idx_ptr, b, B, P,
                              N_SPLIT, K, MODE_MIN, P_ALL)
                tl.atomic_xchg(cnt_ptr + b, 0)  # back to 0: autotuning reruns the same buffer

    @triton.jit
    def _nn_cosine_kernel(t_ptr, r_ptr, inv_t_ptr, inv_r_ptr, best_ptr, arg_ptr, cnt_ptr,
                          idx_ptr, score_ptr, ref_idx_ptr, B, P, R, C, R_SPLIT, N_SPLIT, K,
                          st_b, st_p, st_c, sr_b, sr_r, sr_c,
                          MODE_MIN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          FUSE_NORM: tl.constexpr, USE_TMA: tl.constexpr, SELECT: tl.constexpr,
                          PERSISTENT: tl.constexpr, P_ALL: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Grid (tiles,) with tiles = B * cdiv(P, BLOCK_P) * N_SPLIT, one work item a program; or
        PERSISTENT: a smaller grid whose programs loop over tile ids pid, pid + grid, ..."""
        t_src, r_src = t_ptr, r_ptr
        if USE_TMA:  # device-side descriptors (need triton.set_allocator); last stride 1
            t_src = tl.make_tensor_descriptor(t_ptr, [B * P, C], [st_p, 1], [BLOCK_P, BLOCK_C])
            r_src = tl.make_tensor_descriptor(r_ptr, [B * R, C], [sr_r, 1], [BLOCK_R, BLOCK_C])
        if PERSISTENT:
            n_tiles = B * tl.cdiv(P, BLOCK_P) * N_SPLIT
            for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
                _work_item(tile, t_ptr, r_ptr, t_src, r_src, inv_t_ptr, inv_r_ptr, best_ptr,
                           arg_ptr, cnt_ptr, idx_ptr, score_ptr, ref_idx_ptr, B, P, R, C,
                           R_SPLIT, N_SPLIT, K, st_b, st_p, st_c, sr_b, sr_r, sr_c, MODE_MIN,
                           PRECISION, UPCAST, FUSE_NORM, USE_TMA, SELECT, P_ALL, BLOCK_P, BLOCK_R,
                           BLOCK_C)
        else:
            _work_item(tl.program_id(0), t_ptr, r_ptr, t_src, r_src, inv_t_ptr, inv_r_ptr,
                       best_ptr, arg_ptr, cnt_ptr, idx_ptr, score_ptr, ref_idx_ptr, B, P, R, C,
                       R_SPLIT, N_SPLIT, K, st_b, st_p, st_c, sr_b, sr_r, sr_c, MODE_MIN, PRECISION,
                       UPCAST, FUSE_NORM, USE_TMA, SELECT, P_ALL, BLOCK_P, BLOCK_R, BLOCK_C)


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
_TUNE_KEY = ["P", "R", "C", "R_SPLIT", "FUSE_NORM", "MODE_MIN", "SELECT", "PERSISTENT", "USE_TMA"]
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
    """(norm_kernel, nn_kernel, nn_meta): autotuned on the GPU, one small tile interpreted."""
    if triton is None:
        raise ImportError("sage/kernels/topk_cosine.py: impl='triton' needs the triton package")
    interpret = _interpreting()
    if interpret not in _KERNELS:
        nn, meta = _nn_cosine_kernel, dict(_INTERPRET_META)
        if not interpret:  # autotuned on the GPU, keyed on the shape (and dtypes, implicitly)
            configs = [triton.Config(dict(BLOCK_P=bp, BLOCK_R=br, BLOCK_C=bc), num_warps=w,
                                     num_stages=s) for bp, br, bc, w, s in _GPU_CONFIGS]
            nn = triton.autotune(configs, key=_TUNE_KEY,
                                 prune_configs_by={"early_config_prune": _prune_configs})(nn)
            meta = {}
        _KERNELS[interpret] = (_inv_norm_kernel, nn, meta)
    return _KERNELS[interpret]


@functools.lru_cache(maxsize=None)
def _n_sm(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a fake 4 for the interpreter on CPU."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_n_split(B: int, P: int, R: int, device: torch.device) -> int:
    """Split the reference axis when B * cdiv(P, 128) test tiles cannot fill about 2 waves."""
    if device.type != "cuda":
        return 1
    tiles = B * -(-P // 128)
    return max(1, min(-(-2 * _n_sm(device) // tiles), -(-R // 128)))


FUSE_NORM_MAX_R_SPLIT = 256  # fuse the norms when a program sees at most this many ref rows
SELECT_MAX_P = 8192  # in-launch K-lowest selection up to next_power_of_2(P) = this (registers)
SELECT_MAX_K = 128  # ... and K = this (K serial argmins); beyond: torch merge + select_lowest
PERSISTENT_DEFAULT = False  # unmeasured: one program per tile lets the GPU balance the tail
PROGRAMS_PER_SM = 1  # persistent grid: min(tiles, n_sm * this) programs


def _tma_ok(test: torch.Tensor, ref: torch.Tensor) -> bool:
    """Tensor descriptors need a contiguous last dim, 16-byte aligned bases and row strides,
    and images laid out back to back (the descriptor spans (B * rows, C))."""
    def ok(x):
        B, N, _ = x.shape
        row = x.stride(1) * x.element_size()
        return (x.stride(2) == 1 and x.stride(1) >= x.shape[2] and row % 16 == 0
                and x.data_ptr() % 16 == 0 and (B == 1 or x.stride(0) == N * x.stride(1)))
    cuda_ok = not test.is_cuda or torch.cuda.get_device_capability(test.device)[0] >= 9
    return cuda_ok and ok(test) and ok(ref)


def _launch(test, ref, mode, k, n_split, fuse_norm, persistent, tma, n_sm):
    """One launch of _nn_cosine_kernel (after the optional norm pass) -> the partials best
    (n_split, B, P) fp32, arg (n_split, B, P) int32 and, for k=None, outs None; for a k, the
    in-launch merge (into best[0], arg[0]) and K lowest: outs = indices (B, K) int64,
    scores (B, K) fp32, ref_indices (B, K) int64."""
    norm_kernel, nn_kernel, meta = _kernels()
    (B, P, C), R, dev = test.shape, ref.shape[1], test.device
    n_split = n_split or _default_n_split(B, P, R, dev)
    r_split = -(-R // n_split)
    r_split = -(-r_split // 16) * 16  # split boundaries on 16-row steps keep loads aligned
    n_split = -(-R // r_split)  # no empty split
    if fuse_norm is None:
        fuse_norm = r_split <= FUSE_NORM_MAX_R_SPLIT
    inv_t = inv_r = test  # unused placeholders when the kernel computes the norms itself
    if not fuse_norm:
        inv_t = torch.empty(B, P, device=dev, dtype=torch.float32)
        inv_r = torch.empty(B, R, device=dev, dtype=torch.float32)
        for x, inv, n in ((test, inv_t, P), (ref, inv_r, R)):
            grid = (triton.cdiv(n, _NORM_META["BLOCK_N"]), B)
            norm_kernel[grid](x, inv, n, C, *x.stride(), **_NORM_META)
    best = torch.empty(n_split, B, P, device=dev, dtype=torch.float32)
    arg = torch.empty(n_split, B, P, device=dev, dtype=torch.int32)
    outs, cnt = None, best  # cnt: unused placeholder without the selection
    if k is not None:
        outs = (torch.empty(B, k, device=dev, dtype=torch.int64),
                torch.empty(B, k, device=dev, dtype=torch.float32),
                torch.empty(B, k, device=dev, dtype=torch.int64))
        cnt = torch.zeros(B, device=dev, dtype=torch.int32)  # finished tiles per image
    tma = bool(tma) and _tma_ok(test, ref)
    if tma and test.is_cuda:  # device-side descriptors live in a scratch buffer per launch
        triton.set_allocator(lambda size, align, stream: torch.empty(size, device=dev,
                                                                     dtype=torch.int8))
    # Triton 3.8's interpreter gets tl.dot on bf16 wrong (values off by ~1e9), so there the
    # operands are upcast to fp32 (exact) first; compiled kernels use the native bf16 dot.
    upcast = _interpreting() and test.dtype == torch.bfloat16
    # fp32: "ieee" (no TF32) for accuracy; for bf16/fp16 the setting has no effect
    precision = "ieee" if test.dtype == torch.float32 or upcast else "tf32"
    slots = n_sm or _n_sm(dev)
    persistent = PERSISTENT_DEFAULT if persistent is None else persistent

    def grid(m):
        tiles = B * triton.cdiv(P, m["BLOCK_P"]) * n_split
        return (min(tiles, slots * PROGRAMS_PER_SM) if persistent else tiles,)
    nn_kernel[grid](test, ref, inv_t, inv_r, best, arg, cnt, *(outs or (best,) * 3), B, P, R,
                    C, r_split, n_split, k or 0, *test.stride(), *ref.stride(),
                    MODE_MIN=(mode == "min"), PRECISION=precision, UPCAST=upcast,
                    FUSE_NORM=fuse_norm, USE_TMA=tma,
                    SELECT=k is not None, PERSISTENT=persistent,
                    P_ALL=triton.next_power_of_2(P) if k is not None else 1, **meta)
    return best, arg, outs


@torch.no_grad()
def nn_scores_triton(test: torch.Tensor, ref: torch.Tensor, mode: str = "nn",
                     n_split: int | None = None, fuse_norm: bool | None = None,
                     persistent: bool | None = None, tma: bool = False, n_sm: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of nn_scores_torch (same results up to fp32 rounding, same tie rules):
    one launch for the partials, the splits merged in torch (the two-step path).
    test (B, P, C), ref (B, R, C) strided, fp32/bf16/fp16 -> s (B, P) fp32, j* (B, P) int64.
    n_split: programs along the reference axis (None: enough to fill the GPU; 1 on CPU).
    fuse_norm: norms inside the main kernel (None: when each program sees few reference rows,
    i.e. the memory-bound shapes; a separate norm pass for the long, matmul-bound ones).
    persistent, tma, n_sm: as in topk_cosine_triton."""
    best, arg, _ = _launch(test, ref, mode, None, n_split, fuse_norm, persistent, tma, n_sm)
    if best.shape[0] == 1:
        return best[0], arg[0].long()
    # merge the splits: best value over splits; the first split holding it has the lowest j
    s = best.amax(0) if mode == "nn" else best.amin(0)  # (B, P)
    first = (best == s).int().argmax(0, keepdim=True)  # (1, B, P), argmax -> first True
    return s, arg.gather(0, first)[0].long()


@torch.no_grad()
def topk_cosine_triton(test: torch.Tensor, ref: torch.Tensor, k: int, mode: str = "nn",
                       n_split: int | None = None, fuse_norm: bool | None = None,
                       persistent: bool | None = None, tma: bool = False,
                       n_sm: int | None = None, all_scores: bool = False):
    """Eq. 1 in one Triton launch (plus the norm pass when not fused): scores, split merge and
    the K lowest, when next_power_of_2(P) <= SELECT_MAX_P and K <= SELECT_MAX_K; beyond that
    nn_scores_triton + select_lowest. Same outputs as topk_cosine.
    persistent: a grid of min(tiles, n_sm * PROGRAMS_PER_SM) programs looping over the tiles
    (None: PERSISTENT_DEFAULT); n_sm: SM count (None: the device's; a small fake on CPU).
    tma: tensor-descriptor loads (Hopper+; pointer loads where _tma_ok fails).
    all_scores: also return s (B, P) fp32 and j* (B, P) int64 of every test token."""
    if triton.next_power_of_2(test.shape[1]) > SELECT_MAX_P or k > SELECT_MAX_K:
        s, j = nn_scores_triton(test, ref, mode, n_split, fuse_norm, persistent, tma, n_sm)
        out = select_lowest(s, j, k)
    else:
        best, arg, out = _launch(test, ref, mode, k, n_split, fuse_norm, persistent, tma, n_sm)
        s, j = best[0], arg[0]  # merged by the launch
    return (*out, s, j.long()) if all_scores else out


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
            # one launch (plus the norm pass for long splits), on the tensors' GPU
            return topk_cosine_triton(test, ref, operator.index(k), mode)
    with torch.no_grad():
        return select_lowest(s, j, operator.index(k))
