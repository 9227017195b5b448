"""The cuSPARSELt rewrite on CPU, with the library emulated: the graph the pass makes (golden), the
non-finite row check passed to the op, and the kernel's parameters in the node. The real library runs in
test_gpu_cusparselt.py on the H100.

The emulation computes y = x @ W^T over the kept (nonzero) weights only, as sparse tensor cores do:
a NaN/Inf input meeting a pruned zero is never multiplied. The row check must restore dense's
"a non-finite input row gives a non-finite output row".
"""
import copy
import dataclasses

import expecttest
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch
import torch.nn as nn

import sparse_inductor
from sparse_inductor import registry
from sparse_inductor.activations import ACTIVATIONS
from sparse_inductor.lowering import cusparselt_24
from sparse_inductor.runtime import cusparselt

from test_backend import Fc, pruned_24, run_sparse, seeded

OPTS = {"force": True, "kernel": "cusparselt"}
# fp32: the emulation sums the products in another order than F.linear: a few ulps (K = 16).
TOL32 = dict(rtol=1e-5, atol=1e-6)


# The emulated library's epilogue activations (cusparselt.linear(..., activation=)): applied to the fp32
# sum before its one rounding, as the library does; tests swap in another GELU to see it refused.
EMULATED_ACTIVATIONS = {name: ACTIVATIONS[name].fn for name in ("relu", "gelu")}


def _emulated_linear(x, wc, bias, n, k, alg_id=0, split_k=1, out_dtype=None, alpha=None, activation=None):
    if x.dtype == torch.int8:  # int32 accumulation, exact; one rounding to a float out_dtype
        return (x.long() @ wc.long().T).double().to(out_dtype or torch.int8)
    if activation is not None:  # an fp32 sum (of the kept products), the bias, the activation, one rounding
        terms = torch.where((wc != 0).unsqueeze(0), x.float().unsqueeze(1) * wc.float().unsqueeze(0), 0.0)
        y = terms.sum(-1) + (0.0 if bias is None else bias.float())
        return EMULATED_ACTIVATIONS[activation](y).to(x.dtype)
    kept = (wc != 0).to(x.dtype)
    terms = torch.where(kept.bool().unsqueeze(0), x.unsqueeze(1) * wc.unsqueeze(0), torch.zeros((), dtype=x.dtype))
    y = terms.sum(-1)
    return y if bias is None else y + bias


@pytest.fixture(autouse=True)
def emulated_cusparselt(monkeypatch):
    spec = registry._KERNELS["2:4/cusparselt"]
    monkeypatch.setitem(registry._KERNELS, "2:4/cusparselt", dataclasses.replace(spec, devices=("cpu", "cuda")))
    monkeypatch.setattr(cusparselt, "available", lambda: True)
    monkeypatch.setitem(cusparselt._CUDA_TYPE, torch.float32, 0)  # the emulation also does fp32
    monkeypatch.setattr(cusparselt, "compress", lambda w: w.contiguous().clone())  # "compressed" = W itself
    monkeypatch.setattr(cusparselt, "linear", _emulated_linear)
    monkeypatch.setattr(cusparselt, "_MATCHES", {})  # (activation_matches measures the emulation afresh)


class TestCusparseltGraph(expecttest.TestCase):
    def test_golden_linear_bias_relu(self):
        model = seeded(Fc, act=True)
        x = torch.randn(4, 16)
        torch._dynamo.reset()
        r = run_sparse(model, (x,), options=OPTS)
        assert [(d.kernel, d.row_check) for d in r.decisions] == [("cusparselt", "own kernel")]  # x: an input
        torch.testing.assert_close(r.outputs[0], model(x).detach(), **TOL32)
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg2_1: "f32[4, 16]"):
_sparse_0_wc: "f32[32, 16]" = self._sparse_0_wc
arg1_1: "f32[32]" = self._frozen_param1
row_check_default: "f32[4]" = torch.ops.sparse_inductor.row_check.default(arg2_1)
linear_cslt_default: "f32[4, 32]" = torch.ops.sparse_inductor.linear_cslt.default(arg2_1, _sparse_0_wc, arg1_1, 32, 16, 0, 1)
add_tensor: "f32[4]" = torch.ops.aten.add.Tensor(row_check_default, 1)
unsqueeze_default: "f32[4, 1]" = torch.ops.aten.unsqueeze.default(add_tensor, 1)
mul_tensor: "f32[4, 32]" = torch.ops.aten.mul.Tensor(linear_cslt_default, unsqueeze_default)
relu: "f32[4, 32]" = torch.ops.aten.relu.default(mul_tensor)
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


class NormFc(Fc):
    """A LayerNorm before the linear: the row check fuses into the norm's kernel."""

    def __init__(self, k=16, n=32):
        super().__init__(k, n)
        self.norm = nn.LayerNorm(k)

    def forward(self, x):
        return self.fc(self.norm(x))


def test_row_check_in_the_norm():
    """x from a norm: the check is Inductor ops (mul, sum) that join the norm's reduction, not the
    row_check op; explain says so. A NaN in an input row still makes that output row non-finite."""
    model = seeded(NormFc)
    x = torch.randn(4, 16)
    x[2, 5] = float("nan")
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    assert [(d.kernel, d.row_check) for d in r.decisions] == [("cusparselt", "in x's norm")]
    assert "row_check.default" not in r.graphs[0] and "aten.sum.dim_IntList" in r.graphs[0], r.graphs[0]
    ref = model(x).detach()
    assert torch.equal(r.outputs[0].isfinite(), ref.isfinite())
    fin = ref.isfinite()
    torch.testing.assert_close(r.outputs[0][fin], ref[fin], **TOL32)


