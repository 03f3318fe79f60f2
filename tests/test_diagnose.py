"""sage/diagnose.py: per-token losses agree with Eq. 8's log-probs, image swapping, and the CLI
on the committed tiny base.  Run: python -m pytest -q tests/test_diagnose.py"""

from pathlib import Path

import pytest
import torch

from sage.data.synthad import generate
from sage.diagnose import answer_token_losses, main, swap_images
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
          "--limit", "10", "--swap_images"])
    out = capsys.readouterr().out
    assert "images as recorded: decision token" in out
    assert "images of another group: decision token" in out
    assert "fact tokens" not in out  # the base is a plain VLM (facts_mode none)
