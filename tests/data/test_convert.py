"""Importers (LLaVA, MANTA/MPDD-QA, MMAD, MVTec AD folder) on small hand-made fixtures; the output
validates with load_jsonl. MVTec: graded evidence-first answers, normal_label, masks of any size
and mode, the seeded held-out split. Run: python -m pytest -q tests/data/test_convert.py"""

import json

import pytest
from PIL import Image

from sage.data.convert import (convert, holdout_split, mask_region, mvtec_answers,
                               mvtec_questions, neighbours, rank_options, stated_decision)
from sage.data.oracle import extract_decision, oracle_scores
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
    # normal_label: the answer for a normal part, whatever this part is
    assert [r["normal_label"] for r in good] == [r["label"] for r in good]
    assert [r["normal_label"] for r in bad] == ["no", "yes", "yes", "yes", "no"]
    # evidence first, the decision last (SynthAD's style)
    assert bad[0]["answers"][0] == (
        "The inspection shows that there is a broken large defect at the top-left of the bottle; "
        "the reference has no such mark, so the part fails the inspection. So the answer is Yes.")
    assert good[0]["reference_image"] == "bottle/train/good/000.png"
    assert bad[0]["reference_image"] == "bottle/train/good/001.png"
    assert good[0]["test_image"] == "bottle/test/good/000.png"
    assert len({r["group"] for r in recs}) == 2 and {r["level"] for r in recs} == {"standard"}
    assert not (root / "qa_train.jsonl").exists()  # no --holdout, no split


def test_mvtec_question_labels():
    # identification, defect "crack" at "top", other types "scratch" and "hole": asks about
    # crack (yes), scratch (no), a defect in the top part (yes), anomalous (yes), identical (no)
    qs = mvtec_questions("bottle", "identification", "crack", "top", ("scratch", "hole"), "left")
    assert [a for _, a, _ in qs] == [True, False, True, True, False]
    assert [n for _, _, n in qs] == [False, False, False, False, True]
    assert qs[0][0] == "Is there a crack defect on the bottle?"
    assert qs[2][0] == "Is there a defect in the top part of the bottle?"
    # a normal part: two different wrong types and the region `where`; no duplicate question
    normal = mvtec_questions("bottle", "identification", None, None, ("oil", "hole"), "left")
    assert [q for q, _, _ in normal][:3] == [
        "Is there an oil defect on the bottle?", "Is there a hole defect on the bottle?",
        "Is there a defect in the left part of the bottle?"]
    assert all(a == n for _, a, n in normal)
    normal = mvtec_questions("bottle", "diagnosis", None, None, ("scratch", "hole"), "top")
    assert [a for _, a, _ in normal] == [False, False, False, True, False]
    # region unknown (no mask) or a category without masks: no region is asked about
    for qs in (mvtec_questions("bottle", "identification", "crack", None, ("oil", "hole"), "top"),
               mvtec_questions("bottle", "identification", None, None, ("oil", "hole"), None)):
        assert qs[2][0] == "Is there a defect anywhere on the bottle?"


@pytest.mark.parametrize("defect, region, scores", [
    ("crack", "top", [5.0, 4.33, 3.67, 1.33]),           # a type the oracle knows
    ("broken large", "top-left", [4.33, 3.67, 3.67, 1.33]),  # a type it does not know
    ("hole", None, [4.0, 3.33, 2.67, 1.33]),             # no mask: no region named
    (None, None, [5.0, 4.0, 3.33, 1.33]),                # a normal part
])
def test_mvtec_answers_graded_evidence_first(defect, region, scores):
    """SynthAD's graded scheme: A1 right; A2 right type, neighbouring region; A3 wrong type,
    right region; A4 wrong decision. Each states the evidence, then the decision, which
    sage.data.oracle.extract_decision reads; the oracle judge ranks them."""
    truth = {"anomalous": defect is not None, "defect": defect, "region": region}
    for label in (True, False):
        answers = mvtec_answers(label, "bottle", defect, region, k=3)
        yes, no = ("yes", "no") if label else ("no", "yes")
        assert [extract_decision(a) for a in answers] == [yes, yes, yes, no]
        for a in answers:
            evidence, _, decision = a.rpartition(" So the answer is ")
            assert decision in ("Yes.", "No.") and extract_decision(evidence) is None, a
        got = [round(sum(oracle_scores(a, truth, yes, "q")) / 3, 2) for a in answers]
        assert got == scores, answers
    if region:
        a2 = mvtec_answers(True, "bottle", defect, region, k=3)[1]
        assert any(f"at the {n} of" in a2 for n in neighbours(region))
    # the wrong type never names (or is named in) the true one
    assert "scratch" not in mvtec_answers(True, "screw", "scratch head", "top", k=0)[2]


def mvtec_tree(root, cats):
    """cats: {name: {defect or "good": n images}}; masks for every defect image."""
    for cat, counts in cats.items():
        for k in range(2):
            png(root / cat / "train" / "good" / f"{k:03d}.png", (200, 200, 200))
        for d, n in counts.items():
            for i in range(n):
                png(root / cat / "test" / d / f"{i:03d}.png", (10 * i, 0, 0))
                if d != "good":
                    m = Image.new("L", (16, 16), 0)
                    m.paste(255, (10, 10, 16, 16))  # bottom-right
                    (root / cat / "ground_truth" / d).mkdir(parents=True, exist_ok=True)
                    m.save(root / cat / "ground_truth" / d / f"{i:03d}_mask.png")


