"""sage/diagnose.py: per-token losses agree with Eq. 8's log-probs, image swapping, the fusion
pathway's figures on tiny shapes and on the committed tiny base, and the CLI.
Run: python -m pytest -q tests/test_diagnose.py"""

import json
import os
from pathlib import Path

import pytest
import torch

from sage.data.synthad import generate
from sage.diagnose import (answer_token_losses, attention_entropy, cross_image_cosine,
                           first_of_each_group, slot_cosine, swap_images, varying_share)
from sage.tools.diagnose import main
from sage.losses import IGNORE_INDEX, answer_logprobs

BASE = Path(__file__).resolve().parents[1] / "weights" / "sage-tiny-base"


def test_answer_token_losses_split_the_sequence_log_prob(gen):
    logits = torch.randn(3, 9, 11, generator=gen)
    labels = torch.full((3, 9), IGNORE_INDEX)
    labels[0, 4:] = torch.tensor([1, 2, 3, 4, 5])
    labels[1, 2:5] = torch.tensor([7, 7, 0])
    labels[2, 7:] = torch.tensor([10, 6])
    first, rest, hit = answer_token_losses(logits, labels)
    n = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    # first + (n - 1) * mean(rest) is the whole answer's negative log-likelihood (Eq. 8)
    torch.testing.assert_close(first + (n - 1) * rest, -answer_logprobs(logits, labels))
    # the first answer token of example 0 is labels[0, 4], predicted at position 3
    want = -torch.log_softmax(logits[0, 3], -1)[1]
    torch.testing.assert_close(first[0], want)
    assert hit[0] == (logits[0, 3].argmax() == 1)


def test_answer_token_losses_finds_the_decision_after_the_evidence(gen):
    logits = torch.randn(2, 8, 11, generator=gen)
    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 3:] = torch.tensor([1, 2, 9, 4, 5])  # decision id 9 at labels[0, 5]
    labels[1, 4:] = torch.tensor([8, 3, 3, 9])  # 8 first: the first decision id wins
    first, rest, hit = answer_token_losses(logits, labels, decision_ids={8, 9})
    torch.testing.assert_close(first[0], -torch.log_softmax(logits[0, 4], -1)[9])
    torch.testing.assert_close(first[1], -torch.log_softmax(logits[1, 3], -1)[8])
    n = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    torch.testing.assert_close(first + (n - 1) * rest, -answer_logprobs(logits, labels))
    assert hit[0] == (logits[0, 4].argmax() == 9)
    with pytest.raises(ValueError, match="no Yes/No token"):
        answer_token_losses(logits, labels, decision_ids={7})


def test_decision_token_ids_spell_decisions():
    from sage.diagnose import decision_token_ids
    from sage.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(BASE)
    ids = decision_token_ids(tok)
    assert ids and all(tok.decode([i]).strip().lower() in ("yes", "no", "true", "false")
                       for i in ids)
    assert set(tok.encode("So the answer is Yes.")) & ids


def test_answer_token_losses_needs_two_answer_tokens():
    labels = torch.full((1, 5), IGNORE_INDEX)
    labels[0, 4] = 3
    with pytest.raises(ValueError, match="1 answer token"):
        answer_token_losses(torch.zeros(1, 5, 6), labels)


def test_swap_images_takes_another_group():
    recs = [{"group": g, "test_image": f"t{i}", "reference_image": f"r{i}"}
            for i, g in enumerate("aabbb")]
    out = swap_images(recs)
    assert [r["test_image"] for r in out] == ["t2", "t2", "t0", "t0", "t0"]
    assert [r["group"] for r in out] == list("aabbb")  # questions and labels stay
    with pytest.raises(ValueError, match="two groups"):
        swap_images(recs[:2])


def test_cli_on_the_tiny_base(tmp_path, capsys):
    generate(tmp_path, seed=0, scale=0.03)
    main(["--model", str(BASE), "--data", str(tmp_path), "--split", "sfe_train",
          "--limit", "45", "--swap_images"])
    out = capsys.readouterr().out
    assert "images as recorded: decision token" in out
    assert "images of another group: decision token" in out
    assert "fusion pathway" not in out  # the base is a plain VLM (facts_mode none)
    a = float(out.split("pairs with AUROC ")[1].split()[0])
    assert 0.0 <= a <= 1.0


def test_auroc_hand_values_and_perception_needs_truth():
    from sage.diagnose import auroc, perception_auroc
    assert auroc([3, 2], [1, 0]) == 1.0 and auroc([0], [1]) == 0.0
    assert auroc([1, 2], [1, 0]) == pytest.approx(7 / 8)  # one tie of four
    with pytest.raises(ValueError, match="both classes"):
        auroc([1.0], [])
    with pytest.raises(KeyError, match="truth.anomalous"):
        perception_auroc(None, [{"id": "x", "group": "g"}], ".", "one-shot")


def test_attention_entropy_over_log_k():
    uniform = torch.full((2, 3, 4, 8), 1 / 8)
    assert attention_entropy(uniform) == pytest.approx(1.0)
    one_key = torch.zeros(2, 3, 4, 8)
    one_key[..., 5] = 1
    assert attention_entropy(one_key) == pytest.approx(0.0)
    # masked keys: uniform over the 4 real keys of sample 0 is still 1
    masked = torch.zeros(2, 1, 1, 8)
    masked[0, ..., :4], masked[1] = 0.25, 1 / 8
    mask = torch.tensor([[True] * 4 + [False] * 4, [True] * 8])
    assert attention_entropy(masked, mask) == pytest.approx(1.0)


