"""A distributed sampler that resumes at the exact next sample and gives every world size the
same global batches (docs/design.md §2, resumable training).

The samples form one endless global stream: epoch e is `torch.randperm(n)` from a generator
seeded with seed + e (or 0..n-1 without shuffling), epochs follow each other without padding,
and rank r takes stream positions r, r + world, r + 2 world, ... So the k-th global batch
(positions k B .. (k + 1) B - 1) holds the same samples on 1 rank as on 8, whatever n is: an
epoch that does not divide by the world continues into the next one instead of repeating
samples (torch's DistributedSampler pads by wrapping around, so 3 records on 2 ranks train on
a duplicate that one process never sees). With drop_last each epoch is cut to a multiple of
world first.

Iterating yields `num_samples` (one epoch's share) and the next loop continues the stream.
`position` counts this rank's samples since the start (all epochs); the training loop may call
`set_position(samples_consumed_global)` to resume after exactly that many global samples.

    sampler = ResumableDistributedSampler(len(ds), rank, world, seed=0)
    sampler.load_state_dict(ckpt["sampler"])    # or sampler.set_position(step * global_batch)
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Deterministic per-epoch shuffling, one global stream split across ranks, resumable."""

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
        self.position = 0  # this rank's samples since the start
        self._orders: dict[int, list[int]] = {}

    @property
    def epoch_size(self) -> int:
        """Samples per epoch in the global stream (n, or cut to a multiple of world)."""
        return self.n - self.n % self.world if self.drop_last else self.n

    @property
    def num_samples(self) -> int:
        """Samples per rank per epoch (rounded up: the last round reaches into the next)."""
        return -(-self.epoch_size // self.world)

    @property
    def epoch(self) -> int:
        """The epoch of the next global sample this rank's round starts at."""
        return self.position * self.world // self.epoch_size

    def global_order(self, epoch: int) -> list[int]:
        """All ranks' sample indices of `epoch` in stream order."""
        if epoch not in self._orders:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.n, generator=g).tolist()
            else:
                order = list(range(self.n))
            self._orders = {epoch: order[:self.epoch_size]}  # one epoch cached at a time
        return self._orders[epoch]

    def sample_at(self, p: int) -> int:
        """The sample at global stream position p."""
        epoch, offset = divmod(p, self.epoch_size)
        return self.global_order(epoch)[offset]

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.num_samples):
            i = self.sample_at(self.position * self.world + self.rank)
            self.position += 1
            yield i

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Continue from the first round at or after the start of `epoch`."""
        self.position = -(-epoch * self.epoch_size // self.world)

    def set_position(self, samples_consumed_global: int) -> None:
        """Resume after `samples_consumed_global` samples trained on by all ranks together since
        the start of training (all epochs); must be a multiple of world."""
        if samples_consumed_global % self.world:
            raise ValueError(f"set_position({samples_consumed_global}): must be a multiple of "
                             f"world={self.world} (every rank takes one sample per round)")
        self.position = samples_consumed_global // self.world

    def state_dict(self) -> dict:
        return {"consumed": self.position * self.world, "seed": self.seed, "n": self.n,
                "world": self.world, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restore the stream position; the order-defining fields must match this sampler."""
        keys = ("seed", "n", "shuffle", "drop_last") + (("world",) if self.drop_last else ())
        for key in keys:  # without drop_last the stream does not depend on the world size
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state: key '{key}' is {state[key]!r} in the checkpoint "
                                 f"but {getattr(self, key)!r} now; the sample order would differ")
        if "consumed" not in state:
            raise ValueError("sampler state: no 'consumed' count (a checkpoint of the earlier "
                             "per-epoch padded sampler); resume it with the code that wrote it")
        self.set_position(int(state["consumed"]))
