"""Triton kernel of ``wam_fast.ops.attention``: flash-style forward with a segment (temporal) mask.

One program computes a BLOCK_M x BLOCK_D tile of the output for one (batch, head): it keeps q in
registers and walks the keys in BLOCK_N blocks with an online softmax (running max ``m``, running
sum ``l``, fp32 accumulator), so no Nq x Nk matrix is ever stored. Scores use exp2 with the softmax
scale 1/sqrt(hd) folded into ``log2(e) / sqrt(hd)``.

Key-block skipping (``mask="temporal"``): before its main loop a program reads the segment ids of
its queries (min and max) and of every key block (min and max, one vectorised pass) and derives
  * ``n_full``: the number of leading key blocks whose keys every query of the tile sees (no mask),
  * ``n_end``: one past the last key block holding any key that some query of the tile sees.
It then runs blocks [0, n_full) without a mask and [n_full, n_end) with the per-element mask
``k_seg <= q_seg`` (plus the Nk tail), and never touches blocks >= n_end. This happens on the device,
inside the kernel: no extra launches, no host sync, CUDA-graph safe. ``mask="full"`` gives
n_full = Nk // BLOCK_N and n_end = cdiv(Nk, BLOCK_N) (only the tail block is masked).

A query row that sees no key keeps m = -inf and l = 0; its output is written as zeros (SDPA would
give NaN). Tails: query rows past Nq are loaded as zeros and not stored; keys past Nk are masked.
head_dim is any multiple of 8 up to 256: the tile's width BLOCK_D is the next power of two (at least
16, what tl.dot takes) and the columns past head_dim are loaded as zeros and not stored (EVEN_D=False);
zero columns add nothing to q k^T or to P V. GR00T-style heads of 48 run a 64-wide tile.
q, k, v may be any strided (B, H, N, hd) views with a unit last-dim stride (e.g. the fused qkv
projection permuted); the output is a fresh (B, H, Nq, hd) tensor in q's dtype laid out as
(B, Nq, H, hd) in memory (``bnhd_empty``), so the model's ``o.transpose(1, 2).reshape(b, n, -1)``
that feeds the output projection is a view, not a copy.

Precision: fp16/bf16 operands go to the tensor cores with fp32 accumulation and P is rounded to v's
dtype before P @ V (as flash attention does); fp32 operands use ``input_precision="ieee"`` unless
``torch.backends.cuda.matmul.allow_tf32`` is set. In the Triton interpreter dot operands are cast
to fp32 first (its bf16 dot is wrong).
"""
from __future__ import annotations

import math
import os
from typing import Dict, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .gpu_arch import GpuArch, current_arch

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128, 256)  # tile widths (BLOCK_D)
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8


