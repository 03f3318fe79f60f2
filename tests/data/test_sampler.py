"""ResumableDistributedSampler: deterministic epochs, disjoint rank shards, exact resume, the
same global batches at every world size.
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


def test_uneven_epochs_continue_into_the_next_and_drop_last():
    e0 = torch.randperm(5, generator=torch.Generator().manual_seed(0)).tolist()
    e1 = torch.randperm(5, generator=torch.Generator().manual_seed(1)).tolist()
    # 5 samples on 2 ranks: the 6th global sample is epoch 1's first, not a repeat of epoch 0
    assert [list(S(5, r, 2)) for r in range(2)] == [[e0[0], e0[2], e0[4]], [e0[1], e0[3], e1[0]]]
    drop = [list(S(5, r, 2, shuffle=False, drop_last=True)) for r in range(2)]
    assert drop == [[0, 2], [1, 3]]
    assert len(S(5, 0, 2)) == 3 and len(S(5, 0, 2, drop_last=True)) == 2


@pytest.mark.parametrize("n", [3, 5, 11])
def test_global_batches_do_not_depend_on_the_world_size(n):
    """Global batch k is stream positions [kB, (k+1)B) on 1, 2 or 4 ranks."""
    B, steps = 4, 5
    one = _stream(S(n, 0, 1, seed=2), B * steps)
    for world in (2, 4):
        per_rank = [_stream(S(n, r, world, seed=2), B * steps // world) for r in range(world)]
        for k in range(steps):
            got = sorted(x for r in range(world)
                         for x in per_rank[r][k * B // world:(k + 1) * B // world])
            assert got == sorted(one[k * B:(k + 1) * B]), (world, k)


def _take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_resume_gives_exactly_the_remaining_order_two_ranks():
    world, n, seed = 2, 11, 7
    # reference: an uninterrupted run over about 2.7 epochs
    ref = [_stream(S(n, r, world, seed), 15) for r in range(world)]
    assert set(ref[0][:6] + ref[1][:5]) == set(range(11))  # epoch 0 covers every sample
    # interrupted after 4 samples per rank (8 global); resume from the saved state
    for r in range(world):
        s = S(n, r, world, seed)
        head = _take(s, 4)
        state = s.state_dict()
        assert state["consumed"] == 8 and s.epoch == 0
        resumed = S(n, r, world, seed)
        resumed.load_state_dict(state)
        tail = _stream(resumed, 11)
        assert head + tail == ref[r]
    # set_position from the global count (e.g. step * global batch), here into epoch 1
    for r in range(world):
        s = S(n, r, world, seed)
        s.set_position(14)  # 7 per rank; global sample 14 is in epoch 1 (11 per epoch)
        assert (s.epoch, s.position) == (1, 7)
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
    with pytest.raises(ValueError, match="no 'consumed'"):
        s.load_state_dict({"epoch": 0, "position": 3, "seed": 1, "n": 10})
    with pytest.raises(ValueError, match="multiple of world=2"):
        s.set_position(3)
    with pytest.raises(ValueError, match="rank=2"):
        S(10, 2, 2)
