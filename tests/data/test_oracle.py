"""The oracle judge and the Yes/No decision rule on hand-written answers.
Run: python -m pytest -q tests/data/test_oracle.py"""

import pytest

from sage.data.oracle import extract_decision, oracle_scores

SCRATCH = {"anomalous": True, "defect": "scratch", "region": "top-left"}
NORMAL = {"anomalous": False, "defect": None, "region": None}


@pytest.mark.parametrize("text, want", [
    ("Yes, there is a scratch.", "yes"), ("No.", "no"), ("True. The part is bent.", "yes"),
    ("False", "no"), ("The part is defective, so yes", "yes"), ("", None), (None, None),
    ("It is hard to tell.", None), ("No, not yes.", "no"), ("Yesterday it was fine", None),
    ("NO. clean", "no"),
])
def test_extract_decision(text, want):
    assert extract_decision(text) == want


def test_scores_for_a_scratch():
    q = "Is there a scratch on the washer?"
    # right type, right region, decision + reason
    assert oracle_scores("Yes. There is a scratch at the top-left; it can grow into a crack.",
                         SCRATCH, "yes", q) == (5, 5, 5)
    # right decision, wrong type at a neighbouring region, no reason
    assert oracle_scores("Yes. There is a hole at the top.", SCRATCH, "yes", q) == (1, 3, 3)
    # hedged
    assert oracle_scores("Yes. Maybe, it is hard to tell.", SCRATCH, "yes", q)[2] == 2
    # wrong decision, claims normal
    assert oracle_scores("No. The washer looks normal.", SCRATCH, "yes", q) == (1, 2, 1)
    # far region scores 1; "top-left" is not also "top"
    assert oracle_scores("Yes. A scratch at the bottom-right.", SCRATCH, "yes", q)[1] == 1


def test_scores_for_a_normal_part():
    q = "Is the washer free of defects?"
    assert oracle_scores("Yes. The washer matches the normal reference and shows no defect; so "
                         "it is fit for use.", NORMAL, "yes", q) == (5, 5, 5)
    assert oracle_scores("No. There is a stain at the left.", NORMAL, "yes", q) == (1, 2, 1)


def test_colour_deviation_covers_the_whole_part():
    t = {"anomalous": True, "defect": "colour deviation", "region": "center"}
    s = oracle_scores("Yes. The capsule is red while the reference is blue, a colour deviation "
                      "over the whole part.", t, "yes", "Is the colour the same?")
    assert s[:2] == (5, 5)


def test_bad_truth_is_an_error():
    with pytest.raises(KeyError):
        oracle_scores("Yes.", {}, "yes", "q")
    with pytest.raises(ValueError):
        oracle_scores("Yes.", NORMAL, "maybe", "q")