def block_d(head_dim: int) -> int:
    """The tile width for ``head_dim``: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Starting points for 2-byte dtypes on sm_89 and sm_90, keyed on head_dim (flash-attention-2 / Triton
# tutorial tiles: 128 x 64 tiles, 4 warps up to hd 64, 8 warps at hd 128; smaller tiles at hd 256
# so q + the k/v pipeline stages fit in shared memory). fp32 halves the tiles (see default_config).
# Shared memory (bf16, hd 64, the W1 case): q 128 x 64 x 2 = 16 KiB plus k and v 64 x 64 x 2 = 8 KiB
# each per buffered stage: well under sm_89's 99 KiB (benchmarks/aot_check.py compiles it for both).
# Waves: a program per (128-query tile, batch x head); W1 (48 heads) gives 336 programs at Nq=774 and
# 480 at 1256, but only 2 x 48 = 96 at the 256-token frame pass: under one wave on 132 or 128 SMs, so
# default_config halves BLOCK_M when the grid has fewer programs than SMs (192 programs).
# NOT yet measured on a GPU: designed, compiled ahead of time, untimed.
# hd 64 uses 8 warps on both: a 128-query tile on 4 warps needs 255+ registers per thread (AOT check:
# 24 B spilled on sm_89 with the full mask, and on sm_90a with the temporal mask the KV cache uses).
GPU_CONFIGS: Dict[int, Config] = {
    16: Config(128, 64, 4, 3),
    32: Config(128, 64, 4, 3),
    64: Config(128, 64, 8, 3),
    128: Config(128, 64, 8, 3),
    256: Config(64, 32, 8, 2),
}
# sm_89 (no wgmma): the same tiles fit (mma.sync), but a 128-wide tile pipelines 2 stages, not 3 (3 spill at
# head_dim 96: aot_check.py)
SM89_CONFIGS: Dict[int, Config] = {**GPU_CONFIGS, 128: Config(128, 32, 8, 2)}
# Interpreter: every program runs as numpy ops, so fewer, larger tiles are faster.
INTERPRETER_CONFIG = Config(128, 128, 1, 1)
# Key blocks whose segment ids one vectorised step of the skipping pre-pass reads.
SCAN_BLOCKS = 32


# Nq/Nk are never specialized: Triton would turn a length of 1 into a constexpr and break the typed
# loop-carried block counts of the pre-pass (and lengths change from call to call anyway).
@triton.jit(do_not_specialize=["Nq", "Nk"])
def _attention_fwd(
    Q, K, V, O, QSEG, KSEG, STATS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_qs, stride_ks,
    H, Nq, Nk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCAN: tl.constexpr,
    TEMPORAL: tl.constexpr, WRITE_STATS: tl.constexpr, DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM  # all true when EVEN_D (BLOCK_D == HEAD_DIM)
    m_valid = offs_m < Nq

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    n_blocks = tl.cdiv(Nk, BLOCK_N)
    if TEMPORAL:
        # segment ids of this tile's queries; rows past Nq repeat the first row (always valid)
        q_first = tl.load(QSEG + pid_m * BLOCK_M * stride_qs)
        q_seg = tl.load(QSEG + offs_m * stride_qs, mask=m_valid, other=0)
        q_seg = tl.where(m_valid, q_seg, q_first)
        q_min = tl.min(q_seg, 0)
        q_max = tl.max(q_seg, 0)
        # pre-pass: per key block min/max segment id -> n_full (leading blocks fully visible to every
        # query of the tile) and n_end (one past the last block with a key visible to some query)
        n_full = n_blocks
        n_end = n_blocks * 0
        for s in range(0, n_blocks, SCAN):
            blk = s + tl.arange(0, SCAN)
            in_range = blk < n_blocks
            idx = blk[:, None] * BLOCK_N + offs_n[None, :]
            valid = idx < Nk
            k_first = tl.load(KSEG + tl.minimum(blk, n_blocks - 1) * BLOCK_N * stride_ks)
            ks = tl.load(KSEG + idx * stride_ks, mask=valid, other=0)
            ks = tl.where(valid, ks, k_first[:, None])
            k_min = tl.min(ks, 1)
            k_max = tl.max(ks, 1)
            any_visible = (k_min <= q_max) & in_range
            n_end = tl.maximum(n_end, tl.max(tl.where(any_visible, blk + 1, 0), 0))
            all_visible = (k_max <= q_min) & ((blk + 1) * BLOCK_N <= Nk)
            n_full = tl.minimum(n_full, tl.min(tl.where(all_visible, n_blocks, blk), 0))
        n_full = tl.minimum(n_full, n_end)
    else:
        n_full = Nk // BLOCK_N
        n_end = n_blocks
    if WRITE_STATS:
        if pid_bh == 0:
            tl.store(STATS + pid_m * 2, n_full)
            tl.store(STATS + pid_m * 2 + 1, n_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # (the block step is written out in both loops, not a @jit helper: each helper call costs the
    # interpreter milliseconds of patching, and the tests run the interpreter)
    # key blocks every query of the tile sees: no mask at all
    for start_n in range(0, n_full * BLOCK_N, BLOCK_N):
        cols = start_n + offs_n
        if EVEN_D:
            k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None])
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
        else:
            k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=d_valid[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=d_valid[None, :], other=0.0)
        if DOT_FP32:
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32))
        else:
            qk = tl.dot(q, k, input_precision=FP32_PRECISION)
        qk = qk * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p = p.to(v.dtype)
        if DOT_FP32:
            acc += tl.dot(p.to(tl.float32), v.to(tl.float32))
        else:
            acc = tl.dot(p, v, acc, input_precision=FP32_PRECISION)
        m_i = m_new
    # partly visible blocks and the Nk tail: per-element mask
    for start_n in range(n_full * BLOCK_N, n_end * BLOCK_N, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < Nk
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=n_valid[None, :] & d_valid[:, None],
                    other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :],
                    other=0.0)
        keep = n_valid[None, :]
        if TEMPORAL:
            k_seg = tl.load(KSEG + cols * stride_ks, mask=n_valid, other=0)
            keep = keep & (k_seg[None, :] <= q_seg[:, None])
        if DOT_FP32:
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32))
        else:
            qk = tl.dot(q, k, input_precision=FP32_PRECISION)
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row with nothing visible yet has m_new = -inf: subtract 0 instead (p = 0, alpha = 0, no NaN)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p = p.to(v.dtype)
        if DOT_FP32:
            acc += tl.dot(p.to(tl.float32), v.to(tl.float32))
        else:
            acc = tl.dot(p, v, acc, input_precision=FP32_PRECISION)
        m_i = m_new

    # rows that saw no key: l = 0, acc = 0 -> zeros (never 0/0)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"  # kernels read the variable themselves: nothing of wam_fast


def default_config(head_dim: int, dtype: torch.dtype, nq: int, batch_heads: Optional[int] = None,
                   arch: Optional[GpuArch] = None, device: Optional[torch.device] = None,
                   interpreting: Optional[bool] = None) -> Config:
    """Tile sizes for one call: the interpreter's, or the GPU table's adjusted for fp32, short Nq and,
    given ``batch_heads`` (B x H), a grid too small to fill ``arch``'s SMs (default: the target_arch
    override, else ``device``'s GPU). ``interpreting`` defaults to TRITON_INTERPRET=1."""
    if _interpreting() if interpreting is None else interpreting:
        return INTERPRETER_CONFIG
    arch = arch or current_arch(device)
    cfg = (GPU_CONFIGS if arch.family == "sm90" else SM89_CONFIGS)[block_d(head_dim)]
    if dtype == torch.float32:  # 4-byte tiles: half the key block, fewer stages (shared memory)
        cfg = cfg._replace(block_m=min(cfg.block_m, 64), block_n=max(16, cfg.block_n // 2), num_stages=2)
    if nq <= 64:
        cfg = cfg._replace(block_m=64)
    if batch_heads is not None and cfg.block_m > 64:
        programs = triton.cdiv(nq, cfg.block_m) * batch_heads
        if programs < arch.num_sms:  # under one wave: smaller query tiles (4 warps hold 64 rows at hd <= 64;
            # a 128-wide tile keeps 8 warps: on 4 it spills, aot_check.py)
            warps = min(cfg.num_warps, 4) if block_d(head_dim) <= 64 else cfg.num_warps
            cfg = cfg._replace(block_m=64, num_warps=warps)
    return cfg


def key_block_bounds(q_segments: torch.Tensor, k_segments: torch.Tensor, block_m: int, block_n: int):
    """Reference (torch) of the kernel's pre-pass: per query tile, (n_full, n_end) as an (M, 2) int32
    tensor; n_full leading key blocks are fully visible to the tile, blocks >= n_end hold no visible key."""
    nq, nk = q_segments.numel(), k_segments.numel()
    qs, ks = q_segments.long(), k_segments.long()
    rows = []
    for m in range(0, nq, block_m):
        tile = qs[m:m + block_m]
        q_min, q_max = tile.min(), tile.max()
        n_full, n_end, prefix = 0, 0, True
        for b, n in enumerate(range(0, nk, block_n)):
            blk = ks[n:n + block_n]
            if bool(blk.min() <= q_max):
                n_end = b + 1
            prefix = prefix and bool(blk.max() <= q_min) and n + block_n <= nk
            n_full += int(prefix)
        rows.append((min(n_full, n_end), n_end))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 2)


def bnhd_empty(b: int, h: int, n: int, hd: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised (B, H, N, hd) tensor laid out (B, N, H, hd): its transpose(1, 2) is contiguous.
    Made with empty_strided (not a transposed view) so it has no ``_base`` (custom-op outputs must not)."""
    return torch.empty_strided((b, h, n, hd), (n * h * hd, hd, h * hd, 1), dtype=dtype, device=device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_segments: Optional[torch.Tensor] = None,
              k_segments: Optional[torch.Tensor] = None, temporal: bool = False,
              config: Optional[Config] = None, return_stats: bool = False):
    """Launch the kernel. q (B, H, Nq, hd), k and v (B, H, Nk, hd), same dtype and device, unit
    last-dim stride (copied otherwise); temporal: q_segments (Nq,), k_segments (Nk,) integer ids.
    Returns the (B, H, Nq, hd) output, laid out (B, Nq, H, hd) (and, with return_stats, the (M, 2)
    int32 (n_full, n_end) of every query tile). Inputs are assumed checked (wam_fast.ops.attention does)."""
    b, h, nq, hd = q.shape
    nk = k.shape[2]
    if hd % HEAD_DIM_MULTIPLE or not 0 < hd <= MAX_HEAD_DIM:
        raise ValueError(f"attention kernel: head_dim must be a multiple of {HEAD_DIM_MULTIPLE} up to "
                         f"{MAX_HEAD_DIM}, got {hd}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = bnhd_empty(b, h, nq, hd, q.dtype, q.device)
    cfg = config or default_config(hd, q.dtype, nq, batch_heads=b * h, device=q.device)
    grid_m = triton.cdiv(nq, cfg.block_m)
    stats = torch.zeros((grid_m, 2), dtype=torch.int32, device=q.device) if return_stats else None
    if out.numel() == 0 or nk == 0:
        out.zero_()
        return (out, stats) if return_stats else out
    if temporal:
        qseg, kseg = q_segments, k_segments
    else:  # unused (TEMPORAL=False); any valid pointer
        qseg = kseg = out
    interpreting = _interpreting()
    allow_tf32 = (not interpreting) and q.is_cuda and torch.backends.cuda.matmul.allow_tf32
    _attention_fwd[(grid_m, b * h)](
        q, k, v, out, qseg, kseg, stats if return_stats else out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        qseg.stride(0) if temporal else 0, kseg.stride(0) if temporal else 0,
        h, nq, nk, LOG2E / math.sqrt(hd),
        HEAD_DIM=hd, BLOCK_D=block_d(hd), EVEN_D=block_d(hd) == hd,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SCAN=SCAN_BLOCKS,
        TEMPORAL=bool(temporal), WRITE_STATS=bool(return_stats), DOT_FP32=interpreting,
        FP32_PRECISION="tf32" if allow_tf32 else "ieee",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (out, stats) if return_stats else out
