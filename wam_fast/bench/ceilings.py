"""The compute floor: the dense matmul rates of this GPU (measured bf16 and FP8 GEMMs, or the published
figures of docs/design.md, Workloads) and a chunk's floor in milliseconds at those rates.

Both are square-GEMM peaks: a chunk's GEMMs are skinnier (M = its tokens, a few hundred to a few
thousand) and its attention runs at the attention kernel's rate, so "% of floor" measures against a
rate no chunk reaches; it compares rows and runs, and 100% is not a target (FLOOR_NOTE)."""
from __future__ import annotations

from typing import Optional

import torch

from wam_fast.ops.fp8_linear import FAST_ACCUM
from wam_fast.bench.timing import percentile, time_calls

FLOOR_NOTE = ("% of floor = the chunk's block FLOPs at square 8192^3 GEMM rates (bf16, FP8 with fast accumulation) "
              "over its median: skinny GEMMs and attention run below those peaks, so 100% is out of reach")

# docs/design.md, Workloads: dense matmul rates (TFLOP/s) used when they cannot be measured here.
PUBLISHED_CEILINGS = {"H100": {"bf16": 800.0, "fp8": 1500.0}, "H200": {"bf16": 800.0, "fp8": 1500.0},
                      "4090": {"bf16": 165.0, "fp8": 330.0}}


def design_ceilings(device_name: str) -> Optional[dict]:
    for key, rates in PUBLISHED_CEILINGS.items():
        if key in device_name:
            return dict(rates)
    return None


def measure_ceilings(device: torch.device, n: int = 8192) -> dict:
    """Dense matmul TFLOP/s on this GPU: bf16 (a @ a) and FP8 e4m3 (torch._scaled_mm, cuBLASLt, with
    the fast accumulation the FP8 linears use: ``wam_fast.ops.fp8_linear.FAST_ACCUM``), n x n x n, CUDA
    events; each falls back to the docs/design.md figure (source says which) or None."""
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
        out["fp8_tflops"] = rate(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                                          use_fast_accum=FAST_ACCUM))
        accum = "fast accumulation" if FAST_ACCUM else "fp32-promoted accumulation"
        out["fp8_source"] = f"measured ({n}^3 torch._scaled_mm e4m3, {accum} as the FP8 linears)"
    except (RuntimeError, AttributeError, TypeError) as exc:
        out["fp8_tflops"] = design.get("fp8")
        out["fp8_source"] = (f"docs/design.md ceiling ({type(exc).__name__}: {exc})".splitlines()[0]
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
