"""``fp8_linear(x_fp8, x_scale, weight_fp8, weight_scale, bias=None, out_dtype=torch.bfloat16)``.

Semantics (docs/design.md, Ops, reference ``wam_fast.ops.reference.fp8_linear``):
``y = (x_fp8 @ weight_fp8.T) * x_scale * weight_scale.T + bias`` with an fp32 accumulator (on Hopper,
FP8 fast accumulation: see FAST_ACCUM), returned in ``out_dtype``. x_fp8 (..., K) and weight_fp8 (Nout, K) are float8_e4m3fn; x_scale is float32 with one
scale per row of x, shape (..., 1) (dynamic per-token quantization; ``functional.quantize_rowwise``
and ``gated_residual_adaln(..., fp8=True)`` make it), or a single element (static per-tensor);
weight_scale is float32 (Nout,) or (Nout, 1), one per output channel; bias (Nout,) or None.

Backends, in the registry's order:
- triton: ``wam_fast/kernels/fp8_linear.py``, FP8 tensor cores with the dequantization and bias in the
  epilogue; any M, N, K (masked tails).
- torch: ``torch._scaled_mm`` (cuBLASLt on a GPU, also on CPU): row-wise scales on CPU and on
  sm_90+ with a bf16 output; elsewhere on sm_89+ a unit-scale FP8 GEMM to fp32 and the scales and
  bias applied in torch (one more pass). On CUDA, K and Nout that are not multiples of 16 are
  zero-padded per call (cuBLASLt needs 16-byte aligned dims: a copy, so quantize aligned layers).
  Where ``torch._scaled_mm`` cannot run (another device), the dequantized fp32 reference does,
  and that fallback is logged once.

A CUDA GPU below compute capability 8.9 has no FP8 tensor cores: the call is refused with a
RuntimeError naming the capability and the alternative (keep the model in bf16).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from wam_fast.ops import reference as WF
from wam_fast.ops.checks import FLOAT_DTYPES, check_tensor
from wam_fast.ops.registry import OpBackends, device_reasons, kernel_module, note_fallback

OP = "fp8_linear"
FP8_DTYPE = torch.float8_e4m3fn
MIN_CAPABILITY = (8, 9)          # FP8 e4m3 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards
ROWWISE_MIN_CAPABILITY = (9, 0)  # cuBLASLt row-wise scaled FP8 GEMM (torch._scaled_mm), bf16 output
CUDA_ALIGN = 16                  # cuBLASLt FP8: K and Nout multiples of 16
# Hopper's FP8 tensor cores add with reduced internal precision unless partial sums are promoted to
# fp32 (slower). For inference the fast path is used (as torchao does): its ~1e-4..1e-3 relative error
# is far below e4m3's rounding (~3% per element, ~28 dB). The Triton kernel uses Triton's default,
# which is the same fast accumulation on sm_90.
FAST_ACCUM = True
BACKENDS = OpBackends(OP)


# ---- capability ----------------------------------------------------------------------------------
def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def fp8_device_error(device: torch.device) -> Optional[str]:
    """Why FP8 matmuls cannot run on ``device`` (a CUDA GPU below sm_89), or None. Not cached: the
    capability query is cheap (torch caches device properties) and tests patch it."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = _cuda_index(device)
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) >= MIN_CAPABILITY:
        return None
    return (f"FP8 (float8_e4m3fn) matmuls need a GPU of compute capability >= 8.9 (sm_89: RTX 4090, L40; "
            f"sm_90: H100), but cuda:{index} has compute capability {major}.{minor} (sm_{major}{minor}). "
            f"Alternative: keep the model in bf16 (do not call wam_fast.quantize_fp8), or run on an sm_89+ GPU")


def check_fp8_device(device: torch.device) -> None:
    """Raise a RuntimeError when FP8 matmuls cannot run on ``device``."""
    error = fp8_device_error(device)
    if error is not None:
        raise RuntimeError(error)


