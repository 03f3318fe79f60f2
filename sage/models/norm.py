"""RMSNorm, shared by InternViT-6B (norm1/norm2, the qk-norms) and the Llama decoder.

y = w * x / sqrt(mean(x^2) + eps) over the last dimension; statistics in fp32 and cast back
to the input dtype before the weight multiplies, as InternVL's InternRMSNorm and transformers'
LlamaRMSNorm both do.   x (..., C) -> y (..., C)

    norm = RMSNorm(3200, eps=1e-6); y = norm(x)
"""

from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned per-channel weight (no bias, no mean removal)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # free under meta; init_weights resets it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # fp32 statistics: bf16 squares lose the small channels
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
