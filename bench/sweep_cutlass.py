"""Sweep the CUTLASS sm90 2:4 kernel's configs on the GPU (for cutlass_24.CONFIG_TABLE).

    python bench/sweep_cutlass.py                      (the table's configs for each M's bucket)
    python bench/sweep_cutlass.py --shapes 14336x4096 --ms 16,64 --configs "128x16x128_1x1_warpspecialized"
    python bench/sweep_cutlass.py --ms 16,64 --configs "16=64x16x256_1x1_pingpong;64=128x32x128_1x1_pingpong"
    python bench/sweep_cutlass.py --build-only         (compile the libraries into the disk cache)

For every config: builds the libraries in parallel (nvcc subprocesses, runtime/cutlass.build_many),
checks each on a small input against the fp64 reference within cutlass_24.error_bound (a config
that fails is reported and not timed), then times y = x @ W^T + bias for each shape (N x K) and M
as CUDA-graph replays (medians of triton.testing.do_bench, L2 flushed) against dense F.linear in
the same process, and prints a markdown table per shape and a summary of the best config per
(shape, M). The header names device, versions, date. --json writes every time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from sparse_inductor.formats import cutlass_sm90 as cf
from sparse_inductor.lowering import cutlass_24 as c24
from sparse_inductor.runtime import cutlass as rt

SHAPES = "14336x4096,4096x14336,4096x4096,11008x4096"
MS = "16,32,64,128,256,2048,8192"


def parse_config(text: str) -> c24.CutlassConfig:
    """'128x16x128_1x1_warpspecialized[_s4][_streamk]' (CutlassConfig.short) -> the config."""
    parts = text.split("_")
    tile = tuple(int(v) for v in parts[0].split("x"))
    cm, cn = (int(v) for v in parts[1].split("x"))
    stages = next((int(p[1:]) for p in parts[3:] if p.startswith("s") and p[1:].isdigit()), None)
    return c24.CutlassConfig(tile, (cm, cn, 1), parts[2], stages=stages,
                             scheduler="streamk" if "streamk" in parts[3:] else "persistent")


def configs_by_m(ms: list[int], dtype: str, configs: str) -> dict[int, tuple]:
    """--configs: 'table' (each M's bucket in cutlass_24.configs_for), configs for every M
    ('a,b'), or configs per M ('16=a,b;64=c'; an M not named: its table's)."""
    if configs == "table":
        return {m: c24.configs_for(m, dtype) for m in ms}
    if "=" not in configs:
        chosen = tuple(parse_config(c.strip()) for c in configs.split(",") if c.strip())
        return {m: chosen for m in ms}
    per_m = {}
    for part in configs.split(";"):
        if part.strip():
            m, _, names = part.partition("=")
            per_m[int(m)] = tuple(parse_config(c.strip()) for c in names.split(",") if c.strip())
    unknown = sorted(set(per_m) - set(ms))
    if unknown:
        raise SystemExit(f"--configs names M = {unknown}, not among --ms {ms}")
    return {m: per_m.get(m) or c24.configs_for(m, dtype) for m in ms}


def kernels(ms: list[int], dtype: str = "bf16", configs: str = "table") -> list[c24.CutlassKernel]:
    """The kernels the sweep runs (the dispatcher's form: out = the operand dtype, a bias slot)."""
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    seen = []
    for cands in configs_by_m(ms, dtype, configs).values():
        for cfg in cands:
            k = c24.kernel_for(tdt, c24.params_of(cfg))
            if k not in seen:
                seen.append(k)
    return seen


def random_24(n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, device="cuda", generator=gen)
    keep = torch.rand(n, k // 4, 4, device="cuda", generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device="cuda").scatter_(-1, keep, True)
    return (w * mask.reshape(n, k)).to(dtype)


def check(k: c24.CutlassKernel, bias: bool) -> str:
    """'' where the kernel is within error_bound of fp64 on a small input (several M), else why not."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    n, kd = 256, 512
    w = random_24(n, kd, k.torch_dtype, gen)
    values, meta = cf.compress(w, k.config.tile[2])
    lib = c24.library(k)
    for m in (1, 17, 200):
        x = torch.randn(m, kd, device="cuda", generator=gen).to(k.torch_dtype)
        b = torch.randn(n, device="cuda", generator=gen).to(k.torch_dtype) if bias else None
        extra = {"bias": b} if bias else {}
        try:
            y = lib(x, values, meta, n, **extra)
        except Exception as e:  # refused (rt.CutlassCallError) or failed: reported, not timed
            return f"failed at M={m}: {type(e).__name__}: {str(e)[:200]}"
        ref = c24.reference(k, x, w, **extra)
        err = (y.double() - ref).abs() - c24.error_bound(k, x, w, ref, **extra)
        if torch.isnan(y).any() or err.max().item() > 0:
            return f"wrong at M={m} (max excess {err.max().item():.3g})"
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="N x K pairs (out x in features), comma-separated")
    ap.add_argument("--ms", default=MS, help="token counts, comma-separated")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--configs", default="table",
                    help="'table', CutlassConfig.short() strings comma-separated, or per M: '16=a,b;64=c'")
    ap.add_argument("--no-bias", action="store_true")
    ap.add_argument("--splits", default=",".join(map(str, c24.STREAMK_SPLITS)),
                    help="splits timed for stream-K configs (0: stream-K, >1: split-K)")
    ap.add_argument("--build-only", action="store_true", help="compile the libraries and stop (no GPU needed)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel nvcc builds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ms = [int(v) for v in args.ms.split(",")]
    splits_list = [int(v) for v in args.splits.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ks = kernels(ms, args.dtype, args.configs)
    start = time.perf_counter()
    built = c24.build(ks, jobs=args.jobs)
    failed = {k: p for k, p in built.items() if isinstance(p, Exception)}
    print(f"built {len(ks) - len(failed)} of {len(ks)} libraries in {time.perf_counter() - start:.0f} s", flush=True)
    for k, e in failed.items():
        print(f"  {k.config.short()}: build failed: {str(e).splitlines()[-1][:300]}")
    if args.build_only:
        return 1 if failed else 0

    from sparse_inductor.bench import _bench, _graphed, header

    bias = not args.no_bias
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    wrong = {}
    for k in ks:
        if k not in failed:
            why = check(k, bias)
            if why:
                wrong[k] = why
                print(f"  {k.config.short()}: {why}: not timed")
    ver = rt.nvcc_version()
    print(f"\n{header()}; nvcc {ver[2] if ver else '?'}, CUTLASS {rt.cutlass_version()}; {args.dtype}, "
          f"{'with' if bias else 'no'} bias; y = x @ W^T (+ b), W 2:4\n")
    by_m = configs_by_m(ms, args.dtype, args.configs)
    rows, best = [], []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, kd in shapes:
        w = random_24(n, kd, tdt, gen)
        b = torch.randn(n, device="cuda", generator=gen).to(tdt) if bias else None
        comp = {t: cf.compress(w, t) for t in (64, 128)}
        print(f"### {n} x {kd}\n\n| M | dense us | config | us | vs dense |\n|---|---|---|---|---|")
        for m in ms:
            x = torch.randn(m, kd, device="cuda", generator=gen).to(tdt)
            dense = _bench(_graphed(lambda: F.linear(x, w, b)))
            top = None
            for cfg, splits in ((c, s) for c in by_m[m] for s in (splits_list if c.scheduler == "streamk" else (1,))):
                k = c24.kernel_for(tdt, c24.params_of(cfg))
                name = cfg.short() + (f" splits={splits}" if cfg.scheduler == "streamk" else "")
                if k in failed or k in wrong:
                    rows.append(dict(n=n, k=kd, m=m, config=name, us=None, dense_us=dense))
                    continue
                lib = c24.library(k)
                values, meta = comp[k.layout_key[1]]
                out = torch.empty(m, n, dtype=tdt, device="cuda")
                try:
                    t = _bench(_graphed(lambda: lib(x, values, meta, n, bias=b, out=out, splits=splits)))
                except Exception as e:  # a config the kernel refuses at this shape: reported, not fatal
                    print(f"| {m} | {dense:.1f} | {name} | failed: {str(e)[:80]} | - |")
                    continue
                rows.append(dict(n=n, k=kd, m=m, config=name, us=t, dense_us=dense))
                print(f"| {m} | {dense:.1f} | {name} | {t:.1f} | {dense / t:.2f}x |", flush=True)
                if top is None or t < top[1]:
                    top = (name, t)
            if top:
                best.append((n, kd, m, dense, *top))
        print()
    print("### Best config per shape and M\n\n| N x K | M | dense us | best | us | vs dense |\n|---|---|---|---|---|---|")
    for n, kd, m, dense, cfg, t in best:
        print(f"| {n}x{kd} | {m} | {dense:.1f} | {cfg} | {t:.1f} | {dense / t:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header(), "rows": rows, "wrong": {k.config.short(): v for k, v in wrong.items()},
                       "failed": {k.config.short(): str(e)[-500:] for k, e in failed.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
