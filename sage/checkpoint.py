"""Checkpoints: declarative key maps, streaming safetensors load and sharded export (DESIGN §5).

Published Hugging Face layouts and ours differ only by names (STYLE §5), so each layout is one
table `published name -> our name` (`{}` = layer index, `*` = the rest of a dotted name,
`None` = deliberately skipped) plus its inverse for export:

    INTERNVL_KEY_MAP    InternVL2 (`vision_model.*`, `mlp1.{0,1,3}.*`, `language_model.*`)
                        + SAGE's own `sage.fusion.*`, `sage.fact_proj.*`      <-> SageModel
    LLAMA_KEY_MAP       plain HF Llama (`model.*`, `lm_head.weight`)          <-> Llama
    INTERNVIT_KEY_MAP   plain InternViT (`embeddings.*`, `encoder.layers.N.*`) <-> InternViT

Loading (`load_into`) never holds a second copy of the model: the model is built on the meta
device, materialised empty (or already sharded by FSDP2), and each tensor's bytes are read
from its shard straight into the parameter's memory, one tensor at a time. A DTensor parameter
receives only this rank's slice, so no rank reads the full 40B model: a row range (FSDP2's
Shard(0)) is one contiguous read; any other slice goes through safetensors' memory-mapped
`safe_open(...).get_slice`.

    model = load_pretrained("weights/sage-tiny-base")            # SageModel, tokenizer attached
    save_pretrained(model, "out/export", tokenizer=model.tokenizer)
    save_pretrained(model, "out/llm", layout="llama")   # LlamaForCausalLM.from_pretrained works
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from safetensors import safe_open

from sage.config import LLMConfig, SageConfig, VisionConfig

# ----------------------------------------------------------------------------- key maps

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


# ----------------------------------------------------------------------------- safetensors files

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"


@dataclass
class TensorInfo:
    """Where one checkpoint tensor lives: file, dtype, shape, absolute byte offset and size."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header (8-byte length + JSON); reads no tensor data.

    Raises ValueError naming the file for a truncated file, a corrupt header or tensor byte
    ranges past the end of the file.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            raise ValueError(f"{file}: corrupt or truncated safetensors header (file of {size} "
                             f"bytes, header length field {n})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        data_size = size - 8 - n
        out = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            (begin, end), dtype, shape = e["data_offsets"], _DTYPES[e["dtype"]], tuple(e["shape"])
            if end > data_size:
                raise ValueError(f"tensor '{name}' ends at byte {end} of the data section, "
                                 f"which has only {data_size} bytes (truncated file?)")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor '{name}': {end - begin} bytes for {e['dtype']} "
                                 f"{list(shape)}")
            out[name] = TensorInfo(file, dtype, shape, 8 + n + begin, end - begin)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: corrupt or truncated safetensors header: "
                         f"{type(e).__name__}: {e}") from None
    return out


