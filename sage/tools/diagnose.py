"""Diagnostics of a model on SFE records by teacher forcing (sage.diagnose): the decision
token's loss, perception AUROC on SynthAD, and the fusion pathway (facts_mode "fe"): attention
entropy / log K, fact-token cosine across images and slots, the share that varies across
images, one-shot vs zero-shot distance; what the comparison can tell (Eq. 1's anomaly score
and a linear probe on the fact tokens, as AUROC).

    python -m sage.tools.diagnose --model runs/quickstart/sfe/export --data data/synthad \\
        --split sfe_train --limit 64 [--swap_images]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sage
from sage.data import load_jsonl
from sage.diagnose import (comparison_report, decision_report, first_of_each_group, fusion_report,
                           perception_auroc, swap_images)
from sage.tools.args import Parser, at_least
from sage.tools.errors import run_main


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--model", required=True, help="InternVL2-layout model directory")
    p.add_argument("--data", default="data/synthad", help="data root holding the JSONL splits")
    p.add_argument("--split", default="sfe_train", help="JSONL split")
    p.add_argument("--limit", type=at_least(1), default=64, help="first N records")
    p.add_argument("--images", type=at_least(2), default=16,
                   help="images (first record of each group) for the fusion-pathway figures")
    p.add_argument("--swap_images", action=argparse.BooleanOptionalAction, default=False,
                   help="also measure with each record's images taken from another group")
    args = p.parse_args(argv)

    model = sage.load_pretrained(args.model, dtype=torch.float32, device="cpu").eval()
    records = load_jsonl(Path(args.data) / f"{args.split}.jsonl", kind="qa")[:args.limit]
    setting = "one-shot" if all(r.get("reference_image") for r in records) else "zero-shot"
    print(f"{args.model} on {len(records)} records of {args.split} ({setting}); "
          f"facts_mode {model.cfg.facts_mode}")
    runs = {"images as recorded": records}
    if args.swap_images:
        runs["images of another group"] = swap_images(records)
    for name, recs in runs.items():
        d = decision_report(model, recs, args.data, setting)
        print(f"{name}: decision token {d['decision_nats']:.3f} nats (ln 2 = 0.693), argmax "
              f"right {100 * d['decision_argmax_acc']:.1f}%; other answer tokens "
              f"{d['rest_nats']:.3f} nats")
    if all("anomalous" in (r.get("truth") or {}) for r in records):
        a = perception_auroc(model, records, args.data, setting)
        print(f"perception: the normal explanation's log-prob tells normal from anomalous "
              f"pairs with AUROC {a:.3f} (0.5 = blind)")
    firsts = first_of_each_group(records)[:args.images]
    if model.cfg.facts_mode == "fe" and setting == "one-shot":
        print_fusion_report(fusion_report(model, firsts, args.data), len(firsts))
    truths = {(r.get("truth") or {}).get("anomalous") for r in firsts}
    if setting == "one-shot" and truths == {True, False}:  # both classes among the images
        c = comparison_report(model, firsts, args.data)
        line = (f"comparison on {len(firsts)} images: Eq. 1's anomaly score (mean of the K "
                f"lowest nearest-neighbour cosines) AUROC {c['eq1_auroc']:.3f}")
        print(line + " (0.5 = no signal)")
        for s in ("one-shot", "zero-shot") if "norm_one-shot" in c else ():
            line = f"  {s}: norm of the fusion output t^s AUROC {c[f'norm_{s}']:.3f}"
            if f"probe_{s}" in c:
                line += (f"; linear probe (5-fold ridge) on t^s {c[f'probe_fusion_{s}']:.3f}, "
                         f"on the fact tokens after the Eq. 9 head {c[f'probe_{s}']:.3f}")
            print(line)


def print_fusion_report(rep: dict, n_images: int) -> None:
    """The fusion pathway's figures (sage.diagnose.fusion_report), one line per setting."""
    print(f"fusion pathway on {n_images} images (Eq. 2 attention; fact tokens after Eq. 9):")
    for setting in ("one-shot", "zero-shot"):
        r = rep[setting]
        print(f"  {setting}: attention entropy {r['entropy_over_log_k']:.3f} log K (K = "
              f"{r['keys']}; 1 = uniform), fact-token cosine across images "
              f"{r['cos_across_images']:.4f}, across slots {r['cos_across_slots']:.4f}, "
              f"share varying across images {r['varying_share']:.4f}, norm "
              f"{r['token_norm']:.3f}")
    o = rep["one_vs_zero"]
    print(f"  one-shot vs zero-shot fact tokens: cosine {o['cos']:.4f}, distance "
          f"{o['rel_dist']:.4f} of the one-shot norm (0 = the reference changes nothing)")


if __name__ == "__main__":
    run_main(main)
