"""sage.perception: exact per-patch mark labels, a loss that learns, the CLI's InternViT export."""

import numpy as np
import pytest
import torch

from sage.config import VisionConfig
from sage.models.intern_vit import InternViT
from sage.perception import (MARKS, PerceptionHeads, evaluate, make_pool, patch_labels,
                             perception_loss, pretrain, render_sample)
from sage.tools.perception import main


def test_patch_labels_by_cover():
    changed = np.zeros((28, 28), dtype=bool)  # 2 x 2 patches of 14 px
    changed[0:14, 14:28] = True                # patch 1 fully covered
    changed[14, 0:14] = True                   # patch 2: one row of 14 = 7% < COVER
    changed[14:16, 14:28] = True               # patch 3: 2 rows = 14% >= COVER
    assert patch_labels(changed, 14, mark=3).tolist() == [0, 3, 0, 3]


def test_marks_labelled_where_drawn_and_clean_shots_unlabelled():
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(40):
        img, labels, cat, colour = render_sample(rng, 224, 14)
        assert labels.shape == (256,) and img.size == (224, 224)
        kinds = set(labels.tolist()) - {0}
        assert len(kinds) <= 1                   # one mark per shot
        if kinds:
            assert 1 <= (labels > 0).sum() <= 40  # local, not the whole object
        seen |= kinds
    assert len(seen) >= 4  # most kinds show up in 40 shots (all five on this seed)


def test_shots_are_the_same_shot_with_and_without_the_mark():
    # the twin generator reproduces the shot: rendering the same state twice gives one image
    a = np.random.default_rng(3)
    b = np.random.default_rng(3)
    ia, la, *_ = render_sample(a, 112, 14)
    ib, lb, *_ = render_sample(b, 112, 14)
    assert np.array_equal(np.asarray(ia), np.asarray(ib)) and np.array_equal(la, lb)


def tiny_vit():
    cfg = VisionConfig(image_size=56, patch_size=14, dim=32, n_layers=1, n_heads=2,
                       ffn_dim=64)
    torch.manual_seed(0)
    vit = InternViT(cfg)
    vit.init_weights()
    return vit


def test_loss_falls_and_metrics_in_range():
    vit = tiny_vit()
    pool = make_pool(24, vit.cfg, seed=0)
    assert pool["pixels"].shape == (24, 3, 56, 56) and pool["marks"].shape == (24, 16)
    heads = PerceptionHeads(vit.cfg.dim)
    before = perception_loss(heads(vit(pool["pixels"])[:, 1:]), pool).item()
    log = pretrain(vit, pool, steps=30, lr=3e-3, batch=24, held_out=pool, log_every=30)
    assert log[-1]["loss"] < before
    for k in ("image_auroc", "patch_auroc", "mark_kind", "category", "colour"):
        assert 0.0 <= log[-1][k] <= 1.0


def test_loss_weighs_marked_and_clean_patches_equally():
    logits = {"mark": torch.zeros(1, 4, len(MARKS)), "category": torch.zeros(1, 8),
              "colour": torch.zeros(1, 12)}
    logits["mark"][0, :3, 0] = 10.0  # the three clean patches right, the marked one unsure
    batch = {"marks": torch.tensor([[0, 0, 0, 2]]), "category": torch.tensor([0]),
             "colour": torch.tensor([0])}
    ce_clean = torch.nn.functional.cross_entropy(logits["mark"][0, :1], torch.tensor([0]))
    expected = 0.5 * ce_clean + 0.5 * np.log(len(MARKS)) + np.log(8) + np.log(12)
    assert perception_loss(logits, batch).item() == pytest.approx(float(expected), rel=1e-5)


def test_evaluate_aurocs_follow_the_mark_head():
    vit = tiny_vit()
    pool = make_pool(12, vit.cfg, seed=1)
    assert 0 < int((pool["marks"].amax(1) > 0).sum()) < 12  # both kinds of shot
    heads = PerceptionHeads(vit.cfg.dim)
    with torch.no_grad():
        heads.mark.weight.zero_()
        heads.mark.bias.copy_(torch.tensor([1.0] + [0.0] * (len(MARKS) - 1)))
    m = evaluate(vit, heads, pool)  # constant scores: every pair a tie
    assert m["image_auroc"] == 0.5 and m["patch_auroc"] == 0.5 and m["mark_kind"] == pytest.approx(
        float((pool["marks"][pool["marks"] > 0] == 1).float().mean()))  # argmax picks "scratch"


def test_cli_writes_a_loadable_internvit(tmp_path):
    out = tmp_path / "vit"
    main(["--out", str(out), "--renders", "4", "--held_out", "2", "--steps", "1", "--batch", "2"])
    vit = InternViT.from_pretrained(out)
    assert vit.cfg.dim == 128 and (out / "perception.json").is_file()
    with pytest.raises(FileExistsError, match="not empty"):
        main(["--out", str(out), "--renders", "4", "--steps", "1"])
