"""Timing of the bench: the per-call latency (CUDA events on a GPU, perf_counter on CPU) after warm-up,
the peak memory, and the percentiles the tables report."""
from __future__ import annotations

import math
import resource
import sys
import time
from typing import Callable, List

import torch


def percentile(values: List[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int):
    """Milliseconds of each of `repeats` calls after `warmup` calls, and the peak memory in bytes.

    GPU: CUDA events around each call, peak = torch.cuda.max_memory_allocated (weights included).
    CPU: perf_counter, peak = the process's maximum resident set size.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times, torch.cuda.max_memory_allocated(device)
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times, peak_rss_bytes()
