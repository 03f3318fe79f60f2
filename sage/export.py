"""Export: a (possibly FSDP2-sharded) model written in a published layout (docs/design.md §5).

Our-named tensors are mapped back through the inverse key maps of sage.names, streamed into
safetensors files by sage.safetensors_io (sharded with an index above a size), next to
config.json (with the config recorded in the safetensors metadata, checked at load by
sage.checkpoint.check_config_metadata), the tokenizer files and generation_config.json. The
directory is written under a temporary name and renamed into place.

    save_pretrained(model, "out/export", tokenizer=model.tokenizer)
    save_pretrained(model, "out/llm", layout="llama")   # LlamaForCausalLM.from_pretrained works
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from sage.checkpoint import CONFIG_METADATA, canonical_name, model_tensors
from sage.config import LLMConfig, SageConfig, VisionConfig
from sage.names import INTERNVIT_KEY_MAP_INV, INTERNVL_KEY_MAP_INV, LLAMA_KEY_MAP_INV, map_key
from sage.safetensors_io import INDEX_FILE, SINGLE_FILE, out_dtype, plan_shards, write_safetensors

GENERATION_CONFIG = "generation_config.json"  # stop ids, pad / bos / eos (transformers' file)

# ----------------------------------------------------------------------------- save

_LAYOUTS = {"internvl": INTERNVL_KEY_MAP_INV, "llama": LLAMA_KEY_MAP_INV,
            "internvit": INTERNVIT_KEY_MAP_INV}


def save_state_dict(state_dict: dict[str, torch.Tensor], config, directory: str | os.PathLike,
                    tokenizer=None, layout: str = "internvl", max_shard_bytes: int = 2**31,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write our-named tensors in a published layout: safetensors (sharded with an index above
    max_shard_bytes), config.json, the tokenizer if given.

    config: SageConfig (layout "internvl"), LLMConfig ("llama") or VisionConfig ("internvit").
    Plain tensors: the caller writes (e.g. rank 0 with a gathered state dict), no collectives.
    DTensor values (an FSDP2 model): every rank must call; each tensor is gathered in turn and
    rank 0 writes. Files go to a temporary sibling directory renamed into place at the end; a
    non-empty `directory` is only replaced with overwrite=True.
    """
    import torch.distributed as td

    if layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {sorted(_LAYOUTS)}")
    directory = Path(directory)
    collective = any(hasattr(t, "full_tensor") for t in state_dict.values())
    rank0 = not collective or td.get_rank() == 0
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory}: exists and is not empty (pass overwrite=True)")
    tensors, seen = [], set()
    for ours, t in state_dict.items():
        if id(t) in seen:  # tied alias: safetensors stores shared tensors once
            continue
        seen.add(id(t))
        pub = map_key(canonical_name(ours), _LAYOUTS[layout], source=f"model ({layout} layout)")
        tensors.append((pub, t))

    def fetch(t):  # a sharded tensor is gathered on every rank (a collective)
        with torch.no_grad():
            return t.full_tensor() if hasattr(t, "full_tensor") else t

    # the config the weights were written with (check_config_metadata): in the header of a
    # single file, in the index's "metadata" of a sharded checkpoint
    metadata = {CONFIG_METADATA: json.dumps(config.to_dict(), sort_keys=True)}
    shards = plan_shards(tensors, max_shard_bytes, dtype)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    tmp = None
    if rank0:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary dir
    for name, shard in zip(names, shards):
        if rank0:
            write_safetensors(tmp / name, shard, dtype, fetch,
                              metadata if len(shards) == 1 else None)
        else:
            for _, t in shard:
                fetch(t)
    if rank0:
        _write_metadata(tmp, tensors, shards, names, config, tokenizer, layout, dtype, metadata)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    if collective:
        td.barrier()  # the export is complete on every rank's return
    return directory


def _write_metadata(tmp: Path, tensors, shards, names, config, tokenizer, layout: str,
                    dtype: torch.dtype | None, metadata: dict) -> None:
    if len(shards) > 1:
        total = sum(t.numel() * out_dtype(t, dtype).itemsize for _, t in tensors)
        weight_map = {pub: name for name, shard in zip(names, shards) for pub, _ in shard}
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map},
            indent=2) + "\n")
    common = Counter(out_dtype(t, dtype) for _, t in tensors if t.is_floating_point())
    dtype = common.most_common(1)[0][0] if common else torch.float32
    if layout == "internvl":
        config.save(tmp)
    else:  # plain HF Llama / InternViT: the config's own table (sage.names) + the dtype
        content = {**config.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(content, indent=2) + "\n")
    if tokenizer is not None:  # + tokenizer_config.json, special_tokens_map.json, added tokens
        tokenizer.save_pretrained(tmp)
        (tmp / GENERATION_CONFIG).write_text(json.dumps(tokenizer.generation_config(), indent=2)
                                             + "\n")


def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
                    layout: str = "internvl", max_shard_bytes: int = 2**31,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Export a model in a published layout (see save_state_dict).

    layout "internvl": a SageModel -> InternVL2 names + `sage.*`; "llama": its `llm` (or a
    Llama) -> plain HF Llama, loadable by transformers' LlamaForCausalLM; "internvit": its
    `vision` (or an InternViT). Works on an FSDP2 model too (every rank calls).
    """
    model = getattr(model, "_orig_mod", model)
    part = {"llama": "llm", "internvit": "vision"}.get(layout)
    if part is not None and hasattr(model, part):
        model = getattr(model, part)
    config = getattr(model, "cfg", None)
    want = {"internvl": SageConfig, "llama": LLMConfig, "internvit": VisionConfig}.get(layout)
    if want is not None and not isinstance(config, want):
        raise ValueError(f"save_pretrained(layout={layout!r}): the model has no `cfg` of type "
                         f"{want.__name__} (got {type(config).__name__})")
    return save_state_dict(model_tensors(model), config, directory, tokenizer=tokenizer,
                           layout=layout, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                           dtype=dtype)
