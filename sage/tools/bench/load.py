"""Checkpoint loading benchmark: sage.checkpoint.load_into against a raw read of the same files.

Writes a synthetic bf16 checkpoint of about --size_gb in the plain Hugging Face Llama layout
(a stack of Llama-like layers, sharded with model.safetensors.index.json), then measures, each
in a fresh subprocess so that peak RSS (VmHWM) belongs to that one job:

  raw read, fresh buffer   every file read sequentially in 16 MiB chunks into a file-sized
                           uninitialised buffer (the same memory traffic a load has)
  raw read, reused buffer  the same into one 16 MiB buffer (I/O only, no fresh memory)
  load_into                meta-built Llama -> load_into (to_empty + tensor-by-tensor copy)
  Llama.from_pretrained    the public entry point (config.json, meta build, load_into)

"cold" (page cache dropped for the shard files with fsync + posix_fadvise DONTNEED, as well
as an unprivileged process can) and warm, best of --repeats each. Prints GB/s, the
load / raw ratios and peak RSS over the process's RSS after imports, relative to the model's
bytes. Goals: load >= 0.8x raw, peak RSS <= 1.2x model bytes.

    python -m sage.tools.bench.load --size_gb 1 --dir /tmp/sage_bench_load
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sage.tools.args import Parser, at_least, positive
from sage.tools.errors import run_main

MARKER = "sage_bench_load.json"  # only directories carrying this file are ever deleted
CHUNK = 16 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    # checkpoint
    p.add_argument("--size_gb", type=positive(), default=4.0, help="synthetic checkpoint size (GB)")
    p.add_argument("--shard_gb", type=positive(), default=0.5, help="max bytes per shard file (GB)")
    p.add_argument("--dir", default="/tmp/sage_bench_load", help="where the checkpoint goes")
    # runtime
    p.add_argument("--repeats", type=at_least(1), default=2,
                   help="runs per job and cache state (the fastest is kept)")
    p.add_argument("--keep", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the checkpoint directory afterwards")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one job
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- checkpoint


def bench_config(size_bytes: float):
    """A Llama-like config (dim 2048, GQA 16/4 heads, SwiGLU 5632, vocab 32000) with as many
    layers as make about size_bytes in bf16."""
    from sage.config import LLMConfig

    dim, ffn, vocab, kv = 2048, 5632, 32000, 512
    per_layer = 2 * (2 * dim * dim + 2 * dim * kv + 3 * dim * ffn + 2 * dim)
    fixed = 2 * (2 * vocab * dim + dim)
    n_layers = max(1, round((size_bytes - fixed) / per_layer))
    return LLMConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=16, n_kv_heads=4,
                     ffn_dim=ffn, norm_eps=1e-5, rope_theta=5e5, max_seq_len=4096)


def write_checkpoint(directory: Path, cfg, shard_bytes: int) -> int:
    """Random bf16 tensors, generated and written one at a time; -> total tensor bytes."""
    import torch

    from sage.checkpoint import model_tensors
    from sage.names import LLAMA_KEY_MAP_INV, map_key
    from sage.safetensors_io import INDEX_FILE, plan_shards, write_safetensors
    from sage.models.llama import Llama

    with torch.device("meta"):  # names and shapes only
        model = Llama(cfg).to(torch.bfloat16)
    tensors = [(map_key(k, LLAMA_KEY_MAP_INV), t) for k, t in model_tensors(model).items()]
    shards = plan_shards(tensors, shard_bytes, None)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(0)
    make = lambda t: torch.empty(t.shape, dtype=t.dtype).uniform_(-0.05, 0.05, generator=gen)
    for name, shard in zip(names, shards):
        write_safetensors(directory / name, shard, fetch=make)  # fsyncs: pages are clean
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    weight_map = {pub: name for name, shard in zip(names, shards) for pub, _ in shard}
    (directory / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_dtype": "bfloat16"}))
    return total


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("model-*.safetensors"))


def drop_page_cache(files: list[Path]) -> int:
    """Evict the files from the page cache (clean pages only: fsync first); -> bytes dropped
    according to /proc/meminfo "Cached" (approximate: other processes change it too)."""
    before = _meminfo("Cached")
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return max(0, before - _meminfo("Cached")) * 1024


def _meminfo(key: str, path: str = "/proc/meminfo") -> int:
    for line in open(path):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


# ----------------------------------------------------------------------------- jobs (children)


def _raw_fresh(directory: Path) -> None:
    import torch  # an uninitialised buffer, like to_empty's parameters (bytearray zero-fills)

    for f in shard_files(directory):
        size = f.stat().st_size
        view = memoryview(torch.empty(size, dtype=torch.uint8).numpy())
        with open(f, "rb", buffering=0) as fh:
            offset = 0
            while offset < size:
                offset += fh.readinto(view[offset:offset + CHUNK])


def _raw_reuse(directory: Path) -> None:
    buf = bytearray(CHUNK)
    for f in shard_files(directory):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _load_into(directory: Path) -> None:
    import torch

    from sage.checkpoint import load_into
    from sage.names import LLAMA_KEY_MAP
    from sage.config import llm_config_from_dict
    from sage.models.llama import Llama

    cfg = llm_config_from_dict(json.loads((directory / "config.json").read_text()))
    with torch.device("meta"):
        model = Llama(cfg)
    load_into(model, directory, LLAMA_KEY_MAP, dtype=torch.bfloat16)


def _from_pretrained(directory: Path) -> None:
    import torch

    from sage.models.llama import Llama

    Llama.from_pretrained(directory, dtype=torch.bfloat16)


JOBS = {"raw_fresh": _raw_fresh, "raw_reuse": _raw_reuse, "load_into": _load_into,
        "from_pretrained": _from_pretrained}


def run_child(job: str, directory: Path) -> None:
    """One job in this (fresh) process; prints a JSON line: seconds, RSS after imports, VmHWM."""
    import torch  # imports count towards the baseline, not the job

    import sage.checkpoint  # noqa: F401
    import sage.models.llama  # noqa: F401

    with torch.device("meta"):  # torch's first meta-device init imports ~900 modules (~1 s)
        torch.nn.Embedding(1, 1)
    base = _meminfo("VmRSS", "/proc/self/status")
    t0 = time.perf_counter()
    JOBS[job](directory)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "base_kb": base,
                      "hwm_kb": _meminfo("VmHWM", "/proc/self/status")}))


def measure(job: str, directory: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "sage.tools.bench.load", "--child", job, "--dir",
                          str(directory)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    directory = Path(args.dir)
    if args.child:
        return run_child(args.child, directory)
    if directory.exists():
        if not (directory / MARKER).is_file():
            raise FileExistsError(f"{directory}: exists and was not made by this benchmark; "
                                  "pick another --dir")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text(json.dumps(vars(args)))
    cfg = bench_config(args.size_gb * 1e9)
    t0 = time.perf_counter()
    total = write_checkpoint(directory, cfg, int(args.shard_gb * 1e9))
    files = shard_files(directory)
    print(f"checkpoint {directory}: {total / 1e9:.3f} GB bf16 in {len(files)} shards "
          f"(Llama-like, {cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}); "
          f"written in {time.perf_counter() - t0:.1f} s", flush=True)
    results, dropped = {}, []
    for _ in range(args.repeats):  # best of --repeats (other processes share the disk)
        for job in JOBS:  # cold: page cache dropped just before each run
            dropped.append(drop_page_cache(files))
            keep_best(results, (job, "cold"), measure(job, directory))
        for job in JOBS:  # warm: the files were just read
            keep_best(results, (job, "warm"), measure(job, directory))
    report(results, total, dropped)
    if not args.keep:
        shutil.rmtree(directory)


def keep_best(results: dict, key: tuple, run: dict) -> None:
    """Fastest run per key; peak RSS is the worst over all runs."""
    best = results.get(key)
    extra = lambda r: r["hwm_kb"] - r["base_kb"]
    if best is None:
        results[key] = run
        return
    worst = max(best, run, key=extra)
    results[key] = dict(min(best, run, key=lambda r: r["seconds"]),
                        hwm_kb=worst["hwm_kb"], base_kb=worst["base_kb"])


def report(results: dict, total: int, dropped: list[int]) -> None:
    gbps = {k: total / r["seconds"] / 1e9 for k, r in results.items()}
    names = {"raw_fresh": "raw read, fresh buffer", "raw_reuse": "raw read, reused buffer",
             "load_into": "load_into (meta model)", "from_pretrained": "Llama.from_pretrained"}
    print(f"page cache dropped before cold runs: {min(dropped) / 1e9:.2f}-"
          f"{max(dropped) / 1e9:.2f} GB per run (of {total / 1e9:.2f} GB)")
    print(f"{'':26s} {'cold GB/s':>10s} {'warm GB/s':>10s} {'x raw(fresh) c/w':>17s} "
          f"{'peak RSS GB':>12s} {'(+ over imports)':>17s} {'/ model':>8s}")
    for job, label in names.items():
        ratio = "" if job.startswith("raw") else (
            f"{gbps[(job, 'cold')] / gbps[('raw_fresh', 'cold')]:.2f} / "
            f"{gbps[(job, 'warm')] / gbps[('raw_fresh', 'warm')]:.2f}")
        extra = max(results[(job, t)]["hwm_kb"] - results[(job, t)]["base_kb"]
                    for t in ("cold", "warm")) * 1024
        peak = max(results[(job, t)]["hwm_kb"] for t in ("cold", "warm")) * 1024
        print(f"{label:26s} {gbps[(job, 'cold')]:10.2f} {gbps[(job, 'warm')]:10.2f} "
              f"{ratio:>17s} {peak / 1e9:12.2f} {extra / 1e9:17.2f} {extra / total:8.2f}")
    worst = min(gbps[(j, t)] / gbps[("raw_fresh", t)]
                for j in ("load_into", "from_pretrained") for t in ("cold", "warm"))
    rss = max((results[(j, t)]["hwm_kb"] - results[(j, t)]["base_kb"]) * 1024 / total
              for j in ("load_into", "from_pretrained") for t in ("cold", "warm"))
    print(f"goals: load >= 0.8x raw read (fresh buffer): worst {worst:.2f}x "
          f"{'OK' if worst >= 0.8 else 'MISSED'}; peak RSS over imports <= 1.2x model bytes: "
          f"{rss:.2f}x {'OK' if rss <= 1.2 else 'MISSED'}")


if __name__ == "__main__":
    run_main(main)
