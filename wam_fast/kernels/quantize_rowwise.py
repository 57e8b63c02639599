"""Triton kernel of ``quantize_rowwise``: per-row symmetric FP8 e4m3 codes + float32 scales, optionally
of ``gelu_tanh(x)`` (the FFN-out input), in one launch.

One program handles ``ROWS`` rows and loops over the row in ``BLOCK_K`` chunks, twice: pass 1 takes
the row's amax of |y| (y = x, or gelu_tanh(x) in fp32), pass 2 re-reads the row (from cache),
recomputes y and writes ``clamp(y / scale, +-448)`` as e4m3, with ``scale = max(amax / 448, 1e-12)``
(``reference.quantize_rowwise``). Rows may be strided: the input is viewed as (B, N, K) with any
batch/row strides and a unit last-dim stride; the outputs are contiguous.

Non-finite values follow the reference: a row holding a NaN gets a NaN scale and NaN codes; a row
holding +-inf (no NaN) gets scale inf, NaN codes where it is +-inf and zero codes elsewhere. tl.max
and tl.minimum/maximum need not propagate NaN, so the kernel carries a row's NaN explicitly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adaln_modulate import round_to_e4m3_grid

MAX_BLOCK_K = 4096  # columns per loop step; longer rows (K = 12288 for the FFN-out input) loop


@triton.jit
def gelu_tanh(v):
    """0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))) in fp32, with an overflow-free tanh."""
    inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
    e = tl.exp(-2.0 * tl.abs(inner))  # exponent <= 0: never overflows
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(inner < 0, -t, t)
    return 0.5 * v * (1.0 + t)


@triton.jit
def _load_y(x_ptr, in_off, cols, row_mask, K, GELU: tl.constexpr):
    mask = row_mask[:, None] & (cols < K)[None, :]
    y = tl.load(x_ptr + in_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GELU:
        y = gelu_tanh(y)  # gelu(0) = 0: masked columns stay out of the amax
    return y, mask


@triton.jit
def _interpreter_e4m3(q):
    """The e4m3 cast under TRITON_INTERPRET=1: exact rounding (``round_to_e4m3_grid``), and NaN kept as
    the e4m3 NaN 0x7F (the interpreter's cast turns NaN into +-384; a GPU's satfinite cast keeps NaN)."""
    codes = round_to_e4m3_grid(q).to(tl.float8e4nv)
    nan = tl.full(q.shape, 0x7F, tl.uint8).to(tl.float8e4nv, bitcast=True)
    return tl.where(q == q, codes, nan)


@triton.jit
def _quantize_rowwise_kernel(x_ptr, q_ptr, s_ptr, M, N, K, stride_b, stride_n,
                             ROWS: tl.constexpr, BLOCK_K: tl.constexpr, GELU: tl.constexpr,
                             EXACT_FP8_ROUNDING: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    in_off = (rows64 // N) * stride_b + (rows64 % N) * stride_n
    out_off = rows64 * K
    cols = tl.arange(0, BLOCK_K)

    # pass 1: amax of |y| per row, and a NaN-or-zero "poison" that is NaN when the row holds a NaN
    amax = tl.zeros([ROWS], dtype=tl.float32)
    poison = tl.zeros([ROWS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        y, _ = _load_y(x_ptr, in_off, k0 + cols, row_mask, K, GELU)
        amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
        poison += tl.sum(tl.where(y == y, 0.0, y), axis=1)
    scale = tl.maximum(amax / 448.0, 1e-12) + poison

    # pass 2: codes = clamp(y / scale, +-448) in e4m3
    for k0 in range(0, K, BLOCK_K):
        y, mask = _load_y(x_ptr, in_off, k0 + cols, row_mask, K, GELU)
        q = y / scale[:, None]
        q = tl.where(q == q, tl.minimum(tl.maximum(q, -448.0), 448.0), q)  # the clamp keeps NaN
        if EXACT_FP8_ROUNDING:
            codes = _interpreter_e4m3(q)
        else:
            codes = q.to(tl.float8e4nv)
        tl.store(q_ptr + out_off[:, None] + (k0 + cols)[None, :], codes, mask=mask)
    tl.store(s_ptr + rows64, scale, mask=row_mask)


def launch_config(M: int, K: int, interpret: bool):
    """(ROWS, BLOCK_K, num_warps): about 4096 elements per program step on a GPU (K = 3072: one row,
    K = 12288: one row in three steps; K = 64: 64 rows), more under the interpreter, where each
    program costs a Python-level step."""
    block_k = min(triton.next_power_of_2(K), MAX_BLOCK_K)
    budget, max_rows = (32768, 256) if interpret else (4096, 64)
    rows = max(1, min(budget // block_k, triton.next_power_of_2(M), max_rows))
    elements = rows * block_k
    num_warps = 8 if elements >= 4096 else 4 if elements >= 1024 else 2
    return rows, block_k, num_warps


def quantize_rowwise(x: torch.Tensor, gelu: bool, interpret: bool):
    """Launch the kernel. x (..., K), K >= 1, unit last-dim stride (other strides free: leading dims
    that cannot be merged into one (B, N) pair are copied by reshape). Returns (codes float8_e4m3fn
    (..., K), scales float32 (..., 1)), both contiguous."""
    K = x.shape[-1]
    codes = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    M = codes.numel() // K
    if M == 0:
        return codes, scales
    x3 = x.reshape(-1, x.shape[-2] if x.dim() > 1 else 1, K)  # a view, except for unmergeable leading dims
    rows, block_k, num_warps = launch_config(M, K, interpret)
    _quantize_rowwise_kernel[(triton.cdiv(M, rows),)](
        x3, codes, scales, M, x3.shape[1], K, x3.stride(0), x3.stride(1),
        ROWS=rows, BLOCK_K=block_k, GELU=gelu, EXACT_FP8_ROUNDING=interpret, num_warps=num_warps)
    return codes, scales
