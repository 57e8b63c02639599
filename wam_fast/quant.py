"""FP8 e4m3 quantization of a model's linears: ``quantize_fp8(model, FP8Config(...), filter_fn=None)``.

torchao style (DESIGN.md section 9.2): a dataclass config, a registry of handlers keyed by module
type (``register_handler``), and an in-place swap by module name; returns the model.

- Weights: float8_e4m3fn with one float32 scale per output channel (``quantize_rowwise`` of the
  (out, in) weight: ``scale = max(amax(|row|) / 448, 1e-12)``).
- Activations: ``"dynamic"`` (default) quantizes each token (row) at run time with its own scale;
  ``"static"`` uses one per-tensor scale measured by a calibration pass (``calibrate`` /
  ``calibrating``) and stored with the weights.
- Matmul: ``wam_fast.ops.fp8_linear`` (Triton FP8 GEMM or ``torch._scaled_mm``; fp32 accumulation,
  scales and bias in the epilogue), output in the layer's original dtype (bf16 for a bf16 model),
  or ``FP8Config.out_dtype``.
- Fused norm -> FP8 (WAMTransformer): when the model is fused (``wam_fast.models.fused.fuse``) or
  ``FP8Config(fuse_norm=True)``, a block's ``norm2`` (GatedResidualAdaLN) and ``norm1`` (AdaLNModulate)
  emit FP8 codes + per-token scales from the norm kernel (``gated_residual_adaln(..., fp8=True)``,
  ``adaln_modulate(..., fp8=True)``) as an ``FP8Activation``, which ``ff.proj_in`` and ``attn.qkv``
  consume directly: no separate quantize pass over the activation.

Default filter (``default_filter``). In a model with ``WAMBlock``s, only the backbone's
``attn.qkv``, ``attn.out``, ``ff.proj_in`` and ``ff.proj_out`` are quantized (~94% of a W1 forward's
FLOPs are these GEMMs, M = 1256 tokens). The rest stays in high precision, because:
- AdaLN projections (``blocks.*.adaln``, Linear(512 -> 12 D)): they run on B x segments rows (<= 6),
  so FP8 tensor cores buy no time, and their outputs (shift, scale, gate) multiply every token of a
  segment: a quantization error there is a coherent bias on the whole sequence, not noise that
  averages out over tokens. (They are 14% of W1's weights: opt in with filter_fn to save 0.8 GB.)
- Embeddings (patch embedding, ``text_proj``, ``action_embed``, ``time_embed``): negligible FLOPs,
  tiny or odd input widths (7 action dims), and raw inputs with outlier channels (T5 features)
  that a per-token scale would let dominate every other channel.
- Final heads (``video_proj`` 3072 -> 64, ``action_proj`` 3072 -> 7) and their AdaLN: they write
  the prediction itself, so their error goes straight into every sampler step, and with 7 or 64
  outputs there is no GEMM to speed up.
In any other model (e.g. an ``nn.Sequential``), every ``nn.Linear`` is quantized.

Accuracy: ``report(model_ref, model_fp8, inputs)`` (per-layer SQNR in dB, end-to-end relative error
and SQNR of each output). Checkpoints: ``save_quantized`` / ``load_quantized`` (safetensors: FP8
tensors + float32 scales; atomic writes; exact round trip, no calibration data needed). Memory:
``weight_bytes(config)`` from a meta-device build.
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from wam_fast.models import functional as WF
from wam_fast.models.transformer import AdaLNModulate, FeedForward, GatedResidualAdaLN, WAMBlock

FP8_DTYPE = torch.float8_e4m3fn
ACTIVATION_MODES = ("dynamic", "static")
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKBONE_LINEARS = ("attn.qkv", "attn.out", "ff.proj_in", "ff.proj_out")
QUANT_KEY = "wam_fast_quantization"  # safetensors metadata entry of a quantized checkpoint
QUANT_FORMAT = 1

FilterFn = Callable[[nn.Module, str], bool]


def _ops():
    import wam_fast.ops as ops  # on first use: importing wam_fast.quant stays light

    return ops


def _fp8_op_module():
    import importlib

    return importlib.import_module("wam_fast.ops.fp8_linear")


# ---- config --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FP8Config:
    """How ``quantize_fp8`` quantizes.

    activation: "dynamic" (per token, at run time) or "static" (per tensor, from a calibration pass).
    out_dtype:  the layers' output dtype; None = each layer's weight dtype before quantization.
    fuse_norm:  feed FP8 activations from the AdaLN norm kernels to ``attn.qkv`` and ``ff.proj_in``
                (dynamic only). None = when the block is fused (``fuse(model)`` ran before), True /
                False = always / never.
    """

    activation: str = "dynamic"
    out_dtype: Optional[torch.dtype] = None
    fuse_norm: Optional[bool] = None

    def __post_init__(self):
        if self.activation not in ACTIVATION_MODES:
            raise ValueError(f"FP8Config.activation must be one of {ACTIVATION_MODES}, got {self.activation!r}")
        if self.out_dtype is not None and self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"FP8Config.out_dtype must be None or one of {[str(d) for d in OUT_DTYPES]}, "
                             f"got {self.out_dtype!r}")
        if self.fuse_norm not in (None, True, False):
            raise ValueError(f"FP8Config.fuse_norm must be None, True or False, got {self.fuse_norm!r}")
        if self.fuse_norm and self.activation != "dynamic":
            raise ValueError("FP8Config.fuse_norm=True needs activation='dynamic' (the norm kernels quantize "
                             f"per token), got activation={self.activation!r}")


# ---- the FP8 activation passed from a norm to the linear after it --------------------------------
class FP8Activation(NamedTuple):
    """float8_e4m3fn codes (..., K) and float32 per-row scales (..., 1): value ~= data * scale."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:  # the reference Attention reads x.shape before calling qkv
        return self.data.shape


