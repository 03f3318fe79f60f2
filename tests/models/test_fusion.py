"""FusionAttention (Eq. 2) and the Eq. 9 head against hand-written references.
Run: python -m pytest -q tests/models/test_fusion.py"""

import math

import pytest
import torch
import torch.nn.functional as F

from sage.models.fusion import (FactProjection, FusionAttention, difference_features,
                                gather_tokens)


def _fusion(dim=16, heads=4, seed=0, **kw):
    torch.manual_seed(seed)
    f = FusionAttention(dim, heads, **kw)
    f.init_weights()
    for lin in (f.q_proj, f.k_proj, f.v_proj, f.o_proj):  # non-zero biases: they must be used
        torch.nn.init.normal_(lin.bias, std=0.1)
    return f


@pytest.mark.parametrize("norm", ["none", "pre"])
def test_fusion_matches_per_head_reference(norm):
    g = torch.Generator().manual_seed(0)
    f = _fusion(norm=norm)
    t_g, keys, values = (torch.randn(2, n, 16, generator=g) for n in (3, 5, 5))
    out = f(t_g, keys, values)
    # Eq. 2 written out head by head: softmax(q_h k_h^T / sqrt(D)) v_h, heads stacked, W_o;
    # "pre" LayerNorms (no parameters) the inputs of W_q and W_k, never the values
    pre = (lambda x: F.layer_norm(x, (16,))) if norm == "pre" else (lambda x: x)
    q, k, v = f.q_proj(pre(t_g)), f.k_proj(pre(keys)), f.v_proj(values)
    heads = []
    for h in range(4):
        s = slice(4 * h, 4 * h + 4)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(a @ v[..., s])
    ref = f.o_proj(torch.cat(heads, -1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert out.shape == (2, 3, 16)
    # the diagnostic weights are the same softmax
    a = f.attention(t_g, keys)  # (B, H, N, K)
    torch.testing.assert_close(a[0, 0], torch.softmax(
        q[0, :, :4] @ k[0, :, :4].T / 2, -1), atol=1e-6, rtol=0)
    assert a.shape == (2, 4, 3, 5)


def test_pre_norm_makes_attention_selective_at_init():
    """The audit of issue 16: pooled fact embeddings have norm ~0.2; with N(0, 0.02) weights
    and no normalisation the logits are ~1e-3 and attention is uniform (entropy = log K);
    pre-normalised q/k with fan-in weights give logits of unit scale."""
    g = torch.Generator().manual_seed(4)
    t_g = 0.2 * F.normalize(torch.randn(4, 8, 64, generator=g), dim=-1)
    keys = torch.randn(4, 16, 64, generator=g)
    from sage.diagnose import attention_entropy
    literal = attention_entropy(_fusion(64, 4, norm="none", init="small").attention(t_g, keys))
    pre = attention_entropy(_fusion(64, 4, norm="pre", init="fan_in").attention(t_g, keys))
    assert literal > 0.999 and pre < 0.95


def test_fusion_rejects_unknown_variants():
    with pytest.raises(ValueError, match="norm='post'"):
        FusionAttention(16, 4, norm="post")
    with pytest.raises(ValueError, match="init='xavier'"):
        FusionAttention(16, 4, init="xavier")


@pytest.mark.parametrize("init,std", [("fan_in", 1 / 16), ("small", 0.02)])
def test_fusion_init_std(init, std):
    f = _fusion(256, 4, init=init)
    assert f.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)


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
    head = FactProjection(8, init_std=0.0)
    head.init_weights()
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3))
    assert head(x).abs().max() == 0  # step 0: <FACT_CONTEXT> slots carry zeros
    (head(x) * x).sum().backward()
    assert head.fc.weight.grad.abs().sum() > 0  # but the weight receives a gradient


def test_small_head_init_lets_the_gradient_reach_the_fusion():
    """With a zero head every fusion parameter has a zero gradient at step 1 (issue 16);
    a small non-zero head passes it on."""
    g = torch.Generator().manual_seed(5)
    t_g, kv = torch.randn(2, 3, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    for std, moves in ((0.0, False), (1e-3, True)):
        torch.manual_seed(0)
        f, head = _fusion(), FactProjection(16, init_std=std)
        head.init_weights()
        (head(f(t_g, kv, kv)) * torch.randn(2, 3, 16, generator=g)).sum().backward()
        assert (f.q_proj.weight.grad.abs().sum() > 0) == moves
        assert head.fc.weight.std().item() == pytest.approx(std, rel=0.1, abs=1e-12)
    with pytest.raises(ValueError, match="init_std=-1"):
        FactProjection(8, init_std=-1)
