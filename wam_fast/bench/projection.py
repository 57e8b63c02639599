"""Roofline PROJECTION of each bench row's latency per action chunk on GPUs this machine may not have
(``python -m wam_fast.bench --project h100,h200,rtx4090,l40s``; docs/design.md, Projection). It is a
projection from op shapes and a ceiling table, never a measurement.

Tracing: the row's model (the eager teacher, or its shortcut student fused, with FP8 linears or not)
is built in bf16 on the meta device (no memory, instant) and each pass the row runs is traced once,
after a warm-up call, with the kernel counter of ``wam_fast.bench.kernels`` (a ``wam_fast::`` custom
op is one launch; views and allocations are none). A chunk is:

- teacher rows (eager ``wam_fast.sample``): steps x one uncached forward of the full-mask teacher on
  2 x batch rows (cond + uncond batched);
- student rows with the cache: one frame pass + steps cached denoising steps (batch rows, no CFG);
- student rows without: steps uncached forwards of the temporal student.

Left out: the text pass (once per instruction), the step grid's AdaLN tables (once per grid) and the
sampler's updates (a few elementwise kernels on the latents per step).

Per op: FLOPs of GEMMs (mm, addmm, bmm, _scaled_mm, convolution, ``wam_fast`` fp8_linear and
ffn_gelu) are 2 M N K, at the FP8 rate when the operands are FP8 and the bf16 rate otherwise;
attention (``wam_fast`` attention, SDPA) 4 B H Nq Nk hd over every query-key pair of the call. At
history 0 (the bench rows) the temporal model's calls hold no masked pair (a clean frame's call has
exactly the text and its own keys); with history frames the hidden keys would be counted too, which
the Triton kernel (it skips fully masked key blocks) does not pay. Bytes: every tensor argument once
and every fresh output once, counting only the elements a broadcast (stride 0) view really holds.

Time of an op = max(FLOPs / (peak x fraction x wave efficiency), bytes / (bandwidth x fraction)),
with the ceilings of ``wam_fast.bench.ceilings.DEVICE_CEILINGS``. Wave efficiency is tile
quantization over the SMs: attention runs 128-query blocks per batch and head; a GEMM is given the
best of 128 x 128 or 64 x 128 output tiles and split-K by 1, 2 or 4 (K / split >= 512), the choice a
tuned library makes for a short pass (a frame's 256 tokens), assumed to cost nothing more (optimistic).
Launches are added: ``EAGER_LAUNCH_US`` of host time per kernel for the eager teacher (added,
not overlapped: an upper bound), ``GRAPH_NODE_US`` per kernel node for the students, which run as
one CUDA graph per chunk (on a GPU the bench compiles them; the trace is of the fused eager model,
whose remaining aten ops inductor may fuse further).

Eager SDPA on meta decomposes into its math path (bmm, softmax, bmm); a GPU runs one flash kernel
for bf16 at head_dim 64, so the trace records one ``aten._scaled_dot_product_flash_attention``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from wam_fast import configs
from wam_fast.bench import kernels as K
from wam_fast.bench.accounting import chunk_flops
from wam_fast.bench.ceilings import DEVICE_CEILINGS, DeviceCeiling
from wam_fast.bench.models import default_dtype
from wam_fast.bench.report import write_json
from wam_fast.bench.rows import DEFAULT_STEPS, Variant, select, variants_for
from wam_fast.models.fused import fuse
from wam_fast.models.transformer import WAMTransformer
from wam_fast.quant import quantize_fp8

LABEL = "PROJECTION (roofline from traced ops and a ceiling table; not a measurement)"
# Host time per kernel of an eager PyTorch op (Python, dispatcher, cudaLaunchKernel): a few us on a
# fast CPU, the order the PyTorch CUDA Graphs blog post (2021) reports. An assumption.
EAGER_LAUNCH_US = 6.0
# Per node of a replayed CUDA graph: the gap between dependent kernels (launch latency, fill and
# drain) that a graph shortens but does not remove. An assumption.
GRAPH_NODE_US = 1.0
TILE = 128
SPLIT_K = (1, 2, 4)
MIN_SPLIT_K = 512
SDPA_OP = "aten._scaled_dot_product_flash_attention"
GEMM_OPS = ("aten.mm", "aten.addmm", "aten.bmm", "aten._scaled_mm", "wam_fast.fp8_linear", "wam_fast.ffn_gelu")
ATTENTION_OPS = ("wam_fast.attention", SDPA_OP)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class OpCost:
    """One traced kernel: its compute unit ("bf16", "fp8", "attention" or None: memory only), FLOPs,
    bytes moved and the shape its work tiles: (batch, M, N, K) of a GEMM, (B x H, Nq, 0, 0) of attention."""

    name: str
    unit: Optional[str]
    flops: int
    bytes: int
    shape: tuple = (0, 0, 0, 0)


def _held_bytes(t: torch.Tensor) -> int:
    # a broadcast (stride 0) dimension holds one element, however wide the view
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _moved_bytes(func, args, kwargs, out) -> int:
    """Every distinct tensor argument once (read, or written when mutated) + every fresh output once."""
    seen, total = set(), 0
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += _held_bytes(t)
    schema = getattr(func, "_schema", None)
    returns = schema.returns if schema is not None else ()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for i, t in enumerate(outs):
        aliased = i < len(returns) and returns[i].alias_info is not None  # in place: counted as an argument
        if isinstance(t, torch.Tensor) and not aliased and id(t) not in seen:
            total += _held_bytes(t)
    return total


def gemm_shape(name: str, args) -> tuple:
    """(batch, M, N, K, operand dtype) of a GEMM op's positional arguments."""
    if name in ("wam_fast.fp8_linear", "wam_fast.ffn_gelu"):  # x (..., K), weight (N, K)
        x, weight = args[0], args[2] if name == "wam_fast.fp8_linear" else args[1]
        k = x.shape[-1]
        return 1, x.numel() // max(k, 1), weight.shape[0], k, x.dtype
    a, b = (args[1], args[2]) if name == "aten.addmm" else (args[0], args[1])
    batch = a.shape[0] if name == "aten.bmm" else 1
    return batch, a.shape[-2], b.shape[-1], a.shape[-1], a.dtype


