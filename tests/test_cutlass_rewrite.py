"""The CUTLASS family in the compiler, on CPU: the rewrite into sparse_inductor::linear_cutlass and the
epilogues passes/cutlass_epilogue.py folds into it (golden graphs, counters, explain's "fused"
column), numerics against fp64 with NaN / Inf rows and a dynamic batch, what the dispatcher is told
(Layer.epilogue: the kernels timed are the kernels the graph runs), and why the family is not a
candidate where it cannot run. Nothing here builds a library: on CPU the op runs its reference
implementation, which multiplies only the stored values of each group of four as the sparse tensor
cores do (a NaN / Inf meeting only pruned zeros stays away from the output), so the row check is
what gives dense's non-finite rows back. The family is made forceable on CPU as the cuSPARSELt
tests emulate theirs: its spec with the CPU among its devices and the shape check only.
The compiled models on the real kernels: test_gpu_cutlass.py (marked gpu).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import expecttest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass

import sparse_inductor
from sparse_inductor import measure, registry
from sparse_inductor.dispatch import choose
from sparse_inductor.formats import cutlass_sm90 as cf
from sparse_inductor.lowering import cutlass_24 as c24
from sparse_inductor.options import SparseOptions
from sparse_inductor.passes import cutlass_epilogue, linear_rewrite
from sparse_inductor.registry import Fusion, Layer, Scaled
from sparse_inductor.runtime import cutlass as rt

from test_backend import TOLERANCES, graph_text, pruned_24, run_sparse, seeded
from test_cusparselt_rewrite import W8A8Linear
from test_fp8 import fp8_input, fp8_model

OPTS = {"force": True, "kernel": "cutlass"}
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def cutlass_on_cpu(monkeypatch):
    """The family a candidate on CPU too, its check the shapes and dtypes only (no device, no
    toolchain): its op's reference implementation runs."""
    spec = registry._KERNELS["2:4/cutlass"]
    monkeypatch.setitem(registry._KERNELS, "2:4/cutlass",
                        dataclasses.replace(spec, devices=("cpu", "cuda"), check=c24.layer_why_not))


# ---------------------------------------------------------------- models

class Act(nn.Module):
    """fc, then an activation: "relu", "gelu", "gelu_tanh", "silu", "tanh" (not one the epilogue has)."""

    def __init__(self, act="relu", k=32, n=64, bias=True):
        super().__init__()
        self.fc = pruned_24(nn.Linear(k, n, bias=bias))
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(),
                    "tanh": nn.Tanh()}[act]

    def forward(self, x):
        return self.act(self.fc(x))


