"""sage.runs: run directories (keep aside, never delete; refuse to overwrite an earlier run's
checkpoints) and which checkpoint a resume picks. Saving and resuming themselves run in
tests/test_scripts.py.  Run: python -m pytest -q tests/test_runs.py"""

import json

import pytest

from sage.runs import check_run_dir, keep_aside, latest_checkpoint, new_run_dir


def _ckpt(run_dir, step, meta):
    d = run_dir / f"step_{step:06d}"
    d.mkdir(parents=True)
    if meta is not None:
        (d / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return d


def test_latest_checkpoint_skips_incomplete_and_corrupt(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _ckpt(tmp_path, 2, {"step": 2, "complete": True})
    _ckpt(tmp_path, 3, '{"step": 3')  # half-written meta.json
    _ckpt(tmp_path, 4, None)  # no meta.json at all
    _ckpt(tmp_path, 5, {"step": 5})  # not marked complete
    (tmp_path / ".tmp_step_000006").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_000002"


def test_check_run_dir_refuses_an_earlier_runs_checkpoints(tmp_path):
    check_run_dir(tmp_path / "new", resume=False)  # nothing there: fine
    _ckpt(tmp_path, 7, {"step": 7, "complete": True})
    with pytest.raises(SystemExit, match=r"earlier run \(step_000007\); pass --resume"):
        check_run_dir(tmp_path, resume=False)
    check_run_dir(tmp_path, resume=True)


def test_keep_aside_renames_and_never_deletes(tmp_path):
    assert keep_aside(tmp_path / "none") is None
    runs = []
    for i in range(2):  # twice within one second: the second name gets a suffix
        (tmp_path / "qs").mkdir()
        (tmp_path / "qs" / "report.md").write_text(str(i))
        runs.append(keep_aside(tmp_path / "qs"))
    assert not (tmp_path / "qs").exists() and runs[0] != runs[1]
    assert [(r / "report.md").read_text() for r in runs] == ["0", "1"]
    assert all(r.name.startswith("qs.") for r in runs)
    new_run_dir(tmp_path / "qs")  # empty name: just created
    (tmp_path / "qs" / "report.md").write_text("2")
    new_run_dir(tmp_path / "qs")  # the earlier run goes aside, the new directory is empty
    assert not any((tmp_path / "qs").iterdir())
    assert sorted((r / "report.md").read_text() for r in tmp_path.glob("qs.*")) == ["0", "1", "2"]
