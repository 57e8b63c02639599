"""``python -m wam_fast.bench``: latency per action chunk, eager baselines vs wam_fast, on this machine.

Default workload: "videovla-5b" (W1) in bf16 on a GPU, "tiny" in fp32 on CPU (``--workload`` for
W2). Weights and inputs are random: latency does not depend on weight values, and a 5B checkpoint is
not needed to measure it. Batch 1, no history frames.

Rows (``--rows`` picks some by name or glob), in the order they run:

- ``released-baseline``: the eager teacher as VideoVLA's code samples it: stochastic DPM++(2M),
  50 steps, dynamic classifier-free guidance (scale 6) with cond + uncond batched (2 rows, 100
  sample-forwards per chunk), through ``wam_fast.sample``.
- ``paper-baseline``: the eager teacher as the VideoVLA paper deploys it: DDIM, 10 steps, CFG 6
  (2 rows, 20 sample-forwards).
- ``wam_fast-{S}step-{dtype|fp8}-{cache|nocache}`` for S in ``--steps`` (default 4, 2, 1): a shortcut
  student of the same backbone (mask="temporal", distillation="shortcut", guidance baked in so one
  row per sample-forward; its parameters are the teacher's tensors plus a step-size embedding),
  compiled by ``wam_fast.compile`` (fused ops, FP8 linears or not, the KV cache or not, CUDA graphs
  on a GPU) and run through ``WAMPolicy.act`` (one control step: the frame's pass with the cache,
  then S denoising sample-forwards). FP8 rows run last: quantization swaps the linears in place.

Each row reports the median and p90 latency (GPU: CUDA events, after warm-up), the peak memory,
its speedup over each baseline measured in this same run, and on a GPU the % of the compute floor:
the chunk's block FLOPs (``wam_fast.cache.chunk_cost``, the accounting table) divided by the
machine's matmul rate (measured: a bf16 and an FP8 8192^3 GEMM, or DESIGN.md's ceiling when that
measurement is not possible; the JSON says which), over the measured latency.

A second table gives the arithmetic per action chunk (tokens through the blocks, block FLOPs and
KV-cache memory) for W1 and W2 with and without the cache, from the configs.

``--json PATH`` writes ``{"device", "workload", "versions", "environment", "rows": [{"name", "steps",
"fp8", "cache", "latency_ms", "p90_ms", "peak_mem_bytes", ...}], "accounting", ...}``; ``--chart PATH``
(default: the JSON path with .png, when --json is given) draws the table with matplotlib (optional:
``pip install matplotlib``). ``--from-json PATH`` re-prints the table and draws the chart of a
recorded run without measuring (e.g. a GPU run's JSON, charted on a laptop).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

import wam_fast
from wam_fast import configs
from wam_fast.env import environment, versions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Above this many parameters a CPU run needs --allow-cpu-large (W1: 5.57 B = 22 GB in fp32).
CPU_PARAM_LIMIT = 1_000_000_000
BASELINES = ("released-baseline", "paper-baseline")
DEFAULT_STEPS = (4, 2, 1)
# DESIGN.md section 1: dense matmul rates (TFLOP/s) used when they cannot be measured here.
DESIGN_CEILINGS = {"H100": {"bf16": 800.0, "fp8": 1500.0}, "H200": {"bf16": 800.0, "fp8": 1500.0},
                   "4090": {"bf16": 165.0, "fp8": 330.0}}
CHART_HINT = "pip install matplotlib (or pip install 'wam_fast[bench]')"


@dataclass
class Variant:
    """One row: which model (the teacher or its shortcut student), how it samples, which levers."""

    name: str
    sampler: str
    steps: int
    cfg_scale: float
    cfg_schedule: str = "constant"
    student: bool = False  # False: wam_fast.sample on the eager teacher; True: WAMPolicy.act on the compiled student
    fp8: bool = False
    cache: bool = False


def student_row_name(steps: int, fp8: bool, cache: bool, dtype: str) -> str:
    return f"wam_fast-{steps}step-{'fp8' if fp8 else dtype}-{'cache' if cache else 'nocache'}"


def variants(args) -> List[Variant]:
    """Every row of a run (``args.workload``, ``args.steps``, ``args.dtype``), in the order it runs."""
    return variants_for(args.workload, args.dtype, args.steps)


def variants_for(workload: str, dtype: str, steps=DEFAULT_STEPS) -> List[Variant]:
    """Every row, in the order it runs: baselines, then bf16 (or the run's dtype) students, then FP8."""
    first_order = "ddim" if configs.get(workload).objective == "v_prediction" else "euler"
    rows = [Variant("released-baseline", "dpm++2m-sde", 50, 6.0, "dynamic"),
            Variant("paper-baseline", "ddim", 10, 6.0)]
    if first_order != "ddim":  # a flow-matching teacher: the samplers that fit it
        rows = [dataclasses.replace(v, sampler=first_order) for v in rows]
    for fp8 in (False, True):  # FP8 last: quantize_fp8 swaps the student's linears in place
        for s in steps:
            for cache in (True, False):
                rows.append(Variant(student_row_name(s, fp8, cache, dtype), first_order, s, 1.0,
                                    student=True, fp8=fp8, cache=cache))
    return rows


def select(rows: List[Variant], patterns: Optional[List[str]]) -> List[Variant]:
    """The rows whose name matches any of the glob ``patterns`` (all rows when None)."""
    if not patterns:
        return rows
    return [v for v in rows if any(fnmatch.fnmatchcase(v.name, p) for p in patterns)]


# ---- models ----------------------------------------------------------------------------------------
def temporal_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The mask="temporal" model with the same parameter tensors (no copy)."""
    config = dataclasses.replace(model.config, mask="temporal")
    with torch.device("meta"):
        twin = wam_fast.WAMTransformer(config)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval()


def shortcut_student(model: torch.nn.Module, steps=DEFAULT_STEPS, seed: int = 0) -> torch.nn.Module:
    """A shortcut student of ``model``'s backbone for latency: mask="temporal", distillation="shortcut",
    distilled_steps = sorted(steps). It holds the teacher's parameter tensors (no copy: W1 would need
    11 GB more) plus its own step-size embedding, drawn at random (its last linear is zero in a
    fresh student; values do not change latency, so it is drawn like any weight here)."""
    config = dataclasses.replace(model.config, mask="temporal", distillation="shortcut",
                                 distilled_steps=tuple(sorted(set(int(s) for s in steps))))
    with torch.device("meta"):
        student = wam_fast.WAMTransformer(config)
    result = student.load_state_dict(model.state_dict(), strict=False, assign=True)
    if result.unexpected_keys or any(not k.startswith("step_embed.") for k in result.missing_keys):
        raise RuntimeError(f"shortcut_student: the student's parameters should be the teacher's plus step_embed.*; "
                           f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    param = next(model.parameters())
    generator = torch.Generator("cpu").manual_seed(seed)
    for name in result.missing_keys:
        parent_name, _, attr = name.rpartition(".")
        parent = student.get_submodule(parent_name)
        meta = getattr(parent, attr)
        value = torch.randn(meta.shape, generator=generator) * 0.02 if meta.dim() > 1 else torch.zeros(meta.shape)
        setattr(parent, attr, torch.nn.Parameter(value.to(param.device, param.dtype), requires_grad=False))
    return student.eval().requires_grad_(False)


def quantize_fp8_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """FP8 e4m3 backbone linears (default FP8Config: dynamic per-token activations)."""
    from wam_fast.quant import quantize_fp8

    return quantize_fp8(model)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    # Scoped: parameters are created directly in `dtype`, and the global default is restored.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def count_parameters(cfg) -> int:
    """Parameter count from a meta-device build: no memory, no initialisation."""
    with torch.device("meta"):
        return sum(p.numel() for p in wam_fast.WAMTransformer(cfg).parameters())


def build_model(cfg, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # Built on the target device in the target dtype: W1 in fp32 would be 22 GB before any cast.
    with torch.device(device), default_dtype(dtype):
        model = wam_fast.WAMTransformer(cfg)
    return model.eval().requires_grad_(False)


def make_inputs(cfg, batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    generator = torch.Generator("cpu").manual_seed(seed)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=generator)
    image = torch.randn(batch, 1, cfg.latent_channels, cfg.latent_height, cfg.latent_width,
                        generator=generator)
    return {"text": text.to(device, dtype), "image": image.to(device, dtype)}


def student_policy(student: torch.nn.Module, variant: Variant, seed: int, backend: str):
    """The ``WAMPolicy`` a student row times, compiled by ``wam_fast.compile`` (fused ops, FP8 or not,
    the KV cache or not, CUDA graphs where CUDA is), and what was applied ({"levers", ...}).

    The first policy compiles ``student`` itself (torch.compile is per model, so rows of one precision
    share its compiled graphs); a later policy with another FP8 setting needs another student."""
    from wam_fast.compiler import CompileConfig, compile, compile_report
    from wam_fast.quant import fp8_layers

    try:
        previous = compile_report(student)
    except ValueError:  # not compiled yet
        previous = None
    if previous is not None and previous.config.fp8 != variant.fp8:
        raise RuntimeError(f"{variant.name}: this student was compiled with fp8={previous.config.fp8}; "
                           f"build another shortcut_student for fp8={variant.fp8}")
    policy = wam_fast.WAMPolicy(student, steps=variant.steps, sampler=variant.sampler, cache=variant.cache,
                                history=0, seed=seed, cfg_scale=variant.cfg_scale)
    compile(policy, CompileConfig(fused=True, fp8=variant.fp8, cache=variant.cache, backend=backend))
    model, report = policy.model, compile_report(policy)
    fused_modules = sum(type(m).__name__.startswith("Fused") for m in model.modules())
    cuda_graphs = any(where == "cuda_graphs" for where, _ in report.applied)
    compiled = any(where == "torch.compile" for where, _ in compile_report(model).applied)
    levers = [name for name, on in (("fused", fused_modules > 0), ("fp8", bool(fp8_layers(model))),
                                    ("kv-cache", policy.cache is not None), ("torch.compile", compiled),
                                    ("cuda-graphs", cuda_graphs)) if on]
    return policy, {"compiled_with": "wam_fast.compile", "backend": backend, "levers": levers,
                    "cuda_graphs": cuda_graphs, "fused_modules": fused_modules, "fp8_layers": len(fp8_layers(model))}


# ---- timing -----------------------------------------------------------------------------------------
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


# ---- compute floor ----------------------------------------------------------------------------------
def chunk_flops(cfg, variant: Variant, batch: int) -> dict:
    """Block FLOPs of one chunk of ``variant`` (``wam_fast.cache.chunk_cost``: the accounting table's
    arithmetic), split into linears (24 d^2 per token per layer) and attention (the rest)."""
    from wam_fast.cache import chunk_cost

    rows = batch * (2 if variant.cfg_scale != 1.0 or variant.cfg_schedule != "constant" else 1)
    model_cfg = dataclasses.replace(cfg, mask="temporal") if variant.student else cfg
    cost = chunk_cost(model_cfg, variant.steps, rows, cache=variant.cache)
    linear = cfg.num_layers * 24 * cfg.hidden_dim ** 2 * cost["tokens"]
    return {"tokens": cost["tokens"], "flops": cost["flops"], "linear_flops": linear,
            "attention_flops": cost["flops"] - linear}


def design_ceilings(device_name: str) -> Optional[dict]:
    for key, rates in DESIGN_CEILINGS.items():
        if key in device_name:
            return dict(rates)
    return None


def measure_ceilings(device: torch.device, n: int = 8192) -> dict:
    """Dense matmul TFLOP/s on this GPU: bf16 (a @ a) and FP8 e4m3 (torch._scaled_mm, cuBLASLt),
    n x n x n, CUDA events; each falls back to DESIGN.md's figure (source says which) or None."""
    design = design_ceilings(torch.cuda.get_device_name(device)) or {}
    out = {}

    def rate(fn):
        times, _ = time_calls(fn, device, 5, 20)
        return 2 * n ** 3 / percentile(times, 50) / 1e9

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out["bf16_tflops"], out["bf16_source"] = rate(lambda: a @ a), f"measured ({n}^3 bf16 matmul)"
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = a8.t()  # column-major second operand, as _scaled_mm requires
        one = torch.ones((), device=device, dtype=torch.float32)
        out["fp8_tflops"] = rate(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        out["fp8_source"] = f"measured ({n}^3 torch._scaled_mm e4m3)"
    except (RuntimeError, AttributeError, TypeError) as exc:
        out["fp8_tflops"] = design.get("fp8")
        out["fp8_source"] = (f"DESIGN.md ceiling ({type(exc).__name__}: {exc})".splitlines()[0]
                             if design else f"unknown: FP8 GEMM not measurable here ({type(exc).__name__})")
    return out


_CEILINGS: dict = {}


def measure_ceilings_cached(device: torch.device) -> dict:
    """``measure_ceilings`` once per device and process (benchmarks share it)."""
    key = str(device)
    if key not in _CEILINGS:
        _CEILINGS[key] = measure_ceilings(device)
    return _CEILINGS[key]


def floor_ms(flops: dict, fp8: bool, ceilings: dict) -> Optional[float]:
    """Compute-floor milliseconds of a chunk: linears at the FP8 (fp8 rows) or bf16 rate, attention at bf16."""
    bf16 = ceilings.get("bf16_tflops")
    linear_rate = ceilings.get("fp8_tflops") if fp8 else bf16
    if not bf16 or not linear_rate:
        return None
    return (flops["linear_flops"] / linear_rate + flops["attention_flops"] / bf16) / 1e9


# ---- GPU telemetry ----------------------------------------------------------------------------------
def gpu_telemetry(device=None) -> dict:
    """A snapshot of the GPU from NVML (nvidia-ml-py): name, SM and memory clocks (MHz), power (W) and
    its limit, memory used (bytes), temperature (C). Without a GPU or NVML: {"skipped": why}."""
    if not torch.cuda.is_available():
        return {"skipped": f"no CUDA device (torch {torch.__version__}"
                           f"{', a CPU build' if not torch.version.cuda else ''}): GPU telemetry not taken"}
    try:
        import pynvml
    except ImportError:
        return {"skipped": "nvidia-ml-py is not installed (pip install nvidia-ml-py): GPU telemetry not taken"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVML raises its own error types
        return {"skipped": f"NVML did not initialise ({type(exc).__name__}: {exc}): GPU telemetry not taken"}
    try:
        index = torch.device(device).index if device is not None and torch.device(device).index is not None \
            else torch.cuda.current_device()
        try:  # match by UUID: CUDA_VISIBLE_DEVICES may renumber devices between torch and NVML
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        except Exception:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        out = {"name": name.decode() if isinstance(name, bytes) else name}
        readings = {
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
            "memory_used_bytes": lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used),
            "memory_total_bytes": lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        for key, read in readings.items():
            try:
                out[key] = read()
            except Exception:  # e.g. power readings are not supported on some boards / MIG slices
                out[key] = None
        return out
    except Exception as exc:
        return {"skipped": f"NVML query failed ({type(exc).__name__}: {exc}): GPU telemetry not taken"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


# ---- measuring ---------------------------------------------------------------------------------------
def chunk_runner(variant: Variant, model: torch.nn.Module, inputs: dict, seed: int, backend: str = "eager"):
    """(run_chunk, info) for ``variant``: run_chunk() produces one action chunk (the ActionChunk);
    ``model`` is the teacher for baseline rows, the shortcut student for student rows. The policy's
    reset(text) (once per instruction) runs here, outside any timing."""
    if not variant.student:
        kwargs = dict(sampler=variant.sampler, steps=variant.steps, cfg_scale=variant.cfg_scale,
                      cfg_schedule=variant.cfg_schedule, seed=seed)

        def run_chunk():
            return wam_fast.sample(model, **inputs, **kwargs)

        return run_chunk, {"compiled_with": "eager (wam_fast.sample)", "cache_bytes": 0, "fused_modules": 0,
                           "fp8_layers": 0, "cuda_graphs": False, "timed_model": model}
    policy, applied = student_policy(model, variant, seed, backend)
    policy.reset(inputs["text"])

    def run_chunk():
        return policy.act(inputs["image"])

    applied.update(cache_bytes=policy.cache_bytes, step_size=model.config.num_train_timesteps / variant.steps,
                   timed_model=policy.model, policy=policy)
    return run_chunk, applied


def measure(variant: Variant, model, inputs: dict, cfg, args, device, ceilings: Optional[dict]) -> dict:
    from wam_fast.quant import tensor_bytes

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
        "model": "shortcut student (mask=temporal)" if variant.student else "teacher (eager)",
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


# ---- tables -----------------------------------------------------------------------------------------
def format_bytes(n: int) -> str:
    if n >= 2 ** 30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2 ** 20 else f"{n / 2**10:.1f} KiB"


def format_ms(ms: float) -> str:
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def format_table(workload: str, rows: List[dict]) -> str:
    floor = any(r.get("pct_of_floor") is not None for r in rows)
    head = ["name", "sampler", "steps", "nfe", "tokens", "levers", "KV cache", "median ms", "p90 ms", "peak mem",
            "vs released", "vs paper"] + (["% of floor"] if floor else [])
    lines = [f"workload {workload}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        speedups = r.get("speedups", {})
        ratio = [f"{speedups[b]:.2f}x" if b in speedups else "-" for b in BASELINES]
        cache = format_bytes(r["cache_bytes"]) if r.get("cache") else "-"
        levers = "+".join(r.get("levers") or ["eager"])
        cells = [r["name"], r["sampler"], r["steps"], r["nfe"], r["tokens"], levers, cache,
                 f"{r['latency_ms']:.2f}", f"{r['p90_ms']:.2f}", format_bytes(r["peak_mem_bytes"])] + ratio
        if floor:
            cells.append("-" if r.get("pct_of_floor") is None else f"{r['pct_of_floor']:.1f}%")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


ACCOUNTING_WORKLOADS = ("videovla-5b", "videovla-5b-sim")


def accounting(steps: int, rows: int) -> List[dict]:
    """Tokens and FLOPs per action chunk for W1 and W2: the full-mask model (VideoVLA), its temporal
    twin uncached and cached (no history), and the cache's bf16 memory."""
    from wam_fast.cache import cache_bytes, chunk_cost

    out = []
    for name in ACCOUNTING_WORKLOADS:
        full = configs.get(name)
        temporal = dataclasses.replace(full, mask="temporal")
        for label, cfg, cache in (("full (VideoVLA)", full, False), ("temporal", temporal, False),
                                  ("temporal + KV cache", temporal, True)):
            cost = chunk_cost(cfg, steps, rows, cache=cache)
            out.append({"workload": name, "model": label, "cache": cache, "steps": steps, "rows": rows,
                        "tokens": cost["tokens"], "tflop": round(cost["flops"] / 1e12, 3),
                        "text_tokens": cost["text_tokens"], "text_tflop": round(cost["text_flops"] / 1e12, 3),
                        "cache_bytes_bf16": cache_bytes(cfg, rows) if cache else 0})
    return out


def weight_accounting(workload: str = "videovla-5b") -> dict:
    """Weight bytes of a workload in bf16 and with FP8 linears, from meta-device builds."""
    from wam_fast.quant import weight_bytes

    cfg = configs.get(workload)
    default = weight_bytes(cfg)
    with_adaln = weight_bytes(cfg, filter_fn=lambda module, name: name.startswith("blocks."))
    return {"workload": workload, "bf16": default["bf16"], "fp8": default["fp8"], "fp8_with_adaln": with_adaln["fp8"]}


def format_accounting(entries: List[dict]) -> str:
    head = ("workload", "model", "tokens / chunk", "TFLOP / chunk", "vs uncached", "text once per instruction",
            "KV cache (bf16)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    uncached = {}
    for e in entries:
        if e["model"] == "temporal":
            uncached[e["workload"]] = e["tflop"]
        ratio = f"{uncached[e['workload']] / e['tflop']:.2f}x fewer FLOPs" if e["cache"] else "-"
        text = f"{e['text_tokens']} tokens, {e['text_tflop']:.2f} TFLOP" if e["cache"] else "-"
        memory = format_bytes(e["cache_bytes_bf16"]) if e["cache"] else "-"
        cells = (e["workload"], e["model"], e["tokens"], f"{e['tflop']:.2f}", ratio, text, memory)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def format_environment(env: dict, options: dict) -> str:
    device = env["device"] + (f" (sm {env['capability']}, driver {env['driver']})" if env.get("capability") else "")
    clocks = (f", SM clock {env['sm_clock_mhz']}/{env['sm_clock_max_mhz']} MHz"
              if env.get("sm_clock_mhz") is not None else "")
    return "\n".join([
        f"device    {device}{clocks}",
        f"versions  python {env['python']}, torch {env['torch']}, triton {env['triton'] or '-'}, "
        f"cuda {env['cuda'] or '-'}, wam_fast {env['wam_fast']}, commit {env['commit'] or 'unknown'}",
        f"run       workload {options['workload']}, {options['dtype']}, batch {options['batch']}, "
        f"{env['torch_threads']} torch threads / {env['cpu_count']} cpus, warmup {options['warmup']}, "
        f"repeats {options['repeats']}, seed {options['seed']}, compile backend {options['backend']}, "
        f"random weights and inputs",
    ])


# ---- chart --------------------------------------------------------------------------------------------
def write_chart(result: dict, path: str) -> Optional[str]:
    """Draw the rows of ``result`` (median latency bars, p90 whiskers, log scale, speedup vs the paper
    baseline written on each bar) into the PNG ``path``. Returns None, or why no chart was drawn
    (matplotlib missing) - a message, never an exception, so a measurement is never lost to a chart."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        return f"chart not drawn: matplotlib is not installed ({CHART_HINT})"
    rows = result["rows"]
    # the pyplot-free API: no global backend or rcParams change in the caller's process
    fig = Figure(figsize=(9.5, 0.42 * len(rows) + 1.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"baseline": "#7f7f7f", "fp8": "#e3741b", "other": "#1f6fb4"}
    y = list(range(len(rows)))[::-1]
    for yi, r in zip(y, rows):
        kind = "baseline" if r["name"] in BASELINES else ("fp8" if r["fp8"] else "other")
        ax.barh(yi, r["latency_ms"], color=colours[kind], hatch=None if r["cache"] or kind == "baseline" else "//",
                edgecolor="white", height=0.7)
        ax.plot([r["latency_ms"], r["p90_ms"]], [yi, yi], color="black", linewidth=1)
        speedup = r.get("speedups", {}).get("paper-baseline")
        label = f" {format_ms(r['latency_ms'])}" + (f"  {speedup:.2f}x" if speedup is not None else "")
        if r.get("pct_of_floor") is not None:
            label += f"  {r['pct_of_floor']:.0f}% of floor"
        ax.text(r["p90_ms"], yi, label, va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels([r["name"] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("latency per action chunk, ms (median; line to p90; log scale)")
    longest = max(r["p90_ms"] for r in rows)
    ax.set_xlim(min(r["latency_ms"] for r in rows) / 2, longest * 6)
    versions_ = result.get("versions", {})
    ax.set_title(f"wam_fast bench: {result['workload']} on {result['device']}\n"
                 f"torch {versions_.get('torch')}, commit {versions_.get('commit')}; ratios vs paper-baseline",
                 fontsize=9)
    ax.legend(handles=[Patch(color=colours["baseline"], label="eager baselines (CFG, 2 rows)"),
                       Patch(color=colours["other"], label="wam_fast, " + rows[-1].get("dtype", "bf16")),
                       Patch(color=colours["fp8"], label="wam_fast, FP8"),
                       Patch(facecolor="white", edgecolor="black", hatch="//", label="no KV cache")],
              fontsize=7, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png")
    return None


# ---- CLI --------------------------------------------------------------------------------------------
def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected step counts like 4,2,1, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"step counts must be ints >= 1, got {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m wam_fast.bench",
        description="Latency per action chunk: the eager baselines (released: DPM++ 50 steps + dynamic CFG; "
                    "paper: DDIM 10 steps + CFG) vs wam_fast (shortcut student, 4/2/1 steps, bf16/FP8, KV cache "
                    "on/off, compiled). Random weights: latency does not depend on weight values.")
    parser.add_argument("--workload", choices=configs.names(),
                        help="default: videovla-5b (W1) on a GPU, tiny on CPU; videovla-5b-sim is W2")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--rows", type=lambda s: [p for p in s.split(",") if p],
                        help="comma-separated row names or globs, e.g. 'paper-baseline,wam_fast-*-cache' "
                             "(default: all; ratios need their baseline in the run)")
    parser.add_argument("--steps", type=_int_list, default=list(DEFAULT_STEPS),
                        help="student step counts, e.g. 4,2,1 (default)")
    parser.add_argument("--backend", choices=("inductor", "eager"),
                        help="wam_fast.compile backend (default: inductor on a GPU, eager on CPU, where a "
                             "first torch.compile costs ~25 s per shape)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--chart", metavar="PATH",
                        help="draw the table as a PNG (default: the --json path with .png; off without --json)")
    parser.add_argument("--no-chart", action="store_true", help="draw no chart")
    parser.add_argument("--ceiling", choices=("measured", "design"), default="measured",
                        help="GPU only: the matmul rates of the compute floor, measured here (default) or "
                             "DESIGN.md's figures for this GPU")
    parser.add_argument("--from-json", metavar="PATH",
                        help="print the table of a recorded --json file and draw its chart; measure nothing")
    parser.add_argument("--allow-cpu-large", action="store_true",
                        help="run a multi-billion-parameter workload on CPU anyway")
    args = parser.parse_args(argv)
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return parser, args


def chart_path(args) -> Optional[str]:
    if args.no_chart:
        return None
    if args.chart:
        return args.chart
    source = args.json or args.from_json
    return os.path.splitext(source)[0] + ".png" if source else None


def emit_chart(result: dict, path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    problem = write_chart(result, path)
    print(f"\n{problem}" if problem else f"\nwrote {path}")
    return problem


def replot(args) -> dict:
    """--from-json: the table and chart of a recorded run."""
    with open(args.from_json, encoding="utf-8") as f:
        result = json.load(f)
    print(format_table(result["workload"], result["rows"]))
    emit_chart(result, chart_path(args))
    return result


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    if args.from_json:
        if args.json:
            parser.error("--from-json re-draws a recorded run; it does not take --json")
        return replot(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (torch {torch.__version__})")
    args.workload = args.workload or ("videovla-5b" if on_gpu else "tiny")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.backend = args.backend or ("inductor" if on_gpu else "eager")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = configs.get(args.workload)
    every = variants(args)
    chosen = select(every, args.rows)
    if not chosen:
        parser.error(f"--rows {','.join(args.rows)} matches no row; rows: {', '.join(v.name for v in every)}")

    if not on_gpu and not args.allow_cpu_large:
        params = count_parameters(cfg)
        if params > CPU_PARAM_LIMIT:
            parser.exit(2, f"wam_fast.bench: refusing to run {args.workload} on CPU: {params / 1e9:.2f} B "
                           f"parameters are {params * 4 / 1e9:.0f} GB in fp32 and a sample-forward takes "
                           f"minutes. Run it on a GPU, use --workload tiny, or pass --allow-cpu-large.\n")

    env = environment(str(device))
    options = {k: getattr(args, k) for k in ("workload", "dtype", "batch", "warmup", "repeats", "seed", "backend",
                                             "steps", "rows", "ceiling")}
    print("wam_fast bench: latency per action chunk")
    print(format_environment(env, options), flush=True)
    ceilings = None
    if on_gpu:
        ceilings = ({**design_ceilings(env["device"]), "bf16_source": "DESIGN.md ceiling",
                     "fp8_source": "DESIGN.md ceiling"} if args.ceiling == "design" and design_ceilings(env["device"])
                    else measure_ceilings(device))
        print(f"floor     bf16 {ceilings['bf16_tflops']:.0f} TFLOP/s ({ceilings['bf16_source']}), FP8 "
              + (f"{ceilings['fp8_tflops']:.0f} TFLOP/s" if ceilings.get("fp8_tflops") else "-")
              + f" ({ceilings['fp8_source']})", flush=True)

    result = {"device": env["device"], "workload": args.workload, "versions": versions(env), "environment": env,
              "options": options, "complete": False, "rows": [],
              "floor": None if ceilings is None else {
                  **ceilings, "flops": "block linears + attention per chunk (wam_fast.cache.chunk_cost); FP8 rows: "
                                       "linears at the FP8 rate, attention at bf16"}}
    rows = result["rows"]

    def record(row: dict) -> None:
        rows.append(row)
        print(f"  {row['name']}: {row['latency_ms']:.2f} ms", flush=True)
        add_speedups(rows)
        if args.json:  # after every row: a run cut short (a time limit) keeps what it measured
            write_json(args.json, result)

    torch.manual_seed(args.seed)
    teacher = build_model(cfg, device, DTYPES[args.dtype])
    inputs = make_inputs(cfg, args.batch, device, DTYPES[args.dtype], args.seed)
    for v in chosen:
        if not v.student:
            record(measure(v, teacher, inputs, cfg, args, device, ceilings))
    groups = [[v for v in chosen if v.student and v.fp8 == fp8] for fp8 in (False, True)]
    groups = [g for g in groups if g]
    for i, group in enumerate(groups):
        # one student per precision, holding the teacher's tensors (no copy); wam_fast.compile of the
        # group's first policy compiles it, the others reuse it. Before the last group the teacher is
        # dropped, so FP8 quantization (in place) frees the bf16 linears it replaces.
        student = shortcut_student(teacher, args.steps, args.seed)
        if i == len(groups) - 1:
            del teacher
        for v in group:
            record(measure(v, student, inputs, cfg, args, device, ceilings))
            if on_gpu:
                torch.cuda.empty_cache()  # the row's policy (graphs, cache) is gone; keep peaks per row honest
        del student

    print()
    print(format_table(args.workload, rows))
    if not on_gpu:
        print("(CPU: perf_counter medians; peak mem is the process's max RSS so far, not per row)")
    paper = next((v for v in every if v.name == "paper-baseline"))
    guided_rows = 2
    costs = accounting(paper.steps, guided_rows * args.batch)
    print(f"\nper action chunk of the paper baseline's teacher, {paper.steps} steps x {guided_rows * args.batch} rows "
          f"(batch {args.batch}, cond + uncond), no history; block linears + attention (arithmetic from the configs):")
    print(format_accounting(costs))
    weights = weight_accounting()
    print(f"\nW1 weights (meta-device arithmetic): bf16 {weights['bf16'] / 1e9:.2f} GB, FP8 backbone linears "
          f"(quantize_fp8 default) {weights['fp8'] / 1e9:.2f} GB, FP8 with the AdaLN projections too "
          f"{weights['fp8_with_adaln'] / 1e9:.2f} GB")
    result.update(accounting=costs, weights_w1=weights, gpu_telemetry=gpu_telemetry(device), complete=True)
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    emit_chart(result, chart_path(args))
    return result


def write_json(path: str, result: dict) -> None:
    """Write ``result`` to ``path`` atomically (a reader never sees half a file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
