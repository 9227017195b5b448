"""The one place for differences between torch versions (2.11, 2.13 and 2.14 are supported).

Everything else imports these helpers instead of testing versions or attributes itself.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])

__all__ = ["TORCH_VERSION", "FOLDS_MUL_BY_INT_ZERO", "get_attr", "size_hint", "static_int", "inductor_size_hint",
           "fake_constant", "fake_eval", "device_name", "INTERPRETING", "is_module_state_source", "source_path",
           "compiling_code", "drop_compiled_code", "freezing_skips_unused_opaque_inputs"]

# Inductor up to 2.13 folds x * 0 with an integer zero to 0, dropping x's NaN / Inf; 2.14 keeps
# them. The row checks write a float zero, which every version keeps (tests/test_row_check.py).
FOLDS_MUL_BY_INT_ZERO = TORCH_VERSION < (2, 14)

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
    # Inductor's internals: loaded by the compile that calls this
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
    # torch's fake tensors: loaded by the compile that calls this
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


def _source_chain(source: Any) -> list:
    chain = []
    while source is not None and len(chain) < 64:
        chain.append(source)
        source = getattr(source, "base", None)
    return chain


def is_module_state_source(source: Any) -> bool:
    """Whether Dynamo read this graph input as a module's parameter or buffer: through the module's
    `_parameters` / `_buffers` dict (torch 2.11-2.14, inline_inbuilt_nn_modules), or an nn.Module
    source (modules Dynamo does not inline)."""
    for s in _source_chain(source):
        name = type(s).__name__
        if name in ("NNModuleSource", "UnspecializedNNModuleSource", "UnspecializedBuiltinNNModuleSource",
                    "FSDPNNModuleSource"):
            return True
        if getattr(s, "member", None) in ("_parameters", "_buffers"):
            return True
    return False


def source_path(source: Any) -> Optional[str]:
    """A readable dotted name for a Dynamo source: L['self']._modules['fc1']._parameters['weight'] ->
    "fc1.weight"; None without a source."""
    if source is None:
        return None
    try:
        text = source.name() if callable(getattr(source, "name", None)) else str(source.name)
    except Exception:
        return None
    text = re.sub(r"^[LG]\['[^']*'\]\.?", "", text)
    text = re.sub(r"\.?_(?:modules|parameters|buffers)\['([^']*)'\]", r".\1", text)
    return text.strip(".") or None


def compiling_code() -> Any:
    """The code object Dynamo is compiling (a backend runs inside its translation), or None."""
    try:
        # Dynamo's internals: loaded by the compile that calls this
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return getattr(tx, "f_code", None)
    except Exception:
        return None


def drop_compiled_code(code: Any) -> bool:
    """Drop Dynamo's compiled entries for a code object, so that its next call traces and compiles
    again. False where that is not possible (no code known)."""
    if code is None:
        return False
    try:
        # Dynamo's internals: loaded by the compile that calls this
        from torch._dynamo.eval_frame import remove_from_cache

        remove_from_cache(code)
        return True
    except Exception:
        return False


@contextlib.contextmanager
def freezing_skips_unused_opaque_inputs() -> Iterator[None]:
    """Inductor's freezing with parameters that AOTAutograd unwraps into tensors and opaque
    objects (a DTensor parameter of torch 2.13 / 2.14: its local shard and its DeviceMesh):
    freezing makes each unwrapped piece a constant with register_buffer, which refuses the mesh
    ("cannot assign 'FakeScriptObject' object to buffer"), so every compile with freezing fails
    (docs/tensor-parallel.md has the repro). Inside this block an opaque piece that the graph
    does not use (the collectives name their group by a string) is dropped instead; one that it
    uses still fails as before. Scoped to the block: torch's module is restored after it.
    """
    import torch._inductor.freezing as freezing  # Inductor's internals: loaded by the compile that uses this

    original = getattr(freezing, "replace_node_with_constant", None)
    if original is None:  # a torch whose freezing does not call it by this name: nothing to do
        yield
        return

    def replace(gm: fx.GraphModule, node: fx.Node, constant: Any = None, name: Optional[str] = None) -> None:
        if constant is not None and not isinstance(constant, torch.Tensor) and not node.users:
            gm.graph.erase_node(node)
            return
        original(gm, node, constant, name)

    freezing.replace_node_with_constant = replace
    try:
        yield
    finally:
        freezing.replace_node_with_constant = original
