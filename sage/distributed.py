"""Distributed plumbing: process group, FSDP2 recipe, rank-0 printing (STYLE §7).

Every script calls the same functions at any world size: under `torchrun` the process group
comes from the environment (NCCL on CUDA, gloo on CPU); a plain `python script.py` gets a
one-rank group on an in-memory store, so FSDP2 and the collectives below take one code path.

    dist = init_distributed(); shard_model(model, dist); print0("hello"); cleanup()
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Start (or join) the process group. device: "cuda" / "cpu" / None = CUDA if available."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:  # launched by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local)
        if not td.is_initialized():
            td.init_process_group(backend)
    else:
        rank, world, local = 0, 1, 0
        if not td.is_initialized():
            td.init_process_group(backend, store=td.HashStore(), rank=0, world_size=1)
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if not use_cuda and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one machine share its cores: oversubscription makes every rank slower
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(rank, world, local, dev)


def cleanup() -> None:
    if td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (never rebinds the builtin)."""
    if not td.is_initialized() or td.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if td.is_initialized():
        td.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); identity without a process group."""
    x = x.clone()
    if td.is_initialized() and td.get_world_size() > 1:
        td.all_reduce(x)
    return x


def gather_objects(obj) -> list:
    """All ranks' Python objects, in rank order, on every rank."""
    if not td.is_initialized() or td.get_world_size() == 1:
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not td.is_initialized() or td.get_world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def shard_model(model: nn.Module, device: torch.device, bf16: bool | None = None,
                activation_checkpointing: bool = False, cpu_offload: bool = False) -> nn.Module:
    """FSDP2 recipe (DESIGN §2, STYLE §7) for a SageModel built on the meta device.

    fully_shard each InternViT block (6B parameters are too many to gather as one unit), each
    LLM block, the token embeddings, the final norm + LM head together, then the root (adapter,
    fusion, head, ViT embeddings). bf16 parameters with fp32 gradient reduction on CUDA; on CPU
    everything stays fp32 (bf16 brings no speed there). Set requires_grad before calling.
    cpu_offload keeps sharded parameters, gradients and optimizer state in host memory.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    bf16 = device.type == "cuda" if bf16 is None else bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32,
                              reduce_dtype=torch.float32)
    kw = {"mp_policy": mp}
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    model.vision.grad_checkpointing = activation_checkpointing
    model.llm.grad_checkpointing = activation_checkpointing
    if bf16:  # the frozen InternViT is kept in bf16 (no fp32 master copy is needed)
        model.vision.to(torch.bfloat16)
    fully_shard(model.vision.embeddings, **kw)  # frozen units stay apart from trainable ones
    for block in model.vision.encoder.layers:
        fully_shard(block, **kw)
    for block in model.llm.layers:
        fully_shard(block, **kw)
    fully_shard(model.llm.embed_tokens, **kw)
    # norm + lm_head as one unit: both are needed together at the end of the forward
    fully_shard([model.llm.norm, model.llm.lm_head], reshard_after_forward=False, **kw)
    fully_shard(model, **kw)
    return model
