"""FeatureCache: a frozen InternViT's output per image tile, kept in host memory.

SFE trains the adapter, the fusion attention and the LLM; InternViT is frozen (docs/design.md
§2) and there is no augmentation, so a tile's visual features are the same every epoch. The
quickstart's 200 SFE steps ask for 9,600 tiles of 600 distinct images (SynthAD asks five
questions of each of its 300 test images, each with one reference), and the frozen encoder
was about a quarter of a step on 2 cores (docs/performance.md, "The vision caches").

The key is the tile's pixels themselves (a BLAKE2b digest of its bytes, shape and dtype), so
there is no file name or mtime to go stale: the same pixels give the same features as long as
the encoder's weights do not change, and a model with a trainable encoder never uses the cache
(SageModel.encode_images). Entries live on the CPU whatever the device (a tile of
InternViT-6B features, 256 x 12,800 bf16, is 6.5 MB; copying it back costs far less than the
encoder's forward) and are added until `max_bytes` is reached, then no more: no eviction, so
an epoch larger than the budget still hits on the part that fits instead of thrashing.

Under FSDP every rank must run the sharded encoder together (its forward all-gathers the
parameters) on batches of its own, so with `sync` the ranks agree on whether any of them
misses (one all-reduce per call) and each runs the encoder on its own misses, possibly none.
Without it each process decides alone: a whole model per process, or the ranks of one
tensor-parallel copy, which see the same batches and so miss together (evaluate.py, the
E-DPO reference pass with --tp).

    cache = FeatureCache(max_bytes=2 << 30, sync=True)
    feats = cache(pixel_values, encode)  # encode: (n, 3, S, S) -> (n, T, D), called on misses
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.distributed as td


def tile_key(tile: torch.Tensor) -> bytes:
    """One CPU tile (3, S, S) -> a 16-byte digest of its values, shape and dtype."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(tile.shape)}{tile.dtype}".encode())
    h.update(tile.contiguous().view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return h.digest()


def any_rank(n: int, device: torch.device) -> int:
    """The largest n over the ranks of the default process group (n itself without one)."""
    if not (td.is_available() and td.is_initialized() and td.get_world_size() > 1):
        return n
    t = torch.tensor([n], device=device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return int(t.item())


class FeatureCache:
    """Encoder outputs by tile content; see the module docstring."""

    def __init__(self, max_bytes: int, sync: bool = False):
        if max_bytes <= 0:
            raise ValueError(f"FeatureCache: max_bytes={max_bytes} must be > 0")
        self.max_bytes, self.sync = max_bytes, sync
        self.store: dict[bytes, torch.Tensor] = {}
        self.bytes = self.hits = self.misses = 0

    def __call__(self, pixels: torch.Tensor,
                 encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """pixels (n, 3, S, S) -> encode(pixels) (n, T, D), from the cache where it can."""
        if pixels.shape[0] == 0:
            raise ValueError("FeatureCache: no tiles to encode")
        keys = [tile_key(t) for t in pixels.detach().cpu()]  # one copy from the device
        # a tile twice in one batch (a reference shared by several questions) is encoded once
        first = {k: i for i, k in reversed(list(enumerate(keys))) if k not in self.store}
        todo = sorted(first.values())
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        new: dict[bytes, torch.Tensor] = {}
        if any_rank(len(todo), pixels.device) if self.sync else todo:  # FSDP: every rank
            # encodes, with no tiles if need be
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


def attach_vision_cache(model, gib: float, sync: bool) -> None:
    """`model.vision_cache` = a FeatureCache of `gib` GiB where gib > 0 (the scripts'
    --vision_cache_gb); `sync` as in the module docstring (True for FSDP-sharded models)."""
    if gib > 0:
        model.vision_cache = FeatureCache(int(gib * 2**30), sync=sync)
