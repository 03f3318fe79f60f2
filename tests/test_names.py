"""Published names (sage.names): tensor key maps both ways, and the config.json field tables
that feed config reading and every writer.   python -m pytest -q tests/test_names.py"""

import json

import pytest
import torch

from sage.checkpoint import model_tensors
from sage.config import LLMConfig, SageConfig, VisionConfig, llm_config_from_dict
from sage.models.sage import SageModel
from sage.names import (INTERNVIT_KEY_MAP, INTERNVL_KEY_MAP, INTERNVL_KEY_MAP_INV, LLM_FIELDS,
                        LLAMA_KEY_MAP, VISION_FIELDS, map_key)

# ----------------------------------------------------------------------------- key maps


def test_map_key_layer_index_prefix_and_skip():
    assert map_key("language_model.model.layers.17.mlp.up_proj.weight", INTERNVL_KEY_MAP) == \
        "llm.layers.17.mlp.up_proj.weight"
    assert map_key("mlp1.3.bias", INTERNVL_KEY_MAP) == "adapter.fc2.bias"
    assert map_key("vision_model.encoder.layers.44.attn.q_norm.weight", INTERNVL_KEY_MAP) == \
        "vision.encoder.layers.44.attn.q_norm.weight"
    assert map_key("sage.fusion.k_proj.bias", INTERNVL_KEY_MAP) == "fusion.k_proj.bias"
    assert map_key("language_model.model.layers.3.self_attn.rotary_emb.inv_freq",
                   INTERNVL_KEY_MAP) is None
    assert map_key("model.norm.weight", LLAMA_KEY_MAP) == "norm.weight"
    assert map_key("encoder.layers.2.ls1", INTERNVIT_KEY_MAP) == "encoder.layers.2.ls1"
    with pytest.raises(KeyError, match=r"language_model\.model\.bogus.*shard-7\.safetensors"):
        map_key("language_model.model.bogus", INTERNVL_KEY_MAP, source="shard-7.safetensors")


def test_every_sage_model_key_maps_to_published_and_back(tiny_cfg):
    with torch.device("meta"):
        model = SageModel(tiny_cfg)
    names = list(model_tensors(model))
    published = [map_key(k, INTERNVL_KEY_MAP_INV) for k in names]
    assert len(set(published)) == len(names)
    assert [map_key(p, INTERNVL_KEY_MAP) for p in published] == names
    assert "language_model.lm_head.weight" in published and "mlp1.1.weight" in published
    assert "sage.fact_proj.fc.weight" in published


# ----------------------------------------------------------------------------- config tables


def test_one_table_feeds_internvl_and_plain_writers(tiny_cfg):
    # the InternVL2 sections and the plain HF Llama / InternViT config.json are the same dicts
    d = tiny_cfg.to_dict()
    assert d["llm_config"] == tiny_cfg.llm.to_dict()
    assert d["vision_config"] == tiny_cfg.vision.to_dict()
    assert d["force_image_size"] == tiny_cfg.vision.image_size == 224
    # every field of the vision / LLM dataclasses has exactly one published key
    assert sorted(f for _, f, _ in VISION_FIELDS) == sorted(vars(VisionConfig()))
    assert sorted(f for _, f, _ in LLM_FIELDS) == sorted(vars(LLMConfig()))
    # published names where the published layout has them (docs/design.md §5)
    assert d["llm_config"]["hidden_size"] == 256 and d["llm_config"]["rope_theta"] == 5e6
    assert d["vision_config"]["initializer_factor"] == 0.1
    want = {"adapter_norm_eps": 1e-5, "n_facts": 4, "top_k": 8, "fusion_heads": 4,
            "max_fact_tokens": 32, "selection": "nn", "facts_mode": "fe", "system_message": None}
    assert {k: d["sage_config"][k] for k in want} == want
    # InternVLChatConfig repeats the LLM's width and tying at the top level
    assert (d["hidden_size"], d["tie_word_embeddings"]) == (256, False)


def test_written_config_reads_back(tiny_cfg, tmp_path):
    tiny_cfg.save(tmp_path)
    assert SageConfig.from_pretrained(tmp_path) == tiny_cfg
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps(tiny_cfg.llm.to_dict()))
    assert LLMConfig.from_pretrained(tmp_path / "llm") == tiny_cfg.llm
    (tmp_path / "vit" / "config.json").parent.mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps(tiny_cfg.vision.to_dict()))
    assert VisionConfig.from_pretrained(tmp_path / "vit") == tiny_cfg.vision


def test_transformers_llama_config_reads_ours_and_we_read_its():
    transformers = pytest.importorskip("transformers")
    ours = LLMConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                     rope_theta=5e6, max_seq_len=64)
    hf = transformers.LlamaConfig(**{k: v for k, v in ours.to_dict().items()
                                     if k != "architectures"})
    assert (hf.hidden_size, hf.num_key_value_heads, hf.intermediate_size) == (32, 2, 48)
    assert llm_config_from_dict(hf.to_dict()) == ours
