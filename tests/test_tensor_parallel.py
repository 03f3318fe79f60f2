"""Tensor-parallel inference (sage.tensor_parallel) equals one process: the committed tiny base
sharded over 2 gloo ranks gives the same logits (fp32, 1e-5) and the same greedy tokens.
Run: python -m pytest -q tests/test_tensor_parallel.py   (this file is also the torchrun worker)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "weights" / "sage-tiny-base"


def _examples(cfg) -> list[dict]:
    """Seeded noise images and two one-shot questions: the same on every rank."""
    from sage.inference import load_image_for

    rng = np.random.default_rng(0)
    img = [Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)) for _ in "ab"]
    return [{"id": f"q{i}", "question": q, "facts": [], "pixel_test": load_image_for(img[0], cfg),
             "pixel_ref": load_image_for(img[1], cfg)}
            for i, q in enumerate(["Is there a scratch on the washer?", "Describe the surface."])]


def worker(out: str) -> None:
    import sage
    from sage.data.collate import Collator
    from sage.distributed import cleanup, init_distributed
    from sage.inference import generate_answers, to_device
    from sage.tensor_parallel import load_sharded, model_copies

    dist = init_distributed("cpu")
    copies = model_copies(dist, tp=dist.world_size)
    full = sage.load_pretrained(TINY, dtype=torch.float32)
    sharded = load_sharded(TINY, copies.tp_mesh, dtype=torch.float32)
    attn = sharded.llm.layers[0].self_attn
    examples = _examples(full.cfg)
    batch = to_device(Collator(full.tokenizer, full.cfg, for_generation=True)(examples), "cpu")
    with torch.no_grad():
        a, _, _ = full(batch)
        b, _, _ = sharded(batch)
        cache = sharded.llm.new_cache(2, 8)
    result = {"max_diff": float((a - b).abs().max()), "scale": float(a.abs().max()),
              "answers_full": generate_answers(full, examples, max_new_tokens=12),
              "answers_tp": generate_answers(sharded, examples, max_new_tokens=12),
              "answers_tp_static": generate_answers(sharded, examples, max_new_tokens=12,
                                                    decode="static"),
              "local_heads": [attn.n_heads, attn.n_kv_heads],
              "cache_heads": cache.k[0].shape[1],
              "local_rows": sharded.llm.layers[0].mlp.gate_proj.weight.to_local().shape[0]}
    if dist.rank == 0:
        Path(out).write_text(json.dumps(result))
    cleanup()


def test_tensor_parallel_forward_and_generate_equal_one_process(tmp_path):
    out = tmp_path / "tp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAGE_TP_OUT": str(out)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port", str(29700 + os.getpid() % 200), __file__]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    from sage.config import SageConfig

    cfg = SageConfig.from_pretrained(TINY)
    # each rank holds half the heads, half the KV cache and half the MLP rows
    assert r["local_heads"] == [cfg.llm.n_heads // 2, cfg.llm.n_kv_heads // 2]
    assert r["cache_heads"] == cfg.llm.n_kv_heads // 2
    assert r["local_rows"] == cfg.llm.ffn_dim // 2
    assert r["max_diff"] <= 1e-5 * max(1.0, r["scale"]), r
    assert all(r["answers_full"]), r  # something was generated
    assert r["answers_tp"] == r["answers_full"], r
    assert r["answers_tp_static"] == r["answers_full"], r  # sage.models.decoding under tp


def test_tp_must_divide_heads():
    from sage.config import SageConfig
    from sage.tensor_parallel import check_divisible

    cfg = SageConfig.preset("internvl2-40b")
    for tp in (1, 2, 4, 8):
        check_divisible(cfg, tp)  # Yi-34B: 56 query / 8 KV heads
    with pytest.raises(ValueError, match="n_kv_heads = 8"):
        check_divisible(cfg, 16)


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(os.environ["SAGE_TP_OUT"])
