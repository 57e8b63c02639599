"""``quantize_fp8``: the in-place swap of a model's linears (and block pieces) for FP8 ones, its handler
registry and default filter, and static calibration (``calibrate`` / ``calibrating``)."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn

from wam_fast.models.fused import FusedAdaLNModulate, FusedGatedResidualAdaLN
from wam_fast.models.transformer import AdaLNModulate, FeedForward, GatedResidualAdaLN, WAMBlock
from wam_fast.ops.fp8_linear import check_fp8_device
from wam_fast.quant.linear import (FP8AdaLNModulate, FP8Config, FP8FeedForward, FP8GatedResidualAdaLN, FP8Linear)
from wam_fast.utils.modules import call_module, retype, set_submodule
from wam_fast.utils.registry import TypeRegistry

BACKBONE_LINEARS = ("attn.qkv", "attn.out", "ff.proj_in", "ff.proj_out")

FilterFn = Callable[[nn.Module, str], bool]

# ---- handler registry ----------------------------------------------------------------------------------
Handler = Callable[[nn.Module, str, FP8Config], nn.Module]
_REGISTRY = TypeRegistry()
HANDLERS: Dict[type, Handler] = _REGISTRY.handlers  # exact module type -> handler


def register_handler(module_type: type):
    """Decorator: ``handler(module, name, config) -> new module`` quantizes modules of exactly this type."""
    return _REGISTRY.register(module_type)


@register_handler(nn.Linear)
def quantize_linear(module: nn.Linear, name: str, config: FP8Config) -> FP8Linear:
    return FP8Linear.from_linear(module, config.activation, config.out_dtype, name)


def default_filter(model: nn.Module) -> FilterFn:
    """The backbone linears of every WAMBlock (see the module docstring for why), or, in a model
    without WAMBlocks, every nn.Linear."""
    blocks = [name for name, m in model.named_modules() if isinstance(m, WAMBlock)]
    if not blocks:
        return lambda module, name: True
    wanted = {f"{block}.{suffix}" if block else suffix for block in blocks for suffix in BACKBONE_LINEARS}
    return lambda module, name: name in wanted


def quantize_fp8(model: nn.Module, config: Optional[FP8Config] = None,
                 filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Quantize ``model``'s linears to FP8 in place (module swap by name) and return it.

    filter_fn(module, name) -> bool picks the modules a handler may quantize (default:
    ``default_filter(model)``). Raises RuntimeError on a CUDA GPU below sm_89 (no FP8 tensor cores),
    before anything is swapped. With activation="static", run ``calibrate`` before using the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_fp8 expects an nn.Module, got {type(model).__name__}")
    config = FP8Config() if config is None else config
    if not isinstance(config, FP8Config):
        raise TypeError(f"quantize_fp8 expects an FP8Config, got {type(config).__name__}")
    keep = filter_fn or default_filter(model)
    targets = [(name, module) for name, module in model.named_modules()
               if _REGISTRY.exact(module) is not None and keep(module, name)]
    for name, module in targets:
        if not name:
            raise ValueError(f"quantize_fp8 swaps submodules in place; got a bare {type(module).__name__}: "
                             f"wrap it in a model (e.g. nn.Sequential)")
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            check_fp8_device(t.device)
    for name, module in targets:
        set_submodule(model, name, _REGISTRY.exact(module)(module, name, config))
    _swap_block_pieces(model, config)
    return model


def _swap_block_pieces(model: nn.Module, config: FP8Config) -> None:
    """FFNs with an FP8 proj_in become FP8FeedForward; with fuse_norm, norm1 / norm2 of blocks whose
    attn.qkv / ff.proj_in are dynamic FP8 emit FP8 activations."""
    for _, block in model.named_modules():
        if not isinstance(block, WAMBlock):
            continue
        if isinstance(block.ff, FeedForward) and isinstance(block.ff.proj_in, FP8Linear) \
                and type(block.ff) is not FP8FeedForward:
            block.ff = retype(block.ff, FP8FeedForward)
        if config.activation != "dynamic" or config.fuse_norm is False:
            continue
        qkv, proj_in = block.attn.qkv, block.ff.proj_in
        if isinstance(qkv, FP8Linear) and qkv.activation == "dynamic" and type(block.norm1) in (
                (AdaLNModulate, FusedAdaLNModulate) if config.fuse_norm else (FusedAdaLNModulate,)):
            block.norm1 = retype(block.norm1, FP8AdaLNModulate)
        if isinstance(proj_in, FP8Linear) and proj_in.activation == "dynamic" and type(block.norm2) in (
                (GatedResidualAdaLN, FusedGatedResidualAdaLN) if config.fuse_norm else (FusedGatedResidualAdaLN,)):
            block.norm2 = retype(block.norm2, FP8GatedResidualAdaLN)


def fp8_layers(model: nn.Module) -> Dict[str, FP8Linear]:
    """name -> FP8Linear of every quantized layer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}


# ---- static calibration ----------------------------------------------------------------------------------
@contextlib.contextmanager
def calibrating(model: nn.Module):
    """Forwards inside this block record each static FP8 layer's input amax (finite values only);
    on exit every layer gets ``input_scale = max(amax / 448, 1e-12)``. Meanwhile the layers run with
    dynamic per-token scales, so later layers see activations close to the deployed ones."""
    layers = {name: m for name, m in fp8_layers(model).items() if m.activation == "static"}
    if not layers:
        raise ValueError("calibration needs static FP8 layers: quantize_fp8(model, FP8Config(activation='static')) "
                         "first (dynamic layers need no calibration)")
    for layer in layers.values():
        layer._start_observing()
    ok = False
    try:
        yield model
        ok = True
    finally:
        if ok:
            for name, layer in layers.items():
                layer._finish_observing(name)
        else:  # an exception in the forwards: stop observing, keep the previous scales
            for layer in layers.values():
                layer._observing, layer._amax = False, None


def calibrate(model: nn.Module, batches: Iterable) -> nn.Module:
    """Run ``model`` on each batch (a dict of keyword arguments, a tuple of positional ones, or one
    tensor) without gradients and set the static activation scales. Returns the model."""
    with torch.no_grad(), calibrating(model):
        count = 0
        for batch in batches:
            call_module(model, batch)
            count += 1
        if not count:
            raise ValueError("calibrate: no calibration batches were given")
    return model
