"""quantize_rowwise (docs/design.md, Ops): per-row symmetric FP8 e4m3 of ``y = x`` or ``y = gelu_tanh(x)``.

``scale = max(amax(|y|) / 448, 1e-12)`` per row of the last dim, ``codes = clamp(y / scale, +-448)``
as float8_e4m3fn; y is computed in float32 (reference ``quantize_rowwise`` / ``quantize_rowwise_gelu``).
Returns (codes (..., K), scales float32 (..., 1)), the ``FP8Activation`` an ``FP8Linear`` takes. One
kernel launch (two passes over each row inside it): FP8Linear's dynamic input quantization and, with
``gelu=True``, the FFN's GELU + quantization of the FFN-out input.

Non-finite input (as the reference): a row holding a NaN gets a NaN scale and NaN codes; a row
holding +-inf gets scale inf, NaN codes at the infs and zero codes elsewhere. Other rows are unaffected.

Strides: the Triton kernel takes any leading strides with a unit last-dim stride (leading dims that
cannot be merged into one row stride pair are copied); the public function copies a tensor whose last
dim is not contiguous (one copy).
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from wam_fast.ops import reference as WF
from wam_fast.ops.adaln_modulate import last_dim_contiguous
from wam_fast.ops.checks import FLOAT_DTYPES, check_tensor
from wam_fast.ops.fp8_linear import fp8_device_error
from wam_fast.ops.registry import OpBackends, device_reasons, kernel_module, triton_interpreting

OP = "quantize_rowwise"


# ---- backends -------------------------------------------------------------------------------------
def _triton_run(x, gelu):
    return kernel_module(OP).quantize_rowwise(x, gelu, triton_interpreting())


def _triton_rejects(x, gelu) -> List[str]:
    reasons = device_reasons("triton", x)
    if x.dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype must be float32/float16/bfloat16, got {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        reasons.append("needs unit stride on the last dim")
    if x.device.type == "cuda" and not reasons:
        error = fp8_device_error(x.device)
        if error:
            reasons.append(error)
    return reasons


def _torch_run(x, gelu):
    codes, scales = (WF.quantize_rowwise_gelu if gelu else WF.quantize_rowwise)(x)
    return codes.contiguous(), scales.contiguous()


BACKENDS = OpBackends(OP)
BACKENDS.register("triton", _triton_run, _triton_rejects,
                  supports="fp32/fp16/bf16, any K (loops over the row), strided rows (unit last-dim stride), "
                           "optional GELU-tanh, sm_89+")
BACKENDS.register("torch", _torch_run, None,
                  supports="fp32/fp16/bf16 (wam_fast.ops.reference, in fp32)")


# ---- custom op ------------------------------------------------------------------------------------
@torch.library.custom_op("wam_fast::quantize_rowwise", mutates_args=())
def quantize_rowwise_op(x: torch.Tensor, gelu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (codes float8_e4m3fn (..., K), scales float32 (..., 1))."""
    return BACKENDS(x, gelu)


@quantize_rowwise_op.register_fake
def _(x, gelu):
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


# ---- public function ------------------------------------------------------------------------------
def quantize_rowwise(x: torch.Tensor, gelu: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 e4m3 of x (or of ``gelu_tanh(x)`` with ``gelu=True``, computed in fp32).

    x (..., K) fp32/fp16/bf16 -> (codes float8_e4m3fn (..., K), scales float32 (..., 1)) with
    ``y ~= codes.float() * scales``.
    """
    check_tensor(OP, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"wam_fast.ops.{OP}: x must be (..., K) with K >= 1 (rows to quantize), "
                         f"got shape {tuple(x.shape)}")
    if not isinstance(gelu, bool):
        raise TypeError(f"wam_fast.ops.{OP}: gelu must be a bool, got {type(gelu).__name__}")
    return torch.ops.wam_fast.quantize_rowwise.default(last_dim_contiguous(x), gelu)
