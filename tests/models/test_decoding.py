"""Static-shape decoding (sage/models/decoding.py) against Llama.generate and the dynamic KV
cache: the same logits and tokens (padding, stops, sampling), the buffers' limits, reuse by
SageModel.generate, and on a GPU the CUDA graph against the eager step.
Run: python -m pytest -q tests/models/test_decoding.py"""

import pytest
import torch

from sage.config import LLMConfig
from sage.models.decoding import StaticDecoder
from sage.models.llama import Llama

# GQA (4 query heads on 2 KV heads), Yi's rope_theta; logits of random weights spread enough
# that fp32 rounding cannot flip a greedy token
CFG = LLMConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                norm_eps=1e-5, rope_theta=5e6, max_seq_len=256, tie_embeddings=False)


def model(seed: int = 0, device: str = "cpu") -> Llama:
    torch.manual_seed(seed)
    m = Llama(CFG).to(device)
    m.init_weights()
    for p in m.parameters():  # larger logits than N(0, 0.02): decisive greedy choices
        p.data.mul_(4.0) if p.dim() == 2 else None
    return m.eval()


def prompt(gen: torch.Generator, B: int = 3, T: int = 9):
    """Random ids with rows left padded by 0, 3 and 5 tokens."""
    ids = torch.randint(3, CFG.vocab_size, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, pad in enumerate([0, 3, 5][:B]):
        mask[b, :pad] = 0
    return ids, mask


def test_step_logits_equal_the_dynamic_cache(gen):
    m = model()
    ids, mask = prompt(gen)
    dec = StaticDecoder(m, 3, 9 + 6, torch.float32, "cpu", bucket=8)
    assert dec.max_len == 16  # rounded up to the bucket
    cache = m.new_cache(3, 9 + 6)
    with torch.no_grad():
        want = m(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
        got = dec.prefill(ids, attention_mask=mask)
        for _ in range(5):
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
            tok = want.argmax(-1)  # (B,)
            mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
            want = m(input_ids=tok[:, None], attention_mask=mask, cache=cache,
                     logits_to_keep=1)[:, -1]
            got = dec.step(tok)
    assert dec.length == cache.length == 14


def test_generate_equals_llama_generate_with_stops_and_early_end(gen):
    m = model()
    ids, mask = prompt(gen)
    free = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12)  # (3, 12)
    # stop on row 0's 3rd and row 2's 6th token: row 1 runs on, so the end is not early
    stops = (int(free[0, 2]), int(free[2, 5]))
    want = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, stop_ids=stops,
                      pad_id=1)
    dec = StaticDecoder(m, 3, 21, torch.float32, "cpu")
    for check_every in (1, 5, 8):
        got = dec.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                           stop_ids=stops, pad_id=1, check_every=check_every)
        assert torch.equal(got, want), (check_every, got, want)
    assert (want[0, 3:] == 1).all()  # padded after its stop
    # every row stopping early (all on their first token): one token, whatever check_every
    first = tuple(int(t) for t in free[:, 0])
    want = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, stop_ids=first)
    got = dec.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, stop_ids=first)
    assert want.shape == (3, 1) and torch.equal(got, want)


def test_generate_from_embeddings_with_sampling(gen):
    m = model(1)
    ids, mask = prompt(gen, B=2)
    embeds = m.embed_tokens(ids).detach()
    kw = dict(attention_mask=mask, max_new_tokens=10, temperature=0.8, top_p=0.9)
    want = m.generate(inputs_embeds=embeds, generator=torch.Generator().manual_seed(3), **kw)
    dec = StaticDecoder(m, 2, 19, torch.float32, "cpu")
    got = dec.generate(inputs_embeds=embeds, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(got, want)
    # a decoder is reusable: a second, shorter prompt in the same buffers
    ids2, mask2 = prompt(gen, B=2, T=4)
    assert dec.fits(2, 4 + 10, torch.float32, torch.device("cpu"), cuda_graph=False)
    assert torch.equal(dec.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=10),
                       m.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=10))


def test_limits_and_errors(gen):
    m = model()
    ids, mask = prompt(gen)
    dec = StaticDecoder(m, 3, 10, torch.float32, "cpu", bucket=1)
    with pytest.raises(ValueError, match="do not fit 10 positions"):
        dec.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert dec.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2).shape == (3, 2)
    dec.prefill(ids, attention_mask=mask)
    dec.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="are full"):
        dec.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt batch 2"):
        dec.prefill(ids[:2])
    with pytest.raises(ValueError, match="exactly one"):
        dec.generate()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        StaticDecoder(m, 1, 8, torch.float32, "cpu", cuda_graph=True)
    assert not dec.fits(3, 10, torch.float32, torch.device("cpu"), cuda_graph=True)
    assert not dec.fits(3, 11, torch.float32, torch.device("cpu"), cuda_graph=False)
    assert not dec.fits(2, 10, torch.float32, torch.device("cpu"), cuda_graph=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_the_eager_step(dtype):
    g = torch.Generator().manual_seed(0)
    m = model(device="cuda").to(dtype)
    ids, mask = (t.cuda() for t in prompt(g))
    kw = dict(attention_mask=mask, max_new_tokens=24, stop_ids=(5,))
    graphed = StaticDecoder(m, 3, 40, dtype, "cuda", cuda_graph=True)
    got = graphed.generate(input_ids=ids, **kw)
    eager = StaticDecoder(m, 3, 40, dtype, "cuda").generate(input_ids=ids, **kw)
    assert torch.equal(got, eager)  # the same kernels, replayed
    if dtype == torch.float32:  # and the dynamic cache's answers (other attention kernels)
        assert torch.equal(got, m.generate(input_ids=ids, **kw))
    again = graphed.generate(input_ids=ids, **kw)  # the graph is replayed, not re-recorded
    assert torch.equal(again, got)
