#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool's `run`: one H200, at most 10 minutes a command, at
# most 8 files back from $OUT, no network). Default: build the CUDA extension, then the main job,
# `python -m wam_fast.bench` on W1 with its JSON and PNG chart, in under 8 minutes:
#   bash benchmarks/gpu_check.sh                                # STAGES="build bench"
#   STAGES="build gputests" bash benchmarks/gpu_check.sh        # the GPU test subset (GPU_TESTS), ~7 min cap
#   STAGES="build kernels graphs" bash benchmarks/gpu_check.sh  # kernels per layer on the GPU; one W1 act()
#                                                               # (graphs: also with a committed prefix vs without)
#                                                               # from its graph vs eager (1 and 4 steps, bf16 / FP8)
#   STAGES="benchmarks" bash benchmarks/gpu_check.sh chunk      # op benchmarks (pytest -k expression)
#   STAGES="build families" bash benchmarks/gpu_check.sh        # wam_fast.compile on six WAM families, timed
# Stages (any subset, run in this order): build info gputests benchmarks kernels graphs families bench.
#
# What comes back: every stage's output goes into ONE log, $OUT/gpu-check.log (also printed), and only
# the files in OUTPUT_FILES are written to $OUT (8 at most: the limit of what comes back); the script
# checks that at the end and fails if $OUT holds anything else. Nothing is fetched: pip runs with
# --no-index --no-deps --no-build-isolation against the machine's CUDA torch.
#
# Time: every stage runs under `timeout`, capped by what is left of DEADLINE_S (default 470 s: 8
# minutes less the wrap-up), so the call ends in time and a cut-short bench keeps the rows it measured
# (its JSON is rewritten after every row, "complete": false until the end).
#
# BENCH_ARGS (default below) picks the W1 rows so build + bench fit 8 minutes. Estimate for an H200
# (bf16 ~700 TFLOP/s on large GEMMs; W1 = 12.8 TFLOP per row-forward, docs/design.md), repeats 30:
#   build (pip, 4 CUDA sources, MAX_JOBS=16)                       ~1.5 min
#   start, W1 random weights (5.6 B params), GEMM ceilings          ~0.5 min
#   paper-baseline: eager, 20 row-forwards ~0.5-1 s/chunk, x33      ~0.5 min
#   paper-baseline-compiled: torch.compile of the W1 forward (cold inductor cache) ~2-3 min, then x33 ~0.3 min
#   6 cached student rows (4/2/1 steps x bf16/FP8): Triton JIT + chunk graph capture per precision
#   (~1 min each), then <= 34 TFLOP/chunk: seconds per row         ~2 min
#   wam_fast-action-only-1step-fp8-cache (#26's GPU check: the action-only student, FP8, one step,
#   captured graph, 30 timed chunks; its own chunk graph)           ~0.5 min
# Left out of the default: released-baseline (100 row-forwards: ~3-5 s/chunk, x33 = 2-3 min) and the
# nocache student rows (each precision torch.compiles the student's forward again: ~2-3 min each).
# The full table: BENCH_ARGS="--rows '*'" in its own call (or two calls, e.g. --rows 'released-*').
# Without matplotlib on that machine the chart is skipped with a message; draw it from the JSON here:
#   python -m wam_fast.bench --from-json benchmarks/results/gpu-check/bench-w1.json
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-benchmarks/results/gpu-check}
STAGES=${STAGES:-build bench}
KNOWN_STAGES="build info gputests benchmarks kernels graphs bench families"
BENCH_ARGS=${BENCH_ARGS:---rows 'paper-baseline,paper-baseline-compiled,wam_fast-[0-9]*-cache,wam_fast-action-only-1step-fp8-cache'}
GPU_TESTS=${GPU_TESTS:-tests/test_adaln_modulate.py tests/test_attention.py tests/test_ffn_gelu.py \
tests/test_fp8_linear.py tests/test_gated_residual.py tests/test_gated_residual_adaln.py tests/test_qk_norm_rope.py \
tests/test_quantize_rowwise.py tests/test_csrc.py tests/test_quant.py tests/test_kv_cache.py tests/test_fused_model.py \
tests/test_kernel_counts.py tests/test_compile.py tests/test_compile_patterns.py tests/test_chunk_graphs.py}
GPU_TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT:-420}
DEADLINE_S=${DEADLINE_S:-470}
# every file this script may leave in $OUT (what comes back is capped at 8 files)
OUTPUT_FILES=(gpu-check.log nvidia-smi.txt bench-w1.json bench-w1.png kernels.json graph-vs-eager.json
              benchmarks.json families-cuda.json)