class Residual(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.fc = pruned_24(nn.Linear(d, d))

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class LlamaMLP(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.w1 = pruned_24(nn.Linear(d, h, bias=False))
        self.w3 = pruned_24(nn.Linear(d, h, bias=False))
        self.w2 = pruned_24(nn.Linear(h, d, bias=False))

    def forward(self, x):
        return x + self.w2(F.silu(self.w1(x)) * self.w3(x))


class SiluTimes(nn.Module):
    """silu(fc(x)) * t, t a graph input (not a linear's output): the gate on the SiLU's side."""

    def __init__(self, k=32, n=64):
        super().__init__()
        self.fc = pruned_24(nn.Linear(k, n, bias=False))

    def forward(self, x, t):
        return F.silu(self.fc(x)) * t


def _fp64(model: nn.Module, *xs) -> torch.Tensor:
    return copy.deepcopy(model).double()(*(x.double() for x in xs)).detach()


def _check_fp64(out: torch.Tensor, ref64: torch.Tensor, dtype=BF16) -> None:
    """Rows non-finite exactly where dense's are, and NaN there (the row check); the others within
    the fp64 tolerance of test_backend (a few roundings of the dtype; here one fewer)."""
    out = out.reshape(-1, out.shape[-1])
    ref64 = ref64.reshape(-1, ref64.shape[-1])
    bad = ~ref64.isfinite().all(-1)
    assert torch.equal(~out.isfinite().all(-1), bad), (out, ref64)
    assert out[bad].isnan().all()
    tol = TOLERANCES[("fp64", dtype)]
    good = out[~bad].double()
    scale = max(1.0, float(ref64[~bad].abs().max())) if good.numel() else 1.0
    torch.testing.assert_close(good, ref64[~bad], rtol=tol["rtol"], atol=tol["atol"] * scale)


def _with_nonfinite(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    flat = x.reshape(-1, x.shape[-1])
    flat[1, 3], flat[2, 0] = float("nan"), float("inf")
    return x


# ---------------------------------------------------------------- golden graphs

class TestCutlassGraphs(expecttest.TestCase):
    """The graph after the sparse passes. Regenerate with EXPECTTEST_ACCEPT=1, then read the diff."""

    def run_model(self, model, *xs, counts=None, fused=None, options=OPTS):
        torch._dynamo.reset()
        r = run_sparse(model, xs, options=options)
        assert all(d.kernel == "cutlass" for d in r.decisions if d.pattern == "2:4"), [d.line() for d in r.decisions]
        if counts is not None:
            assert r.counts == counts, r.counts
        if fused is not None:
            assert [d.fused for d in r.decisions] == fused, [d.line() for d in r.decisions]
        return r

    def test_golden_relu(self):
        model = seeded(Act, "relu").to(BF16)
        x = torch.randn(4, 32, dtype=BF16)
        r = self.run_model(model, x, counts={"rewrite": 1, "cutlass_relu": 1},
                           fused=[("transpose", "bias", "relu")])
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg2_1: "bf16[4, 32]"):
_sparse_0_values: "bf16[64, 16]" = self._sparse_0_values
_sparse_0_meta_128: "u8[64, 16]" = self._sparse_0_meta_128
arg1_1: "bf16[64]" = self._frozen_param1
row_check_default: "f32[4]" = torch.ops.sparse_inductor.row_check.default(arg2_1)
linear_cutlass_default_1: "bf16[4, 64]" = torch.ops.sparse_inductor.linear_cutlass.default(arg2_1, _sparse_0_values, _sparse_0_meta_128, arg1_1, 64, 32, '128x16x256_1x1_warpspecialized', row_check = row_check_default, activation = 'relu')
return (linear_cutlass_default_1,)""")

    def test_golden_llama_mlp(self):
        """w3 takes the gate (v * silu(w1's output)), w2 the residual: one op per linear, nothing after."""
        model = seeded(LlamaMLP).to(BF16)
        x = torch.randn(4, 32, dtype=BF16)
        r = self.run_model(model, x, counts={"rewrite": 3, "row_check_shared": 1, "cutlass_silu_gate": 1,
                                             "cutlass_residual": 1},
                           fused=[("transpose",), ("transpose", "silu gate"), ("transpose", "residual")])
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg3_1: "bf16[4, 32]"):
_sparse_2_values: "bf16[32, 32]" = self._sparse_2_values
_sparse_2_meta_128: "u8[64, 16]" = self._sparse_2_meta_128
_sparse_1_values: "bf16[64, 16]" = self._sparse_1_values
_sparse_1_meta_128: "u8[64, 16]" = self._sparse_1_meta_128
_sparse_0_values: "bf16[64, 16]" = self._sparse_0_values
_sparse_0_meta_128: "u8[64, 16]" = self._sparse_0_meta_128
row_check_default: "f32[4]" = torch.ops.sparse_inductor.row_check.default(arg3_1)
linear_cutlass_default: "bf16[4, 64]" = torch.ops.sparse_inductor.linear_cutlass.default(arg3_1, _sparse_0_values, _sparse_0_meta_128, None, 64, 32, '128x16x256_1x1_warpspecialized', row_check = row_check_default)
linear_cutlass_default_3: "bf16[4, 64]" = torch.ops.sparse_inductor.linear_cutlass.default(arg3_1, _sparse_1_values, _sparse_1_meta_128, None, 64, 32, '128x16x256_1x1_warpspecialized', row_check = row_check_default, gate = 'silu_aux', aux = linear_cutlass_default)
row_check_default_1: "f32[4]" = torch.ops.sparse_inductor.row_check.default(linear_cutlass_default_3)
linear_cutlass_default_4: "bf16[4, 32]" = torch.ops.sparse_inductor.linear_cutlass.default(linear_cutlass_default_3, _sparse_2_values, _sparse_2_meta_128, None, 32, 64, '128x16x256_1x1_warpspecialized', row_check = row_check_default_1, residual = True, aux = arg3_1)
return (linear_cutlass_default_4,)""")

    def test_golden_llama_mlp_concatenated_3d(self):
        """w1 and w3 concatenated by freezing (as always on CUDA): split into one op per piece, each its
        own weight, the gate in w3's; the 3-D input's views sink below the ops."""
        model = seeded(LlamaMLP).to(BF16)
        x = torch.randn(2, 3, 32, dtype=BF16)
        with torch._inductor.config.patch({"cpp.enable_concat_linear": True}):
            r = self.run_model(model, x, counts={"rewrite": 2, "cutlass_split": 1, "cutlass_silu_gate": 1,
                                                 "cutlass_residual": 1, "views_sunk": 8},
                               fused=[("transpose", "split", "silu gate"), ("transpose", "residual")])
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg3_1: "bf16[2, 3, 32]"):
_sparse_1_values: "bf16[32, 32]" = self._sparse_1_values
_sparse_1_meta_128: "u8[64, 16]" = self._sparse_1_meta_128
view: "bf16[6, 32]" = torch.ops.aten.reshape.default(arg3_1, [6, 32])
row_check_default: "f32[6]" = torch.ops.sparse_inductor.row_check.default(view)
_sparse_cutlass_piece_values: "bf16[64, 16]" = self._sparse_cutlass_piece_values
_sparse_cutlass_piece_meta: "u8[64, 16]" = self._sparse_cutlass_piece_meta
_sparse_cutlass_piece_values_1: "bf16[64, 16]" = self._sparse_cutlass_piece_values_1
_sparse_cutlass_piece_meta_1: "u8[64, 16]" = self._sparse_cutlass_piece_meta_1
linear_cutlass_default_3: "bf16[6, 64]" = torch.ops.sparse_inductor.linear_cutlass.default(view, _sparse_cutlass_piece_values_1, _sparse_cutlass_piece_meta_1, None, 64, 32, '128x16x256_1x1_warpspecialized', row_check = row_check_default)
linear_cutlass_default_4: "bf16[6, 64]" = torch.ops.sparse_inductor.linear_cutlass.default(view, _sparse_cutlass_piece_values, _sparse_cutlass_piece_meta, None, 64, 32, '128x16x256_1x1_warpspecialized', row_check = row_check_default, gate = 'silu_aux', aux = linear_cutlass_default_3)
row_check_default_1: "f32[6]" = torch.ops.sparse_inductor.row_check.default(linear_cutlass_default_4)
reshape_default: "bf16[6, 32]" = torch.ops.aten.reshape.default(arg3_1, [6, 32])
linear_cutlass_default_5: "bf16[6, 32]" = torch.ops.sparse_inductor.linear_cutlass.default(linear_cutlass_default_4, _sparse_1_values, _sparse_1_meta_128, None, 32, 64, '128x16x256_1x1_warpspecialized', row_check = row_check_default_1, residual = True, aux = reshape_default)
reshape_default_1: "bf16[2, 3, 32]" = torch.ops.aten.reshape.default(linear_cutlass_default_5, [2, 3, 32])
return (reshape_default_1,)""")

    def test_golden_silu_gate_on_the_silu_side(self):
        model = seeded(SiluTimes).to(BF16)
        x, t = torch.randn(4, 32, dtype=BF16), torch.randn(4, 64, dtype=BF16)
        r = self.run_model(model, x, t, counts={"rewrite": 1, "cutlass_silu_gate": 1})
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg1_1: "bf16[4, 32]", arg2_1: "bf16[4, 64]"):
_sparse_0_values: "bf16[64, 16]" = self._sparse_0_values
_sparse_0_meta_128: "u8[64, 16]" = self._sparse_0_meta_128
row_check_default: "f32[4]" = torch.ops.sparse_inductor.row_check.default(arg1_1)
linear_cutlass_default_1: "bf16[4, 64]" = torch.ops.sparse_inductor.linear_cutlass.default(arg1_1, _sparse_0_values, _sparse_0_meta_128, None, 64, 32, '128x16x256_1x1_warpspecialized', row_check = row_check_default, gate = 'silu_acc', aux = arg2_1)
return (linear_cutlass_default_1,)""")
        _check_fp64(r.outputs[0], _fp64(model, x, t))

    def test_golden_int8_dequantization(self):
        """torch._int_mm(xq, Wq^T) * s * w_scale -> bf16 + bias: scales, cast and bias in the epilogue,
        the product exact (not read back through bf16)."""
        model = W8A8Linear(k=64, n=32).eval()
        x = torch.randn(8, 64, dtype=BF16)
        r = self.run_model(model, x, counts={"rewrite": 1, "cutlass_scales": 1, "cutlass_cast": 1, "cutlass_bias": 1},
                           fused=[("transpose", "scales", "bias", "cast")])
        (d,) = r.decisions
        assert "int8 product" not in d.reason, d.line()
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg3_1: "bf16[8, 64]"):
_sparse_0_values: "i8[32, 32]" = self._sparse_0_values
_sparse_0_meta_128: "u8[64, 16]" = self._sparse_0_meta_128
arg0_1: "bf16[32]" = self._frozen_param0
arg2_1: "f32[32]" = self._frozen_param2
convert_element_type_1: "f32[8, 64]" = torch.ops.prims.convert_element_type.default(arg3_1, torch.float32)
abs_1: "bf16[8, 64]" = torch.ops.aten.abs.default(arg3_1)
amax: "bf16[8, 1]" = torch.ops.aten.amax.default(abs_1, [-1], True)
convert_element_type: "f32[8, 1]" = torch.ops.prims.convert_element_type.default(amax, torch.float32)
clamp_min: "f32[8, 1]" = torch.ops.aten.clamp_min.default(convert_element_type, 1e-05)
div: "f32[8, 1]" = torch.ops.aten.div.Tensor(clamp_min, 127)
div_1: "f32[8, 64]" = torch.ops.aten.div.Tensor(convert_element_type_1, div)
round_1: "f32[8, 64]" = torch.ops.aten.round.default(div_1)
clamp_min_1: "f32[8, 64]" = torch.ops.aten.clamp_min.default(round_1, -128)
clamp_max: "f32[8, 64]" = torch.ops.aten.clamp_max.default(clamp_min_1, 127)
convert_element_type_2: "i8[8, 64]" = torch.ops.prims.convert_element_type.default(clamp_max, torch.int8)
reshape_default: "f32[8]" = torch.ops.aten.reshape.default(div, [-1])
linear_cutlass_default_1: "bf16[8, 32]" = torch.ops.sparse_inductor.linear_cutlass.default(convert_element_type_2, _sparse_0_values, _sparse_0_meta_128, arg0_1, 32, 64, '128x16x256_1x1_warpspecialized', out_dtype = torch.bfloat16, weight_scale = arg2_1, token_scale = reshape_default)
return (linear_cutlass_default_1,)""")

    def test_golden_fp8_rowwise(self):
        """torch._scaled_mm with row-wise scales: scales, bias, row guard and cast in the epilogue."""
        model = fp8_model(rowwise=True)
        xq, s = fp8_input(rowwise=True)
        r = self.run_model(model, xq, s, counts={"rewrite": 1, "cutlass_scales": 1, "cutlass_cast": 1,
                                                 "cutlass_bias": 1})
        (d,) = r.decisions
        assert "cuSPARSELt" not in d.reason, d.line()
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg3_1: "f32[16, 1]", arg4_1: "f8e4m3fn[16, 64]"):
_sparse_0_values: "f8e4m3fn[32, 32]" = self._sparse_0_values
_sparse_0_meta_128: "u8[64, 16]" = self._sparse_0_meta_128
arg0_1: "bf16[32]" = self._frozen_param0
arg2_1: "f32[1, 32]" = self._frozen_param2
convert_element_type_default: "f32[16, 64]" = torch.ops.prims.convert_element_type.default(arg4_1, torch.float32)
mul_tensor: "f32[16, 64]" = torch.ops.aten.mul.Tensor(convert_element_type_default, 0.0)
sum_dim_int_list: "f32[16, 1]" = torch.ops.aten.sum.dim_IntList(mul_tensor, [1], True)
reshape_default: "f32[32]" = torch.ops.aten.reshape.default(arg2_1, [-1])
reshape_default_1: "f32[16]" = torch.ops.aten.reshape.default(arg3_1, [-1])
reshape_default_2: "f32[16]" = torch.ops.aten.reshape.default(sum_dim_int_list, [-1])
linear_cutlass_default_1: "bf16[16, 32]" = torch.ops.sparse_inductor.linear_cutlass.default(arg4_1, _sparse_0_values, _sparse_0_meta_128, arg0_1, 32, 64, '128x16x256_1x1_warpspecialized', out_dtype = torch.bfloat16, weight_scale = reshape_default, token_scale = reshape_default_1, row_check = reshape_default_2)
return (linear_cutlass_default_1,)""")


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu"])
def test_activation_numerics_nonfinite_rows(act):
    model = seeded(Act, act).to(BF16)
    x = _with_nonfinite(torch.randn(6, 32, dtype=BF16))
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    (d,) = r.decisions
    assert {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu (tanh)", "silu": "silu"}[act] in d.fused, d.line()
    assert r.counts[f"cutlass_{act}"] == 1
    assert "aten.erf" not in r.graphs[0] and "aten.tanh" not in r.graphs[0] and "aten.exp" not in r.graphs[0]
    _check_fp64(r.outputs[0], _fp64(model, x))


def test_llama_mlp_dynamic_batch_nonfinite_rows():
    """One compile for every batch size (dynamic M), rows with NaN / Inf as dense's, the rest close to fp64."""
    model = seeded(LlamaMLP).to(BF16)
    xs = [(_with_nonfinite(torch.randn(m, 32, dtype=BF16)),) for m in (5, 9, 17)]
    torch._dynamo.reset()
    r = run_sparse(model, *xs, options=OPTS, dynamic=True)
    assert len(r.graphs) == 1 and "s" in r.graphs[0].splitlines()[0], r.graphs[0].splitlines()[0]
    for (x,), out in zip(xs, r.outputs):
        _check_fp64(out, _fp64(model, x))


