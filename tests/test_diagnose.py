"""sage/diagnose.py: per-token losses agree with Eq. 8's log-probs, image swapping, and the CLI
on the committed tiny base.  Run: python -m pytest -q tests/test_diagnose.py"""

from pathlib import Path

import pytest
import torch

from sage.data.synthad import generate
from sage.diagnose import answer_token_losses, swap_images
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
    assert "fact tokens" not in out  # the base is a plain VLM (facts_mode none)
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
