"""Llama/Yi decoder: the LLM of InternVL2-40B (Nous-Hermes-2-Yi-34B), paper §3.2 and Eq. 10.

Pre-norm decoder blocks (RMSNorm -> GQA attention with rotate-half RoPE -> residual, RMSNorm
-> SwiGLU MLP -> residual), final RMSNorm and an untied LM head. Attribute names follow the
published Hugging Face layout (`embed_tokens`, `layers.N.self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm`, `norm`, `lm_head`) and RoPE uses the published rotate-half convention, so a
checkpoint loads with a prefix change and no q/k permutation (docs/design.md §5).

Shapes: B batch, T new tokens, S keys (cached + new), C = dim, H query heads, Hkv key/value
heads, D = head_dim, V vocabulary.   input_ids (B, T) -> logits (B, T, V)

    llm = Llama(cfg.llm); llm.init_weights(); ids = llm.generate(prompt_ids, max_new_tokens=32)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from sage.checkpoint import load_into
from sage.config import LLMConfig
from sage.models.norm import RMSNorm
from sage.names import LLAMA_KEY_MAP
from sage.safetensors_io import checkpoint_dtype

# ----------------------------------------------------------------------------- pure helpers


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for explicit positions.   position_ids (B, T) -> cos, sin (B, T, D) in dtype.

    inv_freq_i = theta^(-2i/D), angle = pos * inv_freq, both in fp32 (bf16 positions past 256
    are not exact); the half-split layout [f, f] matches the published rotate-half weights.
    Recomputed each call (D/2 numbers): no buffer to lose under meta construction / to_empty.
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponent / head_dim))  # (D/2,)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k.   x (B, H, T, D), cos/sin (B, T, D) -> (B, H, T, D)"""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): broadcast over heads
    return x * cos + rotate_half(x) * sin


