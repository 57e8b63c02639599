"""The fused model path: swap the reference block pieces for versions that call ``wam_fast.ops``.

``fuse(model)`` replaces, in place and by module name, every ``AdaLNModulate``,
``GatedResidualAdaLN``, ``Attention`` and ``FeedForward`` with its fused twin. A twin is a subclass
that keeps the same parameters (the same tensors, not copies) and submodule names, so the state_dict,
checkpoints and the reference's ``forward`` signature are unchanged; only ``forward`` calls the fused
ops. ``unfuse(model)`` swaps back. Works on any module tree that contains these pieces.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch.nn as nn

from wam_fast import ops
from wam_fast.models.transformer import (AdaLNModulate, Attention, FeedForward, ForwardContext, GatedResidualAdaLN,
                                         WAMBlock)
from wam_fast.utils.modules import retype_by_table


class FusedAdaLNModulate(AdaLNModulate):
    """adaln_modulate op: LayerNorm + per-segment (1 + scale), shift in one pass."""

    def forward(self, x, shift, scale, ctx: ForwardContext):
        return ops.adaln_modulate(x, shift, scale, ctx.segments, ctx.mod_index,
                                     self.norm.weight, self.norm.bias, self.norm.eps)


class FusedGatedResidualAdaLN(GatedResidualAdaLN):
    """gated_residual_adaln op: residual + gate * x, then the next AdaLN, in one pass."""

    def forward(self, residual, x, gate, shift, scale, ctx: ForwardContext):
        return ops.gated_residual_adaln(residual, x, gate, shift, scale, ctx.segments, ctx.mod_index,
                                           self.norm.weight, self.norm.bias, self.norm.eps)


class FusedAttention(Attention):
    """QKV GEMM -> qk_norm_rope op on strided views of it -> attention op (as ctx.attend runs it) -> out GEMM."""

    def forward(self, x, ctx: ForwardContext):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        args = (q, k, self.norm_q.weight, self.norm_q.bias, self.norm_k.weight, self.norm_k.bias, ctx.rope_cos,
                ctx.rope_sin, ctx.rope_start, ctx.rope_end, self.norm_q.eps)
        kv_out = ctx.kv_out()
        if kv_out is None:
            q, k = ops.qk_norm_rope(*args)
        else:  # a KV cache: k and v go straight into its buffers, in the same launch
            q, k = ops.qk_norm_rope(*args, k_out=kv_out[0], v=v, v_out=kv_out[1])
            v = kv_out[1]
        o = ctx.attend(q, k, v, ops.attention)
        return self.out(o.transpose(1, 2).reshape(b, n, -1))  # a view: attention writes (B, N, H, hd)


class FusedFeedForward(FeedForward):
    """ffn_gelu op (first GEMM + bias + GELU-tanh epilogue) -> second GEMM."""

    def forward(self, x):
        return self.proj_out(ops.ffn_gelu(x, self.proj_in.weight, self.proj_in.bias))


class FusedWAMBlock(WAMBlock):
    """The block's last residual as the gated_residual op (one launch)."""

    def gated_residual(self, residual, x, gate, ctx: ForwardContext):
        return ops.gated_residual(residual, x, gate, ctx.segments, ctx.mod_index)


# reference class -> fused twin (exact types: a user's subclass is left alone, it may differ)
FUSED = {AdaLNModulate: FusedAdaLNModulate, GatedResidualAdaLN: FusedGatedResidualAdaLN,
         Attention: FusedAttention, FeedForward: FusedFeedForward, WAMBlock: FusedWAMBlock}
UNFUSED = {fused: reference for reference, fused in FUSED.items()}


def fuse(model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> List[dict]:
    """Swap every reference piece of ``model`` for its fused twin, in place.

    filter_fn(module, name) -> bool picks which ones (default: all). Returns what was swapped:
    [{"name", "from", "to"}].
    """
    return retype_by_table(model, FUSED, filter_fn, "fuse")


def unfuse(model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> List[dict]:
    """Swap fused twins back to the reference pieces, in place (same parameters)."""
    return retype_by_table(model, UNFUSED, filter_fn, "unfuse")
