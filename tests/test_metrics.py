"""Metrics (sage/metrics.py) on hand-made predictions: accuracy per level, Acc-G by group id
(groups of any size), no-decision counting, MLE means and failures, the report layout. The
Yes/No decision rule is tested in tests/data/test_oracle.py. The "Always normal" reference row
from the records' normal_label."""

import json
import math

import pytest

from sage.metrics import (ALWAYS_NORMAL, accuracy_by_level, always_normal, format_report,
                          group_accuracy, mle_means, summarize)


def pred(group, level, label, decision, mle=None, **kw):
    return {"id": f"{group}-{kw.pop('i', 0)}", "group": group, "level": level, "label": label,
            "decision": decision, "mle": mle, **kw}


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
    assert summarize(preds)["no_decision"] == 1


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


def test_acc_g_uses_groups_as_they_are():
    """Groups of any size (MMAD, --limit): no error, and their sizes are reported."""
    three = [pred("g3", "standard", "yes", "yes", i=i) for i in range(3)]
    one = [pred("g1", "diagnosis", "no", "no")]
    five = [pred("g5", "identification", "no", "no", i=i) for i in range(4)] + \
        [pred("g5", "identification", "no", None, i=4)]
    g = group_accuracy(three + one + five)
    assert g["n_groups"] == 3 and g["overall"] == pytest.approx(200 / 3)
    assert g["group_sizes"] == {1: 1, 3: 1, 5: 1}
    assert (g["standard"], g["diagnosis"], g["identification"]) == (100.0, 100.0, 0.0)
    s = summarize(three + one)  # the default checks no size
    assert s["acc_g"]["group_sizes"] == {1: 1, 3: 1}
    json.dumps(s)  # metrics.json can hold it
    # a caller may still insist on a size
    with pytest.raises(ValueError, match="group 'g3' has 3 predictions, expected 5"):
        group_accuracy(three, group_size=5)
    # a group mixing levels (load_jsonl refuses such files) counts in "overall" only
    mixed = three + [pred("g3", "diagnosis", "yes", "yes", i=3)]
    g = group_accuracy(mixed)
    assert g["overall"] == 100.0 and g["n_mixed"] == 1 and "standard" not in g


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


def test_report_counts_unscored_answers_and_group_sizes():
    ok = [pred("g", "standard", "yes", "yes", mle=[4, 3, 2], i=i) for i in range(3)]
    failed = [pred("h", "standard", "yes", "yes", mle=None, mle_failure="timeout", i=i)
              for i in range(2)]
    s = summarize(ok + failed)
    assert s["mle"]["n_failed"] == 2 and s["mle"]["n_scored"] == 3
    text = format_report({"Base": {"zero-shot": s}}, ["zero-shot"])
    assert ("| Base | zero-shot | 4.00 (2 unscored) | 3.00 (2 unscored) | 2.00 (2 unscored) | "
            "3.00 (2 unscored) | – |") in text
    assert "Acc-G groups: 1 × 2 questions, 1 × 3 questions." in text
    # every answer unscored: no means, but the count is shown
    s = summarize(failed)
    assert s["mle"]["score"] is None and s["mle"]["n_failed"] == 2
    assert "| – (2 unscored) |" in format_report({"Base": {"zero-shot": s}}, ["zero-shot"])
    # no judge: no counts
    s = summarize([pred("g", "standard", "yes", "yes")])
    assert s["mle"] is None
    assert "unscored" not in format_report({"Base": {"zero-shot": s}}, ["zero-shot"])


def test_first_groups_keeps_whole_groups():
    from sage.metrics import first_groups

    recs = [{"id": i, "group": g} for i, g in enumerate("aaabbcca")]
    assert [r["id"] for r in first_groups(recs, 2)] == [0, 1, 2, 7]  # group a, all of it
    assert [r["id"] for r in first_groups(recs, 4)] == [0, 1, 2, 3, 4, 7]
    assert first_groups(recs, 0) == recs and first_groups(recs, 99) == recs


