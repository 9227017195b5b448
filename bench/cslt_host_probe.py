"""Host time of cuSPARSELt calls behind a deep GPU queue, and of compiled models (H100 probe).

Run on the GPU machine: `python bench/cslt_host_probe.py`. This is the measurement behind the
dispatcher rule "outside CUDA graphs, add cuSPARSELt's host time to its GPU time"
(docs/decisions.md, docs/benchmarks.md run C): it times, per call, our plan path, the custom op,
torch._cslt_sparse_mm, and a compiled 8-linear model dense vs forced cuSPARSELt, each with ~100 ms
of GPU work queued ahead so that the host time is not hidden.
"""
import time

import torch
import torch.nn as nn

import sparse_inductor
from sparse_inductor.lowering import cusparselt
from sparse_inductor.prune import prune_24_
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
def host_under_sleep(f, reps=10):
    f(); torch.cuda.synchronize()
    torch.cuda._sleep(int(2e8))  # ~100 ms of GPU work queued ahead
    t0 = time.perf_counter()
    for _ in range(reps): f()
    t = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize(); return t
m = 8224
ws = [prune_24_(torch.randn(5120, 1280, device=dev, dtype=dt)) for _ in range(2)]
wcs = [cusparselt.compress(w) for w in ws]; bs = [torch.randn(5120, device=dev, dtype=dt) for _ in range(2)]
x = torch.randn(m, 1280, device=dev, dtype=dt)
print("same plan      host us/call under sleep: %.1f" % host_under_sleep(lambda: cusparselt.linear(x, wcs[0], bs[0], 5120, 1280, 17)))
print("two plans alt. host us/call under sleep: %.1f" % host_under_sleep(lambda: (cusparselt.linear(x, wcs[0], bs[0], 5120, 1280, 17), cusparselt.linear(x, wcs[1], bs[1], 5120, 1280, 17))))
op = torch.ops.sparse_inductor.linear_cslt.default
print("op             host us/call under sleep: %.1f" % host_under_sleep(lambda: op(x, wcs[0], bs[0], 5120, 1280, 17, 1)))
print("torch cslt     host us/call under sleep: %.1f" % host_under_sleep(lambda: torch._cslt_sparse_mm(wcs[0], x.t(), bs[0], transpose_result=True, alg_id=17)))
model = nn.Sequential(*[nn.Sequential(nn.Linear(1280, 5120), nn.GELU(), nn.Linear(5120, 1280)) for _ in range(4)]).to(dev, dt).eval()
sparse_inductor.prune(model, "2:4")
xin = torch.randn(m, 1280, device=dev, dtype=dt)
with torch.no_grad():
    for name, opts in [("dense", None), ("cslt", {"force": True, "kernel": "cusparselt"})]:
        torch._dynamo.reset()
        f = torch.compile(model, backend="inductor") if opts is None else torch.compile(model, backend="sparse", options=opts)
        for _ in range(3): f(xin)
        print("compiled %-5s 8 linears: host us/forward under sleep %.1f" % (name, host_under_sleep(lambda: f(xin), 5)))
