"""adaln_modulate (docs/design.md, Ops): ``y = LayerNorm(x) (* weight + bias) * (1 + scale[set]) + shift[set]``.

x (B, N, D); shift, scale (B, S, D); token n uses set ``mod_index[s]`` of the segment s it falls in
(``segments``: consecutive token counts summing to N). Output in x's dtype, or with ``fp8=True``
``(y_fp8, y_scale)``: ``functional.quantize_rowwise`` of the fp32 modulated row (float8_e4m3fn
(B, N, D) and float32 (B, N, 1)), quantized inside the kernel. Statistics are fp32 in every backend.

Strides: the Triton kernel takes any batch/token/set strides with a unit last-dim stride (so the
model's (B, S, D) views of its modulation table go in without a copy); the public function copies a
tensor whose last dim is not contiguous (one copy). The CUDA backend needs contiguous x (else the
dispatcher moves on to Triton) and copies the small (B, S, D) tables when they are views.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from wam_fast.ops import reference as WF
from wam_fast.ops.checks import FLOAT_DTYPES, check_same, check_segments, check_tensor
from wam_fast.ops.registry import OpBackends, cuda_extension, device_reasons, kernel_module, triton_interpreting

OP = "adaln_modulate"
MAX_CUDA_SEGMENTS = 8  # WAM_MAX_SEGMENTS in csrc/adaln_modulate.h
MAX_TRITON_D = 16384   # wam_fast/kernels/adaln_modulate.py MAX_D: a row lives in one program's registers


# ---- shared by adaln_modulate and gated_residual_adaln ------------------------------------------
@functools.lru_cache(maxsize=64)
def token_sets_int32(segments: Tuple[int, ...], mod_index: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(N,) int32 modulation set of each token, built once per (layout, device): after the first call
    with a layout there is no host-to-device copy (CUDA-graph friendly)."""
    cpu = torch.device("cpu")  # explicit: a torch.device("meta") context would change the default
    sets = torch.repeat_interleave(torch.tensor(mod_index, dtype=torch.int32, device=cpu),
                                   torch.tensor(segments, dtype=torch.long, device=cpu))
    return sets.to(device)


@functools.lru_cache(maxsize=None)
def _fp8_capability_reason(device: torch.device) -> Optional[str]:
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"fp8 output needs compute capability >= 8.9 (float8e4nv), got {major}.{minor}"
    return None


def triton_common_reasons(tensors, row_tensors, fp8: bool) -> List[str]:
    """Why the Triton kernels cannot take these tensors: device, dtype, last-dim stride, D, fp8 arch."""
    reasons = device_reasons("triton", *tensors)
    dtypes = {t.dtype for t in tensors if t is not None}
    if not dtypes <= set(FLOAT_DTYPES):
        reasons.append(f"dtypes must be float32/float16/bfloat16, got {sorted(str(d) for d in dtypes)}")
    if any(t is not None and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1 for t in tensors):
        reasons.append("needs unit stride on the last (hidden) dim")
    D = row_tensors[0].shape[-1]
    if D > MAX_TRITON_D:
        reasons.append(f"hidden dim {D} > {MAX_TRITON_D} (one row per program)")
    if fp8 and row_tensors[0].device.type == "cuda" and not reasons:
        why = _fp8_capability_reason(row_tensors[0].device)
        if why:
            reasons.append(why)
    return reasons


def cuda_common_reasons(tensors, row_tensors, segments) -> List[str]:
    reasons = device_reasons("cuda", *tensors)
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) != 1 or not dtypes <= set(FLOAT_DTYPES):
        reasons.append(f"needs one dtype among float32/float16/bfloat16, got {sorted(str(d) for d in dtypes)}")
    if len(segments) > MAX_CUDA_SEGMENTS:
        reasons.append(f"at most {MAX_CUDA_SEGMENTS} segments, got {len(segments)}")
    if not all(t.is_contiguous() for t in row_tensors):
        reasons.append("needs contiguous (B, N, D) inputs")
    if any(t is not None and t.dim() == 1 and not t.is_contiguous() for t in tensors):
        reasons.append("needs contiguous weight/bias")
    return reasons


def cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def check_modulation_inputs(op: str, x: torch.Tensor, x_name: str, tables: dict, segments, mod_index,
                            weight, bias, eps, fp8):
    """Checks shared by the two public functions; returns normalized (segments, mod_index) lists."""
    check_tensor(op, x_name, x, ndim=3)
    B, N, D = x.shape
    if D == 0:  # a norm over zero features is undefined (and the kernels' block sizes divide by D)
        raise ValueError(f"wam_fast.ops.{op}: {x_name} must have a hidden dim D >= 1, got shape {tuple(x.shape)}")
    first = next(iter(tables.values()))
    for name, t in tables.items():
        check_tensor(op, name, t, ndim=3)
        check_same(op, x_name, x, **{name: t})
        if t.shape[0] != B or t.shape[2] != D:
            raise ValueError(f"wam_fast.ops.{op}: {name} must have shape (B={B}, S, D={D}) to match "
                             f"{x_name} {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"wam_fast.ops.{op}: the modulation tensors must have the same number of sets S, "
                             f"got {{{', '.join(f'{n}: {tuple(v.shape)}' for n, v in tables.items())}}}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(op, name, t, shape=(D,))
            check_same(op, x_name, x, **{name: t})
    check_segments(op, segments, mod_index, N, first.shape[1])
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"wam_fast.ops.{op}: eps must be a non-negative float, got {eps!r}")
    if not isinstance(fp8, bool):
        raise TypeError(f"wam_fast.ops.{op}: fp8 must be a bool, got {type(fp8).__name__}")
    return [int(s) for s in segments], [int(m) for m in mod_index]