def attention_cost(name: str, q: torch.Tensor, k: torch.Tensor, moved: int) -> OpCost:
    b, h, nq, hd = q.shape
    return OpCost(name, "attention", 4 * b * h * nq * k.shape[2] * hd, moved, (b * h, nq, 0, 0))


def op_cost(func, name: str, args, kwargs, out) -> OpCost:
    """FLOPs, bytes and compute unit of one kernel (module docstring)."""
    moved = _moved_bytes(func, args, kwargs, out)
    if name in GEMM_OPS:
        batch, m, n, k, dtype = gemm_shape(name, args)
        unit = "fp8" if dtype in FP8_DTYPES else "bf16"
        return OpCost(name, unit, 2 * batch * m * n * k, moved, (batch, m, n, k))
    if name == "aten.convolution":  # the patch embedding: an implicit GEMM over output pixels
        weight = args[1]
        per_output = weight.shape[1] * math.prod(weight.shape[2:])
        pixels = out.numel() // out.shape[1]
        return OpCost(name, "bf16", 2 * out.numel() * per_output, moved, (1, pixels, out.shape[1], per_output))
    if name in ATTENTION_OPS:
        return attention_cost(name, args[0], args[1], moved)
    return OpCost(name, None, 0, moved, 0)


class CostRecorder(K.KernelCounter):
    """The kernel counter, also keeping every kernel's ``OpCost`` (identical kernels counted together)."""

    def __init__(self):
        super().__init__()
        self.costs: collections.Counter = collections.Counter()

    def record(self, name: str, cost: OpCost) -> None:
        self.ops[self.layer][name] += 1
        self.costs[cost] += 1

    def launched(self, func, name, args, kwargs, out) -> None:
        self.costs[op_cost(func, name, args, kwargs, out)] += 1


class FlashSDPA(TorchFunctionMode):
    """SDPA as the one flash kernel a GPU runs (module docstring), recorded into ``recorder``."""

    def __init__(self, recorder: CostRecorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))  # an allocation: not a kernel
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        moved = sum(_held_bytes(t) for t in (q, k, v, mask, out) if isinstance(t, torch.Tensor))
        self.recorder.record(SDPA_OP, attention_cost(SDPA_OP, q, k, moved))
        return out


