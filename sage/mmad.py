"""MMAD's own multiple-choice evaluation (issue 15): the letter answer, accuracy per question
type, as MMAD reports it -- next to the yes/no conversion of sage.data.convert.

MMAD (mmad.json) is an object keyed by query image path (relative to the MMAD root); each
value holds "conversation": [{"Question", "Answer": letter, "Options": {letter: text},
"type"}] and normal templates ("similar_templates", "random_templates"). Each question is
asked as one multiple-choice prompt: MMAD's inspector instruction, the question, then one
"X: option" line per option (project reading of MMAD's protocol: the instruction's wording
is ours where MMAD's could not be checked), and the answer's letter is scored.

    items = load_mmad("MMAD/mmad.json")
    rows = answer_mmad(model, items, root="MMAD")          # one dict per question
    print(format_mmad_report(mmad_accuracy(rows)))
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from sage.data.images import load_image_for
from sage.inference import generate_answers

INSTRUCTION = ("You are an industrial inspector who checks products by images. Judge whether "
               "there is a defect in the query image and answer the question about it. "
               "Answer with the option's letter from the given choices directly.")


def load_mmad(path: str | Path) -> list[dict]:
    """mmad.json -> one item per question: image, reference (first similar, else random
    template, or None), question, options {letter: text}, answer letter, type. Errors name
    the file, the image key and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by query image path")
    items = []
    for image, entry in data.items():
        where = f"{path}: {image!r}"
        convs = entry.get("conversation") if isinstance(entry, dict) else None
        if not isinstance(convs, list):
            raise ValueError(f"{where}: field 'conversation' must be a list")
        templates = (entry.get("similar_templates") or []) + (entry.get("random_templates") or [])
        for j, qa in enumerate(convs):
            at = f"{where}: conversation[{j}]"
            options = qa.get("Options") if isinstance(qa, dict) else None
            if not isinstance(options, dict) or not options:
                raise ValueError(f"{at}: field 'Options' must be an object {{letter: text}}")
            answer = str(qa.get("Answer", "")).strip().rstrip(".")
            if answer not in options:
                raise ValueError(f"{at}: field 'Answer' {answer!r} is not one of the options "
                                 f"{sorted(options)}")
            items.append({"id": f"{image}#{j}", "image": image,
                          "reference": templates[0] if templates else None,
                          "question": str(qa.get("Question", "")).strip(),
                          "options": {str(k): str(v).strip() for k, v in options.items()},
                          "answer": answer, "type": str(qa.get("type", "")).strip() or "?"})
    return items


def mmad_question(question: str, options: dict[str, str]) -> str:
    """The multiple-choice text of one MMAD question (the user turn after the image)."""
    lines = [INSTRUCTION, question] + [f"{k}: {v}" for k, v in sorted(options.items())]
    return "\n".join(lines)


def extract_letter(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer gives: a leading letter ("B", "B.", "(B)", "B: text";
    not the article of "A scratch"),
    else "answer is B", else the one option whose text the answer contains; None otherwise."""
    letters = "".join(re.escape(k) for k in options)
    text = answer.strip()
    m = re.match(rf"^\(?([{letters}])(?:\)|[.:,]|$)", text)  # not "A scratch ..."
    if m is None:
        m = re.search(rf"answer is:?\s*\(?([{letters}])\b", text, re.IGNORECASE)
    if m is not None:
        return m.group(1)
    named = [k for k, v in options.items() if v and v.lower() in text.lower()]
    return named[0] if len(named) == 1 else None


def answer_mmad(model, items: list[dict], root: str | Path, batch_size: int = 8,
                **gen) -> list[dict]:
    """Ask every item (the test image; the reference only for a facts_mode 'fe' model) ->
    rows with the answer, the letter taken from it and whether it is right."""
    if model.cfg.facts_mode != "none":
        raise ValueError(f"facts_mode {model.cfg.facts_mode!r}: MMAD items carry no fact "
                         "sentences; evaluate MMAD's multiple choice with a plain VLM "
                         "(facts_mode 'none') or fill facts via the yes/no conversion")
    root, rows = Path(root), []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        examples = [{"id": it["id"], "question": mmad_question(it["question"], it["options"]),
                     "facts": [], "pixel_test": load_image_for(root / it["image"], model.cfg),
                     "pixel_ref": None} for it in chunk]
        for it, answer in zip(chunk, generate_answers(model, examples, **gen)):
            letter = extract_letter(answer, it["options"])
            rows.append({**it, "said": answer, "letter": letter,
                         "correct": letter == it["answer"]})
    return rows


def mmad_accuracy(rows: list[dict]) -> dict:
    """Accuracy (%) per question type and over all questions, with counts and unanswered."""
    by = defaultdict(list)
    for r in rows:
        by[r["type"]].append(r)
    table = {t: {"n": len(rs), "accuracy": 100.0 * sum(r["correct"] for r in rs) / len(rs),
                 "no_letter": sum(r["letter"] is None for r in rs)} for t, rs in sorted(by.items())}
    n = len(rows)
    table["all"] = {"n": n, "accuracy": 100.0 * sum(r["correct"] for r in rows) / max(n, 1),
                    "no_letter": sum(r["letter"] is None for r in rows)}
    return table


def format_mmad_report(table: dict, name: str = "model") -> str:
    """Markdown: one row per question type, then all questions."""
    lines = [f"| {name}: question type | n | accuracy (%) | no letter |", "|---|---:|---:|---:|"]
    for t, v in table.items():
        lines.append(f"| {t} | {v['n']} | {v['accuracy']:.2f} | {v['no_letter']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # a library module; its command line is a tool
    raise SystemExit("error: the command line is `python -m sage.tools.mmad` "
                     "(--help for usage)")
