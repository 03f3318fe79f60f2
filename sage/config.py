"""Model configuration: VisionConfig (InternViT), LLMConfig (Llama/Yi), SageConfig (the VLM).

Presets are an exact-name table (`SageConfig.preset("tiny")`, `SageConfig.preset("internvl2-40b")`);
`SageConfig.from_pretrained(dir)` maps an InternVL2 `config.json` onto these dataclasses and
fails on a missing or unknown key, naming the file and the key (docs/design.md §5);
`VisionConfig/LLMConfig.from_pretrained(dir)` read a plain InternViT / HF Llama one. Every
config.json key name comes from the tables of sage.names, which feed reading (`from_dict`)
and writing (`to_dict`) alike.

    cfg = SageConfig.preset("tiny"); vit = InternViT(cfg.vision); llm = Llama(cfg.llm)
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage.names import (ARCHITECTURE_WORDS, HERMES2, HERMES2_SYSTEM_MESSAGE,
                        LEGACY_SYSTEM_MESSAGE, OFF_KEYS, REPEATED_KEYS)
from sage.names import (FORCE_IMAGE_SIZE, IGNORED_KEYS, INTERNVL_CONSTANTS, INTERNVL_FIELDS,
                        LLM_CONSTANTS, LLM_FIELDS, LLM_SECTION, REQUIRED, SAGE_FIELD_NAMES,
                        SAGE_SECTION, VISION_CONSTANTS, VISION_FIELDS, VISION_SECTION)


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

    @staticmethod
    def from_pretrained(path: str | Path) -> "VisionConfig":
        """Read a plain InternViT `config.json` (a directory or the file itself)."""
        raw, file = read_config_json(path, "an InternViT directory")
        return vision_config_from_dict(raw, source=str(file))

    def to_dict(self) -> dict:
        """Plain InternViT config.json content (InternVisionConfig keys)."""
        return _write_fields(self, VISION_FIELDS, VISION_CONSTANTS)


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

    @staticmethod
    def from_pretrained(path: str | Path) -> "LLMConfig":
        """Read a plain Hugging Face Llama `config.json` (a directory or the file itself)."""
        raw, file = read_config_json(path, "a Hugging Face Llama directory")
        return llm_config_from_dict(raw, source=str(file))

    def to_dict(self) -> dict:
        """Plain Hugging Face Llama config.json content (LlamaConfig keys)."""
        return _write_fields(self, LLM_FIELDS, LLM_CONSTANTS)


@dataclass
class SageConfig:
    """The full VLM: InternViT + adapter (mlp1) + Llama, plus SAGE's SFE modules."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5  # pixel shuffle scale before the adapter
    ps_version: str = "v2"  # pixel shuffle channel order (InternVL "v2")
    select_layer: int = -1  # InternViT hidden state fed to the adapter (-1 = last block)
    adapter_norm_eps: float = 1e-5  # LayerNorm eps of mlp1.0
    template: str = "Hermes-2"  # chat template name (docs/design.md §5)
    dynamic_image_size: bool = False  # tile large images into up to max_dynamic_patch tiles
    use_thumbnail: bool = False  # add a global thumbnail tile when tiling
    max_dynamic_patch: int = 6  # max tiles per image when tiling
    min_dynamic_patch: int = 1  # min tiles per image when tiling
    # SAGE (paper §3.2); the paper gives no defaults for N and K: project choice.
    n_facts: int = 8  # N: fact sentences per image, = fusion output tokens t^s (Eq. 2)
    top_k: int = 32  # K: selected test patches (Eq. 1)
    fusion_heads: int = 8  # heads of the fusion cross-attention (Eq. 2)
    max_fact_tokens: int = 48  # tokens kept per fact sentence before pooling
    selection: str = "nn"  # "nn": s_i = max_j cos (docs/design.md §1 step 2); "min": literal Eq. 1
    facts_mode: str = "fe"  # "fe" (fusion, default), "hard" (facts as text), "none" (plain VLM)
    fusion_norm: str = "pre"  # "pre": LayerNorm (no params) on W_q/W_k inputs; "none": Eq. 2
    fusion_init: str = "fan_in"  # fusion W_q/k/v/o ~ N(0, 1/C) ("fan_in") or N(0, 0.02^2)
    fact_head_init: float = 1e-3  # std of the Eq. 9 head Linear's weight at init (0: zeros)
    fusion_values: str = "difference"  # one-shot values v_d; "test": v_t[idx] (Eq. 2)
    # "test": Eq. 1's K test patches least matched in the reference; "both": also the K
    # reference patches least matched in the test (a part missing from the test shows there)
    comparison: str = "test"
    # The system turn of the Hermes-2 template, rendered always as InternVL does
    # (docs/design.md §5):
    # InternVL's own message by default; None = no system turn (the committed tiny base).
    system_message: str | None = HERMES2_SYSTEM_MESSAGE

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.llm, dict):
            self.llm = LLMConfig(**self.llm)
        _check(self.ps_version == "v2",
               f"SageConfig.ps_version={self.ps_version!r}: only InternVL's 'v2' order is "
               "supported")
        inv = round(1 / self.downsample_ratio)
        _check(abs(inv * self.downsample_ratio - 1) < 1e-6 and self.vision.grid % inv == 0,
               f"SageConfig.downsample_ratio={self.downsample_ratio} must be 1/n with n dividing "
               f"the patch grid {self.vision.grid}")
        _check(self.selection in ("nn", "min"),
               f"SageConfig.selection={self.selection!r}: expected 'nn' or 'min'")
        _check(self.facts_mode in ("fe", "hard", "none"),
               f"SageConfig.facts_mode={self.facts_mode!r}: expected 'fe', 'hard' or 'none'")
        _check(self.template == HERMES2, f"SageConfig.template={self.template!r}: only "
               f"{HERMES2!r} (InternVL2-40B's chat template) is implemented")
        if self.facts_mode == "fe":  # SAGE's options are checked where they are used
            _check(0 < self.top_k <= self.n_image_tokens,
                   f"SageConfig.top_k={self.top_k} must be in [1, {self.n_image_tokens}] "
                   "(the image tokens per tile) with facts_mode 'fe'")
            _check(self.n_facts > 0, f"SageConfig.n_facts={self.n_facts} must be > 0 with "
                   "facts_mode 'fe'")
        _check(self.llm.dim % self.fusion_heads == 0,
               f"SageConfig.fusion_heads={self.fusion_heads} must divide llm.dim={self.llm.dim}")
        _check(self.fusion_norm in ("pre", "none") and self.fusion_init in ("fan_in", "small")
               and self.fusion_values in ("test", "difference") and self.fact_head_init >= 0,
               f"SageConfig: fusion_norm={self.fusion_norm!r} ('pre'/'none'), fusion_init="
               f"{self.fusion_init!r} ('fan_in'/'small'), fusion_values={self.fusion_values!r} "
               f"('test'/'difference'), fact_head_init={self.fact_head_init} (>= 0)")
        _check(self.comparison in ("test", "both"),
               f"SageConfig.comparison={self.comparison!r}: expected 'test' or 'both'")

    @property
    def facts_needed(self) -> int:
        """Fact sentences a record needs: N for Fact[FE] (one query each, Eq. 2), 1 for
        Fact[Hard] (up to N as text), 0 for the plain VLM."""
        return {"fe": self.n_facts, "hard": 1}.get(self.facts_mode, 0)

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
        raw, file = read_config_json(path, "an InternVL2 directory")
        return SageConfig.from_dict(raw, source=str(file))

    @staticmethod
    def from_dict(raw: dict, source: str = "config.json") -> "SageConfig":
        """SageConfig from InternVL2 config.json content (sage.names tables)."""
        top = _Reader(raw, source, "")
        vis = _Reader(top.take(VISION_SECTION), source, VISION_SECTION + ".")
        llm = _Reader(top.take(LLM_SECTION), source, LLM_SECTION + ".")
        plain = SAGE_SECTION not in raw  # a plain InternVL2 directory: the plain VLM
        if not plain and not isinstance(raw[SAGE_SECTION], dict):
            raise ValueError(f"{source}: {SAGE_SECTION} must be a JSON object")
        sage = _Reader(top.take(SAGE_SECTION, {}), source, SAGE_SECTION + ".")
        # force_image_size (top level) overrides the vision tower's own image_size
        vision = _vision_from(vis, image_size=top.take(FORCE_IMAGE_SIZE, None))
        kw = _read_fields(top, INTERNVL_FIELDS)
        kw.update({f.name: sage.take(f.name, f.default) for f in _SAGE_FIELDS})
        if plain:
            kw["facts_mode"] = "none"  # no fusion modules, no fact placeholders (issue 15)
        # the system message: sage_config's (null = no system turn), else an earlier SAGE's
        # top-level string, else the template's own (what InternVL renders)
        legacy = top.take(LEGACY_SYSTEM_MESSAGE, None)
        _check(legacy is None or isinstance(legacy, str),
               f"{source}: {LEGACY_SYSTEM_MESSAGE}={legacy!r}: expected a string or null")
        if plain or "system_message" not in raw[SAGE_SECTION]:
            kw["system_message"] = HERMES2_SYSTEM_MESSAGE if legacy is None else legacy
        llm_cfg = _llm_from(llm)
        _check_repeated(top, llm_cfg)
        for r in (top, vis, llm, sage):
            r.finish()
        return SageConfig(vision=vision, llm=llm_cfg, **kw)

    def to_dict(self) -> dict:
        """InternVL2-style config.json content (SAGE's own fields under `sage_config`); the
        LLM's hidden_size and tie_word_embeddings repeated at the top level as InternVL does."""
        llm = self.llm.to_dict()
        return {**_write_fields(self, INTERNVL_FIELDS, INTERNVL_CONSTANTS),
                **{key: llm[key] for key in REPEATED_KEYS},
                FORCE_IMAGE_SIZE: self.vision.image_size,
                VISION_SECTION: self.vision.to_dict(),
                LLM_SECTION: self.llm.to_dict(),
                SAGE_SECTION: {f.name: getattr(self, f.name) for f in _SAGE_FIELDS}}

    def save(self, path: str | Path) -> None:
        """Write config.json into directory `path`."""
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# Eq. 2 and Eq. 9 as the paper writes them: q and k not normalised, weights N(0, 0.02^2), the
# head's Linear at zero, values v_t[idx]. The defaults above depart from it where measurement
# said so (docs/experiments.md, "The fusion pathway"); `train_sfe.py --fusion literal` and
# `dataclasses.replace(cfg, **LITERAL_FUSION)` give this form back.
LITERAL_FUSION = dict(fusion_norm="none", fusion_init="small", fact_head_init=0.0,
                      fusion_values="test")

