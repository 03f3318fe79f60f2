"""Per-rank GPU memory plan for FSDP2 training, computed from the config alone (no allocation).

Model state per rank (FSDP2 shards every parameter over `world` ranks):
  master parameters   fp32 (4 B) for trainable params; frozen ones stay in the load dtype
  gradients           fp32 (4 B) sharded, trainable only (reduce_dtype fp32)
  AdamW moments       2 x fp32 (8 B) sharded, trainable only
  working copies      the largest FSDP unit all-gathered in the compute dtype, x2 (prefetch)
Activations per micro-batch of T tokens, LLM width C, L layers, FFN width F, H heads:
  no checkpointing    per layer ~ T (34 C + 5 F) bytes in bf16 (attention via SDPA/flash,
                      so no T^2 term) plus the logits T V (fp32 for the loss, twice)
  checkpointing       one bf16 (T, C) input per layer kept + one layer's full activations
E-DPO adds the reference model: sharded bf16 weights (2 B / world), unless its log-probs are
precomputed (train_edpo.py --ref_cache), and sequences are chosen + rejected (2x tokens).

    print(format_plan(plan_memory(SageConfig.preset("internvl2-40b"), world=8)))
"""

from __future__ import annotations

from dataclasses import dataclass

from sage.config import SageConfig

GIB = 2**30


def count_params(cfg: SageConfig) -> dict[str, int]:
    """Parameter counts per component, from the config (matches the modules' numel)."""
    v, m = cfg.vision, cfg.llm
    norm = v.dim * (2 if v.norm_type == "layer_norm" else 1)
    vit_block = (3 * v.dim * v.dim + (3 * v.dim if v.qkv_bias else 0)  # qkv
                 + (2 * v.dim if v.use_qk_norm else 0)  # q_norm, k_norm
                 + v.dim * v.dim + v.dim  # proj
                 + 2 * v.dim  # ls1, ls2
                 + 2 * norm  # norm1, norm2
                 + 2 * v.dim * v.ffn_dim + v.ffn_dim + v.dim)  # fc1, fc2
    vit = (v.dim + v.n_channels * v.patch_size**2 * v.dim + v.dim  # cls, patch conv
           + (v.n_patches + 1) * v.dim + v.n_layers * vit_block)
    a = cfg.adapter_in_dim
    adapter = 2 * a + a * m.dim + m.dim + m.dim * m.dim + m.dim
    llm_block = (2 * m.dim * m.dim + 2 * m.dim * m.n_kv_heads * m.head_dim
                 + 3 * m.dim * m.ffn_dim + 2 * m.dim)
    embed = m.vocab_size * m.dim
    llm = embed * (1 if m.tie_embeddings else 2) + m.n_layers * llm_block + m.dim
    fusion = 4 * (m.dim * m.dim + m.dim)
    head = 2 * m.dim + m.dim * m.dim + m.dim
    return {"vision": vit, "adapter": adapter, "llm": llm, "fusion": fusion, "fact_proj": head,
            "llm_block": llm_block, "vit_block": vit_block, "embed": embed}


@dataclass
class Plan:
    rows: list[tuple[str, float]]  # (item, GiB per rank)
    total: float
    budget: float
    fits: bool
    notes: list[str]


