"""The entry point ``compile(model, config, filter_fn)``: the registry of handlers keyed by model type,
``from_cogvideox``, and what can run here (``capabilities``, for ``python -m wam_fast.info``)."""
from __future__ import annotations

from typing import Callable, List, Mapping, Optional

import torch
import torch.nn as nn

from wam_fast import ops
from wam_fast.compiler.config import TENSORRT, CompileConfig, FilterFn
from wam_fast.compiler.generic import compile_module
from wam_fast.compiler.native import compile_policy, compile_wam_transformer
from wam_fast.compiler.report import REPORT_ATTR, CompileReport, attach_report
from wam_fast.models import convert
from wam_fast.models.transformer import WAMTransformer
from wam_fast.policy import WAMPolicy
from wam_fast.utils import optional
from wam_fast.utils.registry import TypeRegistry


# ---- registry ------------------------------------------------------------------------------------
Handler = Callable[..., None]
_REGISTRY = TypeRegistry()
HANDLERS = _REGISTRY.handlers  # model type -> handler (most specific type wins)
_REGISTRY.register(nn.Module)(compile_module)
_REGISTRY.register(WAMTransformer)(compile_wam_transformer)
_REGISTRY.register(WAMPolicy)(compile_policy)


def register_handler(model_type: type):
    """Decorator: ``handler(model, config, filter_fn, report, example_inputs)`` compiles objects of
    ``model_type`` (and subclasses without a handler of their own) in place, filling ``report``."""
    return _REGISTRY.register(model_type)


def handler_for(model) -> Handler:
    if (type(model).__module__ or "").split(".")[0] == "diffusers":
        # diffusers is importable here (the model came from it): its handlers, on first use
        from wam_fast.compiler import cogvideox

        for model_type, handler in cogvideox.HANDLERS.items():
            _REGISTRY.handlers.setdefault(model_type, handler)
    handler = _REGISTRY.nearest(model)
    if handler is None:
        raise TypeError(f"wam_fast.compile expects an nn.Module or a wam_fast.WAMPolicy, got {type(model).__name__}")
    return handler


# ---- entry point ---------------------------------------------------------------------------------
def compile(model, config: Optional[CompileConfig] = None, filter_fn: Optional[FilterFn] = None, *,
            example_inputs=None):
    """Make ``model`` fast in place and return it (the same object); see the module docstring.

    model           a WAMPolicy, WAMTransformer, diffusers CogVideoXTransformer3DModel or any nn.Module
    config          a CompileConfig (default: fused ops, torch.compile with inductor, CUDA graphs on CUDA)
    filter_fn       (module, name) -> bool: the modules levers may touch (default: all they recognise)
    example_inputs  inputs of one forward (dict: keyword arguments, tuple: positional, or a tensor):
                    each lever is checked against the output before it and reverted if it changes it
                    beyond the tolerance table (module docstring). A WAMPolicy takes its model's inputs.
    What was done is in ``compile_report(model)`` (and ``model.report()`` for WAMTransformer / WAMPolicy).
    """
    config = CompileConfig() if config is None else config
    if not isinstance(config, CompileConfig):
        raise TypeError(f"wam_fast.compile expects a CompileConfig, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (module, name) -> bool or None, got {type(filter_fn).__name__}")
    if getattr(model, REPORT_ATTR, None) is not None:
        raise ValueError(f"this {type(model).__name__} was already compiled by wam_fast.compile; compile a fresh "
                         f"model (its report: wam_fast.compile_report(model))")
    handler = handler_for(model)
    report = CompileReport(target=type(model).__name__, config=config)
    handler(model, config, filter_fn, report, example_inputs)
    attach_report(model, report, bound=isinstance(model, (WAMTransformer, WAMPolicy)))
    return model


def from_cogvideox(source, *, action_len: int, action_dim: int, config: Optional[Mapping] = None, **layout):
    """A WAMTransformer with a CogVideoX transformer's backbone weights and fresh action modules.

    source   a diffusers ``CogVideoXTransformer3DModel``, or its state_dict (then ``config``: the
             diffusers config dict, e.g. the checkpoint's config.json; diffusers is not needed)
    layout   text_len (226), latent_frames (4), latent_height, latent_width (32), name
    The result can be compiled (``compile``) and distilled like any WAMTransformer. See
    ``wam_fast.models.convert`` (and ``wam_state_dict_to_cogvideox`` for the way back).
    """
    if isinstance(source, nn.Module):
        if config is not None:
            raise ValueError("from_cogvideox: config is read from the model; pass config only with a state_dict")
        return convert.wam_from_cogvideox(source, action_len=action_len, action_dim=action_dim, **layout)
    if not isinstance(source, Mapping):
        raise TypeError(f"from_cogvideox expects a CogVideoXTransformer3DModel or its state_dict, "
                        f"got {type(source).__name__}")
    if config is None:
        raise ValueError("from_cogvideox: a state_dict needs config= (the CogVideoX transformer's config dict)")
    return convert.wam_from_cogvideox_state_dict(source, config, action_len=action_len, action_dim=action_dim,
                                                 **layout)


def capabilities() -> List[dict]:
    """Rows {"name", "status", "detail"} for the compile backends and optional attention kernels."""
    attention_module = ops.op_module("attention")
    rows = [{"name": "backend inductor", "status": "available", "detail": f"torch.compile (torch {torch.__version__})"},
            {"name": "backend eager", "status": "available",
             "detail": "no torch.compile: fused ops, FP8, cache, graphs"}]
    if not optional.installed(TENSORRT["module"]):
        rows.append({"name": "backend tensorrt", "status": "missing",
                     "detail": f"{TENSORRT['package']} is not installed: {TENSORRT['install']}"})
    else:
        rows.append({"name": "backend tensorrt", "status": "available" if torch.cuda.is_available() else "unusable",
                     "detail": "torch.compile(backend='torch_tensorrt')" if torch.cuda.is_available()
                     else "needs a CUDA GPU"})
    for name in attention_module.EXTERNAL_BACKENDS:
        why = attention_module.external_reason(name)
        rows.append({"name": f"attention {name}", "status": "available" if why is None else "unavailable",
                     "detail": "full-mask attention of swapped modules" if why is None else why})
    rows.append({"name": "cuda graphs", "status": "available" if torch.cuda.is_available() else "unavailable",
                 "detail": "WAMPolicy loop graph, torch.compile reduce-overhead" if torch.cuda.is_available()
                 else "no CUDA device"})
    return rows