class FcTimesTwo(Fc):
    """A pointwise op after the linear that keeps where the outputs are finite (a ReLU would not:
    ReLU(-Inf) = 0 where ReLU(NaN) = NaN, the documented NaN-vs-Inf split)."""

    def forward(self, x):
        return self.fc(x) * 2


@pytest.mark.parametrize("cls", [Fc, FcTimesTwo], ids=["in-op", "in-graph"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_rows_stay_nonfinite(dtype, cls):
    """Both forms of the row fixup: the op's row_check (the output is the graph's: no pointwise op
    to fold it into) and y * (1 + g) folded into the pointwise op after it."""
    model = seeded(cls, k=16, n=32).to(dtype)
    x = torch.randn(5, 16, dtype=dtype)
    x[1, 3] = float("nan")
    x[3, 7] = float("inf")
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    assert ("row_check = " in r.graphs[0]) == (cls is Fc), r.graphs[0]
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


def _plain(model, x, monkeypatch):
    """The same model compiled by plain Inductor (torch._int_mm)."""
    with monkeypatch.context() as mp:
        mp.setenv("SPARSE_INDUCTOR_DISABLE", "1")
        torch._dynamo.reset()
        plain = run_sparse(model, (x,), options=OPTS)
    assert not plain.decisions
    return plain.outputs[0]


def test_int8_activations_rewrite_is_exact(monkeypatch):
    """With int8_product="int32": torch._int_mm(xq, Wq^T) with a 2:4 Wq becomes one linear_cslt
    with an int32 output (no row guard: int8 holds no NaN); the quantize and dequantize steps stay
    Inductor's to fuse."""
    model = W8A8Linear().eval()
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options={**OPTS, "int8_product": "int32"})
    (d,) = r.decisions
    assert (d.kernel, d.pattern, d.dtype) == ("cusparselt", "2:4", "int8"), d.line()
    graph = r.graphs[0]
    assert "torch.ops.sparse_inductor.linear_cslt.default(" in graph and "torch.int32)" in graph, graph
    assert "_int_mm" not in graph and "aten.sum" not in graph, graph
    # against the same model compiled by plain Inductor: the same integers, the same fused epilogue
    torch.testing.assert_close(r.outputs[0], _plain(model, x, monkeypatch), rtol=0, atol=0)


def bf16_product_bound(plain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """How far int8_product="bf16" may move W8A8Linear's output from plain Inductor's, per element.
    The product p is rounded to bf16 (|d| <= u |p|, u = 2^-8, bf16's unit roundoff) before the
    same dequantization t = bf16(p * s * w_scale); t then moves by at most u |t| + the two
    roundings of t (2 u |t|), and the bias add's rounding adds 2 u |out| (ours and plain's). So
    |ours - plain| <= 3 u |t| + 2 u |out|, with t = plain - bias: relative to the scaled product,
    not to the output, which the bias can make small (seen on the H100: 0.0156 at an output of 0.8)."""
    u = 2.0 ** -8
    plain = plain.double()
    return 3 * u * (plain - bias.double()).abs() + 2 * u * plain.abs() + 1e-6


class TestInt8Product(expecttest.TestCase):
    def test_golden_bf16_product(self):
        """Default int8_product="bf16": linear_cslt writes bf16, read back as int32 by the
        dequantization's kernel (every use of torch._int_mm's product converts it to float)."""
        model = W8A8Linear(k=32, n=32).eval()
        x = torch.randn(4, 32, dtype=torch.bfloat16)
        torch._dynamo.reset()
        r = run_sparse(model, (x,), options=OPTS)
        (d,) = r.decisions
        assert d.kernel == "cusparselt" and "int8 product in bfloat16" in d.reason, d.line()
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg3_1: "bf16[4, 32]"):
_sparse_0_wc: "i8[32, 32]" = self._sparse_0_wc
arg0_1: "bf16[32]" = self._frozen_param0
arg2_1: "f32[32]" = self._frozen_param2
convert_element_type_1: "f32[4, 32]" = torch.ops.prims.convert_element_type.default(arg3_1, torch.float32)
abs_1: "bf16[4, 32]" = torch.ops.aten.abs.default(arg3_1)
amax: "bf16[4, 1]" = torch.ops.aten.amax.default(abs_1, [-1], True)
convert_element_type: "f32[4, 1]" = torch.ops.prims.convert_element_type.default(amax, torch.float32)
clamp_min: "f32[4, 1]" = torch.ops.aten.clamp_min.default(convert_element_type, 1e-05)
div: "f32[4, 1]" = torch.ops.aten.div.Tensor(clamp_min, 127)
div_1: "f32[4, 32]" = torch.ops.aten.div.Tensor(convert_element_type_1, div)
round_1: "f32[4, 32]" = torch.ops.aten.round.default(div_1)
clamp_min_1: "f32[4, 32]" = torch.ops.aten.clamp_min.default(round_1, -128)
clamp_max: "f32[4, 32]" = torch.ops.aten.clamp_max.default(clamp_min_1, 127)
convert_element_type_2: "i8[4, 32]" = torch.ops.prims.convert_element_type.default(clamp_max, torch.int8)
linear_cslt_default: "bf16[4, 32]" = torch.ops.sparse_inductor.linear_cslt.default(convert_element_type_2, _sparse_0_wc, None, 32, 32, 0, 1, torch.bfloat16)
convert_element_type_default: "i32[4, 32]" = torch.ops.prims.convert_element_type.default(linear_cslt_default, torch.int32)
convert_element_type_3: "f32[4, 32]" = torch.ops.prims.convert_element_type.default(convert_element_type_default, torch.float32)
mul: "f32[4, 32]" = torch.ops.aten.mul.Tensor(convert_element_type_3, div)
mul_1: "f32[4, 32]" = torch.ops.aten.mul.Tensor(mul, arg2_1)
convert_element_type_4: "bf16[4, 32]" = torch.ops.prims.convert_element_type.default(mul_1, torch.bfloat16)
add: "bf16[4, 32]" = torch.ops.aten.add.Tensor(convert_element_type_4, arg0_1)
return (add,)""")


@pytest.mark.parametrize("m", [1, 7, 64])
def test_int8_bf16_product_close_to_plain_inductor(m, monkeypatch):
    model = W8A8Linear(k=128, n=64).eval()
    x = torch.randn(m, 128, dtype=torch.bfloat16) * 3
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    assert "torch.bfloat16)" in r.graphs[0] and "convert_element_type" in r.graphs[0], r.graphs[0]
    plain = _plain(model, x, monkeypatch)
    assert ((r.outputs[0].double() - plain.double()).abs() <= bf16_product_bound(plain, model.bias)).all()


class W8A8ZeroPoint(W8A8Linear):
    """Asymmetric activations: an integer correction of the int32 product before the dequantization."""

    def forward(self, x):
        s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-5) / 127
        xq = (x.float() / s).round().clamp(-127, 126).to(torch.int8) + 1  # zero point 1
        y = torch._int_mm(xq, self.wq.t()) - self.wq.sum(1, dtype=torch.int32)  # exact integers needed
        return (y.float() * s * self.w_scale).to(x.dtype) + self.bias


def test_int8_product_stays_int32_for_an_integer_use(monkeypatch):
    model = W8A8ZeroPoint(k=64, n=32).eval()
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    (d,) = r.decisions
    assert d.kernel == "cusparselt" and "int8 product in int32" in d.reason, d.line()
    assert "torch.bfloat16)" not in r.graphs[0].split("linear_cslt")[1].split("\n")[0], r.graphs[0]
    torch.testing.assert_close(r.outputs[0], _plain(model, x, monkeypatch), rtol=0, atol=0)


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
    spec = registry._KERNELS["2:4/cusparselt"]
    monkeypatch.setitem(registry._KERNELS, "2:4/cusparselt", dataclasses.replace(spec, devices=("cuda",)))
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
    assert [d.row_check for d in r.decisions] == ["off"]
    torch.testing.assert_close(r.outputs[0], model(x).detach(), **TOL32)
    assert "row_check" not in r.graphs[0] and "aten.sum" not in r.graphs[0], r.graphs[0]


def test_bad_nonfinite_option():
    with pytest.raises(ValueError, match="nonfinite"):
        sparse_inductor.SparseOptions(nonfinite="approximate")


@pytest.mark.parametrize("make,want", [
    (lambda x: x.reshape(4, 16), "separate"),  # a graph input: one more read of x
    # a pointwise producer: the check would make it a reduction kernel, timed as one more read of x
    (lambda x: torch.relu(x).reshape(4, 16), "separate"),
    # a norm, as post-grad graphs hold it (decomposed: var_mean, then pointwise ops)
    (lambda x: ((x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True) + 1e-5)).reshape(4, 16),
     "fused"),
    (lambda x: (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)).reshape(4, 16), "fused"),  # RMSNorm
    (lambda x: (x @ x.transpose(-1, -2)).reshape(4, 2), "separate"),  # an extern kernel (bmm)
    # a pointwise op of (a cuSPARSELt fc1's output) * (1 + a row sum of fc1's input): the row fixup,
    # then the activation; the sum is another kernel's (it reads the result only): not a norm
    (lambda x: torch.relu(x * (1 + (x[..., :8] * 0).sum(-1, keepdim=True))).reshape(4, 16), "separate"),
])
def test_row_check_mode(make, want):
    from torch.fx.experimental.proxy_tensor import make_fx

    from sparse_inductor.passes.row_checks import check_mode as _row_check_mode

    gm = make_fx(make)(torch.randn(2, 2, 16))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert _row_check_mode(out, torch.float32, sparse_inductor.SparseOptions()) == want
    assert _row_check_mode(out, torch.float32, sparse_inductor.SparseOptions(nonfinite="fast")) == "none"
    assert _row_check_mode(out, torch.int8, sparse_inductor.SparseOptions()) == "none"


def test_norm_reads_rule():
    """options rules.norm_reads_its_input off (for bench/ab_rules.py): the row fixup's sum counts as a
    norm."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from sparse_inductor.passes import row_checks

    gm = make_fx(lambda x: torch.relu(x * (1 + (x[..., :8] * 0).sum(-1, keepdim=True))))(torch.randn(4, 16))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert row_checks.check_mode(out, torch.float32, sparse_inductor.SparseOptions()) == "separate"
    off = sparse_inductor.SparseOptions(rules={"norm_reads_its_input": False})
    assert row_checks.check_mode(out, torch.float32, off) == "fused"


class TwoReaders(nn.Module):
    """Two 2:4 layers reading one x: the graph's input, or a LayerNorm's output."""

    def __init__(self, norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(32) if norm else nn.Identity()
        self.a, self.b = pruned_24(nn.Linear(32, 48)), pruned_24(nn.Linear(32, 16))

    def forward(self, x):
        u = self.norm(x)
        return torch.cat([torch.relu(self.a(u)), self.b(u) * 2], -1)


@pytest.mark.parametrize("norm", [False, True])
def test_layers_reading_one_x_share_its_check(norm):
    """One check over x for both layers (a row_check kernel over the input; one sum in the norm), and
    a NaN row of x comes out NaN in both layers' outputs, as dense."""
    model = seeded(TwoReaders, norm=norm)
    x = torch.randn(6, 32)
    x[2, 5] = float("nan")
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    assert [d.kernel for d in r.decisions] == ["cusparselt", "cusparselt"], [d.line() for d in r.decisions]
    gm = r.graphs[0]
    assert gm.count("sparse_inductor.row_check.default(") == (0 if norm else 1), gm
    assert gm.count("aten.sum.dim_IntList(") == (1 if norm else 0), gm
    # (both layers' fixups folded into the pointwise ops after them)
    assert r.counts == {"rewrite": 2, "row_check_shared": 1, "row_fixup_in_graph": 2}, r.counts
    out, ref = r.outputs[0], model(x).detach()
    assert out[2].isnan().all() and torch.equal(out.isnan().any(-1), ref.isnan().any(-1))
    torch.testing.assert_close(out[torch.arange(6) != 2], ref[torch.arange(6) != 2], **TOL32)


@pytest.mark.parametrize("kernel,want", [("triton", "separate"), ("reference", "fused")])
def test_row_check_mode_after_template(kernel, want):
    """A GELU of a Triton template's output is that template's epilogue (no kernel the reduction
    could join): "separate"; after the reference kernel (an extern call) it is its own pointwise
    kernel, timed as options rules.pointwise_producer_check (set to "fused" here to tell the two
    apart)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from sparse_inductor.formats import compress_block
    from sparse_inductor.passes.row_checks import check_mode as _row_check_mode

    opts = sparse_inductor.SparseOptions(rules={"pointwise_producer_check": "fused"})

    w = torch.zeros(32, 16)
    w[:16, :16] = torch.randn(16, 16)
    t = compress_block(w, 16)

    def f(x):
        y = torch.ops.sparse_inductor.linear_block(x, *t, None, 32, 16, kernel)
        return torch.nn.functional.gelu(y) * 2

    gm = make_fx(f)(torch.randn(4, 16))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert _row_check_mode(out, torch.float32, opts) == want


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_row_check_mode_norm_after_template(kernel):
    """A norm of (template output + residual), as a ViT's LayerNorm after fc2: the norm is a
    reduction kernel of its own, which the check joins ("fused"), whatever made its input."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from sparse_inductor.formats import compress_block
    from sparse_inductor.passes.row_checks import check_mode as _row_check_mode

    w = torch.zeros(16, 16)
    w[:16, :16] = torch.randn(16, 16)
    t = compress_block(w, 16)

    def f(x):
        h = x + torch.ops.sparse_inductor.linear_block(x, *t, None, 16, 16, kernel)
        return (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, keepdim=True) + 1e-5)

    gm = make_fx(f)(torch.randn(4, 16))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert _row_check_mode(out, torch.float32, sparse_inductor.SparseOptions()) == "fused"


def test_int8_product_option_is_checked():
    from sparse_inductor.options import resolve_options

    with pytest.raises(ValueError, match="unknown int8_product 'fp32'"):
        resolve_options(options={"int8_product": "fp32"})
    opts, inductor = resolve_options(options={"int8_product": "int32", "force": True})
    assert opts.int8_product == "int32" and "int8_product" not in inductor


# ---- fc2's check from fc1's input (passes/derived_check.py)

class LibMlp(nn.Module):
    """norm -> fc1 -> act -> fc2 (+ x), both 2:4; act "gelu", "relu", "tanh" (not an activation the
    pass accepts) or "gated" (act(fc1(x)) * fc3(x): two layers meet)."""

    def __init__(self, d=32, h=64, act="gelu", norm=True, bias=True):
        super().__init__()
        self.norm = nn.LayerNorm(d) if norm else nn.Identity()
        self.fc1, self.fc2 = pruned_24(nn.Linear(d, h, bias=bias)), pruned_24(nn.Linear(h, d, bias=bias))
        self.fc3 = pruned_24(nn.Linear(d, h, bias=bias)) if act == "gated" else None
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU(), "tanh": nn.Tanh(), "gated": nn.SiLU()}[act]

    def forward(self, x):
        u = self.norm(x)
        a = self.act(self.fc1(u))
        if self.fc3 is not None:
            a = a * self.fc3(u)
        return x + self.fc2(a)


