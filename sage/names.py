"""Published names in one place (docs/design.md §5): tensor key maps and config.json field tables.

Published Hugging Face layouts and ours differ only by names (docs/design.md §8.5), so each layout
is one table `published name -> our name` (`{}` = layer index, `*` = the rest of a dotted name,
`None` = deliberately skipped) plus its inverse for export:

    INTERNVL_KEY_MAP    InternVL2 (`vision_model.*`, `mlp1.{0,1,3}.*`, `language_model.*`)
                        + SAGE's own `sage.fusion.*`, `sage.fact_proj.*`      <-> SageModel
    LLAMA_KEY_MAP       plain HF Llama (`model.*`, `lm_head.weight`)          <-> Llama
    INTERNVIT_KEY_MAP   plain InternViT (`embeddings.*`, `encoder.layers.N.*`) <-> InternViT

The config.json tables are `(published key, our field, default when the key is absent)`, with
REQUIRED for keys that must be there; one table per section feeds the reader
(sage.config `*.from_dict`) and every writer (`to_dict`: InternVL2 config.json, plain HF Llama
and plain InternViT config.json). `*_CONSTANTS` are written as they are.

    map_key("language_model.model.layers.3.mlp.up_proj.weight", INTERNVL_KEY_MAP)
    # -> "llm.layers.3.mlp.up_proj.weight"
"""

from __future__ import annotations

import re

# ----------------------------------------------------------------------------- tensor key maps

LLAMA_KEY_MAP: dict[str, str | None] = {  # published plain HF Llama name -> Llama name
    "model.embed_tokens.weight": "embed_tokens.weight",
    **{f"model.layers.{{}}.self_attn.{p}_proj.weight": f"layers.{{}}.self_attn.{p}_proj.weight"
       for p in "qkvo"},
    **{f"model.layers.{{}}.mlp.{p}_proj.weight": f"layers.{{}}.mlp.{p}_proj.weight"
       for p in ("gate", "up", "down")},
    "model.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    # older transformers saved RoPE's inverse frequencies; ours are recomputed on the fly
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
}

_VIT_LAYER = ["norm1", "norm2", "attn.qkv", "attn.q_norm", "attn.k_norm", "attn.proj",
              "mlp.fc1", "mlp.fc2"]
INTERNVIT_KEY_MAP: dict[str, str | None] = {  # published plain InternViT name -> InternViT name
    "embeddings.class_embedding": "embeddings.class_embedding",
    "embeddings.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embedding.bias": "embeddings.patch_embedding.bias",
    "embeddings.position_embedding": "embeddings.position_embedding",
    **{f"encoder.layers.{{}}.{m}.{w}": f"encoder.layers.{{}}.{m}.{w}"
       for m in _VIT_LAYER for w in ("weight", "bias")},  # biases: LayerNorm / bias variants
    "encoder.layers.{}.ls1": "encoder.layers.{}.ls1",
    "encoder.layers.{}.ls2": "encoder.layers.{}.ls2",
}


def _prefixed(key_map: dict, published: str, ours: str) -> dict:
    return {published + k: (None if v is None else ours + v) for k, v in key_map.items()}


INTERNVL_KEY_MAP: dict[str, str | None] = {  # published InternVL2 name -> SageModel name
    **_prefixed(INTERNVIT_KEY_MAP, "vision_model.", "vision."),
    # mlp1 is an nn.Sequential(LayerNorm, Linear, GELU, Linear): opaque indices, renamed
    "mlp1.0.weight": "adapter.norm.weight",
    "mlp1.0.bias": "adapter.norm.bias",
    "mlp1.1.weight": "adapter.fc1.weight",
    "mlp1.1.bias": "adapter.fc1.bias",
    "mlp1.3.weight": "adapter.fc2.weight",
    "mlp1.3.bias": "adapter.fc2.bias",
    **_prefixed(LLAMA_KEY_MAP, "language_model.", "llm."),
    # SAGE's own modules (fusion attention Eq. 2, projection head Eq. 9) under their own prefix
    "sage.fusion.*": "fusion.*",
    "sage.fact_proj.*": "fact_proj.*",
}


# A SAGE checkpoint read as the plain VLM (facts_mode "hard"/"none": no fusion modules built):
# its sage.* tensors are deliberately skipped.
PLAIN_VLM_KEY_MAP: dict[str, str | None] = {**INTERNVL_KEY_MAP, "sage.fusion.*": None,
                                            "sage.fact_proj.*": None}


