"""``wam_fast.compile(model, CompileConfig(...), filter_fn=None)``: the fast version of a model, in place.

torchao style (DESIGN.md section 9.2): a frozen dataclass config and a registry of handlers keyed by
model type (``register_handler``). Every handler transforms the object it is given and returns that
same object: the model keeps its class, its call signature and its other methods (``.predict()``
...), and every lever it applied or left alone is recorded in a ``CompileReport``
(``compile_report(model)``; WAMTransformer and WAMPolicy also get a ``.report()``).

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
                                    (``wam_fast.models.diffusers_compat``; registered on first use, only
                                    when diffusers is installed)
any other ``nn.Module``             ``nn.MultiheadAttention`` -> ops.attention (per-call fallback to the
                                    original for what it cannot honour), FP8 ``nn.Linear`` (in/out
                                    multiples of 16), torch.compile; custom modules are left alone
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
sampling loop is captured by ``wam_fast.graphs``; a bare module gets them from torch.compile
(``mode="reduce-overhead"``, or ``options={"triton.cudagraphs": True}``) on a CUDA device.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

FilterFn = Callable[[nn.Module, str], bool]

BACKENDS = ("inductor", "eager", "tensorrt")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs
ATTENTION = ("auto", "flash-attn", "xformers")
REL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DEFAULT_REL_TOLERANCE = 1e-4  # other dtypes (float64, ...)
COMPILED_FP8_MIN_SQNR_DB = 40.0  # torch.compile of an FP8 model vs the same model eager
SMALL_GEMM_FACTOR = 8  # FP8 skips a linear that sees <= 1/8 of the rows the biggest one sees (example inputs)
TENSORRT = {"module": "torch_tensorrt", "package": "torch-tensorrt", "install": "pip install torch-tensorrt"}


# ---- config --------------------------------------------------------------------------------------
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
            from wam_fast.quant import FP8Config

            if not isinstance(self.fp8_config, FP8Config):
                raise TypeError(f"CompileConfig.fp8_config must be a wam_fast.FP8Config or None, "
                                f"got {type(self.fp8_config).__name__}")
            if not self.fp8:
                raise ValueError("CompileConfig: fp8_config given but fp8=False; set fp8=True to quantize")
        if isinstance(self.min_fp8_sqnr_db, bool) or not isinstance(self.min_fp8_sqnr_db, (int, float)) \
                or not math.isfinite(self.min_fp8_sqnr_db):
            raise ValueError(f"CompileConfig.min_fp8_sqnr_db must be a finite number, got {self.min_fp8_sqnr_db!r}")


# ---- report --------------------------------------------------------------------------------------
def _pattern(name: str) -> str:
    """The name with its first index replaced: blocks.3.attn.qkv -> blocks.*.attn.qkv (ff.net.2 stays)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name, count=1)


