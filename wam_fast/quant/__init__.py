"""FP8 e4m3 quantization of a model's linears: ``quantize_fp8(model, FP8Config(...), filter_fn=None)``.

torchao style (docs/design.md, Conventions): a dataclass config, a registry of handlers keyed by module
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
from wam_fast.quant.accuracy import FP8Report, report, sqnr_db
from wam_fast.quant.checkpoint import QUANT_FORMAT, QUANT_KEY, load_quantized, save_quantized
from wam_fast.quant.linear import (ACTIVATION_MODES, FP8_DTYPE, FP8_MODULE_TYPES, OUT_DTYPES, FP8Activation,
                                   FP8AdaLNModulate, FP8Config, FP8FeedForward, FP8GatedResidualAdaLN, FP8Linear)
from wam_fast.quant.memory import tensor_bytes, weight_bytes
from wam_fast.quant.quantize import (BACKBONE_LINEARS, HANDLERS, FilterFn, calibrate, calibrating, default_filter,
                                     fp8_layers, quantize_fp8, quantize_linear, register_handler)

__all__ = ["FP8Config", "FP8Linear", "FP8Activation", "FP8Report", "quantize_fp8", "default_filter",
           "register_handler", "calibrate", "calibrating", "report", "sqnr_db", "save_quantized",
           "load_quantized", "weight_bytes", "tensor_bytes", "fp8_layers",
           # building blocks and constants (tests, checkpoints, the compiler)
           "FP8AdaLNModulate", "FP8GatedResidualAdaLN", "FP8FeedForward", "FP8_MODULE_TYPES", "FP8_DTYPE",
           "ACTIVATION_MODES", "OUT_DTYPES", "BACKBONE_LINEARS", "HANDLERS", "FilterFn", "quantize_linear",
           "QUANT_KEY", "QUANT_FORMAT"]
