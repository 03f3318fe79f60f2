"""E-DPO's reference log-probs log pi_ref(a|x) (Eq. 6-7), computed once and cached.

The reference model is frozen, so its log-prob of every (record, setting, ranked answer) can be
computed in one pass before training and kept in a JSON file; training then needs no second
40B model in memory. The pass:

- runs the same number of forwards on every rank of its group (the last batch is padded by
  repeating a job whose results are dropped), so no rank waits on a collective the others skip
  (FSDP2's all-gathers, tensor-parallel all-reduces);
- splits records over data-parallel groups (`dp_rank`, `dp_size`); the ranks of one
  tensor-parallel group take the same records;
- puts each record's prompt and images through the model once, its L ranked answers as
  segments of one packed row (sage.data.collate.EDPOCollator.pack).

The cache records what it was made from (`cache_meta`): a fingerprint of the init checkpoint,
the data file, the settings and max_len; `load_cache` refuses a file made from anything else.

    meta = cache_meta(init_dir, split_file, ["one-shot"], max_len=None)
    table = load_cache(path, meta)  # None when absent; ValueError when it does not match
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch

from sage.distributed import gather_objects
from sage.inference import to_device

CACHE_VERSION = 1
_SAMPLE = 1 << 20  # bytes hashed at the start and the end of every weight file


def fingerprint(directory: str | os.PathLike) -> str:
    """sha256 of a checkpoint's config.json, weight-file sizes and the first and last MiB of
    every weight file (headers and tensor bytes): two trainings of one architecture differ
    there, and a 75 GiB checkpoint is fingerprinted in milliseconds."""
    directory = Path(directory)
    h = hashlib.sha256()
    files = [directory / "config.json", *sorted(directory.glob("*.safetensors"))]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (fingerprinting the checkpoint {directory})")
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_SAMPLE))
            if size > 2 * _SAMPLE:
                fh.seek(size - _SAMPLE)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a data file (JSONL splits are small)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def cache_meta(init_dir, data_file, settings: list[str], max_len: int | None) -> dict:
    """What a reference cache is made from; a cache is used only when all of it matches."""
    return {"version": CACHE_VERSION, "init": fingerprint(init_dir),
            "data": file_digest(data_file), "settings": sorted(settings), "max_len": max_len}


def load_cache(path: str | os.PathLike, meta: dict) -> dict[str, float] | None:
    """The cached log-probs when `path` exists and was made from `meta`; None when absent.

    Raises ValueError naming the file and every field that differs (a cache of another
    checkpoint, data file, setting or max_len would silently bias every DPO margin).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a reference cache (invalid JSON: {e})") from None
    if not isinstance(raw, dict) or "meta" not in raw or "logps" not in raw:
        raise ValueError(f"{path}: not a reference cache of this version (no 'meta' / 'logps'); "
                         "delete it or pass another --ref_cache to recompute")
    diff = [f"{k}: cache {raw['meta'].get(k)!r}, now {v!r}" for k, v in meta.items()
            if raw["meta"].get(k) != v]
    if diff:
        raise ValueError(f"{path}: reference cache was made from other inputs ("
                         + "; ".join(diff) + "); delete it or pass another --ref_cache")
    return raw["logps"]


def save_cache(path: str | os.PathLike, meta: dict, logps: dict[str, float]) -> None:
    """Write atomically (temporary file + rename): an interrupted write leaves no cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "logps": logps}))
    os.replace(tmp, path)


def ref_key(rec_id: str, setting: str, answer_rank: int) -> str:
    """Cache key of one ranked answer (answer_rank 0 = best) of a record in a setting."""
    return f"{rec_id}|{setting}|{answer_rank}"


def padded_share(n_jobs: int, dp_rank: int, dp_size: int, batch_size: int) -> list[list[int]]:
    """This data-parallel group's batches of job indices; every group gets the same number of
    batches of `batch_size` (short ones are filled with job -1 = padding), so all ranks run
    the same forwards. n_jobs may be smaller than dp_size (then some groups only pad)."""
    per_group = math.ceil(n_jobs / dp_size) if n_jobs else 0
    n_batches = math.ceil(per_group / batch_size) if per_group else 0
    mine = list(range(dp_rank * per_group, min(n_jobs, (dp_rank + 1) * per_group)))
    mine += [-1] * (n_batches * batch_size - len(mine))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


@torch.no_grad()
def reference_logps(model, datasets: dict, collate, batch_size: int, dp_rank: int = 0,
                    dp_size: int = 1, writer: bool = True, device: torch.device | str = "cpu",
                    progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """log pi_ref of every ranked answer of every record, per setting -> {ref_key: log-prob}
    on every rank.

    datasets: setting -> EDPODataset (same records); collate: an EDPOCollator (its `pack`
    puts each record's prompt once and its L answers as segments). Records are split over
    dp_size groups in equal numbers of batches (`padded_share`); only `writer` ranks (one per
    tensor-parallel group) contribute their results to the all-gather.
    """
    local = {}
    for setting, ds in datasets.items():
        for chunk in padded_share(len(ds), dp_rank, dp_size, batch_size):
            real = [i for i in chunk if i >= 0]
            index = real + [real[0] if real else 0] * (len(chunk) - len(real))  # padding
            examples = [ds[i] for i in index]
            batch = to_device(collate.pack(examples, [list(range(len(ex["answers"])))
                                                      for ex in examples]), device)
            _, loss_sum, _ = model(batch, answer_only=True)
            logps = (-loss_sum).tolist()  # (S,): (example, rank) order
            k = 0
            for j, ex in enumerate(examples):
                for r in range(len(ex["answers"])):
                    if j < len(real):  # padding results are dropped
                        local[ref_key(ex["id"], setting, r)] = logps[k]
                    k += 1
            if progress is not None:
                progress(len(real))
    return {k: v for part in gather_objects(local if writer else {}) for k, v in part.items()}
