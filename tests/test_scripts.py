"""train_sfe.py / train_edpo.py / evaluate.py / sage.tools.pretrain / sage.tools.quickstart run
for a few steps on the tiny preset in subprocesses: single process vs 2-process gloo torchrun,
exact resume, export round trip, NaN stop, flags checked at start, E-DPO overfit and reference
cache, evaluation end to end.
Run: python -m pytest -q tests/test_scripts.py   (about a minute or two on 2 cores)"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sage
from sage.runs import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SMALL = ["--global_batch", "4", "--micro_batch", "2", "--log_every", "1", "--recipe", "tiny"]


def run(*args, nproc=0, check=True, timeout=600):
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port", str(29500 + os.getpid() % 1000), *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().split("\n")
            if x]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small SynthAD with oracle MLE scores on the E-DPO split."""
    d = tmp_path_factory.mktemp("synthad")
    run("-m", "sage.tools.synthad", "--out", str(d), "--seed", "0", "--scale", "0.03")
    run("-m", "sage.tools.mle", "--data", str(d / "edpo_train.jsonl"), "--judge", "oracle",
        "--in_place")
    return d


@pytest.fixture(scope="module")
def base(synth, tmp_path_factory):
    """A fresh tiny VLM after 2 pretraining steps (tokenizer trained on the SynthAD corpus)."""
    from sage.tokenizer import Tokenizer

    tok_dir = tmp_path_factory.mktemp("tok")
    Tokenizer.train(synth / "corpus.txt", tok_dir, vocab_size=1024)
    out = tmp_path_factory.mktemp("pre")
    run("-m", "sage.tools.pretrain", "--data", str(synth), "--tokenizer", str(tok_dir),
        "--out", str(out), "--max_steps", "2", *SMALL)
    return out / "export"


def test_pretrain_builds_on_a_given_frozen_internvit(synth, tmp_path):
    from sage.models.intern_vit import InternViT
    from sage.tools.perception import main as perception_main

    vit_dir = tmp_path / "vit"
    perception_main(["--out", str(vit_dir), "--renders", "4", "--held_out", "2", "--steps", "1",
                     "--batch", "2"])
    out = tmp_path / "pre"
    run("-m", "sage.tools.pretrain", "--data", str(synth), "--vision", str(vit_dir),
        "--out", str(out), "--max_steps", "1", "--export_dtype", "float32",
        "--tokenizer", str(ROOT / "weights" / "sage-tiny-base"), *SMALL)
    given = InternViT.from_pretrained(vit_dir).state_dict()
    exported = sage.load_pretrained(out / "export").vision.state_dict()
    assert exported.keys() == given.keys()
    for name, a in given.items():
        torch.testing.assert_close(exported[name], a, atol=0, rtol=0, msg=name)  # loaded, frozen


def test_sfe_flags_are_checked_by_the_config_at_start(tmp_path):
    # --top_k replaces a field of --init's config: SageConfig.__post_init__ refuses it before
    # any work (it used to pass and fail inside the selection kernel)
    out = tmp_path / "x"
    proc = run("train_sfe.py", "--top_k", "999", "--out", str(out), check=False, timeout=120)
    assert proc.returncode == 2 and "SageConfig.top_k=999 must be in [1, 64]" in proc.stderr
    assert not out.exists()


def test_sfe_single_vs_two_processes_and_export(base, synth, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train_sfe.py", "--init", str(base), "--data", str(synth), "--max_steps", "2", *SMALL]
    run(*args, "--out", str(one))
    run(*args, "--out", str(two), nproc=2)
    # Same global batch, same samples per step: the loss (normalised by the global number of
    # answer tokens) agrees up to float reduction order.
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)),
                               atol=2e-4, rtol=1e-4)
    model = sage.load_pretrained(one / "export")
    assert model.cfg.facts_mode == "fe" and model.tokenizer is not None
    sd = load_file(one / "export" / "model.safetensors")
    assert any(k.startswith("sage.fusion.") for k in sd) and "mlp1.1.weight" in sd


