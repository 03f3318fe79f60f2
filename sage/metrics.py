"""Evaluation metrics (paper §5.1, DESIGN §3) as pure functions of prediction records.

A prediction is a dict with at least: id, group, level, label ("yes"/"no"), decision
("yes"/"no"/None), and optionally mle [type, loc, logic] and sbert (cosine similarity).

    accuracy      per level (standard / identification / diagnosis) and their average;
                  an answer with no decision is wrong and counted separately (no_decision)
    Acc-G         a group (same `group` id: the 5 questions on one test/reference pair)
                  counts only if all of its answers are right; overall and per level
    MLE (Table 2) mean type / location / logic sub-scores and their mean (Eq. 3)

    m = summarize(preds); print(m["accuracy"]["average"], m["acc_g"]["overall"])
"""

from __future__ import annotations

from collections import defaultdict

LEVELS = ("standard", "identification", "diagnosis")


def is_correct(pred: dict) -> bool:
    """Right iff a decision was extracted and it equals the label (no decision = wrong)."""
    return pred["decision"] is not None and pred["decision"] == pred["label"]


def accuracy_by_level(preds: list[dict]) -> dict:
    """Accuracy (%) per level present, their unweighted average, and the overall rate."""
    by = defaultdict(list)
    for p in preds:
        by[p["level"]].append(is_correct(p))
    out = {lvl: 100.0 * sum(v) / len(v) for lvl, v in by.items()}
    levels = [lvl for lvl in LEVELS if lvl in out]
    out["average"] = sum(out[lvl] for lvl in levels) / len(levels) if levels else float("nan")
    out["overall"] = 100.0 * sum(is_correct(p) for p in preds) / max(1, len(preds))
    return out


def group_accuracy(preds: list[dict], group_size: int | None = 5) -> dict:
    """Acc-G (%): groups formed by `group` id (never by file order); a group counts only if
    every answer in it is right. group_size, when given, is checked for every group."""
    groups = defaultdict(list)
    for p in preds:
        groups[p["group"]].append(p)
    per_level = defaultdict(list)
    for gid, members in groups.items():
        if group_size is not None and len(members) != group_size:
            raise ValueError(f"group {gid!r} has {len(members)} predictions, expected "
                             f"{group_size}")
        levels = {m["level"] for m in members}
        if len(levels) != 1:
            raise ValueError(f"group {gid!r} mixes levels {sorted(levels)}")
        per_level[levels.pop()].append(all(is_correct(m) for m in members))
    out = {lvl: 100.0 * sum(v) / len(v) for lvl, v in per_level.items()}
    ok = [x for v in per_level.values() for x in v]
    out["overall"] = 100.0 * sum(ok) / max(1, len(ok))
    out["n_groups"] = len(ok)
    return out


def mle_means(preds: list[dict]) -> dict | None:
    """Mean MLE sub-scores over the predictions the judge scored; None if it scored none."""
    scored = [p["mle"] for p in preds if p.get("mle")]
    if not scored:
        return None
    n = len(scored)
    t, l, g = (sum(s[i] for s in scored) / n for i in range(3))
    return {"type": t, "location": l, "logic": g, "score": (t + l + g) / 3, "n_scored": n,
            "n_failed": sum(1 for p in preds if p.get("mle_failure"))}


def summarize(preds: list[dict], group_size: int | None = 5) -> dict:
    """Every number of one (model, setting) evaluation."""
    sb = [p["sbert"] for p in preds if p.get("sbert") is not None]
    return {
        "n": len(preds),
        "no_decision": sum(1 for p in preds if p["decision"] is None),
        "accuracy": accuracy_by_level(preds),
        "acc_g": group_accuracy(preds, group_size),
        "mle": mle_means(preds),
        "sbert": sum(sb) / len(sb) if sb else None,
    }


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def format_report(results: dict, settings: list[str]) -> str:
    """Markdown: Table 1 layout (accuracy per level, average, Acc-G; zero-shot / one-shot
    pairs) and Table 2 (MLE sub-scores). results[model][setting] = summarize(...)."""
    head = "| Model | " + " | ".join(
        f"{name} ({s})" for name in ("Standard", "Identification", "Diagnosis", "Average",
                                     "Acc-G", "No decision") for s in settings) + " |"
    lines = ["## Accuracy (%) — Table 1 layout", "", head,
             "|" + "---|" * (1 + 6 * len(settings))]
    for model, per in results.items():
        cells = []
        for key in ("standard", "identification", "diagnosis", "average"):
            cells += [_fmt(per[s]["accuracy"].get(key)) for s in settings]
        cells += [_fmt(per[s]["acc_g"]["overall"]) for s in settings]
        cells += [str(per[s]["no_decision"]) for s in settings]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "## MLE (1–5) — Table 2 layout", "",
              "| Model | Setting | Type | Location | Logic | Score | SBERT |",
              "|---|---|---|---|---|---|---|"]
    for model, per in results.items():
        for s in settings:
            m = per[s]["mle"] or {}
            lines.append(f"| {model} | {s} | {_fmt(m.get('type'))} | "
                         f"{_fmt(m.get('location'))} | {_fmt(m.get('logic'))} | "
                         f"{_fmt(m.get('score'))} | {_fmt(per[s]['sbert'])} |")
    return "\n".join(lines) + "\n"
