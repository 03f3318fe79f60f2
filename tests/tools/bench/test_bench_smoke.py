"""The GPU benchmarks' CPU smoke configurations run and print their figures (no timing is
asserted: speed is reported by the benchmarks themselves, on a GPU)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("module,expect", [
    ("sage.tools.bench.decode", "| 8 | static |"),
    ("sage.tools.bench.train_step", "tok/s"),
])
def test_cpu_smoke_prints_figures(module, expect):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["--preset", "tiny"] if module.endswith("train_step") else []
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout and "failed" not in proc.stdout


def test_gpu_suite_keeps_its_deadline_and_names_its_steps(tmp_path):
    suite = ROOT / "sage" / "tools" / "bench" / "gpu_suite.sh"
    env = {**os.environ, "OUT": str(tmp_path), "TOTAL_S": "10"}
    proc = subprocess.run(["bash", str(suite), "env", "decode"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skipped, the suite's 10 s are spent") == 2  # nothing ran
    proc = subprocess.run(["bash", str(suite), "bogus"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown step bogus" in proc.stdout


def test_train_step_runs_one_rank_of_eight():
    """--world 8: a fake process group, so this process holds and updates 1/8 of the slice."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "sage.tools.bench.train_step", "--preset",
                           "tiny", "--world", "8"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    local, total = (int(x.replace(",", "")) for x in
                    re.search(r"rank 0 of 8: holds ([\d,]+) of ([\d,]+) parameters",
                              proc.stdout).groups())
    assert total / 8 <= local < total / 6  # dim-0 shards, padded by FSDP2 for uneven rows
    assert "phases: forward + backward" in proc.stdout


def test_decode_bench_tensor_parallel_two_ranks():
    """Under torchrun the slice is sharded by sage.tensor_parallel (its answers are compared
    with one process in tests/test_tensor_parallel.py); here: every path runs and reports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(29300 + os.getpid() % 200), "-m", "sage.tools.bench.decode"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tensor-parallel 2" in proc.stdout and "failed" not in proc.stdout
    assert proc.stdout.count("| static |") == 2  # batch 1 and 8, printed once (rank 0)
