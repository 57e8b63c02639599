"""Triton kernel of ``adaln_modulate``: LayerNorm + per-segment AdaLN modulation in one pass.

One program handles ``ROWS`` token rows of one sample times the whole hidden dim (``BLOCK_D`` = next
power of two of D, masked), so a row is read once and its statistics (fp32, two-pass from registers)
never leave the chip. A token's modulation set comes from an int32 token -> set map of length N
(built once per layout by the caller). Optionally the fp32 modulated row is quantized in the kernel
to FP8 e4m3 with a per-row scale (``functional.quantize_rowwise`` semantics).

``modulate_rows`` is the shared tail (statistics, affine, modulation, store / quantize); the
``gated_residual_adaln`` kernel calls it too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_E4M3_MAX = 448.0
FP8_MIN_SCALE = 1e-12


@triton.jit
def round_to_e4m3_grid(q):
    """Round fp32 values in [-448, 448] to the nearest e4m3 value (ties to even), staying in fp32.

    Used only under TRITON_INTERPRET=1: the interpreter's fp32 -> float8e4nv cast rounds half-up on
    one guard bit, loses the mantissa carry at odd exponents (1.97 -> 1.0) and flushes values below
    2**-9 to zero. After this rounding the value is exactly representable, so that cast is exact.
    Adding then subtracting 2**(e + 20) (e = the value's binade, at least -6, e4m3's smallest
    normal binade) leaves 3 mantissa bits (2**-9 steps among subnormals) with fp32's
    round-to-nearest-even.
    """
    a = tl.abs(q)
    bits = q.to(tl.int32, bitcast=True)
    biased_exp = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    magic = ((tl.maximum(biased_exp, 127 - 6) + 20) << 23).to(tl.float32, bitcast=True)
    r = (a + magic) - magic
    sign = (bits >> 31) << 31  # the sign bit alone (keeps -0.0)
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def modulate_rows(v, pid_b, rows, cols, row_mask, col_mask, sets,
                   shift_ptr, scale_ptr, w_ptr, b_ptr, y_ptr, ys_ptr,
                   stride_sh_b, stride_sh_s, stride_sc_b, stride_sc_s,
                   N, D, eps,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FP8: tl.constexpr,
                   EXACT_FP8_ROUNDING: tl.constexpr):
    """v: (ROWS, BLOCK_D) fp32 rows (0 where masked) of sample pid_b -> modulated rows written to y
    (contiguous (B, N, D)), or their FP8 e4m3 codes plus per-row scales to ys (B, N)."""
    mask = row_mask[:, None] & col_mask[None, :]
    mean = tl.sum(v, axis=1) / D
    centered = tl.where(mask, v - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    h = centered * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        h = h * w[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        h = h + bias[None, :]
    b64 = pid_b.to(tl.int64)
    sets64 = sets.to(tl.int64)
    sh_off = b64 * stride_sh_b + sets64 * stride_sh_s
    sc_off = b64 * stride_sc_b + sets64 * stride_sc_s
    shift = tl.load(shift_ptr + sh_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + sc_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = h * (1.0 + scale) + shift
    out_rows = b64 * N + rows.to(tl.int64)
    out_ptrs = y_ptr + (out_rows * D)[:, None] + cols[None, :]
    if FP8:
        y = tl.where(mask, y, 0.0)
        amax = tl.max(tl.abs(y), axis=1)
        row_scale = tl.maximum(amax / 448.0, 1e-12)
        q = y / row_scale[:, None]
        q = tl.minimum(tl.maximum(q, -448.0), 448.0)
        if EXACT_FP8_ROUNDING:
            q = round_to_e4m3_grid(q)
        tl.store(out_ptrs, q.to(tl.float8e4nv), mask=mask)
        tl.store(ys_ptr + out_rows, row_scale, mask=row_mask)
    else:
        tl.store(out_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_modulate_kernel(x_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr, sets_ptr, y_ptr, ys_ptr,
                           stride_x_b, stride_x_n, stride_sh_b, stride_sh_s, stride_sc_b, stride_sc_s,
                           N, D, eps,
                           ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FP8: tl.constexpr,
                           EXACT_FP8_ROUNDING: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_n * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    x_off = pid_b.to(tl.int64) * stride_x_b + rows.to(tl.int64) * stride_x_n
    v = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sets = tl.load(sets_ptr + rows, mask=row_mask, other=0)
    modulate_rows(v, pid_b, rows, cols, row_mask, col_mask, sets,
                   shift_ptr, scale_ptr, w_ptr, b_ptr, y_ptr, ys_ptr,
                   stride_sh_b, stride_sh_s, stride_sc_b, stride_sc_s, N, D, eps,
                   HAS_WEIGHT, HAS_BIAS, FP8, EXACT_FP8_ROUNDING)


MAX_D = 16384  # a whole row lives in one program's registers


def launch_config(N: int, D: int, interpret: bool):
    """(ROWS, BLOCK_D, num_warps): rows per program so a program holds about 4096 elements on a GPU
    (W1: D=3072 -> one row, 8 warps), more under the interpreter, where each program costs a
    Python-level step (N=1256, D=64 -> 5 programs instead of 1256)."""
    block_d = triton.next_power_of_2(D)
    budget, max_rows = (32768, 256) if interpret else (4096, 64)
    rows = max(1, min(budget // block_d, triton.next_power_of_2(N), max_rows))
    elements = rows * block_d
    num_warps = 8 if elements >= 4096 else 4 if elements >= 1024 else 2
    return rows, block_d, num_warps


def alloc_outputs(x: torch.Tensor, fp8: bool):
    """y (B, N, D) in x's dtype, or float8_e4m3fn plus y_scale (B, N, 1) float32 (else empty)."""
    B, N, D = x.shape
    if fp8:
        y = torch.empty((B, N, D), dtype=torch.float8_e4m3fn, device=x.device)
        y_scale = torch.empty((B, N, 1), dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
        y_scale = torch.empty((0,), dtype=torch.float32, device=x.device)
    return y, y_scale


def adaln_modulate(x, shift, scale, token_sets, weight, bias, eps: float, fp8: bool, interpret: bool):
    """Launch the kernel. x (B, N, D), shift/scale (B, S, D) with unit stride on the last dim (other
    strides free); token_sets int32 (N,) contiguous; weight/bias (D,) contiguous or None.
    Returns (y, y_scale): y (B, N, D) contiguous in x's dtype (y_scale empty), or FP8 + (B, N, 1)."""
    B, N, D = x.shape
    y, y_scale = alloc_outputs(x, fp8)
    if B * N == 0:
        return y, y_scale
    rows, block_d, num_warps = launch_config(N, D, interpret)
    grid = (triton.cdiv(N, rows), B)
    _adaln_modulate_kernel[grid](
        x, shift, scale,
        weight if weight is not None else x, bias if bias is not None else x,  # unused when absent
        token_sets, y, y_scale if fp8 else y,
        x.stride(0), x.stride(1), shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
        N, D, float(eps),
        ROWS=rows, BLOCK_D=block_d, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        FP8=fp8, EXACT_FP8_ROUNDING=interpret, num_warps=num_warps)
    return y, y_scale
