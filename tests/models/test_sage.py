"""SageModel: shapes and masks (single/multi-tile, zero/one-shot, facts fe/hard/none), gradient
routing, placeholder errors, cached vs uncached and batched vs one-by-one generation, the
vision feature cache (a frozen InternViT only, the same loss and gradients).
Run: python -m pytest -q tests/models/test_sage.py"""

import dataclasses

import pytest
import torch

from sage.config import LLMConfig, SageConfig, VisionConfig
from sage.data.collate import Collator
from sage.models.feature_cache import FeatureCache
from sage.models.sage import SageModel, masked_mean, split_by_tiles
from sage.tokenizer import Tokenizer

CORPUS = ["Is there a scratch on the washer?", "Yes. There is a scratch at the top-left.",
          "No. The capsule looks normal.", "Washers often show scratches and stains.",
          "A normal washer is a flat ring."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 20) + "\n")
    return Tokenizer.train(d / "corpus.txt", d / "tok", vocab_size=300)


def micro_cfg(tok, **kw) -> SageConfig:
    """56 px tiles, 14 px patches -> 4x4 patches -> 4 LLM tokens per tile."""
    return SageConfig(
        vision=VisionConfig(image_size=56, patch_size=14, dim=32, n_layers=2, n_heads=2,
                            ffn_dim=64),
        llm=LLMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=64, max_seq_len=512),
        n_facts=2, top_k=3, fusion_heads=2, max_fact_tokens=8, **kw)


def build(tok, seed=0, **kw) -> SageModel:
    torch.manual_seed(seed)
    model = SageModel(micro_cfg(tok, **kw))
    model.init_weights()
    if model.fact_proj is not None:  # built for facts_mode 'fe' only
        torch.nn.init.normal_(model.fact_proj.fc.weight, std=0.02)  # let t^s reach the LLM
    model.tokenizer = tok
    for p in model.vision.parameters():
        p.requires_grad_(False)
    return model


def example(i, gen, tiles=1, ref_tiles=1, one_shot=True):
    return {"id": f"ex{i}", "question": "Is there a scratch on the washer?" + " Yes." * i,
            "answers": ["Yes. There is a scratch.", "Yes.", "No.", "No. It is normal."],
            "facts": ["Washers often show scratches.", "A normal washer is a flat ring."],
            "pixel_test": torch.randn(tiles, 3, 56, 56, generator=gen),
            "pixel_ref": torch.randn(ref_tiles, 3, 56, 56, generator=gen) if one_shot else None}


@pytest.mark.parametrize("mode", ["fe", "hard", "none"])
@pytest.mark.parametrize("one_shot", [True, False])
def test_forward_shapes_all_modes(tok, gen, mode, one_shot):
    model = build(tok, facts_mode=mode)
    exs = [example(i, gen, one_shot=one_shot) for i in range(2)]
    batch = Collator(tok, model.cfg)(exs)
    logits, loss_sum, n_tok = model(batch)
    assert logits.shape == (*batch["input_ids"].shape, tok.vocab_size)
    assert (batch["input_ids"] == tok.fact_context_id).sum() == (4 if mode == "fe" else 0)
    assert (batch["input_ids"] == tok.img_context_id).sum() == 2 * 4
    assert torch.isfinite(loss_sum).all() and (n_tok > 0).all()


@pytest.mark.parametrize("comparison", ["test", "both"])
def test_multi_tile_images_and_mixed_tile_counts(tok, gen, comparison):
    model = build(tok, comparison=comparison)
    exs = [example(0, gen, tiles=3, ref_tiles=2), example(1, gen, tiles=1, ref_tiles=1)]
    batch = Collator(tok, model.cfg)(exs)
    assert (batch["input_ids"][0] == tok.img_context_id).sum() == 12  # 3 tiles x 4 tokens
    assert (batch["input_ids"][1] == tok.img_context_id).sum() == 4
    logits, loss_sum, _ = model(batch)
    # one by one gives the same loss: padding never enters selection or fusion
    for b, ex in enumerate(exs):
        _, alone, _ = model(Collator(tok, model.cfg)([ex]))
        torch.testing.assert_close(loss_sum[b], alone[0], atol=1e-4, rtol=1e-5)


