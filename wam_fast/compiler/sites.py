"""What a pattern site (``wam_fast.compiler.patterns``) runs: one wam_fast op in place of the expression
the user's code wrote. Each function checks, on every call, that the op can honour its inputs (shapes,
dtypes, head dims) and otherwise computes the original expression, noting the fallback once
(``wam_fast.ops.fallbacks()``): a traced block called later with other shapes stays correct."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from wam_fast import ops
from wam_fast.ops.attention import head_dim_reason
from wam_fast.ops.registry import note_fallback

FALLBACK = "pattern site (original expression)"


def rows3d(x: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) itself, or (M, D) as (M, 1, D): one token per row (an MLP over per-sample vectors)."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def modulation_table(t: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A per-sample (or shared) table as the (B, 1, D) view the AdaLN ops take, or None when ``t`` is not
    one: for x (B, N, D), t (B, D), (B, 1, D), (D,), (1, D) or (1, 1, D); for x (M, D), t (M, D) or (D,);
    same dtype and device as x."""
    if x.dim() not in (2, 3) or not isinstance(t, torch.Tensor) or t.dtype != x.dtype or t.device != x.device:
        return None
    B, D = x.shape[0], x.shape[-1]
    per_sample = ((B, D),) if x.dim() == 2 else ((B, D), (B, 1, D))
    if tuple(t.shape) in per_sample:
        return t.reshape(B, 1, D)
    shared = ((D,), (1, D)) + (((1, 1, D),) if x.dim() == 3 else ())
    if tuple(t.shape) in shared:
        return t.reshape(1, 1, D).expand(B, 1, D)
    return None


def _table_reasons(x: torch.Tensor, tables: dict) -> List[str]:
    if x.dim() not in (2, 3):
        return [f"x has shape {tuple(x.shape)}, not (B, N, D) or (M, D)"]
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return [f"dtype {x.dtype}"]
    return [f"{name} {tuple(t.shape)} {t.dtype} is not a per-sample or shared table of x {tuple(x.shape)} {x.dtype}"
            for name, t in tables.items() if modulation_table(t, x) is None]


def adaln_modulate_site(x, shift, scale, weight, bias, eps: float):
    """``layer_norm(x, weight, bias, eps) * (1 + scale) + shift`` -> ``ops.adaln_modulate``."""
    reasons = _table_reasons(x, {"shift": shift, "scale": scale})
    if reasons:
        note_fallback("adaln_modulate", FALLBACK, reasons)
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps) * (1 + scale) + shift
    x3 = rows3d(x)
    y = ops.adaln_modulate(x3, modulation_table(shift, x), modulation_table(scale, x), [x3.shape[1]], [0],
                           weight, bias, eps)
    return y.reshape(x.shape)


def gated_residual_site(residual, gate, y):
    """``residual + gate * y`` -> ``ops.gated_residual``."""
    reasons = _table_reasons(residual, {"gate": gate})
    if not reasons and (y.shape != residual.shape or y.dtype != residual.dtype):
        reasons.append(f"y {tuple(y.shape)} {y.dtype} differs from the residual {tuple(residual.shape)} {residual.dtype}")
    if reasons:
        note_fallback("gated_residual", FALLBACK, reasons)
        return residual + gate * y
    r3 = rows3d(residual)
    out = ops.gated_residual(r3, rows3d(y), modulation_table(gate, residual), [r3.shape[1]], [0])
    return out.reshape(residual.shape)


def ffn_gelu_site(x, weight, bias):
    """``gelu_tanh(linear(x, weight, bias))`` -> ``ops.ffn_gelu``."""
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype) or x.dim() < 1:
        note_fallback("ffn_gelu", FALLBACK, [f"x {x.dtype} / weight {weight.dtype}: one float dtype needed"])
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    return ops.ffn_gelu(x, weight, bias)


def attention_reasons(q, k, v, causal: bool) -> List[str]:
    """Why ``ops.attention`` cannot stand in for ``scaled_dot_product_attention(q, k, v, is_causal=causal)``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return [f"q/k/v of {q.dim()}/{k.dim()}/{v.dim()} dims, not (B, H, N, hd)"]
    reasons = []
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtypes {q.dtype}/{k.dtype}/{v.dtype}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        reasons.append(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (broadcast or grouped heads)")
    elif k.shape[2] < q.shape[2]:
        reasons.append(f"fewer keys ({k.shape[2]}) than queries ({q.shape[2]})")
    elif causal and k.shape[2] != q.shape[2]:
        reasons.append("is_causal with a key count that differs from the query count")
    why = head_dim_reason(q.shape[-1])
    if why:
        reasons.append(why)
    return reasons


def attention_site(q, k, v, causal: bool):
    """``scaled_dot_product_attention(q, k, v, is_causal=causal)`` -> ``ops.attention`` (causal as the
    temporal mask with one segment per token: query i sees keys 0..i)."""
    reasons = attention_reasons(q, k, v, causal)
    if reasons:
        note_fallback("attention", FALLBACK, reasons)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if not causal:
        return ops.attention(q, k, v)
    positions = torch.arange(q.shape[2], device=q.device, dtype=torch.int32)
    return ops.attention(q, k, v, positions, positions, mask="temporal")