# ---- tracing a row ------------------------------------------------------------------------------------
def meta_model(config, variant: str) -> WAMTransformer:
    """The model of a kernels variant ("eager", "fused", "fp8") in bf16 on the meta device."""
    if variant not in K.VARIANTS:
        raise ValueError(f"variant must be one of {K.VARIANTS}, got {variant!r}")
    with torch.device("meta"), default_dtype(torch.bfloat16):
        model = WAMTransformer(config)
    model.eval().requires_grad_(False)
    if variant != "eager":
        fuse(model)
    if variant == "fp8":
        quantize_fp8(model)
    return model


@torch.no_grad()
def trace_passes(model: WAMTransformer, rows: int, wanted: Sequence[str]) -> Dict[str, collections.Counter]:
    """{pass: Counter[OpCost]} of the passes ``wanted`` (``kernels.PASSES``), each after a warm-up call."""
    traces = {}
    for name, run in K.pass_runs(model, rows):
        run()  # every pass once, as count_model does: a later pass may need its state (a step needs a frame)
        if name in wanted:  # and per-layout tables are built on a first call, so record the second
            recorder = CostRecorder()
            with K.counting(model, recorder), FlashSDPA(recorder):
                run()
            traces[name] = recorder.costs
    missing = set(wanted) - set(traces)
    if missing:
        raise ValueError(f"passes {sorted(missing)} do not exist for a mask={model.config.mask!r} model; "
                         f"expected some of {K.PASSES}")
    return traces


def chunk_passes(variant: Variant, batch: int) -> tuple:
    """(kernels variant, rows, [(pass, times per chunk)], launch mode) of a bench row's chunk. A compiled
    teacher row runs the fused teacher from torch.compile's CUDA graphs (traced as the fused eager model:
    inductor's extra fusions are not credited)."""
    if not variant.student:
        guided = variant.cfg_scale != 1.0 or variant.cfg_schedule != "constant"
        kind, launch = ("fp8" if variant.fp8 else "fused", "graph") if variant.compiled else ("eager", "eager")
        return kind, batch * (2 if guided else 1), [("uncached", variant.steps)], launch
    kind = "fp8" if variant.fp8 else "fused"
    passes = [("frame", 1), ("step", variant.steps)] if variant.cache else [("uncached", variant.steps)]
    return kind, batch, passes, "graph"


def student_label(variant: Variant) -> str:
    return "action-only shortcut student" if variant.future_frames == 0 else "shortcut student"


def student_config(config, steps, future_frames=None):
    return dataclasses.replace(config, mask="temporal", distillation="shortcut",
                               distilled_steps=tuple(sorted(set(int(s) for s in steps))), future_frames=future_frames)


def trace_rows(config, rows: List[Variant], batch: int, steps) -> Dict[str, dict]:
    """{row name: {"kind", "rows", "passes", "launch", "traces": {pass: Counter}}}, one model per kind."""
    # a model per (kind, rows, student, future frames): an action-only student is a model of its own
    plans = {v.name: chunk_passes(v, batch) + ((v.student, v.future_frames),) for v in rows}
    wanted = collections.defaultdict(set)
    for kind, n, passes, _, student in plans.values():
        wanted[(kind, n, student)].update(p for p, _ in passes)
    traces = {}
    for (kind, n, (student, frames)), names in wanted.items():
        model_config = student_config(config, steps, frames) if student else config
        traces[(kind, n, (student, frames))] = trace_passes(meta_model(model_config, kind), n, sorted(names))
    return {name: {"kind": kind, "rows": n, "passes": passes, "launch": launch, "traces": traces[(kind, n, student)]}
            for name, (kind, n, passes, launch, student) in plans.items()}


def chunk_ops(plan: dict) -> collections.Counter:
    """Counter[OpCost] of one chunk: each pass's kernels times its count."""
    total = collections.Counter()
    for pass_name, times in plan["passes"]:
        for op, n in plan["traces"][pass_name].items():
            total[op] += n * times
    return total


