"""Sweep the 2:4 gemv (M = 1) launch configs on the GPU, for bf16 and int8 (weight-only) values.

    python bench/sweep_gemv.py

Times `sp24_linear(x, values, meta, config=cfg)` as CUDA-graph replays (do_bench medians, L2
flushed) at the bench's three shapes and prints, per shape, value dtype and meta layout (bytes,
or the gemv layout's words: formats/sparse24.to_gemv_layout), dense F.linear, the table's config
and the five fastest configs (for triton_24.CONFIGS).
"""
from __future__ import annotations

import itertools
import sys

import torch.nn.functional as F

from sparse_inductor.bench import _bench, _case24, _graphed, _int8_per_channel, header
from sparse_inductor.formats import compress_24, to_gemv_layout
from sparse_inductor.lowering import triton_24 as t24


def grid(words: bool):
    # the gemv's register layout fits when num_warps == BLOCK_N / 4 (triton_24.sp24_gemv_acc)
    pairs = ((8, 2), (16, 4), (32, 8)) + (((16, 2),) if words else ())
    for (bn, w), bg, s in itertools.product(pairs, (128, 256, 512) if words else (256, 512), (2,) if words else (1, 2, 3)):
        yield dict(GEMV=True, BLOCK_M=1, BLOCK_N=bn, BLOCK_G=bg, num_warps=w, num_stages=s)


def main():
    print(header())
    print("\n| N | K | values | layout | dense F.linear | table us | best configs (us) | best vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in ((14336, 4096), (4096, 4096), (4096, 14336)):
        w, x = _case24(1, n, k)
        dense = _bench(_graphed(lambda: F.linear(x, w)))
        for name, layout in itertools.product(("bf16", "int8"), ("bytes", "words")):
            wv = w if name == "bf16" else _int8_per_channel(w)[0]
            values, meta = compress_24(wv)
            if layout == "words":
                values, meta = to_gemv_layout(values, meta)
            table = t24.pick_config(1, n, k, layout == "words", name == "int8")
            res = []
            for cfg in [table, *(grid(True) if layout == "words" else ())]:
                try:
                    t = _bench(_graphed(lambda: t24.sp24_linear(x, values, meta, config=cfg)), rep=50)
                except Exception as e:
                    print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
                    continue
                res.append((t, cfg))
            best = sorted(res, key=lambda r: r[0])[:5]
            txt = "; ".join(f"n{c['BLOCK_N']} g{c['BLOCK_G']} w{c['num_warps']} s{c['num_stages']}: {t:.1f}"
                            for t, c in best)
            print(f"| {n} | {k} | {name} | {layout} | {dense:.1f} | {res[0][0]:.1f} | {txt} | {dense / best[0][0]:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
