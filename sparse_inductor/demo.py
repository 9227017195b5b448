"""Demo: `python -m sparse_inductor.demo` compiles a small model with 2:4, block-sparse and dense
linears through `torch.compile(model, backend="sparse")`, prints what the compiler decided for
each layer, and how far the outputs are from eager.

On a CPU the sparse kernels are never faster than dense, so the demo passes options force=True
to show the rewrite (the reference kernels run); on a GPU it also shows the default decisions.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparse_inductor


class Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Demo(nn.Module):
    def __init__(self, d: int = 256, h: int = 1024):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, h) for _ in range(3)])
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Demo().to(device, dtype).eval()
    # blocks.0: 2:4; blocks.1: 90% zero 64x64 blocks; blocks.2 and head: dense
    sparse_inductor.prune(model.blocks[0], "2:4")
    sparse_inductor.prune(model.blocks[1], "block", block=64, sparsity=0.9)
    x = torch.randn(4, 32, 256, device=device, dtype=dtype)
    with torch.no_grad():
        ref = model(x)

    runs = [("force=True (every sparse layer rewritten)", {"force": True})]
    if device == "cuda":
        runs.insert(0, ("default (the dispatcher decides)", None))
    print(f"device: {device}, dtype: {dtype}, torch {torch.__version__}")
    for title, options in runs:
        report = sparse_inductor.explain(model, x, options=options)
        out = report.output
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        print(f"\n== {title}\n{report}")
        print(f"output vs eager: max |diff| = {(out - ref).abs().max().item():.3e}, relative error = {err:.2e}")

    # the one-liner a user writes (no import needed: the backend is an entry point)
    compiled = torch.compile(model, backend="sparse", options={"force": True})
    with torch.no_grad():
        out = compiled(x)
    print(f"\ntorch.compile(model, backend='sparse'): allclose to eager = "
          f"{torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)}")


if __name__ == "__main__":
    main()
