"""The handler for any ``nn.Module``: ``nn.MultiheadAttention`` -> ``wam_fast.ops.attention`` (with a
per-call fallback to the original for what it cannot honour), FP8 ``nn.Linear`` layers, torch.compile."""
from __future__ import annotations

import logging
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from wam_fast import ops
from wam_fast.compiler import session as session_module  # attention_fn looked up per call (tests swap it)
from wam_fast.compiler.config import SMALL_GEMM_FACTOR, CompileConfig
from wam_fast.compiler.patterns import Fused, fuse_patterns, is_custom, no_kernel_reason
from wam_fast.compiler.report import CompileReport
from wam_fast.compiler.session import Session, check_backend_available, compile_kwargs, module_device
from wam_fast.ops.registry import note_fallback
from wam_fast.quant import default_filter
from wam_fast.utils.modules import retype, set_submodule

logger = logging.getLogger(__name__)


def _head_dim_reason(head_dim: int) -> Optional[str]:
    return ops.op_module("attention").head_dim_reason(head_dim)


class MultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention computing softmax attention with ``wam_fast.ops.attention`` (same
    parameters). A call it cannot honour exactly (attention weights requested, masks, causal,
    unbatched input, dropout in training, fewer keys than queries) runs the original module's
    forward; the fallback is noted once (``wam_fast.ops.fallbacks()``)."""

    _wam_fast_attention = "auto"

    def _rejects(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> List[str]:
        reasons = []
        if need_weights:
            reasons.append("need_weights=True (attention weights requested; pass need_weights=False)")
        if attn_mask is not None:
            reasons.append("attn_mask given")
        if key_padding_mask is not None:
            reasons.append("key_padding_mask given")
        if is_causal:
            reasons.append("is_causal=True")
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            reasons.append("unbatched (2-D) input")
        elif key.shape[1 if self.batch_first else 0] < query.shape[1 if self.batch_first else 0]:
            reasons.append("fewer keys than queries")
        if self.training and self.dropout > 0:
            reasons.append(f"attention dropout {self.dropout} in training mode")
        if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            reasons.append(f"dtype {query.dtype}")
        return reasons

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        reasons = self._rejects(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if reasons:
            note_fallback("attention", "nn.MultiheadAttention (original forward)", reasons)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, nq, e = query.shape
        nk = key.shape[1]
        heads, hd = self.num_heads, self.head_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:  # self-attention: one GEMM for q, k, v
            q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
        else:
            w = weight.chunk(3)
            bq = bias.chunk(3) if bias is not None else (None, None, None)
            q, k, v = (F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), w, bq))
        q = q.reshape(b, nq, heads, hd).transpose(1, 2)
        k = k.reshape(b, nk, heads, hd).transpose(1, 2)
        v = v.reshape(b, nk, heads, hd).transpose(1, 2)
        o = session_module.attention_fn(self._wam_fast_attention)(q, k, v)
        o = self.out_proj(o.transpose(1, 2).reshape(b, nq, e))
        if not self.batch_first:
            o = o.transpose(0, 1)
        return o, None


def _mha_static_reasons(module: nn.MultiheadAttention) -> List[str]:
    reasons = []
    if not module._qkv_same_embed_dim:
        reasons.append(f"separate q/k/v projections (kdim={module.kdim}, vdim={module.vdim} != embed_dim)")
    if module.bias_k is not None or module.add_zero_attn:
        reasons.append("add_bias_kv / add_zero_attn (extra key rows)")
    why = _head_dim_reason(module.head_dim)
    if why:
        reasons.append(f"wam_fast.ops.attention: {why}")
    return reasons


def compile_module(model: nn.Module, config: CompileConfig, filter_fn, report: CompileReport, example_inputs):
    """Any nn.Module: MultiheadAttention -> ops.attention, FP8 linears, torch.compile (+ CUDA graphs)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"wam_fast.compile expects an nn.Module or a WAMPolicy, got {type(model).__name__}")
    device = module_device(model)
    check_backend_available(config, device)
    compile_kwargs(config, device)  # mode / cuda_graphs conflicts raise here, before any change
    session = Session(model, config, filter_fn, report, example_inputs)

    # FP8 linears
    wanted = default_filter(model)
    rows = session.linear_rows() if config.fp8 else {}
    most = max(rows.values(), default=0)

    def select(module: nn.Module, name: str) -> Optional[str]:
        if name in fused.linears:
            return "its weight is read by a fused GELU-linear pattern site (ops.ffn_gelu)"
        if type(module) is not nn.Linear:
            return f"{type(module).__name__} is an nn.Linear subclass (its owner may read .weight directly)"
        if module.in_features % 16 or module.out_features % 16:
            return (f"in/out features ({module.in_features}, {module.out_features}) are not multiples of 16 "
                    f"(FP8 GEMM alignment)")
        if not wanted(module, name):
            return "outside the FP8 default filter (wam_fast.quant.default_filter)"
        if name in rows and rows[name] * SMALL_GEMM_FACTOR <= most:
            # a per-sample projection (AdaLN modulation, conditioning): no GEMM worth FP8, and its error
            # would shift every token of the sample the same way
            return (f"multiplies {rows[name]} rows on the example inputs where the token GEMMs take {most}: a "
                    f"per-sample projection (e.g. AdaLN modulation); FP8 buys no time there and its error "
                    f"would bias every token")
        return None

    # pattern sites in modules of the user's own, then nn.MultiheadAttention modules
    fused = Fused(set(), set())
    if config.fused:
        fused = fuse_patterns(session, lambda module, name: (
            "fp8=True: this nn.Linear goes FP8 (an FP8 GEMM saves more than the fused GELU epilogue)"
            if config.fp8 and select(module, name) is None else None))
        targets = []
        fast_path_children = {(f"{name}." if name else "") + child for name, m in model.named_modules()
                            if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
                            for child, _ in m.named_children()}
        no_kernel = no_kernel_reason(session.device)
        for name, module in model.named_modules():
            if type(module) is nn.MultiheadAttention and name:
                why = _mha_static_reasons(module) if session.accepts(module, name) else ["excluded by filter_fn"]
                if no_kernel:
                    why.append(no_kernel)
                if name in fast_path_children and example_inputs is None:
                    why.append("inside an nn.Transformer*Layer, whose eval fast path may never call it (pass "
                               "example_inputs so the compile can probe which modules run)")
                if why:
                    report.skip(name, f"nn.MultiheadAttention left as is: {'; '.join(why)}")
                else:
                    targets.append(name)

        def swap():
            for name in targets:
                new = retype(model.get_submodule(name), MultiheadAttention)
                new._wam_fast_attention = config.attention
                set_submodule(model, name, new)

        session.swap_lever("attention", "rel", swap, lambda where, old, new: (
            f"nn.MultiheadAttention -> wam_fast.compiler.MultiheadAttention (wam_fast.ops.attention"
            f"{'' if config.attention == 'auto' else ' via ' + config.attention}; masks, need_weights=True and "
            f"the like fall back per call to the original forward)"))
    else:
        report.skip("fused", "fused=False: no module swapped for wam_fast ops")

    if config.fp8 and example_inputs is None:
        # a model of its own may read linear.weight directly (an FP8 weight then fails at run time) and its
        # end-to-end error under FP8 is unknown (6-15% seen on small models): never left unchecked
        report.skip("fp8", "refused: a model wam_fast does not know gets FP8 only when it can be checked; pass "
                           "example_inputs=... (each FP8 layer is then checked against the eager output, SQNR >= "
                           f"{config.min_fp8_sqnr_db:g} dB, and reverted if off)")
        logger.warning("wam_fast.compile: fp8=True on %s without example_inputs: FP8 not applied (see the report)",
                       type(model).__name__)
    else:
        session.fp8(select)

    for name, module in model.named_modules():
        if name and is_custom(module) and name not in fused.covered:
            report.skip(name, f"{type(module).__name__}: a module of its own, with no wam_fast twin: runs as written"
                              + ("" if config.backend == "eager" else " (torch.compile traces it)"))
    if config.cache:
        report.skip("cache", "applies to wam_fast.WAMPolicy (KV cache of a mask='temporal' WAMTransformer)")
    session.torch_compile("module")
