"""Triton kernel of ``wam_fast.ops.fp8_linear``: y = (x_fp8 @ W_fp8^T) * x_scale * w_scale + bias.

x_fp8 (M, K) float8_e4m3fn with one scale per row (dynamic per-token quantization, e.g. the FP8
output of ``gated_residual_adaln``) or one for the whole tensor (static, stride 0); W_fp8 (N, K)
float8_e4m3fn in nn.Linear layout with one scale per output channel. One program computes a
BLOCK_M x BLOCK_N tile with an fp32 accumulator over K (FP8 tensor cores on sm_89+); the epilogue
multiplies the row and column scales, adds the bias in fp32 and casts to the output dtype, so the
activations are never dequantized in memory.

W is read through strides as (BLOCK_K, BLOCK_N) tiles of W^T, which are K-contiguous: the K-major
operand layout FP8 wgmma wants on Hopper. Tails as in ``wam_fast/kernels/ffn_gelu.py``: rows/columns past M/N
are clamped for the loads and masked at the store, a K that is not a multiple of BLOCK_K is masked,
so any M, N, K works (no padding to 16). On sm_90 Triton's FP8 dot keeps the tensor cores' fast
(reduced-precision) accumulation across K, like torch._scaled_mm(use_fast_accum=True): ~1e-4..1e-3
relative, far below e4m3 rounding (``max_num_imprecise_acc`` would promote partial sums). Interpreter: its FP8 ``tl.dot`` is exact with an fp32
accumulator (checked against float64 products, so no upcast), but its fp32 -> bf16 cast truncates,
so bf16 outputs are rounded to nearest even by hand.
"""
from __future__ import annotations

import math
import os
from typing import Dict, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .gpu_arch import GpuArch, current_arch, pick_by_waves


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _fp8_linear_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_xs, stride_wn, stride_wk, stride_ws, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, ROUND_BF16: tl.constexpr, EVEN_K: tl.constexpr,
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
    # clamped rows/columns for the loads (never stored); int64 so large M * stride cannot wrap
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
        acc = tl.dot(a, b, acc)  # e4m3 x e4m3 -> fp32
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # epilogue in fp32: dequantize (row scale x column scale), bias, cast, masked store
    x_scale = tl.load(xs_ptr + rows * stride_xs)  # stride 0: one scale for the tensor
    w_scale = tl.load(ws_ptr + cols * stride_ws)
    out = acc * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        out += bias[None, :]
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
    num_stages: int = 4


# Tables per GPU family (wam_fast/kernels/gpu_arch.py), largest tile first; pick_config takes the first whose
# grid keeps >= 80% of the SMs busy (gpu_arch.pick_by_waves). DESIGNED from shared-memory and wave
# arithmetic, not yet measured (benchmarks/aot_check.py checks that each compiles without spills).
# Shared memory = buffers x (BLOCK_M + BLOCK_N) x BLOCK_K bytes (1-byte operands); Triton keeps
# num_stages buffers on sm_90 (wgmma), num_stages - 1 on sm_89 (cp.async).
# sm_90 (H100/H200, 132 SMs, 227 KiB): FP8 wgmma takes K in steps of 32, so BLOCK_K 128 is 4 wgmma/load.
#   large  128x256x128, 4 stages: 4 x 48 KiB = 192 KiB. W1 (tiles / wave efficiency on 132 SMs):
#          M=1256: qkv 360/0.91, out and ffn-out 120/0.91, ffn-in 480/0.91; M=2512: 720, 240, 960 (0.91);
#          M=774 qkv 252/0.95, ffn-in 336/0.85; M=1548 qkv 468/0.89, ffn-in 624/0.95.
#   medium 128x128x128, 4 stages: 128 KiB. M=512 ffn-in 384/0.97.
#   narrow 128x64x128, 4 warps, 4 stages: 96 KiB. The N=3072 GEMMs (out, ffn-out): M=774 336/0.85 (large
#          gave 84/0.64), M=1548 624/0.95, M=256 96/0.73 (best of the table; large gave 24/0.18);
#          M=512 qkv 576/0.87.
#   small_m 64x64x128, 4 warps, 4 stages: 64 KiB. M <= 64 (weight streaming), and M=256 qkv 576/0.87,
#          M=512 out/ffn-out 384/0.97.
# sm_89 (RTX 4090, 128 SMs, 99 KiB = 101,376 B): 128x256x128 needs 2 x 48 KiB even at 3 stages and its
#   fp32 accumulator spills (255 registers, 8 warps), so the largest tile is 128x128.
#   medium 128x128x128, 8 warps, 4 stages: 3 x 32 KiB = 96 KiB. M=1256 (all 0.94), M=2512 (0.94/1.0),
#          M=774 qkv 504/0.98, ffn-in 672/0.88, M=1548 qkv/ffn-in 0.91/0.97, M=512 ffn-in 384/1.0.
#   narrow 128x64x128, 4 warps, 4 stages: 3 x 24 KiB = 72 KiB. N=3072 at M=774 336/0.88, M=1548
#          624/0.97, M=256 96/0.75; M=512 qkv 576/0.90.
#   small_m 64x64x128, 4 warps, 4 stages: 3 x 16 KiB = 48 KiB. M=256 qkv 576/0.90, M=512 N=3072 384/1.0.
GPU_CONFIGS: Dict[str, Dict[str, Config]] = {
    "sm90": {
        "large": Config(128, 256, 128, group_m=8, num_warps=8, num_stages=4),
        "medium": Config(128, 128, 128, group_m=8, num_warps=8, num_stages=4),
        "narrow": Config(128, 64, 128, group_m=8, num_warps=4, num_stages=4),
        "small_m": Config(64, 64, 128, group_m=8, num_warps=4, num_stages=4),
    },
    "sm89": {
        "medium": Config(128, 128, 128, group_m=8, num_warps=8, num_stages=4),
        "narrow": Config(128, 64, 128, group_m=8, num_warps=4, num_stages=4),
        "small_m": Config(64, 64, 128, group_m=8, num_warps=4, num_stages=4),
    },
}
# Interpreter: few programs and few K steps are fastest; still several tiles per axis at test shapes.
INTERPRETER_CONFIG = Config(32, 32, 32, group_m=2, num_warps=4, num_stages=1)


