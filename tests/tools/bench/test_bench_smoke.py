"""The GPU benchmarks' CPU smoke configurations run and print their figures (no timing is
asserted: speed is reported by the benchmarks themselves, on a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("module,expect", [
    ("sage.tools.bench.decode", "% of the roofline"),
    ("sage.tools.bench.train_step", "tok/s"),
])
def test_cpu_smoke_prints_figures(module, expect):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["--preset", "tiny"] if module.endswith("train_step") else []
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout
