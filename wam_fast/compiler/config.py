"""``CompileConfig``: what ``wam_fast.compile`` does, and the constants its levers share."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from wam_fast.utils.optional import OPTIONAL_PACKAGES

from wam_fast.quant import FP8Config

FilterFn = Callable[[nn.Module, str], bool]

BACKENDS = ("inductor", "eager", "tensorrt")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs
ATTENTION = ("auto", "flash-attn", "xformers")
REL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DEFAULT_REL_TOLERANCE = 1e-4  # other dtypes (float64, ...)
COMPILED_FP8_MIN_SQNR_DB = 40.0  # torch.compile of an FP8 model vs the same model eager
SMALL_GEMM_FACTOR = 8  # FP8 skips a linear that sees <= 1/8 of the rows the biggest one sees (example inputs)
TENSORRT = {"module": "torch_tensorrt", "package": "torch-tensorrt",
            "install": OPTIONAL_PACKAGES["torch-tensorrt"]["install"]}


@dataclass(frozen=True)
class CompileConfig:
    """What ``compile`` does.

    fused        swap modules for versions that call the fused ``wam_fast.ops`` (WAMTransformer block
                 pieces, CogVideoX attention processor / AdaLN blocks / GELU, nn.MultiheadAttention)
    fp8          quantize linears to float8 e4m3 (``wam_fast.quantize_fp8``) with ``fp8_config``
                 (an ``FP8Config``; None = its defaults); needs an sm_89+ GPU (or the CPU)
    cache        WAMPolicy: use the temporal KV cache (mask="temporal" models); False turns it off.
                 On anything else it is reported as not applicable.
    cuda_graphs  None: on where CUDA is (WAMPolicy: the sampling loop; a module: torch.compile's
                 CUDA graphs); True: required (an error where it cannot be done); False: off
    backend      "inductor" (torch.compile), "eager" (no torch.compile: the other levers only),
                 "tensorrt" (torch.compile(backend="torch_tensorrt"); needs torch-tensorrt and CUDA)
    compile_mode torch.compile mode (None: default, or "reduce-overhead" on CUDA with cuda_graphs)
    compile_options  backend options (inductor: ``torch._inductor.config`` keys) for this model's
                 compile only; torch.compile takes either a mode or options, not both
    fullgraph, dynamic   passed to torch.compile (dynamic=False: static shapes, one graph per shape)
    attention    kernel for the swapped attention modules: "auto" (wam_fast.ops.attention: CUDA /
                 Triton / SDPA), "flash-attn" or "xformers" (optional packages; full-mask calls they
                 accept, wam_fast's kernel otherwise)
    min_fp8_sqnr_db  the accuracy check's threshold for the fp8 lever (with example_inputs)
    """

    fused: bool = True
    fp8: bool = False
    fp8_config: Any = None
    cache: bool = True
    cuda_graphs: Optional[bool] = None
    backend: str = "inductor"
    compile_mode: Optional[str] = None
    compile_options: Optional[Mapping[str, Any]] = None
    fullgraph: bool = False
    dynamic: Optional[bool] = False
    attention: str = "auto"
    min_fp8_sqnr_db: float = 20.0

    def __post_init__(self):
        for name in ("fused", "fp8", "cache", "fullgraph"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"CompileConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("cuda_graphs", "dynamic"):
            if getattr(self, name) not in (None, True, False):
                raise TypeError(f"CompileConfig.{name} must be None, True or False, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"CompileConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"CompileConfig.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.compile_options is not None:
            if not isinstance(self.compile_options, Mapping):
                raise TypeError(f"CompileConfig.compile_options must be a dict, got "
                                f"{type(self.compile_options).__name__}")
            if self.compile_mode is not None:
                raise ValueError("CompileConfig: give compile_mode or compile_options, not both (torch.compile "
                                 f"takes one of them), got mode={self.compile_mode!r} and options")
        if self.attention not in ATTENTION:
            raise ValueError(f"CompileConfig.attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.fp8_config is not None:
            if not isinstance(self.fp8_config, FP8Config):
                raise TypeError(f"CompileConfig.fp8_config must be a wam_fast.FP8Config or None, "
                                f"got {type(self.fp8_config).__name__}")
            if not self.fp8:
                raise ValueError("CompileConfig: fp8_config given but fp8=False; set fp8=True to quantize")
        if isinstance(self.min_fp8_sqnr_db, bool) or not isinstance(self.min_fp8_sqnr_db, (int, float)) \
                or not math.isfinite(self.min_fp8_sqnr_db):
            raise ValueError(f"CompileConfig.min_fp8_sqnr_db must be a finite number, got {self.min_fp8_sqnr_db!r}")
