"""Measuring one bench row: the chunk it runs (the eager teacher through ``wam_fast.sample``, or
``WAMPolicy.act`` of the compiled teacher or student), its timed latency, memory, FLOPs, floor and GPU
telemetry, the memory released between rows, and the speedups over the baselines measured in the same run."""
from __future__ import annotations

import gc
import time
from typing import List, Optional

import torch

import wam_fast
from wam_fast.ops import backends_used
from wam_fast.quant import tensor_bytes
from wam_fast.bench.accounting import chunk_flops
from wam_fast.bench.ceilings import floor_ms
from wam_fast.bench.models import compiled_policy
from wam_fast.bench.rows import BASELINES, Variant
from wam_fast.bench.telemetry import gpu_telemetry
from wam_fast.bench.timing import percentile, time_calls


def chunk_runner(variant: Variant, model: torch.nn.Module, inputs: dict, seed: int, backend: str = "eager"):
    """(run_chunk, info) for ``variant``: run_chunk() produces one action chunk (the ActionChunk);
    ``model`` is the teacher for teacher rows (eager or compiled), the shortcut student for student
    rows. The policy's reset(text) (once per instruction) runs here, outside any timing."""
    if not variant.compiled:
        kwargs = dict(sampler=variant.sampler, steps=variant.steps, cfg_scale=variant.cfg_scale,
                      cfg_schedule=variant.cfg_schedule, seed=seed)

        def run_chunk():
            return wam_fast.sample(model, **inputs, **kwargs)

        return run_chunk, {"compiled_with": "eager (wam_fast.sample)", "cache_bytes": 0, "fused_modules": 0,
                           "fp8_layers": 0, "cuda_graphs": False, "timed_model": model}
    policy, applied = compiled_policy(model, variant, seed, backend)
    policy.reset(inputs["text"])

    def run_chunk():
        return policy.act(inputs["image"])

    applied.update(cache_bytes=policy.cache_bytes, timed_model=policy.model, policy=policy)
    if variant.student:
        applied["step_size"] = model.config.num_train_timesteps / variant.steps
    return run_chunk, applied


def release_memory(device: torch.device, drop_compiled: bool = False) -> None:
    """Between rows: free what the last row held, so each row's peak memory is its own. gc first (a
    cycle the code does not break, e.g. torch.compile's bound method on its module, frees only then),
    then ``drop_compiled``: torch.compile's caches and CUDA-graph trees (after the last row of a
    compiled model), then the CUDA caching allocator's free blocks."""
    gc.collect()
    if drop_compiled:
        torch._dynamo.reset()
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def ops_since(before: dict) -> dict:
    """{op: {backend: calls}} run since the ``backends_used()`` snapshot ``before``."""
    delta = {}
    for op, counts in backends_used().items():
        for backend, n in counts.items():
            n -= before.get(op, {}).get(backend, 0)
            if n:
                delta.setdefault(op, {})[backend] = n
    return delta


def measure(variant: Variant, model, inputs: dict, cfg, args, device, ceilings: Optional[dict]) -> dict:
    before = backends_used()
    run_chunk, info = chunk_runner(variant, model, inputs, args.seed, args.backend)
    chunks = []

    def timed():
        chunks.append(run_chunk())
        if len(chunks) > 1:
            chunks.pop(0)

    first_ms = None
    with torch.inference_mode():
        if args.warmup:  # the first call compiles / captures: timed on its own
            start = time.perf_counter()
            timed()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_ms = (time.perf_counter() - start) * 1e3
        times, peak = time_calls(timed, device, max(args.warmup - 1, 0), args.repeats)
    # clocks and temperature as the timed calls leave the GPU (NVML; on CPU the reason it is skipped)
    telemetry = gpu_telemetry(device)
    flops = chunk_flops(cfg, variant, args.batch)
    chunk = chunks[-1]
    row = {
        "name": variant.name,
        "steps": variant.steps,
        "fp8": variant.fp8,
        "cache": variant.cache,
        "latency_ms": round(percentile(times, 50), 3),
        "p90_ms": round(percentile(times, 90), 3),
        "peak_mem_bytes": int(peak),
        # what the row runs (they differ row by row: see tests/test_bench.py)
        "model": (("shortcut student (mask=temporal, action-only)" if variant.future_frames == 0 else
                   "shortcut student (mask=temporal)") if variant.student else
                  "teacher (compiled)" if variant.compiled else "teacher (eager)"),
        "sampler": chunk.sampler,
        "cfg_scale": variant.cfg_scale,
        "cfg_schedule": variant.cfg_schedule,
        "nfe": chunk.nfe,
        "tokens": flops["tokens"],  # per chunk through the blocks (noisy tokens + the frame with the cache)
        "tflop": round(flops["flops"] / 1e12, 6),
        "compiled_with": info["compiled_with"],
        "backend": info.get("backend", "eager"),
        "levers": info.get("levers", []),
        "first_call_ms": None if first_ms is None else round(first_ms, 3),  # includes compile / graph capture
        "cuda_graphs": info["cuda_graphs"],
        "fused_modules": info["fused_modules"],
        "fp8_layers": info["fp8_layers"],
        "cache_bytes": info["cache_bytes"],
        "weight_bytes": tensor_bytes(info["timed_model"]),  # measured: the model's parameters and buffers
        "batch": args.batch,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "times_ms": [round(t, 4) for t in times],
        # the backend each fused op actually ran (wam_fast.ops registry; graph replays reuse the capture's)
        "op_backends": ops_since(before),
        "gpu_telemetry": telemetry,
    }
    if variant.student:
        row["step_size"] = info["step_size"]
    if ceilings is not None:
        floor = floor_ms(flops, variant.fp8, ceilings)
        row["floor_ms"] = None if floor is None else round(floor, 4)
        row["pct_of_floor"] = None if floor is None else round(100.0 * floor / row["latency_ms"], 2)
    return row


def add_speedups(rows: List[dict]) -> None:
    """row["speedups"][baseline] = baseline median / this row's median, both measured in this run."""
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        row["speedups"] = {b: round(by_name[b]["latency_ms"] / row["latency_ms"], 3)
                           for b in BASELINES if b in by_name and b != row["name"]}
