"""Plain-PyTorch forms of the block's small ops, with the semantics of docs/design.md, Ops.

The reference model calls these; fused kernels are tested against them (in float32).
`segments` is a tuple of consecutive segment lengths summing to N and `mod_index[s]` the
modulation set of segment s; per-set tensors are (B, S, D) and broadcast over their tokens.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def expand_segments(values: torch.Tensor, segments: Sequence[int], mod_index: Sequence[int]) -> torch.Tensor:
    """(B, S, D) per-set values -> (B, N, D) per-token values (one cat of broadcast views: no index
    tensor, so no host-to-device copy and nothing torch.compile must break on)."""
    parts = [values[:, s:s + 1].expand(-1, n, -1) for n, s in zip(segments, mod_index)]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=1)


def adaln_modulate(x, shift, scale, segments, mod_index, weight=None, bias=None, eps: float = 1e-5):
    """LayerNorm(x) (* weight + bias) * (1 + scale[set]) + shift[set]."""
    normed = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return normed * (1 + expand_segments(scale, segments, mod_index)) + expand_segments(shift, segments, mod_index)


def gated_residual(residual, x, gate, segments, mod_index):
    """residual + gate[set] * x."""
    return residual + expand_segments(gate, segments, mod_index) * x


def gated_residual_adaln(residual, x, gate, shift, scale, segments, mod_index, weight=None, bias=None,
                         eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """r = residual + gate[set] * x, and adaln_modulate(r, ...); returns (r, modulated)."""
    r = gated_residual(residual, x, gate, segments, mod_index)
    return r, adaln_modulate(r, shift, scale, segments, mod_index, weight, bias, eps)


def rope_cos_sin(frame_positions: Sequence[int], grid_height: int, grid_width: int,
                 axes_dim: Sequence[int], theta: float = 10000.0, device=None):
    """3D RoPE tables for video tokens ordered (frame, row, column): two (Nv, head_dim) float32.
    ``frame_positions``: ints, or a float tensor already on ``device``.

    The head dim splits into (t, h, w) parts; each part rotates interleaved pairs (x0, x1), (x2, x3)...
    by position * theta ** (-2i / part_dim).
    """
    frames = (frame_positions.float() if isinstance(frame_positions, torch.Tensor)
              else torch.tensor(tuple(frame_positions), dtype=torch.float32, device=device))
    rows = torch.arange(grid_height, dtype=torch.float32, device=device)
    cols = torch.arange(grid_width, dtype=torch.float32, device=device)
    grid = torch.stack(torch.meshgrid(frames, rows, cols, indexing="ij"), dim=-1).reshape(-1, 3)
    angles = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        angles.append(grid[:, axis:axis + 1] * inv_freq)
    angles = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved rotation of x (..., N, hd) by (N, hd) tables, computed in float32."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


def qk_norm_rope(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start: int, rope_end: int,
                 eps: float = 1e-6):
    """Affine LayerNorm over head_dim on q and k (B, H, N, hd), then RoPE on tokens [rope_start, rope_end)."""
    hd = q.shape[-1]
    q = F.layer_norm(q, (hd,), q_weight, q_bias, eps)
    k = F.layer_norm(k, (hd,), k_weight, k_bias, eps)

    def rotate_slice(t):
        return torch.cat((t[..., :rope_start, :], apply_rope(t[..., rope_start:rope_end, :], cos, sin),
                          t[..., rope_end:, :]), dim=-2)

    return rotate_slice(q), rotate_slice(k)


def temporal_mask(q_segments: torch.Tensor, k_segments: torch.Tensor) -> torch.Tensor:
    """(Nq, Nk) boolean, True where query of segment i may see key of segment j <= i."""
    return k_segments[None, :] <= q_segments[:, None]


def attention(q, k, v, q_segments: Optional[torch.Tensor] = None, k_segments: Optional[torch.Tensor] = None,
              mask: str = "full"):
    """SDPA over (B, H, N, hd); ``mask="temporal"`` uses per-token segment ids (len(k) >= len(q) allowed)."""
    if mask == "full":
        return F.scaled_dot_product_attention(q, k, v)
    if mask != "temporal":
        raise ValueError(f"mask must be 'full' or 'temporal', got {mask!r}")
    if q_segments is None or k_segments is None:
        raise ValueError("mask='temporal' needs q_segments and k_segments (per-token segment ids)")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=temporal_mask(q_segments, k_segments))


FP8_E4M3_MAX = 448.0
FP8_MIN_SCALE = 1e-12  # floor on a row's scale: an all-zero row quantizes to zeros, never NaN


def quantize_rowwise(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) symmetric FP8 e4m3: x ~= x_fp8.float() * scale, scale (..., 1) float32.

    scale = max(amax(|row|) / 448, 1e-12); fused kernels quantize their output the same way.
    """
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX).clamp_min(FP8_MIN_SCALE)
    return (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def ffn_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The FFN's first half: gelu_tanh(x @ weight.T + bias), weight (Nout, K) in nn.Linear layout."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static FP8 e4m3 with one precomputed float32 scale: clamp(x / scale) to +-448 (e4m3 has no inf;
    an unclamped cast of a larger value gives NaN)."""
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_linear(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(x_fp8 @ weight_fp8.T) * x_scale * weight_scale.T + bias in float32, cast to out_dtype.

    x_fp8 (..., K), weight_fp8 (Nout, K) float8_e4m3fn; x_scale (..., 1) per row or one element;
    weight_scale (Nout,) or (Nout, 1) per output channel. The dequantized float32 reference.
    """
    x_scale = x_scale.float().reshape(()) if x_scale.numel() == 1 else x_scale.float()
    acc = x_fp8.float() @ weight_fp8.float().t()
    y = acc * x_scale * weight_scale.float().reshape(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def quantize_rowwise_gelu(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rowwise(gelu_tanh(x))`` with the GELU computed in float32 (the FFN-out input)."""
    return quantize_rowwise(F.gelu(x.float(), approximate="tanh"))