# ---- the FP8 linear --------------------------------------------------------------------------------
class FP8Linear(nn.Module):
    """nn.Linear with a float8_e4m3fn weight (``weight``, (out, in)) and per-output-channel float32
    scales (``weight_scale``, (out, 1)); the bias stays in high precision. ``forward`` takes a tensor
    (quantized here: per token, or with the calibrated per-tensor ``input_scale``) or an
    ``FP8Activation`` (already quantized by a norm kernel) and returns ``out_dtype``.

    ``model.to(dtype)`` keeps the FP8 weight and float32 scales and moves ``out_dtype`` to the new
    dtype (the model dtype); ``model.to(device)`` moves everything.
    """

    _FIXED_DTYPE = ("weight", "weight_scale", "input_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "dynamic",
                 out_dtype: torch.dtype = torch.bfloat16, device=None, bias_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if activation not in ACTIVATION_MODES:
            raise ValueError(f"FP8Linear activation must be one of {ACTIVATION_MODES}, got {activation!r}")
        self.in_features, self.out_features = in_features, out_features
        self.activation = activation
        self.out_dtype = out_dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype or out_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        if activation == "static":
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.calibrated = activation == "dynamic"
        self._observing = False
        self._amax: Optional[torch.Tensor] = None
        self._observed = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str = "dynamic", out_dtype: Optional[torch.dtype] = None,
                    name: str = "") -> "FP8Linear":
        """Quantize ``linear``'s weight per output channel (its bias is kept as it is)."""
        weight = linear.weight.detach()
        if weight.device.type != "meta" and not torch.isfinite(weight).all():
            raise ValueError(f"cannot quantize {name or 'the linear'}: its weight has non-finite values "
                             f"(inf/NaN), so no FP8 scale can represent it; fix the weights first")
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, activation,
                  out_dtype or weight.dtype, device="meta")
        w_fp8, w_scale = WF.quantize_rowwise(weight)
        new.weight, new.weight_scale = w_fp8.contiguous(), w_scale.contiguous()
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        if activation == "static":
            new.input_scale = torch.ones((), dtype=torch.float32, device=weight.device)
        return new

    # -- forward --
    def forward(self, x):
        if isinstance(x, FP8Activation):
            x_fp8, x_scale = x.data, x.scale
        elif self.activation == "static" and not self._observing:
            if not self.calibrated:
                raise RuntimeError("FP8Linear with static activation scales is not calibrated: run "
                                   "wam_fast.quant.calibrate(model, batches) (or `with wam_fast.quant.calibrating"
                                   "(model):` forwards) first, or load a calibrated checkpoint")
            x_fp8, x_scale = WF.quantize_per_tensor(x, self.input_scale), self.input_scale
        else:
            if self._observing:
                self._observe(x)
            x_fp8, x_scale = WF.quantize_rowwise(x)
        return _ops().fp8_linear(x_fp8, x_scale, self.weight, self.weight_scale, self.bias, self.out_dtype)

    # -- static calibration --
    def _observe(self, x: torch.Tensor) -> None:
        # amax over the finite values only: an inf/NaN in one calibration batch must not make the
        # scale inf (x / inf = 0 and 0 * inf = NaN for every later, finite input)
        xa = x.detach().float().abs()
        amax = torch.where(torch.isfinite(xa), xa, torch.zeros_like(xa)).amax()
        self._amax = amax if self._amax is None else torch.maximum(self._amax, amax)
        self._observed += 1

    def _start_observing(self) -> None:
        self._observing, self._amax, self._observed = True, None, 0

    def _finish_observing(self, name: str) -> None:
        self._observing = False
        if not self._observed:
            raise RuntimeError(f"calibration: {name or 'an FP8Linear'} saw no input (the calibration forwards "
                               f"never reached it), so it has no activation scale")
        amax = float(self._amax)
        if amax == 0.0:
            warnings.warn(f"calibration: {name} only saw zeros (or non-finite values); its activation scale is "
                          f"the floor {WF.FP8_MIN_SCALE:g}, so larger inputs will saturate", stacklevel=3)
        scale = max(amax / WF.FP8_E4M3_MAX, WF.FP8_MIN_SCALE)
        self.input_scale = torch.tensor(scale, dtype=torch.float32, device=self.weight.device)
        self.calibrated, self._amax = True, None

    # -- nn.Module plumbing --
    def _apply(self, fn, recurse=True):
        kept = {k: self._buffers[k] for k in self._FIXED_DTYPE if self._buffers.get(k) is not None}
        probe = fn(torch.empty(0, dtype=self.out_dtype))  # where a float tensor goes (dtype of .to(dtype))
        super()._apply(fn, recurse)
        for key, old in kept.items():
            new = self._buffers[key]
            if new.dtype != old.dtype:  # a dtype cast: keep FP8 codes and float32 scales, take the device
                self._buffers[key] = old.to(device=new.device)
        if probe.dtype in OUT_DTYPES:
            self.out_dtype = probe.dtype
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.activation == "static" and prefix + "input_scale" in state_dict:
            self.calibrated = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation}, out_dtype={self.out_dtype}")

    def spec(self) -> dict:
        """What a checkpoint needs to rebuild this module before loading its tensors."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "bias_dtype": None if self.bias is None else _dtype_name(self.bias.dtype),
                "activation": self.activation, "out_dtype": _dtype_name(self.out_dtype)}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "FP8Linear":
        return cls(spec["in_features"], spec["out_features"], spec["bias"], spec["activation"],
                   _dtype(spec["out_dtype"]), device=device,
                   bias_dtype=_dtype(spec["bias_dtype"]) if spec["bias_dtype"] else None)


# ---- WAMTransformer pieces: the fused norm -> FP8 path -----------------------------------------------
class FP8AdaLNModulate(AdaLNModulate):
    """norm1 emitting FP8 codes + per-token scales for ``attn.qkv`` (adaln_modulate op, fp8=True)."""

    def forward(self, x, shift, scale, ctx):
        y_fp8, y_scale = _ops().adaln_modulate(x, shift, scale, ctx.segments, ctx.mod_index, self.norm.weight,
                                               self.norm.bias, self.norm.eps, fp8=True)
        return FP8Activation(y_fp8, y_scale)


class FP8GatedResidualAdaLN(GatedResidualAdaLN):
    """norm2 (residual + gate * x, then AdaLN) emitting FP8 codes + per-token scales for ``ff.proj_in``."""

    def forward(self, residual, x, gate, shift, scale, ctx):
        r, y_fp8, y_scale = _ops().gated_residual_adaln(residual, x, gate, shift, scale, ctx.segments, ctx.mod_index,
                                                        self.norm.weight, self.norm.bias, self.norm.eps, fp8=True)
        return r, FP8Activation(y_fp8, y_scale)


class FP8FeedForward(FeedForward):
    """The FFN with FP8 linears: proj_in (FP8, out in the model dtype) -> GELU-tanh -> proj_out (FP8).
    Its own type so ``fuse`` (which would call ffn_gelu on the FP8 weight) leaves it alone."""

    def forward(self, x):
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


FP8_MODULE_TYPES = {cls.__name__: cls for cls in (FP8Linear, FP8AdaLNModulate, FP8GatedResidualAdaLN,
                                                  FP8FeedForward)}


# ---- handler registry ----------------------------------------------------------------------------------
Handler = Callable[[nn.Module, str, FP8Config], nn.Module]
HANDLERS: Dict[type, Handler] = {}


def register_handler(module_type: type):
    """Decorator: ``handler(module, name, config) -> new module`` quantizes modules of exactly this type."""
    def register(handler: Handler) -> Handler:
        HANDLERS[module_type] = handler
        return handler
    return register


@register_handler(nn.Linear)
def _quantize_linear(module: nn.Linear, name: str, config: FP8Config) -> FP8Linear:
    return FP8Linear.from_linear(module, config.activation, config.out_dtype, name)


def default_filter(model: nn.Module) -> FilterFn:
    """The backbone linears of every WAMBlock (see the module docstring for why), or, in a model
    without WAMBlocks, every nn.Linear."""
    blocks = [name for name, m in model.named_modules() if isinstance(m, WAMBlock)]
    if not blocks:
        return lambda module, name: True
    wanted = {f"{block}.{suffix}" if block else suffix for block in blocks for suffix in BACKBONE_LINEARS}
    return lambda module, name: name in wanted


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _retype(module: nn.Module, cls: type) -> nn.Module:
    from wam_fast.models.fused import _retype as retype  # same parameters, new class

    return retype(module, cls)


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
               if type(module) in HANDLERS and keep(module, name)]
    for name, module in targets:
        if not name:
            raise ValueError(f"quantize_fp8 swaps submodules in place; got a bare {type(module).__name__}: "
                             f"wrap it in a model (e.g. nn.Sequential)")
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            _fp8_op_module().check_fp8_device(t.device)
    for name, module in targets:
        _set_submodule(model, name, HANDLERS[type(module)](module, name, config))
    _swap_block_pieces(model, config)
    return model


def _swap_block_pieces(model: nn.Module, config: FP8Config) -> None:
    """FFNs with an FP8 proj_in become FP8FeedForward; with fuse_norm, norm1 / norm2 of blocks whose
    attn.qkv / ff.proj_in are dynamic FP8 emit FP8 activations."""
    from wam_fast.models.fused import FusedAdaLNModulate, FusedGatedResidualAdaLN

    for _, block in model.named_modules():
        if not isinstance(block, WAMBlock):
            continue
        if isinstance(block.ff, FeedForward) and isinstance(block.ff.proj_in, FP8Linear) \
                and type(block.ff) is not FP8FeedForward:
            block.ff = _retype(block.ff, FP8FeedForward)
        if config.activation != "dynamic" or config.fuse_norm is False:
            continue
        qkv, proj_in = block.attn.qkv, block.ff.proj_in
        if isinstance(qkv, FP8Linear) and qkv.activation == "dynamic" and type(block.norm1) in (
                (AdaLNModulate, FusedAdaLNModulate) if config.fuse_norm else (FusedAdaLNModulate,)):
            block.norm1 = _retype(block.norm1, FP8AdaLNModulate)
        if isinstance(proj_in, FP8Linear) and proj_in.activation == "dynamic" and type(block.norm2) in (
                (GatedResidualAdaLN, FusedGatedResidualAdaLN) if config.fuse_norm else (FusedGatedResidualAdaLN,)):
            block.norm2 = _retype(block.norm2, FP8GatedResidualAdaLN)


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


def _call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def calibrate(model: nn.Module, batches: Iterable) -> nn.Module:
    """Run ``model`` on each batch (a dict of keyword arguments, a tuple of positional ones, or one
    tensor) without gradients and set the static activation scales. Returns the model."""
    with torch.no_grad(), calibrating(model):
        count = 0
        for batch in batches:
            _call(model, batch)
            count += 1
        if not count:
            raise ValueError("calibrate: no calibration batches were given")
    return model


# ---- accuracy report ----------------------------------------------------------------------------------------
def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20 log10(||ref|| / ||ref - test||) in dB (inf when equal)."""
    ref, err = reference.detach().double(), (reference.detach().double() - test.detach().double())
    noise = err.norm().item()
    signal = ref.norm().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)