_SAGE_FIELDS = [f for f in dataclasses.fields(SageConfig) if f.name in SAGE_FIELD_NAMES]


# ----------------------------------------------------------------------------- config.json


def read_config_json(path: str | Path, expected: str) -> tuple[dict, Path]:
    """-> (content, file) of `path`/config.json (or the file itself); errors name the file."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json (expected {expected})")
    try:
        return json.loads(file.read_text()), file
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: line {e.lineno}: invalid JSON: {e.msg}") from None


class _Reader:
    """Take keys from one config.json section; `finish` rejects keys nobody took."""

    def __init__(self, section: Any, source: str, prefix: str):
        if not isinstance(section, dict):
            raise ValueError(f"{source}: {prefix or 'top level'} must be a JSON object")
        self.section, self.source, self.prefix, self.taken = section, source, prefix, set()

    def take(self, key: str, default: Any = REQUIRED) -> Any:
        self.taken.add(key)
        if key in self.section:
            return self.section[key]
        if default is REQUIRED:
            raise KeyError(f"{self.source}: missing required key '{self.prefix}{key}'")
        return default

    def finish(self) -> None:
        """Unknown keys: an error when the name says it may change the architecture, else one
        warning line per file and section (sage.names.ARCHITECTURE_WORDS)."""
        for key in OFF_KEYS:
            if self.section.get(key):
                raise ValueError(f"{self.source}: {self.prefix}{key}={self.section[key]!r}: "
                                 "only off (0 / false) is supported")
        unknown = sorted(k for k in self.section if k not in self.taken and k not in IGNORED_KEYS)
        structural = [k for k in unknown if any(w in k.lower() for w in ARCHITECTURE_WORDS)]
        if structural:
            raise KeyError(f"{self.source}: unknown key(s) "
                           f"{[self.prefix + k for k in structural]} may change the "
                           "architecture and are not understood; map them in the tables of "
                           "sage.names or list them in sage.names.IGNORED_KEYS")
        harmless = [self.prefix + k for k in unknown]
        if harmless and (self.source, *harmless) not in _REPORTED:
            _REPORTED.add((self.source, *harmless))
            warnings.warn(f"{self.source}: ignoring unknown key(s) {harmless} (none of them "
                          "names a part of the architecture)", stacklevel=4)


_REPORTED: set[tuple] = set()  # (file, keys...) already warned about: each reported once


def _check_repeated(top: _Reader, llm: LLMConfig) -> None:
    """Top-level repeats of LLM values (InternVLChatConfig writes them) must agree."""
    written = dict(zip(REPEATED_KEYS, (llm.dim, llm.tie_embeddings)))
    for key in REPEATED_KEYS:
        got = top.take(key, written[key])
        _check(got == written[key], f"{top.source}: {key}={got!r} disagrees with "
               f"{LLM_SECTION}.{key}={written[key]!r}")


def _read_fields(r: _Reader, table: tuple, given: dict | None = None) -> dict:
    """Our field -> value for every (published key, field, default) row of a sage.names table;
    `given` fields take their value from elsewhere (the key is still consumed)."""
    given = given or {}
    out = {}
    for key, name, default in table:
        value = r.take(key, None if name in given else default)
        out[name] = given.get(name, value)
    return out


def _check_constants(r: _Reader, constants: dict) -> None:
    """A constant the code relies on (hidden_act, biases) must have its one supported value."""
    for key, want in constants.items():
        if key in ("architectures", "model_type"):
            continue  # names only: checked where they matter (_llm_from) or ignored
        got = r.take(key, want)
        _check(got == want, f"{r.source}: {r.prefix}{key}={got!r}: only {want!r} is supported")


def _write_fields(cfg: Any, table: tuple, constants: dict) -> dict:
    """config.json content of one section: the constants, then every table row's value."""
    return {**constants, **{key: getattr(cfg, name) for key, name, _ in table}}


