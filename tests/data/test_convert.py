"""Importers (LLaVA, MANTA/MPDD-QA, MMAD, MVTec AD folder) on small hand-made fixtures; the output
validates with load_jsonl. Run: python -m pytest -q tests/data/test_convert.py"""

import json

import pytest
from PIL import Image

from sage.data.convert import convert, stated_decision, mvtec_questions, rank_options
from sage.tools.convert import main
from sage.data.schema import load_jsonl


def png(path, color=(0, 0, 0), size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------- LLaVA

LLAVA = [
    {"id": "000123", "image": "coco/a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "A black square."},
        {"from": "human", "value": "Is it round?"},
        {"from": "gpt", "value": "No, it is square."}]},
    {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"},
                                          {"from": "gpt", "value": "Hello."}]},
    {"id": "x", "image": ["coco/a.png"], "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Colour?\n<image>"}, {"from": "gpt", "value": "Black."}]},
]


def test_llava(tmp_path):
    png(tmp_path / "coco" / "a.png")
    src = dump(tmp_path / "llava.json", LLAVA)
    n, skipped, _ = convert("llava", src, tmp_path / "general.jsonl")
    assert (n, skipped) == (3, 1)  # 2 turns + 1 turn; the text-only item is skipped
    recs = load_jsonl(tmp_path / "general.jsonl", kind="general", check_images=True)
    assert [r["question"] for r in recs] == ["What is shown?", "Is it round?", "Colour?"]
    assert recs[1]["answers"] == ["No, it is square."] and recs[0]["level"] == "general"
    assert recs[0]["test_image"] == "coco/a.png" and recs[0]["reference_image"] is None
    assert recs[0]["source_id"] == "000123" and len({r["id"] for r in recs}) == 3


@pytest.mark.parametrize("name", ["llava.jsonl", "annotations.json"])
def test_llava_jsonl_one_conversation_per_line(tmp_path, name):
    # InternVL's fine-tuning annotations: one conversation per line (also under a .json name)
    png(tmp_path / "coco" / "a.png")
    src = tmp_path / name
    src.write_text("".join(json.dumps(item) + "\n" for item in LLAVA) + "\n")
    n, skipped, _ = convert("llava", src, tmp_path / "general.jsonl")
    assert (n, skipped) == (3, 1)  # the same records as the JSON list gives
    assert [r["question"] for r in load_jsonl(tmp_path / "general.jsonl", kind="general")] == [
        "What is shown?", "Is it round?", "Colour?"]
    src.write_text(json.dumps(LLAVA[0]) + "\n" + json.dumps(LLAVA[2])[:-1] + "\n")
    with pytest.raises(ValueError, match=rf"{name}: line 2: malformed JSON"):
        convert("llava", src, tmp_path / "o.jsonl")


