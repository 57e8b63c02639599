"""``ffn_gelu(x, weight, bias=None)``: the FFN's first GEMM with bias and GELU-tanh fused as its epilogue.

Semantics (docs/design.md, Ops, reference ``wam_fast.ops.reference.ffn_gelu``):
``gelu_tanh(x @ weight.T + bias)`` with x (..., K), weight (Nout, K) in nn.Linear layout, bias (Nout,)
or None; the output is (..., Nout) in x's dtype. The Triton backend accumulates in fp32 and computes
the GELU in fp32 (fp32 inputs use IEEE fp32 products, not TF32); the torch backend is eager PyTorch.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from wam_fast.ops import reference as WF
from wam_fast.ops.checks import FLOAT_DTYPES, check_same, check_tensor
from wam_fast.ops.registry import OpBackends, device_reasons, kernel_module

OP = "ffn_gelu"
BACKENDS = OpBackends(OP)


def _kernel_module():
    """The Triton launcher module wam_fast/kernels/ffn_gelu.py (imports triton: loaded on first use)."""
    return kernel_module("ffn_gelu")


# ---- backends ------------------------------------------------------------------------------------
def _run_triton(x, weight, bias):
    return _kernel_module().ffn_gelu(x, weight, bias)


def _rejects_triton(x, weight, bias) -> List[str]:
    reasons = device_reasons("triton", x, weight, bias)
    if x.dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype {x.dtype} (takes float32, float16, bfloat16)")
    return reasons


def _run_torch(x, weight, bias):
    return WF.ffn_gelu(x, weight, bias)


BACKENDS.register("triton", _run_triton, _rejects_triton,
                  supports="fp32 (IEEE, no TF32)/fp16/bf16; x (..., K) any strides, weight (N, K) any strides; "
                           "fp32 accumulation, GELU-tanh epilogue")
BACKENDS.register("torch", _run_torch, supports="fp32/fp16/bf16 on any device (F.linear + F.gelu in the input dtype, eager)")


# ---- custom op -----------------------------------------------------------------------------------
@torch.library.custom_op("wam_fast::ffn_gelu", mutates_args=())
def ffn_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return BACKENDS(x, weight, bias)


@ffn_gelu_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ---- public function -------------------------------------------------------------------------------
def ffn_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias): x (..., K), weight (Nout, K), bias (Nout,) or None -> (..., Nout)
    in x's dtype (the first half of the FFN, one kernel)."""
    check_tensor(OP, "x", x)
    if x.dim() < 1:
        raise ValueError(f"wam_fast.ops.{OP}: x must have at least 1 dim (..., K), got a 0-dim tensor")
    check_tensor(OP, "weight", weight, ndim=2)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"wam_fast.ops.{OP}: weight must be (Nout, K) with K = x.shape[-1] = {x.shape[-1]} "
                         f"(nn.Linear layout), got weight {tuple(weight.shape)} for x {tuple(x.shape)}")
    if bias is not None:
        check_tensor(OP, "bias", bias, shape=(weight.shape[0],))
    check_same(OP, "x", x, weight=weight, bias=bias)
    return torch.ops.wam_fast.ffn_gelu.default(x, weight, bias)
