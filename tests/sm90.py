"""Compile kernels for sm_90a (H100 / H200) without a GPU: Triton's own compiler and its ptxas, in
a subprocess (the test process defines kernels for the interpreter). Catches what the interpreter
cannot: a config that fails to compile or overflows shared memory, which on the GPU would make the
compiled graph fall back to plain Inductor (correct, slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# the script's preamble: the lowering modules imported without the package __init__s
_PRELUDE = r"""
import json, os, re, sys, types
root = sys.argv[1]
for name in ("sparse_inductor", "sparse_inductor.lowering"):
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(root, *name.split("."))]
    sys.modules[name] = mod
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
"""


def compile_rows(body: str, tmp_path) -> list[dict]:
    """Run body (after the preamble; it prints one JSON object a line) with a cold, private Triton
    cache; the printed objects. Skips where triton has no NVIDIA backend."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # cold and hermetic
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + body, root], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]
