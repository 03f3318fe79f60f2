"""Shared pytest fixtures: tiny configs and seeded generators.  Run: python -m pytest -q tests"""

import pytest
import torch

from sage.config import SageConfig


@pytest.fixture
def tiny_cfg() -> SageConfig:
    """The embedded CPU-sized model (docs/design.md §7)."""
    return SageConfig.preset("tiny")


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator seeded with 0; pass it to every random draw of a test."""
    return torch.Generator().manual_seed(0)


# One intra-op thread: on a shared 2-core machine, more threads make tiny models many times
# slower from contention (measured: ~15x for tiny generation), and CI runs on 2 cores.
torch.set_num_threads(1)
