"""One clear error for every command line (issue 19; docs/design.md §8.9).

An expected error - bad input, bad arguments, a missing file, a run directory in the way -
prints one line `error: <what>` on stderr (the message names file, line and field where there
are ones) and exits 2. The traceback is printed too only with `--debug` or SAGE_DEBUG=1. Under
torchrun only rank 0 prints; the other ranks exit 2 quietly. Any other exception is a bug and
keeps its traceback (exit 1).

    if __name__ == "__main__":      # a tool with main(argv=None)
        run_main(main)
    report_errors()                 # a flat script: first statement after its imports
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
import traceback
from typing import Callable

EXIT_CODE = 2  # as argparse: the command was given something it cannot use
EXPECTED = (ValueError, KeyError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError,
            FloatingPointError)  # a diverged run (sage.training.check_finite): fix --lr, resume


def is_expected(e: BaseException) -> bool:
    """A problem of the input or the environment the user can fix (not a bug)."""
    return isinstance(e, EXPECTED) or (isinstance(e, OSError)
                                       and e.errno in (errno.ENOSPC, errno.EDQUOT))


def is_main_rank() -> bool:
    """Rank 0 of a torchrun job, or not under torchrun (read from the environment, so it also
    holds before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def debug_wanted(argv: list[str] | None = None) -> bool:
    """--debug among the arguments, or SAGE_DEBUG set to anything but '' / '0'."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("SAGE_DEBUG", "") not in ("", "0")


def one_line(e: BaseException) -> str:
    """The message of an exception on one line (KeyError without its quotes)."""
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return text or type(e).__name__


def report(e: BaseException, debug: bool, stream=None) -> int:
    """Print `error: <what>` (and the traceback when debug) on rank 0; -> EXIT_CODE."""
    stream = stream or sys.stderr
    if is_main_rank():
        if debug:
            traceback.print_exception(type(e), e, e.__traceback__, file=stream)
        print(f"error: {one_line(e)}", file=stream, flush=True)
    return EXIT_CODE


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run a tool's main(argv) and exit with its status; an expected error -> one line, exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = main(argv)
    except Exception as e:  # noqa: BLE001  sorted by is_expected; bugs are re-raised
        if not is_expected(e):
            raise
        sys.exit(report(e, debug_wanted(argv)))
    sys.exit(code)


def report_errors() -> None:
    """For a flat script: install a sys.excepthook that reports an expected error in one line
    and exits 2; other exceptions go to the previous hook (traceback, exit 1).

    torch.distributed wraps sys.excepthook once the process group starts (it prefixes
    `[rankN]:` and writes the hook's output itself), so this hook writes to the stderr of the
    moment it was installed and ends the process itself: atexit handlers run, then os._exit.
    """
    stream, previous, debug = sys.stderr, sys.excepthook, debug_wanted()

    def hook(exc_type, exc, tb):
        if not is_expected(exc):
            previous(exc_type, exc, tb)
            return
        report(exc.with_traceback(tb), debug, stream)
        for s in (sys.stdout, stream):
            try:
                s.flush()
            except (OSError, ValueError):
                pass
        atexit._run_exitfuncs()  # e.g. release a run directory's lock
        os._exit(EXIT_CODE)  # the interpreter would exit 1 after any hook

    sys.excepthook = hook
