"""fp8 (e4m3) x fp8 2:4 linears read from torch._scaled_mm: the rewrite into
sparse_inductor::linear_cslt and its scale/bias/cast epilogue (golden graphs, cuSPARSELt emulated on
CPU as in test_cusparselt_rewrite.py), numerics against fp64, what stays dense and why, the
dispatcher's "no" (CPU default; measured slower than torch._scaled_mm); then the real library on
the GPU (marked gpu).

The emulation computes the fp32 accumulator over the kept (nonzero) weights only, as the sparse
tensor cores do, multiplies it by alpha (where given), adds the bias and rounds once to
out_dtype: the numerics cuSPARSELt documents for fp32 compute (an assumption the GPU tests check
against fp64 and torch._cslt_sparse_mm). The ctypes plan itself (which attributes it sets, in which
order) is checked on the CPU against a stand-in for the library.
"""
import ctypes
import dataclasses
import re
import threading

import expecttest
import pytest
import torch

from sparse_inductor import measure, registry
from sparse_inductor.bench import Fp8Linear, fp8_per_channel, fp8_per_tensor
from sparse_inductor.dispatch import choose
from sparse_inductor.lowering import cusparselt_24
from sparse_inductor.options import SparseOptions
from sparse_inductor.prune import prune_24_
from sparse_inductor.registry import Layer, Scaled
from sparse_inductor.runtime import cusparselt

from test_backend import run_sparse

FP8 = torch.float8_e4m3fn
OPTS = {"force": True, "kernel": "cusparselt"}

# Tolerances, as data with their reasons (per element, |out - ref| <= atol * scale + rtol * |ref|
# + ptol * |product|, scale = max(1, max |ref|), product = (x8 @ W8^T) * scale_a * scale_b in fp64,
# the output before the bias). bf16 keeps 8 significant bits: rounding to nearest moves a value by
# at most half an ulp, 2^-8 of its magnitude (bf16's unit roundoff; eps = one ulp at 1.0 = 2^-7).
TOLERANCES = {
    # form "row" vs the dequantized matmul in fp64, (x8 @ W8^T) * scale_a * scale_b + bias,
    # from the same fp8 values: the products of two e4m3 numbers are exact in fp32 and the
    # accumulation over K adds at most K * 2^-24 of sum |terms| (K = 64 here: 4e-6 of the output's
    # scale, the atol); the scales and bias are applied in fp32 (a few 2^-24 of |ref|, under the
    # atol); then ONE rounding to bf16: at most 2^-8 of |ref|.
    "fp64": dict(rtol=2 ** -8, atol=1e-5),
    # form "row" vs the same model compiled by plain Inductor (torch._scaled_mm on CPU:
    # fp32 accumulation in another order, one rounding): the two fp32 values differ by a few 2^-24
    # and can round to neighbouring bf16 values: one ulp, at most 2^-7 of |ref|.
    "plain": dict(rtol=2 ** -7, atol=1e-5),
    # form "lib16" vs fp64: as "fp64" plus the rounding of the UNSCALED product to bf16 before the
    # epilogue: at most 2^-8 of |product| (scaling in fp32 keeps a relative error; the bias is added
    # after it, so this term is relative to the product, not to the output: where the bias cancels
    # the product it can exceed 2^-8 of |ref|). The output's rounding sees that error too:
    # 2^-8 * 2^-8 * |product| more, hence 2^-8 + 2^-16. With no bias: within 2^-7 of |ref|, one ulp,
    # where the single-rounding forms are within half of one.
    "fp64_lib16": dict(rtol=2 ** -8, ptol=2 ** -8 + 2 ** -16, atol=1e-5),
    # form "lib16" vs plain Inductor: the sum of ours vs fp64 ("fp64_lib16") and plain's vs fp64
    # ("fp64", 2^-8 of |ref64|, where |ref64| <= |plain| / (1 - 2^-8)): rtol 2^-8 + 2^-8 / (1 - 2^-8)
    # < 2^-7 + 2^-14 of |plain|, the product term as above, the two atols added.
    "plain_lib16": dict(rtol=2 ** -7 + 2 ** -14, ptol=2 ** -8 + 2 ** -16, atol=2e-5),
}


def assert_close(out, ref, kind, product=None):
    """out within TOLERANCES[kind] of ref; the "lib16" kinds also take the fp64 product."""
    tol = TOLERANCES[kind]
    out, ref = out.double(), ref.double()
    scale = max(1.0, float(ref.abs().max()))
    if "ptol" not in tol:
        torch.testing.assert_close(out, ref, rtol=tol["rtol"], atol=tol["atol"] * scale)
        return
    bound = tol["atol"] * scale + tol["rtol"] * ref.abs() + tol["ptol"] * product.double().abs()
    err = (out - ref).abs()
    assert out.shape == ref.shape and not err.isnan().any(), (out.shape, ref.shape)
    i = int((err / bound).argmax())
    assert (err <= bound).all(), (f"{int((err > bound).sum())} of {err.numel()} outside {kind}: worst at flat "
                                  f"index {i}: |{out.flatten()[i]} - {ref.flatten()[i]}| = {err.flatten()[i]:.3g} > "
                                  f"{bound.flatten()[i]:.3g}")


def fp64_product(model, xq, s):
    """The dequantized product before the bias, (x8 @ W8^T) * scale_a * scale_b, in fp64."""
    return (xq.double() @ model.wq.double().T) * s.double() * model.w_scale.double()


def calls(code: str, what: str) -> int:
    """How many lines of generated code (not its comments, which name the source nodes) hold `what`."""
    return sum(what in line for line in code.splitlines() if not line.lstrip().startswith("#"))


def _emulated_linear(x, wc, bias, n, k, alg_id=0, split_k=1, out_dtype=None, alpha=None):
    assert x.dtype == FP8 and wc.dtype == FP8 and out_dtype in (torch.bfloat16, torch.float16, torch.float32)
    xf, wf = x.float(), wc.float()
    kept = (wc.float() != 0).unsqueeze(0)
    y = torch.where(kept, xf.unsqueeze(1) * wf.unsqueeze(0), torch.zeros(())).sum(-1)  # fp32, zeros skipped
    if alpha is not None:
        assert alpha.dtype == torch.float32 and alpha.shape == (n,)
        y = y * alpha
    if bias is not None:
        assert bias.dtype == out_dtype  # the library reads the bias in the output's dtype
        y = y + bias.float()
    return y.to(out_dtype)


@pytest.fixture
def emulated(monkeypatch):
    spec = registry._KERNELS["2:4/cusparselt"]
    monkeypatch.setitem(registry._KERNELS, "2:4/cusparselt", dataclasses.replace(spec, devices=("cpu", "cuda")))
    monkeypatch.setattr(cusparselt, "available", lambda: True)
    monkeypatch.setattr(cusparselt, "_fp8_why_not", lambda: None)
    monkeypatch.setattr(cusparselt, "compress", lambda w: w.contiguous().clone())  # "compressed" = W itself
    monkeypatch.setattr(cusparselt, "linear", _emulated_linear)


def _rowwise_scaled_mm_runs_here() -> bool:
    """torch._scaled_mm with per-row scales runs on this device: torch 2.11's CPU kernel takes per-tensor
    scales only (2.13's takes both), and the eager / plain-Inductor references of a per-row model need it."""
    a = torch.zeros(16, 16).to(FP8)
    try:
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


