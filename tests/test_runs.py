"""sage.runs: run directories (keep aside, never delete; every artefact of an earlier run
refuses a new run; one run at a time; --resume checks the stored arguments), which checkpoint
a resume picks, a full disk during a save, pruning cut short. Saving and resuming end to end
run in tests/test_scripts.py.  Run: python -m pytest -q tests/test_runs.py"""

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import sage.runs as runs
from sage.runs import (LOCK, check_run_dir, keep_aside, latest_checkpoint, new_run_dir,
                       save_checkpoint, start_run)


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


def _tree(d):
    """{relative path: sha256} of every file under d (what a refused run must not change)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else None


@pytest.mark.parametrize("artefact", ["step_000007", "export", "config.json", "metrics.jsonl",
                                      ".tmp_step_000003", ".export.tmp-abc"])
def test_every_artefact_of_a_run_refuses_a_new_run(tmp_path, artefact):
    check_run_dir(tmp_path / "new", resume=False)  # nothing there: fine
    if "." in artefact.lstrip("."):
        (tmp_path / artefact).write_text("{}")
    else:
        (tmp_path / artefact).mkdir()
        (tmp_path / artefact / "f").write_text("x")
    before = _tree(tmp_path)
    with pytest.raises(FileExistsError, match=rf"earlier run \({artefact}\); pass --resume"):
        check_run_dir(tmp_path, resume=False)
    with pytest.raises(FileExistsError, match="another --out"):
        start_run(tmp_path, {"resume": False}, rank=0, config={"x": 1})
    assert _tree(tmp_path) == before  # nothing changed, no lock left
    check_run_dir(tmp_path, resume=True)


def test_start_run_writes_config_and_locks_until_exit(tmp_path):
    run = tmp_path / "run"
    start_run(run, {"resume": False, "lr": 1.0}, rank=0, config={"dim": 8})
    assert json.loads((run / "config.json").read_text()) == {"model": {"dim": 8},
                                                             "args": {"resume": False, "lr": 1.0}}
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    runs.release_lock(run)
    assert not (run / LOCK).exists()
    # a refused resume changes nothing and leaves no lock
    with pytest.raises(ValueError, match="differ"):
        start_run(run, {"resume": True, "lr": 2.0}, rank=0)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_a_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    live = {"pid": os.getppid(), "host": socket.gethostname(), "time": 0}
    (run / LOCK).write_text(json.dumps(live))
    with pytest.raises(FileExistsError, match=rf"in use by another run \(pid {os.getppid()} on "):
        check_run_dir(run, resume=False)
    with pytest.raises(FileExistsError, match=f"remove {run / LOCK}"):
        start_run(run, {"resume": False}, rank=0)
    assert json.loads((run / LOCK).read_text()) == live  # the owner's lock is untouched
    other = {"pid": 1, "host": "another-host", "time": 0}  # cannot be checked from here
    (run / LOCK).write_text(json.dumps(other))
    with pytest.raises(FileExistsError, match="another-host"):
        check_run_dir(run, resume=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    check_run_dir(run, resume=False)  # a stale lock is not a run
    start_run(run, {"resume": False}, rank=0)
    assert f"stale lock of pid {dead.pid}" in capsys.readouterr().out
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    runs.release_lock(run)


def test_resume_compares_the_stored_arguments(tmp_path, capsys):
    stored = {"lr": 0.001, "global_batch": 32, "facts": "fe", "max_steps": 10, "log_every": 10,
              "device": "cpu", "resume": False, "save_every": 0}
    _ckpt(tmp_path, 4, {"step": 4, "complete": True, "args": stored})
    same = {**stored, "resume": True, "log_every": 1, "device": "cuda", "save_every": 2,
            "max_steps": 20, "resume_force": False, "skip_bad": False}  # only harmless changes
    check_run_dir(tmp_path, resume=True, args=same)
    changed = {**same, "lr": 0.002, "facts": "none", "max_steps": 5}
    with pytest.raises(ValueError) as e:
        check_run_dir(tmp_path, resume=True, args=changed)
    msg = str(e.value)
    for diff in ("--lr 0.001 -> 0.002", "--facts 'fe' -> 'none'", "--max_steps 10 -> 5",
                 "--resume_force", "step_000004/meta.json"):
        assert diff in msg
    assert "log_every" not in msg and "device" not in msg
    check_run_dir(tmp_path, resume=True, args=changed, force=True)
    assert "--resume_force: resuming" in capsys.readouterr().out
    # no checkpoint yet: the arguments in config.json
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model": {}, "args": stored}))
    with pytest.raises(ValueError, match="--global_batch 32 -> 64"):
        check_run_dir(other, resume=True, args={**stored, "global_batch": 64})


def test_start_run_cleans_what_an_interrupted_save_or_export_left(tmp_path):
    _ckpt(tmp_path, 2, {"step": 2, "complete": True})
    for partial in (".tmp_step_000004", ".export.tmp-x1"):
        (tmp_path / partial).mkdir()
        (tmp_path / partial / "shard").write_bytes(b"0" * 10)
    (tmp_path / ".export.old-99").mkdir()  # moved aside, the new export not yet in place
    (tmp_path / ".export.old-99" / "config.json").write_text("{}")
    start_run(tmp_path, {"resume": True}, rank=0)
    runs.release_lock(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "step_000002"]
    assert (tmp_path / "export" / "config.json").exists()


def _tiny():
    model = torch.nn.Linear(2, 2)
    return model, torch.optim.AdamW(model.parameters())


def test_disk_full_during_a_save_is_named_and_cleaned(tmp_path, monkeypatch):
    model, opt = _tiny()
    (tmp_path / ".tmp_step_000001").mkdir()  # an earlier attempt's leftover

    def full(state, checkpoint_id):
        os.makedirs(checkpoint_id, exist_ok=True)
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:
            f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.dcp, "save", full)
    with pytest.raises(OSError, match=r"no space left on device while saving the checkpoint "
                                      r".*step_000002 \(the partial \.tmp_step_000002 "
                                      r"was removed"):
        save_checkpoint(tmp_path, 2, model, opt, {}, rank=0)
    assert list(tmp_path.iterdir()) == []  # no partial directory left to fill the disk


def test_pruning_removes_the_completion_mark_first(tmp_path, monkeypatch):
    model, opt = _tiny()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, opt, {}, rank=0, keep_last=5)
    cut = []

    def killed(path, *a, **k):  # the prune is cut short before any file is deleted
        cut.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, model, opt, {}, rank=0, keep_last=2)
    assert [p.name for p in cut] == ["step_000001"]
    assert latest_checkpoint(tmp_path).name == "step_000003"
    assert not (tmp_path / "step_000001" / "meta.json").exists()  # never resumed from
    monkeypatch.undo()
    save_checkpoint(tmp_path, 4, model, opt, {}, rank=0, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000004"]


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
