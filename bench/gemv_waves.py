"""The 2:4 gemv (M = 1, gemv layout, int8 or bf16 values) as Inductor's template compiles it, without
a GPU: per config, the registers ptxas gives it for sm_90a, the programs per SM that allows and the
waves of the grid at each N. The compiled template renders N and K as literals, and ptxas then
budgets registers differently from the eager launcher (runtime N and K), so a config's launcher
timing does not predict its compiled one (docs/performance.md); this predicts the waves.

    python bench/gemv_waves.py [--values int8] [--shapes 14336x4096,4096x14336] [--sms 132]

Prints a table per shape, best wave efficiency (waves / whole waves) first. A screen, not a
ranking: on the H200 (int8, 14336x4096, compiled) the one-wave config 4 rows, 1 warp, BLOCK_G
128 (0.85) ran 18.8 us and 2 rows, 2 warps, KSPLIT 2, BLOCK_G 512 (3.88 waves, 0.97) 26.7; time the
candidates with bench/sweep_gemv.py --compiled-configs. Register counts depend
on the Triton (and its ptxas) that compiles: run this with the Triton the GPU runs (3.6.0 for
torch 2.11) (`pip install triton==3.6.0` in a separate venv; 3.7.1 gives other counts, e.g. 168
registers instead of 128 for 4 rows, 1 warp, BLOCK_G 512). The kernel compiled here mirrors the
template's body (literal N and K, a per-row scale in the store), not Inductor's exact source.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from sweep_gemv import grid, label, parse_label  # noqa: E402

from sparse_inductor.lowering.triton_24 import sp24_gemv_acc  # noqa: E402

REGS_PER_SM, MAX_WARPS, MAX_BLOCKS = 65536, 64, 32  # Hopper (sm_90)


@triton.jit
def _template_like(X, V, META, S, Y, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_G: tl.constexpr, NUM_WARPS: tl.constexpr, KSPLIT: tl.constexpr):
    """The template's gemv body with N, K and x's row stride as literals, y = acc * s[n]."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m + tl.arange(0, 1)
    acc = sp24_gemv_acc(X, V, META, pid_m, N, K, K, 1, pid_n, BLOCK_N, BLOCK_G, True, NUM_WARPS, True,
                        KSPLIT)[:, None]
    idx_m = rm[None, :]
    idx_n = rn[:, None]
    mask = (idx_m < 1) & (idx_n < N)
    s = tl.load(S + idx_n, mask=mask)
    tl.store(Y + (idx_n + N * idx_m), (acc * s).to(tl.bfloat16), mask=mask)


def resources(cfg: dict, n: int, k: int, int8: bool) -> tuple[int, int]:
    """(registers, static shared bytes) of the template-like kernel for sm_90a."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = _template_like.arg_names
    sig = {a: "constexpr" for a in names}
    sig.update(X="*bf16", V="*u8" if int8 else "*bf16", META="*i32", S="*fp32", Y="*bf16")
    consts = dict(N=n, K=k, BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"], NUM_WARPS=cfg["num_warps"],
                  KSPLIT=cfg.get("KSPLIT", 1))
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ("X", "V", "META", "S", "Y")}
    c = triton.compile(ASTSource(_template_like, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"SHARED:(\d+)", usage).group(1))


def occupancy(regs: int, shared: int, warps: int) -> int:
    """Programs per SM: registers (allocated per warp in units of 256), warps, blocks, shared memory."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    blocks = min(MAX_BLOCKS, MAX_WARPS // warps, REGS_PER_SM // (per_warp * warps))
    if shared:
        blocks = min(blocks, (228 * 1024) // (shared + 1024))  # 1 KB reserved per block
    return blocks


def main(argv=None) -> None:
    import triton.backends.nvidia  # noqa: F401  (the NVIDIA backend: its ptxas and cuobjdump)

    p = argparse.ArgumentParser()
    p.add_argument("--values", default="int8", choices=("int8", "bf16"))
    p.add_argument("--shapes", default="14336x4096,4096x14336", help="N x K, comma-separated")
    p.add_argument("--sms", type=int, default=132, help="SMs of the GPU (H100 SXM and H200: 132)")
    p.add_argument("--configs", default="", help="only these, ';'-separated labels ('n4 g128 w1; n2 g256 w2 k2')")
    args = p.parse_args(argv)
    configs = [parse_label(t) for t in args.configs.split(";") if t.strip()] or list(grid(True))
    print(f"triton {triton.__version__}, sm_90a, {args.sms} SMs, {args.values} values (torch 2.11's Triton: 3.6.0)")
    for n, k in (tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")):
        rows = []
        for cfg in configs:
            regs, shared = resources(cfg, n, k, args.values == "int8")
            per_sm = occupancy(regs, shared, cfg["num_warps"])
            waves = math.ceil(n / cfg["BLOCK_N"]) / (args.sms * per_sm)
            rows.append((waves / math.ceil(waves), waves, per_sm, regs, label(cfg)))
        print(f"\n{n}x{k}\n\n| config | registers | programs per SM | waves | waves / whole waves |")
        print("|---|---|---|---|---|")
        for eff, waves, per_sm, regs, name in sorted(rows, key=lambda r: (-r[0], r[1])):
            print(f"| {name} | {regs} | {per_sm} | {waves:.2f} | {eff:.2f} |")


if __name__ == "__main__":
    main()
