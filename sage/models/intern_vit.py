"""InternViT: the vision tower F_v of InternVL2 (paper §3.1; docs/design.md §1 step 1, §5).

A pre-norm ViT (Dosovitskiy et al. 2020) in InternVL's layout. One block, with layer scale
(gamma_1 = ls1, gamma_2 = ls2) and stochastic depth DP:

    h = x + DP(ls1 * Attn(norm1(x)))          Attn: fused qkv, optional qk-norm, SDPA, proj
    y = h + DP(ls2 * MLP(norm2(h)))           MLP: fc1 -> exact GELU -> fc2

Two published variants, chosen by VisionConfig.norm_type:
- "rms_norm" (InternViT-6B): RMSNorm, and RMSNorm over the FULL C-wide q and k before the
  head split (qk-norm; one weight of width C, not one per head); no qkv bias.
- "layer_norm" (InternViT-300M): LayerNorm with bias, usually no qk-norm, qkv bias.
There is no final norm and no pooling: forward returns token features, CLS first.

Shapes: pixel_values (B, 3, H, W) -> (B, 1 + P, C), P = (H / patch) * (W / patch).
Images of another size than cfg.image_size get bicubically interpolated patch positions.

    vit = InternViT(VisionConfig()); vit.init_weights(); feats = vit(pixels)  # (B, 1025, 3200)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sage.checkpoint import load_into
from sage.config import VisionConfig
from sage.models.norm import RMSNorm
from sage.names import INTERNVIT_KEY_MAP

# ----------------------------------------------------------------------------- pure helpers


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resize learned positions to a grid_h x grid_w patch grid; the CLS position is kept.

    pos_embed (1, 1 + g*g, C) for a square g x g grid -> (1, 1 + grid_h*grid_w, C), same dtype.
    Bicubic, align_corners=False, computed in fp32 (as InternVL's `_get_pos_embed`).
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    n, c = patch_pos.shape[1], patch_pos.shape[2]
    g = int(round(n**0.5))
    assert g * g == n, f"position grid of {n} entries is not square"
    grid = patch_pos.float().reshape(1, g, g, c).permute(0, 3, 1, 2)  # (1, C, g, g)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, c)  # (1, h*w, C) raster
    return torch.cat([cls_pos, patch_pos.to(pos_embed.dtype)], dim=1)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): zero a residual branch per sample with prob. p.

    x (B, ...) -> (B, ...); kept samples are scaled by 1 / (1 - p) so the expectation is x.
    Identity when p == 0 or not training (timm's DropPath, scale_by_keep=True).
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ..., 1)
    return x * mask / keep


# ----------------------------------------------------------------------------- modules


def make_norm(cfg: VisionConfig, dim: int) -> nn.Module:
    """norm1/norm2 of a block: RMSNorm (weight only) or LayerNorm (weight + bias)."""
    if cfg.norm_type == "rms_norm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


class InternViTEmbeddings(nn.Module):
    """CLS token + conv patch embedding + learned absolute positions (published names)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.class_embedding = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.patch_embedding = nn.Conv2d(cfg.n_channels, cfg.dim, cfg.patch_size,
                                         stride=cfg.patch_size)
        # a bare parameter (not nn.Embedding), as published: (1, 1 + P, C)
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + cfg.n_patches, cfg.dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))  # (B, C, H/p, W/p)
        b, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, P, C), raster order over the patch grid
        x = torch.cat([self.class_embedding.to(x.dtype).expand(b, 1, c), x], dim=1)  # (B, 1+P, C)
        pos = self.position_embedding
        if (gh, gw) != (self.cfg.grid, self.cfg.grid):  # another resolution than trained
            pos = interpolate_pos_embed(pos, gh, gw)  # (1, 1 + gh*gw, C)
        return x + pos.to(x.dtype)


class InternViTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv and optional qk-norm over the full width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.use_qk_norm = cfg.n_heads, cfg.head_dim, cfg.use_qk_norm
        # published row order of qkv.weight: [q; k; v], each C rows laid out as (H, D)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        if cfg.use_qk_norm:
            # InternViT-6B normalises q and k over all C = H*D channels at once, *then* splits
            # heads; a per-head norm would give different numbers. Always RMSNorm (as published).
            self.q_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = nn.Linear(cfg.dim, cfg.dim)  # bias in both published variants

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, T, C)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # full width, before the head split
        q, k, v = (z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for z in (q, k, v))  # 3 x (B, H, T, D)
        o = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D)) v: (B, H, T, D)
        return self.proj(o.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class InternViTMLP(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # (B, T, C)


class InternViTBlock(nn.Module):
    """Pre-norm block with layer scale and stochastic depth (equations in the module doc)."""

    def __init__(self, cfg: VisionConfig, drop_path: float = 0.0):
        super().__init__()
        self.drop_path_rate = drop_path
        self.norm1 = make_norm(cfg, cfg.dim)
        self.attn = InternViTAttention(cfg)
        self.ls1 = nn.Parameter(torch.empty(cfg.dim))  # gamma_1 (CaiT layer scale)
        self.norm2 = make_norm(cfg, cfg.dim)
        self.mlp = InternViTMLP(cfg)
        self.ls2 = nn.Parameter(torch.empty(cfg.dim))  # gamma_2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)) * self.ls1, self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)) * self.ls2, self.drop_path_rate, self.training)


class InternViT(nn.Module):
    """The vision tower: embeddings, then cfg.n_layers blocks; no final norm, no pooling."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.embeddings = InternViTEmbeddings(cfg)
        # stochastic depth rate grows linearly from 0 (first block) to drop_path_rate (last)
        n = cfg.n_layers
        rates = [cfg.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        # ModuleDict only to reproduce the published key prefix `encoder.layers.N.`
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            InternViTBlock(cfg, drop_path=r) for r in rates)})

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter (call after to_empty / sharding; construction allocates nothing).

        Linear/conv weights and embeddings ~ N(0, 0.02) truncated at +-2 std, biases 0,
        norm weights 1, ls1/ls2 = cfg.layer_scale_init (InternVL's init).
        """
        std = 0.02
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.reset_parameters()
            elif isinstance(m, InternViTBlock):
                nn.init.constant_(m.ls1, self.cfg.layer_scale_init)
                nn.init.constant_(m.ls2, self.cfg.layer_scale_init)
        e = self.embeddings
        nn.init.trunc_normal_(e.class_embedding, std=std, a=-2 * std, b=2 * std)
        nn.init.trunc_normal_(e.position_embedding, std=std, a=-2 * std, b=2 * std)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> hidden state `select_layer`: (B, 1 + P, C).

        Hidden states are [embeddings, block 1, ..., block N] indexed like HF's
        `hidden_states[select_layer]` (-1 = last block, 0 = embeddings); only the blocks
        needed for that state run.
        """
        layers = self.encoder["layers"]
        n = len(layers)
        n_run = select_layer if select_layer >= 0 else n + 1 + select_layer
        if not 0 <= n_run <= n:
            raise ValueError(f"InternViT.forward: select_layer={select_layer} out of range for "
                             f"{n} blocks (expected {-(n + 1)}..{n})")
        x = self.embeddings(pixel_values)  # (B, 1+P, C)
        for layer in layers[:n_run]:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x  # (B, 1+P, C)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "InternViT":
        """Load a plain InternViT Hugging Face directory (config.json + *.safetensors).

        Built on the meta device; sage.checkpoint.load_into checks every key and shape first,
        then materialises on `device` (default CPU) in `dtype` (default: torch's default dtype)
        and streams the tensors in. Returned in eval() mode (drop path off).
        """
        cfg = VisionConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = cls(cfg)
        load_into(model, directory, INTERNVIT_KEY_MAP, dtype=dtype, strict=True, device=device)
        return model.eval()
