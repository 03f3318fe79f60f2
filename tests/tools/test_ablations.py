"""sage.tools.ablations: the per-seed figures and the mean ± spread tables (pure functions; the
runs themselves are the documented scripts, exercised by tests/test_scripts.py).
Run: python -m pytest -q tests/tools/test_ablations.py"""

import math
from pathlib import Path

import pytest

from sage.tools.ablations import COLUMNS, cells, mean_std, table


def _metrics(acc_zs, acc_os, mle=None):
    def one(acc):
        return {"accuracy": {"average": acc}, "acc_g": {"overall": acc / 2},
                "mle": None if mle is None else {"score": mle}}
    return {"zero-shot": one(acc_zs), "one-shot": one(acc_os)}


def test_cells_follow_the_columns_and_the_gap_is_one_minus_zero_shot():
    c = cells(_metrics(50.0, 57.5, mle=3.2))
    assert len(c) == len(COLUMNS)
    assert c[:4] == [50.0, 57.5, 25.0, 28.75] and c[4:6] == [3.2, 3.2] and c[6] == 7.5
    assert math.isnan(cells(_metrics(50.0, 50.0))[4])  # no MLE scores: nan, not 0


def test_mean_and_sample_std_over_seeds():
    assert mean_std([56.0]) == "56.00"
    assert mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"  # sample std (n - 1): sqrt(2 / 2)
    assert mean_std([4.0, 4.0]) == "4.00 ± 0.00"


def test_table_has_one_row_per_model_with_the_seeds_run_so_far():
    per_seed = {0: {"A": cells(_metrics(50.0, 60.0)), "B": cells(_metrics(40.0, 40.0))},
                1: {"A": cells(_metrics(52.0, 58.0)), "B": cells(_metrics(42.0, 44.0))}}
    text = table("T", per_seed)
    lines = text.splitlines()
    assert lines[0] == "T; seeds [0, 1], mean ± sample std over seeds"
    assert lines[4].startswith("| A | 51.00 ± 1.41 | 59.00 ± 1.41 |")
    assert lines[5].endswith("| 1.00 ± 1.41 |")  # B's one- minus zero-shot gaps 0 and 2
    assert len(lines) == 6


def test_missing_data_fails_before_the_run_directory_exists(tmp_path):
    from sage.tools.ablations import main
    with pytest.raises(FileNotFoundError, match="test_unseen.jsonl: not found"):
        main(["--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing created before the inputs are checked


def test_nothing_to_run_is_an_error_before_any_work(tmp_path, capsys):
    from sage.tools.ablations import main
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--no-table3",
              "--no-sweep"])
    assert e.value.code == 2 and "runs nothing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_table3_runs_the_sweep_alone(tmp_path, monkeypatch):
    """--no-table3: only the sweep's SFE runs (N = 4 / K = 8 is the +Fact[FE] run, trained once)
    and one evaluation of its six settings; no DPO, no test_seen evaluation."""
    import json

    import sage.tools.ablations as ab
    data = tmp_path / "data"
    data.mkdir()
    for split in ("test_unseen", "test_seen"):
        (data / f"{split}.jsonl").write_text("")
    calls = []

    def fake_run(cmd, log):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        if cmd[1] == "evaluate.py":
            names = cmd[cmd.index("--names") + 1:cmd.index("--data")]
            out.mkdir(parents=True)
            res = {n: _metrics(50.0 + i, 60.0) for i, n in enumerate(names)}
            (out / "metrics.json").write_text(json.dumps({"results": res}))
        else:
            (out / "export").mkdir(parents=True)
            (out / "export" / "config.json").write_text("{}")

    monkeypatch.setattr(ab, "run", fake_run)
    ab.main(["--data", str(data), "--out", str(tmp_path / "out"), "--no-table3", "--seeds", "3"])
    scripts = [c[1] for c in calls]
    assert scripts == ["train_sfe.py"] * 5 + ["evaluate.py"]
    trained = [Path(c[c.index("--out") + 1]).name for c in calls[:5]]
    assert trained == ["n1", "n2", "fe", "k2", "k32"] and all("3" in c for c in calls[:5])
    assert all("--vision_cache_gb" in c for c in calls[:5])  # the quickstart's SFE options
    assert (tmp_path / "out" / "sweep.md").read_text().count("| N=") == 3
    assert not (tmp_path / "out" / "table3.md").exists()
