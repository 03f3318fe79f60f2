"""Per-rank GPU memory plan for FSDP2 training, computed from the config alone (no allocation).

Model state per rank, held throughout (FSDP2 shards every parameter over `world` ranks):
  master parameters   fp32 (4 B) for trainable params; frozen ones stay in the load dtype
  AdamW moments       2 x fp32 (8 B) sharded, trainable only
  working copies      the largest FSDP unit all-gathered in the compute dtype, x2 (prefetch)
Two phases, the total is the state plus the larger of them:
  forward / backward  activations of one micro-batch of T tokens (LLM width C, L layers, FFN
                      width F): no checkpointing, per layer ~ T (34 C + 5 F) bytes in bf16
                      (attention via SDPA/flash, no T^2 term); checkpointing, one bf16 (T, C)
                      input per layer + one layer's full activations; plus the logits: at
                      every token (T V fp32, twice: what sage.tools.bench.train_step runs),
                      or, as the training scripts run them (SageModel.forward answer_only),
                      only at the answer tokens (bf16 rows and their gradient, one fp32
                      chunk of the log-softmax). With gradient accumulation the sharded
                      gradients of the earlier micro-batches and a unit's reduce-scatter (below)
                      are alive too.
  gradient reduction  (end of the backward, the optimizer step) the sharded fp32 gradients
                      (4 B, reduce_dtype fp32), plus one unit's reduce-scatter: its unsharded
                      bf16 gradients and their fp32 copy-in buffer (6 B x the unit).
Gradients do not exist during the forward (zero_grad(set_to_none=True)) and activations are
freed as the backward produces gradients, so without accumulation the two do not add up.
The training scripts reduce-scatter after every micro-batch: with
`set_requires_gradient_sync(False)` FSDP2 would keep every rank's *unsharded* gradients in
fp32 (4 B x all trainable parameters per rank, 130 GiB for InternVL2-40B).
E-DPO adds the reference model: sharded bf16 weights (2 B / world), unless its log-probs are
precomputed (train_edpo.py --ref_cache); an instance is one packed row, its prompt once and
its answers (up to L = 4) as segments (sage.data.collate.EDPOCollator): seq_len + (L - 1)
(answer_tokens + 1) tokens.

Inference (`plan_inference`: evaluate.py, sage.tools.facts, E-DPO's reference pass) holds the
weights in bf16, sharded over a --tp group as sage.tensor_parallel shards them (LLM, adapter,
InternViT MLPs; InternViT attention, norms, fusion replicated), the KV cache of its share of
the KV heads, and the larger transient: one InternViT layer over every tile of a batch, or one
LLM layer over the prompt tokens of a batch.

    print(format_plan(plan_memory(SageConfig.preset("internvl2-40b"), world=8)))
    plans = plan_jobs(SageConfig.preset("internvl2-40b"), world=8, gpu_gib=80)
"""

from __future__ import annotations

from dataclasses import dataclass

from sage.config import SageConfig
from sage.data.prompts import FACT_PROMPTS

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
    rows: list[tuple[str, float, str]]  # (item, GiB per rank, "state" or the phase it is in)
    total: float  # state + the larger phase
    budget: float
    fits: bool
    notes: list[str]
    phases: dict[str, float]  # GiB of each phase's own rows


