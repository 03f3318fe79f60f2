"""sage.plan: the per-rank memory plan (phases, accumulation) against hand counts and the
peaks measured on an H200 (docs/performance.md)."""

import dataclasses

import pytest

from sage.config import SageConfig
from sage.plan import GIB, count_params, format_plan, plan_memory


def slice_cfg(llm_layers: int = 2, vit_layers: int = 1) -> SageConfig:
    """The 40B-width slice of `python -m sage.tools.bench.train_step`."""
    base = SageConfig.preset("internvl2-40b")
    return dataclasses.replace(
        base, vision=dataclasses.replace(base.vision, n_layers=vit_layers),
        llm=dataclasses.replace(base.llm, n_layers=llm_layers))


def test_total_is_state_plus_the_larger_phase():
    cfg = slice_cfg()
    p = plan_memory(cfg, world=1, gpu_gib=139, micro_batch=2, activation_checkpointing=False)
    n = count_params(cfg)
    trainable = n["adapter"] + n["llm"] + n["fusion"] + n["fact_proj"]
    unit = max(n["llm_block"], n["embed"], n["vit_block"])
    state = (4 + 8) * trainable + 2 * n["vision"] + 4 * unit  # master + moments + frozen + x2
    grads = 4 * trainable + 6 * unit
    T, m = 2 * 2048, cfg.llm
    forward = cfg.llm.n_layers * T * (34 * m.dim + 5 * m.ffn_dim) + 8 * T * m.vocab_size
    assert grads > forward  # without accumulation the gradient reduction is the peak here
    assert p.total == pytest.approx((state + grads) / GIB)
    assert p.phases["gradient reduction"] == pytest.approx(grads / GIB)
    assert p.phases["forward / backward"] == pytest.approx(forward / GIB)


def test_accumulation_keeps_gradients_alive_during_the_forward():
    cfg = slice_cfg()
    one = plan_memory(cfg, world=1, gpu_gib=139, micro_batch=4, activation_checkpointing=False)
    four = plan_memory(cfg, world=1, gpu_gib=139, micro_batch=4, activation_checkpointing=False,
                       accumulation=4)
    extra = four.phases["forward / backward"] - one.phases["forward / backward"]
    assert extra == pytest.approx(one.phases["gradient reduction"])
    assert four.total == pytest.approx(one.total - max(one.phases.values())
                                       + four.phases["forward / backward"])
    assert "[accumulation 4]" in format_plan(four)
    with pytest.raises(ValueError, match="accumulation=0"):
        plan_memory(cfg, accumulation=0)


@pytest.mark.parametrize("micro_batch,ac,measured", [(2, False, 40.17), (2, True, 40.17),
                                                     (4, False, 40.84)])
def test_plan_within_10_percent_of_the_h200_peaks(micro_batch, ac, measured):
    # torch.cuda.max_memory_allocated of `python -m sage.tools.bench.train_step` (one rank, bf16
    # FSDP2, AdamW), H200, 2026-11-30; see docs/performance.md
    p = plan_memory(slice_cfg(), world=1, gpu_gib=139, micro_batch=micro_batch,
                    activation_checkpointing=ac)
    assert abs(measured / p.total - 1) < 0.10


def test_40b_sfe_suggests_an_option_that_fits():
    p = plan_memory(SageConfig.preset("internvl2-40b"), world=8, gpu_gib=80,
                    activation_checkpointing=False, accumulation=4)
    assert not p.fits and "fits with" in p.notes[0]


def test_answer_only_logits_and_packed_edpo_rows():
    cfg = SageConfig.preset("internvl2-40b")
    full = plan_memory(cfg, world=8, micro_batch=4, stage="sfe")
    answers = plan_memory(cfg, world=8, micro_batch=4, stage="sfe", answer_tokens=128)
    V = cfg.llm.vocab_size
    # 4 x 2048 tokens of fp32 logits, twice -> 4 x 128 rows of bf16 logits + grad + one chunk
    saved = (2 * 4 * 4 * 2048 * V - (4 * 4 * 128 * V + 8 * 1024 * V)) / GIB
    assert full.phases["forward / backward"] - answers.phases["forward / backward"] == \
        pytest.approx(saved)
    packed = plan_memory(cfg, world=8, micro_batch=4, stage="edpo", ref_cache=True,
                         answer_tokens=128)
    # one row per instance: 2048 + 3 x (128 + 1) tokens, not 2 x 2048
    assert "9740 tokens" in format_plan(packed)


def test_inference_plan_shards_what_tensor_parallel_shards():
    from sage.plan import inference_weights

    cfg = SageConfig.preset("internvl2-40b")
    n = count_params(cfg)
    one, eight = inference_weights(cfg, 1), inference_weights(cfg, 8)
    assert sum(one.values()) == pytest.approx(sum(n[k] for k in ("vision", "adapter", "llm",
                                                                  "fusion", "fact_proj")))
    # InternViT: only the MLPs split (25 heads); the LLM almost exactly 1/8 (norms replicated)
    v = cfg.vision
    assert one["vision"] - eight["vision"] == pytest.approx(
        v.n_layers * (2 * v.dim * v.ffn_dim + v.ffn_dim) * 7 / 8)
    assert eight["llm"] == pytest.approx(one["llm"] / 8, rel=1e-3)
    from sage.plan import plan_inference

    p = plan_inference(cfg, tp=8, batch=16, prompt_len=2048, new_tokens=64)
    kv = 2 * 2 * 16 * 2112 * 60 * 1 * 128 / GIB  # k and v, bf16, 1 of 8 KV heads per rank
    assert [v for k, v, _ in p.rows if k.startswith("KV cache")] == [pytest.approx(kv)]


def test_counts_are_the_models_parameters():
    """count_params, which the plan is built on, counts what SageModel holds, module by module
    (the tiny preset)."""
    from sage.models.sage import SageModel
    cfg = SageConfig.preset("tiny")
    model, n = SageModel(cfg), count_params(cfg)
    for name in ("vision", "adapter", "llm", "fusion", "fact_proj"):
        assert n[name] == sum(p.numel() for p in getattr(model, name).parameters()), name
