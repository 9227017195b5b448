"""Compiled models on the real CUTLASS kernels (marked gpu; an H100 / H200 with nvcc and the CUTLASS
headers): every epilogue kind against fp64 with NaN / Inf rows, one kernel per linear in the
generated code (no Inductor kernel left for an activation, a gate or a residual), a dynamic batch,
CUDA graphs (mode="reduce-overhead"), int8 and fp8 dequantization in the epilogue.

The dispatcher's table is cut to its first config per M bucket here, so that the compiles build
few libraries (about ten, in parallel: a few minutes of nvcc on the first run, then the disk cache,
SPARSE_INDUCTOR_CUTLASS_CACHE_DIR); what the dispatcher picks among configs is bench's business.
"""
from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
import torch.nn as nn
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

from sparse_inductor.lowering import cutlass_24 as c24
from sparse_inductor.report import LayerDecision, collect
from sparse_inductor.runtime import cutlass as rt

from test_cusparselt_rewrite import W8A8Linear
from test_cutlass_rewrite import Act, LlamaMLP, Residual, _check_fp64, _with_nonfinite
from test_backend import seeded
from test_fp8 import fp8_model
from sparse_inductor.bench import fp8_per_tensor

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16
OP = "torch.ops.sparse_inductor.linear_cutlass.default("
OPTS = {"force": True, "kernel": "cutlass"}


def expected_kernels() -> list:
    """The libraries these tests' compiles run (M = 16: the first config of its bucket), for one
    parallel build before them; a compile builds what this misses (one model at a time)."""
    out = []
    for dt, name in ((BF16, "bf16"), (torch.int8, "int8"), (torch.float8_e4m3fn, "e4m3")):
        tag = c24.config_tag(c24.configs_for(16, name)[0])
        if dt is BF16:
            for kw in [dict(activation=a) for a in ("relu", "gelu", "gelu_tanh", "silu")] + [
                    dict(activation="relu", residual=True, aux=BF16), {}, dict(gate="silu_aux", aux=BF16),
                    dict(residual=True, aux=BF16)]:
                out.append(c24.kernel_of(dt, tag, token_scale="vector", **kw)[0])
        else:
            for ws in (("vector",) if dt is torch.int8 else ("vector", "tensor")):
                out.append(c24.kernel_of(dt, tag, out_dtype=BF16, bias=BF16, weight_scale=ws, token_scale="vector")[0])
    fast = c24.config_tag(dataclasses.replace(c24.configs_for(16, "e4m3")[0], fast_accum=True))
    out.append(c24.kernel_of(torch.float8_e4m3fn, fast, out_dtype=BF16, bias=BF16, weight_scale="vector",
                             token_scale="vector")[0])
    return out


@pytest.fixture(scope="module")
def prebuilt():
    why = rt.available("cuda") if torch.cuda.is_available() else "no GPU"
    if why:
        pytest.skip(f"CUTLASS family not available: {why}")
    return c24.build(expected_kernels())


@pytest.fixture(autouse=True)
def one_config_per_bucket(monkeypatch, prebuilt):
    monkeypatch.setattr(c24, "CONFIG_TABLE", {m: cfgs[:1] for m, cfgs in c24.CONFIG_TABLE.items()})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Zoo(nn.Module):
    """Every 16-bit epilogue kind, each a layer reading x: relu, gelu, gelu (tanh), silu, relu + residual,
    and a Llama MLP (w1 | w3 concatenated by Inductor, the gate in w3's, the residual in w2's)."""

    def __init__(self, d=256, h=512):
        super().__init__()
        self.acts = nn.ModuleList([Act(a, d, h) for a in ("relu", "gelu", "gelu_tanh", "silu")])
        self.res = Residual(d)
        self.mlp = LlamaMLP(d, h)

    def forward(self, x):
        return (*(a(x) for a in self.acts), self.res(x), self.mlp(x))


N_OPS = 4 + 1 + 3  # one linear_cutlass per linear (w1 and w3 two ops again)
_EPILOGUE_OPS = re.compile(r"def (triton_\w*(relu|gelu|erf|tanh|silu|sigmoid|exp)\w*)\(")


def _compile_and_run(model, inputs, **kw):
    compiled = torch.compile(model, backend="sparse", **kw)
    outs = []
    with torch.no_grad(), collect() as sink:
        for x in inputs:
            out, code = run_and_get_code(lambda: compiled(*x))
            outs.append(out)
    return outs, "\n".join(code), [d for d in sink if isinstance(d, LayerDecision)]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_zoo_every_epilogue_against_fp64(mode):
    model = seeded(Zoo).to("cuda", BF16)
    x = _with_nonfinite(torch.randn(16, 256, device="cuda", dtype=BF16))
    (outs,), code, decisions = _compile_and_run(model, [(x,)], options={**OPTS, "mode": mode})
    assert all(d.kernel == "cutlass" for d in decisions), [d.line() for d in decisions]
    assert all(d.candidates.get("cutlass") for d in decisions), [d.line() for d in decisions]  # timed
    FileCheck().check_count(OP, N_OPS, exactly=True).run(code)
    assert not _EPILOGUE_OPS.findall(code), _EPILOGUE_OPS.findall(code)
    ref = copy.deepcopy(model).double()(x.double())
    for out, r in zip(outs, ref):
        _check_fp64(out, r.detach())


