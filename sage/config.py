"""Model configuration: VisionConfig (InternViT), LLMConfig (Llama/Yi), SageConfig (the VLM).

Presets are an exact-name table (`SageConfig.preset("tiny")`, `SageConfig.preset("internvl2-40b")`);
`SageConfig.from_pretrained(dir)` maps an InternVL2 `config.json` onto these dataclasses and
fails on a missing or unknown key, naming the file and the key (DESIGN §5).

    cfg = SageConfig.preset("tiny"); vit = InternViT(cfg.vision); llm = Llama(cfg.llm)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class VisionConfig:
    """InternViT (defaults: InternViT-6B-448px-V1-5)."""

    image_size: int = 448  # side of one square tile, pixels
    patch_size: int = 14  # side of one patch, pixels
    n_channels: int = 3  # RGB
    dim: int = 3200  # hidden width C_vit
    n_layers: int = 45  # transformer blocks
    n_heads: int = 25  # attention heads
    ffn_dim: int = 12800  # MLP hidden width
    norm_type: str = "rms_norm"  # "rms_norm" (6B) or "layer_norm" (300M)
    norm_eps: float = 1e-6  # epsilon of norm1/norm2 and the qk-norms
    use_qk_norm: bool = True  # RMSNorm over the full q and k width before the head split
    qkv_bias: bool = False  # bias on the fused qkv projection
    layer_scale_init: float = 0.1  # initial value of ls1/ls2 (published "initializer_factor")
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks

    def __post_init__(self) -> None:
        _check(self.dim % self.n_heads == 0,
               f"VisionConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}")
        _check(self.image_size % self.patch_size == 0,
               f"VisionConfig.image_size={self.image_size} must be a multiple of "
               f"patch_size={self.patch_size}")
        _check(self.norm_type in ("rms_norm", "layer_norm"),
               f"VisionConfig.norm_type={self.norm_type!r}: expected 'rms_norm' or 'layer_norm'")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def grid(self) -> int:
        """Patches per side of one tile."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2


