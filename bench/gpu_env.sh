# Sourced by the GPU scripts (bench/gpu_*.sh) on a machine without registry access: installs the
# wheels carried in .whl (expecttest, hypothesis, nvidia_cutlass, ...) into /tmp/site, puts it on
# PYTHONPATH, and installs this checkout in editable mode. SKIP_INSTALL=1: the caller did.
if [ -z "${SKIP_INSTALL:-}" ]; then
  if [ -d .whl ]; then
    timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      >/dev/null 2>&1
  fi
  timeout 60 python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >/dev/null 2>&1
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export SKIP_INSTALL=1
