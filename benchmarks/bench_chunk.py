"""End-to-end latency of one action chunk: the paper baseline vs wam_fast at 4, 2 and 1 steps (cached).

The rows of ``python -m wam_fast.bench`` with the same names, built by the same code
(``wam_fast.bench.variants_for`` / ``chunk_runner``): "paper-baseline" is the eager teacher through
``wam_fast.sample`` (DDIM, 10 steps, CFG 6 batched: 20 sample-forwards); "wam_fast-{S}step-{dtype}-cache"
is its shortcut student (the teacher's tensors plus a step-size embedding, mask="temporal"),
compiled by ``wam_fast.compile`` (fused ops, KV cache, CUDA graphs on a GPU) and run through
``WAMPolicy.act`` (the frame's pass + S sample-forwards, guidance baked in). W1 ("videovla-5b") in
bf16 on a GPU, "tiny" in fp32 on CPU (a smoke run there, not a measurement; the fused ops run their
torch backend there, as the CLI does, not the Triton interpreter conftest.py enables for the op
benchmarks); random weights. WAM_BENCH_WORKLOAD names another workload (the unit tests run "tiny"
on a GPU too: W1 belongs to the benchmark runs, not to the test suite).

On a GPU each benchmark also times with CUDA events (warm-up, median) and stores the chunk's block
FLOPs, the % of the compute floor (the measured bf16 matmul rate) and the GPU telemetry (conftest.py)
in its extra_info. The FP8 and uncached rows are in ``python -m wam_fast.bench``.
"""
import contextlib
import os
import statistics

import pytest
import torch

from wam_fast import bench, configs
from wam_fast.ops import use_backend

STUDENT_STEPS = (4, 2, 1)


def _setting(device):
    """(workload, dtype, compile backend) on ``device``."""
    on_gpu = device.type == "cuda"
    workload = os.environ.get("WAM_BENCH_WORKLOAD") or ("videovla-5b" if on_gpu else "tiny")
    return (workload, "bf16", "inductor") if on_gpu else (workload, "fp32", "eager")


@pytest.fixture(scope="module")
def models(device):
    """The teacher and its shortcut student (same tensors: W1 stays at 11 GB), built once."""
    workload, dtype, _ = _setting(device)
    cfg = configs.get(workload)
    torch.manual_seed(0)
    teacher = bench.build_model(cfg, device, bench.DTYPES[dtype])
    student = bench.shortcut_student(teacher, STUDENT_STEPS)
    inputs = bench.make_inputs(cfg, batch=1, device=device, dtype=bench.DTYPES[dtype], seed=0)
    yield {"teacher": teacher, "student": student, "inputs": inputs, "config": cfg}
    del teacher, student
    if device.type == "cuda":
        torch.cuda.empty_cache()


ROWS = {"paper-baseline": "paper-baseline"}
ROWS.update({f"wam_fast-{s}step-cache": f"wam_fast-{s}step-{{dtype}}-cache" for s in STUDENT_STEPS})


@pytest.mark.parametrize("row", list(ROWS))
def test_chunk(benchmark, device, models, row):
    on_gpu = device.type == "cuda"
    workload, dtype, backend = _setting(device)
    name = ROWS[row].format(dtype=dtype)
    variant = next(v for v in bench.variants_for(workload, dtype, STUDENT_STEPS) if v.name == name)
    model = models["student"] if variant.student else models["teacher"]
    run_chunk, info = bench.chunk_runner(variant, model, models["inputs"], seed=0, backend=backend)

    def chunk():
        out = run_chunk()
        if on_gpu:
            torch.cuda.synchronize(device)  # pytest-benchmark's clock is the host's
        return out

    flops = bench.chunk_flops(models["config"], variant, batch=1)
    ops_backend = contextlib.nullcontext() if on_gpu else use_backend("torch")
    with torch.inference_mode(), ops_backend:
        result = benchmark.pedantic(chunk, warmup_rounds=2 if on_gpu else 1, rounds=10 if on_gpu else 5)
        benchmark.extra_info.update(
            name=name, workload=workload, dtype=dtype, sampler=result.sampler, steps=variant.steps,
            nfe=result.nfe, tokens=flops["tokens"], tflop=flops["flops"] / 1e12, cache=variant.cache,
            cache_bytes=info["cache_bytes"], fused_modules=info["fused_modules"], fp8_layers=info["fp8_layers"],
            compiled_with=info["compiled_with"], cuda_graphs=info["cuda_graphs"],
            timer="host clock + synchronize; CUDA events below" if on_gpu else "perf_counter (CPU: not performance data)")
        if on_gpu:
            times, peak = bench.time_calls(run_chunk, device, 2, 10)
            ms = statistics.median(times)
            ceilings = bench.measure_ceilings_cached(device)
            floor = bench.floor_ms(flops, variant.fp8, ceilings)
            benchmark.extra_info.update(median_ms_cuda_events=ms, peak_mem_bytes=peak, floor_ms=floor,
                                        pct_of_floor=None if floor is None else 100.0 * floor / ms, **ceilings)
    assert result.actions.shape == (1, models["config"].action_len, models["config"].action_dim)
    assert torch.isfinite(result.actions).all()
