"""Pattern fusion for models wam_fast has never seen (the generic handler's ``patterns`` lever).

A module of the user's own (a DiT block, a whole GPT) is traced with ``torch.fx``; its graph is searched
for four expressions, and each one found is replaced by a call into ``wam_fast.compiler.sites``, which
runs one wam_fast op:

=====================  ===========================================================  =====================
site                   expression in the traced graph                              op
=====================  ===========================================================  =====================
AdaLN modulation       ``layer_norm(x) * (1 + scale) + shift`` (either operand order) ``adaln_modulate``
gated residual         ``x + gate * y`` (gate a per-sample or shared (D,) table)      ``gated_residual``
GELU-linear            ``gelu(linear(x), approximate="tanh")``                      ``ffn_gelu``
attention              ``scaled_dot_product_attention(q, k, v[, is_causal])``        ``attention``
=====================  ===========================================================  =====================

Shapes decide what is a site (a gate table vs a per-token product, which operand is the residual, a
head dim the op takes; x (B, N, D) or (M, D)), so the lever needs example inputs: each traced module is run once on what it
receives in the example forward, recording every value's shape. The fused module keeps its class (a
subclass), parameters, submodules and state_dict; its forward is the rewritten graph, looked up through
``self`` at call time, so later levers (module swaps, FP8) still reach the submodules. In training mode
it runs the original forward (the trace froze eval-mode branches).
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from wam_fast.compiler import sites
from wam_fast.compiler.session import Session
from wam_fast.ops.registry import note_fallback, triton_interpreting
from wam_fast.utils.modules import retype, set_submodule

ADD, MUL = (operator.add, torch.add), (operator.mul, torch.mul)
SDPA = F.scaled_dot_product_attention
TRACED = "_wam_fast_traced_forward"


@dataclass
class Site:
    kind: str                 # the op: adaln_modulate, gated_residual, ffn_gelu, attention
    where: str                # a name in the model (module path, or unit path + node name)
    what: str                 # the expression replaced, for the report
    out: fx.Node              # the node whose value the op computes
    args: tuple               # the site function's arguments (nodes, attribute paths "attr:<path>", constants)
    dead: List[fx.Node]       # nodes of the expression, erased when nothing else uses them
    linear: Optional[str] = None  # the nn.Linear (path in the unit) whose weight an ffn_gelu site reads


@dataclass
class Unit:
    """One traced module of the user's own and what was found in it."""
    name: str
    module: nn.Module
    graph_module: fx.GraphModule
    sites: List[Site] = field(default_factory=list)
    left: List[Tuple[str, str]] = field(default_factory=list)  # (where, why) sites not replaced


def no_kernel_reason(device: torch.device) -> Optional[str]:
    """Why swapping an expression for a wam_fast op would not pay on ``device``, or None. Off CUDA (and
    without the Triton interpreter) the ops run their torch backend: the same math, but opaque to
    torch.compile, which fuses the expression itself (0.4-0.7x of torch.compile alone on CPU,
    benchmarks/families.py)."""
    if device.type == "cuda" or triton_interpreting():
        return None
    return (f"no wam_fast kernel runs on {device} (the ops would run their torch backend, which torch.compile "
            f"cannot fuse): left to torch.compile")


def is_custom(module: nn.Module) -> bool:
    root = (type(module).__module__ or "").split(".")[0]
    return root not in ("torch", "wam_fast")


# ---- tracing and shapes ---------------------------------------------------------------------------------
def trace(module: nn.Module) -> fx.GraphModule:
    """torch.fx trace of ``module`` in eval mode (raises what fx raises for code it cannot trace)."""
    params = inspect.signature(type(module).forward).parameters.values()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise TypeError("its forward takes *args / **kwargs")
    was_training = module.training
    module.eval()
    try:
        return fx.symbolic_trace(module)
    finally:
        module.train(was_training)


