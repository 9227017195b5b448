#!/usr/bin/env bash
# Every compiled case of docs/benchmarks.md#cutlass on one GPU machine, in two calls of under 10
# minutes each (the second on the same warm machine):
#   bash bench/gpu_cutlass_rerun.sh cases     singles + quant8 + choice, the 8 Llama MLP blocks at
#                                             16 / 64 / 4096 tokens, HF Llama (RO), the 2:4 ViTs and
#                                             the prefill (default and RO)
#   bash bench/gpu_cutlass_rerun.sh compile   bench/dense_operand_layout.py, compile time cold and warm,
#                                             then tests/test_gpu_cutlass.py
# Each step gets what is left of a fixed deadline from the start of the call (`timeout`; the bench
# ends a section on SIGTERM and keeps what it measured), and after each step the logs and JSON so
# far are packed into $OUT/<call>.tar, so a call stopped at its limit still returns the steps before.
# Prebuilt libraries (bench/cutlass_prebuild.py, no GPU needed) in .carry/cutlass_libs*.tar.xz are
# unpacked into $SPARSE_INDUCTOR_CUTLASS_CACHE_DIR first; what they lack the compiles build.
set -o pipefail
cd "$(dirname "$0")/.."
CALL=${1:-cases}
OUT=${OUT:-/tmp/cutlass_out}; mkdir -p "$OUT/$CALL"
. bench/gpu_env.sh
export SPARSE_INDUCTOR_CUTLASS_CACHE_DIR=${SPARSE_INDUCTOR_CUTLASS_CACHE_DIR:-/tmp/cutlass_libs}
export PYTHONUNBUFFERED=1
mkdir -p "$SPARSE_INDUCTOR_CUTLASS_CACHE_DIR"
for f in .carry/cutlass_libs*.tar.xz; do
  [ -f "$f" ] && tar -xJf "$f" -C "$SPARSE_INDUCTOR_CUTLASS_CACHE_DIR"
done
echo "libraries in the cache: $(ls "$SPARSE_INDUCTOR_CUTLASS_CACHE_DIR"/*.so 2>/dev/null | wc -l)"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
t0=$(date +%s)

# step NAME DEADLINE_S COMMAND...: runs COMMAND with what is left until DEADLINE_S after t0
step() {
  local name=$1 deadline=$2; shift 2
  local left=$(( deadline - ($(date +%s) - t0) ))
  if [ "$left" -lt 20 ]; then echo "step $name skipped: ${left} s left"; return; fi
  local s=$(date +%s)
  timeout "$left" "$@" > "$OUT/$CALL/$name.log" 2>&1
  local rc=$?
  grep "^|\|^#\|H100\|H200\|stopped\|Error\|passed\|failed\|cold\|warm\|ready" "$OUT/$CALL/$name.log" | cut -c1-400
  echo "step $name rc $rc ($(( $(date +%s) - s )) s; $(( $(date +%s) - t0 )) s in all)"
  tar -cf "$OUT/$CALL.tar" -C "$OUT" "$CALL"
}

B="python3 -m sparse_inductor.bench"
case "$CALL" in
  cases)
    step singles 150 $B --sections cutlass --cutlass singles,quant8,choice --json "$OUT/$CALL/singles.json"
    step mlp 290 $B --sections cutlass --cutlass mlp,choice --cutlass-batches 16,64,4096 --json "$OUT/$CALL/mlp.json"
    step hf 360 $B --sections e2e --e2e hf_llama_cutlass --e2e-modes ro --json "$OUT/$CALL/hf.json"
    step vit 520 $B --sections e2e --e2e vit24_cutlass --e2e-modes default,ro --json "$OUT/$CALL/vit.json"
    step prefill 590 $B --sections e2e --e2e llama_prefill_cutlass --e2e-modes default,ro --json "$OUT/$CALL/prefill.json"
    ;;
  compile)
    step layout 40 python3 bench/dense_operand_layout.py
    # cold: empty library, timing and Inductor caches (the cases call filled the shared ones)
    step cold 280 env TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cold python3 bench/cutlass_compile_time.py --cache-dir /tmp/cutlass_cold
    step warm 320 env TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cold python3 bench/cutlass_compile_time.py --cache-dir /tmp/cutlass_cold
    step tests 590 python3 -m pytest -q -m gpu tests/test_gpu_cutlass.py -p no:cacheprovider --tb=short -rfE
    ;;
  *)
    echo "unknown call $CALL: cases or compile"; exit 2 ;;
esac
