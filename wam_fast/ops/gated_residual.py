"""gated_residual (docs/design.md, Ops): ``out = residual + gate[set] * x``, the block's final residual.

residual, x (B, N, D); gate (B, S, D); token n uses set ``mod_index[s]`` of the segment s it falls in
(``segments``: consecutive token counts summing to N), as in ``gated_residual_adaln``. One kernel
launch; the sum is taken in fp32 and rounded once to residual's dtype (the torch backend, the
reference, rounds ``gate * x`` first). Strides as in ``adaln_modulate``: unit last-dim stride, any
other strides (Triton); the public function copies a tensor whose last dim is not contiguous.
"""
from __future__ import annotations

from typing import List

import torch

from wam_fast.ops import reference as WF
from wam_fast.ops.adaln_modulate import check_modulation_inputs, last_dim_contiguous, token_sets_int32
from wam_fast.ops.checks import FLOAT_DTYPES, check_residual_pair
from wam_fast.ops.registry import OpBackends, device_reasons, kernel_module, triton_interpreting

OP = "gated_residual"


# ---- backends -------------------------------------------------------------------------------------
def _triton_run(residual, x, gate, segments, mod_index):
    sets = token_sets_int32(tuple(segments), tuple(mod_index), residual.device)
    return kernel_module(OP).gated_residual(residual, x, gate, sets, triton_interpreting())


def _triton_rejects(residual, x, gate, segments, mod_index) -> List[str]:
    tensors = (residual, x, gate)
    reasons = device_reasons("triton", *tensors)
    dtypes = {t.dtype for t in tensors}
    if not dtypes <= set(FLOAT_DTYPES):
        reasons.append(f"dtypes must be float32/float16/bfloat16, got {sorted(str(d) for d in dtypes)}")
    if any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in tensors):
        reasons.append("needs unit stride on the last (hidden) dim")
    return reasons


def _torch_run(residual, x, gate, segments, mod_index):
    return WF.gated_residual(residual, x, gate, segments, mod_index).contiguous()


BACKENDS = OpBackends(OP)
BACKENDS.register("triton", _triton_run, _triton_rejects,
                  supports="fp32/fp16/bf16, strided inputs (unit last-dim stride), any D")
BACKENDS.register("torch", _torch_run, None,
                  supports="fp32/fp16/bf16 (wam_fast.ops.reference, eager in the input dtype)")


# ---- custom op ------------------------------------------------------------------------------------
@torch.library.custom_op("wam_fast::gated_residual", mutates_args=())
def gated_residual_op(residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, segments: List[int],
                      mod_index: List[int]) -> torch.Tensor:
    """Returns residual + gate[set] * x, (B, N, D) contiguous in residual's dtype."""
    return BACKENDS(residual, x, gate, segments, mod_index)


@gated_residual_op.register_fake
def _(residual, x, gate, segments, mod_index):
    return residual.new_empty(residual.shape)


# ---- public function ------------------------------------------------------------------------------
def gated_residual(residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, segments, mod_index) -> torch.Tensor:
    """``residual + gate[set] * x`` per segment: residual, x (B, N, D), gate (B, S, D) of one dtype
    -> (B, N, D) in that dtype."""
    check_residual_pair(OP, residual, x)
    segments, mod_index = check_modulation_inputs(OP, residual, "residual", {"gate": gate}, segments, mod_index,
                                                  None, None, 0.0, False)
    residual, x, gate = (last_dim_contiguous(t) for t in (residual, x, gate))
    return torch.ops.wam_fast.gated_residual.default(residual, x, gate, segments, mod_index)
