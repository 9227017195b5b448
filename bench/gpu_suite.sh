#!/usr/bin/env bash
# The GPU-marked tests on a CUDA machine, one pytest process per test file, so that a CUDA fault
# in one file (which poisons its process's context) cannot hide the others. Prints a per-file
# summary table last; the full logs go to $OUT/gpu_tests.tar.gz.
#   bash bench/gpu_suite.sh [JOBS] [FILE ...]     (JOBS files at a time, default 1; default: every
#                                                  test file with GPU tests)
# Installs the carried wheels (.whl: expecttest, hypothesis, ...) first, as bench/gpu_all.sh.
set -o pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-1}; shift || true
. bench/gpu_env.sh
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || mapfile -t FILES < <(grep -l "mark.gpu" tests/test_*.py)
LOGS=/tmp/gpu_test_logs; rm -rf "$LOGS"; mkdir -p "$LOGS"
run_one() {
  f=$1; name=$(basename "$f" .py); start=$(date +%s)
  # OUT unset for the tests: some write generated code there when it is set
  OUT= timeout "${PER_FILE_TIMEOUT:-500}" python3 -m pytest -q -m gpu "$f" -p no:cacheprovider --tb=short -rfE \
    >"$LOGS/$name.log" 2>&1
  echo "$? $(( $(date +%s) - start ))" >"$LOGS/$name.rc"
}
export -f run_one; export LOGS
printf '%s\n' "${FILES[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {}'
python3 -c 'import torch, triton; print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)'
echo "| file | rc | seconds | result |"; echo "|---|---|---|---|"
for f in "${FILES[@]}"; do
  name=$(basename "$f" .py); read -r rc secs <"$LOGS/$name.rc"
  res=$(grep -E "^[0-9]+ (passed|failed)|^(=+ )?[0-9]+ (passed|failed|error)|no tests ran|passed|failed" "$LOGS/$name.log" | tail -1 | tr -d '=')
  echo "| $name | $rc | $secs | $res |"
done
grep -h "^FAILED\|^ERROR" "$LOGS"/*.log | cut -c1-200
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu_tests.tar.gz" -C "$LOGS" .
