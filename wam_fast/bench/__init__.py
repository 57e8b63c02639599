"""``python -m wam_fast.bench``: latency per action chunk, eager baselines vs wam_fast, on this machine.

Default workload: "videovla-5b" (W1) in bf16 on a GPU, "tiny" in fp32 on CPU (``--workload`` for
W2). Weights and inputs are random: latency does not depend on weight values, and a 5B checkpoint is
not needed to measure it. Batch 1, no history frames.

Rows (``--rows`` picks some by name or glob), in the order they run:

- ``released-baseline``: the eager teacher as VideoVLA's code samples it: stochastic DPM++(2M),
  50 steps, dynamic classifier-free guidance (scale 6) with cond + uncond batched (2 rows, 100
  sample-forwards per chunk), through ``wam_fast.sample``.
- ``paper-baseline``: the eager teacher as the VideoVLA paper deploys it: DDIM, 10 steps, CFG 6
  (2 rows, 20 sample-forwards).
- ``paper-baseline-compiled``: the same teacher, sampler, steps and guidance (mask="full", so no KV
  cache; no FP8), but through ``wam_fast.compile`` (fused ops, torch.compile with its CUDA graphs on a
  GPU) and ``WAMPolicy(cache=False).act``, on a twin holding the teacher's tensors. Its speedup over
  paper-baseline is the systems gain alone; a bf16 student row's speedup over it ("vs paper compiled")
  is the algorithmic gain (fewer steps, guidance baked in, the KV cache) on the same compiler, and an
  FP8 row's adds its FP8 linears.
- ``wam_fast-{S}step-{dtype|fp8}-{cache|nocache}`` for S in ``--steps`` (default 4, 2, 1): a shortcut
  student of the same backbone (mask="temporal", distillation="shortcut", guidance baked in so one
  row per sample-forward; its parameters are the teacher's tensors plus a step-size embedding),
  compiled by ``wam_fast.compile`` (fused ops, FP8 linears or not, the KV cache or not, CUDA graphs
  on a GPU) and run through ``WAMPolicy.act`` (one control step: the frame's pass with the cache,
  then S denoising sample-forwards). FP8 rows run last: quantization swaps the linears in place.

Not yet a row: pixels -> actions (the video autoencoder's encode before the policy), which waits for
[pipeline-serve]; every row here starts from latents.

Each row times ``--repeats`` chunks (default 30) after ``--warmup`` (default 2; the first call, which
compiles and captures, is timed on its own as first_call_ms) and reports the median and p90 (GPU: CUDA
events around each chunk), the peak memory over the timed chunks, its speedup over each baseline
measured in this same run, the GPU's clocks, temperature and power read (NVML) right after its timed
chunks (``gpu_telemetry``; on CPU the reason it is skipped), the backend each fused op actually ran
(``op_backends``), and on a GPU the % of the compute floor: the chunk's block FLOPs
(``wam_fast.cache.chunk_cost``, the accounting table) at the machine's matmul rate (measured: a bf16
and an FP8 8192^3 GEMM, the latter with the fast accumulation the FP8 linears use; or the ceiling in
docs/design.md (Workloads) when that measurement is not possible; the JSON says which), over the
measured latency. Those are square-GEMM peaks, which a chunk's skinny GEMMs and its attention do not
reach: the % compares rows and runs, it is not a distance to a reachable target. Between rows the
process collects garbage before emptying the CUDA cache (and drops torch.compile's caches after the
last row of a compiled model), so each row's peak is its own.

A second table gives the arithmetic per action chunk (tokens through the blocks, block FLOPs and
KV-cache memory) for W1 and W2 with and without the cache, from the configs, at the paper baseline's
10 steps x 2 rows and at each student step count x 1 row.

``--json PATH`` writes ``{"device", "workload", "versions", "environment", "rows": [{"name", "steps",
"fp8", "cache", "latency_ms", "p90_ms", "peak_mem_bytes", "times_ms", "gpu_telemetry", "op_backends",
...}], "accounting", ...}``; ``--chart PATH``
(default: the JSON path with .png, when --json is given) draws the table with matplotlib (optional:
``pip install matplotlib``). ``--from-json PATH`` re-prints the table and draws the chart of a
recorded run without measuring (e.g. a GPU run's JSON, charted on a laptop).

``--project h100,h200,rtx4090,l40s`` measures nothing: it prints (and ``--json`` writes) a roofline
PROJECTION of every row's latency on those GPUs from the ops each row runs, traced on the meta device
(``projection``; docs/design.md, Projection).

The package: ``rows`` (which rows a run has), ``models`` (what a row builds), ``timing``, ``ceilings``
(the compute floor; the projection's ceiling table), ``accounting`` (the arithmetic per chunk),
``telemetry`` (NVML), ``measure`` (one row, memory released between rows), ``report`` (tables, JSON,
chart), ``kernels`` (launches per layer), ``projection`` and ``cli`` (``main``); their public names are here.
"""

from wam_fast.bench.rows import (BASELINES, CPU_PARAM_LIMIT, DEFAULT_STEPS, DTYPES, Variant, select,
                                 student_row_name, variants, variants_for)
from wam_fast.bench.models import (build_model, compiled_policy, count_parameters, default_dtype, make_inputs,
                                   quantize_fp8_in_place, shortcut_student, temporal_twin, weight_twin)
from wam_fast.bench.timing import peak_rss_bytes, percentile, time_calls
from wam_fast.bench.ceilings import (DEVICE_CEILINGS, FLOOR_NOTE, PUBLISHED_CEILINGS, DeviceCeiling, design_ceilings,
                                     floor_ms, measure_ceilings, measure_ceilings_cached)
from wam_fast.bench.accounting import ACCOUNTING_WORKLOADS, accounting, chunk_flops, weight_accounting
from wam_fast.bench.telemetry import gpu_telemetry
from wam_fast.bench.measure import add_speedups, chunk_runner, measure, release_memory
from wam_fast.bench.report import (CHART_HINT, format_accounting, format_bytes, format_environment, format_ms,
                                   format_table, write_chart, write_json)
from wam_fast.bench.projection import format_projection, project
from wam_fast.bench.cli import chart_path, emit_chart, main, parse_args, replot

__all__ = [
    "ACCOUNTING_WORKLOADS", "BASELINES", "CHART_HINT", "CPU_PARAM_LIMIT", "DEFAULT_STEPS", "DEVICE_CEILINGS",
    "DTYPES", "DeviceCeiling", "FLOOR_NOTE", "PUBLISHED_CEILINGS", "Variant", "accounting", "add_speedups",
    "build_model", "chart_path", "chunk_flops", "chunk_runner", "compiled_policy", "count_parameters", "default_dtype",
    "design_ceilings", "emit_chart", "floor_ms", "format_accounting", "format_bytes", "format_environment",
    "format_ms", "format_projection", "format_table", "gpu_telemetry", "main", "make_inputs", "measure",
    "measure_ceilings", "measure_ceilings_cached", "peak_rss_bytes", "parse_args", "percentile", "project",
    "quantize_fp8_in_place", "release_memory", "replot", "select", "shortcut_student", "student_row_name",
    "temporal_twin", "time_calls", "variants", "variants_for", "weight_accounting", "weight_twin", "write_chart",
    "write_json",
]
