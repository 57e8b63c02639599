"""``attention(q, k, v, q_segments=None, k_segments=None, mask="full")``: softmax(q k^T / sqrt(hd)) v.

Semantics (docs/design.md, Ops, reference ``wam_fast.ops.reference.attention``, i.e. SDPA):
q (B, H, Nq, hd), k and v (B, H, Nk, hd) with Nk >= Nq (a cached prefix: the keys of context tokens
come first). ``mask="full"``: every query sees every key. ``mask="temporal"``: q_segments (Nq,) and
k_segments (Nk,) integer segment ids; a query of segment i sees the keys of segments <= i (by id, not
position; ids need not be sorted). A query that sees no key at all gets zeros (SDPA would give NaN).
The output is a fresh (B, H, Nq, hd) tensor in q's dtype, laid out (B, Nq, H, hd) in memory (the
transpose of a contiguous (B, Nq, H, hd) tensor), so ``o.transpose(1, 2).reshape(b, n, -1)`` before
the output projection is a free view. Backends: Triton (flash-style forward, online softmax, fp32
accumulation, fully masked key blocks skipped; writes that layout directly), torch (SDPA; its
(B, H, Nq, hd)-contiguous result is copied into that layout, the copy the model's reshape would
otherwise make). The fake kernel gives the same strides, so torch.compile sees the real layout.

Optional external kernels (``EXTERNAL_BACKENDS``: flash-attn, xformers) serve full-mask calls of the
modules ``wam_fast.compile`` swaps in (``CompileConfig(attention="flash-attn")``) through
``attention_with(backend, q, k, v)``. They are detected with ``wam_fast.utils.optional`` (no import) and
imported only when a call runs (``import wam_fast`` never imports them); a call they cannot take
(CPU tensors, fp32, head_dim, ...) runs this op instead and the fallback is noted once
(``wam_fast.ops.fallbacks()``, ``python -m wam_fast.info``).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from wam_fast.ops import reference as WF
from wam_fast.ops.checks import FLOAT_DTYPES, check_same, check_tensor
from wam_fast.ops.registry import OpBackends, device_reasons, kernel_module, note_fallback
from wam_fast.utils import optional

OP = "attention"
BACKENDS = OpBackends(OP)
MASKS = ("full", "temporal")
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8  # what flash attention takes; the Triton kernel pads the tile to a power of two
SEGMENT_DTYPES = (torch.int32, torch.int64)


def _kernel_module():
    """The Triton launcher module wam_fast/kernels/attention.py (imports triton: loaded on first use)."""
    return kernel_module("attention")


def head_dim_reason(hd: int) -> Optional[str]:
    """None when this op takes head_dim ``hd`` (every backend), else why not."""
    if hd % HEAD_DIM_MULTIPLE or not 0 < hd <= MAX_HEAD_DIM:
        return f"head_dim {hd} is not supported (takes multiples of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM})"
    return None


def output_empty(q: torch.Tensor, nq: int) -> torch.Tensor:
    """The op's output buffer: (B, H, Nq, hd) in q's dtype, laid out (B, Nq, H, hd) (the layout of
    wam_fast/kernels/attention.py's ``bnhd_empty``); empty_strided, not a transposed view, so it has no _base."""
    b, h, _, hd = q.shape
    return torch.empty_strided((b, h, nq, hd), (nq * h * hd, hd, h * hd, 1), dtype=q.dtype, device=q.device)


# ---- backends ------------------------------------------------------------------------------------
def _run_triton(q, k, v, q_segments, k_segments, mask):
    return _kernel_module().attention(q, k, v, q_segments, k_segments, temporal=(mask == "temporal"))


def _rejects_triton(q, k, v, q_segments, k_segments, mask) -> List[str]:
    reasons = device_reasons("triton", q, k, v, q_segments, k_segments)
    if q.dtype not in FLOAT_DTYPES:
        reasons.append(f"dtype {q.dtype} (takes float32, float16, bfloat16)")
    why = head_dim_reason(q.shape[-1])
    if why:
        reasons.append(why)
    return reasons


def _run_torch(q, k, v, q_segments, k_segments, mask):
    out = WF.attention(q, k, v, q_segments, k_segments, mask)
    if mask == "temporal" and out.numel():
        # a query sees some key iff the smallest key segment id is <= its own; SDPA gives NaN (or,
        # in some PyTorch versions, zeros) for a query that sees none: make it zeros everywhere
        sees_any = k_segments.min() <= q_segments
        out = torch.where(sees_any[:, None], out, out.new_zeros(()))
    # into the op's layout (what the fake kernel, and so torch.compile, says): one copy, the one the
    # model's transpose(1, 2).reshape would make otherwise
    return output_empty(q, q.shape[2]).copy_(out)


BACKENDS.register("triton", _run_triton, _rejects_triton,
                  supports="fp32 (IEEE, no TF32 unless allowed)/fp16/bf16; head_dim a multiple of 8 up to 256 "
                           "(padded to a power-of-two tile); any "
                           "lengths, strided q/k/v (unit last-dim stride); full or temporal (skips masked key blocks); "
                           "writes the (B, Nq, H, hd) output layout directly")
BACKENDS.register("torch", _run_torch, supports="any float dtype and device (SDPA, boolean mask for temporal; "
                                                "one copy into the (B, Nq, H, hd) output layout)")


# ---- custom op -----------------------------------------------------------------------------------
@torch.library.custom_op("wam_fast::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_segments: Optional[torch.Tensor],
                 k_segments: Optional[torch.Tensor], mask: str) -> torch.Tensor:
    return BACKENDS(q, k, v, q_segments, k_segments, mask)


@attention_op.register_fake
def _(q, k, v, q_segments, k_segments, mask):
    return output_empty(q, q.shape[2])


# ---- public function -------------------------------------------------------------------------------
def _check_segments(name: str, seg, length: int, what: str, q: torch.Tensor) -> None:
    if seg is None:
        raise ValueError(f"wam_fast.ops.{OP}: mask='temporal' needs q_segments and k_segments (per-token "
                         f"segment ids), got {name}=None")
    if not isinstance(seg, torch.Tensor):
        raise TypeError(f"wam_fast.ops.{OP}: {name} must be a torch.Tensor of segment ids, got {type(seg).__name__}")
    if seg.dtype not in SEGMENT_DTYPES:
        raise TypeError(f"wam_fast.ops.{OP}: {name} must be int32 or int64 segment ids, got {seg.dtype}")
    if seg.dim() != 1 or seg.shape[0] != length:
        raise ValueError(f"wam_fast.ops.{OP}: {name} must have shape ({length},) (one id per {what}), "
                         f"got {tuple(seg.shape)}")
    if seg.device != q.device:
        raise ValueError(f"wam_fast.ops.{OP}: {name} is on {seg.device} but q is on {q.device}; put them on one device")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_segments: Optional[torch.Tensor] = None,
              k_segments: Optional[torch.Tensor] = None, mask: str = "full") -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over (B, H, N, hd) tensors; see the module docstring.

    q (B, H, Nq, hd); k, v (B, H, Nk, hd) with Nk >= Nq, same dtype and device; head_dim a multiple
    of 8 up to 256. ``mask="temporal"``: q_segments (Nq,), k_segments (Nk,) int32/int64 ids, a query of
    segment i sees keys of segments <= i; with ``mask="full"`` segments are ignored. Rows that see no
    key are zeros. Strided views (unit last-dim stride) are read in place. Returns (B, H, Nq, hd)
    in q's dtype whose transpose(1, 2) is contiguous ((B, Nq, H, hd) in memory).
    """
    check_tensor(OP, "q", q, ndim=4)
    check_tensor(OP, "k", k, ndim=4)
    check_tensor(OP, "v", v, ndim=4)
    check_same(OP, "q", q, k=k, v=v)
    b, h, nq, hd = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"wam_fast.ops.{OP}: k and v must have the same shape (B, H, Nk, hd), got "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != hd:
        raise ValueError(f"wam_fast.ops.{OP}: k/v must be (B, H, Nk, hd) = ({b}, {h}, *, {hd}) like q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    nk = k.shape[2]
    if nk < nq:
        raise ValueError(f"wam_fast.ops.{OP}: k/v have {nk} keys but q has {nq} queries; Nk >= Nq is required "
                         f"(the queries' own keys are the last Nq, a cached prefix comes first)")
    why = head_dim_reason(hd)
    if why:
        raise ValueError(f"wam_fast.ops.{OP}: {why}; got q {tuple(q.shape)}")
    if not isinstance(mask, str) or mask not in MASKS:
        raise ValueError(f"wam_fast.ops.{OP}: mask must be one of {MASKS}, got {mask!r}")
    if mask == "temporal":
        _check_segments("q_segments", q_segments, nq, "query", q)
        _check_segments("k_segments", k_segments, nk, "key", q)
    else:
        q_segments = k_segments = None
    return torch.ops.wam_fast.attention.default(q, k, v, q_segments, k_segments, mask)


# ---- optional external kernels: flash-attn, xformers ----------------------------------------------------
# name -> python module, install line, dtypes and head dims the kernel takes (full mask only)
EXTERNAL_BACKENDS = {
    "flash-attn": {"module": "flash_attn", "install": optional.OPTIONAL_PACKAGES["flash-attn"]["install"],
                   "dtypes": (torch.float16, torch.bfloat16), "max_head_dim": 256, "head_dim_multiple": 8},
    "xformers": {"module": "xformers", "install": optional.OPTIONAL_PACKAGES["xformers"]["install"],
                 "dtypes": (torch.float16, torch.bfloat16, torch.float32), "max_head_dim": 256,
                 "head_dim_multiple": 1},
}
ATTENTION_BACKENDS = ("auto",) + tuple(EXTERNAL_BACKENDS)  # "auto": this op's own dispatch (cuda/triton/torch)


def external_reason(name: str) -> Optional[str]:
    """Why the optional attention backend ``name`` cannot run on this machine, or None. Names the
    package and its install line when it is missing. Nothing is imported."""
    if name not in EXTERNAL_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {ATTENTION_BACKENDS}")
    spec = EXTERNAL_BACKENDS[name]
    if not optional.installed(spec["module"]):
        return f"{name} is not installed (python module {spec['module']!r}): {spec['install']}"
    if not torch.cuda.is_available():
        return f"{name} runs on CUDA GPUs only, and no CUDA device is visible"
    return None


def external_rejects(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str = "full") -> List[str]:
    """Reasons the optional backend ``name`` cannot take this call ([] = it can)."""
    spec = EXTERNAL_BACKENDS[name]
    reasons = []
    if mask != "full":
        reasons.append(f"mask={mask!r} (segment masks run in wam_fast's own kernel)")
    devices = {t.device.type for t in (q, k, v)}
    if devices != {"cuda"}:
        reasons.append(f"needs CUDA tensors, got {sorted(devices)}")
    if q.dtype not in spec["dtypes"]:
        reasons.append(f"dtype {q.dtype} (takes {[str(d).replace('torch.', '') for d in spec['dtypes']]})")
    hd = q.shape[-1]
    if hd > spec["max_head_dim"] or hd % spec["head_dim_multiple"]:
        reasons.append(f"head_dim {hd} (takes multiples of {spec['head_dim_multiple']} up to {spec['max_head_dim']})")
    return reasons


def _run_external(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # both kernels take (B, N, H, hd) with a unit last-dim stride: transposed views of (B, H, N, hd)
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    if name == "flash-attn":
        from flash_attn import flash_attn_func

        out = flash_attn_func(q_, k_, v_)
    else:
        from xformers.ops import memory_efficient_attention

        out = memory_efficient_attention(q_, k_, v_)
    return out.transpose(1, 2)


def attention_with(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full-mask attention over (B, H, N, hd) through ``backend``: "auto" is ``attention`` (this op's
    own dispatch); "flash-attn" / "xformers" run that package's kernel where it takes the call and
    ``attention`` otherwise, noting the fallback once. Returns (B, H, Nq, hd) in q's dtype."""
    if backend != "auto":
        why = external_reason(backend)
        reasons = [why] if why is not None else external_rejects(backend, q, k, v)
        if not reasons:
            return _run_external(backend, q, k, v)
        note_fallback(OP, "wam_fast", [f"{backend}: {'; '.join(reasons)}"])
    return attention(q, k, v)
