#!/usr/bin/env bash
# The CUTLASS sm90 2:4 family on a GPU machine in one call, under 9 minutes by its timeouts:
#   1. builds every library the GPU tests and the sweep use, in parallel (nvcc, one process per
#      library, as many as the cores and memory allow), into one disk cache;
#   2. tests/test_cutlass.py's GPU tests (numerics against fp64, compressor, NaN/Inf, CUDA graphs);
#   3. bench/sweep_cutlass.py (configs against dense F.linear; markdown tables).
# Logs and the sweep's JSON go to $OUT (default /tmp/cutlass_out); a short summary is printed last.
#   bash bench/gpu_cutlass.sh
# Installs the carried wheels (.whl: nvidia_cutlass, expecttest, ...) first, as bench/gpu_suite.sh.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cutlass_out}; mkdir -p "$OUT"
. bench/gpu_env.sh
export SPARSE_INDUCTOR_CUTLASS_CACHE_DIR=${SPARSE_INDUCTOR_CUTLASS_CACHE_DIR:-/tmp/sparse_inductor_cutlass}
export PYTHONUNBUFFERED=1
t0=$(date +%s)

# 1. build (the tests' kernels and the sweep's)
timeout 290 python3 - >"$OUT/build.log" 2>&1 <<'EOF'
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
sys.path[:0] = ["tests", "bench"]
import test_cutlass, sweep_cutlass
from sparse_inductor.lowering import cutlass_24 as c24
from sparse_inductor.runtime import cutlass as rt
print("toolchain:", rt.available() or "ok", rt.nvcc_version(), "CUTLASS", rt.cutlass_version(), flush=True)
ks = list(dict.fromkeys(test_cutlass.GPU_KERNELS + sweep_cutlass.kernels([int(m) for m in sweep_cutlass.MS.split(",")])))
start = time.perf_counter()
res = c24.build(ks)
bad = [(k, p) for k, p in res.items() if isinstance(p, Exception)]
print(f"BUILD: {len(ks) - len(bad)} of {len(ks)} libraries in {time.perf_counter() - start:.0f} s")
for k, e in bad:
    print("BUILD FAILED:", k.describe(), "\n", str(e)[-3000:])
EOF
echo "build rc $? ($(( $(date +%s) - t0 )) s)" >>"$OUT/build.log"
t1=$(date +%s)

# 2. the GPU tests
timeout 125 python3 -m pytest -q -m gpu tests/test_cutlass.py -p no:cacheprovider --tb=short -rfE \
  >"$OUT/tests.log" 2>&1
echo "tests rc $? ($(( $(date +%s) - t1 )) s)" >>"$OUT/tests.log"
t2=$(date +%s)

# 3. the sweep
timeout 80 python3 bench/sweep_cutlass.py --json "$OUT/sweep.json" >"$OUT/sweep.log" 2>&1
echo "sweep rc $? ($(( $(date +%s) - t2 )) s)" >>"$OUT/sweep.log"

echo "=== summary ($(( $(date +%s) - t0 )) s) ==="
python3 -c 'import torch; print(torch.cuda.get_device_name(), "torch", torch.__version__)' 2>/dev/null
grep -h "^toolchain\|^BUILD\|^build rc" "$OUT/build.log" | cut -c1-300
grep -E "passed|failed|error" "$OUT/tests.log" | tail -1
grep -h "^FAILED\|^ERROR" "$OUT/tests.log" | cut -c1-200 | head -20
tail -1 "$OUT/tests.log"
sed -n '/### Best config/,$p' "$OUT/sweep.log" | head -40
grep -h "wrong at\|failed at\|build failed" "$OUT/sweep.log" | head -10
tail -1 "$OUT/sweep.log"
