"""The fused block-sparse MLP kernel (lowering/block_mlp.py) against the unfused layers, on the GPU.

    python bench/sweep_block_mlp.py [--shapes 12608x768x3072] [--sparsity 0.9] [--quick]
    python bench/sweep_block_mlp.py --apart "fc1:64/4/1,fc2:128/4/3,skip-off"   (the layers apart only)

Per shape M x D x H (fc1: D -> H with a GELU, fc2: H -> D, 64x64 blocks, `sparsity` of the blocks
zero, lowest-norm blocks pruned as the bench does), bf16, us (do_bench medians of CUDA-graph
replays, L2 flushed):
- dense: the MLP (nn.Linear, GELU, nn.Linear) compiled by Inductor;
- unfused: the same MLP pruned, compiled with backend="sparse" (force, kernel "triton") in the
  default exact mode and with nonfinite="fast";
- fused: the same with options fuse_mlp (forced, and timed by the pass);
- the fused kernel alone: the eager launcher `block_mlp` with the exact path's flag (row_flag, its own reduction
  here; in a model it rides in x's norm) and without (exact=False), for each config of a grid.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn as nn

from profile_models import _profile  # (bench/, beside this script)
from sparse_inductor.bench import _bench, _graphed, header
from sparse_inductor.formats import compress_block
from sparse_inductor.lowering import block_mlp as bm
from sparse_inductor.prune import prune_blocks_
from sparse_inductor.report import LayerDecision, collect


def grid(quick: bool):
    for m, w, s in itertools.product((32, 64, 128), (4, 8), (1, 2) if not quick else (1,)):
        if m == 128 and w == 4 and quick:
            continue
        yield bm.MlpConfig(m, w, s)


def mlp(d: int, h: int, sparsity: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)).cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        for lin in (net[0], net[2]):
            prune_blocks_(lin.weight, 64, sparsity)
    return net


def apart(net, x, specs: str) -> None:
    """The two layers apart (the default build), compiled, under launch configs given as
    "fc1:BLOCK_M/warps/stages" (CONFIGS_SHORT_ROWS' (64, 256) entry: fc1 at 90%) or "fc2:..." (CONFIGS'
    (64, 256) entry), "/sN" appended for flat programs in N M slices, and "skip-off"
    (fuse_mlp.SKIP_HIDDEN False); the table's, skip-off and flat configs in exact and fast mode, the
    others in exact mode; dense compile first. do_bench of a CUDA-graph replay and the
    kernels by the profiler."""
    from sparse_inductor.lowering import triton_block as tb
    from sparse_inductor.passes import fuse_mlp

    base1, base2 = tb.CONFIGS_SHORT_ROWS[(64, 256)], tb.CONFIGS[(64, 256)]
    print("\n| build | mode | us | kernels (us each) |\n|---|---|---|---|")
    for spec in ["dense", "table", *specs.split(",")]:
        c1, c2, skip = base1, base2, True
        if spec.startswith(("fc1:", "fc2:")):  # BLOCK_M/warps/stages, and /sN: flat programs in N M slices
            parts = spec[4:].split("/")
            split = int(parts.pop()[1:]) if parts[-1].startswith("s") else None
            cfg = tb.BlockLinearConfig(*(int(v) for v in parts), split=split)
            c1, c2 = (cfg, c2) if spec.startswith("fc1:") else (c1, cfg)
        elif spec == "skip-off":
            skip = False
        tb.CONFIGS_SHORT_ROWS[(64, 256)], tb.CONFIGS[(64, 256)], fuse_mlp.SKIP_HIDDEN = c1, c2, skip
        try:
            both = spec in ("table", "skip-off") or "/s" in spec
            for mode in ("exact", "fast") if both else ("exact",) if spec != "dense" else ("-",):
                torch._dynamo.reset()
                f = torch.compile(net) if spec == "dense" else torch.compile(net, backend="sparse", options={
                    "force": True, "kernel": "triton", "nonfinite": mode, "fx_cache": False})
                with torch.no_grad():
                    f(x)
                    t = _bench(_graphed(lambda: f(x)))
                    ks = _profile(lambda: f(x), iters=5)[2]
                text = ", ".join(f"{n[:40]} {us:.1f}" for n, _, us in ks[:4])
                print(f"| {spec} | {mode} | {t:.1f} | {text} |", flush=True)
        except Exception as e:
            print(f"| {spec} | - | {type(e).__name__}: {str(e)[:80]} | |", flush=True)
        finally:
            tb.CONFIGS_SHORT_ROWS[(64, 256)], tb.CONFIGS[(64, 256)], fuse_mlp.SKIP_HIDDEN = base1, base2, True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="12608x768x3072", help="M x D x H, comma-separated")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--apart", default=None, metavar="SPECS",
                   help='only the layers apart under these configs, e.g. "fc1:64/4/1,fc2:128/4/3,skip-off"')
    a = p.parse_args(argv)
    print(header())
    for shape in a.shapes.split(","):
        m, d, h = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        net = mlp(d, h, a.sparsity)
        x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
        if a.apart is not None:
            print(f"\n{m}x{d}x{h}, {a.sparsity:.0%} zero 64x64 blocks, GELU, the layers apart")
            apart(net, x, a.apart)
            continue
        times, notes = {}, {}
        with torch.no_grad():
            ref = net(x)
            for name, kw in (("dense compile", {}),
                             ("unfused exact", {"backend": "sparse", "options": {"force": True, "kernel": "triton"}}),
                             ("unfused fast", {"backend": "sparse", "options": {"force": True, "kernel": "triton",
                                                                                 "nonfinite": "fast"}}),
                             ("fused exact (forced)", {"backend": "sparse", "options": {
                                 "force": True, "kernel": "triton", "fuse_mlp": True}}),
                             ("fused fast (forced)", {"backend": "sparse", "options": {
                                 "force": True, "kernel": "triton", "nonfinite": "fast", "fuse_mlp": True}}),
                             ("fuse_mlp (dispatcher, timed fusion)", {"backend": "sparse", "options": {"fuse_mlp": True}})):
                torch._dynamo.reset()
                f = torch.compile(net, **kw)
                with collect() as sink:
                    f(x)
                times[name] = _bench(_graphed(lambda: f(x)))
                notes[name] = [d.line() for d in sink if isinstance(d, LayerDecision)]
            w1, w2 = compress_block(net[0].weight, 64), compress_block(net[2].weight, 64)
            args1 = (w1.blocks, w1.row_ptr, w1.col_idx)
            args2 = (w2.blocks, w2.row_ptr, w2.col_idx, w2.row_order)
            b1 = net[0].bias
            safe = bm.safe_bound(w1.blocks, w1.row_ptr, b1, x.dtype)
            y = bm.block_mlp(x, args1, b1, args2, h, d, "gelu", safe=safe) + net[2].bias
            err = (y.float() - ref.float()).abs().max().item()
            times["row_flag alone"] = _bench(_graphed(lambda: bm.row_flag(x)))
            res = []
            for cfg in grid(a.quick):
                try:
                    t_exact = _bench(_graphed(lambda: bm.block_mlp(x, args1, b1, args2, h, d, "gelu", safe=safe,
                                                                   config=cfg)), rep=50)
                    t_fast = _bench(_graphed(lambda: bm.block_mlp(x, args1, b1, args2, h, d, "gelu", exact=False,
                                                              safe=safe, config=cfg)), rep=50)
                except Exception as e:
                    print(f"    {cfg}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                res.append((t_fast, t_exact, cfg))
        print(f"\n{m}x{d}x{h}, {a.sparsity:.0%} zero 64x64 blocks, GELU; fused vs dense max |diff| {err:.3g}; "
              f"safe bound {safe:.3g}")
        print("\n| build | us |\n|---|---|")
        for k, v in times.items():
            print(f"| {k} | {v:.1f} |")
        print("\n| fused config (BLOCK_M, warps, stages) | no flag | with flag (+ row_flag kernel) |\n|---|---|---|")
        for t_fast, t_exact, cfg in sorted(res, key=lambda r: r[0]):
            print(f"| {cfg.block_m}/{cfg.num_warps}/{cfg.num_stages} | {t_fast:.1f} | {t_exact:.1f} |", flush=True)
        print("\ndecisions, fuse_mlp build:\n" + "\n".join(notes["fuse_mlp (dispatcher, timed fusion)"]))
        print("decisions, fused exact (forced):\n" + "\n".join(notes["fused exact (forced)"]))


if __name__ == "__main__":
    main()