def test_split_by_tiles_and_masked_mean():
    v = torch.arange(5 * 2 * 1, dtype=torch.float32).view(5, 2, 1)  # 5 tiles x 2 tokens
    padded, mask = split_by_tiles(v, torch.tensor([3, 2]))
    assert padded.shape == (2, 6, 1) and mask.sum(1).tolist() == [6, 4]
    assert padded[1, :4, 0].tolist() == [6, 7, 8, 9]
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(x, torch.tensor([[1, 1, 0]]))[0, 0] == 2.0
    assert masked_mean(x, torch.zeros(1, 3)).abs().sum() == 0  # all-pad sentence -> zeros


def test_gradients_reach_trainable_modules_not_frozen_vit(tok, gen):
    model = build(tok)
    batch = Collator(tok, model.cfg)([example(i, gen) for i in range(2)])
    _, loss_sum, _ = model(batch)
    loss_sum.sum().backward()
    for name in ("adapter.fc1.weight", "fusion.q_proj.weight", "fusion.k_proj.weight",
                 "fusion.v_proj.weight", "fact_proj.fc.weight", "llm.layers.0.mlp.up_proj.weight",
                 "llm.embed_tokens.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.vision.parameters())


def test_zero_shot_uses_all_test_tokens_as_keys_and_values(tok, gen):
    model = build(tok)
    batch = Collator(tok, model.cfg)([example(0, gen, one_shot=False)])
    seen = {}
    model.fusion.register_forward_hook(lambda m, a, o: seen.update(keys=a[1], values=a[2]))
    model(batch)
    v_t = model.encode_images(batch["pixel_test"])  # (1, 4, C)
    torch.testing.assert_close(seen["keys"], v_t)
    assert seen["values"] is seen["keys"]


@pytest.mark.parametrize("values", ["difference", "test"])
def test_comparison_both_adds_the_reference_patches_least_matched_in_the_test(tok, gen, values):
    """comparison 'both': keys = Eq. 1's K one-way differences, then K from the reference
    side, each test minus reference; a reference token the test lacks is the first chosen."""
    one, both = (build(tok, comparison=c, fusion_values=values) for c in ("test", "both"))
    both.load_state_dict(one.state_dict())
    batch = Collator(tok, one.cfg)([example(i, gen) for i in range(2)])
    v = one.encode_images(batch["pixel_test"])
    t_g, k1, v1, _ = one.fusion_inputs(v, batch)
    t_g2, k2, v2, mask = both.fusion_inputs(v, batch)
    K = one.cfg.top_k
    assert k2.shape == (2, 2 * K, k1.shape[-1]) and mask is None
    torch.testing.assert_close(k2[:, :K], k1)
    torch.testing.assert_close(v2[:, :K], v1)
    v_t, v_r = v, one.encode_images(batch["pixel_ref"])  # 1 tile each: (2, 4, C)
    r_idx, _, t_nn = one.select(v_r, v_t, torch.ones(2, 4, dtype=torch.bool),
                                torch.ones(2, 4, dtype=torch.bool))
    for b in range(2):
        torch.testing.assert_close(k2[b, K:], v_t[b, t_nn[b]] - v_r[b, r_idx[b]])
        torch.testing.assert_close(v2[b, K:], k2[b, K:] if values == "difference"
                                   else v_t[b, t_nn[b]])
    # a test that lacks reference token 2 (token 3 drawn in its place, the rest the same):
    # every test token has its exact match (one way sees nothing), the other way finds it
    v_r1 = torch.randn(1, 4, 8, generator=gen)
    v_t1 = v_r1[:, [0, 1, 3, 3]]
    _, s_fwd, _ = one.select(v_t1, v_r1, torch.ones(1, 4, dtype=torch.bool),
                             torch.ones(1, 4, dtype=torch.bool))
    r_idx1, _, _ = one.select(v_r1, v_t1, torch.ones(1, 4, dtype=torch.bool),
                              torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(s_fwd, torch.ones_like(s_fwd))
    assert r_idx1[0, 0] == 2


def test_placeholder_count_mismatch_is_a_clear_error(tok, gen):
    model = build(tok)
    batch = Collator(tok, model.cfg)([example(0, gen)])
    batch["input_ids"][0, (batch["input_ids"][0] == tok.img_context_id).nonzero()[0]] = 5
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        model(batch)
    bad = build(tok, facts_mode="none")
    with pytest.raises(ValueError, match="FACT_CONTEXT"):
        bad(Collator(tok, dataclasses.replace(bad.cfg, facts_mode="fe"))([example(0, gen)]))


def test_generation_cache_and_batching(tok, gen):
    model = build(tok).eval()
    exs = [example(i, gen) for i in range(3)]  # different question lengths -> left padding
    collate = Collator(tok, model.cfg, for_generation=True)
    batch = collate(exs)
    cached = model.generate(batch, max_new_tokens=6)
    uncached = model.generate(batch, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, uncached)
    static = model.generate(batch, max_new_tokens=6, decode="static")  # sage.models.decoding
    decoder = model.static_decoder
    assert torch.equal(static, cached) and decoder is not None
    assert torch.equal(model.generate(batch, max_new_tokens=6, decode="static"), cached)
    assert model.static_decoder is decoder  # the same batch size reuses its buffers
    with pytest.raises(ValueError, match="decode='fast'"):
        model.generate(batch, max_new_tokens=6, decode="fast")
    for b, ex in enumerate(exs):
        alone = model.generate(collate([ex]), max_new_tokens=6)[0]
        n = alone.shape[0]
        assert torch.equal(cached[b, :n], alone), b


@pytest.mark.parametrize("mode", ["fe", "none"])
def test_answer_only_logits_give_the_same_loss(tok, gen, mode):
    model = build(tok, facts_mode=mode)
    batch = Collator(tok, model.cfg)([example(i, gen) for i in range(2)])
    logits, full, n_full = model(batch)
    none, rows, n_rows = model(batch, answer_only=True)
    assert none is None and logits.shape[:2] == batch["input_ids"].shape
    torch.testing.assert_close(rows, full, atol=1e-5, rtol=1e-5)
    assert n_rows.tolist() == n_full.tolist()


def test_packed_edpo_rows_equal_one_sequence_per_answer(tok, gen):
    """A packed row (prompt once, answers as segments) gives each answer exactly the loss of
    its own prompt + answer sequence."""
    from sage.data.collate import EDPOCollator

    model = build(tok)
    exs = [example(i, gen, tiles=1 + i) for i in range(2)]
    ranks = [[0, 1, 2, 3], [1, 3]]
    packed = EDPOCollator(tok, model.cfg).pack(exs, ranks)
    _, loss, n_tok = model(packed, answer_only=True)
    plain = Collator(tok, model.cfg)
    want = torch.cat([model(plain.build([ex] * len(r), [ex["answers"][k] for k in r]))[1]
                      for ex, r in zip(exs, ranks)])
    assert loss.shape == (6,) and packed["seq_ranks"].tolist() == [0, 1, 2, 3, 1, 3]
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert (n_tok > 0).all()


def test_sage_model_with_a_frozen_vit_same_loss_and_gradients(tok, gen):
    plain, cached = build(tok), build(tok)
    cached.vision_cache = FeatureCache(max_bytes=1 << 20)
    exs = [example(i, gen) for i in range(3)]
    exs[2]["pixel_ref"] = exs[0]["pixel_ref"]  # a reference shared by two questions
    batch = Collator(tok, plain.cfg)(exs)
    for step in range(2):  # the second pass: every tile from the cache
        grads = []
        for m in (plain, cached):
            m.zero_grad()
            _, loss, _ = m(batch)
            loss.sum().backward()
            grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and "adapter.fc1.weight" in grads[1]
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)
    assert (cached.vision_cache.misses, len(cached.vision_cache.store)) == (5, 5)  # 3 test, 2 ref


def test_sage_model_with_a_trainable_vit_ignores_the_cache(tok, gen):
    model = build(tok)
    for p in model.vision.parameters():
        p.requires_grad_(True)
    model.vision_cache = FeatureCache(max_bytes=1 << 20)
    _, loss, _ = model(Collator(tok, model.cfg)([example(0, gen)]))
    loss.sum().backward()
    assert not model.vision_cache.store and model.vision.embeddings.patch_embedding.weight.grad \
        is not None