class _Recorder(fx.Interpreter):
    """Runs a traced graph and keeps, per node, a meta tensor of each tensor value (or the small value)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: Dict[fx.Node, object] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.values[n] = torch.empty(out.shape, dtype=out.dtype, device="meta")
        elif isinstance(out, (int, float, bool, torch.Size)):
            self.values[n] = out
        return out


def record_values(unit: Unit, args: tuple, kwargs: dict) -> Dict[fx.Node, object]:
    bound = inspect.signature(type(unit.module).forward).bind(unit.module, *args, **kwargs)
    bound.apply_defaults()
    positional = list(bound.arguments.values())[1:]
    recorder = _Recorder(unit.graph_module)
    with torch.no_grad():
        recorder.run(*positional)
    return recorder.values


# ---- matching ------------------------------------------------------------------------------------------
def _binary(node, fns, method) -> Optional[tuple]:
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 2:
        return None
    if (node.op == "call_function" and node.target in fns) or (node.op == "call_method" and node.target == method):
        return node.args
    return None


def _one_plus(node) -> Optional[fx.Node]:
    """``scale`` when node is ``1 + scale`` (or ``scale + 1``)."""
    pair = _binary(node, ADD, "add")
    if pair is None:
        return None
    for one, other in (pair, pair[::-1]):
        if isinstance(one, (int, float)) and not isinstance(one, bool) and one == 1 and isinstance(other, fx.Node):
            return other
    return None


def _layer_norm(node, unit: Unit, values) -> Optional[dict]:
    """x, weight, bias, eps of a LayerNorm over the last dim (nn.LayerNorm or F.layer_norm)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        m = unit.module.get_submodule(node.target)
        if type(m) is nn.LayerNorm and len(m.normalized_shape) == 1:
            return {"x": node.args[0], "eps": m.eps, "where": node.target,
                    "weight": f"attr:{node.target}.weight" if m.weight is not None else None,
                    "bias": f"attr:{node.target}.bias" if m.bias is not None else None}
    if node.op == "call_function" and node.target in (F.layer_norm, torch.layer_norm):
        try:
            bound = inspect.signature(F.layer_norm).bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        a = bound.arguments
        shape = values.get(a["normalized_shape"]) if isinstance(a["normalized_shape"], fx.Node) else a["normalized_shape"]
        if isinstance(a["eps"], (int, float)) and isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1:
            return {"x": a["input"], "eps": float(a["eps"]), "where": node.name, "weight": a["weight"],
                    "bias": a["bias"]}
    return None


def _source(node) -> str:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return node.target
    return getattr(node, "name", repr(node))


def _meta(values, *nodes):
    """The recorded meta tensors of nodes (None unless all are recorded tensors)."""
    metas = [values.get(n) if isinstance(n, fx.Node) else None for n in nodes]
    return metas if all(isinstance(m, torch.Tensor) for m in metas) else None


def find_adaln(unit: Unit, values, node) -> Optional[Site]:
    pair = _binary(node, ADD, "add")
    for product, shift in (pair, pair[::-1]) if pair else ():
        factors = _binary(product, MUL, "mul")
        for normed, one_plus in (factors, factors[::-1]) if factors else ():
            norm, scale = _layer_norm(normed, unit, values), _one_plus(one_plus)
            if norm is None or scale is None or len(product.users) != 1 or not isinstance(shift, fx.Node):
                continue
            where = f"{unit.name}.{norm['where']}"
            metas = _meta(values, norm["x"], shift, scale)
            reasons = ["shapes not recorded"] if metas is None else sites._table_reasons(
                metas[0], {"shift": metas[1], "scale": metas[2]})
            if reasons:
                unit.left.append((where, f"AdaLN modulation left as is: {'; '.join(reasons)}"))
                return None
            return Site("adaln_modulate", where, "layer_norm(x) * (1 + scale) + shift", node,
                        (norm["x"], shift, scale, norm["weight"], norm["bias"], norm["eps"]),
                        [node, product, one_plus, normed])
    return None


def find_gated_residual(unit: Unit, values, node) -> Optional[Site]:
    pair = _binary(node, ADD, "add")
    for residual, product in (pair, pair[::-1]) if pair else ():
        factors = _binary(product, MUL, "mul")
        if factors is None or len(product.users) != 1:
            continue
        for gate, y in (factors, factors[::-1]):
            metas = _meta(values, residual, gate, y)
            if metas is None or metas[2].shape != metas[0].shape or metas[2].dim() not in (2, 3):
                continue
            if sites._table_reasons(metas[0], {"gate": metas[1]}):
                continue  # a per-token product: an ordinary add
            return Site("gated_residual", f"{unit.name}.{node.name}", f"x + gate * y (y from {_source(y)})", node,
                        (residual, gate, y), [node, product])
    return None


def _gelu_tanh(node) -> Optional[bool]:
    """True for a tanh GELU, False for the exact one, None for anything else."""
    if node.op == "call_function" and node.target is F.gelu:
        return node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none") == "tanh"
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return module.approximate == "tanh" if type(module) is nn.GELU else None
    return None


