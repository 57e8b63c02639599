"""Fused ops (docs/design.md, Ops), one name each across kernel, dispatch, test and benchmark:

    op                     Triton kernel (wam_fast/kernels/)  dispatch + custom op (wam_fast/ops/)  CUDA (csrc/)
    adaln_modulate         adaln_modulate.py                  adaln_modulate.py                     adaln_modulate.cu
    gated_residual_adaln   gated_residual_adaln.py            ...                                   gated_residual_adaln.cu
    gated_residual         gated_residual.py                  ...                                   -
    qk_norm_rope           qk_norm_rope.py                    ...                                   qk_norm_rope.cu
    attention              attention.py                       ...                                   -
    ffn_gelu               ffn_gelu.py                        ...                                   -
    fp8_linear             fp8_linear.py                      ...                                   - (torch._scaled_mm)
    quantize_rowwise       quantize_rowwise.py                ...                                   -

Tests: tests/test_<name>.py; benchmarks: benchmarks/bench_<name>.py; the float32 references are in
wam_fast/ops/reference.py (the reference model calls them too). ``wam_fast.ops.<name>`` is the function; the module holding it and
its ``BACKENDS`` is ``importlib.import_module("wam_fast.ops.<name>")``. Each op is a
``torch.library.custom_op`` (``torch.ops.wam_fast.<name>``) with a fake kernel, so torch.compile (fullgraph) and CUDA graphs see one op; the Python function here
checks its inputs first and raises a message naming what was expected and what came.
Backends: CUDA extension where built, Triton, torch (``registry``); ``use_backend`` forces one.
"""
import importlib

from wam_fast.ops.registry import backends_used, fallbacks, use_backend
from wam_fast.ops.adaln_modulate import adaln_modulate
from wam_fast.ops.attention import attention
from wam_fast.ops.ffn_gelu import ffn_gelu
from wam_fast.ops.fp8_linear import fp8_linear
from wam_fast.ops.gated_residual import gated_residual
from wam_fast.ops.gated_residual_adaln import gated_residual_adaln
from wam_fast.ops.qk_norm_rope import qk_norm_rope
from wam_fast.ops.quantize_rowwise import quantize_rowwise

OPS = ("adaln_modulate", "gated_residual_adaln", "gated_residual", "qk_norm_rope", "attention", "ffn_gelu",
       "fp8_linear", "quantize_rowwise")


def op_module(name: str):
    """The module of op ``name`` (its BACKENDS and helpers); ``wam_fast.ops.<name>`` is the function."""
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; expected one of {OPS}")
    return importlib.import_module(f"wam_fast.ops.{name}")


def backend_table() -> list:
    """Every op's backends on this machine: [{"op", "backend", "status", "detail"}]."""
    rows = []
    for name in OPS:
        rows += op_module(name).BACKENDS.table()
    return rows


__all__ = list(OPS) + ["backend_table", "backends_used", "fallbacks", "op_module", "use_backend"]
