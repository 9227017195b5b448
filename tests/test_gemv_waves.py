"""bench/gemv_waves.py: the occupancy arithmetic, and one config compiled for sm_90a end to end (in a
subprocess without the interpreter, like tests/sm90.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gemv_waves
    finally:
        sys.path.pop(0)
    return gemv_waves


def test_occupancy():
    occ = _module().occupancy
    assert occ(63, 0, 1) == 32  # one-warp programs: the 32-block limit
    assert occ(128, 0, 1) == 16  # 4096 registers a warp
    assert occ(79, 0, 1) == 25  # 80 -> 2560 a warp (units of 256)
    assert occ(64, 1024, 2) == 16  # 2 warps: 64 registers, 16 programs
    assert occ(40, 100 * 1024, 4) == 2  # shared memory binds


def test_one_config_compiles_for_sm90():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gemv_waves.py"), "--shapes", "1024x512",
                          "--configs", "n4 g128 w1"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    row = [line for line in out.stdout.splitlines() if line.startswith("| n4 g128 w1")]
    assert len(row) == 1, out.stdout
    regs, per_sm, waves = row[0].split("|")[2:5]
    assert 0 < int(regs) <= 255 and 1 <= int(per_sm) <= 32 and float(waves) > 0