def plan_memory(cfg: SageConfig, world: int = 8, gpu_gib: float = 80.0, micro_batch: int = 1,
                seq_len: int = 2048, stage: str = "sfe", activation_checkpointing: bool = True,
                ref_cache: bool = False, cpu_offload: bool = False,
                headroom: float = 0.9, accumulation: int = 1,
                answer_tokens: int | None = None, n_answers: int = 4) -> Plan:
    """Per-rank memory of SFE ("sfe") or E-DPO ("edpo") training; GiB per rank.

    `accumulation`: micro-batches per optimizer step (global batch / (world x micro-batch)).
    `answer_tokens`: logits only at this many answer tokens per sequence (the training
    scripts; E-DPO rows packed) or None: logits at every token, unpacked chosen + rejected.
    """
    if accumulation < 1:
        raise ValueError(f"plan_memory: accumulation={accumulation} must be >= 1")
    n = count_params(cfg)
    m = cfg.llm
    trainable = n["adapter"] + n["llm"] + (n["fusion"] + n["fact_proj"] if stage == "sfe" else 0)
    frozen = n["vision"] + (0 if stage == "sfe" else n["fusion"] + n["fact_proj"])
    if stage == "edpo" and answer_tokens is not None:  # packed: one row per instance
        T = micro_batch * (seq_len + (n_answers - 1) * (answer_tokens + 1))
    else:
        T = seq_len * micro_batch * (2 if stage == "edpo" else 1)
    unit = max(n["llm_block"], n["embed"], n["vit_block"])  # largest FSDP unit
    # FSDP2 CPUOffloadPolicy keeps sharded params, gradients and optimizer state in host RAM
    on_gpu = 0.0 if cpu_offload else 1.0
    where = " [CPU-offloaded: 0 on GPU]" if cpu_offload else ""
    state = [
        ("master params fp32 (trainable, sharded)" + where, on_gpu * 4 * trainable / world),
        ("frozen params bf16 (InternViT, sharded)" + where, on_gpu * 2 * frozen / world),
        ("AdamW moments 2x fp32 (sharded)" + where, on_gpu * 8 * trainable / world),
        ("all-gathered bf16 unit x2 (prefetch)", 2 * 2 * unit),
    ]
    if stage == "edpo" and not ref_cache:
        state.append(("E-DPO reference model bf16 (sharded)" + where,
                      on_gpu * 2 * (trainable + frozen) / world))
    grads = [("gradients fp32 (sharded)" + where, on_gpu * 4 * trainable / world),
             ("one unit's reduce-scatter (bf16 grads + fp32 copy-in)", 6 * unit)]
    per_layer_full = T * (34 * m.dim + 5 * m.ffn_dim)  # bf16 bytes, flash-style attention
    if activation_checkpointing:
        act = m.n_layers * T * m.dim * 2 + per_layer_full
    else:
        act = m.n_layers * per_layer_full
    forward = [(f"activations ({'checkpointed' if activation_checkpointing else 'full'}, "
                f"{T} tokens)", act),
               logits_row(T, micro_batch * (n_answers if stage == "edpo" else 1),
                          answer_tokens, m.vocab_size)]
    if accumulation > 1:  # earlier micro-batches' gradients stay while this one runs
        forward += [(f"{k} [accumulation {accumulation}]", v) for k, v in grads]
    phases = {"forward / backward": forward, "gradient reduction": grads}
    rows = [(k, v / GIB, "state") for k, v in state]
    rows += [(k, v / GIB, ph) for ph, items in phases.items() for k, v in items]
    peak = {ph: sum(v for _, v, p in rows if p == ph) for ph in phases}
    total = sum(v for _, v, p in rows if p == "state") + max(peak.values())
    budget = gpu_gib * headroom
    notes = []
    if total > budget:
        notes.append(_what_fits(cfg, world, gpu_gib, micro_batch, seq_len, stage,
                                activation_checkpointing, ref_cache, cpu_offload, headroom,
                                accumulation, answer_tokens, n_answers))
    return Plan(rows, total, budget, total <= budget, notes, peak)


def logits_row(T: int, n_sequences: int, answer_tokens: int | None,
               vocab: int) -> tuple[str, float]:
    """The plan row of the logits: every token (fp32, 2 copies) or answer tokens only (bf16
    rows + their gradient, and one 1024-row fp32 chunk of the log-softmax, twice)."""
    if answer_tokens is None:
        return "logits + loss (fp32, 2 copies)", 2 * 4 * T * vocab
    rows = n_sequences * answer_tokens
    return (f"logits at {rows} answer tokens (bf16 + grad, fp32 chunk)",
            4 * rows * vocab + 2 * 4 * 1024 * vocab)


