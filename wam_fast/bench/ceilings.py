"""The compute floor: the dense matmul rates of this GPU (measured bf16 and FP8 GEMMs, or the published
figures of docs/design.md, Workloads) and a chunk's floor in milliseconds at those rates; and the
ceiling table of the roofline projection (``DEVICE_CEILINGS``, docs/design.md, Projection).

The floor's rates are square-GEMM peaks: a chunk's GEMMs are skinnier (M = its tokens, a few hundred to
a few thousand) and its attention runs at the attention kernel's rate, so "% of floor" measures against
a rate no chunk reaches; it compares rows and runs, and 100% is not a target (FLOOR_NOTE)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from wam_fast.ops.fp8_linear import FAST_ACCUM
from wam_fast.bench.timing import percentile, time_calls

FLOOR_NOTE = ("% of floor = the chunk's block FLOPs at square 8192^3 GEMM rates (bf16, FP8 with fast accumulation) "
              "over its median: skinny GEMMs and attention run below those peaks, so 100% is out of reach")

# docs/design.md, Workloads: dense matmul rates (TFLOP/s) used when they cannot be measured here.
PUBLISHED_CEILINGS = {"H100": {"bf16": 800.0, "fp8": 1500.0}, "H200": {"bf16": 800.0, "fp8": 1500.0},
                      "4090": {"bf16": 165.0, "fp8": 330.0}}



@dataclass(frozen=True)
class DeviceCeiling:
    """One GPU of the projection: vendor peaks (dense, no sparsity) and the fraction of each that a
    well-tuned kernel reaches (planning assumptions until a measured row replaces them)."""

    label: str
    bf16_tflops: float  # dense BF16 tensor cores, FP32 accumulate
    fp8_tflops: float  # dense FP8 e4m3 tensor cores, FP32 accumulate
    bandwidth_gbs: float  # HBM / GDDR
    sms: int  # streaming multiprocessors: the wave size of tile quantization
    gemm_fraction: float  # of bf16_tflops a large GEMM reaches
    fp8_fraction: float  # of fp8_tflops
    attention_fraction: float  # of bf16_tflops a flash-style attention kernel reaches at head_dim 64
    bandwidth_fraction: float  # of bandwidth_gbs a streaming (elementwise / norm) kernel reaches
    source: str

    def rate(self, unit: str) -> float:
        """Achievable FLOP/s of a compute unit: "bf16" GEMM, "fp8" GEMM or "attention"."""
        if unit == "fp8":
            return self.fp8_tflops * self.fp8_fraction * 1e12
        if unit == "bf16":
            return self.bf16_tflops * self.gemm_fraction * 1e12
        if unit == "attention":
            return self.bf16_tflops * self.attention_fraction * 1e12
        raise ValueError(f"compute unit must be 'bf16', 'fp8' or 'attention', got {unit!r}")


# Peaks: the vendor documents named in `source` (sparsity figures halved to dense). Fractions: Hopper
# 0.80 bf16 / 0.75 FP8 give the ~800 / ~1500 TFLOP/s that large cuBLAS GEMMs reach on an H100 SXM and
# that docs/design.md, Workloads plans with; attention at head_dim 64 reaches less (flash-style kernels
# report ~40-50% of peak on Hopper); streaming kernels ~80% of HBM. Ada parts run GEMMs closer to their
# (lower) peak; the L40S is power-capped at 350 W, hence its lower fractions. All fractions are
# assumptions, to be replaced by measured rows (python -m wam_fast.bench on the GPU).
DEVICE_CEILINGS = {
    "h100": DeviceCeiling("NVIDIA H100 SXM5 80GB", 989.4, 1978.9, 3350.0, 132, 0.80, 0.75, 0.45, 0.80,
                          "NVIDIA H100 Tensor Core GPU datasheet (SXM5: BF16 1979 / FP8 3958 TFLOPS with "
                          "sparsity, 3.35 TB/s HBM3); H100 architecture whitepaper (132 SMs)"),
    "h200": DeviceCeiling("NVIDIA H200 SXM 141GB", 989.4, 1978.9, 4800.0, 132, 0.80, 0.75, 0.45, 0.80,
                          "NVIDIA H200 Tensor Core GPU datasheet (SXM: BF16 1979 / FP8 3958 TFLOPS with "
                          "sparsity, 4.8 TB/s HBM3e; the H100's GH100 compute, 132 SMs)"),
    "rtx4090": DeviceCeiling("NVIDIA GeForce RTX 4090", 165.2, 330.3, 1008.0, 128, 0.85, 0.85, 0.50, 0.85,
                             "NVIDIA Ada GPU Architecture whitepaper, RTX 4090 column (BF16 165.2 / FP8 330.3 "
                             "TFLOPS dense with FP32 accumulate, 1008 GB/s GDDR6X, 128 SMs)"),
    "l40s": DeviceCeiling("NVIDIA L40S", 362.05, 733.0, 864.0, 142, 0.70, 0.70, 0.40, 0.85,
                          "NVIDIA L40S datasheet (BF16 362.05 / FP8 733 TFLOPS dense, 864 GB/s GDDR6, "
                          "142 SMs, 350 W)"),
}


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
