"""The 2:4 gemv (M = 1) as Inductor's template vs its eager launcher, per config (run G4's gap).

    python bench/gemv_template.py

For weight-only int8 and bf16 2:4 at N x K = 14336x4096 and 4096x14336: the launcher with a
config, and a compiled nn.Linear (backend="sparse", force, the FX cache off so that each config
compiles anew) with the same config in the template, N and K rendered as literals
(OPAQUE_NK False, Inductor's way) or hidden from the compiler (OPAQUE_NK True, as the launcher's
runtime ints). CUDA-graph replays, do_bench medians (L2 flushed), us; dense F.linear in the same call.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_inductor.bench import _as_compiled, _bench, _case24, _graphed, _quantize_linears_, header
from sparse_inductor.formats import compress_24
from sparse_inductor.lowering import triton_24 as t24

CONFIGS = [dict(BLOCK_N=4, BLOCK_G=512, num_warps=1), dict(BLOCK_N=8, BLOCK_G=256, num_warps=2),
           dict(BLOCK_N=8, BLOCK_G=512, num_warps=2), dict(BLOCK_N=16, BLOCK_G=512, num_warps=4)]


def main():
    dev, dt = "cuda", torch.bfloat16
    print(header())
    print("\n| values | N x K | dense F.linear | config | launcher | compiled, literal N/K | compiled, opaque N/K |")
    print("|---|---|---|---|---|---|---|")
    for int8 in (True, False):
        for n, k in ((14336, 4096), (4096, 14336)):
            w, x = _case24(1, n, k)
            mod = nn.Sequential(nn.Linear(k, n, bias=False, device=dev, dtype=dt))
            with torch.no_grad():
                mod[0].weight.copy_(w)
            if int8:
                _quantize_linears_(mod)
            values, meta = _as_compiled(compress_24(mod[0].wq if int8 else w), x)
            key = ("gemv_words_narrow_int8" if n < 8192 else "gemv_words_int8") if int8 else "gemv_words"
            saved = dict(t24.CONFIGS[key])
            with torch.no_grad():
                dense = _bench(_graphed(lambda: F.linear(x, w)))
                for c in CONFIGS:
                    cfg = dict(GEMV=True, BLOCK_M=1, num_stages=2, **c)
                    launcher = _bench(_graphed(lambda: t24.sp24_linear(x, values, meta, config=cfg)))
                    comp = []
                    for opaque in (False, True):
                        t24.CONFIGS[key] = dict(cfg, OPAQUE_NK=opaque)
                        torch._dynamo.reset()
                        ours = torch.compile(mod.eval(), backend="sparse",
                                             options={"force": True, "kernel": "triton", "fx_cache": False})
                        ours(x)
                        comp.append(_bench(_graphed(lambda: ours(x))))
                    t24.CONFIGS[key] = saved
                    print(f"| {'int8' if int8 else 'bf16'} | {n}x{k} | {dense:.1f} | n{c['BLOCK_N']} g{c['BLOCK_G']} "
                          f"w{c['num_warps']} | {launcher:.1f} | {comp[0]:.1f} | {comp[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
