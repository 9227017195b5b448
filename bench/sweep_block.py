"""Sweep the block-sparse kernel's launch configs on the GPU (for triton_block.CONFIGS).

    python bench/sweep_block.py [--quick]
    python bench/sweep_block.py --compiled "bm128 w4 s2; bm64 w4 s1" --act gelu --nk 3072x768 --ms 12608 --sparsities 0.9

Times `block_linear(..., guard=False, config=cfg)` as CUDA-graph replays (do_bench medians, L2
flushed) for the decode and prefill shapes of the bench (N=14336, K=4096, 64x64 blocks, 90% and
80% zero), every config in the grid below, and prints per case: dense F.linear, the table's
config, and the five fastest configs. Weights pruned like the bench (lowest-norm blocks zeroed:
block rows hold binomially many blocks). "dense floor" is F.linear on a dense weight of the same
bytes (N * density rows): what streaming that much weight costs. --compiled times configs as the
compiled template runs them (for CONFIGS_SHORT_ROWS: docs/performance.md).
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from sparse_inductor.bench import _bench, _graphed, header
from sparse_inductor.formats import compress_block
from sparse_inductor.lowering import triton_block as tb
from sparse_inductor.prune import prune_blocks_


def grid(m: int, b: int, quick: bool):
    if m <= 16:
        for bn, w, s in itertools.product((16, 32, 64), (2, 4), (2, 3, 4, 5) if not quick else (3, 5)):
            yield tb.BlockLinearConfig(16, w, s, bn)
    else:
        for bm, w, s in itertools.product((64, 128, 256), (4, 8), (2, 3, 4) if not quick else (3, 4)):
            if bm == 256 and w == 4:
                continue
            yield tb.BlockLinearConfig(bm, w, s, 64)


def _parse_config(text: str) -> tb.BlockLinearConfig:
    """"bm128 w4 s3" (block_n: "bn32") -> a BlockLinearConfig."""
    f = {t.rstrip("0123456789"): int(t[len(t.rstrip("0123456789")):]) for t in text.split()}
    return tb.BlockLinearConfig(f["bm"], f["w"], f["s"], f.get("bn"))


def _name(c: tb.BlockLinearConfig) -> str:
    return f"bm{c.block_m} w{c.num_warps} s{c.num_stages}" + (f" bn{c.block_n}" if c.block_n else "")


def compiled_experiment(nks, ms, sparsities, act: str, configs: list) -> None:
    """Configs as the compiled template runs them, with an epilogue: nn.Linear (+ GELU with
    act="gelu") block-pruned, compiled with backend="sparse" (force, kernel "triton", nonfinite
    "fast": the template alone) once per config put in CONFIGS for its (block, M bucket), FX cache
    off; against the dense compile of the same module. The epilogue changes what is fastest: on
    ViT-B's fc1 the GELU took 48.7 -> 88.7 us in the template (H200, docs/performance.md)."""
    import torch.nn as nn

    dev, dt, b = "cuda", torch.bfloat16, 64
    print(f"\ncompiled nn.Linear{' + GELU' if act == 'gelu' else ''}, 64x64 blocks (us):\n")
    print("| N x K | M | zero blocks | dense compile | config | compiled us | vs dense |")
    print("|---|---|---|---|---|---|---|")
    for (n, k), sparsity, m in itertools.product(nks, sparsities, ms):
        torch.manual_seed(0)
        lin = nn.Linear(k, n, device=dev, dtype=dt)
        with torch.no_grad():
            prune_blocks_(lin.weight, b, sparsity)
        mod = nn.Sequential(lin, nn.GELU()) if act == "gelu" else nn.Sequential(lin)
        x = torch.randn(m, k, device=dev, dtype=dt)
        with torch.no_grad():
            torch._dynamo.reset()
            dense_c = torch.compile(mod.eval())
            dense = _bench(_graphed(lambda: dense_c(x)), rep=100)
            key = (b, tb.m_bucket(m))
            per_row = (1 - sparsity) * (k // b)
            saved = tb.pick_config(b, m, dt, per_row)  # the table's (or the short-rows table's) entry
            tables = (tb.CONFIGS, tb.CONFIGS_SHORT_ROWS) if key in tb.CONFIGS_SHORT_ROWS else (tb.CONFIGS,)
            originals = [t[key] for t in tables]
            for cfg in [saved, *configs]:
                for t in tables:
                    t[key] = cfg
                try:
                    torch._dynamo.reset()
                    ours = torch.compile(mod.eval(), backend="sparse", options={
                        "force": True, "kernel": "triton", "nonfinite": "fast", "fx_cache": False})
                    ours(x)
                    t = _bench(_graphed(lambda: ours(x)), rep=100)
                except Exception as e:
                    print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
                    continue
                finally:
                    for t, c in zip(tables, originals):
                        t[key] = c
                name = ("table " if cfg is saved else "") + _name(cfg)
                print(f"| {n}x{k} | {m} | {sparsity:.0%} | {dense:.1f} | {name} | {t:.1f} | {dense / t:.2f}x |",
                      flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ms", default="1,16,8192")
    p.add_argument("--sparsities", default="0.9,0.8")
    p.add_argument("--nk", default="14336x4096", help="weight shapes NxK, comma-separated (ViT-B MLP: 3072x768,768x3072)")
    p.add_argument("--compiled", default=None, metavar="CONFIGS",
                   help="instead of the sweep: these configs ('bm128 w4 s2; bm64 w4 s1', ';'-separated) and the "
                        "table's, as the compiled template runs them (--act gelu: with a GELU epilogue)")
    p.add_argument("--act", choices=("none", "gelu"), default="none")
    args = p.parse_args(argv)
    if args.compiled is not None:
        print(header())
        return compiled_experiment([tuple(int(v) for v in s.split("x")) for s in args.nk.split(",")],
                                   [int(s) for s in args.ms.split(",")], [float(s) for s in args.sparsities.split(",")],
                                   args.act, [_parse_config(t) for t in args.compiled.split(";") if t.strip()])
    print(header())
    dev, dt, b = "cuda", torch.bfloat16, 64
    print("\n| N x K | M | zero blocks | blocks per row (mean/max) | dense F.linear | dense floor | table config | table us "
          "| best configs (us) | best vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (n, k), sparsity in itertools.product([tuple(map(int, s.split("x"))) for s in args.nk.split(",")],
                                              [float(s) for s in args.sparsities.split(",")]):
        torch.manual_seed(0)
        w = prune_blocks_(torch.randn(n, k, device=dev, dtype=dt), b, sparsity)
        bs = compress_block(w, b)
        per_row = (bs.row_ptr[1:] - bs.row_ptr[:-1]).float()
        rows = f"{per_row.mean().item():.1f}/{int(per_row.max().item())}"
        floor_w = torch.randn(max(16, round(n * (1 - sparsity) / 16) * 16), k, device=dev, dtype=dt)
        for m in (int(s) for s in args.ms.split(",")):
            x = torch.randn(m, k, device=dev, dtype=dt)
            dense = _bench(_graphed(lambda: F.linear(x, w)))
            floor = _bench(_graphed(lambda: F.linear(x, floor_w)))
            table = tb.pick_config(b, m, dt)
            results = []
            for cfg in [table, *grid(m, b, args.quick)]:
                try:
                    t = _bench(_graphed(lambda: tb.block_linear(x, *bs, None, n, k, guard=False, config=cfg)), rep=50)
                except Exception as e:  # e.g. out of shared memory
                    print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
                    continue
                results.append((t, cfg))
            t_table = results[0][0] if results and results[0][1] == table else float("nan")
            best = sorted(results, key=lambda r: r[0])[:5]
            txt = "; ".join(f"{_name(c)}: {t:.1f}" for t, c in best)
            print(f"| {n}x{k} | {m} | {sparsity:.0%} | {rows} | {dense:.1f} | {floor:.1f} | {tuple(table)} | {t_table:.1f} | {txt} | "
                  f"{dense / best[0][0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