def read_checkpoint_index(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint directory: `model.safetensors`, or the shards named by
    `model.safetensors.index.json` ("weight_map"); `path` may also be one .safetensors file.
    Only headers are read. -> published name -> TensorInfo."""
    path = Path(path)
    if path.is_file():
        return read_header(path)
    index = path / INDEX_FILE
    if not index.is_file():
        if (path / SINGLE_FILE).is_file():
            return read_header(path / SINGLE_FILE)
        raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (expected a "
                                "safetensors checkpoint directory)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}: line {e.lineno}: invalid JSON: {e.msg}") from None
    except KeyError:
        raise KeyError(f"{index}: missing required key 'weight_map'") from None
    headers = {}
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).is_file():
            raise FileNotFoundError(f"{index}: names shard '{shard}', which does not exist in "
                                    f"{path}")
        headers[shard] = read_header(path / shard)
    out = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise ValueError(f"{index}: maps '{name}' to {shard}, whose header has no such "
                             "tensor")
        out[name] = headers[shard][name]
    return out


def checkpoint_dtype(path: str | os.PathLike) -> torch.dtype:
    """The floating dtype holding most bytes of a checkpoint (its "torch_dtype"); headers only."""
    by_bytes = Counter()
    for t in read_checkpoint_index(path).values():
        if t.dtype.is_floating_point:
            by_bytes[t.dtype] += t.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else torch.get_default_dtype()


def _out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def write_safetensors(file: Path, tensors: list[tuple[str, torch.Tensor]],
                      dtype: torch.dtype | None = None, fetch=lambda t: t) -> None:
    """Stream tensors into one safetensors file without building it in memory.

    The header needs only names, dtypes and shapes; then each tensor's bytes are written in
    turn, converted to `dtype` if given (floating tensors only); `fetch` may gather a sharded
    tensor first. The header is padded to a multiple of 8 bytes, as upstream does.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors:
        out = _out_dtype(t, dtype)
        n = t.numel() * out.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[out], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, t in tensors:  # one tensor at a time in host memory
            cpu = fetch(t).detach().to("cpu", _out_dtype(t, dtype)).contiguous().reshape(-1)
            f.write(memoryview(cpu.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- model tensors

_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _canonical(name: str) -> str:
    """Strip wrapper prefixes (torch.compile, checkpoint wrappers) from a state-dict name."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict names -> parameters and persistent buffers (no copies, works on meta and on
    FSDP2 DTensors). Tied parameters appear under each name."""
    out = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        prefix = prefix + "." if prefix else ""
        for n, p in m._parameters.items():
            if p is not None:
                out[_canonical(prefix + n)] = p
        for n, b in m._buffers.items():
            if b is not None and n not in m._non_persistent_buffers_set:
                out[_canonical(prefix + n)] = b
    return out


def _local_slices(t: torch.Tensor) -> tuple[slice, ...] | None:
    """This rank's index into the global tensor of a DTensor (None: a plain, whole tensor).

    Shard(d) splits like torch.chunk (chunk = ceil(n / world), trailing ranks may get fewer
    rows or none), applied mesh dim by mesh dim; Replicate keeps the whole range.
    """
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None or not isinstance(t, dtensor.DTensor):
        return None  # no DTensor can exist before that module is imported (importing it: ~1 s)
    Replicate, Shard = dtensor.Replicate, dtensor.Shard
    ranges = [[0, n] for n in t.shape]
    coord = t.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard):
            lo, hi = ranges[placement.dim]
            chunk = math.ceil((hi - lo) / t.device_mesh.size(mesh_dim))
            start = min(lo + coord[mesh_dim] * chunk, hi)
            ranges[placement.dim] = [start, min(start + chunk, hi)]
        elif not isinstance(placement, Replicate):
            raise ValueError(f"cannot load into a DTensor with placement {placement}")
    return tuple(slice(a, b) for a, b in ranges)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# ----------------------------------------------------------------------------- load


@dataclass
class LoadReport:
    """What load_into did. str() is one summary line; `new` is reported there in one line."""

    directory: str
    n_loaded: int = 0
    bytes_read: int = 0  # this rank's bytes (a slice for sharded parameters)
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)  # checkpoint keys mapped to None
    new: dict[str, list[str]] = field(default_factory=dict)  # new_ok prefix -> absent keys
    initialised: list[str] = field(default_factory=list)  # prefixes filled by init_weights()
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        gb = self.bytes_read / 1e9
        parts = [f"loaded {self.n_loaded} tensors ({gb:.3f} GB, "
                 f"{gb / max(self.seconds, 1e-9):.2f} GB/s) from {self.directory}"]
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} by the key map")
        if self.new:
            todo = [p for p in self.new if p not in self.initialised]
            parts.append("new (not in the checkpoint): " + ", ".join(
                f"{p}* ({len(k)} tensors)" for p, k in self.new.items())
                + (f", initialised by init_weights(): {', '.join(self.initialised)}"
                   if self.initialised else "")
                + (f", caller must initialise: {', '.join(todo)}" if todo else ""))
        for what in ("missing", "unexpected", "mismatched"):
            if getattr(self, what):
                parts.append(f"{len(getattr(self, what))} {what}")
        return "; ".join(parts)


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}):" + "".join(f"\n    {s}" for s in items[:limit]) + more


def _plan(ckpt: dict[str, TensorInfo], params: dict[str, torch.Tensor], key_map: dict,
          new_ok: tuple[str, ...], report: LoadReport) -> list[tuple[str, str]]:
    """Match checkpoint keys to model keys (headers and meta shapes only, nothing is read).

    -> (published, ours) pairs to copy; fills report.skipped/new/missing/unexpected/mismatched.
    """
    pairs, filled, bad_shape = [], set(), set()
    for pub, info in ckpt.items():
        try:
            ours = map_key(pub, key_map, source=info.file.name)
        except KeyError:
            report.unexpected.append(f"{pub} (in {info.file.name}): no key-map entry")
            continue
        if ours is None:
            report.skipped.append(pub)
        elif ours not in params:
            report.unexpected.append(f"{pub} (in {info.file.name}) -> {ours}: not in the model")
        elif tuple(params[ours].shape) != info.shape:
            report.mismatched.append(f"{ours} <- {pub} in {info.file.name}: expected "
                                     f"{tuple(params[ours].shape)}, found {info.shape}")
            bad_shape.add(ours)
        else:
            pairs.append((pub, ours))
            filled.add(ours)
    filled_ids = {id(params[o]) for o in filled}  # a tied alias counts as filled
    for ours, t in params.items():
        if ours in filled or id(t) in filled_ids:
            continue
        prefix = next((p for p in new_ok if ours.startswith(p)), None)
        if prefix is not None:
            report.new.setdefault(prefix, []).append(ours)
        elif ours not in bad_shape:  # already listed as a mismatch
            report.missing.append(ours)
    return pairs


def _materialise(model: nn.Module, device) -> None:
    """to_empty on `device`, then re-tie parameters that to_empty split (e.g. tied embeddings)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for n, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, n))
    model.to_empty(device=device or "cpu")
    for group in owners.values():
        first = getattr(*group[0])
        for m, n in group[1:]:
            setattr(m, n, first)


_READ_CHUNK = 16 << 20  # per readinto call; the kernel reads ahead sequentially


def _read_into(fh, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor `out` with the file's bytes from `offset` (no copy)."""
    view = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
    fh.seek(offset)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:done + _READ_CHUNK])
        if not n:
            raise ValueError(f"{fh.name}: ends at byte {offset + done} while reading "
                             f"{len(view)} bytes from {offset} (truncated file?)")
        done += n


def _copy_tensor(fh, pub: str, info: TensorInfo, dst: torch.Tensor, scratch: list) -> int:
    """Copy checkpoint tensor `pub` (or this rank's slice of it) into dst; -> bytes read.

    Straight into the destination when it is a contiguous CPU tensor of the checkpoint's
    dtype; otherwise through one reused scratch buffer, then copy_ (dtype conversion or
    host-to-device copy). Measured in sage.bench.load: the kernel copies page cache -> the
    parameter once, and no file page is mapped, so peak RSS is the model's own bytes (a
    mapped file's pages count towards RSS; an extra copy pays a second page-fault pass).
    """
    sl, local = _local_slices(dst), _local(dst)
    if local.numel() == 0:
        return 0
    offset, nbytes = info.offset, info.nbytes
    if sl is not None and info.shape:
        if any((s.start, s.stop) != (0, n) for s, n in zip(sl[1:], info.shape[1:])):
            with safe_open(str(info.file), framework="pt", device="cpu") as f:
                local.copy_(f.get_slice(pub)[sl])  # not a row range: memory-mapped slice
            return local.numel() * info.dtype.itemsize
        row = info.nbytes // info.shape[0]  # a row range (FSDP2 Shard(0)): one contiguous read
        offset, nbytes = info.offset + sl[0].start * row, (sl[0].stop - sl[0].start) * row
    if local.device.type == "cpu" and local.is_contiguous() and local.dtype == info.dtype:
        _read_into(fh, offset, local)
    else:
        if scratch[0].numel() < nbytes:
            scratch[0] = torch.empty(nbytes, dtype=torch.uint8)
        buf = scratch[0][:nbytes].view(info.dtype).view(local.shape)
        _read_into(fh, offset, buf)
        local.copy_(buf)  # converts the dtype / moves to the device
    return nbytes


