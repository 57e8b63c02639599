"""Input checks shared by the ops: metadata only (shapes, dtypes, devices), never tensor values, so
they cost no GPU sync and trace cleanly under torch.compile. Errors name what was expected and what came."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from wam_fast.utils.checks import describe, require_tensor, shape_matches, shape_text

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, t, ndim: Optional[int] = None, shape: Optional[Sequence[Optional[int]]] = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """t is a tensor with ndim dims, a shape matching ``shape`` (None = any size) and one of ``dtypes``."""
    require_tensor(name, t, prefix=f"wam_fast.ops.{op}: ")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"wam_fast.ops.{op}: {name} must have {ndim} dims"
                         f"{' ' + shape_text(shape) if shape is not None else ''}, got {describe(t)}")
    if shape is not None and not shape_matches(t, shape):
        raise ValueError(f"wam_fast.ops.{op}: {name} must have shape {shape_text(shape)}, got {describe(t)}")
    if t.dtype not in dtypes:
        raise TypeError(f"wam_fast.ops.{op}: {name} must be one of {[str(d) for d in dtypes]}, got {describe(t)}")


def check_same(op: str, reference_name: str, reference: torch.Tensor, dtype: bool = True, **others) -> None:
    """Every tensor in ``others`` (None allowed) is on reference's device (and has its dtype)."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != reference.device:
            raise ValueError(f"wam_fast.ops.{op}: {name} is on {t.device} but {reference_name} is on "
                             f"{reference.device}; put them on one device")
        if dtype and t.dtype != reference.dtype:
            raise TypeError(f"wam_fast.ops.{op}: {name} is {t.dtype} but {reference_name} is {reference.dtype}; "
                            f"they must match")


def check_residual_pair(op: str, residual, x) -> None:
    """residual and x of a gated residual: (B, N, D) tensors of one shape, dtype and device."""
    check_tensor(op, "residual", residual, ndim=3)
    check_tensor(op, "x", x, ndim=3)
    check_same(op, "residual", residual, x=x)
    if x.shape != residual.shape:
        raise ValueError(f"wam_fast.ops.{op}: x must have residual's shape {tuple(residual.shape)}, "
                         f"got {tuple(x.shape)}")


def check_segments(op: str, segments, mod_index, num_tokens: int, num_sets: int) -> None:
    """segments: consecutive token counts summing to num_tokens; mod_index: a set in [0, num_sets) per segment."""
    try:
        segments, mod_index = tuple(segments), tuple(mod_index)
    except TypeError:
        raise TypeError(f"wam_fast.ops.{op}: segments and mod_index must be sequences of ints, got "
                        f"{type(segments).__name__} and {type(mod_index).__name__}") from None
    if not segments or not all(isinstance(s, int) and s >= 0 for s in segments):
        raise ValueError(f"wam_fast.ops.{op}: segments must be non-negative ints (token count per segment), "
                         f"got {segments}")
    if sum(segments) != num_tokens:
        raise ValueError(f"wam_fast.ops.{op}: segments {segments} sum to {sum(segments)}, but x has "
                         f"{num_tokens} tokens")
    if len(mod_index) != len(segments):
        raise ValueError(f"wam_fast.ops.{op}: mod_index needs one modulation set per segment "
                         f"({len(segments)}), got {len(mod_index)}: {mod_index}")
    bad = [m for m in mod_index if not isinstance(m, int) or not 0 <= m < num_sets]
    if bad:
        raise ValueError(f"wam_fast.ops.{op}: mod_index entries must be in [0, {num_sets}) (shift/scale have "
                         f"{num_sets} sets), got {mod_index}")
