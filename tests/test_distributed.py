"""sage.distributed's FSDP2 recipe: which parameters train in each stage, which modules become
FSDP units (and which stay gathered), the optimizer's parameter groups. One-rank gloo group in
this process; 2-rank runs are in tests/test_scripts.py.
Run: python -m pytest -q tests/test_distributed.py"""

import pytest
import torch

from sage.distributed import (TRAINABLE, build_optimizer, cleanup, fsdp_units, init_distributed,
                              set_trainable, shard_model)
from sage.models.sage import SageModel


@pytest.fixture
def meta_model(tiny_cfg):
    with torch.device("meta"):
        return SageModel(tiny_cfg)


def _trained_parts(model) -> set[str]:
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage,parts", [
    ("pretrain", {"adapter", "llm"}),
    ("sfe", {"adapter", "fusion", "fact_proj", "llm"}),
    ("edpo", {"adapter", "llm"}),  # fusion and its head frozen in Stage 2
    ("frozen", set()),  # the E-DPO reference
])
def test_trainable_sets_per_stage(meta_model, stage, parts):
    n_train, n_frozen = set_trainable(meta_model, TRAINABLE[stage])
    assert _trained_parts(meta_model) == parts  # InternViT is never trained
    total = sum(p.numel() for p in meta_model.parameters())
    want = sum(p.numel() for n, p in meta_model.named_parameters() if n.split(".")[0] in parts)
    assert (n_train, n_frozen) == (want, total - want)


def test_fsdp_units_cover_blocks_and_leave_the_sage_modules_to_the_root(meta_model):
    units = fsdp_units(meta_model)
    names = {id(m): n for n, m in meta_model.named_modules()}
    flat = [[names[id(m)] for m in u] if isinstance(u, list) else names[id(u)] for u in units]
    assert flat == ["vision.embeddings",
                    *[f"vision.encoder.layers.{i}" for i in range(4)],
                    *[f"llm.layers.{i}" for i in range(4)],
                    "llm.embed_tokens", ["llm.norm", "llm.lm_head"]]
    # every parameter outside the units is the root's: the adapter, fusion and its head
    prefixes = tuple(n + "." for f in flat for n in (f if isinstance(f, list) else [f]))
    root = {n.split(".")[0] for n, _ in meta_model.named_parameters()
            if not n.startswith(prefixes)}
    assert root == {"adapter", "fusion", "fact_proj"}


def test_shard_model_on_one_rank(meta_model):
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    set_trainable(meta_model, TRAINABLE["sfe"])
    dist = init_distributed("cpu")
    try:
        shard_model(meta_model, dist.device)
        sharded = {n for n, m in meta_model.named_modules() if isinstance(m, FSDPModule)}
        assert sharded == {"", "vision.embeddings", "llm.embed_tokens", "llm.norm", "llm.lm_head",
                           *[f"vision.encoder.layers.{i}" for i in range(4)],
                           *[f"llm.layers.{i}" for i in range(4)]}
        head = fully_shard.state(meta_model.llm.norm)
        assert head is fully_shard.state(meta_model.llm.lm_head)  # one unit for both
        # the head unit stays gathered after the forward (backward starts there); blocks reshard
        assert head._fsdp_param_group.post_forward_mesh_info is None
        block = fully_shard.state(meta_model.llm.layers[0])._fsdp_param_group
        assert block.post_forward_mesh_info is not None
        mp = fully_shard.state(meta_model)._mp_policy
        assert mp.param_dtype == torch.float32 and mp.reduce_dtype == torch.float32  # CPU: fp32
        assert all(isinstance(p, DTensor) for p in meta_model.parameters())
        assert _trained_parts(meta_model) == {"adapter", "fusion", "fact_proj", "llm"}
    finally:
        cleanup()


def test_optimizer_over_trainable_params_without_decay_on_vectors(meta_model):
    set_trainable(meta_model, TRAINABLE["edpo"])
    opt = build_optimizer(meta_model, 1e-4, 0.1, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in meta_model.parameters() if p.requires_grad}
    assert decay["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)