# the library passes' tests: h of any size gets the derived check (the tests' h is a few KiB)
DERIVE_ALWAYS = {"derived_lib_min_bytes": 0}


def _lib_run(model, x, rules=None, **opts):
    torch._dynamo.reset()
    return run_sparse(model, (x,), options={**OPTS, "fx_cache": False, "rules": {**DERIVE_ALWAYS, **(rules or {})},
                                            **opts})


def _same_rows_as_dense(out, ref, dtype):
    """The library path's contract: a row is non-finite where dense's is (wholly: the row fixup makes
    it NaN), and the finite rows are close to dense's."""
    bad = ~ref.isfinite().all(-1)
    assert torch.equal(~out.isfinite().all(-1), bad), (out, ref)
    assert out[bad].isnan().all()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else TOL32
    torch.testing.assert_close(out[~bad], ref[~bad], **tol)


class TestDerivedLibraryCheck(expecttest.TestCase):
    # (fc1's GELU stays in the graph here)
    RULES = {"lib_activation": False}

    def test_graph_and_decision(self):
        """No reduction over h: the flag joins the norm, and row_check(h, gd) reads h only where gd
        flags a row; the GELU stays pointwise."""
        model = seeded(LibMlp).to(torch.bfloat16)
        x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
        r = _lib_run(model, x, self.RULES)
        gm = r.graphs[0]
        assert gm.count("aten.sum.dim_IntList") == 2, gm  # fc1's check and the flag's, both over fc1's input
        self.assertIn("amax_default", gm)
        # (fc2's own check was row_check(h): the GELU is its own pointwise kernel; the pass gave it gd)
        self.assertIn("torch.ops.sparse_inductor.row_check.default(convert_element_type_default_3, mul_tensor_8)", gm)
        self.assertIn("aten.add.Tensor(row_check_default_1, 1)", gm)  # fc2's row fixup reads it
        fc2 = r.by_name("fc2")
        assert fc2.row_check == "from fc1's input (in its norm), then its own input in the rows that flags", fc2.line()
        assert r.counts["derived_lib_check"] == 1, r.counts
        assert "non-finite row check read from fc1's input (through the gelu)" in fc2.reason
        assert r.by_name("fc1").row_check == "in x's norm"
        _same_rows_as_dense(r.outputs[0], model(x).detach(), torch.bfloat16)

    def test_flagged_finite_row_stays_finite(self):
        """fp16 without a norm: a row of x large enough that fc1 might overflow (flag >= safe) is
        flagged, yet its h is finite, and so are dense's outputs: row_check(h, gd) gives 0 there, so
        the fixup leaves the row alone (gd as fc2's check would make it NaN). A finite row that does
        overflow fc1 is flagged and found: NaN, where dense's row is non-finite."""
        from sparse_inductor.lowering.block_mlp import safe_bound_from

        model = seeded(LibMlp, norm=False).to(torch.float16)
        l1, bmax = (float(t.detach().double().abs().sum(-1).max()) for t in (model.fc1.weight, model.fc1.bias))
        safe = safe_bound_from(l1, bmax, torch.float16)
        x = torch.randn(4, 32, dtype=torch.float16)
        x[2, 5] = safe * 1.05  # flagged; one entry times a column of W1 stays far below 65504
        j = int(model.fc1.weight.detach().float().abs().sum(1).argmax())
        x[3] = model.fc1.weight.detach()[j].sign() * 4e4  # finite, under fp16's limit, but fc1's unit j overflows
        ref = model(x).detach()
        assert ref[:3].isfinite().all() and not ref[3].isfinite().any() and safe * 1.05 < 65504
        r = _lib_run(model, x, self.RULES)
        assert r.by_name("fc2").row_check.startswith("from fc1's input (a pass over it)"), r.by_name("fc2").line()
        _same_rows_as_dense(r.outputs[0], ref, torch.float16)
        # and the flag did fire in that row: gd alone as fc2's check would have made it NaN
        from sparse_inductor.lowering.block_mlp import row_flag

        assert float(row_flag(x)[2]) >= safe

    def test_not_derived(self):
        """Each condition keeps fc2's own check over h: nonfinite="fast" (no checks), another tensor
        between the layers (a gated product), an op that is not a known activation, a NaN in b1 or in
        W1 (no bound), the rule off, and (the default rules.derived_lib_min_bytes) a small h."""
        # (the reason fc2's record gives; None: no check to derive, or another tensor enters: no pair)
        cases = [(seeded(LibMlp), {"nonfinite": "fast"}, None), (seeded(LibMlp, act="gated"), {}, None),
                 (seeded(LibMlp, act="tanh"), {}, "the ops between the two layers are not an activation we know")]
        nan_b1, nan_w1 = seeded(LibMlp), seeded(LibMlp)
        with torch.no_grad():
            nan_b1.fc1.bias[3] = float("nan")
            nan_w1.fc1.weight[5, nan_w1.fc1.weight[5].nonzero()[0]] = float("nan")  # a kept weight: every row of h NaN
        cases += [(m, {}, "fc1's weight or bias holds a NaN/Inf") for m in (nan_b1, nan_w1)]
        for model, opts, why in cases:
            model = model.to(torch.bfloat16)
            x = torch.randn(3, 32, dtype=torch.bfloat16)
            r = _lib_run(model, x, self.RULES, **opts)
            assert "then its own" not in r.by_name("fc2").row_check, r.by_name("fc2").line()
            said = "non-finite row check over its own input, not from fc1's"
            assert (f"{said}: {why}" in r.by_name("fc2").reason) if why else said not in r.by_name("fc2").reason, \
                r.by_name("fc2").line()
            assert "amax_default" not in r.graphs[0], r.graphs[0]  # (no flag over fc1's input)
            _same_rows_as_dense(r.outputs[0], model(x).detach(), torch.bfloat16)
        model, x = seeded(LibMlp).to(torch.bfloat16), torch.randn(3, 32, dtype=torch.bfloat16)
        for rules in ({"derived_lib_check": False}, {"derived_lib_min_bytes": 4 << 20}):
            r = _lib_run(model, x, {**self.RULES, **rules})
            # (h is the GELU's, a pointwise kernel that reads fc1's row fixup: fc2's check, one more read)
            assert r.by_name("fc2").row_check == "own kernel", r.by_name("fc2").line()
            assert "amax" not in r.graphs[0]
        assert "not from fc1's: fc2's input is small (0.0 MiB < 4)" in r.by_name("fc2").reason, r.by_name("fc2").line()


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_derived_library_check_nonfinite_rows(act, dtype):
    """NaN, +Inf and -Inf rows of x come out non-finite as in dense (through the norm: every
    entry of such a row is NaN after it); a row with a huge finite entry stays finite."""
    model = seeded(LibMlp, act=act).to(dtype)
    x = torch.randn(7, 32, dtype=dtype)
    x[1, 3], x[3, 0], x[5, 31] = float("nan"), float("inf"), float("-inf")
    x[6, 9] = torch.finfo(dtype).max / 4
    r = _lib_run(model, x)
    assert "then its own input in the rows" in r.by_name("fc2").row_check, r.by_name("fc2").line()
    ref = model(x).detach()
    assert ref[6].isfinite().all()
    _same_rows_as_dense(r.outputs[0], ref, dtype)