# ---- projecting ---------------------------------------------------------------------------------------
def wave_efficiency(op: OpCost, sms: int) -> float:
    """Busy fraction of the SMs over the waves of ``op``'s tiles, for the best tiling (module docstring)."""
    batch, m, n, k = op.shape
    if not op.flops or not batch:
        return 1.0
    best = 0.0
    for rows in ((TILE, TILE // 2) if n else (TILE,)):  # attention (n = 0): 128-query blocks only
        for split in SPLIT_K:
            if split > 1 and k // split < MIN_SPLIT_K:
                continue
            units = batch * math.ceil(m / rows) * max(1, math.ceil(n / TILE)) * split
            best = max(best, units / (math.ceil(units / sms) * sms))
    return best


def op_seconds(op: OpCost, device: DeviceCeiling) -> tuple:
    """(seconds, "compute" or "memory"): the roofline time of one kernel on ``device``."""
    memory = op.bytes / (device.bandwidth_gbs * 1e9 * device.bandwidth_fraction)
    if not op.flops:
        return memory, "memory"
    compute = op.flops / (device.rate(op.unit) * wave_efficiency(op, device.sms))
    return (compute, "compute") if compute >= memory else (memory, "memory")


def project_ops(ops: collections.Counter, device: DeviceCeiling, launch: str) -> dict:
    """Projected ms of a chunk's kernels on ``device``: compute-bound, memory-bound and launch parts,
    the time per op name and the dominating op (by GPU time)."""
    if launch not in ("eager", "graph"):
        raise ValueError(f"launch must be 'eager' or 'graph', got {launch!r}")
    bound = {"compute": 0.0, "memory": 0.0}
    by_op = collections.Counter()
    for op, n in ops.items():
        seconds, kind = op_seconds(op, device)
        bound[kind] += n * seconds
        by_op[op.name] += n * seconds
    kernels = sum(ops.values())
    launch_s = kernels * (EAGER_LAUNCH_US if launch == "eager" else GRAPH_NODE_US) * 1e-6
    total = bound["compute"] + bound["memory"] + launch_s
    dominant, dominant_s = by_op.most_common(1)[0] if by_op else ("-", 0.0)
    return {"ms": round(total * 1e3, 3), "compute_ms": round(bound["compute"] * 1e3, 3),
            "memory_ms": round(bound["memory"] * 1e3, 3), "launch_ms": round(launch_s * 1e3, 3),
            "kernels": kernels, "dominant_op": dominant,
            "dominant_share": round(dominant_s / total, 3) if total else 0.0,
            "by_op_ms": {name: round(s * 1e3, 4) for name, s in by_op.most_common()}}


def aggregate(ops: collections.Counter) -> Dict[str, dict]:
    """{op name: {"calls", "gflop", "mbytes"}}: a pass's or a chunk's kernels by op."""
    out = collections.defaultdict(lambda: {"calls": 0, "gflop": 0.0, "mbytes": 0.0})
    for op, n in ops.items():
        entry = out[op.name]
        entry["calls"] += n
        entry["gflop"] += n * op.flops / 1e9
        entry["mbytes"] += n * op.bytes / 1e6
    return {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()}
            for name, e in sorted(out.items(), key=lambda item: -item[1]["gflop"])}


def project(workload: str, devices: Sequence[str], batch: int = 1, steps=DEFAULT_STEPS,
            patterns: Optional[List[str]] = None) -> dict:
    """The projection of every bench row of ``workload`` (``--rows`` globs in ``patterns``) on each of
    ``devices`` (keys of DEVICE_CEILINGS): the JSON of ``--project``."""
    unknown = [d for d in devices if d not in DEVICE_CEILINGS]
    if unknown or not devices:
        raise ValueError(f"devices must be some of {sorted(DEVICE_CEILINGS)}, got {list(devices)}")
    config = configs.get(workload)
    rows = select(variants_for(workload, "bf16", steps), patterns)
    if not rows:
        raise ValueError(f"--rows {patterns} matches no row of {workload}")
    plans = trace_rows(config, rows, batch, steps)
    out_rows, pass_tables = [], {}
    for v in rows:
        plan = plans[v.name]
        ops = chunk_ops(plan)
        # traced: every GEMM and attention of the chunk; analytic: the block linears and attention of
        # wam_fast.cache.chunk_cost (embeddings, heads and AdaLN are < 1% of W1)
        flops = sum(op.flops * n for op, n in ops.items())
        analytic = chunk_flops(config, v, batch)["flops"]
        for pass_name, _ in plan["passes"]:
            pass_tables[f"{plan['kind']} {pass_name} rows={plan['rows']}"] = aggregate(plan["traces"][pass_name])
        out_rows.append({
            "name": v.name, "steps": v.steps, "fp8": v.fp8, "cache": v.cache,
            "model": f"{student_label(v) if v.student else 'teacher'}, {plan['kind']}",
            "tokens_per_step": (student_config(config, steps, v.future_frames) if v.student else config).noisy_tokens
                               if v.cache else None,
            "launch": "eager launches" if plan["launch"] == "eager" else "one CUDA graph per chunk",
            "rows": plan["rows"], "passes": [list(p) for p in plan["passes"]],
            "flops": flops, "tflop": round(flops / 1e12, 4),
            "analytic_flops": analytic, "analytic_tflop": round(analytic / 1e12, 4),
            "projected": {d: project_ops(ops, DEVICE_CEILINGS[d], plan["launch"]) for d in devices}})
    return {"label": LABEL, "projection": True, "workload": workload, "batch": batch, "dtype": "bf16",
            "devices": {d: dataclasses.asdict(DEVICE_CEILINGS[d]) for d in devices},
            "launch_us": {"eager": EAGER_LAUNCH_US, "graph_node": GRAPH_NODE_US},
            "rows": out_rows, "passes": pass_tables}


# ---- output -------------------------------------------------------------------------------------------
def _short(op: str) -> str:
    return op.split(".", 1)[-1]


def format_projection(result: dict) -> str:
    """A summary (row x device ms) and one table per device, every header saying PROJECTION."""
    devices = list(result["devices"])
    name_width = max(len(r["name"]) for r in result["rows"]) + 2
    lines = [f"{result['label']}: {result['workload']}, batch {result['batch']}, bf16 (FP8 rows: FP8 "
             f"backbone linears); ms per action chunk", "",
             f"{'PROJECTION ms/chunk':{name_width}s}" + "".join(f"{d:>10s}" for d in devices)]
    for r in result["rows"]:
        lines.append(f"{r['name']:{name_width}s}" + "".join(f"{r['projected'][d]['ms']:10.1f}" for d in devices))
    launch = result["launch_us"]
    for d in devices:
        c = result["devices"][d]
        lines += ["", f"PROJECTION on {d} ({c['label']}): bf16 {c['bf16_tflops']:g} TFLOP/s x {c['gemm_fraction']}, "
                      f"FP8 {c['fp8_tflops']:g} x {c['fp8_fraction']}, attention x {c['attention_fraction']}, "
                      f"{c['bandwidth_gbs']:g} GB/s x {c['bandwidth_fraction']}; launch {launch['eager']:g} us "
                      f"(eager), {launch['graph_node']:g} us per graph node",
                  f"{'row':{name_width}s}{'proj ms':>9s}{'compute':>9s}{'memory':>8s}{'launch':>8s}{'kernels':>9s}"
                  f"{'TFLOP':>8s}  dominant op (share of ms)"]
        for r in result["rows"]:
            p = r["projected"][d]
            share = lambda key: f"{100 * p[key] / p['ms']:.0f}%" if p["ms"] else "-"  # noqa: E731
            lines.append(f"{r['name']:{name_width}s}{p['ms']:9.1f}{share('compute_ms'):>9s}{share('memory_ms'):>8s}"
                         f"{share('launch_ms'):>8s}{p['kernels']:9d}{r['tflop']:8.2f}  "
                         f"{_short(p['dominant_op'])} {100 * p['dominant_share']:.0f}%")
    return "\n".join(lines)


def device_list(text: str) -> List[str]:
    """argparse type of ``--project``: comma-separated keys of DEVICE_CEILINGS."""
    names = [d.strip().lower() for d in text.split(",") if d.strip()]
    unknown = [d for d in names if d not in DEVICE_CEILINGS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected devices from {','.join(DEVICE_CEILINGS)}, got {text!r}")
    return names


def project_main(parser, args) -> dict:
    """``--project``: print the projection of the workload's rows (default W1) and write ``--json``."""
    if args.dtype not in (None, "bf16"):
        parser.error(f"--project projects the bf16 GPU rows; --dtype must be bf16, got {args.dtype}")
    workload = args.workload or "videovla-5b"
    try:
        result = project(workload, args.project, args.batch, args.steps, args.rows)
    except ValueError as exc:
        parser.error(str(exc))
    print(format_projection(result))
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return result


__all__ = ["ATTENTION_OPS", "CostRecorder", "EAGER_LAUNCH_US", "FlashSDPA", "GEMM_OPS", "GRAPH_NODE_US", "LABEL",
           "OpCost", "aggregate", "chunk_ops", "chunk_passes", "device_list", "format_projection", "meta_model",
           "op_cost", "op_seconds", "project", "project_main", "project_ops", "trace_passes", "trace_rows",
           "wave_efficiency"]
