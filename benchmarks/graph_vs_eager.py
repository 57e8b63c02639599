"""One action chunk from a captured graph vs the same policy eager: latency and agreement.

    python benchmarks/graph_vs_eager.py [--workload videovla-5b] [--steps 1 4] [--variants bf16 fp8]
                                        [--prefix 2] [--repeats 30] [--warmup 5] [--layers N] [--json PATH]

For each (variant, steps): a mask="temporal" shortcut student of the workload (random weights; latency
does not depend on them), ``wam_fast.compile``d twice from the same weights with the KV cache: once
with ``cuda_graphs=False`` (eager chunk: fused ops launched one by one) and once with the chunk graphs
(one replay per act). Both run the same episode from the same seed; the chunks must agree (fp32:
bit for bit on the CPU stand-in; on a GPU to 1e-3 relative, the graph replays the eager kernels) and
each act() is timed: CUDA events around the call (the device time of a chunk, host work included
since act() returns after its work is queued and the events bracket it), ``--warmup`` untimed acts
first, the median and p90 of ``--repeats``; the speedup is the ratio of the two medians of this run.
Then the graph side acts on the same frames again with ``--prefix`` committed actions (real-time chunking,
``WAMPolicy.act(prefix=...)``: its own graph per slot): the chunk time with a prefix against without, from
the same run, and the committed actions must come back exactly.
On the CPU (no CUDA graphs) the graph side runs through ``EagerCapture`` and the workload defaults to
"tiny": a smoke run of the code path, not a measurement. Prints the environment beside the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

import wam_fast
from wam_fast.compiler import CompileConfig, graphs
from wam_fast.utils.environment import environment, versions


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default=None, help="default: videovla-5b on a GPU, tiny on CPU")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    p.add_argument("--variants", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--history", type=int, default=2, help="past frames the policy keeps (ring slots - 1)")
    p.add_argument("--prefix", type=int, default=2, help="committed actions of the real-time chunking pass (0: none)")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the workload (memory / time)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def student(config, steps, device, dtype, seed=0):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = wam_fast.WAMTransformer(config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype).eval()


def timed_acts(policy, frames, device, warmup, prefixes=None):
    """act() on every frame (with ``prefixes[i]`` when given); returns (chunks, milliseconds per act after
    the warm-up)."""
    chunks, times = [], []
    for i, frame in enumerate(frames):
        options = {} if prefixes is None else {"prefix": prefixes[i]}
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            chunk = policy.act(frame, **options)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            chunk = policy.act(frame, **options)
            ms = (time.perf_counter() - t0) * 1e3
        chunks.append(chunk)
        if i >= warmup:
            times.append(ms)
    return chunks, times


def compare(config, variant, steps, args, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = dataclasses.replace(config, mask="temporal", distillation="shortcut", distilled_steps=(steps,),
                              history_frames=max(config.history_frames, args.history))
    g = torch.Generator("cpu").manual_seed(1)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(device, dtype)
    frames = [torch.randn(1, 1, cfg.latent_channels, cfg.latent_height, cfg.latent_width, generator=g).to(device, dtype)
              for _ in range(args.warmup + args.repeats)]
    results = {}
    for side in ("eager", "graph"):
        model = student(cfg, steps, device, dtype)
        policy = wam_fast.WAMPolicy(model, cache=True, history=args.history, seed=0)
        on_gpu = device.type == "cuda"
        wam_fast.compile(policy, CompileConfig(fp8=variant == "fp8", backend="eager",
                                               cuda_graphs=(side == "graph") if on_gpu else None))
        if side == "graph" and not on_gpu:
            graphs.attach(policy, graphs.EagerCapture)
        policy.reset(text)
        with torch.inference_mode():
            chunks, times = timed_acts(policy, frames, device, args.warmup)
        results[side] = (chunks, times, policy)
        del model
        if on_gpu:
            torch.cuda.empty_cache()
    (e_chunks, e_times, _), (g_chunks, g_times, g_policy) = results["eager"], results["graph"]
    worst = max(((a.actions - b.actions).norm() / a.actions.norm().clamp_min(1e-30)).item()
                for a, b in zip(e_chunks, g_chunks))
    runner = g_policy.graphs
    captures, replays = (runner.captures, runner.replays) if runner else (0, 0)
    prefix_row = prefix_pass(g_policy, g_chunks, frames, device, args) if args.prefix else {}
    row = {"variant": variant, "steps": steps, "eager_median_ms": statistics.median(e_times),
           "graph_median_ms": statistics.median(g_times),
           "eager_p90_ms": sorted(e_times)[int(0.9 * (len(e_times) - 1))],
           "graph_p90_ms": sorted(g_times)[int(0.9 * (len(g_times) - 1))],
           "speedup": statistics.median(e_times) / statistics.median(g_times),
           "actions_rel_err_max": worst, "captures": captures, "replays": replays,
           "eager_times_ms": e_times, "graph_times_ms": g_times, **prefix_row}
    if prefix_row:  # what a committed prefix costs the graph-replayed chunk, from this run
        row["prefix_cost"] = prefix_row["graph_prefix_median_ms"] / row["graph_median_ms"]
    return row


def prefix_pass(policy, chunks, frames, device, args) -> dict:
    """The graph side again on the same frames, each with ``--prefix`` committed actions taken from the chunk
    it made of that frame before (the actions a robot would still be running): time and exactness."""
    d = args.prefix
    if not 0 < d < policy.config.action_len:
        raise SystemExit(f"--prefix {d} must be in [1, action_len - 1 = {policy.config.action_len - 1}]")
    prefixes = [chunk.actions[:, d:2 * d].to(policy.dtype) if 2 * d <= policy.config.action_len
                else chunk.actions[:, :d].to(policy.dtype) for chunk in chunks]
    with torch.inference_mode():
        guided, times = timed_acts(policy, frames, device, args.warmup, prefixes)
    exact = all(torch.equal(c.actions[:, :d], p.float()) for c, p in zip(guided, prefixes))
    return {"prefix": d, "graph_prefix_median_ms": statistics.median(times), "prefix_committed_exact": exact,
            "graph_prefix_times_ms": times}


def describe(row) -> str:
    text = (f"eager {row['eager_median_ms']:.3f} ms (p90 {row['eager_p90_ms']:.3f}), graph {row['graph_median_ms']:.3f} "
            f"ms (p90 {row['graph_p90_ms']:.3f}), speedup {row['speedup']:.2f}x, actions rel err max "
            f"{row['actions_rel_err_max']:.2e}, {row['captures']} captures / {row['replays']} replays")
    if "prefix" in row:
        text += (f"; with {row['prefix']} committed actions {row['graph_prefix_median_ms']:.3f} ms "
                 f"({row['prefix_cost']:.3f}x), committed exact {row['prefix_committed_exact']}")
    return text


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workload = args.workload or ("videovla-5b" if device.type == "cuda" else "tiny")
    config = wam_fast.configs.get(workload)
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    env = environment(str(device))
    print(f"graph_vs_eager: {workload} ({config.num_layers} layers), history {args.history}, on {env['device']}; "
          f"versions {versions(env)}; warm-up {args.warmup}, repeats {args.repeats}")
    rows = []
    for variant in args.variants:
        for steps in args.steps:
            row = compare(config, variant, steps, args, device)
            rows.append(row)
            print(f"  {variant:5s} {steps} step(s): {describe(row)}", flush=True)
    result = {"workload": workload, "layers": config.num_layers, "device": env["device"], "environment": env,
              "versions": versions(env), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
