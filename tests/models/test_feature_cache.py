"""FeatureCache: the encoder's own output for every tile, the encoder run on misses only (a
tile repeated in a batch once), the memory budget (SageModel's use of it: tests/models/
test_sage.py). Run: python -m pytest -q tests/models/test_feature_cache.py"""

import pytest
import torch

from sage.models.feature_cache import FeatureCache, tile_key


class Encoder:
    """A deterministic stand-in for InternViT: (n, 3, S, S) -> (n, 2, 3), recording its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x):
        self.calls.append(x.shape[0])
        return torch.stack([x.mean((1, 2, 3)), x.amax((1, 2, 3)), x.amin((1, 2, 3))], -1
                           ).unsqueeze(1).expand(-1, 2, -1) * torch.tensor([1.0, 2.0])[:, None]


def test_tile_key_follows_values_shape_and_dtype():
    a = torch.zeros(3, 4, 4)
    assert tile_key(a) == tile_key(a.clone())
    b = a.clone()
    b[1, 2, 3] = 1e-7
    assert tile_key(b) != tile_key(a)
    assert tile_key(a.reshape(3, 2, 8)) != tile_key(a)
    assert tile_key(a.double()) != tile_key(a)
    c = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert tile_key(c) == tile_key(c.clone()) != tile_key(c.float())


def test_encodes_each_new_tile_once_and_returns_the_encoders_output():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 3, 4, 4, generator=g)
    enc, cache = Encoder(), FeatureCache(max_bytes=1 << 20)
    first = torch.stack([t[0], t[1], t[0], t[2]])  # tile 0 twice
    torch.testing.assert_close(cache(first, enc), enc(first), atol=0, rtol=0)
    assert enc.calls[0] == 3  # tile 0 once (the second call is the check's own)
    enc.calls.clear()
    second = torch.stack([t[2], t[3], t[1], t[4], t[3]])
    torch.testing.assert_close(cache(second, enc), enc(second), atol=0, rtol=0)
    assert enc.calls[0] == 2  # tiles 3 and 4 only
    enc.calls.clear()
    cache(torch.stack([t[4], t[0]]), enc)
    assert enc.calls == []  # everything cached: the encoder does not run
    assert (cache.hits, cache.misses, len(cache.store)) == (1 + 3 + 2, 3 + 2, 5)
    assert "5 of 11 tiles encoded" in cache.stats()
    with pytest.raises(ValueError, match="no tiles"):
        cache(t[:0], enc)


def test_stops_storing_at_the_budget_and_stays_exact():
    t = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    enc = Encoder()
    one = enc(t[:1]).numel() * 4  # bytes of one tile's features (fp32)
    cache = FeatureCache(max_bytes=2 * one)
    torch.testing.assert_close(cache(t[:4], enc), enc(t[:4]), atol=0, rtol=0)
    assert len(cache.store) == 2 and cache.bytes == 2 * one
    enc.calls.clear()
    torch.testing.assert_close(cache(t, enc), enc(t), atol=0, rtol=0)
    assert enc.calls[0] == 4 and len(cache.store) == 2  # t[2:] again: not stored, re-encoded
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(0)
