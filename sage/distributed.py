"""Distributed plumbing: process group, collectives, rank-0 printing and the FSDP2 recipe
(which parameters train, how the model is sharded, built and optimised; docs/design.md §8.7).

Every script calls the same functions at any world size: under `torchrun` the process group
comes from the environment (NCCL on CUDA, gloo on CPU); a plain `python script.py` gets a
one-rank group on an in-memory store, so FSDP2 and the collectives below take one code path.

    dist = init_distributed(); model = build_model(cfg, dist, "weights/x", stage="sfe")
    optimizer = build_optimizer(model, lr, weight_decay, dist.device); print0("hi"); cleanup()
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td
import torch.nn as nn

from sage.checkpoint import load_into
from sage.config import SageConfig
from sage.models.sage import SageModel

# Trainable groups (docs/design.md §2): InternViT is frozen in every stage.
TRAINABLE = {
    "pretrain": ("adapter.", "llm."),
    "sfe": ("adapter.", "fusion.", "fact_proj.", "llm."),
    "edpo": ("adapter.", "llm."),
    "frozen": (),  # the E-DPO reference model
}
NEW_MODULES = ("fusion.", "fact_proj.")  # SAGE's own keys: absent from a plain InternVL2 dir


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


def set_trainable(model: nn.Module, prefixes: tuple[str, ...]) -> tuple[int, int]:
    """requires_grad = True exactly for parameters under `prefixes`; -> (trainable, frozen)
    parameter counts."""
    n_train = n_frozen = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        n_train += p.numel() if p.requires_grad else 0
        n_frozen += 0 if p.requires_grad else p.numel()
    return n_train, n_frozen


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def fsdp_units(model: SageModel) -> list[nn.Module | list[nn.Module]]:
    """The FSDP2 units below the root, in the order shard_model wraps them (a list is one unit).

    The ViT embeddings alone (frozen units stay apart from trainable ones), each InternViT
    block (6B parameters are too many to gather as one unit), each LLM block, the token
    embeddings, and the final norm + LM head together (both needed at the end of the forward).
    The root unit (adapter, fusion, head) is the model itself.
    """
    return [model.vision.embeddings, *model.vision.encoder.layers, *model.llm.layers,
            model.llm.embed_tokens, [model.llm.norm, model.llm.lm_head]]


def shard_model(model: SageModel, device: torch.device, bf16: bool | None = None,
                activation_checkpointing: bool = False, cpu_offload: bool = False) -> nn.Module:
    """FSDP2 recipe (docs/design.md §2, §8.7) for a SageModel built on the meta device.

    fully_shard every unit of `fsdp_units`, then the root. bf16 parameters with fp32 gradient
    reduction on CUDA; on CPU everything stays fp32 (bf16 brings no speed there). Set
    requires_grad before calling. cpu_offload keeps sharded parameters, gradients and optimizer
    state in host memory.
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
    if bf16:  # frozen weights are kept in bf16 (no fp32 master copy is needed): InternViT,
        # and the whole E-DPO reference model (as sage.plan counts it)
        frozen = not any(p.requires_grad for p in model.parameters())
        (model if frozen else model.vision).to(torch.bfloat16)
    for unit in fsdp_units(model):
        # norm + lm_head (the list) run last in the forward, first in the backward: stay gathered
        fully_shard(unit, **kw, **({"reshard_after_forward": False} if isinstance(unit, list)
                                   else {}))
    fully_shard(model, **kw)
    return model


def build_model(cfg: SageConfig, dist: DistInfo, init_dir: str | None, stage: str,
                activation_checkpointing: bool = False, cpu_offload: bool = False,
                bf16: bool | None = None, init_seed: int = 0) -> SageModel:
    """Meta build -> freeze -> FSDP2 shard -> materialise -> fill this rank's shards.

    init_dir None: fresh weights (sage.tools.pretrain). Otherwise an InternVL2-layout
    directory; SAGE's fusion/head keys may be absent (a plain InternVL2 checkpoint) and are
    then initialised fresh from init_seed (the same weights at every world size) and reported.
    """
    with torch.device("meta"):
        model = SageModel(cfg)
    set_trainable(model, TRAINABLE[stage])
    shard_model(model, dist.device, bf16=bf16, activation_checkpointing=activation_checkpointing,
                cpu_offload=cpu_offload)
    model.to_empty(device=dist.device)
    with torch.no_grad():
        model.init_weights()
    if init_dir is not None:
        report = load_into(model, init_dir, model.key_map, strict=True, new_ok=NEW_MODULES,
                           init_seed=init_seed)
        print0(f"loaded {init_dir}: {report}")
    return model


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW over trainable parameters only (fused on CUDA); no decay on norms and biases."""
    decay, no_decay = [], []
    for p in trainable_params(model):
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
