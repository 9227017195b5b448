"""The activations the project's kernels and cuSPARSELt's epilogue compute, in one table, and the
exhaustive 16-bit comparison that tells which one a graph computes.

An activation is identified, not guessed from op names: the ops of a graph (or the library's
epilogue) are run on every value of the 16-bit dtype, all 65536 bit patterns with NaN and Inf
(`every_16bit_value`), and compared with the table's functions (`same`: equal up to one unit in
the last place, with the same NaN and Inf positions). Every activation here has |act(t)| <= |t|,
which the derived row checks rely on (passes/row_checks.py).

    name       fn (fp32, as our kernels compute it)     eager (the ops' reference)  code  library
    none       t                                          t                           0     -
    relu       where(t < 0, 0, t)                         F.relu                      1     relu
    gelu       0.5 t (1 + erf(t / sqrt(2)))               F.gelu                      2     gelu
    silu       t sigmoid(t)                               F.silu                      3     -
    gelu_tanh  0.5 t (1 + tanh(sqrt(2/pi) (t + 0.044715 t^3)))  F.gelu(approximate="tanh")  -  gelu

fn is what lowering/block_mlp.mlp_act computes on an fp32 tile, in torch ops (the graph is compared
with these, not with F.gelu & co., whose CPU kernels treat subnormals and Inf their own way), and
what cuSPARSELt's epilogue attribute of the same name is taken to compute; code: block_mlp's ACT
constexpr (None: no kernel of ours computes it); library: the cuSPARSELt epilogue attribute that
may compute it (runtime/cusparselt.py; whether it does is measured: activation_matches).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["Activation", "ACTIVATIONS", "every_16bit_value", "same"]


@dataclasses.dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    eager: Callable[[torch.Tensor], torch.Tensor]
    code: Optional[int]
    library: Optional[str]


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("none", lambda h: h, lambda t: t, 0, None),
    Activation("relu", lambda h: torch.where(h < 0, 0.0, h), F.relu, 1, "relu"),
    Activation("gelu", lambda h: 0.5 * h * (1.0 + torch.erf(h * 0.7071067811865476)), F.gelu, 2, "gelu"),
    Activation("silu", lambda h: h * torch.sigmoid(h), F.silu, 3, None),
    Activation("gelu_tanh", lambda h: 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))),
               functools.partial(F.gelu, approximate="tanh"), None, "gelu"),
)}

_16BIT = (torch.float16, torch.bfloat16)


def every_16bit_value(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 values of a 16-bit float dtype (NaNs, infinities, subnormals, both zeros), 1-D, CPU."""
    if dtype not in _16BIT:
        raise ValueError(f"every_16bit_value: a 16-bit float dtype ({_16BIT}), got {dtype}")
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to one unit in the last place, NaN where the other is NaN, Inf where it is Inf
    (16-bit dtypes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    na, nb = a.isnan(), b.isnan()
    if not torch.equal(na, nb):
        return False
    a, b = a[~na], b[~nb]
    if not torch.equal(a.isinf(), b.isinf()):
        return False
    eq = a == b
    ia, ib = a.view(torch.int16).to(torch.int32), b.view(torch.int16).to(torch.int32)
    near = ((ia - ib).abs() <= 1) & (a.signbit() == b.signbit()) & a.isfinite() & b.isfinite()
    return bool((eq | near).all())