def test_dynamic_batch():
    """One compile, batch sizes of other buckets and odd ones; the graph's kernel serves them all."""
    model = seeded(Zoo).to("cuda", BF16)
    xs = [(_with_nonfinite(torch.randn(m, 256, device="cuda", dtype=BF16)),) for m in (16, 33, 200, 5)]
    outs, code, _ = _compile_and_run(model, xs, options=OPTS, dynamic=True)
    FileCheck().check_count(OP, N_OPS, exactly=True).run(code)
    for (x,), got in zip(xs, outs):
        ref = copy.deepcopy(model).double()(x.double())
        for out, r in zip(got, ref):
            _check_fp64(out, r.detach())


def _after_op_kernels(code: str) -> list[str]:
    """The Triton kernels the wrapper launches after the (only) linear_cutlass call."""
    tail = code[code.rindex(OP):]
    return re.findall(r"(triton_\w+)\.run\(", tail)


def test_int8_dequantization_in_the_epilogue():
    model = W8A8Linear(k=512, n=256).eval().to("cuda")
    # x / s lands on integers, far from the .5 ties where the last bit of an fp32 division (the
    # graph's quantize kernel and eager torch can differ there) decides the rounding: every row
    # holds 127 and a power-of-two step, so s = 2^-e and xq = xi whoever divides
    g = torch.Generator(device="cuda").manual_seed(0)
    xi = torch.randint(-127, 128, (16, 512), device="cuda", generator=g)
    xi[:, 0] = 127
    step = 2.0 ** -(1 + torch.arange(16, device="cuda") % 4).reshape(-1, 1)
    x = (xi * step).to(BF16)  # exact: 7 bits of magnitude
    (out,), code, decisions = _compile_and_run(model, [(x,)], options={**OPTS, "mode": "reduce-overhead"})
    (d,) = decisions
    assert d.kernel == "cutlass" and "scales" in d.fused and "cast" in d.fused, d.line()
    FileCheck().check_count(OP, 1, exactly=True).check_not("_int_mm").run(code)
    assert not _after_op_kernels(code), _after_op_kernels(code)
    ref = (xi.double() @ model.wq.double().t()) * step.double() * model.w_scale.double() + model.bias.detach().double()
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -8, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("rowwise", [False, True])
def test_fp8_scales_and_row_guard_in_the_epilogue(rowwise):
    model = fp8_model(k=512, n=256, rowwise=rowwise).to("cuda")
    x = torch.randn(16, 512, device="cuda")
    if rowwise:
        s = x.abs().amax(dim=-1, keepdim=True) / 448
        xq = (x / s).to(torch.float8_e4m3fn)
    else:
        xq, s = fp8_per_tensor(x)
    xq[3, 7] = float("nan")  # (e4m3 has no Inf)
    (out,), code, decisions = _compile_and_run(model, [(xq, s)], options={**OPTS, "mode": "reduce-overhead"})
    (d,) = decisions
    assert d.kernel == "cutlass" and "scales" in d.fused, d.line()
    FileCheck().check_count(OP, 1, exactly=True).check_not("_scaled_mm").run(code)
    assert not _after_op_kernels(code), _after_op_kernels(code)
    ref = model.fp64(xq, s)
    keep = torch.arange(16, device="cuda") != 3
    assert out[3].isnan().all() and out[keep].isfinite().all()
    # fp8 tensor cores keep ~14 bits of the sum between fp32 promotions, every 4 MMAs
    # (cutlass_24.error_bound): 4 * 2^-13 of the sum of |terms|; then bf16 rounding (2^-8 of |ref|)
    torch.testing.assert_close(out[keep].double(), ref[keep], rtol=2 ** -7, atol=2e-3 * float(ref[keep].abs().max()))


def test_fp8_fast_accum_where_the_model_asks():
    """torch._scaled_mm(use_fast_accum=True), row-wise scales: the FP8FastAccum kernel, within
    cutlass_24.error_bound for its chain (every MMA of K between fp32 promotions)."""
    model = fp8_model(k=512, n=256, rowwise=True).to("cuda")
    model.fast_accum = True
    x = torch.randn(16, 512, device="cuda")
    s = x.abs().amax(dim=-1, keepdim=True) / 448
    xq = (x / s).to(torch.float8_e4m3fn)
    (out,), code, decisions = _compile_and_run(model, [(xq, s)], options={**OPTS, "mode": "reduce-overhead"})
    (d,) = decisions
    assert d.kernel == "cutlass", d.line()
    (tag,) = re.findall(r"'(\w+_fastacc)'", code)
    k = c24.kernel_of(torch.float8_e4m3fn, tag, out_dtype=BF16, bias=BF16, weight_scale="vector",
                      token_scale="vector")[0]
    ref = model.fp64(xq, s)
    bound = c24.error_bound(k, xq, model.wq, ref, bias=model.bias, weight_scale=model.w_scale, token_scale=s)
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), float((err / bound).max())
