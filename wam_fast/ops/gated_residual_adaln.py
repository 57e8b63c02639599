"""gated_residual_adaln (docs/design.md, Ops): ``r = residual + gate[set] * x``, then ``adaln_modulate(r, ...)``.

r is rounded to residual's dtype before it is normalized (as the unfused model does); returns
``(r, y)``, or with ``fp8=True`` ``(r, y_fp8, y_scale)`` with y quantized per row in the kernel
(``functional.quantize_rowwise`` of the fp32 modulated row). One pass over each row in the kernels.
Strides and copies as in ``adaln_modulate``: unit last-dim stride, any other strides (Triton).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from wam_fast.ops import reference as WF
from wam_fast.ops.checks import check_residual_pair
from wam_fast.ops.registry import OpBackends, cuda_extension, kernel_module, triton_interpreting
from wam_fast.ops.adaln_modulate import (MAX_TRITON_D, check_modulation_inputs, cuda_common_reasons, cuda_stream,
                                         empty_scale, last_dim_contiguous, token_sets_int32, torch_modulate,
                                         triton_common_reasons)

OP = "gated_residual_adaln"


# ---- backends -------------------------------------------------------------------------------------
def _cuda_run(residual, x, gate, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    _C = cuda_extension()  # the extension module, named as setup.py builds it

    B, N, D = residual.shape
    r = torch.empty((B, N, D), dtype=residual.dtype, device=residual.device)
    y = torch.empty((B, N, D), dtype=torch.float8_e4m3fn if fp8 else residual.dtype, device=residual.device)
    y_scale = torch.empty((B, N, 1), dtype=torch.float32, device=residual.device) if fp8 else None
    _C.gated_residual_adaln(residual, x, gate.contiguous(), shift.contiguous(), scale.contiguous(), weight, bias,
                            list(segments), list(mod_index), float(eps), r, y, y_scale, cuda_stream(residual.device))
    return r, y, (y_scale if fp8 else empty_scale(residual))


def _cuda_rejects(residual, x, gate, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    return cuda_common_reasons((residual, x, gate, shift, scale, weight, bias), (residual, x), segments)


def _triton_run(residual, x, gate, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    kernel = kernel_module(OP)
    sets = token_sets_int32(tuple(segments), tuple(mod_index), residual.device)
    return kernel.gated_residual_adaln(residual, x, gate, shift, scale, sets,
                                       None if weight is None else weight.contiguous(),
                                       None if bias is None else bias.contiguous(),
                                       eps, fp8, triton_interpreting())


def _triton_rejects(residual, x, gate, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    return triton_common_reasons((residual, x, gate, shift, scale, weight, bias), (residual, x), fp8)


def _torch_run(residual, x, gate, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    r = WF.gated_residual(residual, x, gate, segments, mod_index).contiguous()  # in residual's dtype
    # the rounded r is modulated (and quantized with fp8), as the kernels do
    return (r, *torch_modulate(r, shift, scale, segments, mod_index, weight, bias, eps, fp8))


BACKENDS = OpBackends(OP)
BACKENDS.register("cuda", _cuda_run, _cuda_rejects,
                  supports="fp32/fp16/bf16 (one dtype), contiguous residual and x, <= 8 segments, fp8 output")
BACKENDS.register("triton", _triton_run, _triton_rejects,
                  supports=f"fp32/fp16/bf16, strided inputs (unit last-dim stride), D <= {MAX_TRITON_D}, "
                           "fp8 output (sm_89+)")
BACKENDS.register("torch", _torch_run, None,
                  supports="fp32/fp16/bf16 (wam_fast.ops.reference, eager in the input dtype; fp8 from fp32)")


# ---- custom op ------------------------------------------------------------------------------------
@torch.library.custom_op("wam_fast::gated_residual_adaln", mutates_args=())
def gated_residual_adaln_op(residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                            scale: torch.Tensor, segments: List[int], mod_index: List[int],
                            weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                            fp8: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (r, y, y_scale): y in residual's dtype and an empty y_scale, or float8_e4m3fn y and (B, N, 1)."""
    return BACKENDS(residual, x, gate, shift, scale, segments, mod_index, weight, bias, eps, fp8)


@gated_residual_adaln_op.register_fake
def _(residual, x, gate, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    B, N, D = residual.shape
    r = residual.new_empty((B, N, D))
    if fp8:
        return (r, residual.new_empty((B, N, D), dtype=torch.float8_e4m3fn),
                residual.new_empty((B, N, 1), dtype=torch.float32))
    return r, residual.new_empty((B, N, D)), residual.new_empty((0,), dtype=torch.float32)


# ---- public function ------------------------------------------------------------------------------
def gated_residual_adaln(residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                         scale: torch.Tensor, segments, mod_index, weight: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None, eps: float = 1e-5, fp8: bool = False):
    """``r = residual + gate[set] * x`` (in residual's dtype) and ``adaln_modulate(r, shift, scale, ...)``.

    Returns (r, y), or with ``fp8=True`` (r, y_fp8 float8_e4m3fn (B, N, D), y_scale float32 (B, N, 1)).
    """
    check_residual_pair(OP, residual, x)
    segments, mod_index = check_modulation_inputs(OP, residual, "residual",
                                                  {"gate": gate, "shift": shift, "scale": scale},
                                                  segments, mod_index, weight, bias, eps, fp8)
    residual, x, gate, shift, scale, weight, bias = (last_dim_contiguous(t)
                                                     for t in (residual, x, gate, shift, scale, weight, bias))
    r, y, y_scale = torch.ops.wam_fast.gated_residual_adaln.default(residual, x, gate, shift, scale, segments,
                                                                    mod_index, weight, bias, float(eps), fp8)
    return (r, y, y_scale) if fp8 else (r, y)
