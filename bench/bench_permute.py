"""Sparsity behind a permutation: search time per layer, and the permuted kernels against plain.

    python bench/bench_permute.py            # GPU: search times (GPU and CPU) and kernel times
    python bench/bench_permute.py --cpu      # the search times on the CPU only (no GPU needed)
    python bench/bench_permute.py --cpu --threads 1   # ... with torch on one thread

1. Search time (formats/permute.find_permutation, default budget 2 s) for one 14336x4096 bf16
   layer: 64x64 blocks with 90% zero, rows and columns scrambled; magnitude 2:4, columns
   scrambled; a random dense weight (refused by the early exits); a near-miss 2:4 weight (one row
   with three nonzeros in one group: no order is 2:4, refused at the budget). Median of 3, with
   the weight on the CPU (torch threads printed) and, with a GPU, on the GPU.
2. Kernel times (GPU, CUDA graph replays under do_bench, L2 flushed, us): 14336x4096, 64x64
   blocks, 90% zero, at M = 1, 16, 8192, in one run: dense F.linear on the scrambled weight;
   the block kernel on the weight as if stored unscrambled ("plain"); on the scrambled weight
   with x gathered in the kernel and the output columns mapped ("x_index + out_index"); with
   the output columns mapped only ("out_index", the cost of P alone); and with x gathered by a
   separate index_select before the kernel ("gather x first"); and with both orders as passes of
   their own, x gathered before and the output's columns after ("both gathered in passes", what
   the graph runs where neither pass joins a neighbouring kernel). The block kernel runs without
   its row check (guard=False) in every column, so the numbers are the kernels' own. Also the 2:4
   gemv layout at M = 1: plain, with x_index, and with x gathered first.
3. Compiled (GPU, torch.compile(backend="sparse") under mode="reduce-overhead", plain calls of the
   compiled module, us; the dispatcher times and picks as for any model): the 14336x4096 block
   layer (64x64, 90% zero) stored scrambled (rows and columns) against the same weight unscrambled
   and against dense (torch.compile of the scrambled layer, same mode), at M = 1, 16, 8192; the 2:4
   layer of that shape with its columns scrambled against plain 2:4, at M = 1.
4. ViT-B/16 batch 64 (timm, if importable), MLP weights 90% zero in 64x64 blocks, reduce-overhead:
   unscrambled; the hidden units reordered alike in fc1 and fc2 (the model computes the same: the
   orders agree and neither kernel permutes); every MLP weight scrambled on its own (rows and
   columns: fc1 gathers x and maps its outputs, fc2 maps its outputs); dense.

    python bench/bench_permute.py --sections compiled,vit     # only those (search, kernels, compiled, vit)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from sparse_inductor import prune
from sparse_inductor.bench import _bench, _bench_gpu, _bench_settled
from sparse_inductor.formats import compress_24, compress_block, to_gemv_layout
from sparse_inductor.formats import permute as pm
from sparse_inductor.prune import prune_24_, prune_blocks_, scramble_
from sparse_inductor.report import LayerDecision, collect

N, K, B, SPARSITY = 14336, 4096, 64, 0.9


def weights(device):
    """(name, weight as the model holds it) for the search table."""
    g = torch.Generator().manual_seed(0)
    blk = prune_blocks_(torch.randn(N, K, generator=g), B, SPARSITY)
    w24 = prune_24_(torch.randn(N, K, generator=g))
    near = w24.clone()
    row = near[0].view(-1, 4)
    row[0, (row[0] == 0).nonzero()[0]] = 1.0  # three nonzeros in group 0 ...
    row[1, (row[1] != 0).nonzero()[0]] = 0.0  # ... one in group 1: still K/2 in the row
    out = [("block 64x64, 90% zero, rows+cols scrambled", scramble_(blk, rows=True, seed=1)),
           ("2:4, columns scrambled", scramble_(w24, rows=False, seed=2)),
           ("dense (random)", torch.randn(N, K, generator=g)),
           ("near-miss 2:4 (no order exists)", scramble_(near, rows=False, seed=3))]
    return [(name, w.to(device=device, dtype=torch.bfloat16)) for name, w in out]


def search_table(devices):
    print("\n### Permutation search, one 14336x4096 bf16 layer (find_permutation, budget 2 s)\n")
    print("| weight | device | result | seconds (median of 3) |")
    print("|---|---|---|---|")
    reasons = []
    for device in devices:
        where = (f"CPU ({torch.get_num_threads()} threads)" if device == "cpu"
                 else torch.cuda.get_device_name())
        for name, w in weights(device):
            times, res = [], None
            for _ in range(3):
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = pm.find_permutation(w)  # no cache: every run searches
                if device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            what = res.pattern + (f" {res.block}x{res.block} {res.block_density:.1%}" if res.pattern == "block" else "")
            print(f"| {name} | {where} | {what} | {statistics.median(times):.2f} |", flush=True)
            reasons.append(f"- {name}, {where}: {res.reason}")
    print("\n" + "\n".join(reasons))


def kernel_table():
    from sparse_inductor.bench import _bench, _graphed
    from sparse_inductor.lowering.triton_24 import sp24_linear
    from sparse_inductor.lowering.triton_block import block_linear

    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(0)
    wp = prune_blocks_(torch.randn(N, K, generator=g), B, SPARSITY).to(dev, dt)  # block-sparse as stored
    rows, cols = torch.randperm(N, generator=g).to(dev), torch.randperm(K, generator=g).to(dev)
    ws = torch.empty_like(wp)
    ws[rows] = wp
    ws[:, cols] = ws.clone()  # the model's weight: ws[rows][:, cols] = wp
    fmt = compress_block(wp, B)
    xi, oi = cols.to(torch.int32).contiguous(), rows.to(torch.int32).contiguous()
    print(f"\n### Block kernel, {N}x{K}, {B}x{B} blocks, {SPARSITY:.0%} zero (guard off), us\n")
    back = torch.argsort(rows)  # (y = the kernel's output in its rows' order [:, back])
    print("| M | dense (scrambled W) | plain | x_index + out_index | out_index | gather x first + out_index "
          "| both gathered in passes |")
    print("|---|---|---|---|---|---|---|")
    for m in (1, 16, 8192):
        x = torch.randn(m, K, device=dev, dtype=dt)
        runs = {
            "dense": lambda: F.linear(x, ws),
            "plain": lambda: block_linear(x, *fmt, None, N, K, guard=False),
            "both": lambda: block_linear(x, *fmt, None, N, K, guard=False, x_index=xi, out_index=oi),
            "out": lambda: block_linear(x, *fmt, None, N, K, guard=False, out_index=oi),
            "first": lambda: block_linear(x.index_select(1, cols), *fmt, None, N, K, guard=False, out_index=oi),
            "passes": lambda: block_linear(x.index_select(1, cols), *fmt, None, N, K, guard=False).index_select(1, back),
        }
        ref = F.linear(x.float(), ws.float())
        for name in ("both", "passes"):
            err = ((runs[name]().float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (name, err)  # the permuted layer computed (bf16 output: ~2^-8 relative)
        with torch.no_grad():
            t = {k: _bench(_graphed(f)) for k, f in runs.items()}
        print(f"| {m} | {t['dense']:.1f} | {t['plain']:.1f} | {t['both']:.1f} | {t['out']:.1f} | {t['first']:.1f} | "
              f"{t['passes']:.1f} |",
              flush=True)
    w24 = prune_24_(torch.randn(N, K, generator=g)).to(dev, dt)
    vm = to_gemv_layout(*compress_24(w24))
    x = torch.randn(1, K, device=dev, dtype=dt)
    with torch.no_grad():
        plain = _bench(_graphed(lambda: sp24_linear(x, *vm)))
        perm = _bench(_graphed(lambda: sp24_linear(x, *vm, x_index=xi)))
        first = _bench(_graphed(lambda: sp24_linear(x.index_select(1, cols), *vm)))
    print(f"\n2:4 gemv layout, M = 1, {N}x{K}: plain {plain:.1f} us, x_index {perm:.1f} us, "
          f"x gathered first {first:.1f} us")


def _compiled(model, x, sparse: bool, options=None):
    """(GPU us, call us, output, the decisions) of model compiled under mode="reduce-overhead" with
    backend="sparse" (sparse; `options` added) or plain Inductor. GPU: one call's GPU time with its
    host time hidden (bench._bench_gpu); call: do_bench of a plain call, the least of three medians
    (the host time counts where the GPU waits for it)."""
    torch._dynamo.reset()
    with torch.no_grad(), collect() as sink:
        c = (torch.compile(model, backend="sparse", options={**(options or {}), "mode": "reduce-overhead"}) if sparse
             else torch.compile(model, mode="reduce-overhead"))
        out = c(x).clone()  # (a CUDA graph's output is overwritten by the next replay)
        c(x)
        t = _bench_settled(lambda: c(x))
        gpu = _bench_gpu(lambda: c(x))
    torch._dynamo.reset()
    return gpu, t, out, [d for d in sink if isinstance(d, LayerDecision)]


def _pair(t: tuple) -> str:
    return f"{t[0]:.1f} / {t[1]:.1f}"


def _ratios(num: tuple, den: tuple) -> str:
    return f"{num[0] / den[0]:.2f}x / {num[1] / den[1]:.2f}x"


def _linear(w: torch.Tensor) -> torch.nn.Module:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.randn(w.shape[0], device=w.device, dtype=w.dtype))
    return lin.eval()


def _what(decisions) -> str:
    return "; ".join(f"{d.kernel} ({d.permutation or 'no permutation'})" for d in decisions)


def _scrambled_vs_plain(plain, scrambled, x):
    """Dense compile of the scrambled layer, sparse compiles of both, and the scrambled one's error
    against fp64: (dense, plain, plain's decisions, scrambled, its decisions, rel. err); each time
    a (GPU us, call us) pair."""
    *t_dense, _, _ = _compiled(scrambled, x, False)
    *t_plain, _, d_plain = _compiled(plain, x, True)
    *t_s, out, dec = _compiled(scrambled, x, True)
    ref = F.linear(x.double(), scrambled.weight.double(), scrambled.bias.double())
    return t_dense, t_plain, d_plain, t_s, dec, ((out.double() - ref).norm() / ref.norm()).item()


def compiled_table():
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(0)
    wp = prune_blocks_(torch.randn(N, K, generator=g), B, SPARSITY).to(dev, dt)
    plain = _linear(wp)
    scrambled = _linear(scramble_(wp.clone(), rows=True, seed=1))
    print(f"\n### Compiled, mode=\"reduce-overhead\": {N}x{K} linear (+ bias), {B}x{B} blocks {SPARSITY:.0%} zero, us\n")
    print("Each time is GPU / call: one call's GPU time with its host time hidden, and do_bench of a plain call "
          "(the host time counted where the GPU waits for it). \"kernel form\": the scrambled layer compiled "
          "with permute_apply=\"kernel\" (both orders in the kernel's loads and store).\n")
    print("| M | dense compile (scrambled W) | sparse, W unscrambled | sparse, W scrambled | scrambled / unscrambled "
          "| scrambled vs dense | what the scrambled layer ran | kernel form | kernel form vs dense "
          "| rel. err (scrambled, fp64) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in (1, 16, 8192):
        x = torch.randn(m, K, device=dev, dtype=dt)
        t_dense, t_plain, _, t_s, dec, err = _scrambled_vs_plain(plain, scrambled, x)
        *t_k, _, _ = _compiled(scrambled, x, True, {"permute_apply": "kernel"})
        print(f"| {m} | {_pair(t_dense)} | {_pair(t_plain)} | {_pair(t_s)} | {_ratios(t_s, t_plain)} | "
              f"{_ratios(t_dense, t_s)} | {_what(dec)} | {_pair(t_k)} | {_ratios(t_dense, t_k)} | {err:.1e} |", flush=True)
    w24 = prune_24_(torch.randn(N, K, generator=g)).to(dev, dt)
    plain24, scrambled24 = _linear(w24), _linear(scramble_(w24.clone(), rows=False, seed=2))
    x = torch.randn(1, K, device=dev, dtype=dt)
    t_dense, t_plain, d_plain, t_s, dec, err = _scrambled_vs_plain(plain24, scrambled24, x)
    print(f"\n2:4 {N}x{K} (+ bias), M = 1, reduce-overhead, GPU / call us: dense compile {_pair(t_dense)}; plain 2:4 "
          f"{_pair(t_plain)} ({_what(d_plain)}); columns scrambled {_pair(t_s)} ({_what(dec)}; "
          f"{t_plain[0] / t_s[0]:.2f}x / {t_plain[1] / t_s[1]:.2f}x of plain's speed, rel. err {err:.1e})", flush=True)


def _reorder_hidden_(model: torch.nn.Module, seed: int = 0) -> int:
    """Reorder the hidden units of every timm MLP (fc1's rows and bias, fc2's columns) by one random
    order each: the model computes what it did. Returns how many MLPs."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            fc1, fc2 = getattr(mod, "fc1", None), getattr(mod, "fc2", None)
            if isinstance(fc1, torch.nn.Linear) and isinstance(fc2, torch.nn.Linear):
                pi = torch.randperm(fc1.out_features, generator=g).to(fc1.weight.device)
                fc1.weight.copy_(fc1.weight[pi])
                fc1.bias.copy_(fc1.bias[pi])
                fc2.weight.copy_(fc2.weight[:, pi])
                n += 1
    return n


def vit_table():
    try:
        # optional: timm, for the ViT case only
        import timm
    except ImportError:
        print("\nViT-B/16: timm is not installed")
        return
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", pretrained=False).to(dev, dt).eval()
    prune(base, "block", block=64, sparsity=0.9, filter_fn=lambda m, n: ".mlp." in f".{n}.")
    hidden = copy.deepcopy(base)
    _reorder_hidden_(hidden)
    scrambled = copy.deepcopy(base)
    with torch.no_grad():
        for i, (name, mod) in enumerate(scrambled.named_modules()):
            if ".mlp." in f".{name}." and isinstance(mod, torch.nn.Linear):
                scramble_(mod.weight.data, rows=True, seed=i)
    x = torch.randn(64, 3, 224, 224, device=dev, dtype=dt)
    print("\n### ViT-B/16 batch 64, MLP weights 90% zero in 64x64 blocks, mode=\"reduce-overhead\", us\n")
    print("| model | GPU / call us | vs dense | sparse layers | layers that still gather x / map outputs "
          "| rel. err vs dense (same function) |")
    print("|---|---|---|---|---|---|")
    *t_dense, ref, _ = _compiled(base, x, False)
    print(f"| dense compile | {_pair(t_dense)} | 1.00x | - | - | - |", flush=True)
    for name, model in (("unscrambled", base), ("hidden units reordered alike (same function)", hidden),
                        ("each MLP weight scrambled (rows and columns)", scrambled)):
        *t, out, dec = _compiled(model, x, True)
        sparse = sum(d.sparse for d in dec)
        gathers = sum("gathered" in d.permutation for d in dec)
        maps = sum("mapped" in d.permutation for d in dec)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item() if model is not scrambled else None
        print(f"| {name} | {_pair(t)} | {_ratios(t_dense, t)} | {sparse} | {gathers} / {maps} | "
              f"{'-' if err is None else f'{err:.1e}'} |", flush=True)


SECTIONS = ("search", "kernels", "compiled", "vit")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cpu", action="store_true", help="the search times on the CPU only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        p.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import triton

    gpu = torch.cuda.is_available() and not args.cpu
    print(f"{torch.cuda.get_device_name() if gpu else platform.processor() or 'CPU'}, torch {torch.__version__}, "
          f"triton {triton.__version__}, Python {platform.python_version()}, {datetime.date.today().isoformat()}")
    if "search" in sections:
        search_table(["cpu"] + (["cuda"] if gpu else []))
    if gpu and "kernels" in sections:
        kernel_table()
    if gpu and "compiled" in sections:
        compiled_table()
    if gpu and "vit" in sections:
        vit_table()


if __name__ == "__main__":
    main()