ROWWISE_REFERENCE = _rowwise_scaled_mm_runs_here()


def fp8_model(k=64, n=32, bias=True, rowwise=False, dense_weight=False, seed=0, out_dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if not dense_weight:
        w = prune_24_(w)
    wq, ws = fp8_per_channel(w) if rowwise else fp8_per_tensor(w)
    b = torch.randn(n, generator=g).to(out_dtype) if bias else None
    return Fp8Linear(wq, ws, b, rowwise=rowwise, out_dtype=out_dtype).eval()


def fp8_input(m=16, k=64, rowwise=False, seed=1):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    if rowwise:
        s = x.abs().amax(-1, keepdim=True) / 448
        return (x / s).to(FP8), s
    return fp8_per_tensor(x)


class TestFp8Graph(expecttest.TestCase):
    """The graph right after the pass. Regenerate with EXPECTTEST_ACCEPT=1, then read the diff."""

    @pytest.fixture(autouse=True)
    def _emulated(self, emulated):
        pass

    def test_golden_per_tensor_scales_lib16(self):
        """Both scales per-tensor, bf16 out: form "lib16": the library's unscaled product in bf16,
        upcast, then guard, scales, bias and cast (one Inductor kernel)."""
        model = fp8_model()
        xq, s = fp8_input()
        torch._dynamo.reset()
        r = run_sparse(model, (xq, s), options=OPTS)
        (d,) = r.decisions
        assert d.kernel == "cusparselt" and "fp8 form lib16" in d.reason, d.line()
        assert not r.notes, r.notes
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg3_1: "f32[]", arg4_1: "f8e4m3fn[16, 64]"):
_sparse_0_wc: "f8e4m3fn[32, 64]" = self._sparse_0_wc
arg0_1: "bf16[32]" = self._frozen_param0
arg2_1: "f32[]" = self._frozen_param2
convert_element_type_default: "f32[16, 64]" = torch.ops.prims.convert_element_type.default(arg4_1, torch.float32)
mul_tensor: "f32[16, 64]" = torch.ops.aten.mul.Tensor(convert_element_type_default, 0.0)
sum_dim_int_list: "f32[16, 1]" = torch.ops.aten.sum.dim_IntList(mul_tensor, [1], True)
linear_cslt_default: "bf16[16, 32]" = torch.ops.sparse_inductor.linear_cslt.default(arg4_1, _sparse_0_wc, None, 32, 64, 0, 1, torch.bfloat16)
convert_element_type_default_1: "f32[16, 32]" = torch.ops.prims.convert_element_type.default(linear_cslt_default, torch.float32)
add_tensor: "f32[16, 32]" = torch.ops.aten.add.Tensor(convert_element_type_default_1, sum_dim_int_list)
mul_tensor_1: "f32[16, 32]" = torch.ops.aten.mul.Tensor(add_tensor, arg3_1)
mul_tensor_2: "f32[16, 32]" = torch.ops.aten.mul.Tensor(mul_tensor_1, arg2_1)
add_tensor_1: "f32[16, 32]" = torch.ops.aten.add.Tensor(mul_tensor_2, arg0_1)
convert_element_type_default_2: "bf16[16, 32]" = torch.ops.prims.convert_element_type.default(add_tensor_1, torch.bfloat16)
return (convert_element_type_default_2,)""")

    def test_golden_rowwise_scales(self):
        """scale_a [M, 1], bf16 out, options fp8_product="bf16" (the default): form "lib16": a bf16
        output from the library (the unscaled product), then upcast, guard, scales, bias and cast
        (one Inductor kernel)."""
        model = fp8_model(rowwise=True)
        xq, s = fp8_input(rowwise=True)
        torch._dynamo.reset()
        r = run_sparse(model, (xq, s), options=OPTS)
        (d,) = r.decisions
        assert d.kernel == "cusparselt" and "fp8 form lib16" in d.reason, d.line()
        assert not r.notes, r.notes
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg3_1: "f32[16, 1]", arg4_1: "f8e4m3fn[16, 64]"):
_sparse_0_wc: "f8e4m3fn[32, 64]" = self._sparse_0_wc
arg0_1: "bf16[32]" = self._frozen_param0
arg2_1: "f32[1, 32]" = self._frozen_param2
convert_element_type_default: "f32[16, 64]" = torch.ops.prims.convert_element_type.default(arg4_1, torch.float32)
mul_tensor: "f32[16, 64]" = torch.ops.aten.mul.Tensor(convert_element_type_default, 0.0)
sum_dim_int_list: "f32[16, 1]" = torch.ops.aten.sum.dim_IntList(mul_tensor, [1], True)
linear_cslt_default: "bf16[16, 32]" = torch.ops.sparse_inductor.linear_cslt.default(arg4_1, _sparse_0_wc, None, 32, 64, 0, 1, torch.bfloat16)
convert_element_type_default_1: "f32[16, 32]" = torch.ops.prims.convert_element_type.default(linear_cslt_default, torch.float32)
add_tensor: "f32[16, 32]" = torch.ops.aten.add.Tensor(convert_element_type_default_1, sum_dim_int_list)
mul_tensor_1: "f32[16, 32]" = torch.ops.aten.mul.Tensor(add_tensor, arg3_1)
mul_tensor_2: "f32[16, 32]" = torch.ops.aten.mul.Tensor(mul_tensor_1, arg2_1)
add_tensor_1: "f32[16, 32]" = torch.ops.aten.add.Tensor(mul_tensor_2, arg0_1)
convert_element_type_default_2: "bf16[16, 32]" = torch.ops.prims.convert_element_type.default(add_tensor_1, torch.bfloat16)
return (convert_element_type_default_2,)""")

    def test_golden_rowwise_scales_fp32_product(self):
        """scale_a [M, 1], options fp8_product="fp32": form "row": an fp32 output, then guard, scales,
        bias and cast (one Inductor kernel)."""
        model = fp8_model(rowwise=True)
        xq, s = fp8_input(rowwise=True)
        torch._dynamo.reset()
        r = run_sparse(model, (xq, s), options={**OPTS, "fp8_product": "fp32"})
        (d,) = r.decisions
        assert d.kernel == "cusparselt" and "fp8 form row" in d.reason, d.line()
        assert not r.notes, r.notes
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg3_1: "f32[16, 1]", arg4_1: "f8e4m3fn[16, 64]"):
_sparse_0_wc: "f8e4m3fn[32, 64]" = self._sparse_0_wc
arg0_1: "bf16[32]" = self._frozen_param0
arg2_1: "f32[1, 32]" = self._frozen_param2
convert_element_type_default: "f32[16, 64]" = torch.ops.prims.convert_element_type.default(arg4_1, torch.float32)
mul_tensor: "f32[16, 64]" = torch.ops.aten.mul.Tensor(convert_element_type_default, 0.0)
sum_dim_int_list: "f32[16, 1]" = torch.ops.aten.sum.dim_IntList(mul_tensor, [1], True)
linear_cslt_default: "f32[16, 32]" = torch.ops.sparse_inductor.linear_cslt.default(arg4_1, _sparse_0_wc, None, 32, 64, 0, 1, torch.float32)
add_tensor: "f32[16, 32]" = torch.ops.aten.add.Tensor(linear_cslt_default, sum_dim_int_list)
mul_tensor_1: "f32[16, 32]" = torch.ops.aten.mul.Tensor(add_tensor, arg3_1)
mul_tensor_2: "f32[16, 32]" = torch.ops.aten.mul.Tensor(mul_tensor_1, arg2_1)
add_tensor_1: "f32[16, 32]" = torch.ops.aten.add.Tensor(mul_tensor_2, arg0_1)
convert_element_type_default_1: "bf16[16, 32]" = torch.ops.prims.convert_element_type.default(add_tensor_1, torch.bfloat16)
return (convert_element_type_default_1,)""")


def cslt_line(graph: str) -> str:
    """The linear_cslt line of a graph after the pass (there is one)."""
    (line,) = [ln for ln in graph.splitlines() if "sparse_inductor.linear_cslt.default(" in ln]
    return line


# options fp8_product -> (the form a bf16 output takes, the library's output dtype in the graph)
PRODUCT_FORM = {"bf16": ("lib16", "torch.bfloat16"), "fp32": ("row", "torch.float32")}


@pytest.mark.parametrize("product", ["bf16", "fp32"])
@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_numerics_vs_fp64_and_plain_inductor(emulated, monkeypatch, rowwise, bias, product):
    """Both epilogue forms, with per-tensor and row-wise scales, against
    the fp64 dequantized matmul and plain Inductor; "lib16" within its two roundings."""
    model = fp8_model(bias=bias, rowwise=rowwise)
    xq, s = fp8_input(rowwise=rowwise)
    torch._dynamo.reset()
    r = run_sparse(model, (xq, s), options={**OPTS, "fp8_product": product})
    assert [d.kernel for d in r.decisions] == ["cusparselt"], [d.line() for d in r.decisions]
    assert not r.notes and calls(r.code, "linear_cslt.default(") == 1 and not calls(r.code, "_scaled_mm("), r.notes
    form, lib_dtype = PRODUCT_FORM[product]
    assert f"fp8 form {form} " in r.decisions[0].reason, r.decisions[0].line()
    assert cslt_line(r.graphs[0]).endswith(f", {lib_dtype})"), r.graphs[0]
    out = r.outputs[0]
    assert out.dtype == torch.bfloat16 and out.shape == (16, 32)
    lib16 = "_lib16" if form == "lib16" else ""
    p = fp64_product(model, xq, s)
    assert_close(out, model.fp64(xq, s), "fp64" + lib16, p)
    if rowwise and not ROWWISE_REFERENCE:
        pytest.skip("this torch's CPU torch._scaled_mm takes per-tensor scales only (plain Inductor's reference)")
    monkeypatch.setenv("SPARSE_INDUCTOR_DISABLE", "1")
    torch._dynamo.reset()
    plain = run_sparse(model, (xq, s), options=OPTS)
    assert not plain.decisions
    assert_close(out, plain.outputs[0], "plain" + lib16, p)


def test_lib16_is_the_row_form_with_the_product_rounded_to_bf16(emulated):
    """What "lib16" gives up against "row", on the same emulated accumulator: the product is rounded
    to bf16 before the scales. Its output is within "fp64_lib16" of the exact value and within
    one bf16 rounding of the product of the row form's; an input whose products are bf16 numbers
    already (small integers times powers of two) gives the same bits in both."""
    model = fp8_model(rowwise=True)
    xq, s = fp8_input(rowwise=True)
    outs = {}
    for product in ("bf16", "fp32"):
        torch._dynamo.reset()
        outs[product] = run_sparse(model, (xq, s), options={**OPTS, "fp8_product": product}).outputs[0]
    p = fp64_product(model, xq, s)
    assert_close(outs["bf16"], outs["fp32"], "plain_lib16", p)
    # exact products: W in [-2, 2], x in [-3, 3], integers (32 kept terms per output: |sum| <= 192 <
    # 2^8, an integer, exact in bf16's 8 significant bits): the bf16 product is the fp32 one
    g = torch.Generator().manual_seed(3)
    w = prune_24_(torch.randint(-2, 3, (32, 64), generator=g).float())
    exact = Fp8Linear(w.to(FP8), torch.tensor(0.5), torch.randn(32, generator=g).to(torch.bfloat16)).eval()
    xi = torch.randint(-3, 4, (16, 64), generator=g).float().to(FP8)
    si = torch.tensor(0.25)
    got = {}
    for product in ("bf16", "fp32"):
        torch._dynamo.reset()
        got[product] = run_sparse(exact, (xi, si), options={**OPTS, "fp8_product": product}).outputs[0]
    assert torch.equal(got["bf16"], got["fp32"])


def test_fp16_and_fp32_outputs_keep_the_fp32_product(emulated):
    """An unscaled product in fp16 could overflow 65504 (K * 448^2 / scales), and fp32 has nothing to
    gain: those outputs take form "row" whatever fp8_product says."""
    for out_dtype in (torch.float16, torch.float32):
        model = fp8_model(out_dtype=out_dtype, bias=out_dtype != torch.float32)
        xq, s = fp8_input()
        torch._dynamo.reset()
        r = run_sparse(model, (xq, s), options={**OPTS, "fp8_product": "bf16"})
        (d,) = r.decisions
        assert d.kernel == "cusparselt" and "fp8 form row " in d.reason and not r.notes, (d.line(), r.notes)
        assert cslt_line(r.graphs[0]).endswith(", torch.float32)"), r.graphs[0]
        assert r.outputs[0].dtype == out_dtype
        assert_close(r.outputs[0], model.fp64(xq, s), "fp64")


class Fp8Silu(torch.nn.Module):
    """An fp8 linear and the pointwise op that consumes it."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, xq, s):
        return torch.nn.functional.silu(self.lin(xq, s))


