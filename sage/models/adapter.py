"""Pixel shuffle and the Adapter (InternVL2's `mlp1`): ViT patches -> LLM tokens.

Paper §3.1: "a visual encoder F_v with an Adapter"; docs/design.md §1 step 1, §5. After InternViT
the CLS token is dropped and the (h x w) patch grid is folded 2x2 -> 1 ("pixel shuffle", ratio
0.5), which turns (B, 32, 32, 3200) into (B, 16, 16, 12800) for a 448 px tile; the adapter

    v = fc2(GELU(fc1(LayerNorm(x))))          published names mlp1.0 / mlp1.1 / mlp1.3

then maps each of the 256 tokens to the LLM width C (7168 for Yi-34B).

    x = pixel_shuffle(feats[:, 1:].reshape(B, 32, 32, -1), 0.5); v = Adapter(12800, 7168)(x)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """Fold each s x s block of tokens into one token, s = 1 / scale (InternVL "v2" order).

    x (B, h, w, c), rows first -> (B, h/s, w/s, c*s*s). Output token (i, j), in raster order,
    concatenates its block's inputs row by row: for s = 2, [x[2i, 2j], x[2i, 2j+1],
    x[2i+1, 2j], x[2i+1, 2j+1]] = top-left, top-right, bottom-left, bottom-right.
    This is what InternVL's view/permute sequence with ps_version="v2" computes; it is NOT
    F.pixel_unshuffle's order (that one interleaves channels: c-major, then the block offset).
    """
    s = round(1 / scale)
    b, h, w, c = x.shape
    if abs(s * scale - 1) > 1e-6 or h % s or w % s:
        raise ValueError(f"pixel_shuffle: scale={scale} must be 1/n with n dividing the grid "
                         f"{h}x{w}")
    x = x.reshape(b, h // s, s, w // s, s, c)  # (B, h/s, dy, w/s, dx, c)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h/s, w/s, dy, dx, c): block offset row-major
    return x.reshape(b, h // s, w // s, s * s * c)  # (B, h/s, w/s, s*s*c)


class Adapter(nn.Module):
    """LayerNorm(in_dim) -> Linear(in_dim, dim) -> exact GELU -> Linear(dim, dim)."""

    def __init__(self, in_dim: int, dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=norm_eps)  # mlp1.0
        self.fc1 = nn.Linear(in_dim, dim)  # mlp1.1
        self.fc2 = nn.Linear(dim, dim)  # mlp1.3 (mlp1.2 is the parameter-free GELU)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Norm to identity, Linear weights ~ N(0, 0.02) truncated at +-2 std, biases 0."""
        self.norm.reset_parameters()
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_dim) -> (..., dim)."""
        return self.fc2(F.gelu(self.fc1(self.norm(x))))