def record(group, level, label, normal_label, i=0):
    return {"id": f"{group}-{i}", "group": group, "level": level, "label": label,
            "normal_label": normal_label}


def test_always_normal_from_the_labels():
    # a normal part (g1): every label is its normal label, all right; an anomalous part
    # asked "any anomaly?" (label yes, normal no) and "free of defects?" (no / yes): both wrong;
    # an anomalous part asked "is there a hole?" when the defect is a crack (no / no): right
    recs = ([record("g1", "standard", "yes", "yes", 0), record("g1", "standard", "no", "no", 1)]
            + [record("g2", "standard", "yes", "no", 0), record("g2", "standard", "no", "yes", 1)]
            + [record("g3", "identification", "no", "no", 0),
               record("g3", "identification", "yes", "no", 1)])
    s = always_normal(recs)
    assert s["accuracy"]["standard"] == 50.0 and s["accuracy"]["identification"] == 50.0
    assert s["accuracy"]["average"] == 50.0 and s["accuracy"]["overall"] == 50.0
    assert s["acc_g"]["overall"] == pytest.approx(100 / 3)  # g1 only
    assert s["n"] == 6 and s["no_decision"] == 0 and s["mle"] is None
    # it is summarize() of the answerer whose decision is the normal label
    assert s == summarize([{**r, "decision": r["normal_label"]} for r in recs])
    # one record without the field: no reference row at all
    assert always_normal(recs + [record("g4", "diagnosis", "no", None)]) is None
    assert always_normal([]) is None


def test_report_reference_row_in_table_1_only():
    preds = [pred("g", "standard", "yes", "yes", mle=[5, 5, 5], i=i) for i in range(5)]
    s = summarize(preds)
    floor = always_normal([record("g", "standard", "yes", "no", i) for i in range(5)])
    settings = ["zero-shot", "one-shot"]
    text = format_report({"SFE": {x: s for x in settings}}, settings, {ALWAYS_NORMAL: floor})
    row = [x for x in text.splitlines() if x.startswith("| Always normal (reference) |")]
    assert row == ["| Always normal (reference) | 0.00 | 0.00 | – | – | – | – | 0.00 | 0.00 "
                   "| 0.00 | 0.00 | 0 | 0 |"]
    assert "Always normal calls every part normal" in text
    assert text.count("Always normal (reference)") == 1  # not in Table 2
    assert "Acc-G groups: 1 × 5 questions." in text  # the models' groups only
    assert "reference" not in format_report({"SFE": {x: s for x in settings}}, settings)


def test_accuracy_by_defect_type_and_its_table():
    preds = [pred("a", "standard", "yes", "yes", defect="hole", i=0),
             pred("a", "standard", "no", "yes", defect="hole", i=1),
             pred("b", "standard", "no", "no", defect=None, i=0),
             pred("c", "standard", "yes", None, defect="colour deviation", i=0)]
    by = summarize(preds)["by_defect"]
    assert list(by) == ["normal", "colour deviation", "hole"]  # normal first, then by name
    assert by == {"normal": {"accuracy": 100.0, "n": 1},
                  "colour deviation": {"accuracy": 0.0, "n": 1},  # no decision: wrong
                  "hole": {"accuracy": 50.0, "n": 2}}
    assert summarize([pred("g", "standard", "yes", "yes")])["by_defect"] is None
    text = format_report({"SFE": {"zero-shot": summarize(preds),
                                  "one-shot": summarize(preds[:2])}}, ["zero-shot", "one-shot"])
    assert "| Model | Setting | normal (1) | colour deviation (1) | hole (2) |" in text
    assert "| SFE | zero-shot | 100.00 | 0.00 | 50.00 |" in text
    assert "| SFE | one-shot | – | – | 50.00 |" in text
    plain = summarize([pred("g", "standard", "yes", "yes")])
    assert "by defect type" not in format_report({"M": {"zero-shot": plain}}, ["zero-shot"])
