#!/usr/bin/env bash
# The GPU tests and the bench sections in under 10 minutes; whole models in a second run:
#   bash bench/gpu_all.sh - llama,vit,llama_prefill,vit24
# Usage: bash bench/gpu_all.sh [sections|-] [e2e models]
#        bash bench/gpu_all.sh targets   (no GPU tests: every case with a target in
#        sparse_inductor/bench.py's TARGETS, whole models in reduce-overhead mode only, ending with
#        the table of targets against the run)
# Installs the wheels carried in .whl (expecttest) and the package, runs the GPU tests, then the
# bench; logs and JSON go to $OUT (the tests' code dumps are off).
# (bench/gpu_suite.sh runs the GPU tests alone, one process per test file.)
set -o pipefail
SECTIONS=${1:-cusparselt,quant,int8_act,fp8,linear24,block}
E2E=${2:-}
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
OUT_DIR=${OUT:-/tmp}
if [ "$SECTIONS" = "targets" ]; then
  timeout 560 python3 -m sparse_inductor.bench --targets --sections block,quant,cusparselt,int8_act,e2e,compose \
    --e2e llama_prefill,vit,vit24 --e2e-modes ro --json "$OUT_DIR/targets.json" 2>"$OUT_DIR/targets.err" \
    | tee "$OUT_DIR/targets.md"
  exit
fi
quiet() { grep -v "^DEBUG\|UserWarning\|warn\|^  " "$1" | tail -5; }
if [ "$SECTIONS" != "-" ]; then
  OUT= timeout 200 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --tb=short 2>&1 \
    | grep "^E \|passed\|failed\|FAILED" | head -40 | tee "$OUT_DIR/gputests.txt"
  timeout 370 python3 -m sparse_inductor.bench --sections "$SECTIONS" --json "$OUT_DIR/bench.json" \
    2>"$OUT_DIR/bench.err" | tee "$OUT_DIR/bench.md"
  quiet "$OUT_DIR/bench.err"
fi
if [ -n "$E2E" ]; then
  timeout 560 python3 -m sparse_inductor.bench --sections e2e --e2e "$E2E" --json "$OUT_DIR/bench_e2e.json" \
    2>"$OUT_DIR/bench_e2e.err" | tee "$OUT_DIR/bench_e2e.md"
  quiet "$OUT_DIR/bench_e2e.err"
fi
