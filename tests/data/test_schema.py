"""JSONL record validation (DESIGN §6): each bad input names file, line and field; skip_bad
counts. Run: python -m pytest -q tests/data/test_schema.py"""

import json

import pytest
from PIL import Image

from sage.data.schema import load_jsonl, write_jsonl


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