def test_residual_numerics_3d():
    model = seeded(Residual).to(BF16)
    x = _with_nonfinite(torch.randn(2, 5, 32, dtype=BF16))
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    (d,) = r.decisions
    assert d.fused == ("transpose", "bias", "relu", "residual"), d.line()
    _check_fp64(r.outputs[0], _fp64(model, x))


def test_int8_numerics_against_fp64():
    """The dequantized product in fp32, one rounding: within bf16's rounding of the fp64 dequantization
    of the same int8 values (and the bias added in fp32, where the graph rounds before it)."""
    model = W8A8Linear(k=128, n=64).eval()
    x = torch.randn(16, 128, dtype=BF16) * 3
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-5) / 127
    xq = (x.float() / s).round().clamp(-128, 127)
    ref = (xq.double() @ model.wq.double().t()) * s.double() * model.w_scale.double() + model.bias.detach().double()
    torch.testing.assert_close(r.outputs[0].double(), ref, rtol=2 ** -8, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("rowwise", [False, True])
def test_fp8_numerics_and_nan_rows(rowwise):
    model = fp8_model(rowwise=rowwise)
    xq, s = fp8_input(rowwise=rowwise)
    xq[2, 5] = float("nan")
    torch._dynamo.reset()
    r = run_sparse(model, (xq, s), options=OPTS)
    out, ref = r.outputs[0], model.fp64(xq, s)
    assert out[2].isnan().all() and out[torch.arange(16) != 2].isfinite().all()
    keep = torch.arange(16) != 2
    torch.testing.assert_close(out[keep].double(), ref[keep], rtol=2 ** -8, atol=1e-5 * float(ref[keep].abs().max()))


@pytest.mark.parametrize("fast", [False, True])
def test_fp8_fast_accum_only_where_the_model_asks(fast):
    """torch._scaled_mm(use_fast_accum=True): the layer's candidates are the FP8FastAccum
    configs and the untimed (forced) call takes its bucket's first config in that form; with
    False no fast config is a candidate (its accumulation is less precise than the model's)."""
    model = fp8_model(rowwise=True)
    model.fast_accum = fast
    xq, s = fp8_input(rowwise=True)
    torch._dynamo.reset()
    r = run_sparse(model, (xq, s), options=OPTS)
    (d,) = [d for d in r.decisions if d.kernel == "cutlass"]
    assert ("_fastacc'" in r.graphs[0]) == fast, r.graphs[0]
    ref = model.fp64(xq, s)
    torch.testing.assert_close(r.outputs[0].double(), ref, rtol=2 ** -8, atol=1e-5 * float(ref.abs().max()))
    layer = Layer("2:4", 8192, 256, 512, torch.float8_e4m3fn, "cuda", scaled=Scaled("lib16", BF16, True, True, fast))
    tags = [c24._tag_of(p) for p in c24._all_params(layer)]
    assert all(("_fastacc" in t) == fast for t in tags), tags  # (fast: the FP8FastAccum configs only)
    cfgs = c24.configs_for(8192, "e4m3", fast_accum=fast)
    assert len(tags) == sum(len(c24.STREAMK_SPLITS) if c.scheduler == "streamk" else 1 for c in cfgs)


def test_reference_skips_the_pruned_zeros():
    """The op's reference is the tensor cores' product: a NaN meeting only pruned zeros leaves the
    output finite, one meeting a stored slot (a half-empty group's zero included) makes it NaN, an
    Inf meeting a stored value an Inf of its sign; the row check gives dense's rows back."""
    w = torch.zeros(8, 16, dtype=BF16)
    w[:, 0], w[:, 5], w[:, 6] = 1.0, -2.0, 0.5  # groups: (0) one nonzero at 0 -> slots (0, 3); (5, 6); none
    values, meta = cf.compress(w, 128)
    x = torch.zeros(4, 16, dtype=BF16)
    x[0, 1] = float("nan")  # pruned position of group 0: not read
    x[1, 3] = float("nan")  # group 0's stored zero slot: NaN
    x[2, 5] = float("inf")  # meets -2: -Inf
    x[3, 9] = float("-inf")  # an empty group: its slots (8, 8) read position 8 only
    tag = c24.config_tag(c24.configs_for(4)[0])
    y = torch.ops.sparse_inductor.linear_cutlass(x, values, meta, None, 8, 16, tag)
    assert y[0].isfinite().all() and y[1].isnan().all() and torch.isneginf(y[2]).all() and y[3].isfinite().all()
    g = torch.ops.sparse_inductor.row_check(x)
    yc = torch.ops.sparse_inductor.linear_cutlass(x, values, meta, None, 8, 16, tag, row_check=g)
    assert yc.isnan().all()  # every row of x holds a NaN / Inf: dense's rows are all non-finite


def test_nonfinite_fast_has_no_row_check():
    model = seeded(Act, "relu").to(BF16)
    x = torch.randn(4, 32, dtype=BF16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options={**OPTS, "nonfinite": "fast"})
    assert "row_check" not in r.graphs[0] and "activation = 'relu'" in r.graphs[0], r.graphs[0]
    assert r.decisions[0].row_check == "off"
    _check_fp64(r.outputs[0], _fp64(model, x))


# ---------------------------------------------------------------- what is not fused, and why

def test_fp16_keeps_gelu_and_gate_in_the_graph():
    """fp16: where the fp32 sum overflows 65504 the graph's GELU / product sees Inf and the kernel's
    would not: they stay Inductor kernels (the decision says why); ReLU moves (it commutes with the
    rounding)."""
    model = seeded(Act, "gelu").half()
    x = torch.randn(4, 32, dtype=torch.float16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    (d,) = r.decisions
    assert "gelu" not in d.fused and "not in CUTLASS's epilogue: gelu: fp16" in d.reason, d.line()
    assert "activation =" not in r.graphs[0]
    mlp = seeded(LlamaMLP).half()
    torch._dynamo.reset()
    r = run_sparse(mlp, (x,), options=OPTS)
    assert "gate =" not in r.graphs[0] and "residual =" not in r.graphs[0], r.graphs[0]
    assert "silu gate: fp16" in r.by_name("w3").reason and "residual: fp16" in r.by_name("w2").reason
    relu = seeded(Act, "relu").half()
    torch._dynamo.reset()
    r = run_sparse(relu, (x,), options=OPTS)
    assert "activation = 'relu'" in r.graphs[0]


def test_not_fused_unknown_activation_and_second_reader():
    """A tanh is no activation of the epilogue's; an output read twice keeps its value: nothing moves."""
    model = seeded(Act, "tanh").to(BF16)
    x = torch.randn(4, 32, dtype=BF16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=OPTS)
    assert "activation =" not in r.graphs[0] and "aten.tanh" in r.graphs[0]

    class Twice(Act):
        def forward(self, x):
            y = self.fc(x)
            return torch.relu(y) + y

    torch._dynamo.reset()
    r = run_sparse(seeded(Twice).to(BF16), (x,), options=OPTS)
    assert "activation =" not in r.graphs[0] and "residual =" not in r.graphs[0], r.graphs[0]


# ---------------------------------------------------------------- the dispatcher is told what will be fused

class _Kernels(CustomGraphPass):
    """After the sparse passes: the CUTLASS kernels the graph runs (cutlass_epilogue.graph_kernels)."""

    def __init__(self):
        self.kernels: set = set()

    def __call__(self, graph):
        self.kernels |= set(cutlass_epilogue.graph_kernels(graph.owning_module, devices=("cpu",)))

    def uuid(self):
        return None


def _timed_and_run(model, *xs, **opts):
    """(the kernels the dispatcher's runner would time for each layer, with the config the graph
    got, and the kernels the graph runs)."""
    seen, real = [], linear_rewrite.choose

    def spy(layer, o, timer):
        seen.append(layer)
        return real(layer, o, timer)

    cap = _Kernels()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linear_rewrite, "choose", spy)
        torch._dynamo.reset()
        with torch._inductor.config.patch(post_grad_custom_pre_pass=cap), torch.no_grad():
            torch.compile(model, backend="sparse", options={**OPTS, **opts})(*xs)
    timed = set()
    for ly in seen:
        params = c24.params_of(c24.configs_for(ly.m, c24._SPEC_DTYPES[ly.dtype])[0])
        timed |= set(c24._variant_kernels(ly, params))
    return seen, timed, cap.kernels


@pytest.mark.parametrize("name", ["relu", "gelu_tanh", "residual", "mlp", "mlp_concat", "int8", "fp8"])
def test_timed_kernels_are_the_graphs(name):
    x = torch.randn(4, 32, dtype=BF16)
    concat = contextlib.nullcontext()
    if name in ("relu", "gelu_tanh"):
        model, xs = seeded(Act, name).to(BF16), (x,)
    elif name == "residual":
        model, xs = seeded(Residual).to(BF16), (torch.randn(2, 3, 32, dtype=BF16),)
    elif name.startswith("mlp"):
        model, xs = seeded(LlamaMLP).to(BF16), (x,)
        if name == "mlp_concat":
            concat = torch._inductor.config.patch({"cpp.enable_concat_linear": True})
    elif name == "int8":
        model, xs = W8A8Linear(k=64, n=32).eval(), (torch.randn(8, 64, dtype=BF16),)
    else:
        model, xs = fp8_model(rowwise=True), fp8_input(rowwise=True)
    with concat:
        layers, timed, run = _timed_and_run(model, *xs)
    assert run and timed == run, (timed ^ run, [ly.epilogue for ly in layers])
    if name == "mlp_concat":
        (ly, _) = layers
        assert [f.gate if f else None for _, f in ly.epilogue] in (["silu_aux", None], [None, "silu_aux"])


@pytest.mark.parametrize("quantized_in_graph", [False, True])
def test_fp8_guard_is_timed_only_where_it_is_a_kernel_of_its_own(quantized_in_graph):
    """fp8's row guard (a sum over x8's rows) joins the quantization kernel where x8 is quantized in
    the graph from its rows' amax (Layer.guard "fused": the runners leave it out of the timing);
    x8 a graph input: "separate", timed as one more pass over x8."""
    model = fp8_model(rowwise=True)
    if quantized_in_graph:
        xs = (torch.randn(16, 64),)
    else:
        xs = fp8_input(rowwise=True)
    layers, _, _ = _timed_and_run(model, *xs)
    (ly,) = layers
    assert ly.guard == ("fused" if quantized_in_graph else "separate"), ly


def test_prepare_builds_every_layers_candidates_at_once(monkeypatch):
    """spec.prepare (the build before the first timing) asks for each layer's table configs with the
    epilogue of each piece, in one build."""
    calls = []
    monkeypatch.setattr(c24, "build", lambda ks, jobs=None: calls.append(list(ks)) or {k: "x.so" for k in ks})
    mlp_in = Layer("2:4", 16, 128, 32, BF16, "cuda", row_check="separate",
                   epilogue=((64, None), (64, Fusion(gate="silu_aux", aux_dtype=BF16))))
    mlp_out = Layer("2:4", 16, 32, 64, BF16, "cuda", row_check="separate",
                    epilogue=((32, Fusion(residual=True, aux_dtype=BF16)),))
    c24._spec_prepare([mlp_in, mlp_out])
    (kernels,) = calls
    cfgs = c24.configs_for(16)
    assert len(kernels) == 3 * len(cfgs) and {k.config for k in kernels} == set(cfgs)
    eps = {k.epilogue for k in kernels}
    assert eps == {c24.Epilogue("bf16", bias="bf16", token_scale="vector"),
                   c24.Epilogue("bf16", bias="bf16", gate="silu_aux", token_scale="vector"),
                   c24.Epilogue("bf16", bias="bf16", residual=True, token_scale="vector")}
    params = c24._spec_variants(mlp_in, {})
    assert len(params) == sum(len(c24.STREAMK_SPLITS) if c.scheduler == "streamk" else 1 for c in cfgs)


def test_prepare_called_once_per_graph(monkeypatch):
    """linear_rewrite asks each family to prepare once, before the first layer is decided, with every
    layer of the graph it can run on the timing device (the CPU's layers made CUDA ones here), each
    with its predicted epilogue."""
    from torch.fx.experimental.proxy_tensor import make_fx

    got = []
    spec = registry._KERNELS["2:4/cutlass"]
    monkeypatch.setitem(registry._KERNELS, "2:4/cutlass", dataclasses.replace(spec, prepare=got.append))
    real = linear_rewrite._layer
    monkeypatch.setattr(linear_rewrite, "_layer", lambda *a: dataclasses.replace(real(*a), device="cuda"))
    model = seeded(LlamaMLP).to(BF16)
    with torch.no_grad():
        gm = make_fx(model)(torch.randn(4, 32, dtype=BF16))  # (the weights are get_attr nodes)
    run = linear_rewrite._Run(gm, SparseOptions(kernel="cutlass"), linear_rewrite._Constants(gm))
    linear_rewrite._prepare(run, linear_rewrite.find_linears(gm))
    (layers,) = got
    assert [(ly.n, ly.k) for ly in layers] == [(64, 32), (64, 32), (32, 64)]
    fused = [tuple(f.describe() if f else "-" for _, f in ly.epilogue) for ly in layers]
    assert fused == [(), ("silu gate",), ("residual",)], fused
    got.clear()
    linear_rewrite._prepare(dataclasses.replace(run, opts=SparseOptions(kernel="triton")), linear_rewrite.find_linears(gm))
    assert got == []  # (another family pinned)


def test_check_output_takes_the_runners_reference():
    """measure.check_output compares a fused runner's output with its own fp64 epilogue."""
    x, w = torch.randn(8, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    y = torch.relu(x @ w.t()).float()
    assert measure.check_output(y, x, w, None) is not None  # the plain product is not relu's
    assert measure.check_output(y, x, w, None, lambda ref, rows: torch.relu(ref)) is None


# ---------------------------------------------------------------- when the family is a candidate

def test_not_a_candidate_on_cpu_without_the_stand_in(monkeypatch):
    monkeypatch.setitem(registry._KERNELS, "2:4/cutlass", dataclasses.replace(registry._KERNELS["2:4/cutlass"],
                                                                                devices=("cuda",)))
    model = seeded(Act, "relu").to(BF16)
    torch._dynamo.reset()
    r = run_sparse(model, (torch.randn(4, 32, dtype=BF16),), options=OPTS)
    (d,) = r.decisions
    assert d.kernel == "dense" and "no 2:4 kernel named 'cutlass' for device cpu" in d.reason, d.line()


def test_the_dispatcher_says_why_not(monkeypatch):
    """On a CUDA layer the real check answers: no GPU here, then no sm90, no nvcc, no headers."""
    spec = dataclasses.replace(registry._KERNELS["2:4/cutlass"], check=c24._spec_check, devices=("cuda",))
    monkeypatch.setitem(registry._KERNELS, "2:4/cutlass", spec)
    layer = Layer("2:4", 16, 64, 128, BF16, "cuda")
    opts = SparseOptions(kernel="cutlass")
    assert "cutlass: CUDA is not available" in choose(layer, opts).reason
    for why in ("needs sm90 (Hopper: H100 / H200), got sm80", "nvcc not found (put it on PATH, or set CUDA_HOME)",
                "CUTLASS headers not found: pip install 'sparse_inductor[cutlass]'"):
        monkeypatch.setattr(rt, "available", lambda device=None, why=why: why)
        assert f"cutlass: {why}" in choose(layer, opts).reason
    monkeypatch.setattr(rt, "available", lambda device=None: None)
    assert choose(layer, SparseOptions(kernel="cutlass", force=True)).kernel == "cutlass"
    for bad, msg in ((dict(n=60), "N=60"), (dict(k=120), "K=120"), (dict(weight_dtype=torch.int8), "same dtype"),
                     (dict(dtype=torch.int8, product=torch.int32), "int8_product='bf16'"),
                     (dict(dtype=torch.float8_e4m3fn), "torch._scaled_mm only")):
        assert msg in choose(dataclasses.replace(layer, **bad), opts).reason, bad
    fp8 = dataclasses.replace(layer, dtype=torch.float8_e4m3fn, scaled=Scaled("lib16", BF16), k=80)
    assert "K=80: the CUTLASS kernel's compressed rows need K % 32 == 0" in choose(fp8, opts).reason


# ---------------------------------------------------------------- config tags and kernels

def test_config_tags_round_trip():
    for cfgs in c24.CONFIG_TABLE.values():
        for cfg in cfgs:
            for splits in (c24.STREAMK_SPLITS if cfg.scheduler == "streamk" else (1,)):
                assert c24.parse_tag(c24.config_tag(cfg, splits)) == (cfg, splits)
    assert c24.config_tag(c24.CutlassConfig((128, 16, 128), kernel_schedule="cooperative", scheduler="streamk"), 2) \
        == "128x16x128_1x1_cooperative_streamk_split2"
    for bad in ("128x16_1x1_pingpong", "128x16x128_1x1_pingpong_bogus", "128x16x128_1x1_pingpong_split2", "x"):
        with pytest.raises(ValueError, match="config tag"):
            c24.parse_tag(bad)


def test_kernel_of_matches_the_phase_one_kernel():
    """A plain bf16 call is the library kernel_for names (one library with and without a bias)."""
    cfg = c24.configs_for(16)[0]
    tag = c24.config_tag(cfg)
    plain = c24.kernel_for(BF16, c24.params_of(cfg))
    assert c24.kernel_of(BF16, tag) == (plain, 1) == c24.kernel_of(BF16, tag, bias=BF16)
    k, _ = c24.kernel_of(torch.int8, c24.config_tag(c24.configs_for(16, "int8")[0]), out_dtype=BF16, bias=torch.float32,
                         weight_scale="vector", token_scale="vector")
    assert (k.dtype, k.epilogue.bias, k.epilogue.out_dtype) == ("int8", "fp32", "bf16")
    with pytest.raises(ValueError, match="8-bit x needs out_dtype"):
        c24.kernel_of(torch.int8, tag)


def test_op_checks_its_arguments():
    """The op's fake (what Inductor sees) refuses what no kernel computes; its reference computes."""
    w = pruned_24(nn.Linear(32, 16)).weight.detach().to(BF16)
    values, meta = cf.compress(w, 128)
    x = torch.randn(4, 32, dtype=BF16)
    tag = c24.config_tag(c24.configs_for(4)[0])
    op = torch.ops.sparse_inductor.linear_cutlass
    with torch._subclasses.FakeTensorMode() as mode:
        fx_, fv, fm = (mode.from_tensor(t) for t in (x, values, meta))
        with pytest.raises(RuntimeError, match="aux goes with a gate or residual"):
            op(fx_, fv, fm, None, 16, 32, tag, gate="silu_aux")
        with pytest.raises(RuntimeError, match="8-bit x needs out_dtype"):
            op(mode.from_tensor(torch.zeros(4, 32, dtype=torch.int8)), fv, fm, None, 16, 32, tag)
        with pytest.raises(RuntimeError, match="K or N mismatch"):
            op(fx_, fv, fm, None, 16, 64, tag)
    y = op(x, values, meta, None, 16, 32, tag)
    torch.testing.assert_close(y.float(), (x.float() @ w.float().t()).to(BF16).float(), rtol=0, atol=0)
