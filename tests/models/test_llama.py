"""Llama decoder vs transformers' LlamaForCausalLM, padding, KV cache, generation, loading.
Run: python -m pytest -q tests/models/test_llama.py"""

import json
import math

import pytest
import torch

from sage.config import LLMConfig, SageConfig
from sage.models.llama import KVCache, Llama, RMSNorm, attention_mask_4d, sample_next_token

transformers = pytest.importorskip("transformers")  # test-only reference, imported once


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: intra-op threads only add overhead (10x on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# Tiny GQA config (4 query heads share 2 kv heads), Yi's rope_theta, untied head.
CFG = LLMConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                norm_eps=1e-5, rope_theta=5e6, max_seq_len=256, tie_embeddings=False)
# Published-style config.json of that model (Yi/Llama keys as transformers 4.x wrote them).
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 96, "rms_norm_eps": 1e-5,
    "rope_theta": 5e6, "rope_scaling": None, "max_position_embeddings": 256,
    "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
}


@pytest.fixture(scope="module")
def hf():
    """transformers' model with seeded random weights, eager attention (independent of SDPA).
    initializer_range 0.2 (not 0.02) so next-token distributions are peaked and greedy argmax
    is far from ties."""
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5, rope_theta=5e6,
        max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
        attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # never stop early: compare fixed lengths
    model.generation_config.pad_token_id = 0
    return model


def hf_state_dict(hf_model) -> dict:
    """transformers' keys -> ours: strip the `model.` prefix (docs/design.md §5), lm_head
    unchanged."""
    return {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def llm(hf):
    model = Llama(CFG).eval()
    model.load_state_dict(hf_state_dict(hf), strict=True)
    return model


def ids_of(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, CFG.vocab_size, shape, generator=g)


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask


# ----------------------------------------------------------------------------- numerics


def test_logits_match_transformers(hf, llm):
    ids = ids_of(1, 2, 12)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = llm(input_ids=ids)
    assert out.shape == (2, 12, CFG.vocab_size)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_inputs_embeds_and_explicit_positions(hf, llm):
    ids = ids_of(2, 1, 9)
    # positions with gaps (a pure shift would not show: RoPE scores depend on differences)
    pos = torch.tensor([[0, 2, 3, 7, 8, 9, 15, 16, 40]])
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos).logits
        out = llm(inputs_embeds=llm.embed_tokens(ids), position_ids=pos)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="exactly one"):
        llm(input_ids=ids, inputs_embeds=llm.embed_tokens(ids))


def test_rmsnorm_bf16_matches_transformers():
    # fp32 statistics, cast back to bf16 *before* the weight: bit-identical to HF
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    ref = transformers.models.llama.modeling_llama.LlamaRMSNorm(64, eps=1e-5)
    ours = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        w = 1 + 0.1 * torch.randn(64, generator=g)
        ref.weight.copy_(w), ours.weight.copy_(w)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)


def test_attention_mask_4d_hand_worked():
    # one row, left pad of 1, S = 3 keys, last 2 queries; True = may attend
    # query 1: pad key 0 masked, key 2 in the future; query 2: keys 1 and 2
    m = attention_mask_4d(torch.tensor([[0, 1, 1]]), n_new=2)
    expect = torch.tensor([[False, True, False], [False, True, True]])
    assert m.shape == (1, 1, 2, 3) and torch.equal(m[0, 0], expect)
    # a pad query with no real key before it still sees itself (no fully masked row -> no NaN)
    m = attention_mask_4d(torch.tensor([[0, 0, 1]]), n_new=3)
    assert torch.equal(m[0, 0].diagonal(), torch.ones(3, dtype=torch.bool))