@dataclass
class LLMConfig:
    """Llama-architecture decoder (defaults: Nous-Hermes-2-Yi-34B)."""

    vocab_size: int = 64000  # rows of embed_tokens / lm_head (taken from the checkpoint)
    dim: int = 7168  # hidden width C
    n_layers: int = 60  # decoder blocks
    n_heads: int = 56  # query heads
    n_kv_heads: int = 8  # key/value heads (GQA)
    ffn_dim: int = 20480  # SwiGLU hidden width
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 5e6  # RoPE base
    max_seq_len: int = 4096  # max positions
    tie_embeddings: bool = False  # lm_head shares embed_tokens' weight

    def __post_init__(self) -> None:
        _check(self.dim % self.n_heads == 0,
               f"LLMConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}")
        _check(self.n_heads % self.n_kv_heads == 0,
               f"LLMConfig.n_heads={self.n_heads} must be divisible by "
               f"n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class SageConfig:
    """The full VLM: InternViT + adapter (mlp1) + Llama, plus SAGE's SFE modules."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5  # pixel shuffle scale before the adapter
    ps_version: str = "v2"  # pixel shuffle channel order (InternVL "v2")
    select_layer: int = -1  # InternViT hidden state fed to the adapter (-1 = last block)
    adapter_norm_eps: float = 1e-5  # LayerNorm eps of mlp1.0
    template: str = "Hermes-2"  # chat template name (DESIGN §5)
    dynamic_image_size: bool = False  # tile large images into up to max_dynamic_patch tiles
    use_thumbnail: bool = False  # add a global thumbnail tile when tiling
    max_dynamic_patch: int = 6  # max tiles per image when tiling
    min_dynamic_patch: int = 1  # min tiles per image when tiling
    # SAGE (paper §3.2); the paper gives no defaults for N and K: project choice.
    n_facts: int = 8  # N: fact sentences per image, = fusion output tokens t^s (Eq. 2)
    top_k: int = 32  # K: selected test patches (Eq. 1)
    fusion_heads: int = 8  # heads of the fusion cross-attention (Eq. 2)
    max_fact_tokens: int = 48  # tokens kept per fact sentence before pooling
    selection: str = "nn"  # "nn": s_i = max_j cos (DESIGN §1 step 2); "min": literal Eq. 1
    facts_mode: str = "fe"  # "fe" (fusion, default), "hard" (facts as text), "none" (plain VLM)
    system_message: str = ""  # system turn of the chat template ("" = none)

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.llm, dict):
            self.llm = LLMConfig(**self.llm)
        _check(self.ps_version == "v2",
               f"SageConfig.ps_version={self.ps_version!r}: only InternVL's 'v2' order is supported")
        inv = round(1 / self.downsample_ratio)
        _check(abs(inv * self.downsample_ratio - 1) < 1e-6 and self.vision.grid % inv == 0,
               f"SageConfig.downsample_ratio={self.downsample_ratio} must be 1/n with n dividing "
               f"the patch grid {self.vision.grid}")
        _check(self.selection in ("nn", "min"),
               f"SageConfig.selection={self.selection!r}: expected 'nn' or 'min'")
        _check(self.facts_mode in ("fe", "hard", "none"),
               f"SageConfig.facts_mode={self.facts_mode!r}: expected 'fe', 'hard' or 'none'")
        _check(0 < self.top_k <= self.n_image_tokens,
               f"SageConfig.top_k={self.top_k} must be in [1, {self.n_image_tokens}]")
        _check(self.llm.dim % self.fusion_heads == 0,
               f"SageConfig.fusion_heads={self.fusion_heads} must divide llm.dim={self.llm.dim}")

    @property
    def n_image_tokens(self) -> int:
        """LLM tokens per 448 tile after pixel shuffle (256 for InternVL2)."""
        return int(self.vision.n_patches * self.downsample_ratio**2)

    @property
    def adapter_in_dim(self) -> int:
        """Width entering mlp1: C_vit / ratio^2 (12800 for InternVL2-40B)."""
        return int(self.vision.dim / self.downsample_ratio**2)

    # ------------------------------------------------------------------ presets

    @staticmethod
    def preset(name: str, **overrides: Any) -> "SageConfig":
        """Exact-name preset table; keyword overrides replace top-level fields."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(_PRESETS)}")
        cfg = _PRESETS[name]()
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    # ------------------------------------------------------------------ config.json

    @staticmethod
    def from_pretrained(path: str | Path) -> "SageConfig":
        """Read an InternVL2 `config.json` (a directory or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no config.json")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: line {e.lineno}: invalid JSON: {e.msg}") from None
        return SageConfig.from_dict(raw, source=str(file))

    @staticmethod
    def from_dict(raw: dict, source: str = "config.json") -> "SageConfig":
        top = _Reader(raw, source, "")
        vis = _Reader(top.take("vision_config"), source, "vision_config.")
        llm = _Reader(top.take("llm_config"), source, "llm_config.")
        # force_image_size (top level) overrides the vision tower's own image_size
        vision = _vision_from(vis, image_size=top.take("force_image_size", None))
        llm_cfg = _llm_from(llm)
        sage = _Reader(top.take("sage_config", {}), source, "sage_config.")
        cfg = SageConfig(
            vision=vision,
            llm=llm_cfg,
            downsample_ratio=top.take("downsample_ratio"),
            ps_version=top.take("ps_version"),
            select_layer=top.take("select_layer"),
            template=top.take("template"),
            dynamic_image_size=top.take("dynamic_image_size"),
            use_thumbnail=top.take("use_thumbnail"),
            max_dynamic_patch=top.take("max_dynamic_patch"),
            min_dynamic_patch=top.take("min_dynamic_patch", 1),
            system_message=top.take("system_message", None) or "",
            **{f.name: sage.take(f.name, f.default) for f in _SAGE_FIELDS},
        )
        for r in (top, vis, llm, sage):
            r.finish()
        return cfg

    def to_dict(self) -> dict:
        """InternVL2-style config.json content (SAGE's own fields under `sage_config`)."""
        v, m = self.vision, self.llm
        return {
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "downsample_ratio": self.downsample_ratio,
            "ps_version": self.ps_version,
            "select_layer": self.select_layer,
            "template": self.template,
            "force_image_size": v.image_size,
            "dynamic_image_size": self.dynamic_image_size,
            "use_thumbnail": self.use_thumbnail,
            "max_dynamic_patch": self.max_dynamic_patch,
            "min_dynamic_patch": self.min_dynamic_patch,
            "system_message": self.system_message,
            "vision_config": {
                "architectures": ["InternVisionModel"],
                "model_type": "intern_vit_6b",
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.n_channels,
                "hidden_size": v.dim,
                "num_hidden_layers": v.n_layers,
                "num_attention_heads": v.n_heads,
                "intermediate_size": v.ffn_dim,
                "norm_type": v.norm_type,
                "layer_norm_eps": v.norm_eps,
                "qk_normalization": v.use_qk_norm,
                "qkv_bias": v.qkv_bias,
                "initializer_factor": v.layer_scale_init,
                "drop_path_rate": v.drop_path_rate,
                "hidden_act": "gelu",
            },
            "llm_config": {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": m.vocab_size,
                "hidden_size": m.dim,
                "num_hidden_layers": m.n_layers,
                "num_attention_heads": m.n_heads,
                "num_key_value_heads": m.n_kv_heads,
                "intermediate_size": m.ffn_dim,
                "rms_norm_eps": m.norm_eps,
                "rope_theta": m.rope_theta,
                "max_position_embeddings": m.max_seq_len,
                "tie_word_embeddings": m.tie_embeddings,
                "hidden_act": "silu",
            },
            "sage_config": {f.name: getattr(self, f.name) for f in _SAGE_FIELDS},
        }

    def save(self, path: str | Path) -> None:
        """Write config.json into directory `path`."""
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


_SAGE_FIELD_NAMES = ("adapter_norm_eps", "n_facts", "top_k", "fusion_heads", "max_fact_tokens",
                     "selection", "facts_mode")
_SAGE_FIELDS = [f for f in dataclasses.fields(SageConfig) if f.name in _SAGE_FIELD_NAMES]

# Keys that a published config.json carries and that SAGE deliberately ignores: the generic
# `transformers.PretrainedConfig` dump, InternVL's training switches and MoE leftovers of
# InternViT. Any key outside this list and outside the mapped ones is an error.
IGNORED_KEYS = frozenset("""
_name_or_path _commit_hash _attn_implementation_autoset add_cross_attention architectures
attn_implementation auto_map bad_words_ids begin_suppress_tokens bos_token_id chunk_size_feed_forward
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
head_dim use_flash_attn use_backbone_lora use_llm_lora pad2square dropout
capacity_factor eval_capacity_factor laux_allreduce moe_coeff_ratio moe_intermediate_size
moe_output_scale noisy_gate_policy num_experts num_routed_experts num_shared_experts
shared_expert_intermediate_size use_moe use_residual use_rts use_weighted_residual
img_context_token_id 
""".split())


class _Reader:
    """Take keys from one config.json section; `finish` rejects keys nobody took."""

    def __init__(self, section: Any, source: str, prefix: str):
        if not isinstance(section, dict):
            raise ValueError(f"{source}: {prefix or 'top level'} must be a JSON object")
        self.section, self.source, self.prefix, self.taken = section, source, prefix, set()

    _MISSING = object()

    def take(self, key: str, default: Any = _MISSING) -> Any:
        self.taken.add(key)
        if key in self.section:
            return self.section[key]
        if default is _Reader._MISSING:
            raise KeyError(f"{self.source}: missing required key '{self.prefix}{key}'")
        return default

    def finish(self) -> None:
        unknown = sorted(k for k in self.section if k not in self.taken and k not in IGNORED_KEYS)
        if unknown:
            raise KeyError(f"{self.source}: unknown key(s) {[self.prefix + k for k in unknown]}; "
                           "map them in SageConfig.from_dict or list them in "
                           "sage.config.IGNORED_KEYS")


def _vision_from(vis: _Reader, image_size: int | None = None) -> VisionConfig:
    image_size = image_size or vis.take("image_size")
    vis.take("image_size", None)
    hidden_act = vis.take("hidden_act", "gelu")
    _check(hidden_act == "gelu", f"{vis.source}: {vis.prefix}hidden_act={hidden_act!r}: "
           "only exact 'gelu' is supported")
    return VisionConfig(
        image_size=image_size,
        patch_size=vis.take("patch_size"),
        n_channels=vis.take("num_channels", 3),
        dim=vis.take("hidden_size"),
        n_layers=vis.take("num_hidden_layers"),
        n_heads=vis.take("num_attention_heads"),
        ffn_dim=vis.take("intermediate_size"),
        norm_type=vis.take("norm_type", "rms_norm"),  # absent in InternViT-6B's config.json
        norm_eps=vis.take("layer_norm_eps"),
        use_qk_norm=vis.take("qk_normalization"),
        qkv_bias=vis.take("qkv_bias"),
        layer_scale_init=vis.take("initializer_factor", 0.1),
        drop_path_rate=vis.take("drop_path_rate", 0.0),
    )


def _llm_from(llm: _Reader) -> LLMConfig:
    arch = llm.take("architectures", ["LlamaForCausalLM"])
    _check(any("Llama" in a for a in arch), f"{llm.source}: {llm.prefix}architectures={arch}: "
           "only Llama-architecture language models are supported")
    rope_scaling = llm.take("rope_scaling", None)
    _check(rope_scaling is None, f"{llm.source}: {llm.prefix}rope_scaling={rope_scaling}: "
           "RoPE scaling is not implemented")
    # transformers >= 5 writes {"rope_type": "default", "rope_theta": ...} instead of rope_theta
    rope = llm.take("rope_parameters", None) or {}
    _check(rope.get("rope_type", "default") == "default", f"{llm.source}: {llm.prefix}"
           f"rope_parameters={rope}: RoPE scaling is not implemented")
    hidden_act = llm.take("hidden_act", "silu")
    _check(hidden_act == "silu", f"{llm.source}: {llm.prefix}hidden_act={hidden_act!r}: "
           "only 'silu' (SwiGLU) is supported")
    return LLMConfig(
        vocab_size=llm.take("vocab_size"),
        dim=llm.take("hidden_size"),
        n_layers=llm.take("num_hidden_layers"),
        n_heads=llm.take("num_attention_heads"),
        n_kv_heads=llm.take("num_key_value_heads", llm.section.get("num_attention_heads")),
        ffn_dim=llm.take("intermediate_size"),
        norm_eps=llm.take("rms_norm_eps"),
        rope_theta=float(llm.take("rope_theta", rope.get("rope_theta", 10000.0))),
        max_seq_len=llm.take("max_position_embeddings"),
        tie_embeddings=llm.take("tie_word_embeddings", False),
    )


def vision_config_from_dict(d: dict, source: str = "config.json") -> VisionConfig:
    """VisionConfig from a plain InternViT `config.json` (InternVisionConfig keys)."""
    r = _Reader(d, source, "")
    cfg = _vision_from(r)
    r.finish()
    return cfg


def llm_config_from_dict(d: dict, source: str = "config.json") -> LLMConfig:
    """LLMConfig from a plain Hugging Face Llama `config.json`."""
    r = _Reader(d, source, "")
    cfg = _llm_from(r)
    r.finish()
    return cfg


def _tiny() -> SageConfig:
    # CPU-sized: 224 px tiles -> 16x16 patches -> 64 LLM tokens per image after pixel shuffle.
    return SageConfig(
        vision=VisionConfig(image_size=224, patch_size=14, dim=128, n_layers=4, n_heads=4,
                            ffn_dim=512, norm_type="rms_norm", norm_eps=1e-6, use_qk_norm=True,
                            layer_scale_init=0.1),
        llm=LLMConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=2,
                      ffn_dim=704, norm_eps=1e-5, rope_theta=5e6, max_seq_len=1024),
        n_facts=4, top_k=8, fusion_heads=4, max_fact_tokens=32,
    )


def _internvl2_40b() -> SageConfig:
    # InternViT-6B-448px-V1-5 + mlp1 + Nous-Hermes-2-Yi-34B (DESIGN §5). vocab_size is the
    # checkpoint's; 64000 is Yi's own table before InternVL's added tokens.
    return SageConfig(
        vision=VisionConfig(),
        llm=LLMConfig(),
        dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=6,
        system_message="",
    )


_PRESETS = {"tiny": _tiny, "internvl2-40b": _internvl2_40b}
