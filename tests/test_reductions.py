"""lowering/reductions.py on CPU: the quantize-kernel choices handler is installed for the compile
and removed after it, and a user's own handler is left alone (the kernels it changes are Triton
reductions: GPU test test_gpu_cusparselt.py::test_quantize_kernel_is_one_pass)."""
import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V

from sparse_inductor.lowering.reductions import quantize_reductions


def test_installed_for_the_compile_only():
    before = type(V.choices)
    with quantize_reductions():
        assert type(V.choices).__name__ == "QuantizeChoices" and isinstance(V.choices, InductorChoices)
    assert type(V.choices) is before
    with quantize_reductions(False):
        assert type(V.choices) is before


def test_a_users_handler_is_kept():
    class Mine(InductorChoices):
        pass

    with V.set_choices_handler(Mine()):
        with quantize_reductions():
            assert type(V.choices) is Mine


def test_backend_compiles_with_both_settings():
    from test_cusparselt_rewrite import W8A8Linear

    model = W8A8Linear().eval()
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    ref = model(x)
    for mode in ("one-pass", "inductor"):
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend="sparse", options={"reductions": mode})(x)
        # Inductor's fused kernels keep fp32 where eager rounds to bf16 between ops: a bf16 ulp
        torch.testing.assert_close(out, ref, rtol=2 ** -7, atol=2 ** -7)


def test_option_is_checked():
    import pytest

    from sparse_inductor.options import SparseOptions

    assert SparseOptions().reductions == "one-pass"
    with pytest.raises(ValueError, match="unknown reductions 'looped'"):
        SparseOptions(reductions="looped")


def test_row_check_recognition_never_raises():
    """The choices handler asks during Inductor's codegen: odd IR must give False, not an error."""
    import torch.fx as fx

    from sparse_inductor.lowering.reductions import _computes_row_check

    class Node:
        def __init__(self, origins):
            self.node = type("Buf", (), {"origins": origins})()

    class Features:
        def __init__(self, nodes):
            self._nodes = nodes

        def scheduler_nodes(self):
            if self._nodes is None:
                raise RuntimeError("no nodes here")
            return self._nodes

    g = fx.Graph()
    marked, plain = g.placeholder("a"), g.placeholder("b")
    marked.meta["sparse_inductor"] = "row_check"
    assert _computes_row_check(Features([Node({plain}), Node({marked})]))
    assert not _computes_row_check(Features([Node({plain}), Node(None), Node({object()})]))
    assert not _computes_row_check(Features(None))