def test_llava_errors_name_item_and_field(tmp_path):
    bad = [LLAVA[0], {"image": "coco/a.png", "conversations": [
        {"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}]
    src = dump(tmp_path / "llava.json", bad)
    with pytest.raises(ValueError, match=r"llava.json: item 1: field 'conversations\[0\].from'"):
        convert("llava", src, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
    n, skipped, errors = convert("llava", src, tmp_path / "o.jsonl", skip_bad=True)
    assert (n, skipped) == (2, 1) and "item 1" in errors[0]


def test_images_must_stay_under_output_root(tmp_path):
    src = dump(tmp_path / "in" / "llava.json", LLAVA[:1])
    with pytest.raises(ValueError, match="outside the output's data root"):
        convert("llava", src, tmp_path / "elsewhere" / "o.jsonl")


# ----------------------------------------------------------------------------- MANTA

def manta_item(pair_type="defect identification", answer=False):
    qa = []
    for j in range(5):
        qa.append({"question_en": f"Is there a crack near screw {j}?",
                   "answer_options": [{"answer_en": "Yes, a crack is visible."},
                                      {"answer_en": "No, the surface is intact."},
                                      {"answer_en": "No."},
                                      {"answer_en": "Perhaps; it is unclear."}],
                   "answer": answer, "conclusion_en": "The part is normal."})
    return {"domain": "metal_plate", "test_image": "mpdd/test/001.png",
            "reference_image": "mpdd/good/000.png", "pair_type": pair_type,
            "question_answer": qa}


def test_manta(tmp_path):
    src = dump(tmp_path / "manta.json", [manta_item(), manta_item("Standard Comparison", True)])
    n, skipped, _ = convert("manta", src, tmp_path / "qa.jsonl", source="mpdd")
    assert (n, skipped) == (10, 0)
    recs = load_jsonl(tmp_path / "qa.jsonl")
    first = recs[0]
    assert first["level"] == "identification" and first["label"] == "no"
    assert first["group"] == "mpdd-00000" and first["id"] == "mpdd-00000-q0"
    assert {r["group"] for r in recs[:5]} == {"mpdd-00000"} and recs[5]["level"] == "standard"
    # answer False: the option opening with "Yes" moves behind the others (stable)
    assert first["answers"] == ["No, the surface is intact.", "No.", "Perhaps; it is unclear.",
                                "Yes, a crack is visible."]
    assert recs[5]["answers"][0] == "Yes, a crack is visible."  # answer True: order kept
    assert first["category"] == "metal_plate" and first["conclusion"] == "The part is normal."
    assert first["test_image"] == "mpdd/test/001.png"


def test_manta_bad_pair_type_and_options(tmp_path):
    src = dump(tmp_path / "manta.json", [manta_item(), manta_item("defect surgery")])
    with pytest.raises(ValueError, match="item 1: field 'pair_type': unknown pair_type"):
        convert("manta", src, tmp_path / "qa.jsonl")
    item = manta_item()
    item["question_answer"][2]["answer_options"].pop()
    src = dump(tmp_path / "manta.json", [item])
    with pytest.raises(ValueError, match=r"question_answer\[2\]: field 'answer_options'"):
        convert("manta", src, tmp_path / "qa.jsonl")


def test_rank_options_and_decisions():
    assert stated_decision("Yes, there is.") is True and stated_decision("no.") is False
    assert stated_decision("True") is True and stated_decision("Perhaps yes") is None
    assert rank_options(["Yes, a.", "No. b", "c", "Yes. d"], False) == [
        "No. b", "c", "Yes, a.", "Yes. d"]
    # the decision an option states, not its first word: evidence first, decision last
    assert stated_decision("There is no scratch on the washer. So the answer is Yes.") is True


# ----------------------------------------------------------------------------- MMAD

MMAD = {"DS-MVTec/bottle/image/broken_large/000.png": {
    "image_path": "DS-MVTec/bottle/image/broken_large/000.png",
    "mask_path": "DS-MVTec/bottle/rbg_mask/broken_large/000_rbg_mask.png",
    "similar_templates": ["DS-MVTec/bottle/image/good/001.png"],
    "random_templates": ["DS-MVTec/bottle/image/good/007.png"],
    "conversation": [
        {"Question": "Is there any defect in the object?", "Answer": "A",
         "Options": {"A": "Yes.", "B": "No."}, "type": "Anomaly Detection", "annotation": True},
        {"Question": "What is the type of the defect?", "Answer": "B",
         "Options": {"A": "Scratch.", "B": "Broken rim.", "C": "Stain."},
         "type": "Defect Classification", "annotation": True},
        {"Question": "What is the likely effect of the defect?", "Answer": "A",
         "Options": {"A": "It may leak.", "B": "None."}, "type": "Defect Analysis"}]}}


def test_mmad(tmp_path):
    src = dump(tmp_path / "MMAD" / "mmad.json", MMAD)
    n, _, _ = convert("mmad", src, tmp_path / "MMAD" / "qa.jsonl")
    recs = load_jsonl(tmp_path / "MMAD" / "qa.jsonl")
    assert n == len(recs) == 1 + 3 + 2  # yes/no kept; choices -> one record per option
    det = recs[0]
    assert det["label"] == "yes" and det["level"] == "standard" and det["category"] == "bottle"
    assert det["reference_image"] == "DS-MVTec/bottle/image/good/001.png"  # similar template
    cls = recs[1:4]
    assert [r["label"] for r in cls] == ["no", "yes", "no"]
    assert cls[1]["question"] == 'What is the type of the defect? Is the answer "Broken rim."?'
    assert cls[0]["answers"][0] == "No. The answer is: Broken rim."
    assert {r["level"] for r in cls} == {"identification"} and recs[4]["level"] == "diagnosis"
    assert recs[4]["group"] != cls[0]["group"]  # groups are (image, level)


# ----------------------------------------------------------------------------- MVTec

def test_mvtec_folder(tmp_path, capsys):
    root = tmp_path / "mvtec"
    for k in range(2):
        png(root / "bottle" / "train" / "good" / f"00{k}.png", (200, 200, 200))
    png(root / "bottle" / "test" / "good" / "000.png", (200, 200, 200))
    png(root / "bottle" / "test" / "broken_large" / "000.png", (10, 10, 10))
    mask = Image.new("L", (30, 30), 0)
    mask.paste(255, (0, 0, 8, 8))  # top-left corner
    (root / "bottle" / "ground_truth" / "broken_large").mkdir(parents=True)
    mask.save(root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png")
    main(["mvtec", str(root), str(root / "qa.jsonl"), "--check-images"])
    assert "wrote 10 records" in capsys.readouterr().out
    recs = load_jsonl(root / "qa.jsonl", check_images=True)
    good, bad = recs[:5], recs[5:]
    assert good[0]["truth"] == {"anomalous": False, "defect": None, "region": None}
    assert bad[0]["truth"] == {"anomalous": True, "defect": "broken large", "region": "top-left"}
    assert good[0]["label"] == "no" and bad[0]["label"] == "yes"  # "is there any anomaly"
    assert good[2]["label"] == "yes" and bad[2]["label"] == "no"  # "is it free of defects"
    assert bad[0]["answers"][0].startswith("Yes. The bottle shows a broken large in the top-left")
    assert good[0]["reference_image"] == "bottle/train/good/000.png"
    assert bad[0]["reference_image"] == "bottle/train/good/001.png"
    assert good[0]["test_image"] == "bottle/test/good/000.png"
    assert len({r["group"] for r in recs}) == 2 and {r["level"] for r in recs} == {"standard"}


def test_mvtec_question_labels():
    # identification, defect "crack" at "top", other type "scratch": asks about crack (yes),
    # scratch (no), a defect in the top part (yes), anomalous (yes), identical (no)
    qs = mvtec_questions("bottle", "identification", "crack", "top", "scratch")
    assert [a for _, a in qs] == [True, False, True, True, False]
    assert qs[2][0] == "Is there a defect in the top part of the bottle?"
    normal = mvtec_questions("bottle", "diagnosis", None, None, "scratch")
    assert [a for _, a in normal] == [False, False, False, True, False]
