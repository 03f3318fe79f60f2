"""InternViT blocks vs hand-written references, whole model vs transformers' InternVLVisionModel,
position interpolation, select_layer, 6B meta parameter count, published key names.
Run: python -m pytest -q tests/models/test_intern_vit.py"""

import dataclasses
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from sage.config import SageConfig, VisionConfig
from sage.models.intern_vit import (InternViT, InternViTAttention, InternViTBlock, drop_path,
                                    interpolate_pos_embed)

try:  # the independent reference (test-only extra); imported here so no test pays the import
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
    from transformers.models.internvl.modeling_internvl import InternVLVisionModel
except ImportError:
    InternVLVisionModel = None
needs_hf = pytest.mark.skipif(InternVLVisionModel is None, reason="transformers internvl missing")

ATOL = 1e-5  # fp32


def small_cfg(**kw) -> VisionConfig:
    """2 blocks, width 32, 4 heads; 224 px / 14 px patches = a 16 x 16 grid."""
    base = dict(image_size=224, patch_size=14, dim=32, n_layers=2, n_heads=4, ffn_dim=64,
                norm_type="rms_norm", norm_eps=1e-6, use_qk_norm=True, qkv_bias=False)
    return VisionConfig(**{**base, **kw})


LN_KW = dict(norm_type="layer_norm", use_qk_norm=False, qkv_bias=True)  # the 300M variant


@torch.no_grad()
def randomize(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Random weights everywhere: norm weights and layer scales around 1, others around 0,
    so that no parameter can be silently ignored by an implementation."""
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=gen)
        around_one = name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ls1", "ls2"))
        p.copy_(1 + 0.2 * r if around_one else 0.2 * r)
    return model.eval()


def build(cfg: VisionConfig, gen: torch.Generator) -> InternViT:
    return randomize(InternViT(cfg), gen)


# ----------------------------------------------------------------------------- blocks


def reference_attention(x, wqkv, wq_norm, wk_norm, wproj, bproj, n_heads, eps, per_head=False):
    """Plain-tensor InternViT-6B attention: RMSNorm over the FULL q/k width, then split heads.
    per_head=True normalises each head's D channels instead (the wrong reading, for contrast)."""
    b, t, c = x.shape
    d = c // n_heads
    q, k, v = (x @ wqkv.T).split(c, dim=-1)  # 3 x (B, T, C)
    w = d if per_head else c  # width of the RMS statistics
    q, k = (z.reshape(b, t, c // w, w) for z in (q, k))  # (B, T, C/w, w)
    q = (q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + eps)).reshape(b, t, c) * wq_norm
    k = (k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + eps)).reshape(b, t, c) * wk_norm
    q, k, v = (z.reshape(b, t, n_heads, d).permute(0, 2, 1, 3) for z in (q, k, v))  # (B,H,T,D)
    a = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)  # (B, H, T, T)
    o = (a @ v).permute(0, 2, 1, 3).reshape(b, t, c)  # (B, T, C)
    return o @ wproj.T + bproj