def test_derived_library_check_failure_keeps_own_check(monkeypatch):
    """An internal error in the pass leaves fc2 with its own check (and says so); the compile and
    the numbers are those without the pass."""
    from sparse_inductor.passes import row_checks

    def boom(*a, **k):
        raise RuntimeError("probe")

    monkeypatch.setattr(row_checks, "identify_activation", boom)
    model = seeded(LibMlp).to(torch.bfloat16)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    x[1, 2] = float("nan")
    r = _lib_run(model, x)
    fc2 = r.by_name("fc2")
    assert fc2.row_check == "own kernel" and "row check from fc1's input failed (RuntimeError: probe)" in fc2.reason
    assert r.counts["step_failed"] == 1 and "derived_lib_check" not in r.counts, r.counts
    _same_rows_as_dense(r.outputs[0], model(x).detach(), torch.bfloat16)


def _layers_seen(monkeypatch) -> dict:
    """The dispatcher's Layer per N, as linear_rewrite passes them to choose."""
    from sparse_inductor.passes import linear_rewrite

    seen, real = {}, linear_rewrite.choose

    def choose(layer, opts, timer):
        seen[layer.n] = layer
        return real(layer, opts, timer)

    monkeypatch.setattr(linear_rewrite, "choose", choose)
    return seen


