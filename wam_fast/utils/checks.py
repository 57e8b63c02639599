"""The pieces every input check shares: how a tensor and an expected shape are written in an error,
and the shape test. Metadata only (never tensor values): no device sync, clean under torch.compile."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def describe(t) -> str:
    """A tensor as an error message names it: "(2, 5, 32) torch.float32 on cpu"; else its type."""
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def shape_text(shape: Sequence[Optional[int]]) -> str:
    """(2, None, 4) -> "(2, *, 4)": None means any size on that axis."""
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def shape_matches(t: torch.Tensor, shape: Sequence[Optional[int]]) -> bool:
    """t has len(shape) dims and every size that ``shape`` fixes."""
    return t.dim() == len(shape) and all(want is None or want == got for want, got in zip(shape, t.shape))


def require_tensor(name: str, t, prefix: str = "", what: str = "") -> None:
    """TypeError unless ``t`` is a tensor: "<prefix><name> must be a torch.Tensor<what>, got list"."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{prefix}{name} must be a torch.Tensor{what}, got {type(t).__name__}")
