"""``wam_fast.compile(model, CompileConfig(...), filter_fn=None)``: the fast version of a model, in place.

torchao style (docs/design.md, Conventions): a frozen dataclass config and a registry of handlers keyed by
model type (``register_handler``). Every handler transforms the object it is given and returns that
same object: the model keeps its class, its call signature and its other methods (``.predict()``
...), and every lever it applied or left alone is recorded in a ``CompileReport``
(``compile_report(model)``; WAMTransformer and WAMPolicy also get a ``.report()``).

Files: ``config`` (CompileConfig), ``report`` (CompileReport), ``session`` (levers, accuracy checks,
undo), one handler module per model family (``native``: WAMTransformer / WAMPolicy, with ``graphs``
for the policy's loop graph; ``cogvideox``: diffusers; ``generic``: any nn.Module) and ``dispatch``
(the registry and ``compile``).

Handlers (most specific type first):

==================================  =====================================================================
type                                levers
==================================  =====================================================================
``WAMPolicy``                       its model as below; the KV cache on/off (``cache``); on CUDA one CUDA
                                    graph over the whole few-step sampling loop of ``act`` (``graphs``)
``WAMTransformer``                  fused ops (``models.fused.fuse``), FP8 linears (``quantize_fp8``, its
                                    default filter), torch.compile of forward (``Module.compile``)
diffusers                           our attention processor (``set_attn_processor``: qk_norm_rope with
``CogVideoXTransformer3DModel``     ``image_rotary_emb``, ops.attention), fused AdaLN/gating blocks and
                                    GELU by module swap, FP8 block linears, torch.compile
                                    (``wam_fast.compiler.cogvideox``; registered on first use, only
                                    when diffusers is installed)
any other ``nn.Module``             pattern sites in modules of its own (``patterns``: torch.fx; AdaLN
                                    modulation, gated residual, GELU-linear, SDPA -> wam_fast ops; needs
                                    example_inputs), ``nn.MultiheadAttention`` -> ops.attention (per-call
                                    fallback to the original for what it cannot honour), FP8 ``nn.Linear``
                                    (in/out multiples of 16), torch.compile
==================================  =====================================================================

``filter_fn(module, name) -> bool`` restricts every module-level lever to the modules it accepts (on
top of each lever's own choice, e.g. FP8's default filter). ``example_inputs`` (a dict of keyword
arguments, a tuple of positional ones, or one tensor) turns on the accuracy check: one eager forward
before any change, then one after each lever, compared with the output before that lever; a lever
whose output falls outside the tolerance (or that raises) is reverted and reported. Without it the
levers are applied unchecked (the report says so). Tolerances:

===========================================  =========================  ==========  ==========  ==========
lever                                        metric (vs before lever)   float32     bfloat16    float16
===========================================  =========================  ==========  ==========  ==========
fused ops, attention swaps, torch.compile    relative L2 error <=       1e-4        2e-2        5e-3
fp8 (float8 e4m3 linears)                    SQNR (dB) >=               min_fp8_sqnr_db (default 20 dB, any dtype)
torch.compile of a model with FP8 linears    SQNR (dB) >=               40 dB, any dtype (a compiled per-token
                                                                        quantizer rounds a few codes the other way)
===========================================  =========================  ==========  ==========  ==========

(relative L2 error = ||out - before|| / ||before|| per output tensor; SQNR = 20 log10(||before|| /
||out - before||), as ``wam_fast.quant.sqnr_db``; a non-finite output where there was none fails.)
The same table is what ``tests/test_compile.py`` holds compiled outputs to.

torch.compile settings are scoped to the model (``Module.compile(backend, mode, options)``): nothing
in ``torch._inductor.config`` or ``torch._dynamo.config`` is changed. CUDA graphs: a WAMPolicy's
sampling loop is captured by ``wam_fast.compiler.graphs``; a bare module gets them from torch.compile
(``mode="reduce-overhead"``, or ``options={"triton.cudagraphs": True}``) on a CUDA device.
"""
from wam_fast.compiler import session
from wam_fast.compiler.causal import CausalKVCache
from wam_fast.compiler.config import REL_TOLERANCE, CompileConfig
from wam_fast.compiler.dispatch import (HANDLERS, capabilities, compile, from_cogvideox, handler_for,
                                        register_handler)
from wam_fast.compiler.generic import MultiheadAttention
from wam_fast.compiler.report import CompileReport, compile_report
from wam_fast.compiler.session import Session, compare_outputs, compile_kwargs, module_device
from wam_fast.utils.modules import retype, set_submodule

__all__ = ["CausalKVCache", "CompileConfig", "CompileReport", "compile", "compile_report", "from_cogvideox", "register_handler",
           "MultiheadAttention", "capabilities", "compare_outputs", "REL_TOLERANCE",
           # for handlers of other model types
           "HANDLERS", "handler_for", "Session", "compile_kwargs", "module_device", "retype", "set_submodule",
           "session"]
