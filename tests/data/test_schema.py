"""JSONL record validation (docs/design.md §6): each bad input names file, line and field; skip_bad
counts. Run: python -m pytest -q tests/data/test_schema.py"""

import json
import re
import time

import pytest
from PIL import Image

from sage.data.schema import CONTROL_TOKENS, load_jsonl, write_jsonl


def good_record(i=0, **over):
    rec = {"id": f"r{i}", "test_image": "img/t.png", "reference_image": "img/r.png",
           "category": "washer", "source": "test", "level": "standard", "group": "g0",
           "question": "Is there a scratch?", "answers": ["Yes. a", "Yes.", "No.", "No. b"],
           "label": "yes", "facts": ["Washers are round."],
           "mle": [[5, 5, 5], [4, 4, 4], [2, 2, 2], [1, 1, 1]]}
    rec.update(over)
    return rec


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "img" / "t.png")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "img" / "r.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


def write_lines(root, lines):
    path = root / "data.jsonl"
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_good_file_loads(root):
    path = write_lines(root, [good_record(0), good_record(1, reference_image=None)])
    recs = load_jsonl(path, check_images=True)
    assert [r["id"] for r in recs] == ["r0", "r1"]
    assert recs[1]["reference_image"] is None


def test_normal_label_is_optional(root):
    # the answer a question has for a normal part (evaluate.py's "Always normal" row)
    path = write_lines(root, [good_record(0, normal_label="no"), good_record(1),
                              good_record(2, normal_label=None)])
    assert [r.get("normal_label") for r in load_jsonl(path)] == ["no", None, None]


def _without(field):
    rec = good_record(1)
    del rec[field]
    return rec


@pytest.mark.parametrize("bad, field, words", [
    ('{"id": "r1", "question": ', None, "malformed JSON"),
    (_without("question"), "question", "missing"),
    (_without("test_image"), "test_image", "missing"),
    (good_record(1, answers=["Yes.", "No."]), "answers", "expected 4"),
    (good_record(1, level="expert"), "level", "unknown level"),
    (good_record(1, label="maybe"), "label", "'yes' or 'no'"),
    (good_record(1, answers=["a", "b", "c", 7]), "answers[3]", "non-empty string"),
    (good_record(1, facts="one sentence"), "facts", "list"),
    (good_record(1, mle=[[5, 5, 5]] * 3), "mle", "4 rows"),
    (good_record(1, mle=[[5, 5, 6]] * 4), "mle[0]", "1..5"),
    (good_record(1, test_image="../outside.png"), "test_image", "escapes the data root"),
    (good_record(1, reference_image="img/../../x.png"), "reference_image", "escapes"),
    (good_record(1, test_image="/abs/t.png"), "test_image", "absolute"),
    (good_record(0), "id", "duplicate id"),
    (good_record(1, normal_label="normal"), "normal_label", "'yes' or 'no' (the answer when"),
    (good_record(1, normal_label=True), "normal_label", "got True"),
])
def test_bad_line_names_file_line_field(root, bad, field, words):
    path = write_lines(root, [good_record(0), bad])
    with pytest.raises(ValueError) as e:
        load_jsonl(path)
    msg = str(e.value)
    assert f"{path}:2" in msg and words in msg, msg
    if field is not None:
        assert f"field '{field}'" in msg, msg


@pytest.mark.parametrize("image, words", [("img/missing.png", "not found"),
                                          ("img/broken.png", "cannot be decoded")])
def test_check_images(root, image, words):
    path = write_lines(root, [good_record(0), good_record(1, reference_image=image)])
    load_jsonl(path)  # paths alone are fine
    with pytest.raises(ValueError) as e:
        load_jsonl(path, check_images=True)
    msg = str(e.value)
    assert f"{path}:2" in msg and "field 'reference_image'" in msg and image in msg, msg
    assert words in msg


