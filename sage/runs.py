"""A run directory: resumable sharded checkpoints, the guard against overwriting an earlier
run, and the final export (docs/design.md §8.6).

    out/<run>/step_000500/   DCP shards (model, optimizer) + rng_rankXXX.pt + meta.json
    out/<run>/metrics.jsonl  one line per logged step (sage.training.MetricsLog)
    out/<run>/export/        InternVL2-layout model directory (export_model)

Checkpoints are written to a temporary name and renamed; a directory without a complete
meta.json is never resumed from; nothing the user made is overwritten or deleted. Every
artefact (step_*, export/, config.json, metrics.jsonl, partial saves) marks a run: a new run
there is refused; one run at a time (`.lock`); --resume checks the stored arguments.

    check_run_dir(run_dir, args.resume, vars(args), args.resume_force)   # at start, read-only
    start_run(run_dir, vars(args), rank, cfg.to_dict())    # inputs read: lock, config.json
    save_checkpoint(run_dir, step, model, optimizer, {"sampler": ...}, rank)
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)

from sage.export import save_state_dict
from sage.config import SageConfig
from sage.distributed import barrier, broadcast_object, print0


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

    All ranks write into `.tmp_step_XXXXXX`; rank 0 adds meta.json (marked complete) last and
    renames it. A directory without a complete meta.json is never resumed from (see
    latest_checkpoint). A full disk: the partial directory is removed and the error says
    "no space left on device" with the path.
    """
    final = run_dir / f"step_{step:06d}"
    tmp = run_dir / f".tmp_step_{step:06d}"
    if rank == 0:
        for partial in run_dir.glob(".tmp_step_*"):  # crashed or disk-full earlier attempts
            shutil.rmtree(partial, ignore_errors=True)
    barrier()
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_rank{rank:03d}.pt")
        barrier()
        if rank == 0:
            meta = {"step": step, "complete": True, "time": time.time(), **extra}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            if final.exists() and not _is_complete(final):
                shutil.rmtree(final)  # a prune cut short left it without its completion mark
            os.replace(tmp, final)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if not _disk_full(e):
            raise
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # do not leave the disk full
        raise OSError(errno.ENOSPC, f"no space left on device while saving the checkpoint "
                                    f"{final} (the partial {tmp.name} was removed; free space "
                                    f"and rerun with --resume)") from e
    if rank == 0:
        ckpts = sorted(p for p in run_dir.glob("step_*") if _is_complete(p))
        kept = ckpts[-keep_last:]
        # older than every kept one: pruned now, or left without its mark by a prune cut short
        for old in sorted(p for p in run_dir.glob("step_*") if p.name < kept[0].name):
            prune(old)
    barrier()
    return final


def prune(ckpt: Path) -> None:
    """Delete one of our own training checkpoints: its completion mark (meta.json) goes first,
    so a prune cut short leaves an incomplete directory that is never resumed from."""
    (ckpt / "meta.json").unlink(missing_ok=True)
    shutil.rmtree(ckpt)


def _disk_full(e: BaseException | None) -> bool:
    """ENOSPC / EDQUOT anywhere in an exception, its causes, or DCP's per-rank failures."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        failures = getattr(e, "failures", None)  # DCP: {rank: (exception, stack summary)}
        if isinstance(failures, dict) and any(
                _disk_full(f[0] if isinstance(f, tuple) else f) for f in failures.values()):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


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

# Every artefact of a run: a new run into a directory holding any of them is refused.
RUN_FILES = ("config.json", "metrics.jsonl", "export")
RUN_PATTERNS = ("step_*", ".tmp_step_*", ".export.tmp-*", ".export.old-*")
LOCK = ".lock"  # {"pid", "host", "time"} of the run using the directory
# Arguments that cannot change what a resumed run computes (--max_steps may also grow).
NOT_COMPARED = {"log_every", "save_every", "keep_last", "resume", "resume_force", "device",
                "debug", "out", "activation_checkpointing", "cpu_offload", "vision_cache_gb"}


def run_artefacts(run_dir: Path) -> list[str]:
    """Names in run_dir that belong to a run (checkpoints, partial saves, export, logs)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = {n for n in RUN_FILES if (run_dir / n).exists()}
    found |= {p.name for pat in RUN_PATTERNS for p in run_dir.glob(pat)}
    return sorted(found)


def stored_args(run_dir: Path) -> tuple[dict | None, Path | None]:
    """The arguments a run was started with: from its newest complete checkpoint's meta.json,
    else its config.json; -> (args, file) or (None, None)."""
    ckpt = latest_checkpoint(run_dir)
    for file in ([ckpt / "meta.json"] if ckpt else []) + [Path(run_dir) / "config.json"]:
        try:
            args = json.loads(file.read_text()).get("args")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(args, dict):
            return args, file
    return None, None


def arg_differences(stored: dict, new: dict) -> list[str]:
    """`--name old -> new` for each argument (present in both) that differs and could change
    the result of a resumed run; --max_steps may grow."""
    diffs = []
    for k in sorted(set(stored) & set(new) - NOT_COMPARED):
        old, cur = stored[k], new[k]
        if k == "max_steps" and isinstance(old, int) and isinstance(cur, int) and cur >= old:
            continue
        if old != cur:
            diffs.append(f"--{k} {old!r} -> {cur!r}")
    return diffs