def test_left_padding_matches_unpadded(llm):
    rows = [ids_of(10, 12), ids_of(11, 7), ids_of(12, 3)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = llm(input_ids=ids, attention_mask=mask)
        assert torch.isfinite(out).all(), "fully masked pad rows must not produce NaN"
        for i, r in enumerate(rows):
            ref = llm(input_ids=r[None])[0]
            torch.testing.assert_close(out[i, -len(r):], ref, atol=1e-5, rtol=0)


def test_cached_forward_matches_full(llm):
    ids = ids_of(4, 2, 14)
    with torch.no_grad():
        full = llm(input_ids=ids)
        cache = llm.new_cache(2, 16)
        assert isinstance(cache, KVCache) and cache.k[0].shape == (2, 2, 16, 16)
        parts = [llm(input_ids=ids[:, :8], cache=cache)]  # prefill
        parts += [llm(input_ids=ids[:, t:t + 1], cache=cache) for t in range(8, 11)]  # decode
        parts.append(llm(input_ids=ids[:, 11:], cache=cache))  # a 3-token chunk after a cache
        assert cache.length == 14
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="cache holds 16"):
            llm(input_ids=ids[:, :3], cache=cache)


# ----------------------------------------------------------------------------- generation


def test_greedy_cache_equals_recompute_equals_transformers(hf, llm):
    ids = ids_of(5, 1, 6)
    a = llm.generate(ids, max_new_tokens=10, use_cache=True)
    b = llm.generate(ids, max_new_tokens=10, use_cache=False)
    with torch.no_grad():
        ref = hf.generate(ids, do_sample=False, max_new_tokens=10)[:, 6:]
    assert a.shape == (1, 10) and a.dtype == torch.long
    assert torch.equal(a, b) and torch.equal(a, ref), (a, b, ref)
    assert len(set(a[0].tolist())) > 1  # a non-degenerate sequence


def test_batched_left_padded_equals_one_by_one_and_transformers(hf, llm):
    rows = [ids_of(20, 8), ids_of(21, 5), ids_of(22, 2)]
    ids, mask = left_pad(rows)
    singles = [llm.generate(r[None], max_new_tokens=8)[0] for r in rows]
    out = llm.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(out, torch.stack(singles))
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
    assert torch.equal(out, ref[:, ids.shape[1]:])
    # the same from inputs_embeds, with and without the cache
    emb = llm.embed_tokens(ids).detach()
    for use_cache in (True, False):
        e = llm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=8,
                         use_cache=use_cache)
        assert torch.equal(e, out), use_cache


def test_stop_ids_per_row(llm):
    rows = [ids_of(20, 8), ids_of(21, 5)]
    ids, mask = left_pad(rows)
    free = llm.generate(ids, attention_mask=mask, max_new_tokens=8)
    # a token that row 0 emits after its first step and row 1 never emits
    stop = next(t for t in free[0, 1:].tolist() if t not in free[1].tolist())
    out = llm.generate(ids, attention_mask=mask, max_new_tokens=8, stop_ids=(stop,), pad_id=0)
    first = free[0].tolist().index(stop)
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])  # stop token kept
    assert (out[0, first + 1:] == 0).all()  # then padded
    assert torch.equal(out[1], free[1])  # the other row runs to max_new_tokens
    # all rows stopped -> generation ends early
    both = llm.generate(ids, attention_mask=mask, max_new_tokens=8,
                        stop_ids=(int(free[0, 0]), int(free[1, 0])))
    assert both.shape == (2, 1)


def test_sampling_seeded_and_top_p(llm):
    ids = ids_of(6, 2, 5)

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return llm.generate(ids, max_new_tokens=12, temperature=1.5, generator=g, **kw)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))  # 24 draws at temperature 1.5
    greedy = llm.generate(ids, max_new_tokens=12)
    assert torch.equal(sample(0, top_p=1e-6), greedy)  # nucleus of one token = argmax


def test_sample_next_token_nucleus_hand_worked():
    # p = (0.5, 0.3, 0.2); mass of better tokens = (0, 0.5, 0.8); top_p 0.6 drops only token 2,
    # leaving (0.5, 0.3) -> renormalised (0.625, 0.375)
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(4000, 3)
    g = torch.Generator().manual_seed(0)
    tok = sample_next_token(logits, temperature=1.0, top_p=0.6, generator=g)
    assert (tok != 2).all()
    assert abs((tok == 0).float().mean().item() - 0.625) < 0.03  # binomial sd ~0.008
    assert torch.equal(sample_next_token(logits[:2]), torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- build / init


def test_meta_build_of_yi_34b_is_free_and_exact():
    cfg = SageConfig.preset("internvl2-40b").llm
    assert cfg.vocab_size == 64000
    with torch.device("meta"):
        model = Llama(cfg)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)  # nothing allocated
    assert sum(p.numel() for p in params) == 34_388_917_248  # docs/design.md §5


