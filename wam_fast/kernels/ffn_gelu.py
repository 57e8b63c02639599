"""Triton kernel of ``wam_fast.ops.ffn_gelu``: y = gelu_tanh(x @ W^T + b), the GELU in the matmul epilogue.

One program computes a BLOCK_M x BLOCK_N tile of y (M = tokens, N = FFN width) with an fp32
accumulator, walking K in BLOCK_K steps; programs are numbered in groups of GROUP_M tile-rows so the
tiles running together share x rows and W columns in L2. W is read in its nn.Linear (N, K) layout
through strides (the (BLOCK_K, BLOCK_N) tile of W^T is K-contiguous, which Hopper's wgmma takes as is).

Tails: rows/columns past M/N are clamped for the loads (``% M``: duplicate rows, no masks in the inner
loop) and masked at the store; a K that is not a multiple of BLOCK_K is masked (``EVEN_K`` removes the
mask when it divides). Precision: fp16/bf16 operands go to the tensor cores with fp32 accumulation;
fp32 operands use ``input_precision="ieee"`` (true fp32 products, no TF32), so fp32 results match an
fp32 reference to ~1e-6. In the Triton interpreter operands are cast to fp32 first (its bf16 dot is
wrong) and bf16 outputs are rounded to nearest even by hand (its fp32 -> bf16 cast truncates). The epilogue adds the bias and computes the GELU in fp32 with an overflow-free tanh.
"""
from __future__ import annotations

import math
import os
from typing import Dict, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .gpu_arch import GpuArch, current_arch, pick_by_waves

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@triton.jit
def _tanh(z):
    # tanh(z) = sign(z) (1 - e^{-2|z|}) / (1 + e^{-2|z|}): the exponent is <= 0, so it never overflows
    # (exp(2z) would be inf for z > 44 and give inf/inf = NaN); abs error near 0 is ~1e-7, fine for GELU.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _gelu_tanh(v):
    inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)  # sqrt(2/pi) * (v + 0.044715 v^3)
    return 0.5 * v * (1.0 + _tanh(inner))


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _ffn_gelu_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr, ROUND_BF16: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M tile-rows are swept column by column, so neighbours reuse W in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # clamp rows/columns for the loads (their results are never stored); int64 row offsets so
    # M * stride_xm or N * stride_wn past 2^31 elements cannot wrap
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk      # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk      # (BLOCK_K, BLOCK_N) of W^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - kb * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if DOT_FP32:  # interpreter only: its bf16 dot is wrong
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # epilogue in fp32: bias, GELU-tanh, cast, masked store
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += bias[None, :]
    out = _gelu_tanh(acc)
    if ROUND_BF16:  # interpreter only: its fp32 -> bf16 cast truncates; the GPU rounds to nearest even
        bits = out.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        out_cast = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out_cast = out.to(y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptrs, out_cast, mask=mask)


# ---- configurations --------------------------------------------------------------------------------
class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