def test_fact_token_figures_on_tiny_shapes(gen):
    same = torch.randn(1, 3, 8, generator=gen).expand(4, 3, 8)
    assert cross_image_cosine(same, ["a", "b", "c", "d"]) == pytest.approx(1.0)
    assert varying_share(same) == pytest.approx(0.0, abs=1e-6)
    x = torch.randn(4, 3, 8, generator=gen)
    x = x - x.mean(0)  # nothing shared across images
    assert varying_share(x) == pytest.approx(1.0)
    # pairs within a group are not pairs of different images
    y = torch.stack([torch.ones(3, 8), torch.ones(3, 8), -torch.ones(3, 8)])
    assert cross_image_cosine(y, ["a", "a", "b"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="two groups"):
        cross_image_cosine(y, ["a", "a", "a"])
    slots = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 0.0]]])
    assert slot_cosine(slots) == pytest.approx(0.5)  # 0 in image 0, 1 in image 1
    assert first_of_each_group([{"group": g, "i": i} for i, g in enumerate("aabcb")]) == [
        {"group": "a", "i": 0}, {"group": "b", "i": 2}, {"group": "c", "i": 3}]


@pytest.fixture(scope="module")
def fe_base(tmp_path_factory):
    """The committed base as a Fact[FE] model, its fusion and head initialised (SAGE's
    tensors left out of the checkpoint), as SFE starts."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("fe_base")
    os.symlink((BASE / "tokenizer.model").resolve(), d / "tokenizer.model")
    with safe_open(BASE / "model.safetensors", "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if not k.startswith("sage.")},
                  d / "model.safetensors", metadata=f.metadata())
    cfg = json.loads((BASE / "config.json").read_text())
    # a non-zero head: with the zero head (0.0) every fact token is 0 before training
    cfg["sage_config"].update(facts_mode="fe", fusion_norm="pre", fusion_init="fan_in",
                              fact_head_init=1e-3)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_fusion_report_on_the_tiny_base(fe_base, tmp_path, capsys):
    import sage
    from sage.data import load_jsonl
    from sage.diagnose import fusion_report
    generate(tmp_path, seed=0, scale=0.03)
    torch.manual_seed(0)
    model = sage.load_pretrained(fe_base, dtype=torch.float32)
    recs = first_of_each_group(load_jsonl(tmp_path / "sfe_train.jsonl", kind="qa"))[:4]
    rep = fusion_report(model, recs, str(tmp_path))
    k = model.cfg
    assert rep["one-shot"]["keys"] == k.top_k and rep["zero-shot"]["keys"] == k.n_image_tokens
    for s in ("one-shot", "zero-shot"):
        assert 0 < rep[s]["entropy_over_log_k"] <= 1 and -1 <= rep[s]["cos_across_images"] <= 1
        assert 0 < rep[s]["varying_share"] < 1 and rep[s]["token_norm"] > 0
    assert rep["one_vs_zero"]["rel_dist"] > 0  # the reference changes the fact tokens
    # the CLI prints the same figures
    main(["--model", str(fe_base), "--data", str(tmp_path), "--split", "sfe_train",
          "--limit", "45", "--images", "2"])
    out = capsys.readouterr().out
    assert "fusion pathway on 2 images" in out and "one-shot vs zero-shot fact tokens" in out


def test_probe_auroc_separates_what_is_separable_and_needs_both_classes(gen):
    from sage.diagnose import probe_auroc
    labels = [i % 3 == 0 for i in range(30)]
    x = torch.randn(30, 6, generator=gen)
    x[:, 2] += 10 * torch.tensor([float(a) for a in labels])  # one informative feature
    assert probe_auroc(x, labels) == 1.0
    flipped = probe_auroc(-x, [not a for a in labels])  # the sign is learnt, not assumed
    assert flipped == 1.0
    with pytest.raises(ValueError, match="both classes"):
        probe_auroc(x, [True] * 30)
    with pytest.raises(ValueError, match=">= 10 samples"):
        probe_auroc(x[:6], labels[:6])


def test_comparison_report_scores_a_copy_of_the_reference_as_normal(fe_base, tmp_path, capsys):
    """A normal test image compared with itself has every s_i = 1, the lowest possible Eq. 1
    anomaly score, so with such pairs the score ranks every anomalous pair above them."""
    import sage
    from sage.data import load_jsonl
    from sage.diagnose import comparison_report
    generate(tmp_path, seed=0, scale=0.03)
    torch.manual_seed(0)
    model = sage.load_pretrained(fe_base, dtype=torch.float32)
    recs = first_of_each_group(load_jsonl(tmp_path / "sfe_train.jsonl", kind="qa"))
    recs = [dict(r, reference_image=r["test_image"]) if not r["truth"]["anomalous"] else r
            for r in recs]
    assert {r["truth"]["anomalous"] for r in recs} == {True, False}
    rep = comparison_report(model, recs, str(tmp_path), folds=3)
    assert rep["eq1_auroc"] == 1.0
    for key in ("probe", "probe_fusion", "norm"):
        assert 0 <= rep[f"{key}_one-shot"] <= 1 and 0 <= rep[f"{key}_zero-shot"] <= 1
    few = comparison_report(model, recs[:5], str(tmp_path), folds=3)
    assert "probe_one-shot" not in few and "norm_one-shot" in few
