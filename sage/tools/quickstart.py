"""The main job on the embedded default: SynthAD -> SFE -> E-DPO -> evaluation, tiny model, CPU.

    python -m sage.tools.quickstart             # README's main command (target <= 10 min, 2 cores)
    python -m sage.tools.quickstart --fast      # a few steps of everything (tests use this)

Steps, each the documented command of its stage run in a subprocess from the checkout:
  1. python -m sage.tools.synthad             generate the benchmark (skipped if already there)
  2. python -m sage.tools.facts --model BASE  fact sentences from the pretrained base VLM
  3. python -m sage.tools.mle --judge oracle  judge sub-scores of the E-DPO answers (Eq. 3)
  4. python train_sfe.py                      Stage 1 (Fact[FE]) from weights/sage-tiny-base
  5. python train_edpo.py                     Stage 2 (E-DPO) from the SFE export
  6. python evaluate.py                       Base vs SFE vs SFE+E-DPO on test_unseen, both settings
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sage.data.synthad import SIZES, scaled
from sage.runs import new_run_dir
from sage.tools.args import Parser, at_least, positive
from sage.tools.errors import run_main

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the stage scripts live at its top
EDPO_GLOBAL_BATCH = 16  # instances per E-DPO step (2 pairs, 4 sequences each): ~2.5 s on 2 cores
# SFE's 32 samples per step in one micro-batch, not 4 x 8: the same gradient (the loss is
# normalised by the global answer-token count), larger matmuls (docs/experiments.md, "The
# quickstart's step time")
SFE_MICRO_BATCH = 32
# every stage reuses the frozen InternViT's features of a tile it has seen (sage.models.
# feature_cache): SynthAD asks 5 questions of each test image, SFE runs 4 epochs, the
# evaluation both settings; SFE's 600 distinct tiles take 75 MiB
VISION_CACHE = ["--vision_cache_gb", "2"]


def run(cmd: list[str], log: Path) -> None:
    """Run one stage, echo its output to the terminal and to `log`; stop on failure."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        if proc.wait():
            raise SystemExit(f"stage failed (exit {proc.returncode}): {' '.join(cmd)}; "
                             f"log: {log}")
    print(f"[{time.time() - t:.0f} s]", flush=True)


def check_data(data: Path, groups: int, shared_marks: float = 0.0) -> None:
    """An existing SynthAD directory is used as it is; one made for another SFE size or
    share of shared marks is an error (never regenerated over: it may hold facts and judge
    scores)."""
    manifest = data / "manifest.json"
    try:
        m = json.loads(manifest.read_text())
        have, marks = m["counts"]["sfe_train"] // 5, float(m.get("shared_marks", 0.0))
        default = scaled(SIZES["sfe_train"], float(m.get("scale", 1.0)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{manifest}: not a SynthAD manifest ({e}); move {data} aside")
    # a share of the added groups only: without added groups it draws nothing
    want_marks = shared_marks if groups > default else 0.0
    for what, got, want, flag in (("SFE training groups", have, groups, "--sfe_groups"),
                                  ("shared marks", marks, want_marks, "--shared_marks")):
        if got != want:
            raise SystemExit(f"{manifest}: {got} {what} where the quickstart asks for {want}: "
                             f"move {data} aside (it is never overwritten), pass another "
                             f"--data, or {flag} to match")


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--data", default="data/synthad", help="SynthAD directory")
    p.add_argument("--base", default="weights/sage-tiny-base", help="pretrained base VLM")
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--sfe_steps", type=at_least(1), default=200, help="Stage 1 optimizer steps")
    p.add_argument("--edpo_steps", type=at_least(1), default=30, help="Stage 2 optimizer steps")
    p.add_argument("--scale", type=positive(), default=1.0, help="SynthAD size multiplier")
    # more groups are drawn after the other splits, which stay as they are (900: +2.2 points
    # over 3 seeds, within the spread; docs/experiments.md, "More training images")
    p.add_argument("--sfe_groups", type=at_least(1), default=SIZES["sfe_train"],
                   help="SFE training groups at scale 1 (multiplied by --scale)")
    p.add_argument("--shared_marks", type=at_least(0.0, float, most=1.0), default=0.0,
                   help="share of the added SFE pairs with one mark on test and reference alike "
                        "(python -m sage.tools.synthad --shared_marks)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False,
                   help="tiny sizes and 2 steps each (smoke)")
    args = p.parse_args(argv)
    if args.fast:
        args.sfe_steps, args.edpo_steps, args.scale = 2, 2, 0.05
    py, out, data = sys.executable, Path(args.out), Path(args.data)
    new_run_dir(out)  # an earlier run is renamed aside, never overwritten
    log = out / "quickstart.log"
    t0 = time.time()
    limit = ["--limit", "20"] if args.fast else []
    groups = scaled(args.sfe_groups, args.scale)  # as sage.data.synthad
    if not (data / "manifest.json").exists():
        run([py, "-m", "sage.tools.synthad", "--out", str(data), "--seed", str(args.seed),
             "--scale", str(args.scale), "--sfe_groups", str(groups),
             "--shared_marks", str(args.shared_marks)], log)
    else:
        check_data(data, groups, args.shared_marks)
    for split in ("sfe_train", "edpo_train", "test_unseen"):
        run([py, "-m", "sage.tools.facts", "--data", str(data / f"{split}.jsonl"),
             "--out", str(data / "facts_base.jsonl"), "--model", args.base, "--fill",
             "--batch_size", "16", "--max_new_tokens", "32"], log)
    run([py, "-m", "sage.tools.mle", "--data", str(data / "edpo_train.jsonl"),
         "--judge", "oracle", "--in_place"], log)
    run([py, "train_sfe.py", "--init", args.base, "--data", str(data), "--out",
         str(out / "sfe"), "--max_steps", str(args.sfe_steps), "--micro_batch",
         str(SFE_MICRO_BATCH), *VISION_CACHE, "--seed", str(args.seed)], log)
    run([py, "train_edpo.py", "--init", str(out / "sfe" / "export"), "--data", str(data),
         "--out", str(out / "edpo"), "--max_steps", str(args.edpo_steps),
         "--global_batch", str(EDPO_GLOBAL_BATCH), *VISION_CACHE, "--seed", str(args.seed)],
        log)
    run([py, "evaluate.py", "--model", args.base, str(out / "sfe" / "export"),
         str(out / "edpo" / "export"), "--names", "Base", "SFE", "SFE+E-DPO",
         "--data", str(data), "--split", "test_unseen", "--setting", "both",
         "--out", str(out / "eval"), *VISION_CACHE, *limit], log)
    print(f"\nquickstart done in {time.time() - t0:.0f} s; report: {out / 'eval' / 'report.md'}")


if __name__ == "__main__":
    run_main(main)