def _vision_from(vis: _Reader, image_size: int | None = None) -> VisionConfig:
    _check_constants(vis, VISION_CONSTANTS)
    return VisionConfig(**_read_fields(vis, VISION_FIELDS,
                                       {"image_size": image_size} if image_size else None))


def _llm_from(llm: _Reader) -> LLMConfig:
    arch = llm.take("architectures", None) or LLM_CONSTANTS["architectures"]
    _check(any("Llama" in a for a in arch), f"{llm.source}: {llm.prefix}architectures={arch}: "
           "only Llama-architecture language models are supported")
    _check_constants(llm, LLM_CONSTANTS)
    rope_scaling = llm.take("rope_scaling", None)
    _check(rope_scaling is None, f"{llm.source}: {llm.prefix}rope_scaling={rope_scaling}: "
           "RoPE scaling is not implemented")
    # transformers >= 5 writes {"rope_type": "default", "rope_theta": ...} instead of rope_theta
    rope = llm.take("rope_parameters", None) or {}
    _check(rope.get("rope_type", "default") == "default", f"{llm.source}: {llm.prefix}"
           f"rope_parameters={rope}: RoPE scaling is not implemented")
    kw = _read_fields(llm, LLM_FIELDS)
    head_dim = llm.take("head_dim", None)  # transformers writes hidden_size / heads again
    _check(head_dim is None or head_dim * kw["n_heads"] == kw["dim"],
           f"{llm.source}: {llm.prefix}head_dim={head_dim}: only hidden_size / "
           f"num_attention_heads = {kw['dim'] // kw['n_heads']} is supported")
    if kw["n_kv_heads"] is None:
        kw["n_kv_heads"] = kw["n_heads"]  # no GQA
    if kw["rope_theta"] is None:
        kw["rope_theta"] = rope.get("rope_theta", 10000.0)
    kw["rope_theta"] = float(kw["rope_theta"])
    return LLMConfig(**kw)


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
        # the tiny base was pretrained without a system turn (docs/design.md §5)
        system_message=None,
    )


def _internvl2_40b() -> SageConfig:
    # InternViT-6B-448px-V1-5 + mlp1 + Nous-Hermes-2-Yi-34B (docs/design.md §5). vocab_size is the
    # checkpoint's; 64000 is Yi's own table before InternVL's added tokens.
    return SageConfig(
        vision=VisionConfig(),
        llm=LLMConfig(),
        dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=6,
        system_message=HERMES2_SYSTEM_MESSAGE,  # InternVL's (docs/design.md §5)
    )


_PRESETS = {"tiny": _tiny, "internvl2-40b": _internvl2_40b}
