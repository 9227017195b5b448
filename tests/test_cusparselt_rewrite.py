"""The cuSPARSELt rewrite on CPU, with the library emulated: the graph the pass makes (golden), the
non-finite row check passed to the op, and the kernel's parameters in the node. The real library runs in
test_gpu_cusparselt.py on the H100.

The emulation computes y = x @ W^T over the kept (nonzero) weights only, as sparse tensor cores do:
a NaN/Inf input meeting a pruned zero is never multiplied. The row check must restore dense's
"a non-finite input row gives a non-finite output row".
"""
import dataclasses

import expecttest
import pytest
import torch
import torch.nn as nn

import sparse_inductor
from sparse_inductor import dispatch
from sparse_inductor.lowering import cusparselt

from test_backend import Fc, run_sparse, seeded

OPTS = {"force": True, "kernel": "cusparselt"}
# fp32: the emulation sums the products in another order than F.linear: a few ulps (K = 16).
TOL32 = dict(rtol=1e-5, atol=1e-6)


def _emulated_linear(x, wc, bias, n, k, alg_id=0, split_k=1, out_dtype=None, alpha=None, scale_a=None,
                     scale_b=None):
    assert scale_a is None and scale_b is None  # (fp8's per-tensor scales: emulated in test_fp8.py)
    if x.dtype == torch.int8:  # int32 accumulation, exact
        return (x.long() @ wc.long().T).to(out_dtype or torch.int8)
    kept = (wc != 0).to(x.dtype)
    terms = torch.where(kept.bool().unsqueeze(0), x.unsqueeze(1) * wc.unsqueeze(0), torch.zeros((), dtype=x.dtype))
    y = terms.sum(-1)
    return y if bias is None else y + bias


@pytest.fixture(autouse=True)
def emulated_cusparselt(monkeypatch):
    spec = dispatch._KERNELS["2:4/cusparselt"]
    monkeypatch.setitem(dispatch._KERNELS, "2:4/cusparselt", dataclasses.replace(spec, devices=("cpu", "cuda")))
    monkeypatch.setattr(cusparselt, "available", lambda: True)
    monkeypatch.setitem(cusparselt._CUDA_TYPE, torch.float32, 0)  # the emulation also does fp32
    monkeypatch.setattr(cusparselt, "compress", lambda w: w.contiguous().clone())  # "compressed" = W itself
    monkeypatch.setattr(cusparselt, "linear", _emulated_linear)


class TestCusparseltGraph(expecttest.TestCase):
    def test_golden_linear_bias_relu(self):
        model = seeded(Fc, act=True)
        x = torch.randn(4, 16)
        torch._dynamo.reset()
        r = run_sparse(model, (x,), options=OPTS)
        assert [d.kernel for d in r.decisions] == ["cusparselt"]
        torch.testing.assert_close(r.outputs[0], model(x).detach(), **TOL32)
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg2_1: "f32[4, 16]"):
_sparse_0_wc: "f32[32, 16]" = self._sparse_0_wc
arg1_1: "f32[32]" = self._frozen_param1
mul_tensor: "f32[4, 16]" = torch.ops.aten.mul.Tensor(arg2_1, 0)
sum_dim_int_list: "f32[4]" = torch.ops.aten.sum.dim_IntList(mul_tensor, [1], dtype = torch.float32)
linear_cslt_default: "f32[4, 32]" = torch.ops.sparse_inductor.linear_cslt.default(arg2_1, _sparse_0_wc, arg1_1, 32, 16, 0, 1, row_check = sum_dim_int_list)
relu: "f32[4, 32]" = torch.ops.aten.relu.default(linear_cslt_default)
return (relu,)""")

    def test_golden_3d_input_views_sink_below_the_relu(self):
        model = seeded(Fc, act=True)
        x = torch.randn(2, 3, 16)
        torch._dynamo.reset()
        r = run_sparse(model, (x,), options=OPTS)
        torch.testing.assert_close(r.outputs[0], model(x).detach(), **TOL32)
        graph = r.graphs[0]
        # one reshape in, one out, after the ReLU: everything between is 2-D and fuses
        assert graph.count("aten.reshape") == 2 and graph.index("aten.relu") < graph.rindex("aten.reshape"), graph


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_rows_stay_nonfinite(dtype):
    model = seeded(Fc, k=16, n=32).to(dtype)
    x = torch.randn(5, 16, dtype=dtype)
    x[1, 3] = float("nan")
    x[3, 7] = float("inf")
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    out, ref = r.outputs[0], model(x).detach()
    assert torch.equal(out.isfinite(), ref.isfinite())  # rows 1 and 3 wholly non-finite, like dense
    assert torch.equal(out.isnan() | ref.isnan(), out.isnan())  # every dense NaN is a NaN here too
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_without_row_check_the_emulation_would_differ():
    """The emulation really skips zeros (so the test above tests the row check, not the emulation)."""
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    x = torch.tensor([[1.0, float("nan"), 1.0, 1.0]])
    assert torch.isfinite(_emulated_linear(x, w, None, 1, 4)).all()
    assert torch.isnan(x @ w.t()).all()


class W8A8Linear(nn.Module):
    """Dynamic int8 activations x int8 2:4 weight, as users write it (torch._int_mm + scales)."""

    def __init__(self, k=64, n=32, seed=0):
        super().__init__()
        from sparse_inductor.prune import prune_24_

        g = torch.Generator().manual_seed(seed)
        w = prune_24_(torch.randn(n, k, generator=g))
        self.register_buffer("wq", (w * 40).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("w_scale", torch.rand(n, generator=g) / 40)
        self.bias = nn.Parameter(torch.randn(n, generator=g).to(torch.bfloat16))

    def forward(self, x):
        s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-5) / 127
        xq = (x.float() / s).round().clamp(-128, 127).to(torch.int8)
        y = torch._int_mm(xq, self.wq.t())
        return (y.float() * s * self.w_scale).to(x.dtype) + self.bias


def test_int8_activations_rewrite_is_exact(monkeypatch):
    """torch._int_mm(xq, Wq^T) with a 2:4 Wq becomes one linear_cslt with an int32 output (no row
    guard: int8 holds no NaN); the quantize and dequantize steps stay Inductor's to fuse."""
    model = W8A8Linear().eval()
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    (d,) = r.decisions
    assert (d.kernel, d.pattern, d.dtype) == ("cusparselt", "2:4", "int8"), d.line()
    graph = r.graphs[0]
    assert "torch.ops.sparse_inductor.linear_cslt.default(" in graph and "torch.int32)" in graph, graph
    assert "_int_mm" not in graph and "aten.sum" not in graph, graph
    # against the same model compiled by plain Inductor: the same integers, the same fused epilogue
    monkeypatch.setenv("SPARSE_INDUCTOR_DISABLE", "1")
    torch._dynamo.reset()
    plain = run_sparse(model, (x,), options=OPTS)
    assert not plain.decisions
    torch.testing.assert_close(r.outputs[0], plain.outputs[0], rtol=0, atol=0)