def readers_of_cslt(code: str) -> list[str]:
    """The lines of the generated code that read linear_cslt's output (its buffer and the aliases
    Inductor gives it), other than size / metadata asserts (torch 2.14 checks an extern kernel's
    output with assert_tensor_metadata) and dels: the kernels its epilogue runs in."""
    lines = [ln.strip() for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    names: set = set()
    for ln in lines:
        m = re.match(r"(buf\d+) = torch\.ops\.sparse_inductor\.linear_cslt\.default\(", ln)
        if m:
            names.add(m.group(1))
        m = re.match(r"(buf\d+) = (buf\d+)$", ln)
        if m and m.group(2) in names:
            names.add(m.group(1))
    assert names, "no linear_cslt call in the code"
    return [ln for ln in lines
            if not ln.startswith(("assert_size_stride(", "assert_tensor_metadata(", "del "))
            and not re.match(r"buf\d+ = buf\d+$", ln)
            and "linear_cslt.default(" not in ln and any(re.search(rf"\b{n}\b", ln) for n in names)]


@pytest.mark.compat
@pytest.mark.parametrize("product", ["bf16", "fp32"])
def test_epilogue_fuses_with_its_consumer(emulated, product):
    """The epilogue (upcast for "lib16", guard, scales, bias, cast) and the SiLU that consumes the
    linear are one Inductor kernel: exactly one kernel reads the library's output."""
    model = Fp8Silu(fp8_model(rowwise=True))
    xq, s = fp8_input(rowwise=True)
    torch._dynamo.reset()
    r = run_sparse(model, (xq, s), options={**OPTS, "fp8_product": product})
    assert r.decisions[0].kernel == "cusparselt" and not r.notes, r.notes
    (reader,) = readers_of_cslt(r.code)
    assert "cpp_fused" in reader and "silu" in reader, reader
    # numerics: SiLU's slope is within [-0.1, 1.1], so the linear's error ("fp64_lib16" / "fp64", and
    # a rounding to bf16 between the two where Inductor keeps it) grows at most 1.1x, then SiLU's
    # own rounding to bf16
    lin, p = model.lin.fp64(xq, s), fp64_product(model.lin, xq, s)
    tol = TOLERANCES["fp64_lib16" if product == "bf16" else "fp64"]
    lin_err = (tol["atol"] * max(1.0, float(lin.abs().max())) + (tol["rtol"] + 2 ** -8) * lin.abs()
               + tol.get("ptol", 0) * p.abs())
    ref = torch.nn.functional.silu(lin)
    assert ((r.outputs[0].double() - ref).abs() <= 1.1 * lin_err + 2 ** -8 * ref.abs()).all()


@pytest.mark.parametrize("rowwise", [False, True])
def test_dynamic_batch(emulated, rowwise):
    """A dynamic M (per-row scale_a then has a symbolic size): one compile, right at every M (form
    "lib16", the default for a bf16 output)."""
    model = fp8_model(rowwise=rowwise)
    inputs = [fp8_input(m=m, rowwise=rowwise, seed=m) for m in (5, 17, 33)]
    torch._dynamo.reset()
    r = run_sparse(model, *inputs, options=OPTS, dynamic=True)
    assert {d.kernel for d in r.decisions} == {"cusparselt"} and not r.notes, r.notes
    for out, (xq, s) in zip(r.outputs, inputs):
        assert_close(out, model.fp64(xq, s), "fp64_lib16", fp64_product(model, xq, s))


@pytest.mark.parametrize("product", ["bf16", "fp32"])
@pytest.mark.parametrize("rowwise", [False, True])
def test_nan_input_row_is_nan_like_dense(emulated, rowwise, product):
    """The sparse tensor cores skip the pruned zeros; the guard (in the epilogue, added to the
    product of either form) makes a row holding a NaN wholly NaN, as torch._scaled_mm does (e4m3
    has no Inf)."""
    if rowwise and not ROWWISE_REFERENCE:
        pytest.skip("this torch's CPU torch._scaled_mm takes per-tensor scales only (eager's reference)")
    model = fp8_model(rowwise=rowwise)
    xq, s = fp8_input(rowwise=rowwise)
    xq = xq.clone()
    xq.view(torch.uint8)[3, 5] = 0x7F  # NaN in e4m3fn
    torch._dynamo.reset()
    r = run_sparse(model, (xq, s), options={**OPTS, "fp8_product": product})
    assert r.decisions[0].kernel == "cusparselt" and not r.notes, r.notes
    out = r.outputs[0]
    with torch.no_grad():
        ref = model(xq, s)
    assert ref[3].isnan().all() and torch.equal(out.isnan(), ref.isnan())
    # without the guard the emulated kernel leaves that row finite where x meets a pruned zero
    for lib_dtype in (torch.float32, torch.bfloat16):
        assert not _emulated_linear(xq, model.wq, None, 32, 64, out_dtype=lib_dtype)[3].isnan().all()


def test_cpu_default_dispatch_stays_dense():
    """No cuSPARSELt on the CPU and no other kernel for fp8: dense, and it says why."""
    model = fp8_model()
    torch._dynamo.reset()
    r = run_sparse(model, (torch.randn(16, 64, dtype=torch.bfloat16),), options={})
    (d,) = r.decisions
    assert (d.pattern, d.kernel) == ("2:4", "dense"), d.line()
    assert "fp8 x fp8 (torch._scaled_mm) runs on cuSPARSELt only" in d.reason, d.line()
    assert calls(r.code, "_scaled_mm(") == 1 and not calls(r.code, "linear_cslt")


def test_non_24_fp8_weight_stays_dense(emulated):
    model = fp8_model(dense_weight=True)
    torch._dynamo.reset()
    r = run_sparse(model, (torch.randn(16, 64, dtype=torch.bfloat16),), options=OPTS)
    (d,) = r.decisions
    assert d.kernel == "dense" and "not 2:4" in d.reason and "fp8 weights are read as 2:4 only" in d.reason, d.line()


def test_exact_zeros_only_negative_zero_counts_as_zero(emulated):
    """-0.0 is a zero (IEEE), so a 2:4 weight with -0.0 in its pruned slots is still 2:4; a weight
    with one extra nonzero in a group of four is not."""
    model = fp8_model()
    w = model.wq.view(torch.uint8)
    w[model.wq.float() == 0] = 0x80  # every zero -0.0 in e4m3fn (pruning negatives gives some already)
    torch._dynamo.reset()
    r = run_sparse(model, (torch.randn(16, 64, dtype=torch.bfloat16),), options=OPTS)
    assert r.decisions[0].kernel == "cusparselt", r.decisions[0].line()
    model = fp8_model()
    z = (model.wq[0, :4].float() == 0).nonzero()[0, 0]
    model.wq.view(torch.uint8)[0, z] = 0x38  # 1.0
    torch._dynamo.reset()
    r = run_sparse(model, (torch.randn(16, 64, dtype=torch.bfloat16),), options=OPTS)
    (d,) = r.decisions
    assert d.kernel == "dense" and "1 of 512 groups of four have more than two nonzeros" in d.reason, d.line()


class _ScaledMM(torch.nn.Module):
    """torch._scaled_mm with a free choice of scales and output (for what the pass does not read)."""

    def __init__(self, model, sb=None, out_dtype=torch.bfloat16, scale_result=None):
        super().__init__()
        self.register_buffer("wq", model.wq)
        self.register_buffer("sb", model.w_scale if sb is None else sb)
        self.out_dtype, self.scale_result = out_dtype, scale_result

    def forward(self, xq, sa):
        return torch._scaled_mm(xq, self.wq.t(), sa, self.sb, None, self.scale_result, self.out_dtype)


def test_fp8_output_stays_dense_with_a_reason(emulated):
    model = fp8_model(bias=False)
    xq, s = fp8_input()
    torch._dynamo.reset()
    r = run_sparse(_ScaledMM(model, out_dtype=None), (xq, s), options=OPTS)
    (d,) = r.decisions
    assert d.kernel == "dense" and "torch._scaled_mm to its input dtype (fp8) is not rewritten" in d.reason, d.line()


def _scaled_mm_node(sa, sb, bias=None, out=torch.bfloat16, scale_result=None, m=16, n=32, k=64):
    """An aten._scaled_mm node with these operands' metadata (torch on CPU runs only per-tensor and
    row-wise scales, so the other forms are read from a hand-made graph)."""
    g = torch.fx.Graph()
    vals = {"x": torch.empty(m, k, dtype=FP8), "w": torch.empty(k, n, dtype=FP8), "sa": sa, "sb": sb, "bias": bias,
            "sr": scale_result}
    nodes = {}
    for name, v in vals.items():
        if v is not None:
            nodes[name] = g.placeholder(name)
            nodes[name].meta["val"] = v
    return g.call_function(torch.ops.aten._scaled_mm.default,
                           (nodes["x"], nodes["w"], nodes["sa"], nodes["sb"], nodes.get("bias"), nodes.get("sr"), out))


@pytest.mark.parametrize("sa,sb,bias,out,expect", [
    # read, and in which form
    # the unscaled product and the epilogue: in bf16 for a bf16 output ("lib16"), in fp32 for an
    # fp16 one (an unscaled fp16 product can overflow); scales of one element in any shape
    (torch.ones(()), torch.ones(()), None, torch.bfloat16, Scaled("lib16", torch.bfloat16)),
    (torch.ones(1), torch.ones(1, 1), torch.ones(32, dtype=torch.bfloat16), torch.bfloat16,
     Scaled("lib16", torch.bfloat16)),
    (torch.ones(()), torch.ones(1, 32), None, torch.float16, Scaled("row", torch.float16, False, True)),
    (torch.ones(16, 1), torch.ones(1, 32), None, torch.bfloat16, Scaled("lib16", torch.bfloat16, True, True)),
    (torch.ones(16, 1), torch.ones(()), torch.ones(32, dtype=torch.float16), torch.float16,
     Scaled("row", torch.float16, True)),
    # a bias in another dtype than the output's: added in the epilogue
    (torch.ones(()), torch.ones(()), torch.ones(32, dtype=torch.float32), torch.bfloat16,
     Scaled("lib16", torch.bfloat16)),
    (torch.ones(()), torch.ones(()), torch.ones(32, dtype=torch.float32), torch.float32,
     Scaled("row", torch.float32)),
    # not read
    (torch.ones(16, 2), torch.ones(2, 32), None, torch.bfloat16, "only per-tensor or row-wise"),
    (torch.ones(()), torch.ones(32, 1), None, torch.bfloat16, "only per-tensor or row-wise"),
    (torch.ones((), dtype=torch.bfloat16), torch.ones(()), None, torch.bfloat16, "not float32"),
    (torch.ones(()), torch.ones(()), None, torch.int32, "is not rewritten (bf16, fp16 or fp32 only)"),
    (torch.ones(()), torch.ones(()), torch.ones(16, dtype=torch.bfloat16), torch.bfloat16,
     "bias is not a vector of out_features"),
])
def test_scale_forms(sa, sb, bias, out, expect):
    from sparse_inductor.passes.linear_rewrite import _read_scaled_mm

    scaled, why = _read_scaled_mm(_scaled_mm_node(sa, sb, bias, out), 32)
    if isinstance(expect, Scaled):
        assert (scaled, why) == (expect, None)
        # options fp8_product="fp32": every epilogue form is "row" (the library's fp32 accumulator)
        fp32, _ = _read_scaled_mm(_scaled_mm_node(sa, sb, bias, out), 32, "fp32")
        assert fp32 == dataclasses.replace(expect, form="row")
    else:
        assert scaled is None and expect in why, why


@pytest.mark.parametrize("out,product,form", [
    (torch.bfloat16, "bf16", "lib16"), (torch.bfloat16, "fp32", "row"),
    (torch.float16, "bf16", "row"), (torch.float32, "bf16", "row"),
])
def test_per_tensor_scales_take_an_epilogue_form(out, product, form):
    """Per-tensor scales take the unscaled product and the epilogue, in bf16 ("lib16") only for a
    bf16 output with fp8_product="bf16"."""
    from sparse_inductor.passes.linear_rewrite import _read_scaled_mm

    scaled, why = _read_scaled_mm(_scaled_mm_node(torch.ones(()), torch.ones(()), None, out), 32, product)
    assert (scaled, why) == (Scaled(form, out), None)


def test_scaled_forms_library_output_dtype():
    """What the library writes in each form (the graph's linear_cslt out_dtype, the timed call's)."""
    for out in (torch.bfloat16, torch.float16, torch.float32):
        assert Scaled("row", out).lib_out_dtype == torch.float32
    assert Scaled("lib16", torch.bfloat16).lib_out_dtype == torch.bfloat16
    assert "unscaled product in bf16" in Scaled("lib16", torch.bfloat16).describe()
    assert "fp32 accumulator" in Scaled("row", torch.float16).describe()


def test_fp8_product_option():
    from sparse_inductor.options import resolve_options

    assert SparseOptions().fp8_product == "bf16"
    with pytest.raises(ValueError, match="unknown fp8_product 'fp16'"):
        SparseOptions(fp8_product="fp16")
    opts, inductor = resolve_options(options={"fp8_product": "fp32", "force": True})
    assert opts.fp8_product == "fp32" and inductor == {}
    assert opts.digest() != SparseOptions(force=True).digest()  # (the pass's cache key sees it)


def _recording_linear(calls):
    def linear(x, wc, bias, n, k, alg_id=0, split_k=1, out_dtype=None, alpha=None):
        calls.append(dict(out_dtype=out_dtype, bias=bias is not None))
        y = torch.zeros(x.shape[0], n, dtype=out_dtype)
        calls[-1]["y"] = y
        return y
    return linear


@pytest.mark.parametrize("form,out,lib_out", [
    ("lib16", torch.bfloat16, torch.bfloat16), ("row", torch.bfloat16, torch.float32),
    ("row", torch.float16, torch.float32),
])
def test_fp8_timing_runner_runs_the_form(monkeypatch, form, out, lib_out):
    """The dispatcher times what the graph will run: the library call with the form's output dtype
    (the bias is the epilogue's), then one more pass over y giving out_dtype ("lib16": read and
    write bf16; "row": read fp32, write out_dtype)."""
    calls = []
    monkeypatch.setattr(cusparselt, "linear", _recording_linear(calls))
    ly = Layer("2:4", 16, 64, 64, FP8, "cuda", scaled=Scaled(form, out), row_check="none")
    bias = torch.zeros(64, dtype=out)
    run = cusparselt_24._runner({"wc": torch.zeros(64, 64, dtype=FP8)}, bias, ly, {"alg_id": 3})
    y = run(torch.zeros(16, 64, dtype=FP8))
    (c,) = calls
    assert (c["out_dtype"], c["bias"]) == (lib_out, False)
    assert y.dtype == out and y.shape == (16, 64)
    assert y is not c["y"]  # the epilogue: a pass that writes a new y


def test_scale_result_is_not_read():
    from sparse_inductor.passes.linear_rewrite import _read_scaled_mm

    scaled, why = _read_scaled_mm(_scaled_mm_node(torch.ones(()), torch.ones(()), scale_result=torch.ones(())), 32)
    assert scaled is None and "scale_result" in why


def test_measured_slower_than_scaled_mm_stays_dense(monkeypatch):
    """The dispatcher can say no: cuSPARSELt measured at 0.75x of torch._scaled_mm keeps dense,
    forced it takes cuSPARSELt; the model path has no fp8 estimate (dense unless forced)."""
    monkeypatch.setattr(cusparselt, "available", lambda: True)
    monkeypatch.setattr(cusparselt, "_fp8_why_not", lambda: None)
    ly = Layer("2:4", 8192, 14336, 4096, FP8, "cuda", device_name="NVIDIA H100 80GB HBM3",
               scaled=Scaled("lib16", torch.bfloat16))

    def timer(name, m):
        return {"dense": (750.0, {}), "cusparselt": (1000.0, {"alg_id": 0})}.get(name)

    c = choose(ly, SparseOptions(), timer)
    assert c.kernel == "dense" and c.measured and "not measured faster" in c.reason, c
    assert c.candidates == {"dense": 750.0, "cusparselt": 1000.0}
    assert choose(ly, SparseOptions(force=True), timer).kernel == "cusparselt"
    c = choose(ly, SparseOptions(dispatch="model"))
    assert c.kernel == "dense" and "unless forced" in c.reason, c
    # and a win by the margin is taken
    c = choose(ly, SparseOptions(), lambda name, m: {"dense": (1000.0, {}), "cusparselt": (700.0, {"alg_id": 20})}[name])
    assert c.kernel == "cusparselt" and c.params == {"alg_id": 20}


def test_kernel_guards_say_why(monkeypatch):
    monkeypatch.setattr(cusparselt, "available", lambda: True)
    monkeypatch.setattr(cusparselt, "_fp8_why_not", lambda: None)
    assert "multiples of 32" in cusparselt.why_not_runnable(48, 64, FP8, torch.bfloat16)
    assert "bf16, fp16 or fp32" in cusparselt.why_not_runnable(64, 64, FP8, FP8)
    assert cusparselt.why_not_runnable(64, 64, FP8, torch.bfloat16) is None
    assert "only" in cusparselt_24._check(Layer("2:4", 16, 64, 64, FP8, "cuda"))  # no scales: not from _scaled_mm
    monkeypatch.setattr(cusparselt, "_fp8_why_not", lambda: "fp8 on cuSPARSELt needs compute capability 9.0 or newer")
    assert "9.0" in cusparselt.why_not_runnable(64, 64, FP8, torch.bfloat16)
    monkeypatch.setattr(cusparselt, "available", lambda: False)
    assert "not available" in cusparselt.why_not_runnable(64, 64, FP8, torch.bfloat16)
    ref = registry._KERNELS["2:4/reference"]
    assert "cuSPARSELt only" in ref.check(Layer("2:4", 16, 64, 64, FP8, "cpu", scaled=Scaled("lib16", torch.bfloat16)))


def test_timing_cache_key_tells_scale_forms_apart():
    ly = Layer("2:4", 64, 64, 64, FP8, "cuda", scaled=Scaled("row", torch.bfloat16))
    t1 = measure.LayerTimer(ly, torch.zeros(64, 64), False, SparseOptions(), {}, lambda s: {})
    t2 = measure.LayerTimer(dataclasses.replace(ly, scaled=Scaled("row", torch.bfloat16, True)), torch.zeros(64, 64),
                            False, SparseOptions(), {}, lambda s: {})
    t3 = measure.LayerTimer(dataclasses.replace(ly, scaled=Scaled("lib16", torch.bfloat16, True)), torch.zeros(64, 64),
                            False, SparseOptions(), {}, lambda s: {})
    t1._env = t2._env = t3._env = "env"
    assert len({t.key("cusparselt", 64) for t in (t1, t2, t3)}) == 3


# ------------------------------------------- the ctypes plan against a stand-in for libcusparseLt

class _FakeDll:
    """Stands for libcusparseLt: records every call (name, arguments) and returns status 0, or the
    status `refuse` gives a function name or a matmul descriptor attribute (10 = not supported)."""

    def __init__(self, refuse=None):
        self.calls, self.refuse = [], refuse or {}

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        fn = _FakeFn(self, name)
        setattr(self, name, fn)
        return fn

    def attributes(self):
        """(attribute, value) of each cusparseLtMatmulDescSetAttribute, in order (byref'd values read back)."""
        return [(a[2], a[3]._obj.value) for name, a in self.calls if name == "cusparseLtMatmulDescSetAttribute"]

    def index(self, name):
        return next(i for i, (n, _) in enumerate(self.calls) if n == name)


class _FakeFn:
    def __init__(self, dll, name):
        self.dll, self.name = dll, name

    def __call__(self, *args):
        self.dll.calls.append((self.name, args))
        if self.name == "cusparseLtGetErrorString":
            return b"operation not supported"
        if self.name == "cusparseLtMatmulAlgGetAttribute":
            args[3]._obj.value = 21  # configurations
        if self.name == "cusparseLtMatmulDescSetAttribute" and args[2] in self.dll.refuse:
            return self.dll.refuse[args[2]]
        return self.dll.refuse.get(self.name, 0)


def _fake_lib(monkeypatch, refuse=None):
    lib = cusparselt._Lib.__new__(cusparselt._Lib)
    lib.dll, lib.handles, lib.lock = _FakeDll(refuse), {}, threading.Lock()
    lib.handle = lambda device: cusparselt._Opaque()
    monkeypatch.setattr(cusparselt, "_persistent_empty", lambda nbytes, device: torch.zeros(nbytes, dtype=torch.uint8))
    monkeypatch.setattr(cusparselt, "_lib", lambda: lib)
    monkeypatch.setattr(cusparselt, "_PLANS", {})
    return lib


def test_plan_sets_only_the_attributes_it_needs(monkeypatch):
    """An fp8 or 16-bit plan sets no matmul descriptor attribute (no scale modes, no alpha vector)
    and a call passes the host alpha 1.0; the int8 alpha-vector plan sets attribute 5
    (ALPHA_VECTOR_SCALING) only."""
    lib = _fake_lib(monkeypatch)
    plan = cusparselt._Plan(lib, 0, 16, 64, 64, FP8, 0, 0, 1, torch.bfloat16)
    assert lib.dll.attributes() == [] and plan.max_alg_id == 20
    x, wc, y = (torch.zeros(16, 64, dtype=FP8), torch.zeros(64, 64, dtype=FP8), torch.empty(16, 64))
    plan(wc, x, y, 0)
    (_, args), = [c for c in lib.dll.calls if c[0] == "cusparseLtMatmul"]
    assert args[2] == ctypes.addressof(plan.alpha) and plan.alpha.value == 1.0  # alpha on the host, 1.0
    lib2 = _fake_lib(monkeypatch)
    cusparselt._Plan(lib2, 0, 16, 64, 64, torch.int8, 0, 0, 1, torch.int32, cusparselt._ALPHA_VECTOR)
    assert lib2.dll.attributes() == [(5, 1)]
    lib3 = _fake_lib(monkeypatch)
    cusparselt._Plan(lib3, 0, 16, 64, 64, torch.bfloat16, 0, 0, 1)
    assert lib3.dll.attributes() == []


@pytest.mark.parametrize("form,lib_type", [("lib16", 14), ("row", 0)])  # CUDA_R_16BF, CUDA_R_32F
def test_epilogue_forms_plan_the_unscaled_product(monkeypatch, form, lib_type):
    """The algorithms the dispatcher tries for an epilogue form come from a plan with the form's
    output type on D (bf16 for "lib16", fp32 for "row") and no scale modes, no alpha vector."""
    lib = _fake_lib(monkeypatch)
    ly = Layer("2:4", 16, 64, 64, FP8, "cuda", scaled=Scaled(form, torch.bfloat16, True))
    algs = cusparselt_24._variants(ly, {"wc": torch.zeros(64, 64, dtype=FP8)})
    assert [a["alg_id"] for a in algs] == list(range(21))  # (the stand-in offers 21 configurations)
    dense = [a for name, a in lib.dll.calls if name == "cusparseLtDenseDescriptorInit"]
    assert [a[6] for a in dense] == [28, lib_type]  # x: CUDA_R_8F_E4M3; y: the product's type
    assert lib.dll.attributes() == []


def test_untimeable_kernel_reason_reaches_the_decision(tmp_path, monkeypatch):
    """Where every algorithm fails at timing (e.g. the library refuses at its first call), the
    dispatcher keeps dense and says why, also from the timing cache on the next compile."""
    monkeypatch.setenv(measure.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(cusparselt, "available", lambda: True)
    monkeypatch.setattr(cusparselt, "_fp8_why_not", lambda: None)
    msg = "cuSPARSELt matmul failed: status 10 (operation not supported)"

    def runner(t, bias, layer, params):
        raise RuntimeError(msg)

    spec = dataclasses.replace(registry._KERNELS["2:4/cusparselt"], runner=runner,
                               variants=lambda ly, t: [{"alg_id": 0}, {"alg_id": 1}])
    ly = Layer("2:4", 16, 64, 64, FP8, "cuda", scaled=Scaled("lib16", torch.bfloat16))
    for _ in range(2):  # measured, then read from the cache
        t = measure.LayerTimer(ly, torch.zeros(64, 64), False, SparseOptions(), {"cusparselt": spec}, lambda s: {})
        t._env = "env"
        assert t("cusparselt", 16) is None and t.failures == {"cusparselt": msg}

    class Timer:  # dense as if timed (no GPU here), the rest from the LayerTimer (with its failures)
        failures = t.failures

        def __call__(self, name, m):
            return (750.0, {}) if name == "dense" else t(name, m)

    c = choose(ly, SparseOptions(), Timer())
    assert c.kernel == "dense" and c.reason.startswith("no sparse kernel could be timed at M=16"), c
    assert "cusparselt: " + msg in c.reason, c.reason


# ---------------------------------------------------------------- on the GPU (H100: sm90)

# Relative error in the norm vs the fp64 dequantized matmul: one rounding to bf16 (at most 2^-8 of
# each output, half an ulp), fp32 accumulation of exact e4m3 products over K = 512 (about 512 * 2^-24:
# negligible), the scales and bias in fp32; fp16 and fp32 outputs are tighter still. The dense
# torch._scaled_mm meets the same bound.
TOL_GPU = 2 ** -8

# Form "lib16" on the GPU, per element vs the fp64 dequantized matmul ref = product + bias,
# product = (x8 @ W8^T) * scale_a * scale_b:
#     |out - ref| <= rtol * |ref| + ptol * |product| + acc * (|x8| @ |W8|^T) * |scale_a * scale_b|
TOL_GPU_LIB16 = dict(
    # the output's rounding to bf16 in the epilogue: half an ulp, 2^-8 of |ref|
    rtol=2 ** -8,
    # the library's rounding of the unscaled product to bf16 (2^-8 of it; the fp32 scaling keeps the
    # relative error), plus that error's share in the output's rounding (2^-16)
    ptol=2 ** -8 + 2 ** -16,
    # the library's accumulation of K = 512 exact e4m3 products: fp32 additions in any order stay
    # within K * 2^-24 = 2^-15 of sum |terms|; the fp8 tensor cores' accumulation is coarser and
    # undocumented (cuBLAS offers a "fast accumulation" mode for it; DeepSeek-V3 measured about 14
    # bits kept on Hopper), so 8x that. Not a property of the form: the form's terms are the two above,
    # and test_gpu_fp8_bf16_product_is_the_fp32_product_rounded checks the product's rounding alone.
    acc=2 ** -12,
)


def _assert_within_lib16(out, ref, product, abs_product):
    tol = TOL_GPU_LIB16
    out, ref, product, abs_product = (t.double() for t in (out, ref, product, abs_product))
    terms = {"rtol": tol["rtol"] * ref.abs(), "ptol": tol["ptol"] * product.abs(), "acc": tol["acc"] * abs_product}
    bound = sum(terms.values())
    err = (out - ref).abs()
    i = int((err / bound).flatten().argmax())
    assert (err <= bound).all(), (
        f"{int((err > bound).sum())} of {err.numel()} outside TOL_GPU_LIB16; worst at flat index {i}: "
        f"|{out.flatten()[i]:.6g} - {ref.flatten()[i]:.6g}| = {err.flatten()[i]:.3g} > "
        + " + ".join(f"{k} {v.flatten()[i]:.3g}" for k, v in terms.items()))


def _rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def _gpu_model(k=512, n=256, bias=True, rowwise=False):
    return fp8_model(k=k, n=n, bias=bias, rowwise=rowwise).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [16, 37])
def test_gpu_plan_path_fp8(out_dtype, m):
    """Ours (ctypes plan) vs torch._cslt_sparse_mm: the same bits (torch on x padded to 16 rows as
    ours pads it)."""
    model = _gpu_model()
    n, k = model.wq.shape
    wc = cusparselt.compress(model.wq)
    xq, _ = (t.cuda() for t in fp8_input(m=m, k=k))
    ours = cusparselt.linear(xq, wc, None, n, k, out_dtype=out_dtype)
    xp = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, -m % 16)).view(FP8)
    theirs = torch._cslt_sparse_mm(wc, xp.t(), None, None, out_dtype, transpose_result=True)[:m]
    assert ours.dtype == out_dtype and ours.shape == (m, n) and torch.equal(ours, theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("rowwise", [False, True])
def test_gpu_compiled_fp8_forced(rowwise):
    """Forced, options fp8_product="fp32" (form "row": the library's fp32 accumulator, one rounding):
    cuSPARSELt replaces torch._scaled_mm; the output matches the fp64 dequantized matmul and dense
    torch._scaled_mm. (Form "lib16", the default for bf16: test_gpu_compiled_fp8_lib16.)"""
    from torch._inductor.utils import run_and_get_code

    from sparse_inductor.report import LayerDecision, collect

    model = _gpu_model(rowwise=rowwise)
    xq, s = (t.cuda() for t in fp8_input(m=64, k=512, rowwise=rowwise))
    torch._dynamo.reset()
    with torch.no_grad(), collect() as sink:
        out, code = run_and_get_code(torch.compile(model, backend="sparse", options={**OPTS, "fp8_product": "fp32"}),
                                     xq, s)
    (d,) = [d for d in sink if isinstance(d, LayerDecision)]
    assert d.kernel == "cusparselt" and "alg_id" in d.params and "fp8 form row " in d.reason, d.line()
    code = "\n".join(code)
    assert calls(code, "torch.ops.sparse_inductor.linear_cslt.default(") == 1 and not calls(code, "_scaled_mm(")
    ref = model.fp64(xq, s)
    assert _rel_err(out, ref) < TOL_GPU
    with torch.no_grad():
        dense = model(xq, s)
    assert _rel_err(dense, ref) < TOL_GPU


@pytest.mark.gpu
@pytest.mark.parametrize("product", ["bf16", "fp32"])
@pytest.mark.parametrize("rowwise", [False, True])
def test_gpu_nan_input_row(rowwise, product):
    """A NaN in an fp8 input row makes that whole output row NaN, as dense torch._scaled_mm does (the
    guard is added to the product in the epilogue of forms "lib16" and "row")."""
    model = _gpu_model(rowwise=rowwise)
    xq, s = (t.cuda() for t in fp8_input(m=32, k=512, rowwise=rowwise))
    xq.view(torch.uint8)[5, 7] = 0x7F  # NaN
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="sparse", options={**OPTS, "fp8_product": product})(xq, s)
        ref = model(xq, s)
    assert ref[5].isnan().all() and torch.equal(out.isnan(), ref.isnan())


