"""The Triton templates' sources, as Inductor writes them into a kernel module: every
@triton.jit function that a template's device functions call is defined in that text. (A callee
left out compiles only on the GPU, when Inductor builds the kernel, and fails there: the compile
falls back to plain Inductor.)"""
from __future__ import annotations

import ast

import pytest

from sparse_inductor.lowering import block_mlp, row_check, triton_24, triton_block
from sparse_inductor.lowering.template import device_functions_source

FAMILIES = {"block": triton_block, "block_mlp": block_mlp, "2:4": triton_24, "row_check": row_check}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_called_device_function_is_in_the_template(family):
    module = FAMILIES[family]
    tree = ast.parse(device_functions_source(module.DEVICE_FUNCTIONS))
    defined = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    jit = {name for name in called
           if callable(getattr(getattr(module, name, None) or getattr(triton_block, name, None), "fn", None))}
    assert jit, "no device-function calls found: the test reads the wrong text"
    assert jit <= defined, f"called but not defined in the {family} template: {sorted(jit - defined)}"