@dataclass
class FP8Report:
    """layers: [{"name", "sqnr_db" (the FP8 layer vs the reference layer on the reference's input to
    it: its own error), "sqnr_db_in_model" (its output in the FP8 model vs in the reference model:
    errors accumulated up to it)}]; outputs: {name: {"rel_error", "sqnr_db"}}, end to end."""

    layers: List[dict]
    outputs: Dict[str, dict]

    def min_layer_sqnr_db(self) -> float:
        return min(layer["sqnr_db"] for layer in self.layers)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "outputs": self.outputs}

    def __str__(self) -> str:
        lines = [f"{'layer':<32}{'SQNR dB':>10}{'in model':>10}"]
        lines += [f"{r['name']:<32}{r['sqnr_db']:>10.2f}{r['sqnr_db_in_model']:>10.2f}" for r in self.layers]
        lines.append(f"{'output':<32}{'SQNR dB':>10}{'rel err':>10}")
        lines += [f"{k:<32}{v['sqnr_db']:>10.2f}{v['rel_error']:>10.2e}" for k, v in self.outputs.items()]
        return "\n".join(lines)


def _output_tensors(model: nn.Module, out) -> Dict[str, torch.Tensor]:
    from wam_fast.models.transformer import WAMTransformer

    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(model, WAMTransformer):
        return {"video": out[0], "actions": out[1]}
    return {f"output{i}": t for i, t in enumerate(out) if isinstance(t, torch.Tensor)}


