#!/usr/bin/env bash
# The CUTLASS family compiled (the rewrite, the epilogues, the dispatcher) on a GPU machine, in
# steps of under 10 minutes each:
#   bash bench/gpu_cutlass_compiled.sh build     every library the GPU tests and the bench's cutlass
#                                               section use, in one parallel build (51 libraries,
#                                               ~75 s of nvcc and ~5 GB each; as many at once as the
#                                               cores and memory allow: ~4 rounds on 16 cores)
#   bash bench/gpu_cutlass_compiled.sh tests     tests/test_gpu_cutlass.py (from the cache: a minute)
#   bash bench/gpu_cutlass_compiled.sh singles   the section's single linears (16 cases)
#   bash bench/gpu_cutlass_compiled.sh mlp       the section's 8 Llama MLP blocks (batch 16, 64, 4096)
# The libraries are cached in $SPARSE_INDUCTOR_CUTLASS_CACHE_DIR (default .carry/cutlass_compiled,
# inside the checkout, so that it stays between calls on one machine); logs and JSON go to $OUT.
# A step whose libraries are missing builds them itself (the compile's own parallel build, one
# model at a time): correct, slower.
set -o pipefail
cd "$(dirname "$0")/.."
STEP=${1:-tests}
OUT=${OUT:-/tmp/cutlass_out}; mkdir -p "$OUT"
. bench/gpu_env.sh
export SPARSE_INDUCTOR_CUTLASS_CACHE_DIR=${SPARSE_INDUCTOR_CUTLASS_CACHE_DIR:-$PWD/.carry/cutlass_compiled}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
case "$STEP" in
  build)
    timeout 570 python3 - 2>&1 <<'EOF' | tee "$OUT/build.log" | grep -v "compiling CUTLASS kernel"
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
sys.path[:0] = ["tests"]
import test_gpu_cutlass
from sparse_inductor import bench
from sparse_inductor.lowering import cutlass_24 as c24
from sparse_inductor.runtime import cutlass as rt
print("toolchain:", rt.available() or "ok", rt.nvcc_version(), "CUTLASS", rt.cutlass_version(), flush=True)
ks = list(dict.fromkeys(test_gpu_cutlass.expected_kernels() + bench.cutlass_kernels()))
start = time.perf_counter()
res = c24.build(ks)
bad = [k for k, p in res.items() if isinstance(p, Exception)]
print(f"BUILD: {len(ks) - len(bad)} of {len(ks)} libraries in {time.perf_counter() - start:.0f} s")
for k in bad:
    print("BUILD FAILED:", k.describe(), "\n", str(res[k])[-2000:])
EOF
    ;;
  tests)
    timeout 570 python3 -m pytest -q -m gpu tests/test_gpu_cutlass.py -p no:cacheprovider --tb=short -rfE \
      2>&1 | tee "$OUT/tests.log" | tail -30
    ;;
  singles|mlp)
    timeout 570 python3 -m sparse_inductor.bench --sections cutlass --cutlass "$STEP,choice" \
      --json "$OUT/cutlass_$STEP.json" 2>&1 | tee "$OUT/bench_$STEP.log" | grep -v "^\s*$" | grep "^|\|^#\|H100\|H200\|stopped\|Error"
    ;;
  *)
    echo "unknown step $STEP: build, tests, singles or mlp"; exit 2 ;;
esac
echo "step $STEP rc $? ($(( $(date +%s) - t0 )) s)"