def test_dispatcher_times_the_derived_check(monkeypatch):
    """fc2 (N 32) is timed with the check it will get from fc1's input (Layer.derived_check) where the
    pass will derive it, and with its own pass over h otherwise: nonfinite="fast", the rule off, a
    small h (rules.derived_lib_min_bytes), an activation the pass does not know; fc1 (N 64) never."""
    seen = _layers_seen(monkeypatch)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    r = _lib_run(seeded(LibMlp).to(torch.bfloat16), x)
    assert seen[32].derived_check and seen[32].row_check == "separate" and not seen[64].derived_check
    assert "then its own input in the rows" in r.by_name("fc2").row_check, r.by_name("fc2").line()
    for model, opts, rules in ((seeded(LibMlp), {"nonfinite": "fast"}, None),
                               (seeded(LibMlp), {}, {"derived_lib_check": False}),
                               (seeded(LibMlp), {}, {"derived_lib_min_bytes": 4 << 20}), (seeded(LibMlp, act="tanh"), {}, None)):
        seen.clear()
        _lib_run(model.to(torch.bfloat16), x, rules, **opts)
        assert not seen[32].derived_check, (opts, rules)


def test_timing_runner_with_the_derived_check(monkeypatch):
    """The library candidate of a layer whose check is derived is timed as the graph will run it:
    the call, the flagged-rows check reading only gd (none flagged: no row of x read, so a NaN in x
    does not reach y), the row fixup; "separate" instead sums x (the NaN row comes out NaN)."""
    from sparse_inductor.lowering import row_check
    from sparse_inductor.registry import Layer

    calls = []
    # (a library that skips the zeros of W = I: y = x, a NaN stays where it is)
    monkeypatch.setattr(cusparselt, "linear", lambda x, wc, bias, n, k, *a, **kw: x.clone())
    real = row_check.row_check_eager
    monkeypatch.setattr(row_check, "row_check_eager", lambda x, config=None, maybe=None: calls.append(maybe) or real(x, config, maybe))
    wc = torch.eye(32)  # (unread)
    x = torch.randn(16, 32)
    x[3, 4] = float("nan")
    for derived in (True, False):
        ly = Layer("2:4", 16, 32, 32, torch.float32, "cuda", row_check="separate", derived_check=derived)
        y = cusparselt_24._runner({"wc": wc}, None, ly, {"alg_id": 0})(x)
        assert y[3].isnan().all() != derived and y[torch.arange(16) != 3].isfinite().all()
    (maybe,) = calls
    assert maybe.shape == (16,) and maybe.dtype == torch.float32 and not maybe.any()