def plan_memory(cfg: SageConfig, world: int = 8, gpu_gib: float = 80.0, micro_batch: int = 1,
                seq_len: int = 2048, stage: str = "sfe", activation_checkpointing: bool = True,
                ref_cache: bool = False, cpu_offload: bool = False,
                headroom: float = 0.9) -> Plan:
    """Per-rank memory of SFE ("sfe") or E-DPO ("edpo") training; GiB per rank."""
    n = count_params(cfg)
    m = cfg.llm
    trainable = n["adapter"] + n["llm"] + (n["fusion"] + n["fact_proj"] if stage == "sfe" else 0)
    frozen = n["vision"] + (0 if stage == "sfe" else n["fusion"] + n["fact_proj"])
    T = seq_len * micro_batch * (2 if stage == "edpo" else 1)
    # FSDP2 CPUOffloadPolicy keeps sharded params, gradients and optimizer state in host RAM
    on_gpu = 0.0 if cpu_offload else 1.0
    where = " [CPU-offloaded: 0 on GPU]" if cpu_offload else ""
    rows = [
        ("master params fp32 (trainable, sharded)" + where, on_gpu * 4 * trainable / world),
        ("frozen params bf16 (InternViT, sharded)" + where, on_gpu * 2 * frozen / world),
        ("gradients fp32 (sharded)" + where, on_gpu * 4 * trainable / world),
        ("AdamW moments 2x fp32 (sharded)" + where, on_gpu * 8 * trainable / world),
        ("all-gathered bf16 unit x2 (prefetch)", 2 * 2 * max(n["llm_block"], n["embed"],
                                                               n["vit_block"])),
    ]
    per_layer_full = T * (34 * m.dim + 5 * m.ffn_dim)  # bf16 bytes, flash-style attention
    if activation_checkpointing:
        act = m.n_layers * T * m.dim * 2 + per_layer_full
    else:
        act = m.n_layers * per_layer_full
    rows.append((f"activations ({'checkpointed' if activation_checkpointing else 'full'}, "
                 f"{T} tokens)", act))
    rows.append(("logits + loss (fp32, 2 copies)", 2 * 4 * T * m.vocab_size))
    if stage == "edpo" and not ref_cache:
        rows.append(("E-DPO reference model bf16 (sharded)" + where,
                     on_gpu * 2 * (trainable + frozen) / world))
    rows = [(k, v / GIB) for k, v in rows]
    total = sum(v for _, v in rows)
    budget = gpu_gib * headroom
    notes = []
    if total > budget:
        notes.append(_what_fits(cfg, world, gpu_gib, micro_batch, seq_len, stage,
                                activation_checkpointing, ref_cache, cpu_offload, headroom))
    return Plan(rows, total, budget, total <= budget, notes)


def _what_fits(cfg, world, gpu_gib, micro_batch, seq_len, stage, ac, ref_cache, cpu_offload,
               headroom) -> str:
    """The first single change (in order of cost to the user) that brings the plan in budget."""
    options = []
    if not ac:
        options.append(("--activation_checkpointing", dict(activation_checkpointing=True)))
    if stage == "edpo" and not ref_cache:
        options.append(("--ref_cache (precomputed reference log-probs)", dict(ref_cache=True)))
    if micro_batch > 1:
        options.append(("--micro_batch 1", dict(micro_batch=1)))
    if not cpu_offload:
        options.append(("--cpu_offload (FSDP2 CPUOffloadPolicy; slower steps)",
                        dict(cpu_offload=True)))
    options.append((f"world size {world * 2} (2 nodes)", dict(world=world * 2)))
    base = dict(world=world, gpu_gib=gpu_gib, micro_batch=micro_batch, seq_len=seq_len,
                stage=stage, activation_checkpointing=ac, ref_cache=ref_cache,
                cpu_offload=cpu_offload, headroom=headroom)
    for flag, change in options:
        p = plan_memory(cfg, **{**base, **change})
        if p.fits:
            return f"does not fit; it fits with {flag}: {p.total:.1f} GiB per rank"
    return "does not fit with any single option; combine them or use CPU optimizer offload"


def format_plan(p: Plan, title: str = "") -> str:
    lines = [title] if title else []
    lines += [f"  {k:<46} {v:8.2f} GiB" for k, v in p.rows]
    lines.append(f"  {'total per rank':<46} {p.total:8.2f} GiB  (budget {p.budget:.1f} GiB: "
                 f"{'fits' if p.fits else 'DOES NOT FIT'})")
    lines += [f"  -> {n}" for n in p.notes]
    return "\n".join(lines)