# ---- torch backend: torch._scaled_mm, else the dequantized reference ------------------------------
def scaled_mm_reasons(device: torch.device) -> List[str]:
    """Why torch._scaled_mm cannot run FP8 on this device ([] = it can)."""
    if device.type == "cpu":
        return [] if hasattr(torch, "_scaled_mm") else [f"torch {torch.__version__} has no torch._scaled_mm"]
    if device.type == "cuda":
        error = fp8_device_error(device)
        return [error] if error else []
    return [f"torch._scaled_mm runs on cpu and cuda, got {device.type}"]


def _rowwise_supported(device: torch.device, out_dtype: torch.dtype) -> bool:
    if device.type == "cpu":
        return True  # any output dtype (measured: torch 2.13 CPU)
    capability = torch.cuda.get_device_capability(_cuda_index(device))
    return capability >= ROWWISE_MIN_CAPABILITY and out_dtype == torch.bfloat16


def _pad_last(t: torch.Tensor, pad: int, value: float = 0.0) -> torch.Tensor:
    if not pad:
        return t
    if t.dtype == FP8_DTYPE:  # pad the bytes: 0x00 is +0.0 in e4m3 (constant_pad_nd has no fp8 kernel)
        return F.pad(t.view(torch.uint8), (0, pad)).view(FP8_DTYPE)
    return F.pad(t, (0, pad), value=value)


def scaled_mm(x, x_scale, weight, weight_scale, bias, out_dtype, align: Optional[int] = None) -> torch.Tensor:
    """fp8_linear through torch._scaled_mm. ``align``: pad K and Nout to a multiple (default: 16 on
    CUDA, none on CPU; tests pass 16 on CPU to run the padding)."""
    K, N = x.shape[-1], weight.shape[0]
    lead = tuple(x.shape[:-1])
    M = x.numel() // K if K else 0
    if M == 0 or N == 0 or K == 0:
        return WF.fp8_linear(x, x_scale, weight, weight_scale, bias, out_dtype)
    if align is None:
        align = CUDA_ALIGN if x.device.type == "cuda" else 1
    pad_k, pad_n = (-K) % align, (-N) % align
    a = _pad_last(x.reshape(M, K).contiguous(), pad_k)                  # row-major (M, K)
    b = _pad_last(weight.contiguous(), pad_k)                           # (N, K) row-major = W^T column-major
    if pad_n:
        b = F.pad(b.view(torch.uint8), (0, 0, 0, pad_n)).view(FP8_DTYPE)
    scale_a = (x_scale.reshape(1, 1).expand(M, 1) if x_scale.numel() == 1 else x_scale.reshape(M, 1))
    scale_a = scale_a.float().contiguous()
    scale_b = _pad_last(weight_scale.reshape(1, N).float(), pad_n, value=1.0).contiguous()
    if _rowwise_supported(x.device, out_dtype):
        if bias is not None:  # cuBLASLt takes a bias in the output dtype
            bias = _pad_last(bias.to(out_dtype if x.device.type == "cuda" else bias.dtype), pad_n)
        y = torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype,
                             use_fast_accum=FAST_ACCUM)
    else:  # sm_89, or a non-bf16 output on a GPU: FP8 GEMM with unit scales to fp32, dequantize in torch
        one = torch.ones((), dtype=torch.float32, device=x.device)
        acc = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=FAST_ACCUM)
        acc = acc * scale_a * scale_b
        if bias is not None:
            acc = acc + _pad_last(bias.float(), pad_n)
        y = acc.to(out_dtype)
    if pad_n:
        y = y[:, :N]
    return y.reshape(*lead, N)


def _run_torch(x, x_scale, weight, weight_scale, bias, out_dtype):
    reasons = scaled_mm_reasons(x.device)
    if reasons:
        note_fallback(OP, "torch (dequantized fp32 reference)", [f"torch._scaled_mm: {'; '.join(reasons)}"])
        return WF.fp8_linear(x, x_scale, weight, weight_scale, bias, out_dtype)
    return scaled_mm(x, x_scale, weight, weight_scale, bias, out_dtype)


