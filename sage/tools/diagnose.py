"""Diagnostics of a model on SFE records by teacher forcing (sage.diagnose): the decision
token's loss, perception AUROC on SynthAD, and the fact tokens' similarity across images.

    python -m sage.tools.diagnose --model runs/quickstart/sfe/export --data data/synthad \\
        --split sfe_train --limit 64 [--swap_images]
"""

from __future__ import annotations

from pathlib import Path

import torch

import sage
from sage.data import load_jsonl
from sage.diagnose import decision_report, fact_token_similarity, perception_auroc, swap_images
from sage.tools.args import Parser


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("--model", required=True, help="InternVL2-layout model directory")
    p.add_argument("--data", default="data/synthad", help="data root holding the JSONL splits")
    p.add_argument("--split", default="sfe_train", help="JSONL split")
    p.add_argument("--limit", type=int, default=64, help="first N records")
    p.add_argument("--swap_images", action="store_true",
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
    if model.cfg.facts_mode == "fe" and setting == "one-shot":
        s = fact_token_similarity(model, records[:16], args.data)
        print(f"fact tokens: cosine across images {s['fact_cos_across_images']:.5f}, one-shot "
              f"vs zero-shot {s['fact_cos_one_vs_zero_shot']:.5f} (1 = carries nothing "
              "sample-specific)")


if __name__ == "__main__":
    main()
