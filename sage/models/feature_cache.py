"""FeatureCache: a frozen InternViT's output per image tile, kept in host memory.

SFE trains the adapter, the fusion attention and the LLM; InternViT is frozen (docs/design.md
§2) and there is no augmentation, so a tile's visual features are the same every epoch. The
quickstart's 200 SFE steps ask for 9,600 tiles of 600 distinct images (SynthAD asks five
questions of each of its 300 test images, each with one reference), and the frozen encoder
was about a quarter of a step on 2 cores (docs/performance.md, "The vision caches").

The key is the tile's pixels themselves (a SHA-256 digest of its bytes, shape and dtype;
SHA-256 because CPUs hash it in hardware: 0.4 ms a 224-px tile here, BLAKE2b 1.2 ms), so
there is no file name or mtime to go stale: the same pixels give the same features as long as
the encoder's weights do not change, and a model with a trainable encoder never uses the cache
(SageModel.encode_images). Entries live on the CPU whatever the device (a tile of
InternViT-6B features, 256 x 12,800 bf16, is 6.5 MB; copying it back costs far less than the
encoder's forward) and are added until `max_bytes` is reached, then no more: no eviction, so
an epoch larger than the budget still hits on the part that fits instead of thrashing.

Under FSDP every rank must run the sharded encoder together (its forward all-gathers the
parameters) on batches of its own, so `agree` (sage.distributed.all_reduce_sum there) sums
the ranks' miss counts once per call, and when any rank misses each runs the encoder on its
own misses, possibly none. Without it each process decides alone: a whole model per process,
or the ranks of one tensor-parallel copy, which see the same batches and so miss together
(evaluate.py, the E-DPO reference pass with --tp).

    cache = FeatureCache(max_bytes=2 << 30, agree=all_reduce_sum)
    feats = cache(pixel_values, encode)  # encode: (n, 3, S, S) -> (n, T, D), called on misses
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

Agree = Callable[[torch.Tensor], torch.Tensor]  # a sum over the ranks that encode together


def tile_key(tile: torch.Tensor) -> bytes:
    """One CPU tile (3, S, S) -> a digest of its values, shape and dtype."""
    h = hashlib.sha256(f"{tuple(tile.shape)}{tile.dtype}".encode())
    h.update(tile.contiguous().view(torch.uint8).numpy())  # any dtype, bf16 too; no copy
    return h.digest()


class FeatureCache:
    """Encoder outputs by tile content; see the module docstring."""

    def __init__(self, max_bytes: int, agree: Agree | None = None):
        if max_bytes <= 0:
            raise ValueError(f"FeatureCache: max_bytes={max_bytes} must be > 0")
        self.max_bytes, self.agree = max_bytes, agree
        self.store: dict[bytes, torch.Tensor] = {}
        self.bytes = self.hits = self.misses = 0

    def __call__(self, pixels: torch.Tensor,
                 encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """pixels (n, 3, S, S) -> encode(pixels) (n, T, D), from the cache where it can."""
        if pixels.shape[0] == 0:
            raise ValueError("FeatureCache: no tiles to encode")
        keys = [tile_key(t) for t in pixels.detach().cpu()]  # one copy from the device
        # a tile twice in one batch (a reference shared by several questions) is encoded once
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self.store:
                first.setdefault(k, i)
        todo = list(first.values())  # in batch order
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        n = len(todo)
        if self.agree is not None:  # FSDP: every rank encodes when any misses, maybe no tiles
            n = int(self.agree(torch.tensor(float(n), device=pixels.device)).item())
        new: dict[bytes, torch.Tensor] = {}
        if n:
            out = encode(pixels[todo])  # (len(todo), T, D)
            for j, i in enumerate(todo):
                new[keys[i]] = out[j]
        for k, f in new.items():
            size = f.numel() * f.element_size()
            if self.bytes + size <= self.max_bytes:
                self.store[k] = f.detach().to("cpu", copy=True)
                self.bytes += size
        feats = [new[k] if k in new else self.store[k] for k in keys]
        return torch.stack([f.to(pixels.device) for f in feats])  # (n, T, D)

    def stats(self) -> str:
        """One line: tiles encoded of those asked for, entries and their size."""
        n = self.hits + self.misses
        rate = 100 * self.hits / n if n else 0.0
        return (f"vision cache: {self.misses} of {n} tiles encoded ({rate:.0f}% reused), "
                f"{len(self.store)} stored, {self.bytes / 2**20:.0f} MiB of "
                f"{self.max_bytes / 2**20:.0f}")


def attach_vision_cache(model, gib: float, agree: Agree | None) -> None:
    """`model.vision_cache` = a FeatureCache of `gib` GiB where gib > 0 (the scripts'
    --vision_cache_gb); `agree` as in the module docstring (all_reduce_sum for FSDP models)."""
    if gib > 0:
        model.vision_cache = FeatureCache(int(gib * 2**30), agree=agree)