def report(model_ref: nn.Module, model_fp8: nn.Module, inputs) -> FP8Report:
    """Per-layer SQNR (dB) of every FP8Linear in ``model_fp8`` and the end-to-end relative error and
    SQNR of each output (WAMTransformer: "video", "actions"), from one forward of both models on
    ``inputs`` (a dict of keyword arguments, a tuple of positional ones, or a tensor)."""
    layers = fp8_layers(model_fp8)
    if not layers:
        raise ValueError("report: model_fp8 has no FP8Linear layers (run quantize_fp8 on it first)")
    ref_modules = dict(model_ref.named_modules())
    missing = [name for name in layers if name not in ref_modules]
    if missing:
        raise ValueError(f"report: model_ref has no modules named {missing[:4]}: pass the high-precision model "
                         f"that model_fp8 was quantized from")
    in_model: Dict[str, List[torch.Tensor]] = {name: [] for name in layers}
    rows: Dict[str, dict] = {}

    def keep_output(name):
        def hook(module, args, output):
            in_model[name].append(output.detach())
        return hook

    def compare(name):
        def hook(module, args, output):
            own = sqnr_db(output, layers[name](args[0]))  # the FP8 layer on the reference's input
            accumulated = sqnr_db(output, in_model[name].pop(0)) if in_model[name] else math.nan
            row = rows.setdefault(name, {"name": name, "sqnr_db": math.inf, "sqnr_db_in_model": math.inf})
            row["sqnr_db"] = min(row["sqnr_db"], own)  # a layer called several times: its worst call
            row["sqnr_db_in_model"] = min(row["sqnr_db_in_model"], accumulated)
        return hook

    handles = [layers[name].register_forward_hook(keep_output(name)) for name in layers]
    try:
        with torch.no_grad():
            out_fp8 = _call(model_fp8, inputs)
    finally:
        for h in handles:
            h.remove()
    handles = [ref_modules[name].register_forward_hook(compare(name)) for name in layers]
    try:
        with torch.no_grad():
            out_ref = _call(model_ref, inputs)
    finally:
        for h in handles:
            h.remove()
    outputs = {}
    fp8_outputs = _output_tensors(model_fp8, out_fp8)
    for key, ref in _output_tensors(model_ref, out_ref).items():
        test = fp8_outputs[key]
        rel = (ref.double() - test.double()).norm().item() / max(ref.double().norm().item(), 1e-30)
        outputs[key] = {"rel_error": rel, "sqnr_db": sqnr_db(ref, test)}
    return FP8Report([rows[name] for name in layers if name in rows], outputs)


