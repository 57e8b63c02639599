"""Triton kernel of ``wam_fast.ops.qk_norm_rope``: LayerNorm over head_dim on q and k, then
interleaved RoPE on the token slice [rope_start, rope_end), in one pass over q and k.

One program takes a block of BLOCK_N tokens of HEAD_GROUP heads (dividing H) of one sample and does
q and k of each head: the cos/sin tile of those tokens is loaded once and reused for 2 * HEAD_GROUP tiles.
q and k may be strided views (e.g. of the fused qkv projection, (B, N, 3, H, hd) permuted); q_out is
contiguous (B, H, N, hd), k_out contiguous or a caller's strided view (a KV-cache slice). With
HAS_V the same programs also copy the tile of v into v_out (the cache write of the values), so
normalising, rotating and both cache writes are one launch. Tokens outside the RoPE slice get
cos = 1, sin = 0 (their table loads are masked off), so one branch-free formula covers every token.
All math is float32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gpu_arch import current_arch, overridden


@triton.jit
def _norm_rope_tile(x_ptr, out_ptr, offs_in, offs_out, mask, weight, bias, cos, sin, eps,
                    HD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    x = tl.load(x_ptr + offs_in, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / HD
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / HD
    y = xc * tl.rsqrt(var + eps)[:, None] * weight[None, :] + bias[None, :]
    # rotate(y)[2i] = -y[2i+1], rotate(y)[2i+1] = y[2i]: a register shuffle inside each pair
    even, odd = tl.split(tl.reshape(y, (BLOCK_N, HD_PAD // 2, 2)))
    rotated = tl.reshape(tl.join(-odd, even), (BLOCK_N, HD_PAD))
    out = y * cos + rotated * sin
    tl.store(out_ptr + offs_out, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, v_ptr, v_out_ptr,
    qw_ptr, qb_ptr, kw_ptr, kb_ptr, cos_ptr, sin_ptr,
    H, N, rope_start, rope_end, eps,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
    sko_b, sko_h, sko_n, sv_b, sv_h, sv_n, sv_d, svo_b, svo_h, svo_n,
    HD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_GROUP: tl.constexpr,
    HAS_QW: tl.constexpr, HAS_QB: tl.constexpr, HAS_KW: tl.constexpr, HAS_KB: tl.constexpr,
    HAS_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n0 = pid_n * BLOCK_N
    n0_64 = n0.to(tl.int64)

    rows = tl.arange(0, BLOCK_N)                 # token within the block
    cols = tl.arange(0, HD_PAD)
    tok = n0 + rows
    row_ok = tok < N
    col_ok = cols < HD

    # LayerNorm affine parameters: loaded once per program (identity when absent)
    if HAS_QW:
        qw = tl.load(qw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        qw = tl.full((HD_PAD,), 1.0, tl.float32)
    if HAS_QB:
        qb = tl.load(qb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        qb = tl.zeros((HD_PAD,), tl.float32)
    if HAS_KW:
        kw = tl.load(kw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        kw = tl.full((HD_PAD,), 1.0, tl.float32)
    if HAS_KB:
        kb = tl.load(kb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        kb = tl.zeros((HD_PAD,), tl.float32)

    # RoPE tables (rope_end - rope_start, HD) float32 contiguous; identity outside the slice
    in_rope = row_ok & (tok >= rope_start) & (tok < rope_end)
    rope_mask = in_rope[:, None] & col_ok[None, :]
    table = (tok - rope_start)[:, None] * HD + cols[None, :]
    cos = tl.load(cos_ptr + table, mask=rope_mask, other=1.0)
    sin = tl.load(sin_ptr + table, mask=rope_mask, other=0.0)

    # tile offsets (small, int32) relative to int64 per-(b, h, block) bases; outputs have unit
    # last-dim stride (q_out contiguous, k_out / v_out checked by the caller)
    offs_q = rows[:, None] * sq_n + cols[None, :] * sq_d
    offs_k = rows[:, None] * sk_n + cols[None, :] * sk_d
    offs_q_out = rows[:, None] * HD + cols[None, :]
    offs_k_out = rows[:, None] * sko_n + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]

    for i in tl.static_range(HEAD_GROUP):
        h = (pid_h * HEAD_GROUP + i).to(tl.int64)
        q_base = b * sq_b + h * sq_h + n0_64 * sq_n
        k_base = b * sk_b + h * sk_h + n0_64 * sk_n
        q_out_base = ((b * H + h) * N + n0_64) * HD
        k_out_base = b * sko_b + h * sko_h + n0_64 * sko_n
        _norm_rope_tile(q_ptr + q_base, q_out_ptr + q_out_base, offs_q, offs_q_out, tile_ok, qw, qb, cos, sin,
                        eps, HD, HD_PAD, BLOCK_N)
        _norm_rope_tile(k_ptr + k_base, k_out_ptr + k_out_base, offs_k, offs_k_out, tile_ok, kw, kb, cos, sin,
                        eps, HD, HD_PAD, BLOCK_N)
        if HAS_V:  # the cache write of v: a plain copy of the same tile
            v_base = b * sv_b + h * sv_h + n0_64 * sv_n
            v_out_base = b * svo_b + h * svo_h + n0_64 * svo_n
            v_tile = tl.load(v_ptr + v_base + rows[:, None] * sv_n + cols[None, :] * sv_d, mask=tile_ok)
            tl.store(v_out_ptr + v_out_base + rows[:, None] * svo_n + cols[None, :], v_tile, mask=tile_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda" and overridden() is None:
        return 1
    return current_arch(device).num_sms  # the target_arch override (AOT check), else the device's


def launch_config(B: int, H: int, N: int, hd: int, device: torch.device) -> dict:
    """Block sizes. GPU: ~2048 elements per tile (BLOCK_N = 32 for hd 64), 4 warps, and as many heads
    per program (4, 2 or 1, dividing H) as keeps >= 4 programs per SM, so the cos/sin tile is reused
    across heads. Interpreter: big tiles (few programs is what makes it fast)."""
    hd_pad = triton.next_power_of_2(hd)
    if _interpreting():
        block_n = min(triton.next_power_of_2(N), max(1, 8192 // hd_pad))
        return {"block_n": block_n, "head_group": _largest_divisor(H, 4), "num_warps": 4}
    block_n = max(1, min(triton.next_power_of_2(N), 2048 // hd_pad))
    blocks = B * triton.cdiv(N, block_n)
    target = 4 * _num_sms(device)
    head_group = 1
    for g in (2, 4):
        if H % g == 0 and blocks * (H // g) >= target:
            head_group = g
    return {"block_n": block_n, "head_group": head_group, "num_warps": 4}


def _largest_divisor(n: int, most: int) -> int:
    return max(g for g in range(1, most + 1) if n % g == 0)


def qk_norm_rope(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start: int, rope_end: int,
                 eps: float, block_n: int = None, head_group: int = None, num_warps: int = None,
                 k_out=None, v=None, v_out=None):
    """Launch on (B, H, N, hd) q, k (any strides; same shape and dtype, checked by the caller);
    cos, sin (rope_end - rope_start, hd) float32 contiguous. Returns (q_out, k_out): q_out fresh and
    contiguous; k_out the given one (any strides, unit last-dim stride) or a fresh contiguous one.
    With v and v_out (shape of k, v any strides, v_out unit last-dim stride) v is copied into v_out
    by the same launch. Outputs must not overlap the inputs (checked by the caller)."""
    B, H, N, hd = q.shape
    if (v is None) != (v_out is None):
        raise ValueError(f"v and v_out go together, got v={'a tensor' if v is not None else None}, "
                         f"v_out={'a tensor' if v_out is not None else None}")
    for name, t in (("k_out", k_out), ("v_out", v_out)):
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} needs last-dim stride 1, got strides {tuple(t.stride())}")
    q_out = torch.empty((B, H, N, hd), dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty((B, H, N, hd), dtype=k.dtype, device=k.device)
    if q_out.numel() == 0:
        return q_out, k_out
    config = launch_config(B, H, N, hd, q.device)
    block_n = block_n or config["block_n"]
    head_group = head_group or config["head_group"]
    num_warps = num_warps or config["num_warps"]
    if rope_end <= rope_start or cos.numel() == 0:  # empty slice: the kernel never reads the tables
        rope_start = rope_end = 0
        cos = sin = q
    if H % head_group:
        raise ValueError(f"head_group must divide the number of heads {H}, got {head_group}")
    if block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    grid = (triton.cdiv(N, block_n), H // head_group, B)
    dummy = q  # never read: the HAS_* flags are False for it
    has_v = v is not None
    v_strides = tuple(v.stride()) + tuple(v_out.stride()[:3]) if has_v else (0,) * 7
    _qk_norm_rope_kernel[grid](
        q, k, q_out, k_out, v if has_v else dummy, v_out if has_v else dummy,
        q_weight if q_weight is not None else dummy, q_bias if q_bias is not None else dummy,
        k_weight if k_weight is not None else dummy, k_bias if k_bias is not None else dummy,
        cos, sin,
        H, N, rope_start, rope_end, float(eps),
        *q.stride(), *k.stride(), *k_out.stride()[:3], *v_strides,
        HD=hd, HD_PAD=triton.next_power_of_2(hd), BLOCK_N=block_n, HEAD_GROUP=head_group,
        HAS_QW=q_weight is not None, HAS_QB=q_bias is not None,
        HAS_KW=k_weight is not None, HAS_KB=k_bias is not None, HAS_V=has_v,
        num_warps=num_warps,
    )
    return q_out, k_out
