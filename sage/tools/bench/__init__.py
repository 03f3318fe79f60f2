"""Benchmarks that print figures (python -m sage.tools.bench.<name>); shared helpers below."""

from __future__ import annotations

from typing import Callable


def print_profile(fn: Callable[[], None], row_limit: int, cuda: bool) -> None:
    """Run fn once under torch.profiler and print its row_limit costliest ops or kernels
    (self device time on CUDA, self CPU time otherwise). fn must synchronize itself."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=row_limit, max_name_column_width=60))