# Tables per GPU family (wam_fast/kernels/gpu_arch.py); the 16-bit tiles are listed largest first and
# pick_config takes the first whose grid keeps >= 80% of the SMs busy (gpu_arch.pick_by_waves).
# DESIGNED from shared-memory and wave arithmetic, not yet measured (benchmarks/aot_check.py checks
# that each compiles without spills). Shared memory = buffers x (BLOCK_M + BLOCK_N) x BLOCK_K x itemsize;
# Triton keeps num_stages buffers on sm_90 (wgmma), num_stages - 1 on sm_89 (cp.async).
# W1 runs this kernel for the FFN's first GEMM only (bf16, N=12288, K=3072).
# sm_90 (H100/H200, 132 SMs, 227 KiB):
#   16bit_large  128x256x64, 8 warps, 3 stages: 3 x 48 KiB = 144 KiB. W1 tiles / wave efficiency:
#                M=774 336/0.85, M=1256 480/0.91, M=1548 624/0.95, M=2512 960/0.91.
#   16bit_medium 128x128x64, 8 warps, 4 stages: 4 x 32 KiB = 128 KiB. M=512 384/0.97 (large: 192/0.73).
#   16bit_narrow 128x64x64, 4 warps, 4 stages: 4 x 24 KiB = 96 KiB. M=256 384/0.97 (large: 96/0.73).
#   16bit_small_m 64x64x128, 4 warps, 4 stages: 4 x 32 KiB = 128 KiB (M <= 64: weight streaming).
#   fp32 64x64x32, 4 warps, 3 stages: 3 x 16 KiB = 48 KiB (ieee FMA, no tensor cores).
# sm_89 (RTX 4090, 128 SMs, 99 KiB = 101,376 B): 128x256 tiles would spill their fp32 accumulator.
#   16bit_medium 128x128x64, 8 warps, 4 stages: 3 x 32 KiB = 96 KiB. M=512 384/1.0, M=774 672/0.88,
#                M=1256 960/0.94, M=1548 1248/0.97, M=2512 1920/1.0.
#   16bit_narrow 128x64x64, 4 warps, 4 stages: 3 x 24 KiB = 72 KiB. M=256 384/1.0.
#   16bit_small_m 64x64x128, 4 warps, 3 stages: 2 x 32 KiB = 64 KiB.
#   fp32 64x64x32, 4 warps, 3 stages: 2 x 16 KiB = 32 KiB.
GPU_CONFIGS: Dict[str, Dict[str, Config]] = {
    "sm90": {
        "16bit_large": Config(128, 256, 64, group_m=8, num_warps=8, num_stages=3),
        "16bit_medium": Config(128, 128, 64, group_m=8, num_warps=8, num_stages=4),
        "16bit_narrow": Config(128, 64, 64, group_m=8, num_warps=4, num_stages=4),
        "16bit_small_m": Config(64, 64, 128, group_m=8, num_warps=4, num_stages=4),
        "fp32": Config(64, 64, 32, group_m=8, num_warps=4, num_stages=3),
    },
    "sm89": {
        "16bit_medium": Config(128, 128, 64, group_m=8, num_warps=8, num_stages=4),
        "16bit_narrow": Config(128, 64, 64, group_m=8, num_warps=4, num_stages=4),
        "16bit_small_m": Config(64, 64, 128, group_m=8, num_warps=4, num_stages=3),
        "fp32": Config(64, 64, 32, group_m=8, num_warps=4, num_stages=3),
    },
}
# Interpreter: every program is a numpy step, so few programs and few K steps are fastest;
# still several tiles per axis at the test shapes, so grouping and tails run.
INTERPRETER_CONFIG = Config(64, 64, 64, group_m=4, num_warps=4, num_stages=1)


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, interpreting: bool, arch: Optional[GpuArch] = None,
                device: Optional[torch.device] = None) -> Config:
    """The config for an (M, K) x (K, N) problem on ``arch`` (default: the target_arch override, else
    ``device``'s GPU): fp32, few rows, or the largest 16-bit tile that fills the SMs (see GPU_CONFIGS)."""
    if interpreting:
        return INTERPRETER_CONFIG
    arch = arch or current_arch(device)
    table = GPU_CONFIGS[arch.family]
    if dtype == torch.float32:
        return table["fp32"]
    if M <= 64:
        return table["16bit_small_m"]
    tiles = [c for name, c in table.items() if name.startswith("16bit_")]
    return pick_by_waves(M, N, tiles, arch.num_sms)


# Opt-in GPU autotuning over the table plus neighbours (WAM_FAST_FFN_GELU_AUTOTUNE=1); never under the
# interpreter, which would time every config in numpy. Off by default: the table is deterministic and
# costs no timing pass on the first call.
AUTOTUNE_ENV = "WAM_FAST_FFN_GELU_AUTOTUNE"
_AUTOTUNE_CONFIGS = [
    Config(128, 256, 64, 8, 8, 3), Config(128, 256, 64, 8, 8, 4), Config(256, 128, 64, 8, 8, 3),
    Config(128, 128, 64, 8, 8, 4), Config(128, 128, 64, 8, 4, 4), Config(64, 256, 64, 8, 4, 4),
    Config(64, 128, 64, 8, 4, 4), Config(64, 64, 128, 8, 4, 4), Config(128, 128, 32, 8, 4, 4),
]
_autotuned = None


def _autotuned_kernel():
    global _autotuned
    if _autotuned is None:
        configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k,
                                  "GROUP_M": c.group_m}, num_warps=c.num_warps, num_stages=c.num_stages)
                   for c in _AUTOTUNE_CONFIGS]
        _autotuned = triton.autotune(configs=configs, key=["M", "N", "K", "HAS_BIAS", "IEEE"])(_ffn_gelu_kernel)
    return _autotuned


# ---- launcher ----------------------------------------------------------------------------------------
def ffn_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             config: Optional[Config] = None) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) -> (..., N) in x's dtype. x (..., K) any strides; weight (N, K);
    bias (N,) or None. ``config`` overrides the table (tests use it to run the GPU tiles interpreted)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    K = x.shape[-1]
    N = weight.shape[0]
    lead = tuple(x.shape[:-1])
    M = math.prod(lead)
    x2 = x.reshape(M, K)  # a view when x's layout allows it, else a copy
    y = torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    y2 = y.view(M, N)
    ieee = x.dtype == torch.float32
    common = dict(HAS_BIAS=bias is not None, IEEE=ieee, DOT_FP32=interpreting,
                  ROUND_BF16=interpreting and x.dtype == torch.bfloat16)
    if bias is not None:
        bias = bias.contiguous()  # read with unit stride (N elements: a copy only if it was strided)
    args = (x2, weight, bias if bias is not None else y2, y2, M, N, K,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y2.stride(0), y2.stride(1))
    if config is None and not interpreting and os.environ.get(AUTOTUNE_ENV) == "1":
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _autotuned_kernel()[grid](*args, **common)
        return y
    c = config or pick_config(M, N, K, x.dtype, interpreting, device=x.device)
    grid = (triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n),)
    _ffn_gelu_kernel[grid](*args, **common, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                           GROUP_M=c.group_m, num_warps=c.num_warps, num_stages=c.num_stages)
    return y