def _read_lock(run_dir: Path) -> dict | None:
    try:
        info = json.loads((Path(run_dir) / LOCK).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as held
    return info if isinstance(info, dict) else {}


def _lock_is_stale(info: dict) -> bool:
    """The lock's owner was on this host and is no longer running."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False  # another machine's process cannot be checked from here
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _lock_is_ours(info: dict) -> bool:
    return info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()


def _locked(run_dir: Path, info: dict) -> FileExistsError:
    lock = Path(run_dir) / LOCK
    who = (f"pid {info.get('pid')} on {info.get('host')}, since "
           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('time', 0)))}"
           if info else "unreadable lock")
    return FileExistsError(f"{run_dir} is in use by another run ({who}); wait for it or choose "
                           f"another --out (if no run is using it, remove {lock})")


def check_run_dir(run_dir: Path, resume: bool, args: dict | None = None,
                  force: bool = False, verbose: bool = True) -> None:
    """Refuse, before any work and changing nothing, a run into `run_dir` when another run is
    using it (its lock), when a new run would mix with an earlier run's artefacts
    (run_artefacts), or when --resume would continue it with different arguments (args: the
    new run's vars(args); force: --resume_force). Raises FileExistsError / ValueError."""
    run_dir = Path(run_dir)
    info = _read_lock(run_dir)
    if info is not None and not _lock_is_stale(info) and not _lock_is_ours(info):
        raise _locked(run_dir, info)
    if not resume:
        found = run_artefacts(run_dir)
        if found:
            raise FileExistsError(f"{run_dir} holds an earlier run ({', '.join(found)}); pass "
                                  "--resume to continue it or choose another --out "
                                  "(nothing was changed)")
        return
    stored, file = stored_args(run_dir)
    diffs = arg_differences(stored, args) if stored is not None and args is not None else []
    if diffs and not force:
        raise ValueError(f"{run_dir}: --resume with arguments that differ from the stored "
                         f"run's ({file}): {'; '.join(diffs)}; pass --resume_force to resume "
                         "anyway or choose another --out (nothing was changed)")
    if diffs and verbose:
        print0(f"--resume_force: resuming {run_dir} despite {'; '.join(diffs)}")


def start_run(run_dir: Path, args: dict, rank: int, config: dict | None = None) -> None:
    """Take `run_dir` for this run once every input has been read: create it, take its lock
    (a stale lock of a dead process on this host is taken over, saying so; released at exit),
    check it again (check_run_dir), clean what an interrupted save or export left and write
    config.json {"model": config, "args": args}. Rank 0 works, every rank raises its error."""
    run_dir = Path(run_dir)
    error = None
    if rank == 0:
        created = not run_dir.exists()
        locked = False
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            _take_lock(run_dir)
            locked = True
            check_run_dir(run_dir, args.get("resume", False), args, args.get("resume_force"),
                          verbose=False)
            _clean_partials(run_dir)
            if config is not None:
                (run_dir / "config.json").write_text(
                    json.dumps({"model": config, "args": args}, indent=2))
        except (OSError, ValueError) as e:
            if locked:
                release_lock(run_dir)
            if created and run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()
            error = (type(e).__name__, str(e))
    error = broadcast_object(error)
    if error is not None:
        kinds = {"FileExistsError": FileExistsError, "ValueError": ValueError}
        raise kinds.get(error[0], OSError)(error[1])


def _take_lock(run_dir: Path) -> None:
    lock = run_dir / LOCK
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read_lock(run_dir) or {}
            if not _lock_is_stale(info):
                raise _locked(run_dir, info) from None
            print0(f"{lock}: taking over the stale lock of pid {info['pid']} on {info['host']} "
                   "(no longer running)")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        atexit.register(release_lock, run_dir)
        return
    raise _locked(run_dir, _read_lock(run_dir) or {})


def release_lock(run_dir: Path) -> None:
    """Remove run_dir's lock if this process holds it."""
    info = _read_lock(run_dir)
    if info and _lock_is_ours(info):
        (Path(run_dir) / LOCK).unlink(missing_ok=True)


def _clean_partials(run_dir: Path) -> None:
    """Remove what an interrupted save or export left (never a complete checkpoint); an export
    moved aside but not yet replaced is put back."""
    for partial in [*run_dir.glob(".tmp_step_*"), *run_dir.glob(".export.tmp-*")]:
        shutil.rmtree(partial, ignore_errors=True)
        print0(f"removed {partial} (left by an interrupted save)")
    for old in run_dir.glob(".export.old-*"):
        if (run_dir / "export").exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, run_dir / "export")
            print0(f"restored {run_dir / 'export'} from {old.name} (an interrupted export)")


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


def export_model(model, cfg: SageConfig, tokenizer, out_dir: Path, rank: int,
                 dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Gather the full state dict (CPU, rank 0) and write the InternVL2 layout + sage.* keys,
    floating tensors in `dtype` (bf16 as InternVL2 publishes; None: as trained), with the
    tokenizer files and generation_config.json. A failed export removes its temporary
    directory; a full disk is named as such."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    if rank == 0:
        out_dir = Path(out_dir)
        try:
            save_state_dict(sd, cfg, out_dir, tokenizer=tokenizer, overwrite=True,
                            dtype=dtype)
        except BaseException as e:
            for partial in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
                shutil.rmtree(partial, ignore_errors=True)
            if not _disk_full(e):
                raise
            raise OSError(errno.ENOSPC, f"no space left on device while exporting {out_dir} "
                                        "(the partial export was removed; free space and rerun "
                                        "with --resume)") from e
    barrier()
