"""Tensor-parallel inference: one model sharded over the ranks of a `--tp N` group.

A 40B model does not fit one 80 GiB GPU with its KV cache, so evaluation, fact generation and
E-DPO's reference pass shard it Megatron-style with DTensor plans (no training here):

    Llama block   q/k/v_proj, gate/up_proj column-wise (each rank: H/N query heads, Hkv/N KV
                  heads, ffn/N channels), o_proj, down_proj row-wise (one all-reduce each);
                  the KV cache holds this rank's Hkv/N heads only
    embeddings    vocabulary rows split, lookups all-reduced
    LM head       vocabulary columns split, logits gathered once per forward
    adapter       fc1 column-wise, fc2 row-wise
    InternViT     the MLP of every block column/row-wise; attention replicated (InternViT-6B
                  has 25 heads, which no power-of-two group divides, and its qk-norm spans all
                  heads at once), as are norms, layer scales, embeddings
    fusion, head  replicated (4 C^2 parameters; Eq. 1's top-K runs on replicated features)

Yi-34B on 8 ranks: 56 / 8 = 7 query heads and 8 / 8 = 1 KV head per rank. Contiguous head
chunks keep grouped-query attention intact: query head h reads KV head h // (H / Hkv), and
rank r holds query heads [r H/N, (r+1) H/N) and KV heads [r Hkv/N, (r+1) Hkv/N).

The world is data-parallel x tensor-parallel: `model_copies(dist, tp)` places this rank in a
("dp", "tp") mesh with tp consecutive ranks per model copy (one node's GPUs). Every rank of a
copy must run the same forwards on the same batch; different copies take different records.

    copies = model_copies(dist, tp=2)
    model = load_sharded("weights/sage-tiny-base", copies.tp_mesh, dtype=torch.float32)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)

from sage.checkpoint import load_into
from sage.config import SageConfig
from sage.distributed import DistInfo
from sage.models.llama import Llama
from sage.models.sage import SageModel
from sage.safetensors_io import checkpoint_dtype, read_checkpoint_index


@dataclass
class Copies:
    """Where this rank stands in a data-parallel x tensor-parallel world."""

    tp_mesh: DeviceMesh | None  # the ranks holding one model copy (None: tp = 1, no sharding)
    dp_rank: int  # which copy: the records are split over the copies
    dp_size: int  # how many copies
    writer: bool  # the first rank of its copy, which speaks for it in gathers


def model_copies(dist: DistInfo, tp: int) -> Copies:
    """World = dp x tp: a ("dp", "tp") mesh with tp consecutive ranks (one node's GPUs) per
    model copy. tp = 1: every rank is its own copy, no mesh."""
    if tp < 1 or dist.world_size % tp:
        raise ValueError(f"--tp {tp} must divide the world size {dist.world_size} "
                         "(world = data-parallel x tensor-parallel)")
    if tp == 1:
        return Copies(None, dist.rank, dist.world_size, True)
    mesh = init_device_mesh(dist.device.type, (dist.world_size // tp, tp),
                            mesh_dim_names=("dp", "tp"))
    return Copies(mesh["tp"], mesh["dp"].get_local_rank(), mesh["dp"].size(),
                  mesh["tp"].get_local_rank() == 0)


def check_divisible(cfg: SageConfig, tp: int) -> None:
    """Every head-split dimension must divide by tp; raises ValueError naming the field.

    The vocabulary need not: DTensor shards it unevenly (InternVL2 adds 7 tokens to Yi's
    64000, and 64007 rows split over 8 ranks as 8001 x 7 + 8000)."""
    need = {"llm.n_heads": cfg.llm.n_heads, "llm.n_kv_heads": cfg.llm.n_kv_heads,
            "llm.ffn_dim": cfg.llm.ffn_dim, "llm.dim (adapter)": cfg.llm.dim,
            "vision.ffn_dim": cfg.vision.ffn_dim}
    bad = [f"{k} = {v}" for k, v in need.items() if v % tp]
    if bad:
        raise ValueError(f"--tp {tp} does not divide {', '.join(bad)}; choose a tp that "
                         f"divides all of them (Yi-34B: 1, 2, 4 or 8)")


def shard_llm(llm: Llama, tp_mesh: DeviceMesh) -> Llama:
    """The Llama part of the plans (blocks, embeddings, LM head), in place; heads must divide
    (check_divisible)."""
    tp = tp_mesh.size()
    for block in llm.layers:
        parallelize_module(block, tp_mesh, {
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel()})
        block.self_attn.n_heads //= tp  # this rank's query heads
        block.self_attn.n_kv_heads //= tp  # this rank's KV heads (and KV cache)
    parallelize_module(llm, tp_mesh, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate())})  # logits gathered once
    return llm


def shard_tensor_parallel(model: SageModel, tp_mesh: DeviceMesh) -> SageModel:
    """Apply the plans of the module docstring in place (on meta or materialised weights).

    Attention modules keep their per-rank head counts in `n_heads` / `n_kv_heads`, which is
    what their forward and Llama.new_cache read, so the model code has no TP branch.
    """
    check_divisible(model.cfg, tp_mesh.size())
    shard_llm(model.llm, tp_mesh)
    parallelize_module(model.adapter, tp_mesh, {"fc1": ColwiseParallel(),
                                                "fc2": RowwiseParallel()})
    for block in model.vision.encoder.layers:
        parallelize_module(block.mlp, tp_mesh, {"fc1": ColwiseParallel(),
                                                "fc2": RowwiseParallel()})
    return model


def load_sharded(path: str | os.PathLike, tp_mesh: DeviceMesh, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None,
                 cfg: SageConfig | None = None) -> SageModel:
    """SageModel from an InternVL2-layout directory, sharded over tp_mesh for inference.

    Built on meta, sharded, materialised, then each rank reads only its own slices from the
    safetensors shards (sage.checkpoint.load_into); no rank ever holds the whole model.
    cfg: the directory's config with a run's overrides (default: its config.json).
    """
    path = Path(path)
    cfg = cfg or SageModel.config_for(path, read_checkpoint_index(path))
    with torch.device("meta"):
        model = SageModel(cfg)
    model.to(dtype or checkpoint_dtype(path))
    shard_tensor_parallel(model, tp_mesh)
    model.to_empty(device=device or tp_mesh.device_type)
    # load_into initialises SAGE's own modules when the checkpoint has none (plain InternVL2)
    model.load_report = load_into(model, path, model.key_map, strict=True,
                                  new_ok=("fusion.", "fact_proj."))
    model.attach_tokenizer(path)
    return model.eval()