def test_derived_library_check_after_a_dense_fc1(monkeypatch):
    """fc1's 2:4 weight kept dense by the dispatcher (its addmm), fc2 on the library: fc2's check still
    comes from fc1's input; a NaN row and an Inf row come out as dense's."""
    from sparse_inductor.dispatch import Choice
    from sparse_inductor.passes import linear_rewrite

    real = linear_rewrite.choose

    def choose(layer, opts, timer):
        return Choice("dense", "kept dense (test)") if layer.n == 64 else real(layer, opts, timer)  # fc1: 32 -> 64

    monkeypatch.setattr(linear_rewrite, "choose", choose)
    model = seeded(LibMlp).to(torch.bfloat16)
    x = torch.randn(2, 6, 32, dtype=torch.bfloat16)
    x[0, 2, 5], x[1, 4, 0] = float("nan"), float("inf")
    r = _lib_run(model, x)
    assert [d.kernel for d in r.decisions] == ["dense", "cusparselt"], [d.line() for d in r.decisions]
    assert "then its own input in the rows" in r.by_name("fc2").row_check, r.by_name("fc2").line()
    assert "aten.addmm.default" in r.graphs[0] and "amax_default" in r.graphs[0]
    _same_rows_as_dense(r.outputs[0].reshape(-1, 32), model(x).detach().reshape(-1, 32), torch.bfloat16)


# ---- fc1's activation in the library's epilogue (passes/lib_activation.py)