def test_attention_qk_norm_full_width_matches_reference(gen):
    cfg = small_cfg()
    attn = randomize(InternViTAttention(cfg), gen)
    x = torch.randn(2, 7, cfg.dim, generator=gen)
    args = (attn.qkv.weight, attn.q_norm.weight, attn.k_norm.weight, attn.proj.weight,
            attn.proj.bias, cfg.n_heads, cfg.norm_eps)
    with torch.no_grad():
        out = attn(x)
        ref = reference_attention(x, *args)
        wrong = reference_attention(x, *args, per_head=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert (out - wrong).abs().max() > 1e-3  # a per-head qk-norm would be caught


def test_attention_without_qk_norm_has_no_norm_params():
    attn = InternViTAttention(small_cfg(**LN_KW))
    assert sorted(n for n, _ in attn.named_parameters()) == [
        "proj.bias", "proj.weight", "qkv.bias", "qkv.weight"]


def test_layer_scale(gen):
    cfg = small_cfg()
    blk = randomize(InternViTBlock(cfg), gen)
    x = torch.randn(2, 5, cfg.dim, generator=gen)
    with torch.no_grad():
        blk.ls1.zero_(), blk.ls2.zero_()
        torch.testing.assert_close(blk(x), x, atol=0, rtol=0)  # both branches scaled away
        gamma = torch.randn(cfg.dim, generator=gen)
        blk.ls1.copy_(gamma)  # now y - x = gamma_1 * Attn(norm1(x)), MLP branch still off
        torch.testing.assert_close(blk(x) - x, gamma * blk.attn(blk.norm1(x)), atol=ATOL, rtol=0)
        blk.ls2.copy_(gamma)  # full block: h = x + g*Attn(n1(x)); y = h + g*MLP(n2(h))
        h = x + gamma * blk.attn(blk.norm1(x))
        torch.testing.assert_close(blk(x), h + gamma * blk.mlp(blk.norm2(h)), atol=ATOL, rtol=0)


def test_drop_path_identity_in_eval_and_per_sample_in_training(gen):
    cfg = small_cfg()
    blk = randomize(InternViTBlock(cfg, drop_path=0.5), gen)
    x = torch.randn(64, 3, cfg.dim, generator=gen)
    with torch.no_grad():
        y_eval = blk.eval()(x)
        blk.drop_path_rate = 0.0
        torch.testing.assert_close(y_eval, blk(x), atol=0, rtol=0)
    # training: each sample's branch is either dropped (0) or kept and scaled by 1 / (1 - p)
    torch.manual_seed(0)
    branch = torch.randn(64, 3, cfg.dim, generator=gen)
    out = drop_path(branch, 0.5, training=True)
    kept = (out != 0).flatten(1).all(1)
    dropped = (out == 0).flatten(1).all(1)
    assert bool((kept | dropped).all()) and 10 < int(kept.sum()) < 54
    torch.testing.assert_close(out[kept], 2 * branch[kept], atol=0, rtol=0)
    # the model's rates grow linearly from 0 to drop_path_rate
    vit = InternViT(small_cfg(n_layers=5, drop_path_rate=0.2))
    rates = [b.drop_path_rate for b in vit.encoder["layers"]]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_layer_norm_variant_block_matches_reference(gen):
    cfg = small_cfg(**LN_KW, norm_eps=1e-5)
    blk = randomize(InternViTBlock(cfg), gen)
    assert isinstance(blk.norm1, torch.nn.LayerNorm) and blk.norm1.bias is not None
    x = torch.randn(2, 5, cfg.dim, generator=gen)
    a, m = blk.attn, blk.mlp
    n1 = F.layer_norm(x, (cfg.dim,), blk.norm1.weight, blk.norm1.bias, 1e-5)
    q, k, v = (n1 @ a.qkv.weight.T + a.qkv.bias).split(cfg.dim, -1)
    q, k, v = (z.reshape(2, 5, 4, 8).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
    o = (torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v).transpose(1, 2).reshape(2, 5, 32)
    h = x + blk.ls1 * (o @ a.proj.weight.T + a.proj.bias)
    n2 = F.layer_norm(h, (cfg.dim,), blk.norm2.weight, blk.norm2.bias, 1e-5)
    gelu = lambda z: 0.5 * z * (1 + torch.erf(z / 2**0.5))  # exact GELU  # noqa: E731
    ref = h + blk.ls2 * (gelu(n2 @ m.fc1.weight.T + m.fc1.bias) @ m.fc2.weight.T + m.fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- whole model


def to_hf(vit: InternViT) -> "InternVLVisionModel":
    """Same weights in transformers' InternVLVisionModel (its names; qkv split in three)."""
    c = vit.cfg
    hf_cfg = InternVLVisionConfig(
        hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        intermediate_size=c.ffn_dim, attention_bias=c.qkv_bias, use_qk_norm=c.use_qk_norm,
        norm_type=c.norm_type, layer_norm_eps=c.norm_eps, image_size=c.image_size,
        patch_size=c.patch_size, hidden_act="gelu", use_mean_pooling=True,  # no final norm
        attn_implementation="eager")
    hf = InternVLVisionModel(hf_cfg).eval()
    ren = {"embeddings.class_embedding": "embeddings.cls_token",
           "embeddings.position_embedding": "embeddings.position_embeddings",
           "embeddings.patch_embedding": "embeddings.patch_embeddings.projection",
           "encoder.layers": "encoder.layer", "attn.proj": "attention.projection_layer",
           "attn.": "attention.", "ls1": "lambda_1", "ls2": "lambda_2",
           "norm1": "layernorm_before", "norm2": "layernorm_after"}
    sd = {}
    for k, v in vit.state_dict().items():
        for a, b in ren.items():
            k = k.replace(a, b)
        if ".qkv." in k:  # published qkv rows are [q; k; v]
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                sd[k.replace("qkv", f"{name}_proj")] = part
        else:
            sd[k] = v
    hf.load_state_dict(sd, strict=True)
    return hf


@needs_hf
@pytest.mark.parametrize("variant", ["rms_norm", "layer_norm"])
def test_matches_transformers_internvl_vision(gen, variant):
    cfg = small_cfg(**(LN_KW if variant == "layer_norm" else {}))
    vit = build(cfg, gen)
    hf = to_hf(vit)
    for size in (224, 168):  # configured resolution, then interpolated positions (12 x 12)
        x = torch.randn(2, 3, size, size, generator=gen)
        with torch.no_grad():
            ours = vit(x)
            theirs = hf(x, output_hidden_states=True)
        assert ours.shape == (2, 1 + (size // 14) ** 2, cfg.dim)
        torch.testing.assert_close(ours, theirs.last_hidden_state, atol=ATOL, rtol=0)
        with torch.no_grad():  # every hidden state: [embeddings, block 1, block 2]
            for i, h in enumerate(theirs.hidden_states):
                torch.testing.assert_close(vit(x, select_layer=i), h, atol=ATOL, rtol=0)


def test_interpolate_pos_embed_noop_and_resolution(gen):
    pos = torch.randn(1, 1 + 16 * 16, 8, generator=gen)
    torch.testing.assert_close(interpolate_pos_embed(pos, 16, 16), pos, atol=1e-6, rtol=0)
    small = interpolate_pos_embed(pos, 12, 12)  # 168 px on a 224 px config
    assert small.shape == (1, 1 + 144, 8)
    torch.testing.assert_close(small[:, 0], pos[:, 0], atol=0, rtol=0)  # CLS position kept
    # a constant field stays constant under bicubic resampling (weights sum to 1)
    const = torch.ones(1, 1 + 256, 8)
    torch.testing.assert_close(interpolate_pos_embed(const, 12, 20), torch.ones(1, 241, 8),
                               atol=1e-6, rtol=0)
    # bf16 in, bf16 out; the resampling itself ran in fp32
    ref = interpolate_pos_embed(pos.bfloat16().float(), 12, 12).bfloat16()
    assert torch.equal(interpolate_pos_embed(pos.bfloat16(), 12, 12), ref)


def test_model_other_resolution_uses_interpolated_positions(gen):
    vit = build(small_cfg(), gen)
    x = torch.randn(1, 3, 168, 168, generator=gen)
    with torch.no_grad():
        emb = vit(x, select_layer=0)  # the embeddings only
        patches = vit.embeddings.patch_embedding(x).flatten(2).transpose(1, 2)  # (1, 144, C)
        pos = interpolate_pos_embed(vit.embeddings.position_embedding, 12, 12)
    torch.testing.assert_close(emb[:, 1:], patches + pos[:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(emb[:, 0], vit.embeddings.class_embedding[:, 0] + pos[:, 0],
                               atol=ATOL, rtol=0)


def test_select_layer_runs_only_needed_blocks(gen):
    vit = build(small_cfg(n_layers=3), gen)
    calls = []
    for i, blk in enumerate(vit.encoder["layers"]):
        blk.register_forward_hook(lambda *_, i=i: calls.append(i))
    x = torch.randn(1, 3, 224, 224, generator=gen)
    with torch.no_grad():
        last, second_last = vit(x), vit(x, select_layer=-2)
        assert calls == [0, 1, 2, 0, 1]
        torch.testing.assert_close(vit(x, select_layer=3), last, atol=0, rtol=0)
        torch.testing.assert_close(vit(x, select_layer=2), second_last, atol=0, rtol=0)
        torch.testing.assert_close(vit.encoder["layers"][2](second_last), last, atol=0, rtol=0)
    assert (last - second_last).abs().max() > 1e-2
    for bad in (4, -5):
        with pytest.raises(ValueError, match="select_layer"):
            vit(x, select_layer=bad)


def test_grad_checkpointing_same_output_and_grads(gen):
    vit = build(small_cfg(image_size=56), gen).train()
    x = torch.randn(2, 3, 56, 56, generator=gen)
    vit(x).square().sum().backward()
    ref = [p.grad.clone() for p in vit.parameters()]
    vit.zero_grad()
    vit.grad_checkpointing = True
    vit(x).square().sum().backward()
    for g, p in zip(ref, vit.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)


def test_init_weights_fills_everything():
    cfg = small_cfg(**LN_KW, layer_scale_init=0.1)
    with torch.device("meta"):
        vit = InternViT(cfg)
    vit.to_empty(device="cpu")
    torch.manual_seed(0)
    vit.init_weights()
    sd = vit.state_dict()
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert torch.equal(sd["encoder.layers.1.ls2"], torch.full((32,), 0.1))
    assert torch.equal(sd["encoder.layers.0.norm1.weight"], torch.ones(32))
    assert torch.equal(sd["encoder.layers.0.attn.qkv.bias"], torch.zeros(96))
    assert 0.01 < sd["embeddings.position_embedding"].std() < 0.03


def test_internvit_6b_meta_parameter_count():
    cfg = SageConfig.preset("internvl2-40b").vision
    with torch.device("meta"):
        vit = InternViT(cfg)
    params = list(vit.parameters())
    assert all(p.is_meta for p in params)  # nothing allocated
    assert sum(p.numel() for p in params) == 5_536_496_000  # docs/design.md §5
    assert vit.embeddings.position_embedding.shape == (1, 1025, 3200)


# ----------------------------------------------------------------------------- published keys


def published_keys(n_layers: int, layer_norm: bool = False) -> set:
    keys = {"embeddings.class_embedding", "embeddings.patch_embedding.weight",
            "embeddings.patch_embedding.bias", "embeddings.position_embedding"}
    for i in range(n_layers):
        per_layer = ["attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "ls1", "ls2",
                     "norm1.weight", "norm2.weight", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias"]
        if layer_norm:  # InternViT-300M: LayerNorm biases and a qkv bias, no qk-norm
            per_layer += ["norm1.bias", "norm2.bias", "attn.qkv.bias"]
        else:  # InternViT-6B: RMSNorm weights only, qk-norm over the full width
            per_layer += ["attn.q_norm.weight", "attn.k_norm.weight"]
        keys |= {f"encoder.layers.{i}.{k}" for k in per_layer}
    return keys


def test_state_dict_keys_equal_published_layout():
    assert set(InternViT(small_cfg()).state_dict()) == published_keys(2)
    assert set(InternViT(small_cfg(**LN_KW)).state_dict()) == published_keys(2, layer_norm=True)


@pytest.mark.skipif(importlib.util.find_spec("sage.checkpoint") is None,
                    reason="sage.checkpoint (helper 'ckpt') not there yet")
def test_from_pretrained_roundtrip(gen, tmp_path):
    from safetensors.torch import save_file

    cfg = small_cfg(image_size=56)
    vit = build(cfg, gen)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    hf_config = {  # InternVisionConfig keys as a published plain InternViT config.json has them
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "image_size": 56, "patch_size": 14, "num_channels": 3, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "layer_norm_eps": 1e-6, "qk_normalization": True, "qkv_bias": False,
        "initializer_factor": 0.1, "initializer_range": 1e-10, "drop_path_rate": 0.0,
        "hidden_act": "gelu", "use_flash_attn": False, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    loaded = InternViT.from_pretrained(tmp_path)
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(cfg)
    assert not loaded.training
    x = torch.randn(1, 3, 56, 56, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), vit(x), atol=0, rtol=0)
    bf = InternViT.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    # strict: a checkpoint without one published key is refused, naming the key
    sd = {k: v for k, v in vit.state_dict().items() if k != "encoder.layers.1.attn.k_norm.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="encoder.layers.1.attn.k_norm.weight"):
        InternViT.from_pretrained(tmp_path)