# ---- triton backend ------------------------------------------------------------------------------
def _run_triton(x, x_scale, weight, weight_scale, bias, out_dtype):
    return kernel_module(OP).fp8_linear(x, x_scale, weight, weight_scale, bias, out_dtype)


def _rejects_triton(x, x_scale, weight, weight_scale, bias, out_dtype) -> List[str]:
    return device_reasons("triton", x, x_scale, weight, weight_scale, bias)


BACKENDS.register("triton", _run_triton, _rejects_triton,
                  supports="e4m3 x e4m3 -> fp32 accumulate, row/tensor x scale, per-channel w scale, bias in the "
                           "epilogue; fp32/fp16/bf16 out; any M, N, K; sm_89+")
BACKENDS.register("torch", _run_torch,
                  supports="torch._scaled_mm (CPU; CUDA sm_89+, row-wise on sm_90+ with bf16 out, K/N padded to 16); "
                           "else the dequantized fp32 reference")


# ---- custom op -----------------------------------------------------------------------------------
@torch.library.custom_op("wam_fast::fp8_linear", mutates_args=())
def fp8_linear_op(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    return BACKENDS(x, x_scale, weight, weight_scale, bias, out_dtype)


@fp8_linear_op.register_fake
def _(x, x_scale, weight, weight_scale, bias, out_dtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


# ---- public function -------------------------------------------------------------------------------
def fp8_linear(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(x @ weight.T) * x_scale * weight_scale.T + bias`` from FP8 operands: x (..., K) and weight
    (Nout, K) float8_e4m3fn, x_scale float32 (..., 1) or one element, weight_scale float32 (Nout,) or
    (Nout, 1), bias (Nout,) or None -> (..., Nout) in out_dtype (fp32 accumulation)."""
    check_tensor(OP, "x", x, dtypes=(FP8_DTYPE,))
    if x.dim() < 1:
        raise ValueError(f"wam_fast.ops.{OP}: x must have at least 1 dim (..., K), got a 0-dim tensor")
    check_tensor(OP, "weight", weight, ndim=2, dtypes=(FP8_DTYPE,))
    K, N = x.shape[-1], weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"wam_fast.ops.{OP}: weight must be (Nout, K) with K = x.shape[-1] = {K} "
                         f"(nn.Linear layout), got weight {tuple(weight.shape)} for x {tuple(x.shape)}")
    check_tensor(OP, "x_scale", x_scale, dtypes=(torch.float32,))
    if x_scale.numel() != 1 and tuple(x_scale.shape) != (*x.shape[:-1], 1):
        raise ValueError(f"wam_fast.ops.{OP}: x_scale must be (..., 1) = {(*x.shape[:-1], 1)} (one scale per row "
                         f"of x) or a single element (per tensor), got {tuple(x_scale.shape)}")
    check_tensor(OP, "weight_scale", weight_scale, dtypes=(torch.float32,))
    if tuple(weight_scale.shape) not in ((N,), (N, 1)):
        raise ValueError(f"wam_fast.ops.{OP}: weight_scale must be ({N},) or ({N}, 1) (one scale per output "
                         f"channel), got {tuple(weight_scale.shape)}")
    if bias is not None:
        check_tensor(OP, "bias", bias, shape=(N,))
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"wam_fast.ops.{OP}: out_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, "
                        f"got {out_dtype}")
    for name, t in (("x_scale", x_scale), ("weight", weight), ("weight_scale", weight_scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"wam_fast.ops.{OP}: {name} is on {t.device} but x is on {x.device}; "
                             f"put them on one device")
    check_fp8_device(x.device)
    return torch.ops.wam_fast.fp8_linear.default(x, x_scale, weight, weight_scale, bias, out_dtype)
