"""The FP8 modules: ``FP8Config``, ``FP8Linear`` (float8 e4m3 weights, per-channel scales, dynamic or
static activation scales) and the WAMTransformer block pieces whose norm emits FP8 activations."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from wam_fast import ops
from wam_fast.models.transformer import AdaLNModulate, FeedForward, GatedResidualAdaLN
from wam_fast.ops import reference as WF

FP8_DTYPE = torch.float8_e4m3fn
ACTIVATION_MODES = ("dynamic", "static")
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
        elif self._observing:  # calibration: dynamic scales meanwhile, quantized as before
            self._observe(x)
            x_fp8, x_scale = WF.quantize_rowwise(x)
        else:
            x_fp8, x_scale = ops.quantize_rowwise(x)  # per token, one kernel
        return ops.fp8_linear(x_fp8, x_scale, self.weight, self.weight_scale, self.bias, self.out_dtype)

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
                "bias_dtype": None if self.bias is None else dtype_name(self.bias.dtype),
                "activation": self.activation, "out_dtype": dtype_name(self.out_dtype)}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "FP8Linear":
        return cls(spec["in_features"], spec["out_features"], spec["bias"], spec["activation"],
                   dtype_from_name(spec["out_dtype"]), device=device,
                   bias_dtype=dtype_from_name(spec["bias_dtype"]) if spec["bias_dtype"] else None)


# ---- WAMTransformer pieces: the fused norm -> FP8 path -----------------------------------------------
class FP8AdaLNModulate(AdaLNModulate):
    """norm1 emitting FP8 codes + per-token scales for ``attn.qkv`` (adaln_modulate op, fp8=True)."""

    def forward(self, x, shift, scale, ctx):
        y_fp8, y_scale = ops.adaln_modulate(x, shift, scale, ctx.segments, ctx.mod_index, self.norm.weight,
                                               self.norm.bias, self.norm.eps, fp8=True)
        return FP8Activation(y_fp8, y_scale)


class FP8GatedResidualAdaLN(GatedResidualAdaLN):
    """norm2 (residual + gate * x, then AdaLN) emitting FP8 codes + per-token scales for ``ff.proj_in``."""

    def forward(self, residual, x, gate, shift, scale, ctx):
        r, y_fp8, y_scale = ops.gated_residual_adaln(residual, x, gate, shift, scale, ctx.segments, ctx.mod_index,
                                                        self.norm.weight, self.norm.bias, self.norm.eps, fp8=True)
        return r, FP8Activation(y_fp8, y_scale)


class FP8FeedForward(FeedForward):
    """The FFN with FP8 linears: proj_in (FP8, out in the model dtype) -> GELU-tanh -> proj_out (FP8).
    With a dynamic FP8 proj_out, the GELU and the per-token quantization of its input are one kernel
    (``ops.quantize_rowwise(h, gelu=True)``, GELU in fp32) and proj_out takes the FP8Activation as it is.
    A static (per-tensor, calibrated) or high-precision proj_out gets the GELU output instead.
    Its own type so ``fuse`` (which would call ffn_gelu on the FP8 weight) leaves it alone."""

    def forward(self, x):
        h = self.proj_in(x)
        out = self.proj_out
        if isinstance(out, FP8Linear) and out.activation == "dynamic":
            return out(FP8Activation(*ops.quantize_rowwise(h, gelu=True)))
        return out(F.gelu(h, approximate="tanh"))


FP8_MODULE_TYPES = {cls.__name__: cls for cls in (FP8Linear, FP8AdaLNModulate, FP8GatedResidualAdaLN,
                                                  FP8FeedForward)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a quantized checkpoint")
    return dtype