def find_ffn_gelu(unit: Unit, values, node, keep_linear: Callable[[nn.Linear, str], Optional[str]]) -> Optional[Site]:
    tanh = _gelu_tanh(node)
    if tanh is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    lin = node.args[0]
    if len(lin.users) != 1:
        return None
    if lin.op == "call_module" and type(unit.module.get_submodule(lin.target)) is nn.Linear and len(lin.args) == 1:
        m = unit.module.get_submodule(lin.target)
        x, weight = lin.args[0], f"attr:{lin.target}.weight"
        bias = f"attr:{lin.target}.bias" if m.bias is not None else None
        where, linear = f"{unit.name}.{lin.target}", lin.target
        why = keep_linear(m, f"{unit.name}.{lin.target}")
    elif lin.op == "call_function" and lin.target is F.linear and len(lin.args) >= 2 and not lin.kwargs:
        x, weight, bias = lin.args[0], lin.args[1], lin.args[2] if len(lin.args) > 2 else None
        where, linear, why = f"{unit.name}.{lin.name}", None, None
    else:
        return None
    if not tanh:
        why = "exact (erf) GELU: ops.ffn_gelu computes the tanh GELU"
    if why:
        unit.left.append((where, f"GELU-linear left as is: {why}"))
        return None
    return Site("ffn_gelu", where, "gelu_tanh(linear(x))", node, (x, weight, bias), [node, lin], linear)


def find_attention(unit: Unit, values, node) -> Optional[Site]:
    if node.op != "call_function" or node.target is not SDPA:
        return None
    where = f"{unit.name}.{node.name}"
    try:
        a = inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False: None).bind(*node.args, **node.kwargs).arguments
    except TypeError:
        return None
    extra = {k: v for k, v in a.items() if k in ("attn_mask", "scale") and v is not None}
    if a.get("dropout_p", 0.0) != 0.0 or a.get("enable_gqa", False) is not False:
        extra["dropout_p/enable_gqa"] = (a.get("dropout_p"), a.get("enable_gqa"))
    causal = a.get("is_causal", False)
    metas = _meta(values, a["query"], a["key"], a["value"])
    reasons = [f"{k} given" for k in extra] + ([] if isinstance(causal, bool) else ["is_causal is not a constant"])
    if not reasons:
        reasons = ["shapes not recorded"] if metas is None else sites.attention_reasons(*metas, causal)
    if reasons:
        unit.left.append((where, f"attention left as is: {'; '.join(reasons)}"))
        return None
    what = f"scaled_dot_product_attention({'causal, ' if causal else ''}head_dim {metas[0].shape[-1]})"
    return Site("attention", where, what, node, (a["query"], a["key"], a["value"], causal), [node])


# ---- rewriting -----------------------------------------------------------------------------------------
SITE_FUNCTIONS = {"adaln_modulate": sites.adaln_modulate_site, "gated_residual": sites.gated_residual_site,
                  "ffn_gelu": sites.ffn_gelu_site, "attention": sites.attention_site}


def find_sites(unit: Unit, values, keep_linear) -> None:
    """Finds and rewrites every site of ``unit`` (AdaLN first: its final add is not a gated residual)."""
    graph = unit.graph_module.graph
    for finder in (find_adaln, find_gated_residual, lambda u, v, n: find_ffn_gelu(u, v, n, keep_linear),
                   find_attention):
        for node in list(graph.nodes):
            if node.graph is not graph or node.op == "output":
                continue
            site = finder(unit, values, node)
            if site is not None:
                values[_rewrite(graph, site)] = values.get(site.out)
                unit.sites.append(site)
    graph.lint()


def _rewrite(graph: fx.Graph, site: Site) -> fx.Node:
    with graph.inserting_before(site.out):
        args = tuple(graph.get_attr(a[5:]) if isinstance(a, str) and a.startswith("attr:") else a for a in site.args)
        new = graph.call_function(SITE_FUNCTIONS[site.kind], args)
    site.out.replace_all_uses_with(new)
    for node in site.dead:  # the expression's own nodes, outermost first
        if not node.users:
            graph.erase_node(node)
    return new


_CLASSES: Dict[type, type] = {}


