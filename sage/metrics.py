"""Evaluation metrics (paper §5.1, docs/design.md §3) as pure functions of prediction records.

A prediction is a dict with at least: id, group, level, label ("yes"/"no"), decision
("yes"/"no"/None), and optionally mle [type, loc, logic] and sbert (cosine similarity).

    accuracy      per level (standard / identification / diagnosis) and their average;
                  an answer with no decision is wrong and counted separately (no_decision)
    Acc-G         a group (same `group` id: the questions on one test/reference pair, 5 in
                  MANTA and SynthAD, any number in MMAD or under --limit) counts only if all
                  of its answers are right; overall and per level, with the group sizes
    MLE (Table 2) mean type / location / logic sub-scores and their mean (Eq. 3), with the
                  number of answers the judge failed to score
    Always normal the same accuracy and Acc-G of a reference answerer that calls every part
                  normal (each record's `normal_label`, docs/design.md §6), computed from the
                  labels: the floor a model's accuracy must clear (`always_normal`)
    by defect     accuracy per defect type of the pair asked about ("normal" for a normal
                  part), where the predictions carry the record's `defect` (its truth): which
                  kinds of defect a model finds, and whether the reference helps with them

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


def group_accuracy(preds: list[dict], group_size: int | None = None) -> dict:
    """Acc-G (%): groups formed by `group` id (never by file order), whatever their size; a
    group counts only if every answer in it is right. -> per level, "overall", "n_groups",
    "group_sizes" {size: number of groups}. A group that mixes levels (load_jsonl refuses
    such files) counts in "overall" only, as "n_mixed". group_size, when given, is checked
    for every group (ValueError)."""
    groups = defaultdict(list)
    for p in preds:
        groups[p["group"]].append(p)
    per_level, mixed, sizes = defaultdict(list), [], defaultdict(int)
    for gid, members in groups.items():
        if group_size is not None and len(members) != group_size:
            raise ValueError(f"group {gid!r} has {len(members)} predictions, expected "
                             f"{group_size}")
        sizes[len(members)] += 1
        right = all(is_correct(m) for m in members)
        levels = {m["level"] for m in members}
        (per_level[levels.pop()] if len(levels) == 1 else mixed).append(right)
    out = {lvl: 100.0 * sum(v) / len(v) for lvl, v in per_level.items()}
    ok = [x for v in per_level.values() for x in v] + mixed
    out["overall"] = 100.0 * sum(ok) / max(1, len(ok))
    out["n_groups"] = len(ok)
    out["group_sizes"] = dict(sorted(sizes.items()))
    if mixed:
        out["n_mixed"] = len(mixed)
    return out


NORMAL = "normal"


def accuracy_by_defect(preds: list[dict]) -> dict | None:
    """{defect type: {"accuracy": %, "n": questions}}, "normal" first and the types in name
    order, over the predictions that carry a `defect` key (None or "" = a normal part); None
    when none does (data without structured truth)."""
    by = defaultdict(list)
    for p in preds:
        if "defect" in p:
            by[p["defect"] or NORMAL].append(is_correct(p))
    order = sorted(by, key=lambda d: (d != NORMAL, d))
    return {d: {"accuracy": 100.0 * sum(by[d]) / len(by[d]), "n": len(by[d])}
            for d in order} or None


def mle_means(preds: list[dict]) -> dict | None:
    """Mean MLE sub-scores over the predictions the judge scored, with "n_scored" and
    "n_failed" (answers the judge could not score: `mle_failure` set); the means are None
    when it scored none. None when the judge did not run (no score and no failure)."""
    scored = [p["mle"] for p in preds if p.get("mle")]
    failed = sum(1 for p in preds if p.get("mle_failure") is not None)
    if not scored and not failed:
        return None
    n = len(scored)
    t, l, g = (sum(s[i] for s in scored) / n if n else None for i in range(3))
    return {"type": t, "location": l, "logic": g, "score": (t + l + g) / 3 if n else None,
            "n_scored": n, "n_failed": failed}


def first_groups(records: list[dict], n: int) -> list[dict]:
    """The first n records (file order) and the rest of the last group they reach: --limit
    never cuts a group of interrelated questions, whose Acc-G needs all of them. n = 0: all."""
    if n <= 0 or n >= len(records):
        return list(records)
    keep = {r["group"] for r in records[:n]}
    return [r for r in records if r["group"] in keep]


def summarize(preds: list[dict], group_size: int | None = None) -> dict:
    """Every number of one (model, setting) evaluation (group_size: see group_accuracy)."""
    sb = [p["sbert"] for p in preds if p.get("sbert") is not None]
    return {
        "n": len(preds),
        "no_decision": sum(1 for p in preds if p["decision"] is None),
        "accuracy": accuracy_by_level(preds),
        "acc_g": group_accuracy(preds, group_size),
        "mle": mle_means(preds),
        "sbert": sum(sb) / len(sb) if sb else None,
        "by_defect": accuracy_by_defect(preds),
    }


ALWAYS_NORMAL = "Always normal"


def always_normal(records: list[dict]) -> dict | None:
    """summarize() of the answerer that calls every part normal: its decision on each record is
    the record's `normal_label`, the answer the question has for a normal part. None unless
    every record has one. On a split where most parts are anomalous, or most questions are
    answered alike for normal parts, this floor is far from 50%."""
    if not records or any(r.get("normal_label") not in ("yes", "no") for r in records):
        return None
    return summarize([{"id": r["id"], "group": r["group"], "level": r["level"],
                       "label": r["label"], "decision": r["normal_label"]} for r in records])


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _fmt_mle(m: dict, key: str) -> str:
    """An MLE mean with the answers the judge failed to score: '3.21 (2 unscored)'."""
    cell = _fmt(m.get(key))
    return f"{cell} ({m['n_failed']} unscored)" if m.get("n_failed") else cell


def format_report(results: dict, settings: list[str], references: dict | None = None) -> str:
    """Markdown: Table 1 layout (accuracy per level, average, Acc-G; zero-shot / one-shot
    pairs) and Table 2 (MLE sub-scores). results[model][setting] = summarize(...);
    references[name] = summarize(...) of an answerer that needs no model (`always_normal`):
    a Table 1 row, the same in every setting, and no Table 2 row."""
    head = "| Model | " + " | ".join(
        f"{name} ({s})" for name in ("Standard", "Identification", "Diagnosis", "Average",
                                     "Acc-G", "No decision") for s in settings) + " |"
    lines = ["## Accuracy (%) — Table 1 layout", "", head,
             "|" + "---|" * (1 + 6 * len(settings))]
    sizes = {}
    rows = {**results, **{f"{name} (reference)": {s: summary for s in settings}
                          for name, summary in (references or {}).items()}}
    for model, per in rows.items():
        cells = []
        for key in ("standard", "identification", "diagnosis", "average"):
            cells += [_fmt(per[s]["accuracy"].get(key)) for s in settings]
        cells += [_fmt(per[s]["acc_g"]["overall"]) for s in settings]
        cells += [str(per[s]["no_decision"]) for s in settings]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
        if model not in results:
            continue  # a reference row: the same groups as the models'
        for s in settings:
            hist = per[s]["acc_g"].get("group_sizes") or {}
            text = ", ".join(f"{n} × {k} questions" for k, n in hist.items())
            sizes.setdefault(text, []).append(f"{model} ({s})")
    if len(sizes) == 1 and next(iter(sizes)):
        lines += ["", f"Acc-G groups: {next(iter(sizes))}."]
    elif len(sizes) > 1:
        lines += ["", "Acc-G groups: " + "; ".join(
            f"{', '.join(who)}: {text or 'none'}" for text, who in sizes.items()) + "."]
    if references:
        lines += ["", "(reference): computed from the labels, no model."]
    if ALWAYS_NORMAL in (references or {}):
        lines[-1] += (f" {ALWAYS_NORMAL} calls every part normal (each question answered as "
                      "it is for a normal part); accuracy means something only above it.")
    lines += ["", "## MLE (1–5) — Table 2 layout", "",
              "| Model | Setting | Type | Location | Logic | Score | SBERT |",
              "|---|---|---|---|---|---|---|"]
    for model, per in results.items():
        for s in settings:
            m = per[s]["mle"] or {}
            lines.append(f"| {model} | {s} | " + " | ".join(
                _fmt_mle(m, k) for k in ("type", "location", "logic", "score"))
                + f" | {_fmt(per[s]['sbert'])} |")
    lines += by_defect_table(results, settings)
    return "\n".join(lines) + "\n"


def by_defect_table(results: dict, settings: list[str]) -> list[str]:
    """Report lines: accuracy per defect type, a row per model and setting, the question
    counts in the header; [] when no prediction carries its record's defect type."""
    types = {}
    for per in results.values():
        for s in settings:
            for d, v in (per[s].get("by_defect") or {}).items():
                types.setdefault(d, v["n"])
    if not types:
        return []
    lines = ["", "## Accuracy (%) by defect type of the pair", "",
             "| Model | Setting | " + " | ".join(f"{d} ({n})" for d, n in types.items()) + " |",
             "|---|---|" + "---|" * len(types)]
    for model, per in results.items():
        for s in settings:
            row = per[s].get("by_defect") or {}
            lines.append(f"| {model} | {s} | " + " | ".join(
                _fmt(row[d]["accuracy"]) if d in row else "–" for d in types) + " |")
    return lines + ["", "Question counts in brackets; a question about a normal part counts "
                    "under normal."]
