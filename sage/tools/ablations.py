"""Table 3 and Fig. 7 of the paper at tiny scale, on SynthAD (longer than the quickstart).

    python -m sage.tools.ablations                 # Table 3 rows + the N / K sweep, seed 0
    python -m sage.tools.ablations --seeds 0 1 2   # several seeds (each row: mean over seeds)
    python -m sage.tools.ablations --fast          # 2 steps each (smoke)

Table 3 rows (zero-shot, test_unseen):
  Baseline       the base VLM (weights/sage-tiny-base), no training on anomaly QA
  +Fact[Hard]    SFE with the fact sentences as plain text in the prompt (--facts hard)
  +Fact[FE]      SFE with fusion attention (--facts fe)
  +DPO           plain SFT without facts (--facts none), then plain DPO (--loss dpo)
  SFE+DPO        Fact[FE], then plain DPO
  Full           Fact[FE], then E-DPO (SAGE)
Fig. 7 sweep (one-shot, test_unseen): SFE with N fact sentences in {1, 2, 4} (K = default)
and K selected patches in {2, 8, 32} (N = default).
Every row is the documented command of its stage; results are written to
OUT/table3.md and OUT/sweep.md and printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sage.config import SageConfig
from sage.runs import new_run_dir
from sage.tools.args import Parser, at_least
from sage.tools.errors import run_main
from sage.tools.quickstart import EDPO_GLOBAL_BATCH, run


def evaluate(models: dict[str, str], data: Path, out: Path, setting: str, log: Path,
             limit: list[str]) -> dict:
    run([sys.executable, "evaluate.py", "--model", *models.values(), "--names", *models,
         "--data", str(data), "--split", "test_unseen", "--setting", setting, "--out",
         str(out), "--no-sbert", *limit], log)
    return json.loads((out / "metrics.json").read_text())["results"]


def row(m: dict) -> list[str]:
    mle = m["mle"] or {}
    return [f"{m['accuracy']['average']:.1f}", f"{m['acc_g']['overall']:.1f}",
            f"{mle.get('score', float('nan')):.2f}"]


def mean_rows(rows: list[list[str]]) -> list[str]:
    cols = list(zip(*rows))
    return [f"{sum(float(x) for x in c) / len(c):.2f}" for c in cols]


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--data", default="data/synthad", help="SynthAD directory (quickstart's)")
    p.add_argument("--base", default="weights/sage-tiny-base", help="pretrained base VLM")
    p.add_argument("--out", default="runs/ablations", help="run directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--sfe_steps", type=at_least(1), default=200, help="Stage 1 optimizer steps")
    p.add_argument("--edpo_steps", type=at_least(1), default=30, help="Stage 2 optimizer steps")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the N / K sweep (Fig. 7)")
    p.add_argument("--fast", action="store_true", help="2 steps each, 20 test records")
    args = p.parse_args(argv)
    if args.fast:
        args.sfe_steps = args.edpo_steps = 2
    py, data, out = sys.executable, Path(args.data), Path(args.out)
    if not (data / "manifest.json").exists():
        raise FileNotFoundError(f"{data}: no SynthAD here (no manifest.json); run "
                                f"`python -m sage.tools.quickstart` first")
    new_run_dir(out)  # an earlier run is renamed aside, never overwritten
    log = out / "ablations.log"
    limit = ["--limit", "20"] if args.fast else []

    def sfe(name, seed, *flags):
        d = out / f"s{seed}" / name
        run([py, "train_sfe.py", "--init", args.base, "--data", str(data), "--out", str(d),
             "--max_steps", str(args.sfe_steps), "--seed", str(seed), *flags], log)
        return str(d / "export")

    def dpo(name, seed, init, loss):
        d = out / f"s{seed}" / name
        run([py, "train_edpo.py", "--init", init, "--data", str(data), "--out", str(d),
             "--max_steps", str(args.edpo_steps), "--global_batch", str(EDPO_GLOBAL_BATCH),
             "--seed", str(seed),
             "--loss", loss], log)
        return str(d / "export")

    table, fe_of = {}, {}
    for seed in args.seeds:
        hard, fe, sft = (sfe("hard", seed, "--facts", "hard"), sfe("fe", seed),
                         sfe("sft", seed, "--facts", "none"))
        fe_of[seed] = fe
        models = {"Baseline": args.base, "+Fact[Hard]": hard, "+Fact[FE]": fe,
                  "+DPO": dpo("sft_dpo", seed, sft, "dpo"),
                  "SFE+DPO": dpo("fe_dpo", seed, fe, "dpo"),
                  "Full (SFE+E-DPO)": dpo("fe_edpo", seed, fe, "edpo")}
        res = evaluate(models, data, out / f"s{seed}" / "eval", "zero-shot", log, limit)
        for name in models:
            table.setdefault(name, []).append(row(res[name]["zero-shot"]))
    lines = [f"Table 3 at tiny scale: SynthAD test_unseen, zero-shot, seeds {args.seeds} "
             f"(mean), SFE {args.sfe_steps} steps, E-DPO/DPO {args.edpo_steps} steps", "",
             "| Row | Accuracy (avg of levels) | Acc-G | MLE score |", "|---|---|---|---|"]
    lines += [f"| {k} | " + " | ".join(mean_rows(v)) + " |" for k, v in table.items()]
    (out / "table3.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    if args.sweep:
        seed = args.seeds[0]
        cfg = SageConfig.from_pretrained(args.base)  # the default N and K: the +Fact[FE] run
        models = {f"N={n}": fe_of[seed] if n == cfg.n_facts else
                  sfe(f"n{n}", seed, "--n_facts", str(n)) for n in (1, 2, 4)}
        models.update({f"K={k}": fe_of[seed] if k == cfg.top_k else
                       sfe(f"k{k}", seed, "--top_k", str(k)) for k in (2, 8, 32)})
        res = evaluate(models, data, out / f"s{seed}" / "eval_sweep", "one-shot", log, limit)
        lines = [f"Fig. 7 at tiny scale: SFE one-shot on test_unseen, seed {seed}", "",
                 "| Setting | Accuracy (avg of levels) | Acc-G | MLE score |",
                 "|---|---|---|---|"]
        lines += [f"| {k} | " + " | ".join(row(res[k]["one-shot"])) + " |" for k in models]
        (out / "sweep.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
