"""The command-line conventions of every SAGE script and tool, and the flags the training
scripts share (docs/design.md §8.2).

`Parser` is an `argparse.ArgumentParser` that shows every default in --help (the description
keeps its own line breaks) and reads a flag spelt with dashes as its snake_case name:
`--n-facts 4` is `--n_facts 4`, `--no-json-mode` is `--no-json_mode`. Every parser takes
`--debug` (an error shows its traceback, sage.tools.errors) and reports an argument error in
one line, `error: <what>`, exit 2 (on rank 0 only under torchrun).

    p = Parser(description=__doc__); p.add_argument("--n_facts", type=int, default=8, help="N")
"""

from __future__ import annotations

import argparse
import sys
from argparse import BooleanOptionalAction
from pathlib import Path

from sage.tools.errors import EXIT_CODE, is_main_rank


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every help text; the description (a module docstring) printed as written."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser with defaults in --help and dash spellings of snake_case flags accepted."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action=argparse.BooleanOptionalAction, default=False,
                          help="on an error, print the traceback too (also: SAGE_DEBUG=1)")

    def error(self, message: str):
        """One line `error: <what>` and exit 2 (argparse prints the usage block too)."""
        if is_main_rank():
            print(f"error: {message} (--help for usage)", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODE)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if "--" in args:  # everything after a bare "--" is positional: left as given
            i = args.index("--")
            return super().parse_known_args([*map(self.snake, args[:i]), *args[i:]], namespace)
        return super().parse_known_args([self.snake(a) for a in args], namespace)

    @staticmethod
    def snake(arg: str) -> str:
        """`--a-b[=v]` -> `--a_b[=v]`; `--no-a-b` -> `--no-a_b` (BooleanOptionalAction's name)."""
        if not arg.startswith("--") or len(arg) == 2:
            return arg
        name, eq, value = arg[2:].partition("=")
        no = name.startswith(("no-", "no_"))
        name = name[3:] if no else name
        return "--" + ("no-" if no else "") + name.replace("-", "_") + eq + value


def at_least(low: int | float, kind: type = int, most: int | float | None = None):
    """argparse type: a number of `kind` that is >= low, and <= most if given (`--batch_size
    0` is an argument error, not a failure later)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= low:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} must be >= {low}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{text} must be <= {most}")
        return value

    parse.__name__ = f"{kind.__name__} >= {low}" + ("" if most is None else f", <= {most}")
    return parse


def positive(kind: type = float):
    """argparse type: a number > 0 (learning rates, timeouts, clipping norms)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value

    parse.__name__ = f"{kind.__name__} > 0"
    return parse


def load_records(path: str | Path, kind: str, skip_bad: bool, min_facts: int = 0) -> list[dict]:
    """A JSONL split with every referenced image checked at load (missing, empty, truncated)
    and at least `min_facts` fact sentences per record (SageConfig.facts_needed): the first
    bad record is an error naming file, line and field; with skip_bad the bad ones are dropped
    and counted in one warning (rank 0 only under torchrun)."""
    from sage.data.schema import load_jsonl  # the data floor, imported when a split is read

    quiet = None if is_main_rank() else (lambda rep: None)
    return load_jsonl(path, kind=kind, check_images=True, skip_bad=skip_bad, report=quiet,
                      min_facts=min_facts)



def add_optim_args(p: argparse.ArgumentParser) -> None:
    """`# optimisation` flags of the training scripts (train_sfe.py, train_edpo.py, pretrain)."""
    p.add_argument("--recipe", choices=["auto", "paper", "tiny"], default="auto",
                   help="defaults for lr/warmup/steps: paper (the real model) or tiny; "
                        "auto = tiny for a model of width < 1024")
    p.add_argument("--lr", type=positive(), default=None, help="peak learning rate (None: recipe)")
    p.add_argument("--warmup", type=at_least(0), default=None,
                   help="linear warmup steps (None: recipe)")
    p.add_argument("--max_steps", type=at_least(1), default=None,
                   help="optimizer steps (None: recipe)")
    p.add_argument("--global_batch", type=at_least(1), default=32,
                   help="samples per optimizer step")
    p.add_argument("--micro_batch", type=at_least(1), default=8,
                   help="samples per forward per rank")
    p.add_argument("--weight_decay", type=at_least(0.0, float), default=0.0,
                   help="AdamW weight decay")
    p.add_argument("--grad_clip", type=positive(), default=1.0, help="max global gradient norm")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")


def add_runtime_args(p: argparse.ArgumentParser, out: str) -> None:
    """`# runtime` flags of the training scripts."""
    p.add_argument("--out", default=out, help="run directory (checkpoints, metrics, export)")
    p.add_argument("--save_every", type=at_least(0), default=0,
                   help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--keep_last", type=at_least(1), default=2, help="checkpoints kept")
    p.add_argument("--resume", action=BooleanOptionalAction, default=False,
                   help="continue from the newest complete checkpoint in --out")
    p.add_argument("--resume_force", action=BooleanOptionalAction, default=False,
                   help="--resume even where the arguments differ from the stored run's")
    p.add_argument("--skip_bad", action=BooleanOptionalAction, default=False,
                   help="drop bad records of the split (counted, reported once) instead of "
                        "stopping at the first")
    p.add_argument("--activation_checkpointing", action=BooleanOptionalAction, default=False,
                   help="recompute each block in backward")
    p.add_argument("--cpu_offload", action=BooleanOptionalAction, default=False,
                   help="FSDP2 CPU offload of params, grads and optimizer state")
    p.add_argument("--vision_cache_gb", type=at_least(0.0, float), default=0.0,
                   help="keep the decoded image tiles and the frozen InternViT's output per "
                        "tile in up to this much host memory each and reuse them "
                        "(sage.data.images.ImageCache, sage.models.feature_cache; 0: off)")
    p.add_argument("--log_every", type=at_least(1), default=10, help="status line every N steps")
    p.add_argument("--device", default=None, help="cuda or cpu (None: cuda if available)")
    p.add_argument("--export_dtype", default="bfloat16",
                   choices=["bfloat16", "float16", "float32"],
                   help="dtype of the exported weights (InternVL2 publishes bf16)")
    p.add_argument("--system_message", default=None,
                   help="system turn of the Hermes-2 template (None: the --init config's; "
                        "InternVL's own for a plain InternVL2 directory)")


DECODE_HELP = ("eager: the KV-cache loop of Llama.generate; static: the same answers with static "
               "shapes (sage.models.decoding); graph: that step replayed as a CUDA graph "
               "(CUDA, --tp 1)")


def check_decode(p: argparse.ArgumentParser, decode: str, device: str, tp: int = 1) -> None:
    """--decode graph records CUDA graphs: refuse it (exit 2) on a CPU or under --tp > 1
    (recording the ranks' all-reduces is not tested)."""
    if decode != "graph":
        return
    if tp > 1:
        p.error("--decode graph runs with --tp 1 only (recording the ranks' all-reduces in a "
                "CUDA graph is not tested); use --decode static or eager with --tp")
    if not str(device).startswith("cuda"):
        p.error(f"--decode graph records CUDA graphs: it needs a CUDA device, not {device}")
