"""sage.tools.quickstart's check of an existing SynthAD directory: one made for another SFE
training size or share of shared marks is an error naming the manifest, never regenerated
over.
Run: python -m pytest -q tests/tools/test_quickstart.py"""

import json

import pytest

from sage.tools.quickstart import check_data


def _manifest(path, sfe_records, **kw):
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"counts": {"sfe_train": sfe_records}, **kw}))


def test_matching_directory_is_used(tmp_path):
    _manifest(tmp_path / "d", 4500)
    check_data(tmp_path / "d", 900)  # no error


@pytest.mark.parametrize("records", [1500, 5000])
def test_other_size_is_an_error_that_keeps_the_directory(tmp_path, records):
    _manifest(tmp_path / "d", records)
    with pytest.raises(SystemExit, match=rf"manifest.json: {records // 5} SFE training groups "
                                         "where the quickstart asks for 900"):
        check_data(tmp_path / "d", 900)
    assert (tmp_path / "d" / "manifest.json").exists()


def test_unreadable_manifest_is_named(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text("{not json")
    with pytest.raises(SystemExit, match="manifest.json: not a SynthAD manifest"):
        check_data(tmp_path / "d", 900)


def test_shared_marks_must_match_where_there_are_added_groups(tmp_path):
    _manifest(tmp_path / "d", 4500, scale=1.0, shared_marks=0.5)
    check_data(tmp_path / "d", 900, 0.5)  # no error
    with pytest.raises(SystemExit, match=r"manifest.json: 0.5 shared marks where the "
                                         r"quickstart asks for 0.0: .* --shared_marks to match"):
        check_data(tmp_path / "d", 900)
    _manifest(tmp_path / "e", 4500, scale=1.0)
    with pytest.raises(SystemExit, match="0.0 shared marks where the quickstart asks for 0.5"):
        check_data(tmp_path / "e", 900, 0.5)
    _manifest(tmp_path / "f", 1500, scale=1.0)
    check_data(tmp_path / "f", 300, 0.5)  # no added groups: nothing to mark, nothing drawn
