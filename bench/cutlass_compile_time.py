"""Compile time of a model's CUTLASS kernels: 8 Llama MLP blocks (4096 / 14336, every weight 2:4),
batch 16, compiled with backend="sparse", the CUTLASS family a candidate, mode="reduce-overhead".
Cold: an empty library cache (every candidate library of the layers built in one parallel build);
then the same compile again in this process after torch._dynamo.reset() (libraries loaded, the
dispatcher's timings in its disk cache). With --cache-dir of an earlier run: warm, a new process
finding the libraries on disk. Prints the wall time of each first call, the "CUTLASS kernels
ready" seconds the family logs, and dense torch.compile's first call in the same mode beside.

    python bench/cutlass_compile_time.py [--batch 16] [--blocks 8] [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import torch


class _Ready(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        msg = record.getMessage()
        if "CUTLASS kernels" in msg:
            self.lines.append(msg)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--cache-dir", default=None, help="the library cache (default: a new, empty folder)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("cutlass_compile_time: needs a CUDA GPU")
    cold = a.cache_dir or tempfile.mkdtemp(prefix="cutlass_cold_")
    os.makedirs(cold, exist_ok=True)
    state = "warm, a new process (libraries on disk)" if os.listdir(cold) else "cold (empty library cache)"
    os.environ["SPARSE_INDUCTOR_CUTLASS_CACHE_DIR"] = cold  # read at each build: set before the compile
    from sparse_inductor.bench import LlamaMLP, header
    from sparse_inductor.prune import prune

    print(header(), f"; {os.cpu_count()} CPU cores", flush=True)
    handler = _Ready()
    logger = logging.getLogger("sparse_inductor")
    logger.addHandler(handler)
    stream = logging.StreamHandler(sys.stderr)  # each library's compile as it runs, with the time
    stream.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(stream)
    logger.setLevel(logging.INFO)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[LlamaMLP() for _ in range(a.blocks)]).to("cuda", torch.bfloat16).eval()
    prune(model, "2:4")
    x = torch.randn(a.batch, 4096, device="cuda", dtype=torch.bfloat16)
    print(f"\n| {a.blocks} Llama MLP blocks, batch {a.batch} | first call s | CUTLASS libraries |\n|---|---|---|")
    torch._dynamo.reset()
    with torch.no_grad():
        dense = torch.compile(model, mode="reduce-overhead")
        t0 = time.perf_counter()
        dense(x)
        torch.cuda.synchronize()
        t_dense = time.perf_counter() - t0
    for what in (state, "again in this process (libraries loaded)"):
        torch._dynamo.reset()
        handler.lines.clear()
        with torch.no_grad():
            c = torch.compile(model, backend="sparse", options={"experimental": ("cutlass",), "mode": "reduce-overhead"})
            t0 = time.perf_counter()
            c(x)
            torch.cuda.synchronize()
            t = time.perf_counter() - t0
        print(f"| {what} | {t:.1f} | {'; '.join(handler.lines) or '-'} |", flush=True)
    print(f"| dense torch.compile, same mode | {t_dense:.1f} | - |")
    print(f"\n({len(os.listdir(cold))} files in the library cache {cold})")


if __name__ == "__main__":
    main()
