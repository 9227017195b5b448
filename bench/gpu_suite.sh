#!/usr/bin/env bash
# The GPU-marked tests on a CUDA machine, one pytest process per test file, so that a CUDA fault
# in one file (which poisons its process's context) cannot hide the others. Prints a per-file
# summary table last; the full logs go to $OUT/gpu_tests.tar.gz.
#   bash bench/gpu_suite.sh [JOBS] [FILE ...]     (JOBS files at a time, default 1; default: every
#                                                  test file with GPU tests, the longest first)
# Tests marked `timing` (they assert what the dispatcher picks from timings) run after the others,
# one file at a time, with the GPU to themselves. PER_FILE_TIMEOUT (default 500 s) bounds each file,
# TIMING_TIMEOUT (default 200 s) each file's timing tests.
# Installs the carried wheels (.whl: expecttest, hypothesis, ...) first, as bench/gpu_all.sh.
set -o pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-1}; shift || true
. bench/gpu_env.sh
FILES=("$@")
if [ ${#FILES[@]} -eq 0 ]; then
  # longest first (seconds on an H100), so that JOBS > 1 ends together; then the rest
  LONG=(test_gpu_compile test_gpu_cusparselt test_fp8 test_gpu_cutlass test_triton_block test_cutlass test_triton_24)
  mapfile -t ALL < <(grep -l "mark.gpu" tests/test_*.py)
  for n in "${LONG[@]}"; do [ -f "tests/$n.py" ] && FILES+=("tests/$n.py"); done
  for f in "${ALL[@]}"; do [[ " ${FILES[*]} " == *" $f "* ]] || FILES+=("$f"); done
fi
LOGS=/tmp/gpu_test_logs; rm -rf "$LOGS"; mkdir -p "$LOGS"
run_one() {  # file, marker expression, log suffix, timeout
  f=$1; name=$(basename "$f" .py)$3; start=$(date +%s)
  # OUT unset for the tests: some write generated code there when it is set
  OUT= timeout "${4:-${PER_FILE_TIMEOUT:-500}}" python3 -m pytest -q -m "$2" "$f" -p no:cacheprovider --tb=short -rfE \
    >"$LOGS/$name.log" 2>&1
  echo "$? $(( $(date +%s) - start ))" >"$LOGS/$name.rc"
}
export -f run_one; export LOGS
printf '%s\n' "${FILES[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {} "gpu and not timing" ""'
TIMED=()
for f in "${FILES[@]}"; do
  if grep -q "mark.timing" "$f"; then TIMED+=("$f"); run_one "$f" "gpu and timing" "[timing]" "${TIMING_TIMEOUT:-200}"; fi
done
python3 -c 'import torch, triton; print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)'
echo "| file | rc | seconds | result |"; echo "|---|---|---|---|"
for name in $(for f in "${FILES[@]}"; do basename "$f" .py; done) $(for f in "${TIMED[@]}"; do echo "$(basename "$f" .py)[timing]"; done); do
  read -r rc secs <"$LOGS/$name.rc"
  res=$(grep -E "passed|failed|error|no tests ran" "$LOGS/$name.log" | tail -1 | tr -d '=')
  echo "| $name | $rc | $secs | $res |"
done
grep -h "^FAILED\|^ERROR" "$LOGS"/*.log | cut -c1-200
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu_tests.tar.gz" -C "$LOGS" .