def _stream(ckpt: dict[str, TensorInfo], pairs: list[tuple[str, str]],
            params: dict[str, torch.Tensor]) -> int:
    """Copy every (published, ours) pair, file by file in file order; -> bytes read."""
    pairs = sorted(pairs, key=lambda p: (str(ckpt[p[0]].file), ckpt[p[0]].offset))
    scratch, total, fh, current = [torch.empty(0, dtype=torch.uint8)], 0, None, None
    try:
        with torch.no_grad():
            for pub, ours in pairs:
                info = ckpt[pub]
                if info.file != current:
                    if fh is not None:
                        fh.close()
                    fh, current = open(info.file, "rb", buffering=0), info.file
                total += _copy_tensor(fh, pub, info, params[ours], scratch)
    finally:
        if fh is not None:
            fh.close()
    return total


def load_into(model: nn.Module, directory: str | os.PathLike, key_map: dict[str, str | None],
              dtype: torch.dtype | None = None, strict: bool = True,
              new_ok: Iterable[str] = (), device: torch.device | str | None = None) -> LoadReport:
    """Fill `model` from a safetensors checkpoint directory, tensor by tensor, in place.

    model: (a) built under torch.device("meta"): load_into materialises it with
    `to_empty(device)` (default CPU) after all checks passed; (b) already materialised: copied
    into in place; (c) sharded with FSDP2 `fully_shard` (DTensor parameters, on meta or
    materialised): each rank reads only its own slice. device: where a meta model is
    materialised (ignored otherwise). dtype: cast the model's floating tensors first (free on
    meta); checkpoint tensors are converted while copying.
    strict: one ValueError listing missing, unexpected (unmapped, or absent from the model) and
    shape-mismatched keys, raised before anything is allocated; strict=False only reports them.
    new_ok: prefixes of model keys that may be absent (SAGE's fusion / fact_proj on a plain
    InternVL2 checkpoint); the module at each prefix gets `init_weights()` before loading and
    the report says so. Computed, non-persistent buffers are never expected.
    """
    t0 = time.perf_counter()
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    new_ok = tuple(new_ok)
    ckpt = read_checkpoint_index(directory)
    report = LoadReport(directory=str(directory))
    pairs = _plan(ckpt, model_tensors(model), key_map, new_ok, report)
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise ValueError(f"{directory}: checkpoint does not match the model (strict load)"
                         + _listing("missing from the checkpoint", report.missing)
                         + _listing("unexpected in the checkpoint", report.unexpected)
                         + _listing("shape mismatch", report.mismatched))
    params = model_tensors(model)
    if dtype is not None and any(t.is_floating_point() and t.dtype != dtype
                                 for t in params.values()):
        if any(hasattr(t, "to_local") for t in params.values()):
            raise ValueError(f"load_into: cannot cast a sharded model to {dtype}; cast it "
                             "before fully_shard (FSDP2 keeps its own sharded parameters)")
        model.to(dtype)
    on_meta = [t.device.type == "meta" for t in params.values()]
    if any(on_meta):
        if not all(on_meta):
            raise ValueError("load_into: model is partly on the meta device; build it entirely "
                             "under torch.device('meta') or materialise it first")
        _materialise(model, device)
    params = model_tensors(model)  # to_empty / .to() may have replaced the tensors
    for prefix in report.new:
        owner = model.get_submodule(prefix.rstrip("."))
        if hasattr(owner, "init_weights"):
            with torch.no_grad():
                owner.init_weights()
            report.initialised.append(prefix)
    report.bytes_read = _stream(ckpt, pairs, params)
    report.n_loaded = len(pairs)
    report.seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------- save

