"""Inference and E-DPO's reference pass under torchrun (2 gloo ranks on CPU) equal one process:
evaluate.py and sage.tools.facts data-parallel and with --tp 2 (identical greedy answers in
fp32), E-DPO on 3 records (uneven over 2 ranks) with and without --ref_cache and with the
reference pass sharded by --tp 2 (same losses), and a stale reference cache refused.
Run: python -m pytest -q tests/test_multiprocess.py   (about two minutes on 2 cores)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "weights" / "sage-tiny-base"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(*args, nproc=0, check=True):
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port", str(29300 + os.getpid() % 300), *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small SynthAD; edpo3.jsonl holds 3 E-DPO records with oracle scores."""
    d = tmp_path_factory.mktemp("synthad")
    run("-m", "sage.tools.synthad", "--out", str(d), "--seed", "0", "--scale", "0.03")
    lines = (d / "edpo_train.jsonl").read_text().splitlines()[:3]
    (d / "edpo3.jsonl").write_text("\n".join(lines) + "\n")
    run("-m", "sage.tools.mle", "--data", str(d / "edpo3.jsonl"), "--judge", "oracle",
        "--in_place")
    return d


def test_evaluate_data_and_tensor_parallel_equal_one_process(synth, tmp_path):
    args = ["evaluate.py", "--model", str(TINY), "--data", str(synth), "--split", "test_unseen",
            "--limit", "7", "--max_new_tokens", "12", "--batch_size", "4", "--no-sbert"]
    run(*args, "--out", str(tmp_path / "one"))
    run(*args, "--out", str(tmp_path / "dp"), nproc=2)
    run(*args, "--out", str(tmp_path / "tp"), "--tp", "2", nproc=2)
    one = jsonl(tmp_path / "one" / "predictions.jsonl")
    assert len(one) == 2 * 10  # --limit 7 rounded up to two whole groups of 5, two settings
    assert any(p["answer"] for p in one)
    for name in ("dp", "tp"):
        assert jsonl(tmp_path / name / "predictions.jsonl") == one, name
        assert not list((tmp_path / name).glob("predictions.part*"))  # merged, then removed
        assert (json.loads((tmp_path / name / "metrics.json").read_text())["results"]
                == json.loads((tmp_path / "one" / "metrics.json").read_text())["results"])


def test_facts_data_and_tensor_parallel_equal_one_process(synth, tmp_path):
    records = jsonl(synth / "test_unseen.jsonl")
    first = {}
    for r in records:  # one record per test image: 5 images, uneven over 2 ranks
        first.setdefault(r["test_image"], r)
    small = synth / "facts5.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in list(first.values())[:5]))
    args = ["-m", "sage.tools.facts", "--data", str(small), "--model", str(TINY),
            "--batch_size", "2", "--max_new_tokens", "16"]
    run(*args, "--out", str(tmp_path / "one.jsonl"))
    run(*args, "--out", str(tmp_path / "dp.jsonl"), nproc=2)
    run(*args, "--out", str(tmp_path / "tp.jsonl"), "--tp", "2", nproc=2)
    one = {e["test_image"]: e["facts"] for e in jsonl(tmp_path / "one.jsonl")}
    assert len(one) == 5 and all(one.values())
    for name in ("dp", "tp"):
        got = jsonl(tmp_path / f"{name}.jsonl")
        assert len(got) == 5, name  # written once per image, by one rank
        assert {e["test_image"]: e["facts"] for e in got} == one, name


def losses(run_dir):
    return torch.tensor([json.loads(x)["loss"] for x in
                         (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x])


def test_edpo_three_records_on_two_ranks_and_the_reference_cache(synth, tmp_path):
    args = ["train_edpo.py", "--init", str(TINY), "--facts", "none", "--data", str(synth),
            "--split", "edpo3", "--max_steps", "2", "--setting", "one-shot",
            "--global_batch", "2", "--micro_batch", "1", "--log_every", "1", "--recipe", "tiny"]
    run(*args, "--out", str(tmp_path / "one"))
    run(*args, "--out", str(tmp_path / "two"), nproc=2)
    run(*args, "--out", str(tmp_path / "two_cached"), "--ref_cache", str(tmp_path / "r.json"),
        nproc=2)
    run(*args, "--out", str(tmp_path / "tp_cached"), "--ref_cache", str(tmp_path / "rt.json"),
        "--tp", "2", nproc=2)
    one = losses(tmp_path / "one")
    for name in ("two", "two_cached", "tp_cached"):
        torch.testing.assert_close(losses(tmp_path / name), one, atol=2e-4, rtol=1e-4)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("r.json", "rt.json"))
    assert a["meta"] == b["meta"] and len(a["logps"]) == 3 * 4  # every answer of 3 records
    for k, v in a["logps"].items():
        assert b["logps"][k] == pytest.approx(v, abs=1e-4), k
    # the cache is reused without building the reference ...
    proc = run(*args, "--out", str(tmp_path / "reuse"), "--ref_cache", str(tmp_path / "r.json"))
    assert "reference log-probs: 12 from" in proc.stdout
    # ... and refused, naming what differs, when made from other inputs
    proc = run(*args, "--out", str(tmp_path / "stale"), "--ref_cache", str(tmp_path / "r.json"),
               "--max_len", "200", check=False)
    assert proc.returncode == 2 and "max_len: cache None, now 200" in proc.stderr
    assert not (tmp_path / "stale").exists()