@pytest.mark.gpu
def test_gpu_measured_dispatch_fp8(tmp_path, monkeypatch):
    """Not forced: dense (torch._scaled_mm) and cuSPARSELt are timed; cuSPARSELt only if 5% faster."""
    from sparse_inductor.report import LayerDecision, collect

    monkeypatch.setenv(measure.ENV_CACHE_DIR, str(tmp_path))
    g = torch.Generator().manual_seed(0)
    wq, ws = fp8_per_tensor(prune_24_(torch.randn(4096, 4096, generator=g)))
    model = Fp8Linear(wq.cuda(), ws.cuda()).eval()
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad(), collect() as sink:
        torch.compile(model, backend="sparse", mode="reduce-overhead")(x)
    (d,) = [d for d in sink if isinstance(d, LayerDecision)]
    assert d.measured and set(d.candidates) >= {"dense", "cusparselt"}, d.line()
    assert "fp8 form lib16 " in d.reason, d.line()  # (bf16 out: timed as the library's bf16 product + epilogue)
    dense, sparse = d.candidates["dense"], d.candidates["cusparselt"]
    assert (d.kernel == "cusparselt") == (sparse is not None and sparse * 1.05 <= dense), d.line()
    print(d.line())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [64, 37])
@pytest.mark.parametrize("rowwise", [False, True], ids=["per_tensor", "rowwise"])
def test_gpu_compiled_fp8_lib16(rowwise, m):
    """Form "lib16" (the default for a bf16 output), forced: torch._scaled_mm with per-tensor scales
    and a bias, or row-wise scales (scale_a [M, 1], scale_b [1, N]) and a bias, becomes one
    linear_cslt whose library output is bf16 (the unscaled product), then one Inductor kernel; the
    output is within TOL_GPU_LIB16 of the fp64 dequantized matmul, and dense torch._scaled_mm within
    TOL_GPU of it."""
    model = _gpu_model(rowwise=rowwise)
    xq, s = (t.cuda() for t in fp8_input(m=m, k=512, rowwise=rowwise))
    torch._dynamo.reset()
    r = run_sparse(model, (xq, s), options=OPTS)  # (options fp8_product: the default, "bf16")
    (d,) = r.decisions
    assert d.kernel == "cusparselt" and "alg_id" in d.params and "fp8 form lib16 " in d.reason, d.line()
    assert not r.notes, r.notes
    line = cslt_line(r.graphs[0])  # the graph after the pass: the library writes bf16
    assert re.search(r'linear_cslt_default: "bf16\[\d+, 256\]"', line) and line.endswith(", torch.bfloat16)"), line
    code = [ln.strip() for ln in r.code.splitlines() if "linear_cslt.default(" in ln and not ln.lstrip().startswith("#")]
    assert len(code) == 1 and code[0].endswith(", torch.bfloat16)") and not calls(r.code, "_scaled_mm("), code
    out = r.outputs[0]
    assert out.dtype == torch.bfloat16 and out.shape == (m, 256)
    product = fp64_product(model, xq, s)
    abs_product = (xq.double().abs() @ model.wq.double().abs().T) * (s.double() * model.w_scale.double()).abs()
    _assert_within_lib16(out, model.fp64(xq, s), product, abs_product)
    with torch.no_grad():
        dense = model(xq, s)
    assert _rel_err(dense, model.fp64(xq, s)) < TOL_GPU