def fused_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward is the instance's rewritten graph (the original in training mode)."""
    if cls not in _CLASSES:
        def forward(self, *args, **kwargs):
            if self.training:
                note_fallback("pattern_fusion", f"{cls.__name__}.forward (original)",
                              ["training mode: the traced graph froze eval-mode branches"])
                return cls.forward(self, *args, **kwargs)
            return self.__dict__[TRACED](self, *args, **kwargs)

        _CLASSES[cls] = type(f"PatternFused{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _CLASSES[cls]


def traced_forward(unit: Unit) -> Callable:
    """The generated forward of the rewritten graph as a plain function of ``self`` (the user's module:
    every submodule and attribute is looked up through it at call time)."""
    unit.graph_module.recompile()
    return type(unit.graph_module).forward


def capture_inputs(modules: Dict[str, nn.Module], run: Callable[[], object]) -> Dict[str, Tuple[tuple, dict]]:
    """(args, kwargs) of the first call of each module during ``run()``."""
    seen: Dict[str, Tuple[tuple, dict]] = {}
    handles = []
    for name, module in modules.items():
        def hook(mod, args, kwargs, name=name):
            seen.setdefault(name, (args, dict(kwargs)))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def find_units(model: nn.Module, accepts: Callable[[nn.Module, str], bool]) -> Tuple[List[Unit], List[Tuple[str, str]]]:
    """The outermost traceable modules of the user's own (never the model itself: it keeps its forward),
    and (name, why) for those fx could not trace (their children are tried instead)."""
    units, failed = [], []
    for name, module in model.named_modules():
        if not name or not is_custom(module) or any(name.startswith(u.name + ".") for u in units):
            continue
        if not accepts(module, name):
            continue
        try:
            units.append(Unit(name, module, trace(module)))
        except Exception as exc:  # fx raises many types for code it cannot trace
            failed.append((name, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    return units, failed


def fused_linears(units: List[Unit]) -> Set[str]:
    """Model paths of the nn.Linear layers whose weights ffn_gelu sites read."""
    return {f"{u.name}.{s.linear}" for u in units for s in u.sites if s.linear}


@dataclass
class Fused:
    linears: Set[str]   # nn.Linear paths whose weights pattern sites read (FP8 must leave them alone)
    covered: Set[str]   # module paths this lever accounted for (traced units and what they hold)


def fuse_patterns(session: Session, keep_linear: Callable[[nn.Linear, str], Optional[str]]) -> Fused:
    """The ``patterns`` lever: trace, find, rewrite, swap, check (reverted as a whole when off)."""
    model, report = session.model, session.report
    if session.example is None:
        report.skip("patterns", "pattern fusion (AdaLN, gated residual, GELU-linear, attention in modules of your own) "
                                "needs example_inputs: shapes decide which expressions are sites")
        return Fused(set(), set())
    why = no_kernel_reason(session.device)
    if why:
        report.skip("patterns", f"pattern fusion: {why}")
        return Fused(set(), set())
    units, failed = find_units(model, session.accepts)
    for name, why in failed:
        report.skip(name, f"patterns: torch.fx cannot trace it ({why}); its submodules were tried")
    inputs = capture_inputs({u.name: u.module for u in units}, session.forward)
    fused = []
    for unit in units:
        kind = type(unit.module).__name__
        if unit.name not in inputs:
            report.skip(unit.name, f"{kind}: never called on the example inputs: runs as written")
            continue
        try:
            values = record_values(unit, *inputs[unit.name])
        except Exception as exc:  # the traced graph does not run as the module did: leave it
            report.skip(unit.name, f"{kind}: its traced graph does not run on its example inputs "
                                   f"({type(exc).__name__}: {exc}): runs as written")
            continue
        find_sites(unit, values, keep_linear)
        for where, why in unit.left:
            report.skip(where, why)
        if unit.sites:
            fused.append(unit)
        else:
            report.skip(unit.name, f"{kind}: traced by torch.fx, no AdaLN / gated residual / GELU-linear / attention "
                                   f"site found: runs as written")

    def swap():
        for unit in fused:
            new = retype(unit.module, fused_class(type(unit.module)))
            new.__dict__[TRACED] = traced_forward(unit)
            set_submodule(model, unit.name, new)
            for site in unit.sites:
                report.apply(site.where, f"{site.what} -> wam_fast.ops.{site.kind} (pattern site)")

    def describe(where, old, new):
        unit = next(u for u in fused if u.name == where)
        counts = {}
        for site in unit.sites:
            counts[site.kind] = counts.get(site.kind, 0) + 1
        return (f"{type(old).__name__} -> {type(new).__name__} (traced by torch.fx; pattern sites: "
                f"{', '.join(f'{n} {k}' for k, n in counts.items())})")

    outcome = session.swap_lever("patterns", "rel", swap, describe)
    if outcome == "reverted":
        return Fused(set(), set())
    covered = {name for name, _ in model.named_modules() for u in units
               if name == u.name or name.startswith(u.name + ".")}
    return Fused(fused_linears(fused), covered)
