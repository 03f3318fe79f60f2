"""sage.reference: equal batch counts on every rank (padding), the cache's provenance check
(fingerprint, refusal naming each difference), atomic save.
Run: python -m pytest -q tests/test_reference.py"""

import json

import pytest

from sage.reference import (cache_meta, fingerprint, load_cache, padded_share, ref_key,
                            save_cache)


def test_padded_share_gives_every_rank_the_same_batches():
    # 3 records, 2 ranks, batch 1: ceil(3/2) = 2 per rank -> rank 0 (0, 1), rank 1 (2, pad)
    assert padded_share(3, 0, 2, 1) == [[0], [1]]
    assert padded_share(3, 1, 2, 1) == [[2], [-1]]
    # 5 records over 2 ranks in batches of 2: 3 each -> 2 batches each
    assert padded_share(5, 0, 2, 2) == [[0, 1], [2, -1]]
    assert padded_share(5, 1, 2, 2) == [[3, 4], [-1, -1]]
    # fewer records than ranks: the last ranks only pad, with as many forwards as the rest
    assert padded_share(1, 0, 4, 3) == [[0, -1, -1]]
    assert padded_share(1, 3, 4, 3) == [[-1, -1, -1]]
    assert padded_share(0, 0, 2, 4) == []
    for n in range(0, 12):
        for world in (1, 2, 3, 8):
            shares = [padded_share(n, r, world, 2) for r in range(world)]
            assert len({len(s) for s in shares}) == 1  # same number of forwards
            real = sorted(i for s in shares for b in s for i in b if i >= 0)
            assert real == list(range(n))  # every record exactly once


def checkpoint_dir(tmp_path, payload: bytes):
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(payload)
    return d


def test_fingerprint_follows_the_weights(tmp_path):
    d = checkpoint_dir(tmp_path, b"x" * 100)
    a = fingerprint(d)
    assert fingerprint(d) == a
    checkpoint_dir(tmp_path, b"x" * 99 + b"y")
    assert fingerprint(d) != a
    big = b"0" * (3 << 20)  # past 2 MiB only the first and last MiB are read
    checkpoint_dir(tmp_path, big)
    b = fingerprint(d)
    checkpoint_dir(tmp_path, big[:-1] + b"1")
    assert fingerprint(d) != b


def test_cache_refused_when_made_from_other_inputs(tmp_path):
    d = checkpoint_dir(tmp_path, b"w" * 10)
    data = tmp_path / "split.jsonl"
    data.write_text('{"id": "r1"}\n')
    meta = cache_meta(d, data, ["one-shot"], None)
    path = tmp_path / "ref.json"
    assert load_cache(path, meta) is None  # absent: compute it
    save_cache(path, meta, {ref_key("r1", "one-shot", 0): -1.5})
    assert load_cache(path, meta) == {"r1|one-shot|0": -1.5}
    assert not list(tmp_path.glob("*.tmp"))
    other = cache_meta(d, data, ["one-shot", "zero-shot"], 256)
    with pytest.raises(ValueError, match=r"settings: cache \['one-shot'\], now \['one-shot', "
                                         r"'zero-shot'\]; max_len: cache None, now 256"):
        load_cache(path, other)
    checkpoint_dir(tmp_path, b"v" * 10)  # another checkpoint at the same path
    with pytest.raises(ValueError, match="init: cache"):
        load_cache(path, cache_meta(d, data, ["one-shot"], None))
    path.write_text(json.dumps({"r1|one-shot|0": -1.5}))  # an old cache without provenance
    with pytest.raises(ValueError, match="no 'meta'"):
        load_cache(path, meta)
