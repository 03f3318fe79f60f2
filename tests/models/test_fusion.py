"""FusionAttention (Eq. 2) and the Eq. 9 head against hand-written references.
Run: python -m pytest -q tests/models/test_fusion.py"""

import math

import torch

from sage.models.fusion import (FactProjection, FusionAttention, difference_features,
                                gather_tokens)


def _fusion(dim=16, heads=4, seed=0):
    torch.manual_seed(seed)
    f = FusionAttention(dim, heads)
    f.init_weights()
    for lin in (f.q_proj, f.k_proj, f.v_proj, f.o_proj):  # non-zero biases: they must be used
        torch.nn.init.normal_(lin.bias, std=0.1)
    return f


def test_fusion_matches_per_head_reference():
    g = torch.Generator().manual_seed(0)
    f = _fusion()
    t_g, keys, values = (torch.randn(2, n, 16, generator=g) for n in (3, 5, 5))
    out = f(t_g, keys, values)
    # Eq. 2 written out head by head: softmax(q_h k_h^T / sqrt(D)) v_h, heads stacked, W_o
    q, k, v = f.q_proj(t_g), f.k_proj(keys), f.v_proj(values)
    heads = []
    for h in range(4):
        s = slice(4 * h, 4 * h + 4)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(a @ v[..., s])
    ref = f.o_proj(torch.cat(heads, -1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert out.shape == (2, 3, 16)


def test_key_mask_equals_dropping_the_keys():
    g = torch.Generator().manual_seed(1)
    f = _fusion()
    t_g, kv = torch.randn(1, 3, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    mask = torch.tensor([[True, True, True, True, False, False]])
    torch.testing.assert_close(f(t_g, kv, kv, key_mask=mask), f(t_g, kv[:, :4], kv[:, :4]),
                               atol=1e-6, rtol=0)


def test_difference_features_gather_and_gradient():
    g = torch.Generator().manual_seed(2)
    v_t = torch.randn(2, 5, 3, generator=g, requires_grad=True)
    v_r = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    idx, ref_idx = torch.tensor([[4, 0], [2, 2]]), torch.tensor([[1, 3], [0, 1]])
    v_d, v_sel = difference_features(v_t, v_r, idx, ref_idx)
    torch.testing.assert_close(v_sel[1, 0], v_t[1, 2])
    torch.testing.assert_close(v_d[0, 1], v_t[0, 0] - v_r[0, 3])
    v_d.sum().backward()
    # gradients reach exactly the gathered rows: token 2 of sample 1 was picked twice
    assert v_t.grad[1, 2].eq(2).all() and v_t.grad[1, 0].eq(0).all()
    assert v_r.grad[0, 1].eq(-1).all() and v_r.grad[0, 0].eq(0).all()
    assert gather_tokens(v_t, idx).shape == (2, 2, 3)


def test_projection_head_starts_at_zero_and_learns():
    head = FactProjection(8)
    head.init_weights()
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3))
    assert head(x).abs().max() == 0  # step 0: <FACT_CONTEXT> slots carry zeros
    (head(x) * x).sum().backward()
    assert head.fc.weight.grad.abs().sum() > 0  # but the weight receives a gradient