def test_init_weights_after_meta_build():
    cfg = LLMConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                    tie_embeddings=True)
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert model.lm_head.weight is model.embed_tokens.weight  # tie survives to_empty
    w = model.layers[0].mlp.gate_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(model.norm.weight, torch.ones(64))
    assert torch.equal(model.layers[1].post_attention_layernorm.weight, torch.ones(64))
    assert sum(p.numel() for p in model.parameters()) == 256 * 64 + 2 * (
        64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64  # tied: embedding counted once


def test_grad_checkpointing_same_gradients(hf):
    model = Llama(CFG)
    model.load_state_dict(hf_state_dict(hf))
    model.train()
    ids = ids_of(7, 2, 10)
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        model(input_ids=ids).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- from_pretrained


def _write_hf_dir(directory, state: dict, n_shards: int) -> None:
    """save_pretrained-style directory: config.json + one safetensors file, or n shards
    with model.safetensors.index.json."""
    from safetensors.torch import save_file

    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    state = {k: v.contiguous() for k, v in state.items()}
    if n_shards == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(state)
    per = math.ceil(len(keys) / n_shards)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("n_shards", [1, 3])
def test_from_pretrained_matches_transformers(hf, tmp_path, n_shards):
    _write_hf_dir(tmp_path, hf.state_dict(), n_shards)
    model = Llama.from_pretrained(tmp_path)
    assert model.cfg == CFG and not model.training
    assert model.lm_head.weight.dtype == torch.float32  # the checkpoint's dtype
    ids = ids_of(8, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids), hf(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)
    half = Llama.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(half.lm_head.weight, hf.lm_head.weight.to(torch.bfloat16),
                               atol=0, rtol=0)


def test_from_pretrained_reads_transformers_save_pretrained(hf, llm, tmp_path):
    # transformers 5 writes `rope_parameters` (not `rope_theta`) into config.json
    hf.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, with the index json
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = Llama.from_pretrained(tmp_path)
    assert model.cfg == CFG
    for (k, a), b in zip(model.state_dict().items(), llm.state_dict().values()):
        assert torch.equal(a, b), k


def test_from_pretrained_errors(hf, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(tmp_path)
    state = dict(hf.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    _write_hf_dir(tmp_path, state, n_shards=1)
    with pytest.raises(ValueError, match=r"(?s)missing.*layers\.1\.mlp\.up_proj\.weight"):
        Llama.from_pretrained(tmp_path)


def test_transformers_loads_our_export(llm, tmp_path):
    """Round trip: sage.export.save_pretrained(layout="llama") -> LlamaForCausalLM."""
    from sage.export import save_pretrained

    save_pretrained(llm, tmp_path / "out", layout="llama")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out",
                                                        attn_implementation="eager")
    ids = ids_of(9, 1, 7)
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, llm(input_ids=ids), atol=1e-4,
                                   rtol=0)
    back = Llama.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                  llm.state_dict().values()))


def test_logits_at_and_a_ready_4d_mask(llm):
    ids = ids_of(3, 2, 9)
    with torch.no_grad():
        full = llm(ids)  # (2, 9, V)
        at = torch.zeros(2, 9, dtype=torch.bool)
        at[0, [2, 5]], at[1, 8] = True, True
        torch.testing.assert_close(llm(ids, logits_at=at), full[at])  # (3, V), row-major
        # the causal mask written out + explicit positions = the default path
        causal = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9)
        pos = torch.arange(9).expand(2, 9)
        torch.testing.assert_close(llm(ids, attention_mask=causal, position_ids=pos), full,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs position_ids"):
        llm(ids, attention_mask=causal)