def test_sfe_vision_cache_two_processes_match_one_without(base, synth, tmp_path):
    """Past an epoch (45 records, 8 per step) both ranks reuse cached tiles; a rank whose tiles
    are all cached still joins the sharded encoder when the other one misses (no hang)."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train_sfe.py", "--init", str(base), "--data", str(synth), "--max_steps", "8",
            *SMALL, "--global_batch", "8"]
    run(*args, "--out", str(one))
    proc = run(*args, "--out", str(two), "--vision_cache_gb", "0.5", nproc=2, timeout=900)
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)),
                               atol=5e-4, rtol=1e-4)
    encoded, asked = map(int, re.search(r"vision cache: (\d+) of (\d+) tiles encoded",
                                        proc.stdout).groups())
    assert encoded < asked * 0.7, proc.stdout[-2000:]


def test_sfe_cache_benchmark_prints_the_ratio_and_equal_losses(base, synth):
    proc = run("-m", "sage.tools.bench.sfe_cache", "--init", str(base), "--data", str(synth),
               "--steps", "3", "--micro_batch", "8")
    assert "ratio with / without:" in proc.stdout and "tiles encoded" in proc.stdout
    gap = float(re.search(r"largest loss difference over the steps: (\S+)", proc.stdout)[1])
    assert gap < 1e-3, proc.stdout


def test_sfe_resume_matches_straight_run(base, synth, tmp_path):
    common = ["train_sfe.py", "--init", str(base), "--data", str(synth), "--max_steps", "4",
              *SMALL]
    run(*common, "--out", str(tmp_path / "straight"))
    half = tmp_path / "half"
    # stop after 2 of 4 steps: a run with --max_steps 2 leaves a checkpoint at step 2, but its
    # schedule would differ; so run 4 steps with a save at 2 and cut the directory back.
    run(*common, "--out", str(half), "--save_every", "2", "--keep_last", "5")
    import shutil
    shutil.rmtree(half / "step_000004")
    (half / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (half / "metrics.jsonl").read_text().split("\n")[:2]))
    # a half-written newer checkpoint must never be picked up
    (half / "step_000003").mkdir()
    (half / "step_000003" / "meta.json").write_text("{\"step\": 3")
    assert latest_checkpoint(half).name == "step_000002"
    run(*common, "--out", str(half), "--resume")
    torch.testing.assert_close(torch.tensor(losses(half)),
                               torch.tensor(losses(tmp_path / "straight")), atol=1e-5, rtol=0)
    a = load_file(half / "export" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "export" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_nan_loss_stops_and_keeps_last_checkpoint(base, synth, tmp_path):
    out = tmp_path / "nan"
    # lr 1e30: the first update throws the weights to inf, so step 2 has a non-finite loss
    proc = run("train_sfe.py", "--init", str(base), "--data", str(synth), "--max_steps", "4",
               "--out", str(out), "--save_every", "1", "--warmup", "0", "--lr", "1e30",
               "--grad_clip", "1e9", *SMALL, check=False)
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stderr and "at step" in proc.stderr
    assert "samples:" in proc.stderr
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and json.loads((ckpt / "meta.json").read_text())["complete"]
    # a new run over it refuses before training (it used to crash at the first save onto an
    # existing step, after all the work, and its pruning could delete the earlier run's)
    proc = run("train_sfe.py", "--init", str(base), "--data", str(synth), "--max_steps", "1",
               "--out", str(out), *SMALL, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds an earlier run (" in proc.stderr and ckpt.name in proc.stderr
    assert latest_checkpoint(out) == ckpt


def test_plan_runs_without_allocating():
    proc = run("-m", "sage.tools.plan", "--preset", "internvl2-40b", "--world", "8", timeout=60)
    assert "| sfe | 71.3 | yes |" in proc.stdout and "| evaluate |" in proc.stdout


def test_edpo_two_processes_resume_and_ref_cache(base, synth, tmp_path):
    sfe = tmp_path / "sfe"
    run("train_sfe.py", "--init", str(base), "--data", str(synth), "--max_steps", "1",
        "--out", str(sfe), *SMALL)
    args = ["train_edpo.py", "--init", str(sfe / "export"), "--data", str(synth),
            "--max_steps", "2", "--setting", "one-shot", *SMALL]
    run(*args, "--out", str(tmp_path / "fly"))
    run(*args, "--out", str(tmp_path / "cached"), "--ref_cache", str(tmp_path / "ref.json"))
    # precomputed and on-the-fly reference log-probs give the same loss
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "cached")),
                               torch.tensor(losses(tmp_path / "fly")), atol=1e-4, rtol=1e-4)
    # 2 ranks, the policy and the on-the-fly reference each with a vision cache
    run(*args, "--out", str(tmp_path / "two"), "--vision_cache_gb", "0.5", nproc=2)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")),
                               torch.tensor(losses(tmp_path / "fly")), atol=2e-4, rtol=1e-4)
    run(*args, "--out", str(tmp_path / "two"), "--max_steps", "3", "--resume", nproc=2)
    assert len(losses(tmp_path / "two")) == 3
    assert sage.load_pretrained(tmp_path / "two" / "export").cfg.facts_mode == "fe"


def test_edpo_overfits_a_few_pairs(base, synth, tmp_path):
    out = tmp_path / "overfit"
    run("train_edpo.py", "--init", str(base), "--facts", "none", "--data", str(synth),
        "--max_steps", "25", "--lr", "3e-4", "--warmup", "2", "--beta", "0.5",
        "--setting", "one-shot", "--global_batch", "4", "--micro_batch", "4",
        "--log_every", "1", "--out", str(out))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().split("\n") if x]
    assert recs[-1]["loss"] < 0.5 * recs[0]["loss"]
    assert recs[-1]["reward_acc"] > 0.9


def test_evaluate_end_to_end(base, synth, tmp_path):
    out = tmp_path / "eval"
    run("evaluate.py", "--model", str(base), "--names", "Base", "--data", str(synth),
        "--split", "test_unseen", "--setting", "both", "--limit", "10",
        "--max_new_tokens", "8", "--out", str(out), "--visualize", "1", "--no-sbert")
    metrics = json.loads((out / "metrics.json").read_text())["results"]["Base"]
    assert set(metrics) == {"zero-shot", "one-shot"}
    assert metrics["one-shot"]["n"] == 10
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().split("\n") if x]
    assert len(preds) == 20 and all("decision" in p and "mle" in p for p in preds)
    assert "Table 1" in (out / "report.md").read_text()
    assert list(out.glob("selection_*.png"))
    # the vision cache: a test image asked several questions, in both settings, encoded once
    proc = run("evaluate.py", "--model", str(base), "--names", "Base", "--data", str(synth),
               "--split", "test_unseen", "--setting", "both", "--limit", "10",
               "--max_new_tokens", "8", "--out", str(tmp_path / "cached"), "--no-sbert",
               "--vision_cache_gb", "0.5")
    cached = [json.loads(x) for x in (tmp_path / "cached" / "predictions.jsonl").read_text()
              .split("\n") if x]
    assert [p["answer"] for p in cached] == [p["answer"] for p in preds]
    encoded, asked = map(int, re.search(r"vision cache: (\d+) of (\d+) tiles encoded",
                                        proc.stdout).groups())
    # 10 test tiles per setting (a plain base VLM never reads the reference); one-shot reuses
    assert asked == 20 and encoded <= 10
    # static-shape decoding (sage.models.decoding): the same answers; a CUDA graph needs CUDA
    run("evaluate.py", "--model", str(base), "--names", "Base", "--data", str(synth),
        "--split", "test_unseen", "--setting", "both", "--limit", "10", "--max_new_tokens", "8",
        "--out", str(tmp_path / "static"), "--no-sbert", "--decode", "static")
    static = [json.loads(x) for x in (tmp_path / "static" / "predictions.jsonl").read_text()
              .split("\n") if x]
    assert [p["answer"] for p in static] == [p["answer"] for p in preds]
    proc = run("evaluate.py", "--model", str(base), "--data", str(synth), "--decode", "graph",
               "--out", str(tmp_path / "graph"), "--device", "cpu", check=False)
    assert proc.returncode == 2 and "--decode graph records CUDA graphs" in proc.stderr


def test_quickstart_fast(base, tmp_path):
    """The README's main command in a reduced size: every stage runs and the table is written."""
    out = tmp_path / "qs"
    run("-m", "sage.tools.quickstart", "--fast", "--base", str(base), "--data",
        str(tmp_path / "synth"), "--out", str(out))
    report = (out / "eval" / "report.md").read_text()
    for name in ("| Base |", "| SFE |", "| SFE+E-DPO |"):
        assert name in report
    results = json.loads((out / "eval" / "metrics.json").read_text())["results"]
    assert set(results["SFE+E-DPO"]) == {"zero-shot", "one-shot"}
    assert (out / "sfe" / "export" / "model.safetensors").exists()