_LAYOUTS = {"internvl": INTERNVL_KEY_MAP_INV, "llama": LLAMA_KEY_MAP_INV,
            "internvit": INTERNVIT_KEY_MAP_INV}


def hf_llama_config(cfg: LLMConfig, dtype: torch.dtype) -> dict:
    """config.json of a plain HF Llama dir (LlamaForCausalLM and llm_config_from_dict read it)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
            "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
            "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch.")}


def hf_internvit_config(cfg: VisionConfig, dtype: torch.dtype) -> dict:
    """config.json of a plain InternViT dir (InternVisionConfig keys)."""
    return {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "num_channels": cfg.n_channels, "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.ffn_dim, "norm_type": cfg.norm_type,
            "layer_norm_eps": cfg.norm_eps, "qk_normalization": cfg.use_qk_norm,
            "qkv_bias": cfg.qkv_bias, "initializer_factor": cfg.layer_scale_init,
            "drop_path_rate": cfg.drop_path_rate, "hidden_act": "gelu",
            "torch_dtype": str(dtype).removeprefix("torch.")}


def plan_shards(tensors: list[tuple[str, torch.Tensor]], max_bytes: int,
                dtype: torch.dtype | None) -> list[list]:
    """Consecutive groups of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for name, t in tensors:
        n = t.numel() * _out_dtype(t, dtype).itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    return shards


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
        pub = map_key(_canonical(ours), _LAYOUTS[layout], source=f"model ({layout} layout)")
        tensors.append((pub, t))

    def fetch(t):  # a sharded tensor is gathered on every rank (a collective)
        with torch.no_grad():
            return t.full_tensor() if hasattr(t, "full_tensor") else t

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
            write_safetensors(tmp / name, shard, dtype, fetch)
        else:
            for _, t in shard:
                fetch(t)
    if rank0:
        _write_metadata(tmp, tensors, shards, names, config, tokenizer, layout, dtype)
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
                    dtype: torch.dtype | None) -> None:
    if len(shards) > 1:
        total = sum(t.numel() * _out_dtype(t, dtype).itemsize for _, t in tensors)
        weight_map = {pub: name for name, shard in zip(names, shards) for pub, _ in shard}
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    common = Counter(_out_dtype(t, dtype) for _, t in tensors if t.is_floating_point())
    dtype = common.most_common(1)[0][0] if common else torch.float32
    if layout == "internvl":
        config.save(tmp)
    else:
        make = hf_llama_config if layout == "llama" else hf_internvit_config
        (tmp / "config.json").write_text(json.dumps(make(config, dtype), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


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


# ----------------------------------------------------------------------------- SageModel


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, strict: bool = True):
    """SageModel from an InternVL2-layout directory (+ SAGE's `sage.*` keys if present).

    Config from config.json, vocab_size from the checkpoint's embedding table (InternVL2 adds
    tokens after Yi's 64000); built on meta, materialised on `device` (default CPU) in `dtype`
    (default: the checkpoint's), filled by load_into. Fusion / projection head keys may be
    absent (plain InternVL2): they are initialised and listed in `model.load_report`.
    The tokenizer is attached when tokenizer.model is present. Returned in eval().
    """
    import dataclasses

    from sage.models.sage import SageModel

    path = Path(path)
    cfg = SageConfig.from_pretrained(path)
    ckpt = read_checkpoint_index(path)
    emb = ckpt.get("language_model.model.embed_tokens.weight")
    if emb is not None and emb.shape[0] != cfg.llm.vocab_size:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=emb.shape[0]))
    with torch.device("meta"):
        model = SageModel(cfg)
    report = load_into(model, path, INTERNVL_KEY_MAP, dtype=dtype or checkpoint_dtype(path),
                       strict=strict, new_ok=("fusion.", "fact_proj."), device=device)
    model.load_report = report
    if (path / "tokenizer.model").is_file():
        from sage.tokenizer import Tokenizer

        model.tokenizer = Tokenizer.from_pretrained(path)
    return model.eval()