def invert_key_map(key_map: dict[str, str | None]) -> dict[str, str]:
    """ours -> published, for export; skipped (None) entries have no inverse."""
    inverse = {v: k for k, v in key_map.items() if v is not None}
    assert len(inverse) == sum(v is not None for v in key_map.values()), "key map not 1:1"
    return inverse


INTERNVL_KEY_MAP_INV = invert_key_map(INTERNVL_KEY_MAP)
LLAMA_KEY_MAP_INV = invert_key_map(LLAMA_KEY_MAP)
INTERNVIT_KEY_MAP_INV = invert_key_map(INTERNVIT_KEY_MAP)

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a dotted segment made of digits


def map_key(name: str, key_map: dict[str, str | None], source: str = "") -> str | None:
    """Translate one tensor name with a key map -> the mapped name, or None if skipped.

    Tries the exact name, then each numeric segment as the layer index `{}`, then `*` prefix
    rules. Raises KeyError naming the key (and `source`, e.g. the shard file) if nothing fits.
    """
    if name in key_map:
        return key_map[name]
    for m in _LAYER_INDEX.finditer(name):
        pattern = name[:m.start()] + "{}" + name[m.end():]
        if pattern in key_map:
            target = key_map[pattern]
            return None if target is None else target.replace("{}", m.group())
    for pattern, target in key_map.items():
        if pattern.endswith("*") and name.startswith(pattern[:-1]):
            return None if target is None else target[:-1] + name[len(pattern) - 1:]
    where = f" (in {source})" if source else ""
    raise KeyError(f"key '{name}'{where} matches no entry of the key map; add it to the table "
                   "(or map it to None to skip it deliberately)")


# ----------------------------------------------------------------------------- config.json


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # default of a config.json key that must be present

VISION_FIELDS = (  # InternViT config.json (InternVisionConfig) <-> VisionConfig
    ("image_size", "image_size", REQUIRED),  # InternVL2: top-level force_image_size wins
    ("patch_size", "patch_size", REQUIRED),
    ("num_channels", "n_channels", 3),
    ("hidden_size", "dim", REQUIRED),
    ("num_hidden_layers", "n_layers", REQUIRED),
    ("num_attention_heads", "n_heads", REQUIRED),
    ("intermediate_size", "ffn_dim", REQUIRED),
    ("norm_type", "norm_type", "rms_norm"),  # absent in InternViT-6B's config.json
    ("layer_norm_eps", "norm_eps", REQUIRED),
    ("qk_normalization", "use_qk_norm", REQUIRED),
    ("qkv_bias", "qkv_bias", REQUIRED),
    ("initializer_factor", "layer_scale_init", 0.1),
    ("drop_path_rate", "drop_path_rate", 0.0),
)
VISION_CONSTANTS = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                    "hidden_act": "gelu"}  # exact GELU: the only activation implemented

LLM_FIELDS = (  # HF Llama config.json (LlamaConfig) <-> LLMConfig
    ("vocab_size", "vocab_size", REQUIRED),
    ("hidden_size", "dim", REQUIRED),
    ("num_hidden_layers", "n_layers", REQUIRED),
    ("num_attention_heads", "n_heads", REQUIRED),
    ("num_key_value_heads", "n_kv_heads", None),  # absent: = num_attention_heads (no GQA)
    ("intermediate_size", "ffn_dim", REQUIRED),
    ("rms_norm_eps", "norm_eps", REQUIRED),
    ("rope_theta", "rope_theta", None),  # absent: rope_parameters.rope_theta, else 10000
    ("max_position_embeddings", "max_seq_len", REQUIRED),
    ("tie_word_embeddings", "tie_embeddings", False),
)
LLM_CONSTANTS = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                 "hidden_act": "silu",  # SwiGLU: the only MLP implemented
                 "attention_bias": False, "mlp_bias": False}

