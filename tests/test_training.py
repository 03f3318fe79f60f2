"""sage.training: the learning-rate schedule, gradient accumulation, recipes, the compute
estimate and the status line, against hand-worked numbers.
Run: python -m pytest -q tests/test_training.py"""

from types import SimpleNamespace

import pytest
import torch

from sage.config import SageConfig
from sage.tools.errors import is_expected
from sage.training import (accumulation_steps, check_finite, eta, flops_per_token, lr_at,
                           resolve_recipe, status_line)


def test_lr_warmup_then_linear_decay():
    # peak 1.0, warmup 4, total 10: warmup (s+1)/4 -> 0.25 0.5 0.75 1.0; then 1 - (s-4)/6
    got = [lr_at(s, 1.0, 4, 10) for s in range(11)]
    want = [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-12, rtol=0)


def test_lr_floor_no_warmup_and_past_the_end():
    # min_ratio 0.1: step 5 of (warmup 0, total 10) -> 0.1 + 0.9 * (1 - 5/10) = 0.55
    assert lr_at(5, 2.0, 0, 10, min_ratio=0.1) == pytest.approx(2.0 * 0.55)
    assert lr_at(0, 2.0, 0, 10) == pytest.approx(2.0)  # no warmup: peak at once
    assert lr_at(25, 2.0, 0, 10, min_ratio=0.1) == pytest.approx(0.2)  # clamped at the floor
    assert lr_at(3, 1.0, 5, 5) == pytest.approx(0.8)  # warmup == total: (3+1)/5


def test_accumulation_steps_exact_global_batch():
    assert accumulation_steps(32, 1, 8) == 4
    assert accumulation_steps(32, 8, 1) == 4
    assert accumulation_steps(32, 8, 4) == 1
    with pytest.raises(ValueError, match="--global_batch 32 must be a multiple of world size 3"):
        accumulation_steps(32, 3, 2)
    with pytest.raises(ValueError, match="world size 8 x --micro_batch 8"):
        accumulation_steps(32, 8, 8)  # 64 per step would overshoot


def test_resolve_recipe_flags_win_and_auto_picks_by_width(tiny_cfg):
    recipes = {"paper": dict(lr=2e-6, warmup=1000, max_steps=5000),
               "tiny": dict(lr=1e-3, warmup=30, max_steps=300)}
    args = SimpleNamespace(recipe="auto", lr=None, warmup=None, max_steps=None)
    assert resolve_recipe(args, tiny_cfg, recipes) == (1e-3, 30, 300)  # width 256 < 1024
    big = SageConfig.preset("internvl2-40b")
    assert resolve_recipe(args, big, recipes) == (2e-6, 1000, 5000)
    args = SimpleNamespace(recipe="paper", lr=5e-5, warmup=0, max_steps=7)
    assert resolve_recipe(args, tiny_cfg, recipes) == (5e-5, 0, 7)  # warmup 0 is kept


def test_flops_per_token_hand_count():
    cfg = SageConfig.preset("tiny")  # dim 256, 4 layers, 2 kv heads x 32, ffn 704, vocab 2048
    per_layer = 2 * 256 * 256 + 2 * 256 * 2 * 32 + 3 * 256 * 704  # q, o + k, v + SwiGLU
    n = 4 * per_layer + 256 * 2048  # + LM head
    assert flops_per_token(cfg, seq_len=100) == 6 * n + 12 * 4 * 256 * 100


def test_status_line_eta_and_finiteness():
    line = status_line(42, 1000, 1.23456, 2e-6, 0.871, 0.412, 12345.0)
    assert line.startswith("step 00042/01000 | loss 1.2346 | lr 2.0e-06 | gnorm 0.87 | 412 ms | "
                           "12,345 tok/s")
    assert eta(1.5, 3000) == "1h15m00s"
    check_finite(torch.tensor(1.0), 3, ["a"])
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 3 \(samples: a, b\)"
                       r".*lower --lr") as e:
        check_finite(torch.tensor(float("nan")), 3, ["a", "b"])
    assert is_expected(e.value)  # a diverged run is one line `error: ...`, not a traceback


def test_progress_lines(monkeypatch):
    from sage import training

    clock = iter([0.0, 5.0, 20.0, 30.0])
    monkeypatch.setattr(training.time, "time", lambda: next(clock))
    lines = []
    p = training.Progress("eval", 10, "answers", every=10.0, printer=lines.append)
    p.update(2)  # t = 5: too soon for a line
    p.update(4)  # t = 20: 6 done in 20 s -> 0.30 /s, 4 left -> 13 s
    p.update(4)  # t = 30: done -> always a line
    assert lines == ["eval: 6/10 answers | 0.30 answers/s | ETA 0h00m13s",
                     "eval: 10/10 answers | 0.33 answers/s | ETA 0h00m00s"]
