#!/usr/bin/env bash
# One device-tool call (under its 10-minute limit) that runs the GPU tests and the per-layer bench
# sections; whole models go in a second call: bash bench/gpu_session.sh - llama,vit,llama_prefill,vit24
# Usage (device tool, carry [".whl"]): bash bench/gpu_session.sh [sections|-] [e2e models]
# Installs the carried wheels (expecttest) and the package, runs the GPU tests, then the bench;
# logs and JSON go to $OUT (at most 8 files come back, so the tests' code dumps are off).
set -o pipefail
SECTIONS=${1:-cusparselt,quant,int8_act,fp8,linear24,block}
E2E=${2:-}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >/dev/null 2>&1
OUT_DIR=${OUT:-/tmp}
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
