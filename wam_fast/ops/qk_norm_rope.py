"""qk_norm_rope: affine LayerNorm over head_dim on q and on k (B, H, N, hd), then interleaved RoPE
(pairs (x0, x1), (x2, x3), ...: out = x * cos + rotate(x) * sin, rotate(x)[2i] = -x[2i+1],
rotate(x)[2i+1] = x[2i]) on the tokens [rope_start, rope_end) only, with float32 cos, sin tables
(rope_end - rope_start, hd); other tokens are only normalised (docs/design.md, Ops). Returns fresh
contiguous (q_out, k_out) in the input dtype; q and k may be strided views (e.g. of the fused qkv).

KV-cache writes (``k_out=``, ``v=``, ``v_out=``): k is written into the caller's k_out (e.g. the
cache slice ``keys[:, :, start:end]``) and v copied into v_out. That is the custom op
``wam_fast::qk_norm_rope_into`` (mutates k_out, v_out; returns q_out), one launch on the Triton
backend. The torch backend and the CUDA extension (whose kernel writes contiguous outputs only)
run their kernel and then copy k and v into k_out / v_out: two more launches.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from wam_fast.ops import reference as functional
from wam_fast.ops.checks import FLOAT_DTYPES, check_same, check_tensor
from wam_fast.ops.registry import OpBackends, cuda_extension, device_reasons, kernel_module

OP = "qk_norm_rope"
MAX_HEAD_DIM = 256
BACKENDS = OpBackends(OP)


def _tensors(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin):
    return (q, k, q_weight, q_bias, k_weight, k_bias, cos, sin)


def _head_dim_reasons(hd: int) -> List[str]:
    if hd % 2 or hd > MAX_HEAD_DIM or hd <= 0:
        return [f"head_dim must be even and <= {MAX_HEAD_DIM}, got {hd}"]
    return []


# ---- cuda: wam_fast._C.qk_norm_rope (csrc/qk_norm_rope.cu) -------------------------------------
def _cuda_rejects(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start, rope_end, eps,
                  k_out=None, v=None, v_out=None) -> List[str]:
    reasons = device_reasons("cuda", *_tensors(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin))
    reasons += _head_dim_reasons(q.shape[-1])
    if q.dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype must be float32/float16/bfloat16, got {q.dtype}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            reasons.append(f"{name} needs last-dim stride 1, got strides {tuple(t.stride())}")
    for name, t in (("q_weight", q_weight), ("q_bias", q_bias), ("k_weight", k_weight), ("k_bias", k_bias)):
        if t is not None and (t.dtype != q.dtype or not t.is_contiguous()):
            reasons.append(f"{name} must be contiguous {q.dtype}, got {t.dtype}"
                           f"{'' if t.is_contiguous() else ' non-contiguous'}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            reasons.append(f"{name} must be contiguous float32")
    if k_out is not None:  # the Triton kernel writes the cache in its own launch; this one would copy twice
        reasons.append("k_out/v_out cache writes: the CUDA kernel writes contiguous outputs only (two extra "
                       "copies); the Triton kernel writes the cache in the same launch")
    return reasons


def _copy_into(k_result, k_out, v, v_out):
    """The cache writes of the torch and CUDA backends: copies after their kernel (two launches)."""
    if k_out is None:
        return k_result
    k_out.copy_(k_result)
    if v is not None:
        v_out.copy_(v)
    return k_out


def _cuda_run(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start, rope_end, eps,
              k_out=None, v=None, v_out=None):
    _C = cuda_extension()  # the extension module, named as setup.py builds it

    q_res = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_res = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0:  # nothing to launch
        return q_res, _copy_into(k_res, k_out, v, v_out)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    _C.qk_norm_rope(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, int(rope_start), int(rope_end),
                    float(eps), q_res, k_res, stream)
    return q_res, _copy_into(k_res, k_out, v, v_out)


# ---- triton: wam_fast/kernels/qk_norm_rope.py ---------------------------------------------------------------
def triton_kernels():
    """The Triton launcher module wam_fast/kernels/qk_norm_rope.py (imports triton: loaded on first use)."""
    return kernel_module("qk_norm_rope")


def _triton_rejects(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start, rope_end, eps,
                    k_out=None, v=None, v_out=None) -> List[str]:
    reasons = device_reasons("triton", *_tensors(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin),
                             k_out, v, v_out)
    reasons += _head_dim_reasons(q.shape[-1])
    if q.dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype must be float32/float16/bfloat16, got {q.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            reasons.append(f"{name} must be contiguous float32")
    for name, t in (("q_weight", q_weight), ("q_bias", q_bias), ("k_weight", k_weight), ("k_bias", k_bias)):
        if t is not None and t.stride(-1) != 1:
            reasons.append(f"{name} must have stride 1")
    # offsets inside a tile (<= 8192 // hd_pad tokens) are int32 in the kernel
    hd_pad = 1 << max(q.shape[-1] - 1, 0).bit_length()
    for name, t in (("q", q), ("k", k), ("k_out", k_out), ("v", v), ("v_out", v_out)):
        if t is not None and (8192 // hd_pad) * t.stride(2) + t.shape[-1] * t.stride(3) >= 2 ** 31:
            reasons.append(f"{name}'s strides {tuple(t.stride())} overflow the kernel's int32 tile offsets")
    return reasons


def _triton_run(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start, rope_end, eps,
                k_out=None, v=None, v_out=None):
    return triton_kernels().qk_norm_rope(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin,
                                         int(rope_start), int(rope_end), float(eps),
                                         k_out=k_out, v=v, v_out=v_out)


# ---- torch: the reference, in the input dtype --------------------------------------------------
def _torch_run(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start, rope_end, eps,
               k_out=None, v=None, v_out=None):
    q_res, k_res = functional.qk_norm_rope(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin,
                                           rope_start, rope_end, eps)
    return q_res.contiguous(), _copy_into(k_res.contiguous(), k_out, v, v_out)


BACKENDS.register("cuda", _cuda_run, _cuda_rejects,
                  "fp32/fp16/bf16; even head_dim <= 256; q, k any strides with last-dim stride 1; "
                  "k_out/v_out cache writes as two copies after the kernel")
BACKENDS.register("triton", _triton_run, _triton_rejects,
                  "fp32/fp16/bf16; even head_dim <= 256; q, k any strides; k_out/v_out cache writes in "
                  "the same launch")
BACKENDS.register("torch", _torch_run, None,
                  "fp32/fp16/bf16, any strides (wam_fast.ops.reference, in the input dtype); k_out/v_out "
                  "cache writes as copies")


# ---- custom op ---------------------------------------------------------------------------------
@torch.library.custom_op("wam_fast::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, q_weight: Optional[torch.Tensor],
                     q_bias: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                     k_bias: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                     rope_start: int, rope_end: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return BACKENDS(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start, rope_end, eps)


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start, rope_end, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


# The cache-writing variant: writes k into k_out (and v into v_out), returns q_out. A custom op may
# not return one of its inputs, so the public function returns the caller's k_out itself.
@torch.library.custom_op("wam_fast::qk_norm_rope_into", mutates_args=("k_out", "v_out"))
def _qk_norm_rope_into_op(q: torch.Tensor, k: torch.Tensor, q_weight: Optional[torch.Tensor],
                          q_bias: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                          k_bias: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                          rope_start: int, rope_end: int, eps: float, k_out: torch.Tensor,
                          v: Optional[torch.Tensor], v_out: Optional[torch.Tensor]) -> torch.Tensor:
    q_out, _ = BACKENDS(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start, rope_end, eps,
                        k_out=k_out, v=v, v_out=v_out)
    return q_out


@_qk_norm_rope_into_op.register_fake
def _(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, rope_start, rope_end, eps, k_out, v, v_out):
    return q.new_empty(q.shape)


# ---- public function ---------------------------------------------------------------------------
def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"wam_fast.ops.{OP}: {name} must be an int, got {type(value).__name__} {value!r}")


def _check_outputs(q: torch.Tensor, k_out, v, v_out) -> None:
    """k_out / v / v_out: given together as the cache writes need, (B, H, N, hd) like q, q's dtype
    and device, outputs with unit last-dim stride (any other strides: slices of a cache buffer)."""
    if k_out is None and (v is not None or v_out is not None):
        raise ValueError(f"wam_fast.ops.{OP}: v and v_out are the cache write of the values and go with "
                         f"k_out (the write of the keys), got k_out=None")
    if (v is None) != (v_out is None):
        given = lambda t: "a tensor" if t is not None else None  # noqa: E731
        raise ValueError(f"wam_fast.ops.{OP}: v and v_out go together (v is copied into v_out), got "
                         f"v={given(v)}, v_out={given(v_out)}")
    for name, t in (("k_out", k_out), ("v", v), ("v_out", v_out)):
        if t is None:
            continue
        check_tensor(OP, name, t, ndim=4)
        if t.shape != q.shape:
            raise ValueError(f"wam_fast.ops.{OP}: {name} must have q's shape {tuple(q.shape)} (B, H, N, head_dim), "
                             f"got {tuple(t.shape)}")
        check_same(OP, "q", q, **{name: t})
        if name != "v" and t.stride(-1) != 1:
            raise ValueError(f"wam_fast.ops.{OP}: {name} needs last-dim stride 1 (any other strides), got "
                             f"strides {tuple(t.stride())}")


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: Optional[torch.Tensor],
                 q_bias: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                 k_bias: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                 rope_start: int, rope_end: int, eps: float = 1e-6, *, k_out: Optional[torch.Tensor] = None,
                 v: Optional[torch.Tensor] = None,
                 v_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm(q), LayerNorm(k) over head_dim (affine; weights/biases (hd,) or None), then
    interleaved RoPE on tokens [rope_start, rope_end) with float32 cos, sin (rope_end - rope_start, hd).

    q, k: (B, H, N, hd), same shape, dtype (float32/float16/bfloat16) and device; any strides (views
    of the fused qkv projection are read in place). Returns contiguous (q_out, k_out) in q's dtype.

    Cache writes: with ``k_out`` ((B, H, N, hd), q's dtype and device, unit last-dim stride, e.g. the
    slice ``keys[:, :, start:end]`` of a cache buffer) the result k is written into it and k_out is
    returned as the second result; with ``v`` and ``v_out`` too (same shape and dtype; v any strides)
    v is copied into v_out. One launch on the Triton backend; the torch and CUDA backends copy after
    their kernel. k_out and v_out must not overlap q, k or v.
    """
    check_tensor(OP, "q", q, ndim=4)
    check_tensor(OP, "k", k, ndim=4)
    if k.shape != q.shape:
        raise ValueError(f"wam_fast.ops.{OP}: k must have q's shape {tuple(q.shape)} (B, H, N, head_dim), "
                         f"got {tuple(k.shape)}")
    check_same(OP, "q", q, k=k)
    _, _, n, hd = q.shape
    if hd % 2 or hd > MAX_HEAD_DIM or hd == 0:
        raise ValueError(f"wam_fast.ops.{OP}: head_dim (q.shape[-1]) must be even and <= {MAX_HEAD_DIM} "
                         f"(RoPE rotates pairs), got {hd}")
    for name, t in (("q_weight", q_weight), ("q_bias", q_bias), ("k_weight", k_weight), ("k_bias", k_bias)):
        if t is not None:
            check_tensor(OP, name, t, shape=(hd,))
    check_same(OP, "q", q, q_weight=q_weight, q_bias=q_bias, k_weight=k_weight, k_bias=k_bias)
    _check_int("rope_start", rope_start)
    _check_int("rope_end", rope_end)
    if not 0 <= rope_start <= rope_end <= n:
        raise ValueError(f"wam_fast.ops.{OP}: need 0 <= rope_start <= rope_end <= N = {n} (q.shape[2]), "
                         f"got rope_start={rope_start}, rope_end={rope_end}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(OP, name, t, shape=(rope_end - rope_start, hd), dtypes=(torch.float32,))
    check_same(OP, "q", q, dtype=False, cos=cos, sin=sin)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"wam_fast.ops.{OP}: eps must be a float, got {type(eps).__name__} {eps!r}")
    if not eps >= 0:
        raise ValueError(f"wam_fast.ops.{OP}: eps must be >= 0, got {eps}")
    _check_outputs(q, k_out, v, v_out)
    q_weight, q_bias, k_weight, k_bias = (None if t is None else t.contiguous()
                                          for t in (q_weight, q_bias, k_weight, k_bias))
    args = (q, k, q_weight, q_bias, k_weight, k_bias, cos.contiguous(), sin.contiguous(), rope_start, rope_end,
            float(eps))
    if k_out is None:
        return torch.ops.wam_fast.qk_norm_rope.default(*args)
    q_out = torch.ops.wam_fast.qk_norm_rope_into.default(*args, k_out, v, v_out)
    return q_out, k_out
