"""``python -m wam_fast.bench``: argument parsing, the run (teacher, students, rows in order, the
tables, the JSON after every row) and ``--from-json`` re-drawing of a recorded run."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import List, Optional

import torch

from wam_fast import configs
from wam_fast.utils.cli import OneLineParser, non_negative_int, output_file, positive_int, torch_device
from wam_fast.utils.environment import environment, versions
from wam_fast.bench.accounting import accounting, vae_encoder_cost, weight_accounting
from wam_fast.bench.ceilings import FLOOR_NOTE, design_ceilings, measure_ceilings
from wam_fast.bench.measure import add_speedups, measure, release_memory
from wam_fast.bench.models import build_model, count_parameters, make_inputs, shortcut_student
from wam_fast.bench.report import format_accounting, format_environment, format_table, write_chart, write_json
from wam_fast.bench.rows import CPU_PARAM_LIMIT, DEFAULT_STEPS, DTYPES, select, variants
from wam_fast.bench.telemetry import gpu_telemetry
from wam_fast.bench import kernels as kernel_counts
from wam_fast.bench import projection
from wam_fast.bench.pipeline_row import measure_pixels_row


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected step counts like 4,2,1, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"step counts must be ints >= 1, got {text!r}")
    return values


def parse_args(argv=None):
    parser = OneLineParser(
        prog="python -m wam_fast.bench",
        description="Latency per action chunk: the eager baselines (released: DPM++ 50 steps + dynamic CFG; "
                    "paper: DDIM 10 steps + CFG) vs wam_fast (shortcut student, 4/2/1 steps, bf16/FP8, KV cache "
                    "on/off, compiled). Random weights: latency does not depend on weight values.")
    parser.add_argument("--workload", choices=configs.names(),
                        help="default: videovla-5b (W1) on a GPU, tiny on CPU; videovla-5b-sim is W2")
    parser.add_argument("--device", type=torch_device, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--rows", type=lambda s: [p for p in s.split(",") if p],
                        help="comma-separated row names or globs, e.g. 'paper-baseline,wam_fast-*-cache' "
                             "(default: all; ratios need their baseline in the run)")
    parser.add_argument("--steps", type=_int_list, default=list(DEFAULT_STEPS),
                        help="student step counts, e.g. 4,2,1 (default)")
    parser.add_argument("--backend", choices=("inductor", "eager"),
                        help="wam_fast.compile backend (default: inductor on a GPU, eager on CPU, where a "
                             "first torch.compile costs ~25 s per shape)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=30, help="timed chunks per row after warm-up (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", type=output_file, help="write the results as JSON")
    parser.add_argument("--chart", metavar="PATH", type=output_file,
                        help="draw the table as a PNG (default: the --json path with .png; off without --json)")
    parser.add_argument("--no-chart", action="store_true", help="draw no chart")
    parser.add_argument("--ceiling", choices=("measured", "design"), default="measured",
                        help="GPU only: the matmul rates of the compute floor, measured here (default) or "
                             "docs/design.md's figures for this GPU")
    parser.add_argument("--from-json", metavar="PATH",
                        help="print the table of a recorded --json file and draw its chart; measure nothing")
    parser.add_argument("--kernels", action="store_true",
                        help="print kernels per layer per pass (eager / fused / FP8; uncached, text, frame, cached "
                             "step) for the workload's mask='temporal' twin with 2 layers, and measure nothing else")
    parser.add_argument("--project", metavar="DEVICES", type=projection.device_list,
                        help="print the roofline PROJECTION (not a measurement) of each row's latency per chunk on "
                             "these GPUs, e.g. h100,h200,rtx4090,l40s, from ops traced on the meta device (default "
                             "workload videovla-5b; any machine); --json writes it; measure nothing")
    parser.add_argument("--no-pixels", action="store_true",
                        help="skip the pixels -> actions rows (VAE encode + cached student + readout; needs "
                             "diffusers and transformers)")
    parser.add_argument("--allow-cpu-large", action="store_true",
                        help="run a multi-billion-parameter workload on CPU anyway")
    args = parser.parse_args(argv)  # the int ranges and output paths are checked by their types
    return parser, args


def chart_path(args) -> Optional[str]:
    if args.no_chart:
        return None
    if args.chart:
        return args.chart
    source = args.json or args.from_json
    return os.path.splitext(source)[0] + ".png" if source else None


def emit_chart(result: dict, path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    problem = write_chart(result, path)
    print(f"\n{problem}" if problem else f"\nwrote {path}")
    return problem


def replot(args) -> dict:
    """--from-json: the table and chart of a recorded run."""
    with open(args.from_json, encoding="utf-8") as f:
        result = json.load(f)
    print(format_table(result["workload"], result["rows"]))
    emit_chart(result, chart_path(args))
    return result


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    if args.from_json:
        if args.json:
            parser.error("--from-json re-draws a recorded run; it does not take --json")
        return replot(args)
    if args.project:
        return projection.project_main(parser, args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (torch {torch.__version__})")
    args.workload = args.workload or ("videovla-5b" if on_gpu else "tiny")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.backend = args.backend or ("inductor" if on_gpu else "eager")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = configs.get(args.workload)
    if args.kernels:
        return kernels_main(args, cfg, device)
    every = variants(args)
    chosen = select(every, args.rows)
    if not chosen:
        parser.error(f"--rows {','.join(args.rows)} matches no row; rows: {', '.join(v.name for v in every)}")

    if not on_gpu and not args.allow_cpu_large:
        params = count_parameters(cfg)
        if params > CPU_PARAM_LIMIT:
            parser.exit(2, f"wam_fast.bench: refusing to run {args.workload} on CPU: {params / 1e9:.2f} B "
                           f"parameters are {params * 4 / 1e9:.0f} GB in fp32 and a sample-forward takes "
                           f"minutes. Run it on a GPU, use --workload tiny, or pass --allow-cpu-large.\n")

    env = environment(str(device))
    options = {k: getattr(args, k) for k in ("workload", "dtype", "batch", "warmup", "repeats", "seed", "backend",
                                             "steps", "rows", "ceiling")}
    print("wam_fast bench: latency per action chunk")
    print(format_environment(env, options), flush=True)
    ceilings = None
    if on_gpu:
        published = design_ceilings(env["device"]) if args.ceiling == "design" else None
        ceilings = ({**published, "bf16_source": "docs/design.md ceiling", "fp8_source": "docs/design.md ceiling"}
                    if published else measure_ceilings(device))
        print(f"floor     bf16 {ceilings['bf16_tflops']:.0f} TFLOP/s ({ceilings['bf16_source']}), FP8 "
              + (f"{ceilings['fp8_tflops']:.0f} TFLOP/s" if ceilings.get("fp8_tflops") else "-")
              + f" ({ceilings['fp8_source']})", flush=True)

    result = {"device": env["device"], "workload": args.workload, "versions": versions(env), "environment": env,
              "options": options, "complete": False, "rows": [],
              "floor": None if ceilings is None else {
                  **ceilings, "flops": "block linears + attention per chunk (wam_fast.cache.chunk_cost); FP8 rows: "
                                       "linears at the FP8 rate, attention at bf16", "note": FLOOR_NOTE}}
    rows = result["rows"]

    def record(row: dict) -> None:
        rows.append(row)
        print(f"  {row['name']}: {row['latency_ms']:.2f} ms", flush=True)
        add_speedups(rows)
        if args.json:  # after every row: a run cut short (a time limit) keeps what it measured
            write_json(args.json, result)

    torch.manual_seed(args.seed)
    teacher = build_model(cfg, device, DTYPES[args.dtype])
    inputs = make_inputs(cfg, args.batch, device, DTYPES[args.dtype], args.seed)
    teacher_rows = [v for v in chosen if not v.student]
    for v in teacher_rows:
        record(measure(v, teacher, inputs, cfg, args, device, ceilings))
        # the compiled teacher's twin, graphs and torch.compile caches are not used again
        release_memory(device, drop_compiled=v.compiled)
    groups = [[v for v in chosen if v.student and v.fp8 == fp8] for fp8 in (False, True)]
    groups = [g for g in groups if g]
    for i, group in enumerate(groups):
        # one student per precision, holding the teacher's tensors (no copy); wam_fast.compile of the
        # group's first policy compiles it, the others reuse it. Before the last group the teacher is
        # dropped, so FP8 quantization (in place) frees the bf16 linears it replaces.
        # (an action-only student is another model: its own config, the same tensors)
        students = {frames: shortcut_student(teacher, args.steps, args.seed, future_frames=frames)
                    for frames in dict.fromkeys(v.future_frames for v in group)}
        student = students.get(None)
        if i == len(groups) - 1:
            del teacher
        for v in group:
            record(measure(v, students[v.future_frames], inputs, cfg, args, device, ceilings))
            release_memory(device)  # the row's policy (graphs, cache) is gone; keep peaks per row honest
        if not group[0].fp8 and student is not None:
            for steps in pixel_steps(args, chosen):  # next to the latent-only cached rows, same student
                row = measure_pixels_row(student, cfg, steps, args, device, full=on_gpu or args.allow_cpu_large)
                print(f"  ({row['pipeline']['parts']}, frame {row['pipeline']['image_shape']}; text encoder "
                      f"{row['pipeline']['text_encoder_ms']:.2f} ms once per instruction, not in the row)")
                record(row)
                release_memory(device)
        del student, students
        release_memory(device, drop_compiled=True)  # this precision's compiled student is not used again

    print()
    print(format_table(args.workload, rows))
    if not on_gpu:
        print("(CPU: perf_counter medians; peak mem is the process's max RSS so far, not per row)")
    paper = next((v for v in every if v.name == "paper-baseline"))
    # the paper baseline's setting (guided: cond + uncond rows) and each student step count (guidance
    # baked in: one row per observation)
    settings = [(paper.steps, 2 * args.batch)] + [(s, args.batch) for s in args.steps]
    costs = [entry for steps, n_rows in settings for entry in accounting(steps, n_rows)]
    print(f"\nper action chunk (batch {args.batch}, no history): the paper baseline's teacher, {paper.steps} steps x "
          f"{2 * args.batch} rows (cond + uncond), and the students' {', '.join(map(str, args.steps))} steps x "
          f"{args.batch} row; block linears + attention (arithmetic from the configs):")
    print(format_accounting(costs))
    weights = weight_accounting()
    print(f"\nW1 weights (meta-device arithmetic): bf16 {weights['bf16'] / 1e9:.2f} GB, FP8 backbone linears "
          f"(quantize_fp8 default) {weights['fp8'] / 1e9:.2f} GB, FP8 with the AdaLN projections too "
          f"{weights['fp8_with_adaln'] / 1e9:.2f} GB")
    vae = vae_encoder_cost()
    print("W1 VAE encode of one frame (pixels -> actions rows): " + (
        f"{vae['tflop']:.3f} TFLOP for a {vae['image_shape'][0]}x{vae['image_shape'][1]} frame, "
        f"{vae['params'] / 1e6:.1f} M encoder parameters (meta-device count)" if "tflop" in vae else vae["skipped"]))
    result.update(accounting=costs, weights_w1=weights, vae_encoder_w1=vae, gpu_telemetry=gpu_telemetry(device),
                  complete=True)
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    emit_chart(result, chart_path(args))
    return result


def pixel_steps(args, chosen) -> List[int]:
    """Step counts of the pixels -> actions rows: those of the chosen bf16/fp32 cached student rows."""
    if args.no_pixels:
        return []
    latent = {v.steps for v in chosen if v.student and v.cache and not v.fp8}
    return [s for s in args.steps if s in latent]


def kernels_main(args, cfg, device) -> dict:
    """``--kernels``: the counts of ``wam_fast.bench.kernels`` (per layer: independent of the depth, so
    2 layers; a mask="temporal" twin with at least one history frame, so every pass exists)."""
    counted = dataclasses.replace(cfg, num_layers=2, mask="temporal", history_frames=max(cfg.history_frames, 1))
    env = environment(str(device))
    print(f"wam_fast bench --kernels: {args.workload} (mask='temporal', {counted.history_frames} history frames, "
          f"2 layers), {args.dtype} on {env['device']}")
    counts = kernel_counts.count_all(counted, DTYPES[args.dtype], device)
    # the action-only student (future_frames=0): its passes that differ, the step over the actions alone
    for count in kernel_counts.count_all(dataclasses.replace(counted, future_frames=0), DTYPES[args.dtype], device):
        if count.pass_name in ("uncached", "step"):
            counts.append(dataclasses.replace(count, pass_name=f"{count.pass_name}-action-only"))
    print(kernel_counts.format_counts(counts))
    result = {"device": env["device"], "workload": args.workload, "versions": versions(env), "environment": env,
              "kernels": [c.row() for c in counts]}
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return result
