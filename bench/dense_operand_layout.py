"""Dense matmul time by the weight operand's layout, on the linears of ViT-B/16 (batch 64, M =
12608) and ViT-H/14 (batch 32, M = 8224), bf16: mm(x, W.t()) with W stored [N, K] (the view a
plain torch.compile hands the matmul), mm(x, Wt) with Wt a contiguous [K, N] copy (a layout the
backend must not hand a dense layer: freezing keeps W.t() a view, tests/test_backend.py checks
it), and F.linear. do_bench medians, L2 flushed, us.

    python bench/dense_operand_layout.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.testing

SHAPES = {"ViT-B/16 b64": (12608, [(2304, 768), (768, 768), (3072, 768), (768, 3072)]),
          "ViT-H/14 b32": (8224, [(3840, 1280), (1280, 1280), (5120, 1280), (1280, 5120)])}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("dense_operand_layout: needs a CUDA GPU")
    from sparse_inductor.bench import header

    print(header())
    print("\n| model | N x K | M | mm(x, W.t()) us | mm(x, Wt contiguous) us | F.linear us | view / contiguous |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for model, (m, shapes) in SHAPES.items():
        for n, k in shapes:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            wt = w.t().contiguous()
            t_view = triton.testing.do_bench(lambda: torch.mm(x, w.t()), return_mode="median")
            t_cont = triton.testing.do_bench(lambda: torch.mm(x, wt), return_mode="median")
            t_lin = triton.testing.do_bench(lambda: F.linear(x, w), return_mode="median")
            print(f"| {model} | {n}x{k} | {m} | {t_view * 1e3:.1f} | {t_cont * 1e3:.1f} | {t_lin * 1e3:.1f} | "
                  f"{t_view / t_cont:.3f} |", flush=True)


if __name__ == "__main__":
    main()
