"""Safetensors files (docs/design.md §5): headers, checkpoint directories and a streaming writer.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}}` and the raw tensor bytes. A
checkpoint directory holds `model.safetensors`, or shards listed by
`model.safetensors.index.json` ("weight_map": name -> shard file). Only headers are parsed
here; sage.checkpoint streams the bytes into a model. Pure file I/O: depends on torch only.

    infos = read_checkpoint_index("weights/sage-tiny-base")  # name -> TensorInfo
    write_safetensors(Path("x.safetensors"), [("w", torch.zeros(2, 3))])
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,  # header names
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
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
            (begin, end), dtype, shape = e["data_offsets"], DTYPES[e["dtype"]], tuple(e["shape"])
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


def out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `t` is written in: `dtype` for floating tensors if given, else its own."""
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def read_metadata(file: Path) -> dict[str, str]:
    """The `__metadata__` strings of one safetensors file ({} when it has none)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            meta = json.loads(f.read(n)).get("__metadata__") or {}
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    return meta if isinstance(meta, dict) else {}


def write_safetensors(file: Path, tensors: list[tuple[str, torch.Tensor]],
                      dtype: torch.dtype | None = None, fetch=lambda t: t,
                      metadata: dict[str, str] | None = None) -> None:
    """Stream tensors into one safetensors file without building it in memory.

    The header needs only names, dtypes and shapes; then each tensor's bytes are written in
    turn, converted to `dtype` if given (floating tensors only); `fetch` may gather a sharded
    tensor first. The header is padded to a multiple of 8 bytes, as upstream does. metadata:
    extra `__metadata__` strings (safetensors allows str -> str only).
    """
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for name, t in tensors:
        out = out_dtype(t, dtype)
        n = t.numel() * out.itemsize
        header[name] = {"dtype": DTYPE_NAMES[out], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, t in tensors:  # one tensor at a time in host memory
            cpu = fetch(t).detach().to("cpu", out_dtype(t, dtype)).contiguous().reshape(-1)
            f.write(memoryview(cpu.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def plan_shards(tensors: list[tuple[str, torch.Tensor]], max_bytes: int,
                dtype: torch.dtype | None) -> list[list]:
    """Consecutive groups of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for name, t in tensors:
        n = t.numel() * out_dtype(t, dtype).itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    return shards