def test_int8_activations_dense_weight_stays_dense():
    model = W8A8Linear().eval()
    with torch.no_grad():
        model.wq.copy_(torch.randint(1, 100, model.wq.shape, dtype=torch.int8))  # no zeros at all
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    (d,) = r.decisions
    assert d.kernel == "dense" and "not 2:4" in d.reason


def test_int8_activations_without_cusparselt_stay_dense(monkeypatch):
    """The Triton and reference kernels do not take int8 x int8: forced or not, dense with a reason."""
    spec = dispatch._KERNELS["2:4/cusparselt"]
    monkeypatch.setitem(dispatch._KERNELS, "2:4/cusparselt", dataclasses.replace(spec, devices=("cuda",)))
    model = W8A8Linear().eval()
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options={"force": True})
    (d,) = r.decisions
    assert d.kernel == "dense" and "int8 x int8 runs on cuSPARSELt only" in d.reason, d.line()


def test_nonfinite_fast_has_no_row_check():
    """options nonfinite="fast": no reduction over x, no row_check argument (documented: a NaN/Inf
    input meeting only pruned zeros then leaves those outputs finite)."""
    model = seeded(Fc, act=True)
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options={**OPTS, "nonfinite": "fast"})
    torch.testing.assert_close(r.outputs[0], model(x).detach(), **TOL32)
    assert "row_check" not in r.graphs[0] and "aten.sum" not in r.graphs[0], r.graphs[0]


def test_bad_nonfinite_option():
    with pytest.raises(ValueError, match="nonfinite"):
        sparse_inductor.SparseOptions(nonfinite="approximate")


@pytest.mark.parametrize("make,want", [
    (lambda x: x.reshape(4, 16), "separate"),  # a graph input: one more read of x
    (lambda x: torch.relu(x).reshape(4, 16), "fused"),  # a pointwise producer
    # a norm, as post-grad graphs hold it (decomposed: var_mean, then pointwise ops)
    (lambda x: ((x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True) + 1e-5)).reshape(4, 16),
     "fused"),
    (lambda x: (x @ x.transpose(-1, -2)).reshape(4, 2), "separate"),  # an extern kernel (bmm)
])
def test_row_check_mode(make, want):
    from torch.fx.experimental.proxy_tensor import make_fx

    from sparse_inductor.passes.linear_rewrite import _row_check_mode

    gm = make_fx(make)(torch.randn(2, 2, 16))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert _row_check_mode(out, torch.float32, sparse_inductor.SparseOptions()) == want
    assert _row_check_mode(out, torch.float32, sparse_inductor.SparseOptions(nonfinite="fast")) == "none"
    assert _row_check_mode(out, torch.int8, sparse_inductor.SparseOptions()) == "none"


@pytest.mark.parametrize("kernel,want", [("triton", "separate"), ("reference", "fused")])
def test_row_check_mode_after_template(kernel, want):
    """A GELU of a Triton template's output is that template's epilogue (no kernel the reduction
    could join): "separate"; after the reference kernel (an extern call) it is its own kernel."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from sparse_inductor.formats import compress_block
    from sparse_inductor.passes.linear_rewrite import _row_check_mode

    w = torch.zeros(32, 16)
    w[:16, :16] = torch.randn(16, 16)
    t = compress_block(w, 16)

    def f(x):
        y = torch.ops.sparse_inductor.linear_block(x, *t, None, 32, 16, kernel)
        return torch.nn.functional.gelu(y) * 2

    gm = make_fx(f)(torch.randn(4, 16))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert _row_check_mode(out, torch.float32, sparse_inductor.SparseOptions()) == want
