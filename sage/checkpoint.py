"""Checkpoints: streaming load into a (sharded) model, and the check of the config an export
recorded (docs/design.md §5; writing is sage.export).

The names come from sage.names (one key map per published layout, published -> ours, and its
inverse); the files are read and written by sage.safetensors_io. This module depends on those
and on sage.config only; the models' `from_pretrained` call into it, never the other way.

Loading (`load_into`) never holds a second copy of the model: the model is built on the meta
device, materialised empty (or already sharded by FSDP2), and each tensor's bytes are read
from its shard straight into the parameter's memory, one tensor at a time. A DTensor parameter
receives only this rank's slice, so no rank reads the full 40B model: a row range (FSDP2's
Shard(0)) is one contiguous read; any other slice goes through safetensors' memory-mapped
`safe_open(...).get_slice`.

    report = load_into(model, "weights/sage-tiny-base", INTERNVL_KEY_MAP)  # model on meta
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from safetensors import safe_open

from sage.names import map_key
from sage.safetensors_io import (INDEX_FILE, SINGLE_FILE, TensorInfo, read_checkpoint_index,
                                 read_metadata)

# ----------------------------------------------------------------------------- model tensors

_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
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
                out[canonical_name(prefix + n)] = p
        for n, b in m._buffers.items():
            if b is not None and n not in m._non_persistent_buffers_set:
                out[canonical_name(prefix + n)] = b
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


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2 / tensor-parallel shard); a plain tensor itself."""
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
    sl, local = _local_slices(dst), local_tensor(dst)
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


@torch.no_grad()
def init_fresh(module: nn.Module, seed: int) -> None:
    """module.init_weights() drawn as one process would draw it, on any number of ranks.

    A sharded parameter (DTensor) initialised in place would draw each rank's shard from that
    rank's generator: other weights at every world size. Instead every rank draws the whole
    (small: SAGE's fusion and head) tensors from one seeded generator and keeps its slice.
    """
    swapped = []  # (owner module, name, sharded parameter)
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and _local_slices(p) is not None:
                full = torch.empty(p.shape, dtype=p.dtype, device=local_tensor(p).device)
                swapped.append((sub, name, p))
                sub._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
    devices = sorted({p.device.index for _, _, p in swapped if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # the caller's generators stay untouched
        torch.manual_seed(seed)
        module.init_weights()
    for sub, name, p in swapped:
        local_tensor(p).copy_(sub._parameters[name][_local_slices(p)])
        sub._parameters[name] = p


def load_into(model: nn.Module, directory: str | os.PathLike, key_map: dict[str, str | None],
              dtype: torch.dtype | None = None, strict: bool = True,
              new_ok: Iterable[str] = (), device: torch.device | str | None = None,
              init_seed: int = 0) -> LoadReport:
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
    the report says so (init_fresh: drawn from init_seed, the same weights on any number of
    ranks). Computed, non-persistent buffers are never expected.
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
            init_fresh(owner, init_seed)
            report.initialised.append(prefix)
    report.bytes_read = _stream(ckpt, pairs, params)
    report.n_loaded = len(pairs)
    report.seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------- config check

CONFIG_METADATA = "sage.config"  # safetensors __metadata__ key: config.json content at export
# config.json fields a user may change after export: they do not change what the weights
# compute (vocab_size is taken from the embedding table, as InternVL2 needs).
EDITABLE_FIELDS = frozenset({"system_message", "dynamic_image_size", "use_thumbnail",
                             "max_dynamic_patch", "min_dynamic_patch", "vocab_size"})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_config_metadata(config, directory: str | os.PathLike) -> None:
    """Refuse weights whose shapes fit but whose config does not: the config.json content
    recorded at export (the single file's header, or the index's "metadata"; absent from
    other checkpoints: nothing to check) must agree with `config` on every field but
    EDITABLE_FIELDS. Raises ValueError naming the file and each differing key, both values."""
    directory = Path(directory)
    file = directory / INDEX_FILE
    if file.is_file():
        try:
            recorded = (json.loads(file.read_text()).get("metadata") or {}).get(CONFIG_METADATA)
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{file}: not a checkpoint index ({e})") from None
    elif (directory / SINGLE_FILE).is_file():
        file = directory / SINGLE_FILE
        recorded = read_metadata(file).get(CONFIG_METADATA)
    else:
        return
    if recorded is None:
        return
    try:
        then = _flat(json.loads(recorded))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: __metadata__[{CONFIG_METADATA!r}] is not JSON ({e})") from None
    now = _flat(config.to_dict())
    diff = [f"{k}: {then[k]!r} at export, {now[k]!r} now" for k in sorted(then.keys() & now.keys())
            if then[k] != now[k] and k.rsplit(".", 1)[-1] not in EDITABLE_FIELDS]
    if diff:
        raise ValueError(f"{file}: the weights were exported with another config than "
                         f"{directory / 'config.json'} gives: " + "; ".join(diff))