def test_general_kind(root):
    gen = good_record(0, level="general", answers=["A caption."])
    del gen["label"], gen["group"], gen["mle"]
    path = write_lines(root, [gen])
    assert len(load_jsonl(path, kind="general")) == 1
    with pytest.raises(ValueError, match="field 'answers': expected 4"):
        load_jsonl(path, kind="qa")
    path = write_lines(root, [good_record(0)])
    with pytest.raises(ValueError, match=r"data.jsonl:1: field 'level': expected 'general'"):
        load_jsonl(path, kind="general")


def test_skip_bad_reports_count(root, capsys):
    lines = [good_record(0), "{not json", good_record(2, level="x"), good_record(3),
             good_record(4, answers=[])]
    path = write_lines(root, lines)
    reports = []
    recs = load_jsonl(path, skip_bad=True, report=reports.append)
    assert [r["id"] for r in recs] == ["r0", "r3"]
    (rep,) = reports
    assert rep.n_skipped == 3 and len(rep.errors) == 3
    assert f"{path}:2" in rep.errors[0] and "field 'level'" in rep.errors[1]
    # default report: one warning line on stderr with the count
    load_jsonl(path, skip_bad=True)
    assert "skipped 3 bad line(s)" in capsys.readouterr().err


def test_write_jsonl_round_trip(root):
    path = root / "out" / "w.jsonl"
    write_jsonl([good_record(0), good_record(1)], path)
    assert not (root / "out" / "w.jsonl.tmp").exists()
    assert load_jsonl(path, root=root)[1] == good_record(1)


# ----------------------------------------------------------------------------- issue 19

def test_invalid_utf8_names_file_and_line(root):
    path = root / "data.jsonl"
    bad = json.dumps(good_record(1, question="Is there a scratch? XX")).encode()
    bad = bad.replace(b"XX", b"\xff\xfe")
    path.write_bytes(json.dumps(good_record(0)).encode() + b"\n" + bad + b"\n"
                     + json.dumps(good_record(2)).encode() + b"\n")
    with pytest.raises(ValueError) as e:
        load_jsonl(path)
    assert f"{path}:2: invalid UTF-8" in str(e.value), e.value
    reports = []
    recs = load_jsonl(path, skip_bad=True, report=reports.append)
    assert [r["id"] for r in recs] == ["r0", "r2"] and reports[0].n_skipped == 1
    # a UTF-8 byte order mark and non-ASCII text are fine
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good_record(0, question="Ist da ein Kratzer "
                                                                         "– ja?")).encode())
    assert load_jsonl(path)[0]["question"].endswith("– ja?")


@pytest.mark.parametrize("token", CONTROL_TOKENS)
def test_control_strings_are_refused(root, token):
    path = write_lines(root, [good_record(0), good_record(1, question=f"Is there a {token}?")])
    with pytest.raises(ValueError) as e:
        load_jsonl(path)
    assert f"{path}:2: field 'question'" in str(e.value) and token in str(e.value), e.value


@pytest.mark.parametrize("over, field", [
    ({"answers": ["Yes.", "Yes. a<|im_end|><|im_start|>assistant", "No.", "No. b"]},
     "answers[1]"),
    ({"facts": ["Washers are round.", "See <IMG_CONTEXT> here."]}, "facts[1]"),
    ({"truth": {"anomalous": True, "defect": "<box>scratch</box>"}}, "truth.defect"),
    ({"category": "washer<|endoftext|>"}, "category"),
])
def test_control_strings_in_any_text_field(root, over, field):
    path = write_lines(root, [good_record(0, **over)])
    with pytest.raises(ValueError, match=rf"data.jsonl:1: field '{re.escape(field)}': contains"):
        load_jsonl(path)
    # near misses are ordinary text
    path = write_lines(root, [good_record(0, question="Is the <IMG> tag or <im_end> shown?")])
    assert load_jsonl(path)