def attention_mask_4d(attention_mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """Causal + padding mask for the last n_new of S positions (True = may attend).

    attention_mask (B, S) with 1 = real token, 0 = pad (left padding allowed) -> (B, 1, T, S).
    A query always sees its own key: a pad query has no real key at or before it, and a fully
    masked row makes SDPA return NaN. Real queries are unaffected (their own key is real) and
    pad outputs are never read.
    """
    S = attention_mask.shape[1]
    q_pos = torch.arange(S - n_new, S, device=attention_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    keep = (k_pos <= q_pos) & attention_mask[:, None, :].bool()  # (B, T, S)
    keep = keep | (k_pos == q_pos)  # (B, T, S)
    return keep[:, None]  # (B, 1, T, S)


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One decoding step of Eq. 10: y_t ~ p(y_t | I, Y_q, Y_a,<t).   logits (B, V) -> (B,) int64

    temperature == 0: greedy argmax. Otherwise p = softmax(logits / temperature) in fp32,
    restricted to the nucleus (the most likely tokens whose total mass first reaches top_p;
    the top token is always kept), renormalised by multinomial.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(dim=-1, descending=True)  # (B, V)
        mass_before = p_sorted.cumsum(dim=-1) - p_sorted  # (B, V): mass of strictly better tokens
        p_sorted = p_sorted.masked_fill(mass_before > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, p_sorted)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


# ----------------------------------------------------------------------------- KV cache


@dataclass
class KVCache:
    """Preallocated keys/values, one (B, Hkv, max_len, D) pair per layer, filled up to `length`.

    `Llama.forward` writes the new tokens' k/v at [length, length + T) and then advances length.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


# ----------------------------------------------------------------------------- modules


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; H query heads share Hkv key/value heads."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None,
                kv: tuple[torch.Tensor, torch.Tensor, int | torch.Tensor] | None = None
                ) -> torch.Tensor:
        """x (B, T, C); mask (B, 1, T, S) bool or None (= plain causal); kv = (k_buf, v_buf,
        start) of one layer's cache: the new k/v are written at [start, start + T). A device
        tensor start is the static cache of sage/models/decoding.py (T = 1, S = the whole
        buffer): static_decode_attention."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B,Hkv,T,D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B,Hkv,T,D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None and isinstance(kv[2], torch.Tensor):  # static cache, one new token
            return self.o_proj(static_decode_attention(q, k, v, mask, *kv))
        if kv is not None:
            k_buf, v_buf, start = kv
            k_buf[:, :, start:start + T] = k
            v_buf[:, :, start:start + T] = v
            k = k_buf[:, :, :start + T].to(q.dtype)  # (B, Hkv, S, D)
            v = v_buf[:, :, :start + T].to(q.dtype)  # (B, Hkv, S, D)
        # SDPA's GQA path is only fast without a mask (flash); with a mask expand k/v instead of
        # falling back to the math kernel (the same rule as transformers' sdpa integration).
        gqa = mask is None
        if not gqa and self.n_heads != self.n_kv_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B,H,S,D)
        # mask None: T new tokens attend causally over themselves (no cache, or one decode step)
        # With the KV cache the key length changes every step, and on CUDA SDPA's cuDNN backend
        # then plans a new graph per call (measured on an H200: 19 ms of CPU per call, so 75 ms
        # per 4-layer decode step against 1.7 ms of GPU work), so cached attention uses the
        # other backends.
        cached = kv is not None and q.is_cuda
        with sdpa_kernel(_CACHED_BACKENDS) if cached else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=mask is None and T > 1,
                                               enable_gqa=gqa and self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


_CACHED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def static_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                            at: torch.Tensor) -> torch.Tensor:
    """One decode token against a whole preallocated cache (sage/models/decoding.py).

    q (B, H, 1, D), k/v (B, Hkv, 1, D); k_buf/v_buf (B, Hkv, S_max, D); at (1,) int64 on the
    device: the new k/v go to column `at` (index_copy_: no host sync, no shape that changes
    step to step, so a CUDA graph can replay it); mask (B, 1, 1, S_max) True = a written key.
    Grouped-query attention without expanding k/v: the H / Hkv query heads that share a KV head
    become that many queries of one head.   -> (B, 1, H * D)
    """
    B, H, _, D = q.shape
    Hkv = k_buf.shape[1]
    k_buf.index_copy_(2, at, k.to(k_buf.dtype))
    v_buf.index_copy_(2, at, v.to(v_buf.dtype))
    q = q.reshape(B, Hkv, H // Hkv, D)  # (B, Hkv, H/Hkv, D): head h = g * H/Hkv + r
    with sdpa_kernel(_CACHED_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q, k_buf.to(q.dtype), v_buf.to(q.dtype),
                                           attn_mask=mask)  # (B, Hkv, H/Hkv, D)
    return y.reshape(B, 1, H * D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None,
                kv: tuple[torch.Tensor, torch.Tensor, int | torch.Tensor] | None = None
                ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(nn.Module):
    """Llama-architecture causal LM (Yi-34B in InternVL2-40B)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False  # recompute each block in backward (training only)

    def init_weights(self) -> None:
        """N(0, 0.02) for linear and embedding weights, ones for the RMSNorm weights."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if self.cfg.tie_embeddings:  # to_empty() re-creates parameters one module at a time
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> KVCache:
        """Empty KVCache for max_len positions (prompt + new tokens); dtype/device default to
        the parameters' (generate passes the compute dtype). Each layer holds the KV heads its
        attention computes: all of them, or this rank's share under tensor parallelism."""
        p = self.embed_tokens.weight
        kw = dict(dtype=dtype or p.dtype, device=device or p.device)

        def buffer(layer: Block) -> torch.Tensor:
            shape = (batch_size, layer.self_attn.n_kv_heads, max_len, self.cfg.head_dim)
            return torch.zeros(shape, **kw)

        return KVCache([buffer(b) for b in self.layers], [buffer(b) for b in self.layers])

    def forward(self, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the next token at each new position.

        input_ids (B, T) or inputs_embeds (B, T, C) (exactly one); attention_mask (B, S),
        S = cache.length + T, 1 = real, 0 = pad, or a ready (B, 1, T, S) bool mask (True = may
        attend; a packed batch's own structure, position_ids then required); position_ids
        (B, T), default cumsum(attention_mask) - 1 (so left padding does not shift positions);
        cache is filled and advanced by T. logits_to_keep > 0 returns only the last that many
        positions; logits_at (B, T) bool only those positions, as rows (N, V) in row-major
        order (training needs logits at answer tokens only: at 40B the whole (B, T, 64k)
        would be the largest tensor of the step).
        -> logits (B, T, V) in the parameter dtype, or (N, V) with logits_at.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Llama.forward: pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"Llama.forward: cache holds {cache.max_len} positions, "
                             f"{start} used + {T} new")
        packed = attention_mask is not None and attention_mask.dim() == 4
        if packed and (position_ids is None or attention_mask.shape != (B, 1, T, start + T)):
            raise ValueError(f"Llama.forward: a (B, 1, T, S) mask {tuple(attention_mask.shape)} "
                             f"needs position_ids and S = cached + new = {start + T}")
        if not packed and attention_mask is not None and attention_mask.shape != (B, start + T):
            raise ValueError(f"Llama.forward: attention_mask shape {tuple(attention_mask.shape)}, "
                             f"expected (B, cached + new) = ({B}, {start + T})")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(start, start + T, device=x.device).expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        # No mask needed for an unpadded prompt from position 0 (SDPA is_causal) or for one
        # unpadded decode step; otherwise an explicit causal + padding mask.
        mask = attention_mask.bool() if packed else None
        if not packed and (attention_mask is not None or (start > 0 and T > 1)):
            if attention_mask is None:
                attention_mask = torch.ones(B, start + T, dtype=torch.long, device=x.device)
            mask = attention_mask_4d(attention_mask, T)  # (B, 1, T, S)
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i], start) if cache is not None else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, kv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv)  # (B, T, C)
        if cache is not None:
            cache.length = start + T
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        if logits_at is not None:
            x = x[logits_at]  # (N, C)
        return self.lm_head(self.norm(x))  # (B, T, V) or (N, V)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                 stop_ids: tuple[int, ...] = (), temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 pad_id: int = 0) -> torch.Tensor:
        """Autoregressive decoding, Eq. 10: p(Y_a | I, Y_q) = prod_t p(y_t | I, Y_q, Y_a,<t).

        Prompt: input_ids (B, T) or inputs_embeds (B, T, C), left padded with attention_mask
        (B, T). Each row stops after emitting any of stop_ids (the stop token is kept); later
        positions of a finished row are pad_id, and decoding ends early once all rows finish.
        use_cache=False recomputes the whole sequence each step (reference for the cache).
        -> new tokens (B, n_new), n_new <= max_new_tokens.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Llama.generate: pass exactly one of input_ids and inputs_embeds")
        prompt = input_ids if input_ids is not None else inputs_embeds
        B, T, device = prompt.shape[0], prompt.shape[1], prompt.device
        mask = (attention_mask.long() if attention_mask is not None
                else torch.ones(B, T, dtype=torch.long, device=device))  # (B, S)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cache = None
        if use_cache:  # in the compute dtype (bf16 under FSDP2 mixed precision, not fp32 masters)
            probe = inputs_embeds if input_ids is None else self.embed_tokens(input_ids[:, :1])
            cache = self.new_cache(B, T + max_new_tokens, dtype=probe.dtype, device=device)
        ids, embeds, out = input_ids, inputs_embeds, []
        for _ in range(max_new_tokens):
            logits = self(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, cache=cache,
                          logits_to_keep=1)[:, -1]  # (B, V)
            tok = sample_next_token(logits, temperature, top_p, generator)  # (B,)
            tok = tok.masked_fill(done, pad_id)
            out.append(tok)
            done = done | torch.isin(tok, stop)
            if len(out) == max_new_tokens or bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, S + 1)
            if use_cache:  # feed only the new token; the cache holds the rest
                ids, embeds = tok[:, None], None
            elif input_ids is not None:
                ids = torch.cat([ids, tok[:, None]], dim=1)  # (B, S + 1)
            else:
                new = self.embed_tokens(tok[:, None]).to(embeds.dtype)  # (B, 1, C)
                embeds = torch.cat([embeds, new], dim=1)  # (B, S + 1, C)
        if not out:
            return torch.empty(B, 0, dtype=torch.long, device=device)
        return torch.stack(out, dim=1)  # (B, n_new)

    # ------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "Llama":
        """Load a plain Hugging Face Llama directory (config.json + *.safetensors, keys
        `model.*`, `lm_head.weight`).

        Built on the meta device; sage.checkpoint.load_into checks every key and shape first,
        then materialises on `device` (default CPU) in `dtype` (default: the checkpoint's own,
        as sage.load_pretrained) and streams the tensors in. Returned in eval().
        """
        cfg = LLMConfig.from_pretrained(path)
        with torch.device("meta"):
            model = cls(cfg)
        load_into(model, path, LLAMA_KEY_MAP, dtype=dtype or checkpoint_dtype(path),
                  strict=True, device=device)
        return model.eval()