MAX_FILES=8
export LOG="$OUT/gpu-check.log"

for stage in $STAGES; do
  if [[ " $KNOWN_STAGES " != *" $stage "* ]]; then
    echo "gpu_check.sh: unknown stage '$stage' (stages: $KNOWN_STAGES)" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
exec > >(tee -a "$LOG") 2>&1  # one log of every stage, printed as well
tee_pid=$!
export PYTHONUNBUFFERED=1     # a stage cut by its timeout still leaves its output in the log
unset TRITON_INTERPRET
has() { [[ " $STAGES " == *" $1 "* ]]; }
failed=0

# run_stage NAME LIMIT_S COMMAND: COMMAND (a bash string; $OUT and $LOG are exported) under timeout,
# with LIMIT_S capped by what is left of DEADLINE_S
run_stage() {
  local name=$1 limit=$2 command=$3 left=$((DEADLINE_S - SECONDS)) t0=$SECONDS rc
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    echo "$name: SKIPPED (${left} s left of DEADLINE_S=${DEADLINE_S})"; failed=1; return
  fi
  timeout -k 10 "$limit" bash -c "$command"
  rc=$?
  (( rc != 0 )) && failed=1
  if (( rc == 124 || rc == 137 )); then
    echo "$name: CUT at its ${limit} s limit ($((SECONDS - t0)) s)"
  else
    echo "$name: exit $rc ($((SECONDS - t0)) s)"
  fi
}

echo "gpu_check.sh: stages '$STAGES', deadline ${DEADLINE_S} s, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
{ nvidia-smi; nvidia-smi -q -d CLOCK,PERFORMANCE,TEMPERATURE,POWER; } > "$OUT/nvidia-smi.txt" 2>&1

if has build; then
  # pip's own output goes to the log only; on failure its last lines are printed too
  run_stage build 300 'MAX_JOBS=${MAX_JOBS:-16} python -m pip install --no-index --no-deps --no-build-isolation -e . \
    >> "$LOG" 2>&1 || { tail -n 40 "$LOG" >&2; exit 1; }'
fi
if has info || has build; then
  run_stage info 60 'python -m wam_fast.info'  # into the log (8 files come back at most)
fi
if has gputests; then
  run_stage gputests "$GPU_TESTS_TIMEOUT" "python -m pytest $GPU_TESTS -q -p no:cacheprovider -rfEs --durations=15"
fi
if has benchmarks; then
  run_stage benchmarks 400 "python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider ${1:+-k '$1'} \
    --benchmark-json \"\$OUT/benchmarks.json\" --benchmark-columns=median,iqr,rounds"
fi
if has kernels; then
  run_stage kernels 240 'python -m wam_fast.bench --kernels --json "$OUT/kernels.json"'
fi
if has graphs; then
  run_stage graphs 400 "python benchmarks/graph_vs_eager.py --json \"\$OUT/graph-vs-eager.json\" ${GRAPH_ARGS:-}"
fi
if has families; then  # the README's per-family table on the GPU (kernel sites timed)
  run_stage families 300 'python benchmarks/families.py --reps 100 --out "$OUT/families-cuda.json"'
fi
if has bench; then
  run_stage bench 600 "python -m wam_fast.bench --json \"\$OUT/bench-w1.json\" --chart \"\$OUT/bench-w1.png\" $BENCH_ARGS"
fi

# what comes back: only OUTPUT_FILES, at most MAX_FILES (an atomic JSON write cut by a timeout leaves a .tmp)
rm -f "$OUT"/.*.tmp
extra=()
count=0
while IFS= read -r -d '' path; do
  count=$((count + 1))
  name=${path#"$OUT"/}
  [[ " ${OUTPUT_FILES[*]} " == *" $name "* ]] || extra+=("$name")
done < <(find "$OUT" -type f -print0)
if (( count > MAX_FILES || ${#extra[@]} > 0 )); then
  echo "gpu_check.sh: $OUT holds $count files (at most $MAX_FILES come back); not in OUTPUT_FILES: ${extra[*]:-none}"
  failed=1
fi
echo "gpu_check.sh: done in ${SECONDS} s, $count files in $OUT$( ((failed)) && echo ', SOME STAGE FAILED' )"
exec >&- 2>&-
wait "$tee_pid"  # the log is complete when the script returns
exit $failed
