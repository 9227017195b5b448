"""A/B of cuSPARSELt's non-finite row fixup: folded into the pointwise op after the call (the graph
multiplies y by 1 + g where every use of y is pointwise; passes/linear_rewrite._nan_rows_in_graph)
against the op's own `nan_rows_` launch after every call (the rule forced off). A timm ViT with every
linear 2:4, compiled with backend="sparse" in reduce-overhead mode; each form compiled and timed
twice, alternating, with dense reduce-overhead in the same run (docs/benchmarks.md I3).

    python bench/row_fixup_ab.py [vit_base_patch16_224] [batch]
"""
from __future__ import annotations

import sys

import torch

from sparse_inductor.bench import _bench, header
from sparse_inductor.passes import linear_rewrite
from sparse_inductor.prune import prune


def main() -> None:
    import timm

    name = sys.argv[1] if len(sys.argv) > 1 else "vit_base_patch16_224"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    print(header())
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to("cuda", torch.bfloat16).eval()
    prune(model, "2:4")
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    rule = linear_rewrite._pointwise_users
    res: dict = {}
    with torch.no_grad():
        torch._dynamo.reset()
        dense = torch.compile(model, mode="reduce-overhead")
        dense(x)
        res["dense RO"] = [_bench(lambda: dense(x), rep=200)]
        dense = None
        for _ in range(2):
            for form in ("in the graph", "in the op"):
                linear_rewrite._pointwise_users = rule if form == "in the graph" else (lambda node, depth=4: False)
                try:
                    torch._dynamo.reset()
                    ours = torch.compile(model, backend="sparse", options={"mode": "reduce-overhead", "fx_cache": False})
                    ours(x)
                    res.setdefault(form, []).append(_bench(lambda: ours(x), rep=200))
                finally:
                    linear_rewrite._pointwise_users = rule
                    ours = None
    print(f"\n| {name} b{batch}, every linear 2:4, RO | us | vs dense RO |\n|---|---|---|")
    for form, ts in res.items():
        print(f"| {form} | {' / '.join(f'{t:.1f}' for t in ts)} | {res['dense RO'][0] / min(ts):.3f}x |")


if __name__ == "__main__":
    main()