@pytest.mark.parametrize("act,dtype", [("gelu", torch.bfloat16), ("relu", torch.bfloat16), ("relu", torch.float16)])
def test_library_activation(act, dtype):
    """fc1's activation moves into the op (the emulated library computes the graph's), its row fixup
    with it; no erf / GELU op left in the graph; NaN / Inf rows as dense, the rest within the dtype's
    tolerance of fp64 (the library rounds once where the graph rounded y1 first)."""
    model = seeded(LibMlp, act=act).to(dtype)
    x = torch.randn(2, 6, 32, dtype=dtype)
    x[0, 1, 3], x[1, 2, 0] = float("nan"), float("-inf")
    r = _lib_run(model, x)
    gm = r.graphs[0]
    assert f"activation = '{act}', row_check = sum_dim_int_list)" in gm, gm
    assert "aten.erf" not in gm and "aten.relu" not in gm and "aten.where" not in gm, gm
    fc1 = r.by_name("fc1")
    assert act in fc1.fused and f"the {act} in cuSPARSELt's epilogue" in fc1.reason, fc1.line()
    assert r.counts["lib_activation"] == 1, r.counts
    ref = model(x).detach().reshape(-1, 32)
    _same_rows_as_dense(r.outputs[0].reshape(-1, 32), ref, dtype)
    ref64 = copy.deepcopy(model).double()(x.double()).detach().reshape(-1, 32)
    fin = ref.isfinite().all(-1)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(r.outputs[0].reshape(-1, 32)[fin].double(), ref64[fin], rtol=tol, atol=tol)


def test_library_activation_refused(monkeypatch):
    """A library whose GELU is the tanh approximation does not get an erf GELU (the decision says why);
    the same library does get a tanh GELU; a ReLU whose NaN is 0 is refused; y1 read elsewhere too
    keeps the activation in the graph."""
    monkeypatch.setitem(EMULATED_ACTIVATIONS, "gelu", ACTIVATIONS["gelu_tanh"].fn)
    model, x = seeded(LibMlp).to(torch.bfloat16), torch.randn(3, 32, dtype=torch.bfloat16)
    r = _lib_run(model, x)
    assert "activation =" not in r.graphs[0] and "aten.erf" in r.graphs[0]
    assert "gelu not in cuSPARSELt's epilogue: the library's gelu is not the graph's gelu" in r.by_name("fc1").reason
    tanh_model = seeded(LibMlp).to(torch.bfloat16)
    tanh_model.act = nn.GELU(approximate="tanh")
    r = _lib_run(tanh_model, x)
    assert "activation = 'gelu'" in r.graphs[0], r.graphs[0]
    assert "the gelu_tanh in cuSPARSELt's epilogue" in r.by_name("fc1").reason
    assert "then its own input in the rows" in r.by_name("fc2").row_check  # (|gelu_tanh(t)| <= |t| too)
    _same_rows_as_dense(r.outputs[0], tanh_model(x).detach(), torch.bfloat16)

    monkeypatch.setitem(EMULATED_ACTIVATIONS, "relu", lambda t: torch.where(t > 0, t, 0.0))  # relu(NaN) = 0
    relu_model = seeded(LibMlp, act="relu").to(torch.bfloat16)
    r = _lib_run(relu_model, x)
    assert "activation =" not in r.graphs[0] and "differs from the graph's relu at NaN" in r.by_name("fc1").reason

    class Twice(LibMlp):  # y1 also feeds the output: it must be computed anyway
        def forward(self, x):
            y1 = self.fc1(self.norm(x))
            return self.fc2(self.act(y1)) + y1[:, :32]

    r = _lib_run(seeded(Twice).to(torch.bfloat16), x)
    assert "activation =" not in r.graphs[0]


def test_library_activation_fp16_gelu_stays():
    """fp16: a finite x can overflow fc1's fp16 output; the graph's GELU then sees -Inf (NaN), where
    the library would see the finite fp32 sum (-0): the GELU stays in the graph, and dense's NaN row
    comes out (the derived check finds it in h)."""
    model = seeded(LibMlp, norm=False).to(torch.float16)
    x = torch.randn(3, 32, dtype=torch.float16)
    j = int(model.fc1.weight.detach().float().abs().sum(1).argmax())
    x[1] = -model.fc1.weight.detach()[j].sign() * 4e4  # fc1's unit j: about -7e4, beyond fp16's range
    r = _lib_run(model, x)
    assert "activation =" not in r.graphs[0]
    assert "gelu not in cuSPARSELt's epilogue: fp16" in r.by_name("fc1").reason, r.by_name("fc1").line()
    ref = model(x).detach()
    assert not ref[1].isfinite().any()
    _same_rows_as_dense(r.outputs[0], ref, torch.float16)


def test_library_activation_rule():
    model, x = seeded(LibMlp).to(torch.bfloat16), torch.randn(3, 32, dtype=torch.bfloat16)
    r = _lib_run(model, x, {"lib_activation": False})
    assert "activation =" not in r.graphs[0] and "gelu" not in r.by_name("fc1").fused


@settings(max_examples=8, deadline=None)
@given(d=st.sampled_from([16, 32, 48]), h=st.sampled_from([32, 64, 96]), m=st.integers(1, 9),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), act=st.sampled_from(["gelu", "relu"]),
       norm=st.booleans(), bad=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 47),
                                                   st.sampled_from(["nan", "inf", "-inf", "big", "-big"])), max_size=4))
def test_derived_and_library_passes_any_input(d, h, m, dtype, act, norm, bad):
    """Any shape, dtype, activation and placement of NaN / Inf / huge values (huge: near the dtype's
    largest, so fc1 may overflow): the rows that come out non-finite are dense's, and they are NaN;
    the rows without a special value are close to dense's (both passes on, any size of h). Dense here
    is the model compiled by plain Inductor: its LayerNorm of a row holding a huge value gives 0s
    where eager's gives NaN. (A row with a huge but finite value is not compared by value: its
    outputs are sums of terms of ~1e4 (fp16) that cancel, so any two summation orders differ by far
    more than the tolerance.)"""
    model = seeded(LibMlp, d=d, h=h, act=act, norm=norm).to(dtype)
    x = torch.randn(m, d, dtype=dtype)
    big = torch.finfo(dtype).max / 2
    for r, c, v in bad:
        x[r % m, c % d] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "big": big,
                           "-big": -big}[v]
    r = _lib_run(model, x)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = torch.compile(model)(x)
    out = r.outputs[0]
    nonfinite = ~ref.isfinite().all(-1)
    assert torch.equal(~out.isfinite().all(-1), nonfinite), (out, ref)
    assert out[nonfinite].isnan().all()
    plain = torch.ones(m, dtype=torch.bool)
    for row, _, _ in bad:
        plain[row % m] = False
    torch.testing.assert_close(out[plain], ref[plain], rtol=2e-2, atol=2e-2)