INTERNVL_FIELDS = (  # InternVL2 config.json top level <-> SageConfig
    ("downsample_ratio", "downsample_ratio", REQUIRED),
    ("ps_version", "ps_version", REQUIRED),
    ("select_layer", "select_layer", REQUIRED),
    ("template", "template", REQUIRED),
    ("dynamic_image_size", "dynamic_image_size", REQUIRED),
    ("use_thumbnail", "use_thumbnail", REQUIRED),
    ("max_dynamic_patch", "max_dynamic_patch", REQUIRED),
    ("min_dynamic_patch", "min_dynamic_patch", 1),
)
INTERNVL_CONSTANTS = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat"}
# InternVL2 sections: vision_config (VISION_FIELDS), llm_config (LLM_FIELDS), and the
# image size of the vision tower again as the top-level "force_image_size".
VISION_SECTION, LLM_SECTION, FORCE_IMAGE_SIZE = "vision_config", "llm_config", "force_image_size"
# SAGE's own fields, under "sage_config" with our names; absent keys take our defaults.
SAGE_SECTION = "sage_config"
SAGE_FIELD_NAMES = ("adapter_norm_eps", "n_facts", "top_k", "fusion_heads", "max_fact_tokens",
                    "selection", "facts_mode", "fusion_norm", "fusion_init", "fact_head_init",
                    "fusion_values", "comparison", "system_message")
# InternVL's configuration class (InternVLChatConfig) repeats two LLM values at the top level;
# they are checked against llm_config, never a second source, and written the same way.
REPEATED_KEYS = ("hidden_size", "tie_word_embeddings")
# Top-level "system_message": written by SAGE before issue 15 (InternVL itself ignores the key
# and takes the template's message); a string there is read when sage_config gives none.
LEGACY_SYSTEM_MESSAGE = "system_message"

# The system message of InternVL's "Hermes-2" template (InternVL2-40B), as InternVL publishes
# it in internvl_chat/internvl/conversation.py; InternVL renders it unless a run sets another.
HERMES2 = "Hermes-2"
HERMES2_SYSTEM_MESSAGE = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
                          "英文名叫InternVL, 是一个有用无害的人工智能助手。")

# Keys that a published config.json carries and that SAGE deliberately ignores: the generic
# `transformers.PretrainedConfig` dump (in every section: transformers writes each sub-config
# whole, `vision_config.tie_word_embeddings` included), InternVL's training switches and MoE
# leftovers of InternViT. A key outside this list and outside the mapped ones is judged by its
# name: one that may change the architecture (ARCHITECTURE_WORDS) is an error, any other is
# reported once as a warning.
IGNORED_KEYS = frozenset("""
_name_or_path _commit_hash _attn_implementation_autoset add_cross_attention architectures
attn_implementation auto_map bad_words_ids begin_suppress_tokens bos_token_id
chunk_size_feed_forward
cross_attention_hidden_size decoder_start_token_id diversity_penalty do_sample dtype
early_stopping encoder_no_repeat_ngram_size eos_token_id exponential_decay_length_penalty
finetuning_task forced_bos_token_id forced_eos_token_id id2label is_decoder is_encoder_decoder
label2id length_penalty max_length min_length model_type no_repeat_ngram_size num_beam_groups
num_beams num_return_sequences output_attentions output_hidden_states output_scores
pad_token_id prefix problem_type pruned_heads remove_invalid_values repetition_penalty
return_dict return_dict_in_generate sep_token_id suppress_tokens task_specific_params
temperature tf_legacy_loss tie_encoder_decoder tokenizer_class top_k top_p torch_dtype
torchscript transformers_version typical_p use_bfloat16 use_cache
attention_bias attention_dropout mlp_bias pretraining_tp initializer_range
use_flash_attn use_backbone_lora use_llm_lora pad2square dropout
capacity_factor eval_capacity_factor laux_allreduce moe_coeff_ratio moe_intermediate_size
moe_output_scale noisy_gate_policy num_experts num_routed_experts num_shared_experts
shared_expert_intermediate_size use_moe use_residual use_rts use_weighted_residual
img_context_token_id tie_word_embeddings
""".split())
# Ignored keys that change the model unless off: accepted only when falsy (0, false, null).
OFF_KEYS = ("use_moe", "use_backbone_lora", "use_llm_lora")
# An unknown key whose name holds one of these words may change what the weights compute.
ARCHITECTURE_WORDS = ("size", "dim", "layer", "head", "hidden", "expert", "moe", "rope",
                      "rotary", "position", "window", "bias", "norm", "act", "scal", "ratio",
                      "vocab", "embed", "attn", "attention", "kernel", "residual", "lora",
                      "shuffle", "patch", "tile", "token", "type", "version", "select", "use_")
