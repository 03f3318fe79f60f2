"""Fusion attention (paper §3.2, Eq. 2) and the fact projection head (Eq. 9).

One-shot:  t^s = softmax( t^g W_q (v_d W_k)^T / sqrt(d) ) v_t[idx] W_v, then W_o,
           with v_d = v_t[idx] - v_r[j*] the difference features of the K selected test
           tokens (Eq. 1 picks idx and j*, DESIGN §1 step 4).
Zero-shot: keys = values = all test tokens v_t (paper §5.1).
Multi-head: the width C is split into H heads of D = C / H (paper: "a multi-head attention
mechanism is employed"). Shapes: t^g (B, N, C); keys/values (B, K, C); t^s (B, N, C).

    fusion = FusionAttention(dim=256, n_heads=4); t_s = fusion(t_g, keys, values)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"FusionAttention: dim={dim} must be divisible by n_heads={n_heads}")
        self.dim, self.n_heads = dim, n_heads
        self.q_proj = nn.Linear(dim, dim)  # W_q
        self.k_proj = nn.Linear(dim, dim)  # W_k
        self.v_proj = nn.Linear(dim, dim)  # W_v
        self.o_proj = nn.Linear(dim, dim)  # output projection, stacks the heads

    def init_weights(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, t_g: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """t_g (B, N, C) queries; keys/values (B, K, C); key_mask (B, K) bool, True = attend.

        One-shot: keys = v_d, values = v_t[idx]. Zero-shot: keys = values = v_t.
        Returns t^s (B, N, C).
        """
        B, N, C = t_g.shape
        H, D = self.n_heads, C // self.n_heads
        q = self.q_proj(t_g).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        k = self.k_proj(keys).view(B, -1, H, D).transpose(1, 2)  # (B, H, K, D)
        v = self.v_proj(values).view(B, -1, H, D).transpose(1, 2)  # (B, H, K, D)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, K)
        # Eq. 2: softmax(q k^T / sqrt(D)) v per head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class FactProjection(nn.Module):
    """Eq. 9 LayerNorm projection head phi_Proj applied to t^s before it enters the LLM.

    Initialisation (project choice, DESIGN §1 step 5): the Linear starts at zero, so at step 0
    every <FACT_CONTEXT> slot carries a zero vector. Through the LLM's pre-norm blocks a zero
    token has zero values (q/k/v projections have no bias), so the base model's answer is
    changed only by a small dilution of attention weight, never by random features; the
    gradient w.r.t. `fc.weight` is LN(t^s) x upstream grad, non-zero from the first step.
    """

    def __init__(self, dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.fc = nn.Linear(dim, dim)

    def init_weights(self) -> None:
        self.norm.reset_parameters()
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, t_s: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(t_s))  # (B, N, C)
