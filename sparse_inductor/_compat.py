"""The one place for differences between torch versions (2.11 on the GPU machine, 2.13 in CI).

Everything else imports these helpers instead of testing versions or attributes itself.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.fx as fx

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])

__all__ = ["TORCH_VERSION", "get_attr", "size_hint", "static_int", "inductor_size_hint", "fake_constant", "fake_eval", "device_name", "INTERPRETING"]

# Triton decides when a kernel is defined whether it runs in the interpreter (TRITON_INTERPRET=1);
# the kernel modules read it here, the same way, once.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def size_hint(s: Any) -> Optional[int]:
    """An int for a (possibly symbolic) size: its hint for a SymInt, None when there is none."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        node = s.node
        return int(node.hint) if node.has_hint() else None
    return None


def static_int(expr: Any) -> Optional[int]:
    """An Inductor size (int or sympy expression) as an int where it is a number, else None
    (a symbolic, dynamic size)."""
    if isinstance(expr, int):
        return expr
    return int(expr) if getattr(expr, "is_number", False) else None


def inductor_size_hint(expr: Any, fallback: Optional[int]) -> Optional[int]:
    """An Inductor size (int or sympy expression) as an int, during lowering: its hint, else
    fallback. torch 2.11's SizeVarAllocator.size_hint is optimization_hint in 2.13."""
    from torch._inductor.virtualized import V

    if static_int(expr) is not None:
        return static_int(expr)
    sizevars = V.graph.sizevars
    hint = getattr(sizevars, "optimization_hint", None) or sizevars.size_hint
    try:
        return int(hint(expr, fallback=fallback))
    except Exception:  # no hint, and no fallback taken
        return fallback


def fake_constant(near: fx.Node, t: torch.Tensor) -> torch.Tensor:
    """A FakeTensor for a new constant, made in the fake mode of the graph around `near`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = None
    for n in [near, *near.all_input_nodes]:
        val = n.meta.get("val")
        mode = getattr(val, "fake_mode", None)
        if mode is not None:
            break
    if mode is None:
        mode = torch._guards.detect_fake_mode() or FakeTensorMode()
    return mode.from_tensor(t, static_shapes=True)


def fake_eval(node: fx.Node) -> Any:
    """The FakeTensor value of a new call_function node, from its inputs' meta["val"]."""
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    mode = next((getattr(v, "fake_mode", None) for v in vals if getattr(v, "fake_mode", None) is not None), None)

    def val(a):
        return a.meta["val"] if isinstance(a, fx.Node) else a

    args = fx.node.map_arg(node.args, val)
    kwargs = fx.node.map_arg(node.kwargs, val)
    if mode is None:
        return node.target(*args, **kwargs)
    with mode:
        return node.target(*args, **kwargs)
