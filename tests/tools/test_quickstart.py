"""sage.tools.quickstart's check of an existing SynthAD directory: one made for another SFE
training size is an error naming the manifest, never regenerated over.
Run: python -m pytest -q tests/tools/test_quickstart.py"""

import json

import pytest

from sage.tools.quickstart import check_data


def _manifest(path, sfe_records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"counts": {"sfe_train": sfe_records}}))


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
