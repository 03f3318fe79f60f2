"""SageConfig: presets, overrides validated by __post_init__, config.json reading with errors
that name the file and key.   python -m pytest -q tests/test_config.py"""

import dataclasses
import json

import pytest

from sage.config import SageConfig, VisionConfig, llm_config_from_dict
from sage.names import HERMES2_SYSTEM_MESSAGE


def test_preset_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*'internvl2-40b', 'tiny'"):
        SageConfig.preset("huge")


def test_overrides_are_validated_like_fields():
    # tiny: 224 px tiles -> 16 x 16 patches -> 64 LLM tokens per image after pixel shuffle
    assert SageConfig.preset("tiny", top_k=64).top_k == 64
    with pytest.raises(ValueError, match=r"top_k=999 must be in \[1, 64\]"):
        SageConfig.preset("tiny", top_k=999)
    with pytest.raises(ValueError, match=r"facts_mode='soft'"):
        dataclasses.replace(SageConfig.preset("tiny"), facts_mode="soft")
    with pytest.raises(ValueError, match=r"fusion_heads=3 must divide llm.dim=256"):
        SageConfig.preset("tiny", fusion_heads=3)


def test_replace_leaves_the_original_alone():
    cfg = SageConfig.preset("tiny")
    hard = dataclasses.replace(cfg, facts_mode="hard")
    assert (cfg.facts_mode, hard.facts_mode) == ("fe", "hard")


def published(cfg: SageConfig) -> dict:
    """config.json without SAGE's block (a plain InternVL2 directory), plus generic
    PretrainedConfig keys that the reader ignores."""
    d = cfg.to_dict()
    del d["sage_config"]
    d.update(torch_dtype="bfloat16", use_flash_attn=True)
    d["llm_config"]["_name_or_path"] = "NousResearch/Nous-Hermes-2-Yi-34B"
    return d


def test_published_layout_reads_as_the_plain_vlm(tmp_path):
    cfg = SageConfig.preset("internvl2-40b")
    (tmp_path / "config.json").write_text(json.dumps(published(cfg)))
    got = SageConfig.from_pretrained(tmp_path)
    assert got.system_message == HERMES2_SYSTEM_MESSAGE  # InternVL's Hermes-2 default
    assert got.facts_mode == "none" and got.n_facts == cfg.n_facts  # plain VLM, our defaults
    assert got.llm == cfg.llm and got.vision == cfg.vision


def test_sage_options_checked_only_where_used(tmp_path):
    # a small plain model: fewer image tokens per tile (16) than SAGE's default top_k (32)
    small = SageConfig.preset("tiny", vision=VisionConfig(image_size=112, patch_size=14, dim=64,
                                                          n_layers=2, n_heads=2, ffn_dim=128),
                              facts_mode="none")
    assert (small.n_image_tokens, small.top_k) == (16, 8)
    d = published(small)
    (tmp_path / "config.json").write_text(json.dumps(d))
    plain = SageConfig.from_pretrained(tmp_path)  # loads: top_k 32 > 16 is not used
    assert plain.facts_mode == "none" and plain.top_k == 32
    with pytest.raises(ValueError, match=r"top_k=32 must be in \[1, 16\].*facts_mode 'fe'"):
        dataclasses.replace(plain, facts_mode="fe")  # SFE on it: now top_k matters
    with pytest.raises(ValueError, match=r"n_facts=0 must be > 0"):
        dataclasses.replace(small, facts_mode="fe", n_facts=0)
    with pytest.raises(ValueError, match=r"template='internlm2-chat'"):
        dataclasses.replace(small, template="internlm2-chat")


def test_unknown_and_missing_keys_name_file_and_key(tmp_path):
    d = published(SageConfig.preset("tiny"))
    d["vision_config"]["use_magic"] = True  # a switch: may change the architecture
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(KeyError, match=r"config.json: unknown key\(s\) "
                                       r"\['vision_config.use_magic'\] may change the "
                                       r"architecture"):
        SageConfig.from_pretrained(tmp_path)
    del d["vision_config"]["use_magic"], d["downsample_ratio"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(KeyError, match=r"config.json: missing required key 'downsample_ratio'"):
        SageConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{\n  oops")
    with pytest.raises(ValueError, match=r"config.json: line 2: invalid JSON"):
        SageConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SageConfig.from_pretrained(tmp_path / "nowhere")


def test_llm_defaults_and_unsupported_values():
    d = SageConfig.preset("tiny").llm.to_dict()
    del d["num_key_value_heads"], d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000}  # transformers 5
    cfg = llm_config_from_dict(d)
    assert cfg.n_kv_heads == cfg.n_heads == 8 and cfg.rope_theta == 1e6
    with pytest.raises(ValueError, match="hidden_act='gelu': only 'silu' is supported"):
        llm_config_from_dict({**d, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="attention_bias=True: only False is supported"):
        llm_config_from_dict({**d, "attention_bias": True})
    with pytest.raises(ValueError, match="RoPE scaling is not implemented"):
        llm_config_from_dict({**d, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_literal_fusion_is_eq2_eq9_as_written():
    """`train_sfe.py --fusion literal` (sage.config.LITERAL_FUSION): q/k not normalised, small
    weights, the head at zero, values v_t[idx]; every key is a SageConfig field."""
    import torch

    from sage.config import LITERAL_FUSION
    from sage.models.sage import SageModel
    cfg = dataclasses.replace(SageConfig.preset("tiny"), **LITERAL_FUSION)
    torch.manual_seed(0)
    model = SageModel(cfg)
    model.init_weights()
    assert model.fusion.norm == "none" and cfg.fusion_values == "test"
    assert model.fusion.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.fact_proj.fc.weight.abs().max().item() == 0
