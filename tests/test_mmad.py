"""MMAD's multiple-choice evaluation: items, prompt, letter extraction, accuracy per type and
the tool end to end on the tiny base.   python -m pytest -q tests/test_mmad.py"""

import json
from pathlib import Path

import pytest
from PIL import Image

from sage.mmad import (INSTRUCTION, extract_letter, load_mmad, mmad_accuracy, mmad_question)

BASE = Path(__file__).resolve().parents[1] / "weights" / "sage-tiny-base"
MMAD = {"DS-MVTec/bottle/image/broken_large/000.png": {
    "image_path": "DS-MVTec/bottle/image/broken_large/000.png",
    "similar_templates": ["DS-MVTec/bottle/image/good/001.png"], "random_templates": [],
    "conversation": [
        {"Question": "Is there any defect in the object?", "Answer": "A",
         "Options": {"A": "Yes.", "B": "No."}, "type": "Anomaly Detection"},
        {"Question": "What is the type of the defect?", "Answer": "C",
         "Options": {"A": "Scratch.", "B": "Hole.", "C": "Broken.", "D": "None."},
         "type": "Defect Classification"}]}}


def write(tmp_path) -> Path:
    for rel in (*MMAD, "DS-MVTec/bottle/image/good/001.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / rel)
    (tmp_path / "mmad.json").write_text(json.dumps(MMAD))
    return tmp_path / "mmad.json"


def test_items_and_prompt(tmp_path):
    items = load_mmad(write(tmp_path))
    assert [(i["type"], i["answer"]) for i in items] == [("Anomaly Detection", "A"),
                                                        ("Defect Classification", "C")]
    assert items[1]["reference"] == "DS-MVTec/bottle/image/good/001.png"
    assert mmad_question(items[1]["question"], items[1]["options"]) == (
        INSTRUCTION + "\nWhat is the type of the defect?\nA: Scratch.\nB: Hole.\nC: Broken.\n"
        "D: None.")
    bad = json.loads(json.dumps(MMAD))
    bad["DS-MVTec/bottle/image/broken_large/000.png"]["conversation"][1]["Answer"] = "E"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad.json: .*conversation\[1\]: field 'Answer' 'E'"):
        load_mmad(tmp_path / "bad.json")


def test_extract_letter():
    opts = {"A": "Scratch.", "B": "Hole.", "C": "Broken.", "D": "None."}
    for said, want in [("C", "C"), ("C.", "C"), ("(B)", "B"), ("B: Hole.", "B"),
                       ("The answer is D.", "D"), ("It looks broken.", "C"),
                       ("A scratch and a hole", None), ("", None)]:
        assert extract_letter(said, opts) == want, said


def test_accuracy_per_question_type():
    rows = [{"type": "Anomaly Detection", "letter": "A", "correct": True},
            {"type": "Anomaly Detection", "letter": None, "correct": False},
            {"type": "Defect Classification", "letter": "B", "correct": False}]
    table = mmad_accuracy(rows)
    assert table["Anomaly Detection"] == {"n": 2, "accuracy": 50.0, "no_letter": 1}
    assert table["Defect Classification"]["accuracy"] == 0.0
    assert table["all"]["n"] == 3 and table["all"]["accuracy"] == pytest.approx(100 / 3)


def test_tool_on_the_tiny_base(tmp_path):
    from sage.tools.mmad import main

    main(["--model", str(BASE), "--data", str(write(tmp_path)), "--out", str(tmp_path / "o"),
          "--max_new_tokens", "4", "--device", "cpu"])
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["all"]["n"] == 2 and set(metrics) == {"Anomaly Detection",
                                                         "Defect Classification", "all"}
    rows = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["A", "C"] and all("said" in r for r in rows)
    assert "| Defect Classification | 1 |" in (tmp_path / "o" / "report.md").read_text()
