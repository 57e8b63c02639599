"""One compile of one module (``Session``): levers applied in order, each checked on the example inputs
against the output before it and reverted when it fails; and the torch.compile settings of a config."""
from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from wam_fast import ops
from wam_fast.compiler.config import (COMPILED_FP8_MIN_SQNR_DB, DEFAULT_REL_TOLERANCE, GRAPH_MODES, REL_TOLERANCE,
                                      TENSORRT, CompileConfig, FilterFn)
from wam_fast.compiler.report import CompileReport
from wam_fast.ops.registry import fallbacks
from wam_fast.quant import FP8Linear, fp8_layers, quantize_fp8, sqnr_db
from wam_fast.utils import optional
from wam_fast.utils.modules import ModuleSwaps, call_module, set_submodule


def module_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


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
                return call_module(self.model, self.example)
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
            swaps = ModuleSwaps(self.model)
            apply()
            changed = self._drop_bypassed(name, swaps.changed())
            for where, old, new in changed:
                self.report.apply(where, describe(where, old, new) if describe else
                                  f"{type(old).__name__} -> {type(new).__name__}")
            return swaps.undo if changed else None
        return self.lever(name, metric, run)

    def _drop_bypassed(self, lever: str, changed):
        """Swapped modules the example forward never calls (e.g. the attention of an
        nn.TransformerEncoderLayer, whose eval fast path calls a fused kernel instead) are put back and
        reported as bypassed: the report lists only what runs. Without example inputs nothing is probed."""
        if self.example is None or not changed:
            return changed
        called = set()

        def counting(where, forward):
            def run(*args, **kwargs):
                called.add(where)
                return forward(*args, **kwargs)
            return run

        # an instance-level forward, not a hook: a hook would itself turn such a fast path off
        for where, _, new in changed:
            new.forward = counting(where, new.forward)
        try:
            self.forward()
        except Exception:  # the lever's own check reports and reverts a forward that raises
            return changed
        finally:
            for _, _, new in changed:
                del new.forward
        kept = []
        for where, old, new in changed:
            if where in called:
                kept.append((where, old, new))
                continue
            set_submodule(self.model, where, old)
            parent = self.model.get_submodule(where.rpartition(".")[0]) if "." in where else self.model
            self.report.skip(where, f"{lever}: bypassed, put back: the example forward never calls it (its "
                                    f"parent {type(parent).__name__} runs a path of its own, e.g. a fused "
                                    f"fast path in eval mode)")
        return kept

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
            return describe_swap(where, old, new)

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


def check_backend_available(config: CompileConfig, device: torch.device) -> None:
    """Errors for backends that cannot run here, raised before anything is changed."""
    if config.backend == "tensorrt":
        if not optional.installed(TENSORRT["module"]):
            raise RuntimeError(f"backend='tensorrt' needs {TENSORRT['package']}, which is not installed: "
                               f"{TENSORRT['install']} (or use backend='inductor')")
        if device.type != "cuda":
            raise RuntimeError(f"backend='tensorrt' needs a CUDA GPU; the model is on {device}")
    if config.attention != "auto":
        attention_module = ops.op_module("attention")
        why = attention_module.external_reason(config.attention)
        if why is not None:
            raise RuntimeError(f"CompileConfig(attention={config.attention!r}) cannot be used: {why}. "
                               f"Use attention='auto' (wam_fast's own kernels)")
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, but the model is on {device}; use "
                         f"cuda_graphs=None (on where CUDA is) or False")


def attention_fn(backend: str) -> Callable:
    """(q, k, v) (B, H, N, hd) -> full-mask attention through ``backend`` (CompileConfig.attention)."""
    module = ops.op_module("attention")
    if backend == "auto":
        return module.attention
    return lambda q, k, v: module.attention_with(backend, q, k, v)


FUSED_WHAT = {
    "FusedAdaLNModulate": "adaln_modulate op", "FusedGatedResidualAdaLN": "gated_residual_adaln op",
    "FusedAttention": "qk_norm_rope + attention ops", "FusedFeedForward": "ffn_gelu op",
    "FP8AdaLNModulate": "adaln_modulate emitting FP8 activations for attn.qkv",
    "FP8GatedResidualAdaLN": "gated_residual_adaln emitting FP8 activations for ff.proj_in",
    "FP8FeedForward": "FFN over FP8 linears", "ExternalAttention": "qk_norm_rope op + external attention kernel",
}


def describe_swap(where: str, old: nn.Module, new: nn.Module) -> str:
    """A report row for a module swap: old class -> new class (and the op it runs)."""
    what = FUSED_WHAT.get(type(new).__name__)
    return f"{type(old).__name__} -> {type(new).__name__}" + (f" ({what})" if what else "")
