#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool's `run`): build the CUDA extension, run the test
# suite on the GPU (Triton compiled, not interpreted), the benchmarks at W1 shapes, and the main job:
# `python -m wam_fast.bench` on W1 (released / paper baselines vs wam_fast 4/2/1 steps x bf16/FP8 x
# cache on/off) with its JSON and PNG chart. Everything lands in $OUT (default
# benchmarks/results/gpu-check/) with the environment; nothing is fetched (that machine has no
# network: --no-deps, --no-build-isolation against its CUDA torch).
#
# A device call runs at most 10 minutes, so pick stages (default: all of them, in this order):
#   STAGES="build bench" bash benchmarks/gpu_check.sh          # the bench JSON + chart on W1 only
#   STAGES="build tests" bash benchmarks/gpu_check.sh
#   STAGES="benchmarks" bash benchmarks/gpu_check.sh chunk      # pytest -k expression for the benchmarks
#   STAGES="build kernels graphs" bash benchmarks/gpu_check.sh  # kernels per layer on the GPU; one W1 act()
#                                                               # from its graph vs eager (1 and 4 steps, bf16 / FP8)
# BENCH_ARGS adds options to the bench (default "--repeats 5"; e.g. "--rows 'paper-baseline,wam_fast-*'").
# Without matplotlib on that machine the chart is skipped with a message; draw it from the JSON here:
#   python -m wam_fast.bench --from-json benchmarks/results/gpu-check/bench-w1.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
STAGES=${STAGES:-build info tests benchmarks kernels graphs bench}
BENCH_ARGS=${BENCH_ARGS:---repeats 5}
mkdir -p "$OUT"
unset TRITON_INTERPRET
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has build; then
  t0=$SECONDS
  MAX_JOBS=${MAX_JOBS:-16} pip install --no-deps --no-build-isolation -e . > "$OUT/build.txt" 2>&1 \
    && echo "build: ok ($((SECONDS - t0)) s)" || echo "build: FAILED ($((SECONDS - t0)) s), see $OUT/build.txt"
fi
if has info || has build; then
  python -m wam_fast.info > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"
fi
if has tests; then
  t0=$SECONDS
  python -m pytest tests -q -p no:cacheprovider -rs > "$OUT/tests.txt" 2>&1
  echo "tests: exit $? ($((SECONDS - t0)) s)"; tail -n 15 "$OUT/tests.txt"
fi
if has benchmarks; then
  t0=$SECONDS
  python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider ${1:+-k "$1"} \
    --benchmark-json "$OUT/benchmarks.json" --benchmark-columns=median,iqr,rounds > "$OUT/benchmarks.txt" 2>&1
  echo "benchmarks: exit $? ($((SECONDS - t0)) s)"; tail -n 60 "$OUT/benchmarks.txt"
fi
if has kernels; then
  python -m wam_fast.bench --kernels --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1
  echo "bench --kernels: exit $?"; tail -n 14 "$OUT/kernels.txt"
fi
if has graphs; then
  t0=$SECONDS
  python benchmarks/graph_vs_eager.py --json "$OUT/graph-vs-eager.json" ${GRAPH_ARGS:-} > "$OUT/graph-vs-eager.txt" 2>&1
  echo "graph_vs_eager: exit $? ($((SECONDS - t0)) s)"; tail -n 6 "$OUT/graph-vs-eager.txt"
fi
if has bench; then
  t0=$SECONDS
  # the JSON is rewritten after every row ("complete": false until the end), so a cut-short run keeps its rows
  eval "python -m wam_fast.bench --json '$OUT/bench-w1.json' --chart '$OUT/bench-w1.png' $BENCH_ARGS" \
    > "$OUT/bench-w1.txt" 2>&1
  echo "wam_fast.bench (W1: baselines vs wam_fast 4/2/1 steps x bf16/fp8 x cache): exit $? ($((SECONDS - t0)) s)"
  tail -n 45 "$OUT/bench-w1.txt"
fi
