"""A run directory: resumable sharded checkpoints, the guard against overwriting an earlier
run, and the final export (STYLE §6).

    out/<run>/step_000500/   DCP shards (model, optimizer) + rng_rankXXX.pt + meta.json
    out/<run>/metrics.jsonl  one line per logged step (sage.training.MetricsLog)
    out/<run>/export/        InternVL2-layout model directory (export_model)

Checkpoints are written to a temporary name and renamed; a directory without a complete
meta.json is never resumed from; nothing the user made is overwritten or deleted.

    check_run_dir(run_dir, resume=False)
    save_checkpoint(run_dir, step, model, optimizer, {"sampler": ...}, rank)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)

from sage.checkpoint import save_state_dict
from sage.config import SageConfig
from sage.distributed import barrier, print0


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------- checkpoints


def save_checkpoint(run_dir: Path, step: int, model, optimizer, extra: dict, rank: int,
                    keep_last: int = 2) -> Path:
    """Sharded DCP checkpoint `run_dir/step_XXXXXX/`, written atomically and pruned to keep_last.

    All ranks write into `.tmp_step_XXXXXX`; rank 0 adds meta.json (marked complete) and renames
    it. A directory without a complete meta.json is never resumed from (see latest_checkpoint).
    """
    final = run_dir / f"step_{step:06d}"
    tmp = run_dir / f".tmp_step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this same step
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{rank:03d}.pt")
    barrier()
    if rank == 0:
        meta = {"step": step, "complete": True, "time": time.time(), **extra}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, final)
        ckpts = sorted(p for p in run_dir.glob("step_*") if _is_complete(p))
        for old in ckpts[:-keep_last]:
            shutil.rmtree(old)  # our own earlier training checkpoints only
    barrier()
    return final


def _is_complete(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text()).get("complete") is True
    except (OSError, json.JSONDecodeError):
        return False


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete `step_*` directory (half-written or corrupted ones are skipped)."""
    ckpts = sorted(p for p in Path(run_dir).glob("step_*") if p.is_dir() and _is_complete(p))
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, model, optimizer, rank: int) -> dict:
    """Restore model, optimizer and this rank's RNG from a DCP checkpoint; -> its meta dict."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    rng = path / f"rng_rank{rank:03d}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "meta.json").read_text())


def resume(run_dir: Path, model, optimizer, sampler, rank: int) -> int:
    """--resume: restore the newest complete checkpoint (model, optimizer, RNG, data position);
    -> the step to continue from (0 when there is none yet)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        print0(f"--resume: no complete checkpoint in {run_dir}; starting at step 0")
        return 0
    meta = load_checkpoint(ckpt, model, optimizer, rank)
    sampler.load_state_dict(meta["sampler"])
    print0(f"resumed from {ckpt} at step {meta['step']}")
    return meta["step"]


# ---------------------------------------------------------------------- run directories


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to start a new run over an earlier run's checkpoints (it would crash at the
    first save onto an existing step, and pruning would delete the earlier run's)."""
    ckpt = None if resume else latest_checkpoint(run_dir)
    if ckpt is not None:
        raise SystemExit(f"{run_dir} holds checkpoints of an earlier run ({ckpt.name}); pass "
                         "--resume to continue it or choose another --out (nothing was changed)")


def keep_aside(path: Path) -> Path | None:
    """Rename an existing run directory to `<path>.<timestamp>` so a new run can use the
    name; -> the new name (None when there was nothing). Nothing is deleted."""
    if not path.exists():
        return None
    stamp = f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = path.with_name(stamp), 1
    while aside.exists():
        aside, n = path.with_name(f"{stamp}-{n}"), n + 1
    path.rename(aside)
    return aside


def new_run_dir(path: Path) -> None:
    """Create `path` for a new run of a driver (quickstart, ablations), first moving an earlier
    run there aside with `keep_aside` and saying so."""
    aside = keep_aside(path)
    if aside:
        print(f"kept the earlier run {path} as {aside}")
    path.mkdir(parents=True)


def export_model(model, cfg: SageConfig, tokenizer, out_dir: Path, rank: int) -> None:
    """Gather the full state dict (CPU, rank 0) and write the InternVL2 layout + sage.* keys."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    if rank == 0:
        save_state_dict(sd, cfg, out_dir, tokenizer=tokenizer, overwrite=True)
    barrier()
