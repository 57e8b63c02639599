"""wam_fast: inference optimisation for world action models (see README.md).

Importing this package is cheap: no CUDA initialisation, no optional dependency. Submodules load
on first attribute access.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute); resolved lazily so `import wam_fast` stays lean.
_LAZY = {
    "configs": ("wam_fast.configs", None),
    "ops": ("wam_fast.ops", None),
    "cache": ("wam_fast.cache", None),
    "TemporalKVCache": ("wam_fast.cache", "TemporalKVCache"),
    "WAMPolicy": ("wam_fast.policy", "WAMPolicy"),
    "quant": ("wam_fast.quant", None),
    "quantize_fp8": ("wam_fast.quant", "quantize_fp8"),
    "FP8Config": ("wam_fast.quant", "FP8Config"),
    "compile": ("wam_fast.compiler", "compile"),
    "CompileConfig": ("wam_fast.compiler", "CompileConfig"),
    "compile_report": ("wam_fast.compiler", "compile_report"),
    "WAMConfig": ("wam_fast.configs", "WAMConfig"),
    "WAMTransformer": ("wam_fast.models.transformer", "WAMTransformer"),
    "SegmentLayout": ("wam_fast.models.layout", "SegmentLayout"),
    "sample": ("wam_fast.sampling", "sample"),
    "ActionChunk": ("wam_fast.sampling", "ActionChunk"),
    "SAMPLERS": ("wam_fast.sampling", "SAMPLERS"),
    "WAMPipeline": ("wam_fast.pipeline", "WAMPipeline"),
    "save_pretrained": ("wam_fast.models.transformer", "save_pretrained"),
    "load_pretrained": ("wam_fast.models.transformer", "load_pretrained"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'wam_fast' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return __all__