def test_holdout_split_stratified_by_category_and_defect(tmp_path, capsys):
    root = tmp_path / "mvtec"
    mvtec_tree(root, {"bottle": {"good": 4, "crack": 3, "oil": 2, "cut": 1},
                      "cable": {"good": 2, "bent_wire": 5}})
    out = tmp_path / "qa.jsonl"
    main(["mvtec", str(root), str(out), "--holdout", "0.5", "--seed", "0"])
    printed = capsys.readouterr().out
    assert "wrote 85 records to" in printed and "qa_train.jsonl" in printed
    every = load_jsonl(out)
    train = load_jsonl(tmp_path / "qa_train.jsonl")
    test = load_jsonl(tmp_path / "qa_test.jsonl")
    # whole groups, disjoint, every record once, file order kept
    g_train, g_test = {r["group"] for r in train}, {r["group"] for r in test}
    assert not g_train & g_test and len(train) + len(test) == len(every) == 85
    assert sorted(r["id"] for r in train + test) == sorted(r["id"] for r in every)
    assert [r["id"] for r in every if r["group"] in g_test] == [r["id"] for r in test]
    # per stratum: half of n (rounded half up), at least 1 on each side; one image: train
    held = {}
    for g in g_test:
        cat, defect = g.split("-")[1:3]
        held[cat, defect] = held.get((cat, defect), 0) + 1
    assert held == {("bottle", "good"): 2, ("bottle", "crack"): 2, ("bottle", "oil"): 1,
                    ("cable", "good"): 1, ("cable", "bent_wire"): 3}
    # deterministic by seed; another seed draws other images
    again, other = tmp_path / "again.jsonl", tmp_path / "other.jsonl"
    convert("mvtec", root, again, holdout=0.5, seed=0)
    convert("mvtec", root, other, holdout=0.5, seed=1)
    assert ({r["group"] for r in load_jsonl(tmp_path / "again_test.jsonl")} == g_test
            != {r["group"] for r in load_jsonl(tmp_path / "other_test.jsonl")})


def test_holdout_split_unit():
    recs = [{"id": f"{g}-q{j}", "group": g, "category": c,
             "truth": {"defect": d}} for g, c, d in [("a", "x", None), ("b", "x", None),
                                                     ("c", "x", "dent"), ("d", "y", None)]
            for j in range(2)]
    train, test = holdout_split(recs, 0.5, seed=3)
    assert {r["group"] for r in test} in ({"a"}, {"b"})  # x/good: 1 of 2; x/dent, y/good: 1
    assert len(train) + len(test) == len(recs)
    # adding a stratum moves no other group (seeded by stratum)
    more = recs + [{"id": f"e-q{j}", "group": "e", "category": "z", "truth": {"defect": None}}
                   for j in range(2)]
    assert holdout_split(more, 0.5, seed=3)[1] == test
    # a high holdout still leaves each stratum of >= 2 one training image
    assert {r["group"] for r in holdout_split(recs, 0.99, seed=0)[0]} >= {"c", "d"}


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "-0.2", "nan"])
def test_holdout_must_be_a_fraction(tmp_path, capsys, bad):
    root = tmp_path / "mvtec"
    mvtec_tree(root, {"bottle": {"good": 2}})
    with pytest.raises(SystemExit) as e:
        main(["mvtec", str(root), str(tmp_path / "qa.jsonl"), "--holdout", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--holdout {float(bad)!r}: expected a fraction strictly between 0 and 1" in err
    assert not (tmp_path / "qa.jsonl").exists()
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        convert("mvtec", root, tmp_path / "qa.jsonl", holdout=float(bad))
    for value in (True, "0.5", None):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            holdout_split([], value)


def test_mask_region_any_size_and_mode(tmp_path):
    def mask(mode, size, box, value):
        m = Image.new(mode, size, 0)
        m.paste(value, box)
        path = tmp_path / f"m_{mode.replace(';', '')}_{size[0]}.png"
        m.save(path)
        return path

    assert mask_region(mask("L", (30, 20), (0, 0, 8, 5), 255)) == "top-left"
    assert mask_region(mask("1", (9, 31), (6, 22, 9, 31), 1)) == "bottom-right"
    assert mask_region(mask("L", (40, 40), (15, 15, 25, 25), 1)) == "center"  # a 0/1 mask
    assert mask_region(mask("I;16", (33, 27), (22, 0, 33, 9), 65535)) == "top-right"
    assert mask_region(mask("RGB", (21, 21), (0, 8, 6, 13), (255, 0, 0))) == "left"
    assert mask_region(mask("RGBA", (12, 12), (4, 8, 8, 12), (255, 255, 255, 255))) == "bottom"
    assert mask_region(mask("L", (13, 17), (0, 0, 0, 0), 0)) is None  # empty
    broken = tmp_path / "broken_mask.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(ValueError, match=r"broken_mask.png: cannot decode the defect mask"):
        mask_region(broken)


def test_mvtec_masks_missing_other_size_other_name(tmp_path):
    root = tmp_path / "mvtec"
    mvtec_tree(root, {"tile": {"good": 1, "crack": 3}})
    gt = root / "tile" / "ground_truth" / "crack"
    (gt / "001_mask.png").unlink()                     # missing: region unknown
    (gt / "002_mask.png").rename(gt / "002.png")       # VisA-style name <stem>.png
    big = Image.new("L", (300, 200), 0)                # another size than the 16 x 16 image
    big.paste(255, (0, 150, 60, 200))
    big.save(gt / "000_mask.png")
    convert("mvtec", root, tmp_path / "qa.jsonl")
    truth = {r["group"].rsplit("-", 1)[1]: r["truth"]["region"]
             for r in load_jsonl(tmp_path / "qa.jsonl") if r["truth"]["anomalous"]}
    assert truth == {"000": "bottom-left", "001": None, "002": "bottom-right"}
    (gt / "002.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"002.png: cannot decode the defect mask"):
        convert("mvtec", root, tmp_path / "qa.jsonl")
