"""Shared by benchmarks/bench_<op>.py: shapes, device-event timing and the machine's measured ceilings.

Each op benchmark times the wam_fast op and its baselines (torch eager from the test reference and
torch.compile of it) through ``run``; on a GPU it also times with CUDA events (warm-up, median) and
stores achieved GB/s (memory-bound ops) or TFLOP/s (attention, ffn_gelu) next to the ceilings
measured on this machine (a device-to-device copy, a large bf16 matmul) in the benchmark's extra_info.
"""
from __future__ import annotations

import functools
import statistics

import torch

W1 = {"batch": 1, "tokens": 1256, "noisy_tokens": 774, "dim": 3072, "heads": 48, "head_dim": 64,
      "ffn_dim": 12288, "segments": (226, 1024, 6), "temporal_segments": (226, 256, 768, 6)}
TINY = {"batch": 2, "tokens": 49, "noisy_tokens": 33, "dim": 64, "heads": 2, "head_dim": 64,
        "ffn_dim": 256, "segments": (8, 35, 6), "temporal_segments": (8, 7, 28, 6)}


def shapes(device: torch.device) -> dict:
    """W1 (VideoVLA-5B) shapes on a GPU; small ones on CPU, where kernels would run interpreted."""
    return W1 if device.type == "cuda" else TINY


def cuda_median_ms(fn, warmup: int = 10, iters: int = 50) -> float:
    """Median of per-call CUDA-event times (ms) after warm-up (wam_fast.bench's timer)."""
    from wam_fast.bench import time_calls

    times, _ = time_calls(fn, torch.device("cuda"), warmup, iters)
    return statistics.median(times)


def implementation(name: str, op, reference, device: torch.device):
    """The callable a benchmark times: "wam_fast" (auto dispatch), "torch-eager" (the test reference),
    "torch-compile" (of the reference), or a forced backend ("triton", "cuda"; GPU only)."""
    import pytest

    from wam_fast.ops import use_backend

    if name == "torch-eager":
        return reference
    if name == "torch-compile":
        return compiled(reference)
    if name == "wam_fast":
        return op
    if device.type != "cuda":
        pytest.skip(f"forced {name} is timed on a GPU only (on CPU, Triton runs interpreted)")
    if name == "cuda":
        from wam_fast.ops.registry import cuda_extension_reason

        if cuda_extension_reason() is not None:
            pytest.skip(f"cuda backend: {cuda_extension_reason()}")

    def forced(*args, **kwargs):
        with use_backend(name):
            return op(*args, **kwargs)
    return forced


@functools.lru_cache(maxsize=None)
def ceilings() -> dict:
    """Measured on this GPU: copy bandwidth (GB/s, read + write) and bf16 matmul TFLOP/s."""
    n = 256 * 2 ** 20  # 512 MB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = cuda_median_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = cuda_median_ms(lambda: a @ a, iters=20)
    return {"copy_GBps": 2 * n * 2 / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192 ** 3 / mm_ms / 1e9}


def run(benchmark, fn, device: torch.device, bytes_moved: int = 0, flops: int = 0, **info):
    """Benchmark fn (host clock, synchronized) and, on a GPU, add event-timed throughput vs ceilings."""
    on_gpu = device.type == "cuda"

    def call():
        out = fn()
        if on_gpu:
            torch.cuda.synchronize(device)
        return out

    benchmark.extra_info.update(info)
    result = benchmark.pedantic(call, warmup_rounds=2, rounds=20 if on_gpu else 5)
    if on_gpu:
        ms = cuda_median_ms(fn)
        limits = ceilings()
        benchmark.extra_info["median_ms_cuda_events"] = ms
        benchmark.extra_info.update(limits)
        if bytes_moved:
            gbps = bytes_moved / ms / 1e6
            benchmark.extra_info.update(GBps=gbps, fraction_of_copy=gbps / limits["copy_GBps"])
        if flops:
            tflops = flops / ms / 1e9
            benchmark.extra_info.update(TFLOPs=tflops, fraction_of_matmul=tflops / limits["bf16_matmul_TFLOPs"])
    return result


def compiled(fn):
    """torch.compile of a baseline, built once per function."""
    return torch.compile(fn, dynamic=False)
