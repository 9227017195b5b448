"""Sweep the 2:4 gemv (M = 1) launch configs on the GPU, for bf16 and int8 (weight-only) values.

    python bench/sweep_gemv.py

Times `sp24_linear(x, values, meta, config=cfg)` as CUDA-graph replays (do_bench medians, L2
flushed) at the bench's three shapes (--shapes) and prints, per shape, value dtype and meta layout
(bytes, or the gemv layout's words: formats/sparse24.to_gemv_layout), dense F.linear, the table's
config and the five fastest configs (for triton_24.CONFIGS).

The launcher's ranking does not carry over to the compiled template: Inductor renders N and K as
literals, ptxas then gives the same config other register counts, so other programs per SM and
another number of waves (docs/performance.md). --compiled-top N and --compiled-configs time
configs as the template runs them, and --llama times the fastest compiled ones (per value type in
--values) in 8 Llama MLP blocks (decode, batch 1) against the table's.

    python bench/sweep_gemv.py --values int8 --layouts words --shapes 14336x4096,4096x14336 \
        --compiled-top 1 --compiled-configs "n4 g128 w1; n2 g256 w2 k2" --llama
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


def parse_label(text: str) -> dict:
    """label()'s inverse: "n4 g256 w1 s2 k2" -> a gemv config (s2 and k1 by default)."""
    cfg = dict(GEMV=True, BLOCK_M=1, num_stages=2)
    keys = {"n": "BLOCK_N", "g": "BLOCK_G", "w": "num_warps", "s": "num_stages", "k": "KSPLIT"}
    for tok in text.split():
        cfg[keys[tok[0]]] = int(tok[1:])
    return cfg


def label(c: dict) -> str:
    ks = c.get("KSPLIT", 1)
    return f"n{c['BLOCK_N']} g{c['BLOCK_G']} w{c['num_warps']} s{c['num_stages']}{' k' + str(ks) if ks > 1 else ''}"


def main():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--values", default="bf16,int8")
    p.add_argument("--layouts", default="bytes,words")
    p.add_argument("--compiled-top", type=int, default=0,
                   help="also time the table's and the N fastest gemv-layout configs compiled (Inductor's template)")
    p.add_argument("--shapes", default="14336x4096,4096x4096,4096x14336", help="N x K, comma-separated")
    p.add_argument("--compiled-configs", default="",
                   help="with --compiled-top: also these configs compiled, ';'-separated labels ('n4 g128 w1; n8 g256 w4 k2')")
    p.add_argument("--llama", action="store_true",
                   help="with --compiled-top: 8 Llama MLP blocks 2:4, decode b1 (bf16; int8 weight-only), with "
                        "the table's configs and with the fastest compiled ones, timed twice each, alternating")
    args = p.parse_args()
    compiled: list = []
    print(header())
    print("\n| N | K | values | layout | dense F.linear | table us | best configs (us) | best vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for n, k in (tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")):
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
            txt = "; ".join(f"{label(c)}: {t:.1f}" for t, c in best)
            print(f"| {n} | {k} | {name} | {layout} | {dense:.1f} | {res[0][0]:.1f} | {txt} | {dense / best[0][0]:.2f}x |",
                  flush=True)
            if args.compiled_top and layout == "words":
                extra = [parse_label(t) for t in args.compiled_configs.split(";") if t.strip()]
                cfgs = [table]
                for c in [c for _, c in best[:args.compiled_top]] + extra:
                    if c not in cfgs:
                        cfgs.append(c)
                compiled.append((n, k, name, dense, cfgs))
    if compiled:
        best = _compiled_table(compiled)
        if args.llama:
            _llama_table(best)


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
    best: dict = {}  # gemv_words_key -> (us, config): the fastest compiled config per table key
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
            print(f"| {n} | {k} | {name} | {dense:.1f} | {label(cfg)} | {t:.1f} | {dense / t:.2f}x |", flush=True)
            if key not in best or t < best[key][0]:
                best[key] = (t, dict(cfg))
    return best


def _llama_table(best: dict) -> None:
    """8 Llama MLP blocks (bench.LlamaMLP), 2:4, decode batch 1, for each value type `best` has
    keys for (bf16; int8 weight-only): bf16 dense compile vs ours with the table's gemv configs and
    with `best` ({gemv_words_key: (us, config)}) in DEVICE_CONFIGS for this GPU; each compiled and
    timed twice, alternating."""
    import torch
    import torch.nn as nn

    from sparse_inductor.bench import LlamaMLP, _quantize_linears_
    from sparse_inductor.prune import prune

    dev, dt = "cuda", torch.bfloat16
    name_dev = torch.cuda.get_device_name()
    x = torch.randn(1, 4096, device=dev, dtype=dt)
    for int8 in (False, True):
        mine = {key: v for key, v in best.items() if key.endswith("_int8") == int8}
        if not mine:
            continue
        torch.manual_seed(0)
        model = nn.Sequential(*[LlamaMLP() for _ in range(8)]).to(dev, dt).eval()
        prune(model, "2:4")
        with torch.no_grad():
            torch._dynamo.reset()
            dense_c = torch.compile(model)
            t_dense = _bench(_graphed(lambda: dense_c(x)), rep=200)
            dense_c = None
            if int8:
                _quantize_linears_(model)
            times: dict = {"table": [], "best": []}
            for _ in range(2):  # compiled and timed at once (a reset frees the previous graph's kernels)
                for which in times:
                    saved = t24.DEVICE_CONFIGS
                    if which == "best":
                        t24.DEVICE_CONFIGS = {name_dev: {**saved.get(name_dev, {}),
                                                         **{key: dict(cfg) for key, (_, cfg) in mine.items()}}}
                    try:
                        torch._dynamo.reset()
                        ours = torch.compile(model, backend="sparse", options={"fx_cache": False})
                        ours(x)
                        times[which].append(_bench(_graphed(lambda: ours(x)), rep=200))
                    finally:
                        t24.DEVICE_CONFIGS = saved
                        ours = None
        what = "int8 weight-only" if int8 else "bf16"
        print(f"\n8 Llama MLP blocks, {what} 2:4, decode b1: bf16 dense compile {t_dense:.1f} us")
        print("| gemv configs | us (two timings) | vs dense |")
        print("|---|---|---|")
        for w, ts in times.items():
            cfgs = "table" if w == "table" else "; ".join(f"{k}: {label(c)}" for k, (_, c) in mine.items())
            print(f"| {cfgs} | {ts[0]:.1f} / {ts[1]:.1f} | {t_dense / min(ts):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
