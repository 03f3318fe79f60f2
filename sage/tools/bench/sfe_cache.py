"""The vision caches on an SFE run (prints figures): `train_sfe.py` from the same base on the same
data without and then with `--vision_cache_gb` (decoded tiles and the frozen InternViT's output,
sage.data.images.ImageCache and sage.models.feature_cache), measured in the same run: time per
step, the ratio, wall time, and the two runs' losses side by side (the caches change no result
beyond float summation order).

    python -m sage.tools.bench.sfe_cache                          # tiny base, SynthAD, 60 steps
    python -m sage.tools.bench.sfe_cache --steps 3 --data D --init B    # a smoke run
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sage.tools.args import Parser, at_least
from sage.tools.errors import run_main
from sage.tools.quickstart import ROOT, SFE_MICRO_BATCH, VISION_CACHE


def sfe_run(out: Path, args, extra: list[str]) -> tuple[float, list[dict], str]:
    """One train_sfe.py run -> (wall seconds, metrics.jsonl rows, its last output lines)."""
    cmd = [sys.executable, "train_sfe.py", "--init", args.init, "--data", args.data,
           "--out", str(out), "--max_steps", str(args.steps), "--micro_batch",
           str(args.micro_batch), "--log_every", "1", "--seed", "0", *extra]
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return wall, rows, proc.stdout


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--init", default="weights/sage-tiny-base", help="base VLM")
    p.add_argument("--data", default="data/synthad", help="SynthAD directory with facts")
    p.add_argument("--steps", type=at_least(2), default=60, help="SFE steps per run")
    p.add_argument("--micro_batch", type=at_least(1), default=SFE_MICRO_BATCH,
                   help="samples per micro-batch (global batch 32)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        off = sfe_run(Path(tmp) / "off", args, [])
        on = sfe_run(Path(tmp) / "on", args, VISION_CACHE)
    # step 1 holds the start-up (the first batch, lazy initialisation): left out of the mean
    ms = [sum(r["step_ms"] for r in rows[1:]) / (len(rows) - 1) for _, rows, _ in (off, on)]
    loss_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(off[1], on[1]))
    stats = next((line for line in on[2].splitlines() if "vision cache:" in line), "")
    print(f"SFE {args.steps} steps of 32 samples ({args.data}, {args.init}):")
    print(f"  without the caches: {ms[0]:.0f} ms/step, {off[0]:.0f} s wall")
    print(f"  with {' '.join(VISION_CACHE)}: {ms[1]:.0f} ms/step, {on[0]:.0f} s wall")
    print(f"  ratio with / without: {ms[1] / ms[0]:.2f} per step, {on[0] / off[0]:.2f} wall")
    print(f"  largest loss difference over the steps: {loss_gap:.2e}")
    print(f"  {stats.strip()}")


if __name__ == "__main__":
    run_main(main)
