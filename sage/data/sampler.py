"""A distributed sampler that resumes at the exact next sample (DESIGN §2 resumable training).

Epoch e's global order is `torch.randperm(n)` from a generator seeded with seed + e (or
0..n-1 without shuffling), padded by wrapping around (drop_last=False) or cut (drop_last=True)
to a multiple of `world`; rank r takes positions r, r + world, r + 2*world, ... Iterating
yields the rest of the current epoch from `position` and then moves on to the next epoch, so
`for x in sampler` once is one epoch and a second loop continues with the next.

`position` counts this rank's samples of the current epoch. The sampler advances it while
yielding; a DataLoader with prefetching runs ahead of training, so before saving, the training
loop calls `set_position(samples_consumed_global)` with the number of samples all ranks have
actually trained on since the start (all epochs), which fixes (epoch, position) exactly.

    sampler = ResumableDistributedSampler(len(ds), rank, world, seed=0)
    sampler.load_state_dict(ckpt["sampler"])    # or sampler.set_position(step * global_batch)
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Deterministic per-epoch shuffling split across ranks, resumable mid-epoch."""

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        if n <= 0:
            raise ValueError(f"ResumableDistributedSampler: n={n} samples, need at least 1")
        if not 0 <= rank < world:
            raise ValueError(f"ResumableDistributedSampler: rank={rank} not in [0, world={world})")
        if drop_last and n < world:
            raise ValueError(f"ResumableDistributedSampler: drop_last with n={n} < world={world} "
                             "leaves no samples")
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.position = 0, 0

    @property
    def num_samples(self) -> int:
        """Samples per rank per epoch."""
        return self.n // self.world if self.drop_last else -(-self.n // self.world)

    @property
    def global_epoch_size(self) -> int:
        """Samples per epoch over all ranks (after padding or dropping)."""
        return self.num_samples * self.world

    def global_order(self, epoch: int) -> list[int]:
        """All ranks' sample indices of `epoch`, before the split by rank."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        size = self.global_epoch_size
        while len(order) < size:  # wrap around to pad (like DistributedSampler)
            order += order[:size - len(order)]
        return order[:size]

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices of `epoch`, in order."""
        return self.global_order(epoch)[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        while self.position < len(indices):
            i = indices[self.position]
            self.position += 1
            yield i
        self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning."""
        self.epoch, self.position = epoch, 0

    def set_position(self, samples_consumed_global: int) -> None:
        """Resume after `samples_consumed_global` samples trained on by all ranks together since
        the start of training (all epochs); must be a multiple of world."""
        if samples_consumed_global % self.world:
            raise ValueError(f"set_position({samples_consumed_global}): must be a multiple of "
                             f"world={self.world} (every rank takes one sample per round)")
        self.epoch, rest = divmod(samples_consumed_global, self.global_epoch_size)
        self.position = rest // self.world

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "world": self.world, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restore (epoch, position); the order-defining fields must match this sampler."""
        for key in ("seed", "n", "world", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state: key '{key}' is {state[key]!r} in the checkpoint "
                                 f"but {getattr(self, key)!r} now; the sample order would differ")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