@pytest.mark.parametrize("image, words", [
    ("img/empty.png", "is empty (0 bytes)"), ("img/cut.png", "cannot be decoded"),
    ("img/cut.jpg", "truncated"), ("img", "is not a file"), ("img/text.png", "cannot be decoded"),
])
def test_check_images_finds_bad_files(root, image, words):
    (root / "img" / "empty.png").write_bytes(b"")
    data = (root / "img" / "t.png").read_bytes()
    (root / "img" / "cut.png").write_bytes(data[:len(data) // 2])
    Image.effect_noise((64, 64), 50).convert("RGB").save(root / "img" / "whole.jpg")
    data = (root / "img" / "whole.jpg").read_bytes()
    (root / "img" / "cut.jpg").write_bytes(data[:len(data) // 2])
    (root / "img" / "text.png").write_text("hello")
    good = good_record(0, reference_image="img/whole.jpg")
    path = write_lines(root, [good, good_record(1, test_image=image),
                              good_record(2, test_image=image), good_record(3)])
    assert len(load_jsonl(path)) == 4  # paths alone are fine
    with pytest.raises(ValueError) as e:
        load_jsonl(path, check_images=True)
    msg = str(e.value)
    assert f"{path}:2: field 'test_image'" in msg and words in msg, msg
    reports = []
    recs = load_jsonl(path, check_images=True, skip_bad=True, report=reports.append)
    assert [r["id"] for r in recs] == ["r0", "r3"] and reports[0].n_skipped == 2
    assert f"{path}:3: field 'test_image'" in reports[0].errors[1]  # shared image: each line


def test_check_images_is_fast(tmp_path):
    """2,000 records on 800 distinct 224-px PNGs (SynthAD's shape) load and check in < 2 s."""
    (tmp_path / "img").mkdir()
    Image.effect_noise((224, 224), 60).convert("RGB").save(tmp_path / "noise.png")
    data = (tmp_path / "noise.png").read_bytes()
    for i in range(800):
        (tmp_path / "img" / f"{i}.png").write_bytes(data)
    recs = [good_record(i, group=f"g{i // 5}", test_image=f"img/{i % 800}.png",
                        reference_image=f"img/{(i + 1) % 800}.png") for i in range(2000)]
    path = write_lines(tmp_path, recs)
    t = time.perf_counter()
    assert len(load_jsonl(path, check_images=True)) == 2000
    assert time.perf_counter() - t < 2.0


def test_empty_split_facts_and_strings(root):
    path = write_lines(root, [])
    with pytest.raises(ValueError, match=rf"no records in {re.escape(str(path))}"):
        load_jsonl(path)
    assert load_jsonl(path, allow_empty=True) == []
    path = write_lines(root, ["{bad", good_record(1, level="x")])
    with pytest.raises(ValueError, match=r"no records in .*all 2 bad; first: .*data.jsonl:1"):
        load_jsonl(path, skip_bad=True, report=lambda rep: None)
    for over, field in [({"facts": []}, "facts"), ({"facts": ["a", " "]}, "facts[1]"),
                        ({"question": "  "}, "question"), ({"group": ""}, "group"),
                        ({"answers": ["Yes.", "", "No.", "No."]}, "answers[1]")]:
        path = write_lines(root, [good_record(0), good_record(1, **over)])
        with pytest.raises(ValueError, match=rf"data.jsonl:2: field '{re.escape(field)}'"):
            load_jsonl(path)


def test_min_facts_is_checked_at_load_and_skip_bad_drops_short_records(root):
    path = write_lines(root, [good_record(0, facts=["a", "b"]), good_record(1, facts=["a"]),
                              good_record(2, facts=None)])
    assert len(load_jsonl(path, min_facts=0)) == 3
    with pytest.raises(ValueError, match=r"data.jsonl:2: field 'facts': 1 sentence\(s\), the "
                                         r"model needs 2: fill them"):
        load_jsonl(path, min_facts=2)
    reps = []
    assert [r["id"] for r in load_jsonl(path, min_facts=2, skip_bad=True,
                                        report=reps.append)] == ["r0"]
    assert reps[0].n_skipped == 2
    assert "data.jsonl:3: field 'facts': 0 sentence(s)" in reps[0].errors[1]


def test_a_group_keeps_one_level(root):
    path = write_lines(root, [good_record(0), good_record(1, level="diagnosis")])
    with pytest.raises(ValueError, match=r"data.jsonl:2: field 'level': group 'g0' is "
                                         r"'standard' on line 1"):
        load_jsonl(path)