def test_library_activation_refused_by_the_plan(monkeypatch):
    """A layer whose algorithm (chosen without the activation) refuses the activation keeps it in the
    graph: the plan is made at compile time, not found failing at run time."""
    def refusing(x, wc, bias, n, k, alg_id=0, split_k=1, out_dtype=None, alpha=None, activation=None):
        if activation is not None and n != k:  # (the identity probe, n == k, passes)
            raise RuntimeError("cuSPARSELt: not supported")
        return _emulated_linear(x, wc, bias, n, k, alg_id, split_k, out_dtype, alpha, activation=activation)

    monkeypatch.setattr(cusparselt, "linear", refusing)
    model, x = seeded(LibMlp).to(torch.bfloat16), torch.randn(3, 32, dtype=torch.bfloat16)
    r = _lib_run(model, x)
    assert "activation =" not in r.graphs[0]
    assert "gelu not in cuSPARSELt's epilogue: the library refused it with alg_id 0" in r.by_name("fc1").reason
    _same_rows_as_dense(r.outputs[0], model(x).detach(), torch.bfloat16)


def test_faulting_algorithm_ids_are_never_offered(monkeypatch):
    """cuSPARSELt 0.8.0's fp16 algorithm ids from 36 up fault the H100 (FAULTING_ALGS): the variants
    the dispatcher times stop below them, and a call naming one is refused before it launches."""
    from sparse_inductor.runtime import cusparselt as cslt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cslt, "version", lambda: 800)
    assert list(cslt.safe_alg_ids(51, torch.float16)) == list(range(36))
    assert list(cslt.safe_alg_ids(20, torch.float16)) == list(range(21))
    assert list(cslt.safe_alg_ids(51, torch.bfloat16)) == list(range(52))
    assert cslt.faulting_alg(35, torch.float16) is None
    assert "from 36 up fault sm90 with float16" in cslt.faulting_alg(36, torch.float16)
    monkeypatch.setattr(cslt, "version", lambda: 900)  # another library: nothing known
    assert list(cslt.safe_alg_ids(51, torch.float16)) == list(range(52))


# ---------------------------------------------------------------- a weight behind a column order

class Scrambled24(nn.Module):
    """A 2:4 weight whose columns the model holds shuffled (prune(..., permute=True))."""

    def __init__(self, k=32, n=32):
        super().__init__()
        self.fc = nn.Linear(k, n)
        sparse_inductor.prune(self, "2:4", permute=True)

    def forward(self, x):
        return self.fc(x) * 2


class TestPermuted(expecttest.TestCase):
    def test_golden_x_gathered_before_the_call(self):
        """cuSPARSELt has no gather of its own: x is gathered before the call (an index_select
        Inductor fuses with x's producer where it can); the row check sums x's row as it is."""
        model = seeded(Scrambled24)
        x = torch.randn(4, 32)
        x[1, 5], x[2, 30] = float("nan"), float("inf")
        torch._dynamo.reset()
        r = run_sparse(model, (x,), options=OPTS)
        (d,) = r.decisions
        assert not r.notes, r.notes
        assert d.kernel == "cusparselt" and d.reason.startswith("2:4 after column permutation"), d.line()
        assert d.permutation == "x gathered before the call" and r.counts["permutation_gather"] == 1
        out, ref = r.outputs[0], model(x).detach()
        assert torch.equal(out.isfinite(), ref.isfinite())
        torch.testing.assert_close(out[ref.isfinite()], ref[ref.isfinite()], **TOL32)
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg2_1: "f32[4, 32]"):
_sparse_1_x_index: "i32[32]" = self._sparse_1_x_index
_sparse_0_wc: "f32[32, 32]" = self._sparse_0_wc
arg1_1: "f32[32]" = self._frozen_param1
index_tensor: "f32[4, 32]" = torch.ops.aten.index.Tensor(arg2_1, [None, _sparse_1_x_index])
row_check_default: "f32[4]" = torch.ops.sparse_inductor.row_check.default(arg2_1)
linear_cslt_default: "f32[4, 32]" = torch.ops.sparse_inductor.linear_cslt.default(index_tensor, _sparse_0_wc, arg1_1, 32, 32, 0, 1)
add_tensor: "f32[4]" = torch.ops.aten.add.Tensor(row_check_default, 1)
unsqueeze_default: "f32[4, 1]" = torch.ops.aten.unsqueeze.default(add_tensor, 1)
mul_tensor: "f32[4, 32]" = torch.ops.aten.mul.Tensor(linear_cslt_default, unsqueeze_default)
mul: "f32[4, 32]" = torch.ops.aten.mul.Tensor(mul_tensor, 2)
return (mul,)""")


def test_permuted_runner_gathers_x():
    """The timing runner of a column-permuted layer gathers x before the library call."""
    from sparse_inductor.registry import Layer

    w = torch.randn(8, 16)
    cols = torch.randperm(16)
    ly = Layer("2:4", 3, 8, 16, torch.float32, "cuda", row_check="none", x_index=True)
    x = torch.randn(3, 16)
    y = cusparselt_24._runner({"wc": w, "x_index": cols}, None, ly, {"alg_id": 0})(x)
    torch.testing.assert_close(y, x[:, cols] @ w.t(), **TOL32)
