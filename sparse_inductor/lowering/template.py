"""Shared plumbing for the project's Triton templates in Inductor.

A template's source is: the imports, the source of the family's self-contained @triton.jit device
functions (the same functions the eager kernels and the interpreter tests call), then the
Inductor template body ({{def_kernel}}, {{size}}, {{stride}}, {{store_output}}). Inductor writes
the whole text into the generated kernel module, so the device functions sit beside the kernel
and Inductor fuses its epilogue (bias, activation, residual, cast) into {{store_output}}.
"""
from __future__ import annotations

import inspect
import textwrap
from typing import Any, Callable, Sequence

__all__ = ["template_source", "get_template", "grid_nm", "HEAD_X_MNK"]

_PRELUDE = "import triton\nimport triton.language as tl\n\n"

# The opening of a template body over an input X [M, K] and an output [M, N]: the kernel's
# signature (@INPUTS@: the input names, quoted) and the sizes and X's strides as locals.
HEAD_X_MNK = r'''
{{def_kernel(@INPUTS@)}}
    M = {{size("X", 0)}}
    K = {{size("X", 1)}}
    N = {{size(None, 1)}}
    stride_xm = {{stride("X", 0)}}
    stride_xk = {{stride("X", 1)}}
'''


def _source(fn: Any) -> str:
    py = getattr(fn, "fn", fn)  # JITFunction (or the interpreter's wrapper) -> the Python function
    src = textwrap.dedent(inspect.getsource(py))
    if "{{" in src or "{%" in src:
        raise ValueError(f"{py.__name__}: device functions must not contain Jinja markup")
    return src


def _jit_callees(fn: Any) -> list:
    """The @triton.jit functions that fn's body names (resolved in fn's module, as Triton does)."""
    py = getattr(fn, "fn", fn)
    out = []
    for name in py.__code__.co_names:
        g = py.__globals__.get(name)
        if g is not None and g is not fn and callable(getattr(g, "fn", None)) and hasattr(g.fn, "__code__"):
            out.append(g)
    return out


def with_callees(device_functions: Sequence[Any]) -> list:
    """device_functions and every @triton.jit function they call, transitively, each once: the
    template's module must define all of them (a callee left out fails only when Inductor compiles
    the kernel, and the layer then falls back to plain Inductor)."""
    order, seen = [], set()

    def visit(f):
        key = id(getattr(f, "fn", f))
        if key in seen:
            return
        seen.add(key)
        for callee in _jit_callees(f):
            visit(callee)
        order.append(f)

    for f in device_functions:
        visit(f)
    return order


def device_functions_source(device_functions: Sequence[Any]) -> str:
    return "".join(_source(f) + "\n\n" for f in with_callees(device_functions))


def template_source(device_functions: Sequence[Any], body: str) -> str:
    return _PRELUDE + device_functions_source(device_functions) + textwrap.dedent(body).lstrip("\n")


_TEMPLATES: dict[str, Any] = {}


def get_template(name: str, source_fn: Callable[[], str], grid: Callable) -> Any:
    """One TritonTemplate per name and process (Inductor asserts on duplicate names)."""
    if name not in _TEMPLATES:
        # Inductor's internals: loaded by the compile that calls this
        from torch._inductor.select_algorithm import TritonTemplate

        existing = TritonTemplate.all_templates.get(name)
        _TEMPLATES[name] = existing or TritonTemplate(name=name, grid=grid, source=source_fn())
    return _TEMPLATES[name]


def grid_nm() -> Callable:
    """Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)) over an output [M, N]."""
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.select_algorithm import SymbolicGridFn

    @SymbolicGridFn
    def grid(m, n, meta, *, cdiv):
        return (cdiv(n, meta["BLOCK_N"]), cdiv(m, meta["BLOCK_M"]), 1)

    return grid
