"""Table 3 and Fig. 7 of the paper at tiny scale, on SynthAD, over seeds (longer than quickstart).

    python -m sage.tools.ablations                 # Table 3 rows + the N / K sweep, seed 0
    python -m sage.tools.ablations --seeds 0 1 2   # three seeds: mean ± sample std per cell
    python -m sage.tools.ablations --fast          # 2 steps each (smoke)
    python -m sage.tools.ablations --no-table3 --seeds 0 1 2   # the N / K sweep alone

Table 3 rows (test_unseen, zero-shot and one-shot):
  Baseline             the base VLM (weights/sage-tiny-base), no training on anomaly QA
  SFT (no facts)       SFE's recipe without facts (--facts none)
  +Fact[Hard]          SFE with the fact sentences as plain text in the prompt (--facts hard)
  +Fact[FE]            SFE with fusion attention (--facts fe), the measured fusion defaults
  +Fact[FE] literal    the same with Eq. 2 / Eq. 9 as written (--fusion literal)
  +DPO                 SFT (no facts), then plain DPO (--loss dpo)
  SFE+DPO              +Fact[FE], then plain DPO
  Full                 +Fact[FE], then E-DPO (SAGE)
The two +Fact[FE] rows are also evaluated on test_seen (categories SFE trained on), which
separates "the comparison is not used" from "it does not transfer to unseen categories".
Fig. 7 sweep (test_unseen, both settings): SFE with N fact sentences in {1, 2, 4} (K =
default) and K selected patches in {2, 8, 32} (N = default), over --sweep_seeds.
Every row is the documented command of its stage. OUT/table3.md, OUT/seen.md and OUT/sweep.md
are rewritten after every seed (so a long run can be read, or stopped, part-way), the
per-seed figures are in OUT/results.json.
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
from sage.tools.quickstart import EDPO_GLOBAL_BATCH, SFE_MICRO_BATCH, VISION_CACHE, run


def evaluate(models: dict[str, str], data: Path, out: Path, split: str, log: Path,
             limit: list[str]) -> dict:
    run([sys.executable, "evaluate.py", "--model", *models.values(), "--names", *models,
         "--data", str(data), "--split", split, "--setting", "both", "--out", str(out),
         "--no-sbert", *VISION_CACHE, *limit], log)
    return json.loads((out / "metrics.json").read_text())["results"]


COLUMNS = [("Accuracy zero-shot", "zero-shot", "accuracy"), ("Accuracy one-shot", "one-shot",
           "accuracy"), ("Acc-G zero-shot", "zero-shot", "acc_g"), ("Acc-G one-shot", "one-shot",
           "acc_g"), ("MLE score zero-shot", "zero-shot", "mle"), ("MLE score one-shot",
           "one-shot", "mle"), ("One- minus zero-shot accuracy", None, "gap")]


def cells(res: dict) -> list[float]:
    """One model's figures in COLUMNS order, from evaluate.py's metrics.json entry."""
    def get(setting, what):
        m = res[setting]
        if what == "accuracy":
            return m["accuracy"]["average"]
        if what == "acc_g":
            return m["acc_g"]["overall"]
        return (m["mle"] or {}).get("score", float("nan"))
    out = [get(s, w) for _, s, w in COLUMNS if s]
    return out + [out[1] - out[0]]


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' over seeds (the mean alone for one seed)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.2f}"
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{m:.2f} ± {sd:.2f}"


def table(title: str, per_seed: dict[int, dict[str, list[float]]]) -> str:
    """Markdown table: one row per model, each cell the mean ± std over the seeds run so far."""
    seeds = sorted(per_seed)
    names = list(per_seed[seeds[0]])
    lines = [f"{title}; seeds {seeds}, mean ± sample std over seeds", "",
             "| Row | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name in names:
        vals = [[per_seed[s][name][i] for s in seeds if name in per_seed[s]]
                for i in range(len(COLUMNS))]
        lines.append(f"| {name} | " + " | ".join(mean_std(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--data", default="data/synthad", help="SynthAD directory (quickstart's)")
    p.add_argument("--base", default="weights/sage-tiny-base", help="pretrained base VLM")
    p.add_argument("--out", default="runs/ablations", help="run directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--sweep_seeds", type=int, nargs="+", default=None,
                   help="seeds of the N / K sweep (default: --seeds)")
    p.add_argument("--sfe_steps", type=at_least(1), default=200, help="Stage 1 optimizer steps")
    p.add_argument("--edpo_steps", type=at_least(1), default=30, help="Stage 2 optimizer steps")
    p.add_argument("--table3", action=argparse.BooleanOptionalAction, default=True,
                   help="run the Table 3 rows (--no-table3 --sweep: the sweep alone)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the N / K sweep (Fig. 7)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False,
                   help="2 steps each, 20 test records")
    args = p.parse_args(argv)
    if not (args.table3 or args.sweep):
        p.error("--no-table3 with --no-sweep runs nothing: drop one of them")
    if args.fast:
        args.sfe_steps = args.edpo_steps = 2
    py, data, out = sys.executable, Path(args.data), Path(args.out)
    for split in ("test_unseen", "test_seen"):
        if not (data / f"{split}.jsonl").exists():
            raise FileNotFoundError(f"{data / split}.jsonl: not found; generate SynthAD with "
                                    f"`python -m sage.tools.quickstart` first")
    cfg = SageConfig.from_pretrained(args.base)  # the default N and K: the +Fact[FE] run
    new_run_dir(out)  # an earlier run is renamed aside, never overwritten
    log = out / "ablations.log"
    limit = ["--limit", "20"] if args.fast else []
    budget = f"SFE {args.sfe_steps} steps, E-DPO/DPO {args.edpo_steps} steps"
    results = {"table3": {}, "seen": {}, "sweep": {}}

    def sfe(name, seed, *flags):
        d = out / f"s{seed}" / name
        if not (d / "export" / "config.json").exists():  # the sweep reuses Table 3's run
            run([py, "train_sfe.py", "--init", args.base, "--data", str(data), "--out", str(d),
                 "--max_steps", str(args.sfe_steps), "--micro_batch", str(SFE_MICRO_BATCH),
                 *VISION_CACHE, "--seed", str(seed), *flags], log)
        return str(d / "export")

    def dpo(name, seed, init, loss):
        d = out / f"s{seed}" / name
        run([py, "train_edpo.py", "--init", init, "--data", str(data), "--out", str(d),
             "--max_steps", str(args.edpo_steps), "--global_batch", str(EDPO_GLOBAL_BATCH),
             *VISION_CACHE, "--seed", str(seed), "--loss", loss], log)
        return str(d / "export")

    def write(key, seed, res, file, title):
        results[key][seed] = {name: cells(r) for name, r in res.items()}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        text = table(title, results[key])
        (out / file).write_text(text)
        print(text)

    for seed in args.seeds if args.table3 else []:
        sft, hard, fe = (sfe("sft", seed, "--facts", "none"), sfe("hard", seed, "--facts", "hard"),
                         sfe("fe", seed))
        literal = sfe("fe_literal", seed, "--fusion", "literal")
        models = {"Baseline": args.base, "SFT (no facts)": sft, "+Fact[Hard]": hard,
                  "+Fact[FE]": fe, "+Fact[FE] literal": literal,
                  "+DPO": dpo("sft_dpo", seed, sft, "dpo"),
                  "SFE+DPO": dpo("fe_dpo", seed, fe, "dpo"),
                  "Full (SFE+E-DPO)": dpo("fe_edpo", seed, fe, "edpo")}
        res = evaluate(models, data, out / f"s{seed}" / "eval", "test_unseen", log, limit)
        write("table3", seed, res, "table3.md", f"Table 3 at tiny scale: SynthAD test_unseen, "
              f"{budget}")
        seen = {"+Fact[FE]": fe, "+Fact[FE] literal": literal}
        res = evaluate(seen, data, out / f"s{seed}" / "eval_seen", "test_seen", log, limit)
        write("seen", seed, res, "seen.md", f"SFE on SynthAD test_seen (trained categories), "
              f"{budget}")

    for seed in (args.sweep_seeds or args.seeds) if args.sweep else []:
        models = {f"N={n}": sfe("fe" if n == cfg.n_facts else f"n{n}", seed, "--n_facts", str(n))
                  for n in (1, 2, 4)}
        models.update({f"K={k}": sfe("fe" if k == cfg.top_k else f"k{k}", seed, "--top_k",
                                     str(k)) for k in (2, 8, 32)})
        res = evaluate(models, data, out / f"s{seed}" / "eval_sweep", "test_unseen", log, limit)
        write("sweep", seed, res, "sweep.md", f"Fig. 7 at tiny scale: SFE on SynthAD "
              f"test_unseen, N fact sentences / K selected patches, {budget}")


if __name__ == "__main__":
    run_main(main)
