"""``python -m wam_fast.bench``: latency per action chunk on the default workload of this machine.

Default: "videovla-5b" (W1) in bf16 on a GPU, "tiny" in fp32 on CPU; DDIM, 10 steps, CFG scale 6
with cond and uncond batched (20 sample-forwards), batch 1. Weights and inputs are random: latency
does not depend on weight values, and a 5B checkpoint is not needed to measure it.

Each row is one way of running the model ("paper-baseline": the eager reference, as deployed in
the VideoVLA paper; "temporal-uncached" / "temporal-kv-cache": the mask="temporal" twin of the same
weights driven by ``WAMPolicy`` without and with the KV cache, one control step per chunk, with the
speedup of the second over the first). Later work adds rows to ``variants()`` (compiled, FP8, few steps).
A second table gives the arithmetic per action chunk (tokens through the blocks, block FLOPs and
KV-cache memory) for W1 and W2 with and without the cache, from the configs.
``--json PATH`` writes ``{"device", "workload", "versions", "environment", "rows": [...],
"accounting": [...]}``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

import wam_fast
from wam_fast import configs
from wam_fast.env import environment, versions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Above this many parameters a CPU run needs --allow-cpu-large (W1: 5.57 B = 22 GB in fp32).
CPU_PARAM_LIMIT = 1_000_000_000


@dataclass
class Variant:
    """One row: how to turn the eager model into the thing we time, and how to call it."""

    name: str
    prepare: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model
    steps: Optional[int] = None  # None: --steps
    fp8: bool = False
    cache: bool = False
    sample_kwargs: dict = field(default_factory=dict)
    policy: bool = False  # time WAMPolicy.act on the model's mask="temporal" twin (cache: with the KV cache)
    baseline: Optional[str] = None  # report latency(baseline) / latency(this row) as its speedup


def variants(args) -> List[Variant]:
    """The rows to measure, in order (each later issue appends its own)."""
    return [Variant("paper-baseline"),
            Variant("temporal-uncached", policy=True),
            Variant("temporal-kv-cache", policy=True, cache=True, baseline="temporal-uncached"),
            # last: quantize_fp8 swaps the model's linears in place
            Variant("fp8", prepare=quantize_fp8_in_place, fp8=True, baseline="paper-baseline")]


def quantize_fp8_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """FP8 e4m3 backbone linears (default FP8Config: dynamic per-token activations)."""
    from wam_fast.quant import quantize_fp8

    return quantize_fp8(model)


def temporal_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The mask="temporal" model with the same parameter tensors (no copy)."""
    config = dataclasses.replace(model.config, mask="temporal")
    with torch.device("meta"):
        twin = wam_fast.WAMTransformer(config)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    # Scoped: parameters are created directly in `dtype`, and the global default is restored.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def count_parameters(cfg) -> int:
    """Parameter count from a meta-device build: no memory, no initialisation."""
    with torch.device("meta"):
        return sum(p.numel() for p in wam_fast.WAMTransformer(cfg).parameters())