def last_dim_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t itself when its last dim has unit stride (any other strides are fine), else one copy."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def empty_scale(x: torch.Tensor) -> torch.Tensor:
    return torch.empty((0,), dtype=torch.float32, device=x.device)


# ---- backends -------------------------------------------------------------------------------------
def _cuda_run(x, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    _C = cuda_extension()  # the extension module, named as setup.py builds it

    B, N, D = x.shape
    y = torch.empty((B, N, D), dtype=torch.float8_e4m3fn if fp8 else x.dtype, device=x.device)
    y_scale = torch.empty((B, N, 1), dtype=torch.float32, device=x.device) if fp8 else None
    _C.adaln_modulate(x, shift.contiguous(), scale.contiguous(), weight, bias, list(segments), list(mod_index),
                      float(eps), y, y_scale, cuda_stream(x.device))
    return y, (y_scale if fp8 else empty_scale(x))


def _cuda_rejects(x, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    return cuda_common_reasons((x, shift, scale, weight, bias), (x,), segments)


def _triton_run(x, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    kernel = kernel_module(OP)
    sets = token_sets_int32(tuple(segments), tuple(mod_index), x.device)
    return kernel.adaln_modulate(x, shift, scale, sets,
                                 None if weight is None else weight.contiguous(),
                                 None if bias is None else bias.contiguous(),
                                 eps, fp8, triton_interpreting())


def _triton_rejects(x, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    return triton_common_reasons((x, shift, scale, weight, bias), (x,), fp8)


def torch_modulate(x, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    """The torch backend of both AdaLN ops: (y, empty scale) in x's dtype, or with fp8 the fp32
    modulated value quantized row-wise (as the kernels do)."""
    if fp8:
        y = WF.adaln_modulate(x.float(), shift.float(), scale.float(), segments, mod_index,
                              None if weight is None else weight.float(), None if bias is None else bias.float(), eps)
        y_fp8, y_scale = WF.quantize_rowwise(y)
        return y_fp8.contiguous(), y_scale.contiguous()
    y = WF.adaln_modulate(x, shift, scale, segments, mod_index, weight, bias, eps)
    return y.contiguous(), empty_scale(x)


def _torch_run(x, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    return torch_modulate(x, shift, scale, segments, mod_index, weight, bias, eps, fp8)


BACKENDS = OpBackends(OP)
BACKENDS.register("cuda", _cuda_run, _cuda_rejects,
                  supports="fp32/fp16/bf16 (one dtype), contiguous x, <= 8 segments, fp8 output")
BACKENDS.register("triton", _triton_run, _triton_rejects,
                  supports=f"fp32/fp16/bf16, strided inputs (unit last-dim stride), D <= {MAX_TRITON_D}, "
                           "fp8 output (sm_89+)")
BACKENDS.register("torch", _torch_run, None,
                  supports="fp32/fp16/bf16 (wam_fast.ops.reference, eager in the input dtype; fp8 from fp32)")


# ---- custom op ------------------------------------------------------------------------------------
@torch.library.custom_op("wam_fast::adaln_modulate", mutates_args=())
def adaln_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, segments: List[int],
                      mod_index: List[int], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      eps: float, fp8: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, y_scale): y in x's dtype and an empty y_scale, or (float8_e4m3fn y, (B, N, 1) fp32)."""
    return BACKENDS(x, shift, scale, segments, mod_index, weight, bias, eps, fp8)


@adaln_modulate_op.register_fake
def _(x, shift, scale, segments, mod_index, weight, bias, eps, fp8):
    B, N, D = x.shape
    if fp8:
        return (x.new_empty((B, N, D), dtype=torch.float8_e4m3fn), x.new_empty((B, N, 1), dtype=torch.float32))
    return x.new_empty((B, N, D)), x.new_empty((0,), dtype=torch.float32)


# ---- public function ------------------------------------------------------------------------------
def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, segments, mod_index,
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   eps: float = 1e-5, fp8: bool = False):
    """``LayerNorm(x) (* weight + bias) * (1 + scale[set]) + shift[set]`` per segment.

    Returns y (B, N, D) in x's dtype, or with ``fp8=True`` the pair (y_fp8 float8_e4m3fn (B, N, D),
    y_scale float32 (B, N, 1)) with ``y ~= y_fp8.float() * y_scale`` (quantize_rowwise semantics).
    """
    segments, mod_index = check_modulation_inputs(OP, x, "x", {"shift": shift, "scale": scale}, segments,
                                                  mod_index, weight, bias, eps, fp8)
    x, shift, scale, weight, bias = (last_dim_contiguous(t) for t in (x, shift, scale, weight, bias))
    y, y_scale = torch.ops.wam_fast.adaln_modulate.default(x, shift, scale, segments, mod_index, weight, bias,
                                                           float(eps), fp8)
    return (y, y_scale) if fp8 else y
