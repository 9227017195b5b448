"""Which function is cuSPARSELt's own epilogue activation (ACTIVATION_GELU, ACTIVATION_RELU)?

    python bench/cslt_activation_probe.py

cuSPARSELt can apply ReLU or GELU to its output in the GEMM's epilogue. Fusing fc1's GELU there
would drop the GELU kernel after a cuSPARSELt fc1 (ViT-B/16 b64: ~56 us a layer on the H200, I4),
but only if the library computes the function the model does, to the standard the rewrite holds
activations to (passes/fuse_mlp.identify_activation: within one unit in the last place of the
16-bit result, the same NaN and Inf positions). timm's ViTs use the erf GELU; cuBLASLt's GELU
epilogue is said to be the tanh approximation. (Run H8: cuSPARSELt 0.8 refused the GELU attribute
for a bf16 plan on sm90, status 3; NVIDIA's 0.2 notes list the GELU for int8 kernels.) This measures it:

- y = act(x @ I^T) with W the identity (a valid 2:4 weight: one nonzero a group of four), so that
  y = act(x) exactly; x holds every finite value of the dtype (the non-finite ones would meet the
  zeros the library keeps in each group: Inf * 0);
- the non-finite and extreme values on a diagonal x (x[m, k] = 0 off it), read at y[m, m].

Prints, per dtype and activation, the mismatches against the candidates (erf GELU, tanh GELU, ReLU,
each in fp32 rounded once, as KERNEL_ACTIVATIONS computes them) and the largest distance in units in
the last place. Nothing in the package uses the library's activations until this says one matches.
"""
from __future__ import annotations

import math

import torch

from sparse_inductor.bench import header
from sparse_inductor.lowering import cusparselt as cs

DEV = "cuda"

CANDIDATES = {
    "gelu (erf)": lambda h: 0.5 * h * (1.0 + torch.erf(h * 0.7071067811865476)),
    "gelu (tanh)": lambda h: 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))),
    "relu": lambda h: torch.where(h < 0, 0.0, h),
}


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of the 16-bit dtype (on the ordered integer line)."""
    def ordered(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)
    return (ordered(a) - ordered(b)).abs()


def _run(x: torch.Tensor, activation: str) -> torch.Tensor:
    """act(x @ I^T) by the library's plan with the activation (cusparselt._apply, as the compiler's
    check activation_matches runs it)."""
    y = cs._apply(x, cs.compress(torch.eye(x.shape[1], device=DEV, dtype=x.dtype)), activation)
    torch.cuda.synchronize()
    return y


def main() -> None:
    print(header())
    print("cuSPARSELt epilogue activations against the candidates")
    if DEV == "cuda" and cs._lib() is None:
        print("cuSPARSELt could not be loaded")
        return
    print("\n| dtype | library activation | candidate | finite inputs | mismatches (> 1 ulp) | max ulps | "
          "specials (NaN, +Inf, -Inf, max, -max, -0) -> library / candidate |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16):
        bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
        finite = bits[bits.isfinite()]
        pad = (-finite.numel()) % (16 * 256)  # rows a multiple of 16, as the library's dense descriptor wants
        x = torch.cat([finite, finite.new_zeros(pad)]).reshape(-1, 256).to(DEV)
        fmax = torch.finfo(dtype).max
        specials = torch.tensor([math.nan, math.inf, -math.inf, fmax, -fmax, -0.0], dtype=dtype)
        diag = torch.zeros(16, 16, dtype=dtype)
        diag[range(6), range(6)] = specials
        for activation in ("gelu", "relu"):
            try:
                y = _run(x, activation).reshape(-1)[:finite.numel()].cpu()
                ys = _run(diag.to(DEV), activation).diagonal()[:6].cpu()
            except Exception as e:
                print(f"| {dtype} | {activation} | - | refused: {type(e).__name__}: {str(e)[:80]} | | | |")
                continue
            for name, fn in CANDIDATES.items():
                if activation == "relu" and name != "relu" or activation == "gelu" and name == "relu":
                    continue
                want = fn(finite.float()).to(dtype)
                u = _ulps(y, want)
                bad = int((u > 1).sum())
                want_s = fn(specials.float()).to(dtype)
                sp = ", ".join(f"{a:g}/{b:g}" for a, b in zip(ys.float().tolist(), want_s.float().tolist()))
                print(f"| {dtype} | {activation} | {name} | {finite.numel()} | {bad} | {int(u.max())} | {sp} |",
                      flush=True)


if __name__ == "__main__":
    main()
