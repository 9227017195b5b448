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
    # the gemv's register layout fits when num_warps / KSPLIT divides BLOCK_N / 2 (sp24_gemv_acc);
    # KSPLIT > 1 (warps splitting K): the gemv layout only
    if not words:
        for (bn, w), bg, s in itertools.product(((8, 2), (16, 4), (32, 8)), (256, 512), (1, 2, 3)):
            yield dict(GEMV=True, BLOCK_M=1, BLOCK_N=bn, BLOCK_G=bg, num_warps=w, num_stages=s)
        return
    shapes = ((4, 1, 1), (8, 2, 1), (16, 4, 1), (8, 1, 1), (2, 1, 1),  # (BLOCK_N, num_warps, KSPLIT)
              (2, 2, 2), (2, 4, 4), (4, 2, 2), (4, 4, 4), (8, 4, 2), (8, 8, 4), (16, 8, 2))
    for (bn, w, ks), bg in itertools.product(shapes, (128, 256, 512)):
        yield dict(GEMV=True, BLOCK_M=1, BLOCK_N=bn, BLOCK_G=bg, num_warps=w, num_stages=2, KSPLIT=ks)


def main():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--values", default="bf16,int8")
    p.add_argument("--layouts", default="bytes,words")
    p.add_argument("--compiled-top", type=int, default=0,
                   help="also time the table's and the N fastest gemv-layout configs compiled (Inductor's template)")
    args = p.parse_args()
    compiled: list = []
    print(header())
    print("\n| N | K | values | layout | dense F.linear | table us | best configs (us) | best vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in ((14336, 4096), (4096, 4096), (4096, 14336)):
        w, x = _case24(1, n, k)
        dense = _bench(_graphed(lambda: F.linear(x, w)))
        for name, layout in itertools.product(args.values.split(","), args.layouts.split(",")):
            wv = w if name == "bf16" else _int8_per_channel(w)[0]
            values, meta = compress_24(wv)
            if layout == "words":
                values, meta = to_gemv_layout(values, meta)
            table = t24.pick_config(1, n, k, layout == "words", name == "int8", device=x.device)
            res = []
            for cfg in [table, *(grid(True) if layout == "words" else ())]:
                try:
                    t = _bench(_graphed(lambda: t24.sp24_linear(x, values, meta, config=cfg)), rep=50)
                except Exception as e:
                    print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
                    continue
                res.append((t, cfg))
            best = sorted(res, key=lambda r: r[0])[:5]
            txt = "; ".join(f"n{c['BLOCK_N']} g{c['BLOCK_G']} w{c['num_warps']} s{c['num_stages']}"
                            f"{' k' + str(c['KSPLIT']) if c.get('KSPLIT', 1) > 1 else ''}: {t:.1f}" for t, c in best)
            print(f"| {n} | {k} | {name} | {layout} | {dense:.1f} | {res[0][0]:.1f} | {txt} | {dense / best[0][0]:.2f}x |",
                  flush=True)
            if args.compiled_top and layout == "words":
                compiled.append((n, k, name, dense, [table] + [c for _, c in best[:args.compiled_top] if c != table]))
    if compiled:
        _compiled_table(compiled)


def _compiled_table(cases):
    """The gemv-layout configs as Inductor's template runs them: a compiled nn.Linear (weight-only
    int8 with its scale fused, or bf16) per config, the config put in DEVICE_CONFIGS for this GPU,
    the FX cache off so that every config compiles anew."""
    import torch
    import torch.nn as nn

    from sparse_inductor.bench import _quantize_linears_

    print("\n| N | K | values | dense F.linear | config | compiled us | vs dense |")
    print("|---|---|---|---|---|---|---|")
    name_dev = torch.cuda.get_device_name()
    for n, k, name, dense, cfgs in cases:
        w, x = _case24(1, n, k)
        mod = nn.Sequential(nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16))
        with torch.no_grad():
            mod[0].weight.copy_(w)
        if name == "int8":
            _quantize_linears_(mod)
        key = t24.gemv_words_key(n, name == "int8")
        for cfg in cfgs:
            saved = t24.DEVICE_CONFIGS
            t24.DEVICE_CONFIGS = {name_dev: {key: dict(cfg)}}  # pick_config reads the module's table
            try:
                with torch.no_grad():
                    torch._dynamo.reset()
                    ours = torch.compile(mod.eval(), backend="sparse",
                                         options={"force": True, "kernel": "triton", "fx_cache": False})
                    ours(x)
                    t = _bench(_graphed(lambda: ours(x)))
            finally:
                t24.DEVICE_CONFIGS = saved
            ks = cfg.get("KSPLIT", 1)
            print(f"| {n} | {k} | {name} | {dense:.1f} | n{cfg['BLOCK_N']} g{cfg['BLOCK_G']} w{cfg['num_warps']}"
                  f"{' k' + str(ks) if ks > 1 else ''} | {t:.1f} | {dense / t:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
