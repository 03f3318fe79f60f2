"""ResumableDistributedSampler: deterministic epochs, disjoint rank shards, exact mid-epoch resume.
Run: python -m pytest -q tests/data/test_sampler.py"""

import pytest
import torch

from sage.data.sampler import ResumableDistributedSampler as S


def test_epochs_are_seeded_permutations_split_by_rank():
    a, b = S(10, 0, 2, seed=3), S(10, 1, 2, seed=3)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert list(a) == order[0::2] and list(b) == order[1::2]  # epoch 0
    # iterating again continues with epoch 1 (seed + 1)
    order1 = torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()
    assert list(a) == order1[0::2] and a.epoch == 2
    assert list(S(5, 0, 1, shuffle=False)) == [0, 1, 2, 3, 4]


def test_padding_and_drop_last():
    pad = [list(S(5, r, 2, shuffle=False)) for r in range(2)]
    assert pad == [[0, 2, 4], [1, 3, 0]]  # wrapped around to 6 = 3 per rank
    drop = [list(S(5, r, 2, shuffle=False, drop_last=True)) for r in range(2)]
    assert drop == [[0, 2], [1, 3]]
    assert len(S(5, 0, 2)) == 3 and len(S(5, 0, 2, drop_last=True)) == 2


def _take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_resume_gives_exactly_the_remaining_order_two_ranks():
    world, n, seed = 2, 11, 7
    # reference: an uninterrupted run over 2.5 epochs (6 samples per rank per epoch)
    ref = [_stream(S(n, r, world, seed), 15) for r in range(world)]
    assert set(ref[0][:6] + ref[1][:6]) == set(range(11))  # epoch 0 covers every sample
    # interrupted after 4 samples per rank (8 global); resume from the saved state
    for r in range(world):
        s = S(n, r, world, seed)
        head = _take(s, 4)
        state = s.state_dict()
        assert state["epoch"] == 0 and state["position"] == 4
        resumed = S(n, r, world, seed)
        resumed.load_state_dict(state)
        tail = _stream(resumed, 11)
        assert head + tail == ref[r]
    # set_position from the global count (e.g. step * global batch), here into epoch 1
    for r in range(world):
        s = S(n, r, world, seed)
        s.set_position(14)  # 12 per epoch (6 per rank): epoch 1, position 1
        assert (s.epoch, s.position) == (1, 1)
        assert _stream(s, 8) == ref[r][7:15]


def _stream(sampler, k):
    out = []
    while len(out) < k:
        out += list(sampler)
    return out[:k]


def test_state_mismatch_and_bad_args():
    s = S(10, 0, 2, seed=1)
    with pytest.raises(ValueError, match="key 'seed'"):
        s.load_state_dict({**S(10, 0, 2, seed=2).state_dict()})
    with pytest.raises(ValueError, match="multiple of world=2"):
        s.set_position(3)
    with pytest.raises(ValueError, match="rank=2"):
        S(10, 2, 2)