def pick_config(M: int, N: int, K: int, interpreting: bool, arch: Optional[GpuArch] = None,
                device: Optional[torch.device] = None) -> Config:
    """The config for an (M, K) x (K, N) problem on ``arch`` (default: the target_arch override, else
    ``device``'s GPU): the table of its family, largest tile that fills the SMs (see GPU_CONFIGS)."""
    if interpreting:
        return INTERPRETER_CONFIG
    arch = arch or current_arch(device)
    table = GPU_CONFIGS[arch.family]
    if M <= 64:
        return table["small_m"]
    return pick_by_waves(M, N, list(table.values()), arch.num_sms)


# Opt-in GPU autotuning over the table plus neighbours (WAM_FAST_FP8_LINEAR_AUTOTUNE=1); never under
# the interpreter. Off by default: the table is deterministic and costs no timing pass.
AUTOTUNE_ENV = "WAM_FAST_FP8_LINEAR_AUTOTUNE"
_AUTOTUNE_CONFIGS = [
    Config(128, 256, 128, 8, 8, 4), Config(128, 256, 128, 8, 8, 3), Config(256, 128, 128, 8, 8, 3),
    Config(128, 128, 128, 8, 8, 4), Config(128, 128, 128, 8, 4, 4), Config(128, 256, 64, 8, 8, 4),
    Config(64, 256, 128, 8, 4, 4), Config(64, 128, 128, 8, 4, 4), Config(64, 64, 128, 8, 4, 4),
]
_autotuned = None


def _autotuned_kernel():
    global _autotuned
    if _autotuned is None:
        configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k,
                                  "GROUP_M": c.group_m}, num_warps=c.num_warps, num_stages=c.num_stages)
                   for c in _AUTOTUNE_CONFIGS]
        _autotuned = triton.autotune(configs=configs, key=["M", "N", "K", "HAS_BIAS"])(_fp8_linear_kernel)
    return _autotuned


# ---- launcher ----------------------------------------------------------------------------------------
def fp8_linear(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor], out_dtype: torch.dtype, config: Optional[Config] = None) -> torch.Tensor:
    """x (..., K) float8_e4m3fn any strides; x_scale float32 with one element per row of x (..., 1) or
    one in all; weight (N, K) float8_e4m3fn; weight_scale float32 (N,) or (N, 1); bias (N,) or None.
    Returns (..., N) in out_dtype. ``config`` overrides the table (tests run the GPU tiles interpreted)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    K = x.shape[-1]
    N = weight.shape[0]
    lead = tuple(x.shape[:-1])
    M = math.prod(lead)
    x2 = x.reshape(M, K)  # a view when x's layout allows it, else a copy
    y = torch.empty(*lead, N, dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    y2 = y.view(M, N)
    xs = x_scale.reshape(-1)  # contiguous in practice (small): a view
    stride_xs = 0 if xs.numel() == 1 else xs.stride(0)
    ws = weight_scale.reshape(-1)
    if bias is not None:
        bias = bias.contiguous()  # read with unit stride
    args = (x2, xs, weight, ws, bias if bias is not None else ws, y2, M, N, K,
            x2.stride(0), x2.stride(1), stride_xs, weight.stride(0), weight.stride(1), ws.stride(0),
            y2.stride(0), y2.stride(1))
    common = dict(HAS_BIAS=bias is not None, ROUND_BF16=interpreting and out_dtype == torch.bfloat16)
    if config is None and not interpreting and os.environ.get(AUTOTUNE_ENV) == "1":
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _autotuned_kernel()[grid](*args, **common)
        return y
    c = config or pick_config(M, N, K, interpreting, device=x.device)
    grid = (triton.cdiv(M, c.block_m) * triton.cdiv(N, c.block_n),)
    _fp8_linear_kernel[grid](*args, **common, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                             GROUP_M=c.group_m, num_warps=c.num_warps, num_stages=c.num_stages)
    return y
