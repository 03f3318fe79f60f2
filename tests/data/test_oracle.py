"""The oracle judge and the Yes/No decision rule on hand-written answers.
Run: python -m pytest -q tests/data/test_oracle.py"""

import numpy as np
import pytest

from sage.data import synthad
from sage.data.oracle import extract_decision, oracle_scores

SCRATCH = {"anomalous": True, "defect": "scratch", "region": "top-left"}
NORMAL = {"anomalous": False, "defect": None, "region": None}


@pytest.mark.parametrize("text, want", [
    # decision first
    ("Yes, there is a scratch.", "yes"), ("No.", "no"), ("No. The washer is clean.", "no"),
    ("No, the surface is clean.", "no"), ("yes", "yes"), ("NO", "no"), ("  Yes!", "yes"),
    ("No - the part is fine", "no"), ("No because the surface is clean", "no"),
    ("Yes\nThe washer has a hole", "yes"), ("**Yes**, a scratch.", "yes"),
    ("No, but yes there could be", "no"), ("NO. clean", "no"),
    # evidence first: the final statement decides
    ("There is no scratch on the washer. So the answer is Yes.", "yes"),
    ("The surface is clean. The answer is no", "no"), ("A hole at the top. Therefore, yes", "yes"),
    ("Nothing is missing. Hence: No.", "no"), ("answer: yes", "yes"),
    ("Final answer = No", "no"), ("The part is defective, so yes", "yes"),
    ("The washer is clean. In conclusion, no.", "no"), ("Conclusion: yes", "yes"),
    ("The answer is **Yes**.", "yes"), ('The answer is "no".', "no"),
    ("My verdict is no.", "no"), ("There is a scratch on the washer. Yes.", "yes"),
    ("There is a stain.\nNo", "no"),
    ("The answer to whether there is no scratch is yes.", "yes"),  # "is no scratch": evidence
    # a leading decision loses to a later statement of it
    ("No. Looking again there is a scratch. So the answer is Yes.", "yes"),
    ("Yes, no defect is visible. So the answer is No.", "no"),
    # negations inside the evidence are not decisions
    ("There is no scratch on the washer", None), ("no defect is visible", None),
    ("NO defect is visible", None), ("No scratch is present, the surface is clean", None),
    ("The surface is clean, so no defect is visible.", None),
    ("Overall, no defect is seen", None), ("It is true that there is a scratch", None),
    ("No scratch is present. So the answer is No.", "no"),
    # true / false
    ("True. The part is bent.", "yes"), ("False", "no"), ("True: a hole at the top.", "yes"),
    ("So the answer is False.", "no"), ("Hence, true.", "yes"),
    # no decision
    ("", None), (None, None), ("It is hard to tell.", None), ("Yesterday it was fine", None),
    ("I see a notch on the knob", None), ("The answer is yes or no", None), ("no.5 part", None),
])
def test_extract_decision(text, want):
    assert extract_decision(text) == want


def test_every_synthad_answer_states_its_decision():
    """SynthAD's own answer builders, for every category (the extra ones too): every answer
    (A1..A4, the pretraining Yes/No answers) resolves to the decision it closes with, and its
    evidence alone to none."""
    rng = np.random.default_rng(0)
    n = 0
    for cat in (*synthad.CATEGORIES, *synthad.EXTRA_CATEGORIES):
        cases = [{"anomalous": False, "defect": None, "region": None}]
        for defect in synthad.DEFECTS:
            for region in synthad.REGIONS:
                comp = cat.components[0][0]
                cases.append({"anomalous": True, "defect": defect, "region": region,
                              "component": comp, "colour": cat.variants[0][0],
                              "reference_colour": cat.variants[-1][0]})
        for t in cases:
            for label in ("yes", "no"):
                wrong = "no" if label == "yes" else "yes"
                answers = synthad.answers_for(label, t, cat.name, rng)
                for a, said in zip(answers, (label, label, label, wrong)):
                    assert extract_decision(a) == said, a
                    evidence = a.rpartition(synthad.decide(said))[0]
                    assert evidence and extract_decision(evidence) is None, a
                    n += 1
        for colour, _ in cat.variants:
            for _ in range(8):
                for q, a, label in synthad.yes_no_questions(cat, colour, rng):
                    assert extract_decision(a) == label, (q, a)
                    n += 1
    assert n > 1000
    assert [extract_decision(synthad.decide(x)) for x in ("yes", "no")] == ["yes", "no"]


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


def test_words_count_only_as_words():
    hole = {"anomalous": True, "defect": "hole", "region": "top"}
    q = "Is there a defect on the nut?"
    # "whole" names no hole: a colour deviation named for a hole is the wrong type
    assert oracle_scores("Yes. A colour deviation over the whole part.", hole, "yes", q)[0] == 1
    assert oracle_scores("Yes. Two holes at the top; so it leaks.", hole, "yes", q) == (5, 5, 5)
    # "abnormal" is not a claim that the part is normal; "also" gives no reason
    assert oracle_scores("No. It looks abnormal.", NORMAL, "no", q) == (3, 5, 3)  # not 5
    assert oracle_scores("No. It also looks normal.", NORMAL, "no", q) == (5, 5, 3)
    assert oracle_scores("No. It looks normal, so it is usable.", NORMAL, "no", q) == (5, 5, 5)
    # "stainless" names no stain; "stained" does
    assert oracle_scores("Yes. The stainless nut is fine.", NORMAL, "yes", q)[0] == 5
    assert oracle_scores("Yes. The nut is stained.", NORMAL, "yes", q)[0] == 1


def test_bad_truth_is_an_error():
    with pytest.raises(KeyError):
        oracle_scores("Yes.", {}, "yes", "q")
    with pytest.raises(ValueError):
        oracle_scores("Yes.", NORMAL, "maybe", "q")
