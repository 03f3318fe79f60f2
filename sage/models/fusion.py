"""Fusion attention (paper §3.2, Eq. 2) and the fact projection head (Eq. 9).

One-shot:  t^s = softmax( t^g W_q (v_d W_k)^T / sqrt(d) ) v_t[idx] W_v, then W_o,
           with v_d = v_t[idx] - v_r[j*] the difference features of the K selected test
           tokens (Eq. 1 picks idx and j*, docs/design.md §1 step 4).
Zero-shot: keys = values = all test tokens v_t (paper §5.1).
Multi-head: the width C is split into H heads of D = C / H (paper: "a multi-head attention
mechanism is employed"). Shapes: t^g (B, N, C); keys/values (B, L, C), L = K one-shot (2K with
comparison "both"), P test tokens zero-shot; t^s (B, N, C).

What the paper leaves free, chosen by measurement (docs/experiments.md, "The fusion pathway";
each a SageConfig field, the earlier or literal form one value away):
  norm        "pre": parameter-free LayerNorm of the queries' and keys' inputs (t^g and the
              keys) before W_q / W_k, so the logits have unit scale whatever the inputs' norm
              (pooled fact embeddings have norm ~0.2); "none": Eq. 2 as written.
  init        "fan_in": W_q, W_k, W_v, W_o ~ N(0, 1/C); "small": N(0, 0.02^2).
  head_init   std of the Eq. 9 Linear's weight at initialisation; 0 starts it at zero.
  values      "test": v_t[idx] (Eq. 2); "difference": v_d (a departure from Eq. 2; Fig. 2
              speaks of fused "feature differences"). Zero-shot keys = values = v_t always.

    fusion = FusionAttention(dim=256, n_heads=4); t_s = fusion(t_g, keys, values)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

FUSION_NORMS = ("pre", "none")
FUSION_INITS = ("fan_in", "small")
FUSION_VALUES = ("test", "difference")


def gather_tokens(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """v (B, P, C), idx (B, K) int64 -> v[b, idx[b]] (B, K, C); differentiable w.r.t. v."""
    return torch.gather(v, 1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]))


def difference_features(v_t: torch.Tensor, v_r: torch.Tensor, idx: torch.Tensor,
                        ref_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-2 inputs: (v_d, v_sel) = (v_t[idx] - v_r[j*], v_t[idx]), each (B, K, C).

    The selection (idx, j*) carries no gradient; gradients reach v_t and v_r through the
    gathered features.
    """
    v_sel = gather_tokens(v_t, idx)  # (B, K, C)
    v_nn = gather_tokens(v_r, ref_idx)  # (B, K, C): nearest reference token of each
    return v_sel - v_nn, v_sel


class FusionAttention(nn.Module):
    """Multi-head cross-attention of Eq. 2: queries from facts, keys from differences."""

    def __init__(self, dim: int, n_heads: int, norm: str = "pre", init: str = "fan_in"):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"FusionAttention: dim={dim} must be divisible by n_heads={n_heads}")
        if norm not in FUSION_NORMS or init not in FUSION_INITS:
            raise ValueError(f"FusionAttention: norm={norm!r} (one of {FUSION_NORMS}), "
                             f"init={init!r} (one of {FUSION_INITS})")
        self.dim, self.n_heads, self.norm, self.init = dim, n_heads, norm, init
        self.q_proj = nn.Linear(dim, dim)  # W_q
        self.k_proj = nn.Linear(dim, dim)  # W_k
        self.v_proj = nn.Linear(dim, dim)  # W_v
        self.o_proj = nn.Linear(dim, dim)  # output projection, stacks the heads

    def init_weights(self) -> None:
        std = 1 / math.sqrt(self.dim) if self.init == "fan_in" else 0.02
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: torch.Tensor, proj: nn.Linear, normed: bool) -> torch.Tensor:
        """(B, L, C) -> (B, H, L, D), the input LayerNorm-ed (no parameters) when `normed`."""
        B, L, C = x.shape
        if normed and self.norm == "pre":
            x = F.layer_norm(x, (C,))
        return proj(x).view(B, L, self.n_heads, C // self.n_heads).transpose(1, 2)

    def attention(self, t_g: torch.Tensor, keys: torch.Tensor,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention weights of Eq. 2, (B, H, N, K) (diagnostics; forward uses SDPA)."""
        q, k = self._heads(t_g, self.q_proj, True), self._heads(keys, self.k_proj, True)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, K)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return logits.softmax(-1)

    def forward(self, t_g: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """t_g (B, N, C) queries; keys/values (B, L, C); key_mask (B, L) bool, True = attend.

        One-shot: keys = v_d, values = v_t[idx]. Zero-shot: keys = values = v_t.
        Returns t^s (B, N, C).
        """
        B, N, C = t_g.shape
        q = self._heads(t_g, self.q_proj, True)  # (B, H, N, D)
        k = self._heads(keys, self.k_proj, True)  # (B, H, K, D)
        v = self._heads(values, self.v_proj, False)  # (B, H, K, D)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, K)
        # Eq. 2: softmax(q k^T / sqrt(D)) v per head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class FactProjection(nn.Module):
    """Eq. 9 LayerNorm projection head phi_Proj applied to t^s before it enters the LLM.

    Initialisation (project choice, docs/design.md §1 step 5): the Linear's weight starts at
    N(0, init_std^2) and its bias at zero. With init_std = 0 every <FACT_CONTEXT> slot carries
    a zero vector at step 0 (the base model's answer is changed only by a small dilution of
    attention weight), but then every fusion parameter receives a zero gradient at step 1 and
    the head learns a constant soft prompt first (docs/experiments.md); a small non-zero
    init_std lets the gradient reach the fusion attention from the first step.
    """

    def __init__(self, dim: int, norm_eps: float = 1e-5, init_std: float = 0.0):
        super().__init__()
        if init_std < 0:
            raise ValueError(f"FactProjection: init_std={init_std} must be >= 0")
        self.init_std = init_std
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.fc = nn.Linear(dim, dim)

    def init_weights(self) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.fc.weight, std=self.init_std)  # std 0: zeros
        nn.init.zeros_(self.fc.bias)

    def forward(self, t_s: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(t_s))  # (B, N, C)
