"""Metrics (sage/metrics.py) on hand-made predictions: accuracy per level, Acc-G by group id,
no-decision counting, MLE means, the report layout; and the Yes/No decision rule."""

import math

import pytest

from sage.data.oracle import extract_decision
from sage.metrics import accuracy_by_level, group_accuracy, mle_means, summarize, format_report


def pred(group, level, label, decision, mle=None, **kw):
    return {"id": f"{group}-{kw.pop('i', 0)}", "group": group, "level": level, "label": label,
            "decision": decision, "mle": mle, **kw}


@pytest.mark.parametrize("text,want", [
    ("Yes, there is a scratch.", "yes"),
    ("No. The part is normal.", "no"),
    ("yes", "yes"),
    ("NO defect is visible", "no"),
    ("True: a hole at the top.", "yes"),
    ("False.", "no"),
    ("No, but yes there could be", "no"),          # the first decision word wins
    ("The part is defective, so yes.", "yes"),
    ("I see a notch on the knob", None),           # "no" inside a word does not count
    ("Yesterday it was fine", None),
    ("", None),
    (None, None),
])
def test_extract_decision(text, want):
    assert extract_decision(text) == want


def test_accuracy_per_level_and_average():
    preds = ([pred("a", "standard", "yes", "yes", i=i) for i in range(3)]
             + [pred("a", "standard", "no", "yes", i=3)]                     # std 3/4 = 75
             + [pred("b", "identification", "no", "no", i=i) for i in range(2)]  # id 2/2 = 100
             + [pred("c", "diagnosis", "yes", None, i=0),                    # no decision: wrong
                pred("c", "diagnosis", "yes", "yes", i=1)])                  # diag 1/2 = 50
    acc = accuracy_by_level(preds)
    assert acc["standard"] == 75.0 and acc["identification"] == 100.0
    assert acc["diagnosis"] == 50.0
    assert acc["average"] == pytest.approx((75 + 100 + 50) / 3)   # unweighted over levels
    assert acc["overall"] == pytest.approx(100 * 6 / 8)
    assert summarize(preds, group_size=None)["no_decision"] == 1


def test_acc_g_groups_by_id_not_by_order():
    # two groups of 5, interleaved in file order; g1 all right, g2 one wrong
    g1 = [pred("g1", "standard", "yes", "yes", i=i) for i in range(5)]
    g2 = [pred("g2", "diagnosis", "no", "no", i=i) for i in range(4)] + \
        [pred("g2", "diagnosis", "no", "yes", i=4)]
    preds = [x for pair in zip(g1, g2) for x in pair]
    g = group_accuracy(preds)
    assert g["overall"] == 50.0 and g["n_groups"] == 2
    assert g["standard"] == 100.0 and g["diagnosis"] == 0.0
    # a group with a missing answer (no decision) fails as a whole
    g1[2]["decision"] = None
    assert group_accuracy(g1)["overall"] == 0.0


def test_acc_g_rejects_bad_groups():
    short = [pred("g", "standard", "yes", "yes", i=i) for i in range(4)]
    with pytest.raises(ValueError, match="group 'g' has 4 predictions, expected 5"):
        group_accuracy(short)
    mixed = short + [pred("g", "diagnosis", "yes", "yes", i=4)]
    with pytest.raises(ValueError, match="mixes levels"):
        group_accuracy(mixed)


def test_mle_means_and_failures():
    preds = [pred("a", "standard", "yes", "yes", mle=[5, 4, 3]),
             pred("a", "standard", "yes", "yes", mle=[1, 2, 3]),
             pred("a", "standard", "yes", "no", mle=None, mle_failure="unparsable")]
    m = mle_means(preds)
    assert (m["type"], m["location"], m["logic"]) == (3.0, 3.0, 3.0)
    assert m["score"] == 3.0 and m["n_scored"] == 2 and m["n_failed"] == 1
    assert mle_means([pred("a", "standard", "yes", "yes")]) is None


def test_report_has_a_row_per_model_and_both_settings():
    preds = [pred("g", "standard", "yes", "yes", mle=[5, 5, 5], i=i) for i in range(5)]
    s = summarize(preds)
    text = format_report({"Base": {"zero-shot": s, "one-shot": s},
                          "SFE": {"zero-shot": s, "one-shot": s}}, ["zero-shot", "one-shot"])
    rows = [x for x in text.splitlines() if x.startswith("| Base") or x.startswith("| SFE")]
    assert len(rows) == 2 + 4                                  # Table 1 rows + Table 2 rows
    assert "Standard (zero-shot) | Standard (one-shot)" in text
    assert "| Base | zero-shot | 5.00 | 5.00 | 5.00 | 5.00 | – |" in text
    assert not math.isnan(s["accuracy"]["average"])