def _what_fits(cfg, world, gpu_gib, micro_batch, seq_len, stage, ac, ref_cache, cpu_offload,
               headroom, accumulation, answer_tokens, n_answers) -> str:
    """The first single change (in order of cost to the user) that brings the plan in budget."""
    options = []
    if not ac:
        options.append(("--activation_checkpointing", dict(activation_checkpointing=True)))
    if stage == "edpo" and not ref_cache:
        options.append(("--ref_cache (precomputed reference log-probs)", dict(ref_cache=True)))
    if micro_batch > 1:
        options.append(("--micro_batch 1", dict(micro_batch=1,
                                                     accumulation=accumulation * micro_batch)))
    if not cpu_offload:
        options.append(("--cpu_offload (FSDP2 CPUOffloadPolicy; slower steps)",
                        dict(cpu_offload=True)))
    options.append((f"world size {world * 2} (2 nodes)",
                    dict(world=world * 2, accumulation=max(1, accumulation // 2))))
    base = dict(world=world, gpu_gib=gpu_gib, micro_batch=micro_batch, seq_len=seq_len,
                stage=stage, activation_checkpointing=ac, ref_cache=ref_cache,
                cpu_offload=cpu_offload, headroom=headroom, accumulation=accumulation,
                answer_tokens=answer_tokens, n_answers=n_answers)
    for flag, change in options:
        p = plan_memory(cfg, **{**base, **change})
        if p.fits:
            return f"does not fit; it fits with {flag}: {p.total:.1f} GiB per rank"
    return "does not fit with any single option; combine them or use CPU optimizer offload"


def format_plan(p: Plan, title: str = "") -> str:
    lines = [title] if title else []
    for ph in ("state", *p.phases):
        peak = ph != "state" and p.phases[ph] == max(p.phases.values())
        head = ("held throughout" if ph == "state" else
                f"{ph} ({p.phases[ph]:.2f} GiB{', the peak' if peak else ''})")
        lines.append(f"  {head}")
        lines += [f"    {k:<58} {v:8.2f} GiB" for k, v, where in p.rows if where == ph]
    lines.append(f"  {'total per rank (held + larger phase)':<60} {p.total:8.2f} GiB  (budget "
                 f"{p.budget:.1f} GiB: {'fits' if p.fits else 'DOES NOT FIT'})")
    lines += [f"  -> {n}" for n in p.notes]
    return "\n".join(lines)


def inference_weights(cfg: SageConfig, tp: int) -> dict[str, float]:
    """Parameters one rank holds under sage.tensor_parallel with `tp` ranks per copy."""
    n, v, m = count_params(cfg), cfg.vision, cfg.llm
    vit_mlp = 2 * v.dim * v.ffn_dim + v.ffn_dim  # fc1 + fc2 weights, fc1 bias (split)
    vision = n["vision"] - v.n_layers * vit_mlp * (1 - 1 / tp)
    block_norms = 2 * m.dim  # input / post-attention RMSNorm: replicated
    llm = (m.n_layers * ((n["llm_block"] - block_norms) / tp + block_norms)
           + (n["llm"] - m.n_layers * n["llm_block"] - m.dim) / tp + m.dim)  # + final norm
    a = cfg.adapter_in_dim
    adapter = 2 * a + (a * m.dim + m.dim) / tp + m.dim * m.dim / tp + m.dim
    return {"vision": vision, "llm": llm, "adapter": adapter,
            "fusion": n["fusion"] + n["fact_proj"]}


def plan_inference(cfg: SageConfig, tp: int = 1, gpu_gib: float = 80.0, batch: int = 16,
                   prompt_len: int = 2048, new_tokens: int = 64, images_per_question: int = 2,
                   headroom: float = 0.9) -> Plan:
    """Per-rank memory of generation with the KV cache (evaluate.py, sage.tools.facts) or of
    a forward over packed rows (E-DPO's reference pass: new_tokens 0); bf16 weights.

    images_per_question: test (+ reference, one-shot) images, each up to max_dynamic_patch
    tiles + the thumbnail.
    """
    v, m = cfg.vision, cfg.llm
    w = inference_weights(cfg, tp)
    S = prompt_len + new_tokens
    state = [(f"weights bf16 ({k}, tp {tp})", 2 * x) for k, x in w.items()]
    state.append((f"KV cache bf16 ({batch} x {S} tokens, {m.n_kv_heads // tp} KV heads)",
                   2 * 2 * batch * S * m.n_layers * (m.n_kv_heads // tp) * m.head_dim))
    per_image = (cfg.max_dynamic_patch + cfg.use_thumbnail) if cfg.dynamic_image_size else 1
    tiles = batch * images_per_question * per_image
    n_tok = v.n_patches + 1
    # one layer's transients in bf16: input, norm, qkv, attention out, MLP hidden (+ GELU)
    vit = tiles * n_tok * (6 * v.dim + 2 * v.ffn_dim // tp) * 2
    llm = batch * prompt_len * (6 * m.dim + 3 * m.ffn_dim // tp
                                + 2 * (m.n_heads + 2 * m.n_kv_heads) // tp * m.head_dim) * 2
    phases = {"InternViT over the batch's tiles": [(f"one layer, {tiles} tiles", vit)],
              "LLM prefill": [(f"one layer, {batch} x {prompt_len} tokens", llm),
                              ("last-token logits fp32", 4 * batch * m.vocab_size)]}
    rows = [(k, x / GIB, "state") for k, x in state]
    rows += [(k, x / GIB, ph) for ph, items in phases.items() for k, x in items]
    peak = {ph: sum(x for _, x, p in rows if p == ph) for ph in phases}
    total = sum(x for _, x, p in rows if p == "state") + max(peak.values())
    budget = gpu_gib * headroom
    notes = [] if total <= budget else [f"does not fit; raise --tp (now {tp}) or lower the "
                                        f"batch size (now {batch})"]
    return Plan(rows, total, budget, total <= budget, notes, peak)


def plan_jobs(cfg: SageConfig, world: int = 8, gpu_gib: float = 80.0, global_batch: int = 32,
              seq_len: int = 2048, answer_tokens: int = 128, cpu_offload: bool = False,
              headroom: float = 0.9) -> dict[str, tuple[Plan, dict]]:
    """One plan per job of the recipe, each with the options it assumes:
    sfe, edpo (train scripts: answer-only logits, packed E-DPO rows, activation checkpointing,
    no gradient accumulation when the global batch allows it, --ref_cache for E-DPO),
    edpo_reference (the --ref_cache pass), evaluate and facts (tensor-parallel over `world`).
    -> name -> (Plan, options)."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} must be a multiple of world {world}")
    micro = global_batch // world  # one micro-batch per step: no gradients held across them
    train = dict(world=world, gpu_gib=gpu_gib, micro_batch=micro, seq_len=seq_len,
                 activation_checkpointing=True, cpu_offload=cpu_offload, headroom=headroom,
                 accumulation=1, answer_tokens=answer_tokens)
    packed = seq_len + 3 * (answer_tokens + 1)
    tp = max(t for t in (1, 2, 4, 8, 16, 32) if t <= world and world % t == 0
             and cfg.llm.n_kv_heads % t == 0 and cfg.llm.n_heads % t == 0)
    jobs = {
        "sfe": (plan_memory(cfg, stage="sfe", **train),
                {"micro_batch": micro, "accumulation": 1, "activation_checkpointing": True}),
        "edpo": (plan_memory(cfg, stage="edpo", ref_cache=True, **train),
                 {"micro_batch": micro, "accumulation": 1, "activation_checkpointing": True,
                  "ref_cache": True}),
        "edpo_reference": (plan_inference(cfg, tp, gpu_gib, batch=micro, prompt_len=packed,
                                          new_tokens=0, images_per_question=2,
                                          headroom=headroom),
                           {"tp": tp, "micro_batch": micro}),
        "evaluate": (plan_inference(cfg, tp, gpu_gib, batch=16, prompt_len=seq_len,
                                    new_tokens=64, images_per_question=2, headroom=headroom),
                     {"tp": tp, "batch_size": 16, "max_new_tokens": 64}),
        "facts": (plan_inference(cfg, tp, gpu_gib, batch=4 * len(FACT_PROMPTS),
                                 prompt_len=seq_len,
                                 new_tokens=128, images_per_question=1, headroom=headroom),
                  {"tp": tp, "batch_size": 4, "max_new_tokens": 128}),
    }
    for _, options in jobs.values():
        options["cpu_offload"] = cpu_offload if "tp" not in options else False
    return jobs


if __name__ == "__main__":  # a library module; its command line is a tool
    raise SystemExit("error: the command line is `python -m sage.tools.plan` "
                     "(--help for usage)")