@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 37, 256])
def test_gpu_fp8_bf16_product_is_the_fp32_product_rounded(m):
    """What form "lib16" relies on: cuSPARSELt's fp8 kernel with a bf16 output writes its fp32
    accumulator rounded once, to nearest, to bf16: the same algorithm with an fp32 output, rounded by
    torch, gives the same bits (where the two kernels happen to add in different orders, an output
    near a rounding midpoint can round the other way: allowed at under 1% of the outputs, and then
    by at most 2^-8 of |y| plus the fp32 order difference, K * 2^-24 of sum |terms| each way)."""
    model = _gpu_model(bias=False)
    n, k = model.wq.shape
    wc = cusparselt.compress(model.wq)
    xq, _ = (t.cuda() for t in fp8_input(m=m, k=k))
    top = min(cusparselt.max_alg_id(wc, xq, n, k, out) for out in (torch.bfloat16, torch.float32))
    abs_acc = xq.float().abs() @ model.wq.float().abs().T
    for alg in sorted({0, top}):
        y16 = cusparselt.linear(xq, wc, None, n, k, alg, 1, torch.bfloat16)
        y32 = cusparselt.linear(xq, wc, None, n, k, alg, 1, torch.float32)
        assert y16.dtype == torch.bfloat16 and y16.shape == y32.shape == (m, n)
        rounded = y32.to(torch.bfloat16)
        unequal = (y16 != rounded).float().mean().item()
        assert unequal < 0.01, f"alg {alg}: {unequal:.1%} of the bf16 outputs are not the fp32 outputs rounded"
        err = (y16.double() - y32.double()).abs()
        bound = 2 ** -8 * y32.double().abs() + 2 * k * 2 ** -24 * abs_acc.double()
        assert (err <= bound).all(), f"alg {alg}: {int((err > bound).sum())} outputs beyond one rounding"


@pytest.mark.gpu
def test_gpu_fp8_lib16_epilogue_fuses_with_its_consumer():
    """The epilogue of form "lib16" (upcast, guard, scales, bias, cast) and the SiLU after the linear
    are one Triton kernel: exactly one kernel reads the library's bf16 output."""
    model = Fp8Silu(_gpu_model(rowwise=True))
    xq, s = (t.cuda() for t in fp8_input(m=64, k=512, rowwise=True))
    torch._dynamo.reset()
    r = run_sparse(model, (xq, s), options=OPTS)
    assert r.decisions[0].kernel == "cusparselt" and "fp8 form lib16 " in r.decisions[0].reason, r.decisions[0].line()
    readers = readers_of_cslt(r.code)
    launches = [ln for ln in readers if ".run(" in ln]  # (on the GPU other lines name the buffer too)
    assert len(launches) == 1 and "silu" in launches[0], readers
    with torch.no_grad():
        ref = model(xq, s)
    # (loose: this test is about the kernel count; test_gpu_compiled_fp8_lib16 checks the numerics)
    assert _rel_err(r.outputs[0], ref) < 2 ** -6
