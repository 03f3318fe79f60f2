"""config.json as InternVL writes it: InternVL2-40B's, read into SageConfig; repeated keys
checked, unknown keys judged by name.   python -m pytest -q tests/test_config_internvl.py"""

import copy
import json
import warnings

import pytest

from sage.config import SageConfig
from sage.names import HERMES2_SYSTEM_MESSAGE

# The generic part of every transformers 4.37 PretrainedConfig.to_dict() (InternVL2 pins
# transformers 4.37.2): written whole inside each sub-config by InternVLChatConfig.to_dict.
PRETRAINED = {
    "add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
    "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False,
    "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0, "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0,
    "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False,
    "sep_token_id": None, "suppress_tokens": None, "task_specific_params": None,
    "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torchscript": False,
    "typical_p": 1.0, "use_bfloat16": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2",
}

# InternVL2-40B's config.json as InternVL's current InternVLChatConfig writes it
# (OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/configuration_internvl_chat.py:
# top-level hidden_size and tie_word_embeddings repeated from llm_config).
INTERNVL2_40B = {
    "_commit_hash": None,
    "_name_or_path": "OpenGVLab/InternVL2-40B",
    "architectures": ["InternVLChatModel"],
    "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                 "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                 "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 448,
    "hidden_size": 7168,
    "llm_config": {
        **PRETRAINED,
        "_name_or_path": "NousResearch/Nous-Hermes-2-Yi-34B",
        "architectures": ["LlamaForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 7, "hidden_act": "silu",
        "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 20480,
        "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 56,
        "num_hidden_layers": 60, "num_key_value_heads": 8, "pad_token_id": 0,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 5000000.0, "tie_word_embeddings": False, "use_cache": False,
        "vocab_size": 64000,
    },
    "max_dynamic_patch": 6,
    "min_dynamic_patch": 1,
    "model_type": "internvl_chat",
    "pad2square": False,
    "ps_version": "v2",
    "select_layer": -1,
    "template": "Hermes-2",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": None,
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "use_thumbnail": True,
    "vision_config": {
        **PRETRAINED,
        "_name_or_path": "",
        "architectures": ["InternVisionModel"], "attention_dropout": 0.0,
        "drop_path_rate": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 3200,
        "image_size": 448, "initializer_factor": 0.1, "initializer_range": 1e-10,
        "intermediate_size": 12800, "layer_norm_eps": 1e-06, "model_type": "intern_vit_6b",
        "norm_type": "rms_norm", "num_attention_heads": 25, "num_channels": 3,
        "num_hidden_layers": 45, "patch_size": 14, "qk_normalization": True,
        "qkv_bias": False, "use_flash_attn": True,
        "tie_word_embeddings": True,  # transformers' default, meaningless for a vision tower
    },
}


def write(tmp_path, d) -> str:
    (tmp_path / "config.json").write_text(json.dumps(d, indent=2))
    return str(tmp_path / "config.json")


def test_internvl2_40b_config_reads_silently(tmp_path):
    write(tmp_path, INTERNVL2_40B)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key is understood: no warning
        cfg = SageConfig.from_pretrained(tmp_path)
    want = SageConfig.preset("internvl2-40b")
    assert cfg.vision == want.vision and cfg.llm == want.llm
    assert (cfg.downsample_ratio, cfg.template, cfg.use_thumbnail) == (0.5, "Hermes-2", True)
    assert cfg.facts_mode == "none" and cfg.system_message == HERMES2_SYSTEM_MESSAGE


@pytest.mark.parametrize("where, key, value, match", [
    ("", "hidden_size", 5120, r"hidden_size=5120 disagrees with llm_config.hidden_size=7168"),
    ("", "tie_word_embeddings", True,
     r"tie_word_embeddings=True disagrees with llm_config.tie_word_embeddings=False"),
    ("llm_config", "head_dim", 64, r"llm_config.head_dim=64: only hidden_size / "
                                   r"num_attention_heads = 128"),
    ("", "use_llm_lora", 16, r"use_llm_lora=16: only off"),
])
def test_repeated_keys_must_agree(tmp_path, where, key, value, match):
    d = copy.deepcopy(INTERNVL2_40B)
    (d[where] if where else d)[key] = value
    file = write(tmp_path, d)
    with pytest.raises(ValueError, match=rf"{file}: {match}"):
        SageConfig.from_pretrained(tmp_path)


def test_unknown_keys_error_or_warn_once(tmp_path):
    d = copy.deepcopy(INTERNVL2_40B)
    d["vision_config"]["num_register_tokens"] = 4  # would change the token count
    file = write(tmp_path, d)
    with pytest.raises(KeyError, match=rf"{file}: unknown key\(s\) "
                                       r"\['vision_config.num_register_tokens'\] may change"):
        SageConfig.from_pretrained(tmp_path)
    del d["vision_config"]["num_register_tokens"]
    d["llm_config"]["comment"] = "fine-tuned by us"  # harmless: reported once, not fatal
    write(tmp_path, d)
    with pytest.warns(UserWarning, match=r"ignoring unknown key\(s\) \['llm_config.comment'\]"):
        SageConfig.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SageConfig.from_pretrained(tmp_path)  # the same file again: no second report


def test_our_writer_writes_what_internvl_writes():
    d = SageConfig.preset("internvl2-40b").to_dict()
    for key in ("hidden_size", "tie_word_embeddings", "downsample_ratio", "ps_version",
                "template", "force_image_size", "select_layer"):
        assert d[key] == INTERNVL2_40B[key], key
    assert "system_message" not in d  # SAGE's own setting sits under sage_config
