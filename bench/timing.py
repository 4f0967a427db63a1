"""Side-by-side timing for the benchmarks: interleaved repetitions, medians, per-repetition ratios.

The machines these run on are shared and noisy, so variants are never timed in separate blocks: each
repetition runs every variant once, in a fresh random order (a fixed or rotating order gives each
variant the same predecessor every time, and a predecessor that leaves the shared input in cache, or
flushes it, biased ratios by up to 20% at batch 1), and a ratio is the median over repetitions of the
ratio *within* one repetition. Its spread (interquartile range) is printed as the noise.

Clocks: ``wall`` (perf_counter) or ``thread`` (CPU seconds of the calling thread, `time.thread_time`).
With one torch thread on CPU every kernel runs on the calling thread, so the thread clock counts all
the work (page faults included, as system time) but not the time other processes hold the core: on a
loaded 2-core machine it is several times less noisy than the wall clock.
"""
from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = ["Timings", "interleaved", "geomean", "setup_threads", "sync_fn", "env_line", "pick_clock", "CLOCKS"]

CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


@dataclass
class Timings:
    """Per-variant lists of seconds, one entry per repetition (same index = same repetition)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        """Median seconds of ``name``."""
        return statistics.median(self.seconds[name])

    def ratios(self, name: str, base: str) -> list[float]:
        """``name / base`` within each repetition."""
        return [a / b for a, b in zip(self.seconds[name], self.seconds[base])]

    def ratio(self, name: str, base: str) -> float:
        """Median over repetitions of the within-repetition ratio ``name / base``."""
        return statistics.median(self.ratios(name, base))

    def ratio_iqr(self, name: str, base: str) -> float:
        """Interquartile range of the within-repetition ratios (0 with fewer than 4 repetitions)."""
        r = sorted(self.ratios(name, base))
        if len(r) < 4:
            return 0.0
        q = statistics.quantiles(r, n=4)
        return q[2] - q[0]


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1, sync: Optional[Callable[[], None]] = None,
    clock: str = "wall",
) -> Timings:
    """Time each callable ``reps`` times, interleaved (a seeded random order each repetition), after ``warmup``."""
    sync = sync or (lambda: None)
    now = CLOCKS[clock]
    names = list(fns)
    rng = random.Random(0)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    out = Timings({name: [] for name in names})
    for rep in range(reps):
        order = rng.sample(names, len(names))
        for name in order:
            start = now()
            fns[name]()
            sync()
            out.seconds[name].append(now() - start)
    return out


def pick_clock(clock: str, device: torch.device) -> str:
    """Resolve ``auto``: the thread clock for single-threaded CPU runs, else the wall clock."""
    if clock != "auto":
        if clock == "thread" and (device.type != "cpu" or torch.get_num_threads() != 1):
            raise SystemExit("--clock thread counts only the calling thread: use it with --threads 1 on CPU")
        return clock
    return "thread" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def geomean(values: list[float]) -> float:
    """Geometric mean (nan for an empty list)."""
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def setup_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op thread count (None keeps torch's default); returns the count in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def sync_fn(device: torch.device) -> Callable[[], None]:
    """A no-argument function that waits for ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def env_line(device: torch.device) -> str:
    """One line describing the software and hardware a table was measured on."""
    import os
    import platform

    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
    return f"torch {torch.__version__}, {hw}"