def build_model(cfg, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # Built on the target device in the target dtype: W1 in fp32 would be 22 GB before any cast.
    with torch.device(device), default_dtype(dtype):
        model = wam_fast.WAMTransformer(cfg)
    return model.eval().requires_grad_(False)


def make_inputs(cfg, batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    generator = torch.Generator("cpu").manual_seed(seed)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=generator)
    image = torch.randn(batch, 1, cfg.latent_channels, cfg.latent_height, cfg.latent_width,
                        generator=generator)
    return {"text": text.to(device, dtype), "image": image.to(device, dtype)}


def percentile(values: List[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int):
    """Milliseconds of each of `repeats` calls after `warmup` calls, and the peak memory in bytes.

    GPU: CUDA events around each call, peak = torch.cuda.max_memory_allocated (weights included).
    CPU: perf_counter, peak = the process's maximum resident set size.
    """
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times, torch.cuda.max_memory_allocated(device)
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times, peak_rss_bytes()


def measure(variant: Variant, model, inputs: dict, cfg, args, device) -> dict:
    timed = variant.prepare(model)
    steps = variant.steps or args.steps
    kwargs = dict(sampler=args.sampler, steps=steps, cfg_scale=args.cfg_scale, seed=args.seed)
    kwargs.update(variant.sample_kwargs)
    nfe = []
    tokens = cfg.num_tokens

    if variant.policy:
        twin = temporal_twin(timed)
        policy = wam_fast.WAMPolicy(twin, cache=variant.cache, history=0, **kwargs)
        policy.reset(inputs["text"])  # the text pass runs once per instruction, outside the timing
        tokens = twin.config.noisy_tokens if variant.cache else twin.config.num_tokens

        def run_chunk():
            nfe.append(policy.act(inputs["image"]).nfe)
    else:
        def run_chunk():
            chunk = wam_fast.sample(timed, **inputs, **kwargs)
            nfe.append(chunk.nfe)

    with torch.inference_mode():
        times, peak = time_calls(run_chunk, device, args.warmup, args.repeats)
    from wam_fast.quant import tensor_bytes

    return {
        "name": variant.name,
        "steps": steps,
        "fp8": variant.fp8,
        "cache": variant.cache,
        "latency_ms": round(percentile(times, 50), 3),
        "p90_ms": round(percentile(times, 90), 3),
        "peak_mem_bytes": int(peak),
        "weight_bytes": tensor_bytes(timed),  # measured: the model's parameters and buffers
        # context for the table; not needed to compare rows
        "sampler": kwargs["sampler"],
        "cfg_scale": kwargs["cfg_scale"],
        "nfe": nfe[-1],
        "tokens": tokens,  # per sample-forward (noisy tokens only with the cache)
        "batch": args.batch,
        "dtype": args.dtype,
        "repeats": args.repeats,
    }


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def add_speedups(rows: List[dict], variants_run: List[Variant]) -> None:
    """speedup = baseline median / this row's median, both measured in this run."""
    by_name = {r["name"]: r for r in rows}
    for row, variant in zip(rows, variants_run):
        if variant.baseline in by_name:
            row["speedup"] = round(by_name[variant.baseline]["latency_ms"] / row["latency_ms"], 3)
            row["speedup_vs"] = variant.baseline


def format_table(workload: str, rows: List[dict]) -> str:
    head = ("name", "workload", "sampler", "steps", "nfe", "tokens", "median ms", "p90 ms", "peak mem", "speedup")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x vs {r['speedup_vs']}" if "speedup" in r else "-"
        cells = (r["name"], workload, r["sampler"], r["steps"], r["nfe"], r["tokens"],
                 f"{r['latency_ms']:.1f}", f"{r['p90_ms']:.1f}", format_bytes(r["peak_mem_bytes"]), speedup)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


ACCOUNTING_WORKLOADS = ("videovla-5b", "videovla-5b-sim")


def accounting(steps: int, rows: int) -> List[dict]:
    """Tokens and FLOPs per action chunk for W1 and W2: the full-mask model (VideoVLA), its temporal
    twin uncached and cached (no history), and the cache's bf16 memory."""
    from wam_fast.cache import cache_bytes, chunk_cost

    out = []
    for name in ACCOUNTING_WORKLOADS:
        full = configs.get(name)
        temporal = dataclasses.replace(full, mask="temporal")
        for label, cfg, cache in (("full (VideoVLA)", full, False), ("temporal", temporal, False),
                                  ("temporal + KV cache", temporal, True)):
            cost = chunk_cost(cfg, steps, rows, cache=cache)
            out.append({"workload": name, "model": label, "cache": cache, "steps": steps, "rows": rows,
                        "tokens": cost["tokens"], "tflop": round(cost["flops"] / 1e12, 3),
                        "text_tokens": cost["text_tokens"], "text_tflop": round(cost["text_flops"] / 1e12, 3),
                        "cache_bytes_bf16": cache_bytes(cfg, rows) if cache else 0})
    return out


def weight_accounting(workload: str = "videovla-5b") -> dict:
    """Weight bytes of a workload in bf16 and with FP8 linears, from meta-device builds."""
    from wam_fast.quant import weight_bytes

    cfg = configs.get(workload)
    default = weight_bytes(cfg)
    with_adaln = weight_bytes(cfg, filter_fn=lambda module, name: name.startswith("blocks."))
    return {"workload": workload, "bf16": default["bf16"], "fp8": default["fp8"], "fp8_with_adaln": with_adaln["fp8"]}


def format_accounting(entries: List[dict]) -> str:
    head = ("workload", "model", "tokens / chunk", "TFLOP / chunk", "vs uncached", "text once per instruction",
            "KV cache (bf16)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    uncached = {}
    for e in entries:
        if e["model"] == "temporal":
            uncached[e["workload"]] = e["tflop"]
        ratio = f"{uncached[e['workload']] / e['tflop']:.2f}x fewer FLOPs" if e["cache"] else "-"
        text = f"{e['text_tokens']} tokens, {e['text_tflop']:.2f} TFLOP" if e["cache"] else "-"
        memory = format_bytes(e["cache_bytes_bf16"]) if e["cache"] else "-"
        cells = (e["workload"], e["model"], e["tokens"], f"{e['tflop']:.2f}", ratio, text, memory)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def format_environment(env: dict, args) -> str:
    device = env["device"] + (f" (sm {env['capability']}, driver {env['driver']})" if env["capability"] else "")
    clocks = (f", SM clock {env['sm_clock_mhz']}/{env['sm_clock_max_mhz']} MHz"
              if env.get("sm_clock_mhz") is not None else "")
    return "\n".join([
        f"device    {device}{clocks}",
        f"versions  python {env['python']}, torch {env['torch']}, triton {env['triton'] or '-'}, "
        f"cuda {env['cuda'] or '-'}, wam_fast {env['wam_fast']}, commit {env['commit'] or 'unknown'}",
        f"run       workload {args.workload}, {args.dtype}, batch {args.batch}, "
        f"{env['torch_threads']} torch threads / {env['cpu_count']} cpus, warmup {args.warmup}, "
        f"repeats {args.repeats}, seed {args.seed}, random weights and inputs",
    ])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m wam_fast.bench",
        description="Latency per action chunk of the eager reference model (random weights: latency "
                    "does not depend on weight values).")
    parser.add_argument("--workload", choices=configs.names(),
                        help="default: videovla-5b on a GPU, tiny on CPU")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cfg-scale", type=float, default=6.0,
                        help="6: cond + uncond batched in each forward (2 sample-forwards per step)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--allow-cpu-large", action="store_true",
                        help="run a multi-billion-parameter workload on CPU anyway")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return parser, args


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (torch {torch.__version__})")
    args.workload = args.workload or ("videovla-5b" if on_gpu else "tiny")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = configs.get(args.workload)

    if not on_gpu and not args.allow_cpu_large:
        params = count_parameters(cfg)
        if params > CPU_PARAM_LIMIT:
            parser.exit(2, f"wam_fast.bench: refusing to run {args.workload} on CPU: {params / 1e9:.2f} B "
                           f"parameters are {params * 4 / 1e9:.0f} GB in fp32 and a sample-forward takes "
                           f"minutes. Run it on a GPU, use --workload tiny, or pass --allow-cpu-large.\n")

    env = environment(str(device))
    print("wam_fast bench: latency per action chunk")
    print(format_environment(env, args), flush=True)

    torch.manual_seed(args.seed)
    model = build_model(cfg, device, DTYPES[args.dtype])
    inputs = make_inputs(cfg, args.batch, device, DTYPES[args.dtype], args.seed)
    variants_run = variants(args)
    rows = [measure(v, model, inputs, cfg, args, device) for v in variants_run]
    add_speedups(rows, variants_run)

    print()
    print(format_table(args.workload, rows))
    guided_rows = 2 if args.cfg_scale != 1.0 else 1
    costs = accounting(args.steps, guided_rows * args.batch)
    print(f"\nper action chunk, {args.steps} steps x {guided_rows * args.batch} rows (batch {args.batch}"
          f"{', cond + uncond' if guided_rows == 2 else ''}), no history; block linears + attention "
          f"(arithmetic from the configs):")
    print(format_accounting(costs))
    weights = weight_accounting()
    print(f"\nW1 weights (meta-device arithmetic): bf16 {weights['bf16'] / 1e9:.2f} GB, FP8 backbone linears "
          f"(quantize_fp8 default) {weights['fp8'] / 1e9:.2f} GB, FP8 with the AdaLN projections too "
          f"{weights['fp8_with_adaln'] / 1e9:.2f} GB; measured for {args.workload}: "
          + ", ".join(f"{r['name']} {format_bytes(r['weight_bytes'])}" for r in rows))
    result = {"device": env["device"], "workload": args.workload, "versions": versions(env),
              "environment": env, "rows": rows, "accounting": costs, "weights_w1": weights}
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