# ---- checkpoints -------------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a quantized checkpoint")
    return dtype


def _quant_metadata(model: nn.Module) -> dict:
    modules = {name: type(m).__name__ for name, m in model.named_modules() if type(m) in FP8_MODULE_TYPES.values()}
    return {"format": QUANT_FORMAT, "modules": modules,
            "linears": {name: m.spec() for name, m in fp8_layers(model).items()}}


def save_quantized(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write a quantized model to ``directory``: ``model.safetensors`` (FP8 weights, float32 scales,
    the high-precision rest, and which modules are FP8 in its metadata) and, for a WAMTransformer,
    ``config.json``. Each file is written atomically. Returns the directory."""
    from safetensors.torch import save_file

    from wam_fast.checkpoint import CONFIG_NAME, FORMAT_KEY, FORMAT_VERSION, WEIGHTS_NAME, atomic_write
    from wam_fast.models.transformer import WAMTransformer

    if not fp8_layers(model):
        raise ValueError("save_quantized: the model has no FP8Linear layers; use wam_fast.save_pretrained for "
                         "a high-precision model")
    uncalibrated = [n for n, m in fp8_layers(model).items() if not m.calibrated]
    if uncalibrated:
        raise ValueError(f"save_quantized: static layers {uncalibrated[:4]} are not calibrated; run calibrate first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device (no data)")
        tensors[name] = tensor.detach().contiguous().cpu()
    metadata = {FORMAT_KEY: FORMAT_VERSION, QUANT_KEY: json.dumps(_quant_metadata(model), sort_keys=True)}
    config_json = None
    if isinstance(model, WAMTransformer):
        config_json = json.dumps(model.config.to_dict(), indent=2, sort_keys=True)
        metadata["config"] = config_json
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    if config_json is not None:
        atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_json + "\n"))
    return directory


def load_quantized(directory: Union[str, Path], model: Optional[nn.Module] = None,
                   device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Load a model written by ``save_quantized``: the same FP8 codes, scales and calibrated input
    scales, bit for bit (no calibration data). A WAMTransformer is rebuilt from the stored config;
    any other model needs ``model``: the high-precision module it was quantized from (weights are
    replaced, so a meta-device build is enough)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from wam_fast.checkpoint import CONFIG_NAME, FORMAT_KEY, FORMAT_VERSION, WEIGHTS_NAME
    from wam_fast.configs import WAMConfig
    from wam_fast.models.transformer import WAMTransformer

    directory = Path(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found (a quantized checkpoint directory written by "
                                f"wam_fast.quant.save_quantized)")
    with safe_open(str(weights_path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get(FORMAT_KEY) != FORMAT_VERSION or QUANT_KEY not in metadata:
        raise ValueError(f"{weights_path} is not a quantized wam_fast checkpoint (no {QUANT_KEY!r} metadata); "
                         f"load a high-precision checkpoint with wam_fast.load_pretrained")
    quant = json.loads(metadata[QUANT_KEY])
    if quant.get("format") != QUANT_FORMAT:
        raise ValueError(f"{weights_path}: quantization format {quant.get('format')!r}, expected {QUANT_FORMAT}")
    if model is None:
        if "config" not in metadata:
            raise ValueError(f"{weights_path} holds a quantized model that is not a WAMTransformer: pass the "
                             f"high-precision model it came from as model=")
        config_path = directory / CONFIG_NAME
        if config_path.is_file() and json.loads(config_path.read_text()) != json.loads(metadata["config"]):
            raise ValueError(f"{config_path} does not match the config stored in {weights_path} "
                             "(an interrupted save or a hand-edited file); re-save the checkpoint")
        with torch.device("meta"):
            model = WAMTransformer(WAMConfig.from_dict(json.loads(metadata["config"])))
    device = torch.device(device) if device is not None else torch.device("cpu")
    modules = dict(model.named_modules())
    for name, class_name in quant["modules"].items():
        if name not in modules:
            raise ValueError(f"{weights_path}: the model has no module {name!r} (quantized in the checkpoint); "
                             f"pass the model it was quantized from")
        cls = FP8_MODULE_TYPES[class_name]
        new = FP8Linear.from_spec(quant["linears"][name], device="meta") if cls is FP8Linear \
            else _retype(modules[name], cls)
        _set_submodule(model, name, new)
    state = load_file(str(weights_path), device=str(device))
    expected, found = set(model.state_dict()), set(state)
    if expected != found:
        raise ValueError(f"{weights_path} does not fit the model: missing {sorted(expected - found)[:8]}, "
                         f"unexpected {sorted(found - expected)[:8]}")
    model.load_state_dict(state, assign=True)
    return model.eval()


# ---- memory ------------------------------------------------------------------------------------------------------
def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers (its state_dict)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def weight_bytes(config, fp8_config: Optional[FP8Config] = None, filter_fn: Optional[FilterFn] = None) -> dict:
    """Weight bytes of a WAMTransformer(config) in bf16 ("bf16") and after ``quantize_fp8`` ("fp8"),
    from a meta-device build: no memory, no initialisation. Also the parameter count ("params") and
    how many of them are FP8 ("fp8_params")."""
    from wam_fast.models.transformer import WAMTransformer

    with torch.device("meta"):
        model = WAMTransformer(config).to(torch.bfloat16)
    high = tensor_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    quantize_fp8(model, fp8_config, filter_fn)
    fp8 = sum(m.weight.numel() for m in fp8_layers(model).values())
    return {"bf16": high, "fp8": tensor_bytes(model), "params": params, "fp8_params": fp8}


__all__ = ["FP8Config", "FP8Linear", "FP8Activation", "FP8Report", "quantize_fp8", "default_filter",
           "register_handler", "calibrate", "calibrating", "report", "sqnr_db", "save_quantized",
           "load_quantized", "weight_bytes", "tensor_bytes", "fp8_layers"]
