"""The command-line conventions of every SAGE script and tool, and the flags the training
scripts share (STYLE §2).

`Parser` is an `argparse.ArgumentParser` that shows every default in --help (the description
keeps its own line breaks) and reads a flag spelt with dashes as its snake_case name:
`--n-facts 4` is `--n_facts 4`, `--no-json-mode` is `--no-json_mode`.

    p = Parser(description=__doc__); p.add_argument("--n_facts", type=int, default=8, help="N")
"""

from __future__ import annotations

import argparse
import sys
from argparse import BooleanOptionalAction


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every help text; the description (a module docstring) printed as written."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser with defaults in --help and dash spellings of snake_case flags accepted."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

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


def add_optim_args(p: argparse.ArgumentParser) -> None:
    """`# optimisation` flags of the training scripts (train_sfe.py, train_edpo.py, pretrain)."""
    p.add_argument("--recipe", choices=["auto", "paper", "tiny"], default="auto",
                   help="defaults for lr/warmup/steps: paper (the real model) or tiny; "
                        "auto = tiny for a model of width < 1024")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (None: recipe)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (None: recipe)")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps (None: recipe)")
    p.add_argument("--global_batch", type=int, default=32, help="samples per optimizer step")
    p.add_argument("--micro_batch", type=int, default=8, help="samples per forward per rank")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")


def add_runtime_args(p: argparse.ArgumentParser, out: str) -> None:
    """`# runtime` flags of the training scripts."""
    p.add_argument("--out", default=out, help="run directory (checkpoints, metrics, export)")
    p.add_argument("--save_every", type=int, default=0,
                   help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--keep_last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", action=BooleanOptionalAction, default=False,
                   help="continue from the newest complete checkpoint in --out")
    p.add_argument("--activation_checkpointing", action=BooleanOptionalAction, default=False,
                   help="recompute each block in backward")
    p.add_argument("--cpu_offload", action=BooleanOptionalAction, default=False,
                   help="FSDP2 CPU offload of params, grads and optimizer state")
    p.add_argument("--log_every", type=int, default=10, help="status line every N steps")
    p.add_argument("--device", default=None, help="cuda or cpu (None: cuda if available)")