@dataclass
class CompileReport:
    """What ``compile`` did to one object.

    applied  [(where, what)]: module name (or lever name) and what it became
    skipped  [(where, why)]: levers or modules left alone, and why
    checks   [{"lever", "metric", "value", "limit", "ok"}]: the accuracy checks (with example_inputs)
    ``str(report)`` is a readable table (repeated layers grouped as ``blocks.*.attn (x42)``).
    """

    target: str
    config: CompileConfig
    applied: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    checks: List[dict] = field(default_factory=list)

    def apply(self, where: str, what: str) -> None:
        self.applied.append((where, what))

    def skip(self, where: str, why: str) -> None:
        self.skipped.append((where, why))

    def applied_to(self, where: str) -> List[str]:
        """What was applied at ``where`` (exact name)."""
        return [what for w, what in self.applied if w == where]

    def skipped_at(self, where: str) -> List[str]:
        """Why ``where`` (exact name) was left alone."""
        return [why for w, why in self.skipped if w == where]

    def to_dict(self) -> dict:
        return {"target": self.target, "applied": [list(r) for r in self.applied],
                "skipped": [list(r) for r in self.skipped], "checks": list(self.checks)}

    @staticmethod
    def _grouped(rows: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
        groups: Dict[Tuple[str, str], List[str]] = {}
        for where, text in rows:
            groups.setdefault((_pattern(where), text), []).append(where)
        out = []
        for (pattern, text), names in groups.items():
            where = names[0] if len(names) == 1 else f"{pattern} (x{len(names)})"
            out.append((where, text))
        return out

    def __str__(self) -> str:
        applied, skipped = self._grouped(self.applied), self._grouped(self.skipped)
        width = max([len(w) for w, _ in applied + skipped] + [10]) + 2
        lines = [f"wam_fast.compile report: {self.target} (backend={self.config.backend}, fused={self.config.fused}, "
                 f"fp8={self.config.fp8}, cache={self.config.cache}, cuda_graphs={self.config.cuda_graphs})",
                 "applied:"]
        lines += [f"  {w:<{width}}{t}" for w, t in applied] or ["  (nothing)"]
        lines.append("left alone:")
        lines += [f"  {w:<{width}}{t}" for w, t in skipped] or ["  (nothing)"]
        if self.checks:
            lines.append("accuracy checks (example_inputs, each lever vs the output before it):")
            for c in self.checks:
                lines.append(f"  {c['lever']:<{width}}{c['metric']} {c['value']:.3g} (limit {c['limit']:.3g}): "
                             f"{'ok' if c['ok'] else 'REVERTED'}")
        return "\n".join(lines)


REPORT_ATTR = "_wam_fast_report"


def compile_report(model) -> CompileReport:
    """The ``CompileReport`` of an object ``compile`` transformed (ValueError if it did not)."""
    report = getattr(model, REPORT_ATTR, None)
    if report is None:
        raise ValueError(f"this {type(model).__name__} was not compiled by wam_fast.compile (no report)")
    return report


def _attach_report(obj, report: CompileReport, bound: bool) -> None:
    obj.__dict__[REPORT_ATTR] = report  # not through nn.Module.__setattr__: a plain attribute
    if bound:  # our own classes (no user attribute to shadow): a .report() method on the instance
        obj.__dict__["report"] = types.MethodType(compile_report, obj)


# ---- registry ------------------------------------------------------------------------------------
Handler = Callable[..., None]
HANDLERS: Dict[type, Handler] = {}


def register_handler(model_type: type):
    """Decorator: ``handler(model, config, filter_fn, report, example_inputs)`` compiles objects of
    ``model_type`` (and subclasses without a handler of their own) in place, filling ``report``."""
    def register(handler: Handler) -> Handler:
        HANDLERS[model_type] = handler
        return handler
    return register


def _handler_for(model) -> Handler:
    module = type(model).__module__ or ""
    if module.split(".")[0] == "diffusers":  # registers the diffusers handlers (diffusers is importable here)
        importlib.import_module("wam_fast.models.diffusers_compat")
    _register_builtin()
    for cls in type(model).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    raise TypeError(f"wam_fast.compile expects an nn.Module or a wam_fast.WAMPolicy, got {type(model).__name__}")


_BUILTIN_DONE = False


def _register_builtin() -> None:
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    from wam_fast.models.transformer import WAMTransformer
    from wam_fast.policy import WAMPolicy

    HANDLERS.setdefault(nn.Module, _compile_module)
    HANDLERS.setdefault(WAMTransformer, _compile_wam_transformer)
    HANDLERS.setdefault(WAMPolicy, _compile_policy)
    _BUILTIN_DONE = True


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
    handler = _handler_for(model)
    report = CompileReport(target=type(model).__name__, config=config)
    handler(model, config, filter_fn, report, example_inputs)
    from wam_fast.models.transformer import WAMTransformer
    from wam_fast.policy import WAMPolicy

    _attach_report(model, report, bound=isinstance(model, (WAMTransformer, WAMPolicy)))
    return model


def from_cogvideox(source, *, action_len: int, action_dim: int, config: Optional[Mapping] = None, **layout):
    """A WAMTransformer with a CogVideoX transformer's backbone weights and fresh action modules.

    source   a diffusers ``CogVideoXTransformer3DModel``, or its state_dict (then ``config``: the
             diffusers config dict, e.g. the checkpoint's config.json; diffusers is not needed)
    layout   text_len (226), latent_frames (4), latent_height, latent_width (32), name
    The result can be compiled (``compile``) and distilled like any WAMTransformer. See
    ``wam_fast.models.convert`` (and ``wam_state_dict_to_cogvideox`` for the way back).
    """
    from wam_fast.models import convert

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


# ---- shared machinery: levers, checks, undo --------------------------------------------------------
def module_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _call(model, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _flatten(out) -> List[Any]:
    """Tensors (and other leaves) of an output, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [x for key in out for x in _flatten(out[key])]
    if isinstance(out, (tuple, list)):
        return [x for item in out for x in _flatten(item)]
    if hasattr(out, "__dataclass_fields__"):
        return [x for key in out.__dataclass_fields__ for x in _flatten(getattr(out, key))]
    return [out]


def compare_outputs(before, after, metric: str, min_sqnr_db: float = 20.0) -> Tuple[bool, float, float, str]:
    """Compare two outputs of one forward: (ok, worst value, limit, detail). metric "rel": relative L2
    error per tensor against REL_TOLERANCE[dtype]; "sqnr": SQNR in dB >= min_sqnr_db."""
    from wam_fast.quant import sqnr_db

    a, b = _flatten(before), _flatten(after)
    if len(a) != len(b):
        return False, math.inf, 0.0, f"the output structure changed ({len(a)} -> {len(b)} leaves)"
    worst = 0.0 if metric == "rel" else math.inf
    limit = DEFAULT_REL_TOLERANCE if metric == "rel" else float(min_sqnr_db)
    for i, (x, y) in enumerate(zip(a, b)):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            if x != y:
                return False, math.inf, limit, f"output {i} changed: {x!r} -> {y!r}"
            continue
        if x.shape != y.shape:
            return False, math.inf, limit, f"output {i} changed shape {tuple(x.shape)} -> {tuple(y.shape)}"
        if not x.is_floating_point():
            if not torch.equal(x, y.to(x.dtype)):
                return False, math.inf, limit, f"integer output {i} changed"
            continue
        if bool(torch.isfinite(x).all()) and not bool(torch.isfinite(y).all()):
            return False, math.inf, limit, f"output {i} has non-finite values the eager output has not"
        if metric == "rel":
            tol = REL_TOLERANCE.get(x.dtype, DEFAULT_REL_TOLERANCE)
            err = (x.double() - y.double()).norm().item() / max(x.double().norm().item(), 1e-30)
            if err > tol or not math.isfinite(err):
                return False, err, tol, f"output {i}: relative error {err:.3g} > {tol:g} ({x.dtype})"
            if err / tol > worst / limit:
                worst, limit = err, tol
        else:
            db = sqnr_db(x, y)
            if db < min_sqnr_db:
                return False, db, limit, f"output {i}: SQNR {db:.1f} dB < {min_sqnr_db:g} dB"
            worst = min(worst, db)
    return True, worst, limit, ""


class _ModuleSwaps:
    """Undo for levers that replace submodules: remembers the modules by name before the lever and
    restores every top-most one that changed."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.before = dict(model.named_modules())

    def changed(self) -> List[Tuple[str, nn.Module, nn.Module]]:
        now = dict(self.model.named_modules())
        return [(name, self.before[name], new) for name, new in now.items()
                if name and name in self.before and self.before[name] is not new]

    def undo(self) -> None:
        # parents first: a retyped parent's old object may hold a child a later swap replaced
        # (quantize_fp8 swaps ff.proj_in, then ff is retyped), which its own row then restores
        for name, old, _ in sorted(self.changed(), key=lambda row: row[0].count(".")):
            set_submodule(self.model, name, old)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def retype(module: nn.Module, cls: type) -> nn.Module:
    """A module of class ``cls`` holding the same parameters, buffers and submodules (fused twins)."""
    from wam_fast.models.fused import _retype

    return _retype(module, cls)


class Session:
    """One compile of one module: applies levers in order, checks each on the example inputs (when
    given) against the output before it, and reverts a lever that fails."""

    def __init__(self, model: nn.Module, config: CompileConfig, filter_fn: Optional[FilterFn],
                 report: CompileReport, example_inputs):
        self.model, self.config, self.report = model, config, report
        self.filter_fn = filter_fn
        self.device = module_device(model)
        self.example = example_inputs
        self.last = self.forward() if example_inputs is not None else None
        if example_inputs is None:
            report.skip("accuracy check", "no example_inputs given: levers applied unchecked (pass "
                        "example_inputs=... to check each against the eager output)")

    def accepts(self, module: nn.Module, name: str) -> bool:
        return self.filter_fn is None or bool(self.filter_fn(module, name))

    def forward(self):
        was_training = self.model.training
        self.model.eval()  # dropout would make the comparison random
        try:
            with torch.no_grad():
                return _call(self.model, self.example)
        finally:
            self.model.train(was_training)

    def lever(self, name: str, metric: str, apply: Callable[[], Optional[Callable[[], None]]],
              min_db: Optional[float] = None) -> str:
        """Run ``apply`` (records report rows, returns an undo callable, or None when it changed
        nothing); check it; revert it (and drop its rows) when its output is off. Returns "kept",
        "unchanged" or "reverted"."""
        mark = len(self.report.applied)
        undo = apply()
        if undo is None:
            return "unchanged"
        if self.example is None:
            return "kept"
        from wam_fast.ops._registry import fallbacks

        seen = {(f["op"], f["backend"], tuple(f["skipped"])): f["count"] for f in fallbacks()}
        try:
            out = self.forward()
            ok, value, limit, detail = compare_outputs(self.last, out, metric,
                                                       self.config.min_fp8_sqnr_db if min_db is None else min_db)
        except Exception as exc:  # a lever that breaks the forward is reverted, not raised
            ok, value, limit, detail = False, math.inf, 0.0, f"the forward raised {type(exc).__name__}: {exc}"
            out = None
        self.report.checks.append({"lever": name, "metric": "relative error" if metric == "rel" else "SQNR dB",
                                   "value": value, "limit": limit, "ok": ok})
        for f in fallbacks():  # our wrappers' per-call fallbacks to the original code, seen on the example
            key = (f["op"], f["backend"], tuple(f["skipped"]))
            if f["count"] > seen.get(key, 0) and "original" in f["backend"] and ok:
                self.report.skip(name, f"falls back per call to the {f['backend']} on the example inputs: "
                                       f"{'; '.join(f['skipped'])}")
        if ok:
            self.last = out
            return "kept"
        undo()
        del self.report.applied[mark:]
        self.report.skip(name, f"reverted: {detail} on the example inputs")
        return "reverted"

    def swap_lever(self, name: str, metric: str, apply: Callable[[], None],
                   describe: Optional[Callable[[str, nn.Module, nn.Module], str]] = None) -> str:
        """A lever that swaps submodules: the report rows and the undo come from what changed."""
        def run():
            swaps = _ModuleSwaps(self.model)
            apply()
            changed = swaps.changed()
            for where, old, new in changed:
                self.report.apply(where, describe(where, old, new) if describe else
                                  f"{type(old).__name__} -> {type(new).__name__}")
            return swaps.undo if changed else None
        return self.lever(name, metric, run)

    def linear_rows(self) -> Dict[str, int]:
        """name -> rows (tokens) each nn.Linear multiplies on the example inputs (most over its calls);
        empty without example inputs."""
        if self.example is None:
            return {}
        rows: Dict[str, int] = {}

        def hook(name):
            def record(module, args, output):
                x = args[0] if args else None
                if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1]:
                    rows[name] = max(rows.get(name, 0), x.numel() // x.shape[-1])
            return record

        handles = [m.register_forward_hook(hook(name)) for name, m in self.model.named_modules()
                   if isinstance(m, nn.Linear)]
        try:
            self.forward()
        finally:
            for h in handles:
                h.remove()
        return rows

    # -- levers every module handler shares --
    def fp8(self, select: Callable[[nn.Module, str], Optional[str]]):
        """quantize_fp8 the linears ``select`` accepts (it returns None) and report why the others
        stay in high precision (its returned reason)."""
        if not self.config.fp8:
            self.report.skip("fp8", "fp8=False")
            return
        from wam_fast.quant import FP8Linear, quantize_fp8

        reasons = {}
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and name:
                why = select(module, name) if self.accepts(module, name) else "excluded by filter_fn"
                if why is not None:
                    reasons[name] = why

        def apply():
            quantize_fp8(self.model, self.config.fp8_config, lambda module, name: name not in reasons)

        def describe(where, old, new):
            if isinstance(new, FP8Linear):
                return (f"nn.Linear({old.in_features} -> {old.out_features}) -> FP8Linear (float8 e4m3 weights, "
                        f"per-channel scales, {new.activation} activation scales)")
            return _describe_swap(where, old, new)

        outcome = self.swap_lever("fp8", "sqnr", apply, describe)
        if outcome == "unchanged":
            self.report.skip("fp8", "no nn.Linear qualifies (reasons per layer below)")
        if outcome != "reverted":
            for name, why in reasons.items():
                self.report.skip(name, f"kept in high precision: {why}")

    def torch_compile(self, graphs: str):
        """torch.compile of the model's forward (``Module.compile``, settings scoped to this model).
        ``graphs``: "module" = CUDA graphs through torch.compile when on; "policy" = none from
        torch.compile (a WAMPolicy's loop graph captures the cached step instead)."""
        config, report = self.config, self.report
        kwargs, graph_note = compile_kwargs(config, self.device, graphs)
        if graph_note is not None:
            (report.apply if graph_note[0] else report.skip)("cuda_graphs", graph_note[1])
        if kwargs is None:
            report.skip("torch.compile", "backend='eager': the model runs without torch.compile")
            return
        if config.backend == "tensorrt":
            importlib.import_module(TENSORRT["module"])  # registers the torch_tensorrt backend

        def apply():
            self.model.compile(**kwargs)
            report.apply("torch.compile", f"forward compiled ({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}); "
                         "first call compiles")
            return lambda: self.model.__dict__.__setitem__("_compiled_call_impl", None)

        from wam_fast.quant import fp8_layers

        if fp8_layers(self.model):  # compiled per-token quantizers round a few codes the other way
            self.lever("torch.compile", "sqnr", apply, min_db=COMPILED_FP8_MIN_SQNR_DB)
        else:
            self.lever("torch.compile", "rel", apply)


def compile_kwargs(config: CompileConfig, device: torch.device, graphs: str = "module"):
    """(torch.compile keyword arguments or None for backend="eager", cuda-graph report row or None).

    The row is (applied?, text). With graphs="module" on CUDA, CUDA graphs come from torch.compile:
    mode "reduce-overhead" (or options["triton.cudagraphs"]) unless the user's mode excludes them.
    graphs="policy": a WAMPolicy's own loop graph is on, so torch.compile must not capture any."""
    on_cuda = device.type == "cuda"
    note = None
    if config.backend == "eager":
        if graphs == "module":
            if config.cuda_graphs and on_cuda:
                raise ValueError("cuda_graphs=True on a module needs torch.compile's CUDA graphs, but backend='eager' "
                                 "runs without torch.compile: use backend='inductor'")
            note = (False, "backend='eager': CUDA graphs of a module come from torch.compile (mode='reduce-overhead')"
                    if on_cuda else f"no CUDA device (the model is on {device})")
        return None, note
    kwargs: Dict[str, Any] = {"backend": "inductor" if config.backend == "inductor" else "torch_tensorrt",
                              "fullgraph": config.fullgraph, "dynamic": config.dynamic}
    mode = config.compile_mode
    options = dict(config.compile_options) if config.compile_options is not None else None
    if graphs == "module":
        if not on_cuda:
            note = (False, f"no CUDA device (the model is on {device})")
        elif config.cuda_graphs is False:
            note = (False, "cuda_graphs=False")
            if mode in GRAPH_MODES:
                raise ValueError(f"cuda_graphs=False but compile_mode={mode!r} captures CUDA graphs; use "
                                 f"'default' or 'max-autotune-no-cudagraphs'")
        elif config.backend == "tensorrt":
            note = (False, "backend='tensorrt': TensorRT runs the graph itself (torch-tensorrt's cudagraphs option)")
        elif options is not None:
            options.setdefault("triton.cudagraphs", True)
            note = (bool(options["triton.cudagraphs"]), "torch.compile CUDA graphs (options['triton.cudagraphs'])")
        elif mode in (None, *GRAPH_MODES):
            mode = mode or "reduce-overhead"
            note = (True, f"torch.compile CUDA graphs (mode={mode!r}): static shapes, replayed per forward")
        elif config.cuda_graphs:
            raise ValueError(f"cuda_graphs=True but compile_mode={mode!r} excludes CUDA graphs; use "
                             f"'reduce-overhead' or 'max-autotune' (or leave compile_mode None)")
        else:
            note = (False, f"compile_mode={mode!r} excludes CUDA graphs")
    elif on_cuda and (mode in GRAPH_MODES or (options or {}).get("triton.cudagraphs")):
        raise ValueError(f"compile_mode={mode!r} / options would capture CUDA graphs inside the WAMPolicy's own "
                         f"loop graph (cuda_graphs): use compile_mode None, 'default' or 'max-autotune-no-cudagraphs'")
    if mode is not None:
        kwargs["mode"] = mode
    if options is not None:
        kwargs["options"] = options
    return kwargs, note


def _installed(module: str) -> bool:
    """Whether an optional package is importable, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_backend_available(config: CompileConfig, device: torch.device) -> None:
    """Errors for backends that cannot run here, raised before anything is changed."""
    if config.backend == "tensorrt":
        if not _installed(TENSORRT["module"]):
            raise RuntimeError(f"backend='tensorrt' needs {TENSORRT['package']}, which is not installed: "
                               f"{TENSORRT['install']} (or use backend='inductor')")
        if device.type != "cuda":
            raise RuntimeError(f"backend='tensorrt' needs a CUDA GPU; the model is on {device}")
    if config.attention != "auto":
        attention_module = importlib.import_module("wam_fast.ops.attention")
        why = attention_module.external_reason(config.attention)
        if why is not None:
            raise RuntimeError(f"CompileConfig(attention={config.attention!r}) cannot be used: {why}. "
                               f"Use attention='auto' (wam_fast's own kernels)")
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, but the model is on {device}; use "
                         f"cuda_graphs=None (on where CUDA is) or False")


def attention_fn(backend: str) -> Callable:
    """(q, k, v) (B, H, N, hd) -> full-mask attention through ``backend`` (CompileConfig.attention)."""
    module = importlib.import_module("wam_fast.ops.attention")
    if backend == "auto":
        return module.attention
    return lambda q, k, v: module.attention_with(backend, q, k, v)


# ---- any nn.Module ---------------------------------------------------------------------------------
def _head_dims() -> Tuple[int, ...]:
    return importlib.import_module("wam_fast.ops.attention").HEAD_DIMS


class MultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention computing softmax attention with ``wam_fast.ops.attention`` (same
    parameters). A call it cannot honour exactly (attention weights requested, masks, causal,
    unbatched input, dropout in training, fewer keys than queries) runs the original module's
    forward; the fallback is noted once (``wam_fast.ops.fallbacks()``)."""

    _wam_fast_attention = "auto"

    def _rejects(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> List[str]:
        reasons = []
        if need_weights:
            reasons.append("need_weights=True (attention weights requested; pass need_weights=False)")
        if attn_mask is not None:
            reasons.append("attn_mask given")
        if key_padding_mask is not None:
            reasons.append("key_padding_mask given")
        if is_causal:
            reasons.append("is_causal=True")
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            reasons.append("unbatched (2-D) input")
        elif key.shape[1 if self.batch_first else 0] < query.shape[1 if self.batch_first else 0]:
            reasons.append("fewer keys than queries")
        if self.training and self.dropout > 0:
            reasons.append(f"attention dropout {self.dropout} in training mode")
        if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            reasons.append(f"dtype {query.dtype}")
        return reasons

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        reasons = self._rejects(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if reasons:
            from wam_fast.ops._registry import _note_fallback

            _note_fallback("attention", "nn.MultiheadAttention (original forward)", reasons)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, nq, e = query.shape
        nk = key.shape[1]
        heads, hd = self.num_heads, self.head_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:  # self-attention: one GEMM for q, k, v
            q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
        else:
            w = weight.chunk(3)
            bq = bias.chunk(3) if bias is not None else (None, None, None)
            q, k, v = (F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), w, bq))
        q = q.reshape(b, nq, heads, hd).transpose(1, 2)
        k = k.reshape(b, nk, heads, hd).transpose(1, 2)
        v = v.reshape(b, nk, heads, hd).transpose(1, 2)
        o = attention_fn(self._wam_fast_attention)(q, k, v)
        o = self.out_proj(o.transpose(1, 2).reshape(b, nq, e))
        if not self.batch_first:
            o = o.transpose(0, 1)
        return o, None


def _mha_static_reasons(module: nn.MultiheadAttention) -> List[str]:
    reasons = []
    if not module._qkv_same_embed_dim:
        reasons.append(f"separate q/k/v projections (kdim={module.kdim}, vdim={module.vdim} != embed_dim)")
    if module.bias_k is not None or module.add_zero_attn:
        reasons.append("add_bias_kv / add_zero_attn (extra key rows)")
    if module.head_dim not in _head_dims():
        reasons.append(f"head_dim {module.head_dim} (wam_fast.ops.attention takes {list(_head_dims())})")
    return reasons


def _is_custom(module: nn.Module) -> bool:
    root = (type(module).__module__ or "").split(".")[0]
    return root not in ("torch", "wam_fast")


def _compile_module(model: nn.Module, config: CompileConfig, filter_fn, report: CompileReport, example_inputs):
    """Any nn.Module: MultiheadAttention -> ops.attention, FP8 linears, torch.compile (+ CUDA graphs)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"wam_fast.compile expects an nn.Module or a WAMPolicy, got {type(model).__name__}")
    device = module_device(model)
    check_backend_available(config, device)
    compile_kwargs(config, device)  # mode / cuda_graphs conflicts raise here, before any change
    session = Session(model, config, filter_fn, report, example_inputs)

    # attention modules
    if config.fused:
        targets = []
        for name, module in model.named_modules():
            if type(module) is nn.MultiheadAttention and name:
                why = _mha_static_reasons(module) if session.accepts(module, name) else ["excluded by filter_fn"]
                if why:
                    report.skip(name, f"nn.MultiheadAttention left as is: {'; '.join(why)}")
                else:
                    targets.append(name)

        def swap():
            for name in targets:
                new = retype(model.get_submodule(name), MultiheadAttention)
                new._wam_fast_attention = config.attention
                set_submodule(model, name, new)

        session.swap_lever("attention", "rel", swap, lambda where, old, new: (
            f"nn.MultiheadAttention -> wam_fast.compiler.MultiheadAttention (wam_fast.ops.attention"
            f"{'' if config.attention == 'auto' else ' via ' + config.attention}; masks, need_weights=True and "
            f"the like fall back per call to the original forward)"))
    else:
        report.skip("fused", "fused=False: no module swapped for wam_fast ops")

    # FP8 linears
    from wam_fast.quant import default_filter

    wanted = default_filter(model)
    rows = session.linear_rows() if config.fp8 else {}
    most = max(rows.values(), default=0)

    def select(module: nn.Module, name: str) -> Optional[str]:
        if type(module) is not nn.Linear:
            return f"{type(module).__name__} is an nn.Linear subclass (its owner may read .weight directly)"
        if module.in_features % 16 or module.out_features % 16:
            return (f"in/out features ({module.in_features}, {module.out_features}) are not multiples of 16 "
                    f"(FP8 GEMM alignment)")
        if not wanted(module, name):
            return "outside the FP8 default filter (wam_fast.quant.default_filter)"
        if name in rows and rows[name] * SMALL_GEMM_FACTOR <= most:
            # a per-sample projection (AdaLN modulation, conditioning): no GEMM worth FP8, and its error
            # would shift every token of the sample the same way
            return (f"multiplies {rows[name]} rows on the example inputs where the token GEMMs take {most}: a "
                    f"per-sample projection (e.g. AdaLN modulation); FP8 buys no time there and its error "
                    f"would bias every token")
        return None

    session.fp8(select)

    for name, module in model.named_modules():
        if name and _is_custom(module):
            report.skip(name, f"{type(module).__name__}: a module of its own, with no wam_fast twin: runs as written"
                              + ("" if config.backend == "eager" else " (torch.compile traces it)"))
    if config.cache:
        report.skip("cache", "applies to wam_fast.WAMPolicy (KV cache of a mask='temporal' WAMTransformer)")
    session.torch_compile("module")


# ---- WAMTransformer ---------------------------------------------------------------------------------
def _wam_fp8_reason(name: str) -> str:
    head = name.split(".")[0]
    if name.endswith(".adaln"):
        return ("AdaLN projection (B x segments rows: FP8 buys no time; its error would bias whole segments); "
                "opt in with wam_fast.quantize_fp8(filter_fn=...)")
    if head in ("text_proj", "action_embed", "time_embed", "step_embed", "patch_embed"):
        return "embedding (negligible FLOPs; raw inputs with outlier channels)"
    if head in ("video_proj", "action_proj", "video_out_norm", "action_out_norm"):
        return "output head / its AdaLN (writes the prediction itself; too few outputs for a GEMM worth speeding up)"
    return "outside wam_fast.quant.default_filter"


_FUSED_WHAT = {
    "FusedAdaLNModulate": "adaln_modulate op", "FusedGatedResidualAdaLN": "gated_residual_adaln op",
    "FusedAttention": "qk_norm_rope + attention ops", "FusedFeedForward": "ffn_gelu op",
    "FP8AdaLNModulate": "adaln_modulate emitting FP8 activations for attn.qkv",
    "FP8GatedResidualAdaLN": "gated_residual_adaln emitting FP8 activations for ff.proj_in",
    "FP8FeedForward": "FFN over FP8 linears", "ExternalAttention": "qk_norm_rope op + external attention kernel",
}


def _describe_swap(where: str, old: nn.Module, new: nn.Module) -> str:
    what = _FUSED_WHAT.get(type(new).__name__)
    return f"{type(old).__name__} -> {type(new).__name__}" + (f" ({what})" if what else "")


def _external_attention_class():
    from wam_fast.models.fused import FusedAttention

    class ExternalAttention(FusedAttention):
        """FusedAttention whose full-mask attention calls run an optional kernel (flash-attn /
        xformers); segment-masked calls (temporal mask, KV cache) run wam_fast.ops.attention."""

        _wam_fast_attention = "auto"

        def forward(self, x, ctx):
            import wam_fast.ops as ops

            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k = ops.qk_norm_rope(q, k, self.norm_q.weight, self.norm_q.bias, self.norm_k.weight, self.norm_k.bias,
                                    ctx.rope_cos, ctx.rope_sin, ctx.rope_start, ctx.rope_end, self.norm_q.eps)
            full = attention_fn(self._wam_fast_attention)

            def attend(q, k, v, q_segments, k_segments, mask):
                return full(q, k, v) if mask == "full" else ops.attention(q, k, v, q_segments, k_segments, mask)

            o = ctx.attend(q, k, v, attend)
            return self.out(o.transpose(1, 2).reshape(b, n, -1))

    return ExternalAttention


_EXTERNAL_ATTENTION = None


def external_attention_class():
    global _EXTERNAL_ATTENTION
    if _EXTERNAL_ATTENTION is None:
        _EXTERNAL_ATTENTION = _external_attention_class()
    return _EXTERNAL_ATTENTION


def _compile_wam_transformer(model, config: CompileConfig, filter_fn, report: CompileReport, example_inputs,
                             graphs: str = "module"):
    """WAMTransformer: fuse, FP8 (default filter), torch.compile of forward; cache is WAMPolicy's."""
    from wam_fast.models import fused
    from wam_fast.quant import default_filter

    device = module_device(model)
    check_backend_available(config, device)
    compile_kwargs(config, device, graphs)
    session = Session(model, config, filter_fn, report, example_inputs)
    if config.fused:
        def swap():
            fused.fuse(model, filter_fn)
            if config.attention != "auto":
                cls = external_attention_class()
                for name, module in list(model.named_modules()):
                    if type(module) is fused.FusedAttention:
                        new = retype(module, cls)
                        new._wam_fast_attention = config.attention
                        set_submodule(model, name, new)

        session.swap_lever("fused", "rel", swap, _describe_swap)
        for name, module in model.named_modules():
            if type(module) in fused.FUSED and not session.accepts(module, name):
                report.skip(name, f"{type(module).__name__} not fused: excluded by filter_fn")
    else:
        report.skip("fused", "fused=False: the reference block pieces run (plain PyTorch)")

    wanted = default_filter(model)
    session.fp8(lambda module, name: None if type(module) is nn.Linear and wanted(module, name)
                else _wam_fp8_reason(name))
    if graphs == "module" and config.cache:
        report.skip("cache", "applies to WAMPolicy: compile wam_fast.WAMPolicy(model, cache=True) (a mask='temporal' "
                             "model) to reuse text and frame K/V")
    session.torch_compile(graphs)


# ---- WAMPolicy ---------------------------------------------------------------------------------------
def _compile_policy(policy, config: CompileConfig, filter_fn, report: CompileReport, example_inputs):
    """WAMPolicy: its model as a WAMTransformer, the KV cache, and (CUDA) the sampling loop's graph."""
    from wam_fast import graphs
    from wam_fast.cache import TemporalKVCache, not_cacheable_message
    from wam_fast.policy import WAMPolicy

    model, device = policy.model, policy.device
    check_backend_available(config, device)
    # everything that can refuse is checked before anything changes
    wants_cache = config.cache and policy.config.mask == "temporal"
    if (policy.cache is not None) != wants_cache and policy.text is not None:
        raise ValueError("compile the WAMPolicy before reset(text): CompileConfig(cache=...) changes its KV cache, "
                         "which reset() fills")
    loop_graph = device.type == "cuda" and config.cuda_graphs is not False and wants_cache
    if config.cuda_graphs and not wants_cache:
        raise ValueError("cuda_graphs=True: the WAMPolicy's loop graph needs the KV cache (cache=True and a "
                         "mask='temporal' model); the uncached forward builds its RoPE tables with host-to-device "
                         "copies, which a CUDA graph cannot hold. Use cuda_graphs=None")
    if config.cuda_graphs and type(policy) not in (WAMPolicy, graphs.CompiledWAMPolicy):
        raise ValueError(f"cuda_graphs=True: {type(policy).__name__} overrides WAMPolicy and keeps its own act(), "
                         f"which the loop graph would replace")
    # the cached loop graph holds the model's pieces; the uncached forward may get torch.compile's graphs
    model_graphs = "policy" if loop_graph else "module"
    if getattr(model, REPORT_ATTR, None) is None:
        compile_kwargs(config, device, model_graphs)  # conflicts raise before any change

    if getattr(model, REPORT_ATTR, None) is not None:
        report.apply("model", "already compiled (wam_fast.compile_report(policy.model))")
    else:
        sub = CompileReport(target=type(model).__name__, config=config)
        _compile_wam_transformer(model, config, filter_fn, sub, example_inputs, graphs=model_graphs)
        _attach_report(model, sub, bound=True)

        def where(w):
            return f"model {w}" if w in ("torch.compile", "fused", "fp8", "accuracy check") else f"model.{w}"

        report.applied += [(where(w), t) for w, t in sub.applied]
        report.skipped += [(where(w), t) for w, t in sub.skipped if w not in ("cache", "cuda_graphs")]
        report.checks += [dict(c, lever=f"model {c['lever']}") for c in sub.checks]

    if config.cache:
        if policy.cache is not None:
            report.apply("cache", "TemporalKVCache: text K/V once per episode, frame K/V once per control step, "
                                  "only the noisy tokens at each denoising step")
        elif not wants_cache:
            report.skip("cache", not_cacheable_message(policy.config))
        else:
            policy.cache = TemporalKVCache(model)
            report.apply("cache", "TemporalKVCache turned on (the policy was built with cache=False)")
    elif policy.cache is not None:
        policy.cache = None
        report.apply("cache", "turned off (CompileConfig.cache=False): every step runs the whole sequence")
    else:
        report.skip("cache", "cache=False")

    if policy.cache is not None and config.backend != "eager":
        # be exact about reach: the cached passes call the blocks directly, not model.forward
        report.skip("cached steps: torch.compile", "the KV cache runs the blocks outside model.forward, so "
                    "torch.compile of forward does not reach the cached denoising steps (they run eagerly; on "
                    "CUDA the loop graph holds them)")
    if device.type != "cuda":
        report.skip("cuda_graphs", f"no CUDA device (the policy runs on {device}): the sampling loop runs eagerly")
    elif config.cuda_graphs is False:
        report.skip("cuda_graphs", "cuda_graphs=False")
    elif policy.cache is None:
        report.skip("cuda_graphs", "uncached policy: its forward builds RoPE tables with host-to-device copies that a "
                                   "loop graph cannot hold (the model's torch.compile may use its own CUDA graphs)")
    elif type(policy) not in (WAMPolicy, graphs.CompiledWAMPolicy):
        report.skip("cuda_graphs", f"{type(policy).__name__} is a WAMPolicy subclass with its own act(): left as is")
    else:
        runner = graphs.attach(policy, graphs.CudaGraphCapture)
        report.apply("cuda_graphs", runner.describe())
    graphs.make_compiled(policy)


# ---- what can run here (python -m wam_fast.info) ------------------------------------------------------
def capabilities() -> List[dict]:
    """Rows {"name", "status", "detail"} for the compile backends and optional attention kernels."""
    attention_module = importlib.import_module("wam_fast.ops.attention")
    rows = [{"name": "backend inductor", "status": "available", "detail": f"torch.compile (torch {torch.__version__})"},
            {"name": "backend eager", "status": "available",
             "detail": "no torch.compile: fused ops, FP8, cache, graphs"}]
    if not _installed(TENSORRT["module"]):
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


__all__ = ["CompileConfig", "CompileReport", "compile", "compile_report", "from_cogvideox", "register_handler",
           "MultiheadAttention", "capabilities", "compare_outputs", "REL_TOLERANCE"]
