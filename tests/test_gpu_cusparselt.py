"""cuSPARSELt behind sparse_inductor::linear_cslt, and the measured dispatcher, on the GPU.

Numerics against fp64; the ctypes plan path against torch._cslt_sparse_mm (same library, same
algorithm: the same bits); the compiled graph calls the op once per linear with the bias fused and
everything after it in one Inductor kernel (FileCheck on the generated code); the dispatcher's
timings land in the on-disk cache and a second compile reuses them.
"""
import pytest
import torch
import torch.nn.functional as F

import sparse_inductor
from sparse_inductor import measure
from sparse_inductor.activations import ACTIVATIONS
from sparse_inductor.runtime import cusparselt

from test_gpu_compile import TOL_BF16, GatedMLP, LinearBiasReLU, compile_and_code, fp64, kernel_defs, prepared, rel_err

pytestmark = pytest.mark.gpu

# fp16: 11-bit mantissa, fp32 accumulation, one rounding of the output (and of the bias add in the
# library's epilogue): a few 2^-11 relative in the norm.
TOL = {torch.bfloat16: TOL_BF16, torch.float16: 2e-3}


def w24(n, k, dtype):
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    keep = torch.rand(n, k // 4, 4, device="cuda").argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, device="cuda", dtype=torch.bool).scatter_(-1, keep, True)
    return w * mask.view(n, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 8, 17, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_numerics(dtype, m, bias):
    n, k = 256, 512
    w = w24(n, k, dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    y = cusparselt.linear(x, cusparselt.compress(w), b, n, k)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (m, n) and y.is_contiguous() and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]


def test_plan_path_matches_torch_bitwise():
    n, k, m = 512, 1024, 64
    w = w24(n, k, torch.bfloat16)
    wc, b = cusparselt.compress(w), torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x2 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    top = cusparselt.max_alg_id(wc, x, n, k)
    assert top >= 1
    for alg in (0, top):
        ours = cusparselt.linear(x, wc, b, n, k, alg)
        theirs = torch._cslt_sparse_mm(wc, x.t(), b, transpose_result=True, alg_id=alg)
        assert torch.equal(ours, theirs), alg
        # a second call with other data reuses the plan and is still right
        assert torch.equal(cusparselt.linear(x2, wc, b, n, k, alg),
                           torch._cslt_sparse_mm(wc, x2.t(), b, transpose_result=True, alg_id=alg))


def test_plan_path_inside_cuda_graph():
    n, k, m = 256, 512, 32
    w = w24(n, k, torch.bfloat16)
    wc = cusparselt.compress(w)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    cusparselt.linear(x, wc, None, n, k)  # plan made outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = cusparselt.linear(x, wc, None, n, k)
    x.copy_(torch.randn_like(x))
    g.replay()
    assert rel_err(y, F.linear(x.double(), w.double())) < TOL_BF16


@pytest.mark.parametrize("m", [64, (4, 16)])
def test_compiled_linear_bias_relu(m):
    """The op runs once with the bias fused by cuSPARSELt; the ReLU is one Inductor kernel after it,
    which also applies the non-finite row check (y * (1 + g), no nan_rows_ launch); the check over
    x (a graph input) is one kernel before it, the row-check template. (The ReLU kept out of the
    library's epilogue: test_library_activation_where_it_matches has that.)"""
    model = prepared(LinearBiasReLU(), "2:4")
    x = torch.randn(*(m if isinstance(m, tuple) else (m,)), 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "cusparselt",
                                                       "rules": {"lib_activation": False}})
    assert [d.kernel for d in decisions] == ["cusparselt"]
    assert "alg_id" in decisions[0].params
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    torch.testing.FileCheck().check_count("torch.ops.sparse_inductor.linear_cslt.default(", 1, exactly=True).run(code)
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code
    defs = kernel_defs(code)
    poi = [d for d in defs if d.startswith("triton_poi_")]
    tem = [d for d in defs if d.startswith("triton_tem_")]
    assert len(poi) == 1 and "relu" in poi[0] and len(tem) == 1 and len(defs) == 2, defs
    assert "row_check_acc(X" in code
    assert "row_check=" not in code  # applied in the ReLU's kernel, not by the op


class LinearTimesTwo(torch.nn.Module):
    def __init__(self, k=256, n=512):
        super().__init__()
        self.fc = torch.nn.Linear(k, n)

    def forward(self, x):
        return self.fc(x) * 2


@pytest.mark.parametrize("model_cls", [LinearTimesTwo, None], ids=["in-graph", "in-op"])
def test_compiled_nonfinite_rows_both_forms(model_cls):
    """A NaN/Inf input row gives a wholly non-finite output row, as dense does: applied in the
    pointwise kernel after the call (a pointwise use) or by the op (the output is the graph's)."""
    model = prepared(model_cls() if model_cls else LinearBiasReLU(), "2:4")
    model = model if model_cls else model.fc
    x = torch.randn(48, 256, device="cuda", dtype=torch.bfloat16)
    x[1, 3] = float("nan")
    x[20, 7] = float("inf")
    x[47, 0] = -float("inf")
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "cusparselt"})
    assert [d.kernel for d in decisions] == ["cusparselt"]
    assert ("row_check=" in code) == (model_cls is None)
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(out.isfinite(), ref.isfinite())
    fin = ref.isfinite()
    assert rel_err(out[fin], ref[fin]) < TOL_BF16


def test_compiled_gated_mlp_one_epilogue_kernel_per_linear():
    model = prepared(GatedMLP(), "2:4")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "cusparselt"})
    assert decisions and all(d.kernel == "cusparselt" for d in decisions)
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    # w1|w3 (concatenated by freezing) and w2: two calls; SiLU*gate one kernel, residual add one
    # kernel; plus one row-check reduction per call (the one over w2's input may fuse with SiLU*gate)
    torch.testing.FileCheck().check_count("torch.ops.sparse_inductor.linear_cslt.default(", 2, exactly=True).run(code)
    defs = kernel_defs(code)
    assert len([d for d in defs if d.startswith("triton_poi_")]) <= 2 and 3 <= len(defs) <= 4, defs


@pytest.mark.parametrize("m,n", [(1, 256), (130, 300), (64, 128)])
def test_nan_rows_kernel(m, n):
    """nan_rows_ writes NaN into exactly the rows whose check is NaN, and nothing else."""
    y = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    g = torch.zeros(m, device="cuda")
    bad = sorted({0, m // 2, m - 1})
    g[bad] = float("nan")
    want = y.clone()
    want[bad] = float("nan")
    out = cusparselt.nan_rows_(y, g)
    assert out.data_ptr() == y.data_ptr()
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out[~want.isnan()], want[~want.isnan()])


def test_reduce_overhead_mode():
    model = prepared(LinearBiasReLU(), "2:4")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparse",
                             options={"force": True, "kernel": "cusparselt", "mode": "reduce-overhead"})
    x = torch.randn(48, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):  # warm-up, capture, replay
            out = compiled(x)
    assert rel_err(out, fp64(model, x)) < TOL_BF16


def test_measured_dispatch_and_disk_cache(tmp_path, monkeypatch):
    """At a compute-bound shape the dispatcher times dense and both 2:4 kernels and keeps the
    fastest; a second compile reads the times from the cache and times nothing."""
    monkeypatch.setenv(measure.ENV_CACHE_DIR, str(tmp_path))
    model = prepared(LinearBiasReLU(2048, 4096), "2:4")
    x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    opts = {"fx_cache": False}  # the pass must run again (an FX-cache hit would skip it)
    _, _, decisions = compile_and_code(model, x, opts)
    (d,) = decisions
    assert d.measured and set(d.candidates) >= {"dense", "triton", "cusparselt"}, d
    fastest = min((t, k) for k, t in d.candidates.items() if t is not None)[1]
    sparse_best = min(t for k, t in d.candidates.items() if k != "dense" and t is not None)
    if d.kernel != "dense":
        assert d.kernel == fastest and sparse_best * 1.05 <= d.candidates["dense"]
    else:
        assert sparse_best * 1.05 > d.candidates["dense"]
    assert (tmp_path / "timings.json").exists()

    def no_timing(*a, **k):
        raise AssertionError("timed again despite the cache")

    monkeypatch.setattr(measure, "time_us", no_timing)
    _, _, again = compile_and_code(model, x, opts)
    assert again[0].kernel == d.kernel and again[0].candidates == d.candidates
    print(sparse_inductor.LayerDecision.line(d))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.int32])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_int8_inputs_with_out_dtype(out_dtype, with_alpha):
    """int8 x int8 -> out_dtype with a per-row alpha (the int8 weight's dequantization scale):
    the same bits as torch._cslt_sparse_mm, and the integer product exactly scaled vs fp64."""
    if out_dtype == torch.int32 and with_alpha:
        pytest.skip("a float scale on an int32 output is not a case users have")
    n, k, m = 256, 512, 48
    wq = (w24(n, k, torch.float32) * 30).round().clamp(-127, 127).to(torch.int8)
    # fp16 without a scale: keep |y| under fp16's 65504 (else both libraries give inf, as dense would)
    hi = 4 if out_dtype == torch.float16 and not with_alpha else 127
    xq = torch.randint(-hi, hi + 1, (m, k), device="cuda", dtype=torch.int8)
    wc = cusparselt.compress(wq)
    alpha = (torch.rand(n, device="cuda") / 100) if with_alpha else None
    ours = cusparselt.linear(xq, wc, None, n, k, out_dtype=out_dtype, alpha=alpha)
    theirs = torch._cslt_sparse_mm(wc, xq.t(), None, alpha, out_dtype, transpose_result=True)
    assert ours.dtype == out_dtype and torch.equal(ours, theirs)
    ref = xq.double() @ wq.double().T  # exact: int32 accumulation of |.| < 2^31
    if alpha is not None:
        ref = ref * alpha.double()
    if out_dtype == torch.int32:
        assert torch.equal(ours.double(), ref)
    else:
        assert rel_err(ours, ref) < TOL[out_dtype]


@pytest.mark.parametrize("product", ["int32", "bf16"])
def test_int8_activation_model_matches_plain_inductor(product, monkeypatch):
    """Dynamic int8 activations x int8 2:4 weight: linear_cslt with an int32 output gives the
    integers torch._int_mm gives, so the compiled model matches plain Inductor bit for bit; with
    the product in bf16 (the default), within test_cusparselt_rewrite.bf16_product_bound of it."""
    from test_cusparselt_rewrite import W8A8Linear, bf16_product_bound

    model = W8A8Linear(k=512, n=256).cuda().eval()
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "cusparselt",
                                                       "int8_product": product})
    assert [d.kernel for d in decisions] == ["cusparselt"], [d.line() for d in decisions]
    # no call of _int_mm left (the name may remain in a fused kernel's list of source nodes)
    assert "torch.ops.sparse_inductor.linear_cslt.default(" in code and "_int_mm(" not in code
    monkeypatch.setenv("SPARSE_INDUCTOR_DISABLE", "1")
    plain, _, _ = compile_and_code(model, x)
    if product == "int32":
        assert torch.equal(out, plain)
    else:
        assert ((out.double() - plain.double()).abs() <= bf16_product_bound(plain, model.bias)).all()


class W8A8Mlp(torch.nn.Module):
    """Two dynamic-int8 linears with a GELU between: the second one's quantize step (amax over a
    2048-element row of GELU(dequantized product)) is one Inductor reduction kernel."""

    def __init__(self, d=512, h=2048):
        super().__init__()
        from test_cusparselt_rewrite import W8A8Linear

        self.fc1, self.fc2 = W8A8Linear(k=d, n=h, seed=1), W8A8Linear(k=h, n=d, seed=2)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class GeluMlp(torch.nn.Module):
    def __init__(self, d=256, h=2048):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, h), torch.nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def test_gelu_between_cslt_linears_stays_pointwise():
    """fc2's non-finite row check reads the GELU after fc1 (which also applies fc1's row fixup): the
    check is the row-check template, a read of x of its own, and the GELU stays a pointwise kernel
    (as Inductor ops, the check would make it a reduction: +27-35 us a layer on ViT-B, H200). (The GELU
    kept out of the library's epilogue: test_library_activation_where_it_matches has that.)"""
    model = prepared(GeluMlp(), "2:4")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "cusparselt", "fx_cache": False,
                                                       "rules": {"lib_activation": False}})
    assert [d.kernel for d in decisions] == ["cusparselt", "cusparselt"], [d.line() for d in decisions]
    gelu = [k for k in kernel_defs(code) if "gelu" in k]
    assert len(gelu) == 1 and gelu[0].startswith("triton_poi_"), kernel_defs(code)
    assert code.count("row_check_acc(X") == 2, kernel_defs(code)  # fc1's (x is the input) and fc2's
    assert rel_err(out, fp64(model, x)) < TOL_BF16


def test_gelu_between_cslt_linears_after_a_norm_stays_pointwise():
    """The same with a LayerNorm before fc1 (a ViT's MLP) and fc2's check not derived: fc1's row
    fixup reads a sum that rides in the norm, which is not a norm of h (counted as one, it would make
    fc2's check a reduction in the GELU's kernel, timed as free); fc2's check is the row-check
    template."""
    model = prepared(NormGeluMlp(), "2:4")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "cusparselt", "fx_cache": False,
                                                       "rules": {"lib_activation": False, "derived_lib_check": False}})
    assert [(d.kernel, d.row_check) for d in decisions] == [("cusparselt", "in x's norm"), ("cusparselt", "own kernel")]
    gelu = [k for k in kernel_defs(code) if "gelu" in k]
    assert len(gelu) == 1 and gelu[0].startswith("triton_poi_"), kernel_defs(code)
    assert code.count("row_check_acc(X") == 1, kernel_defs(code)  # fc2's; fc1's is in the norm
    assert rel_err(out, fp64(model, x)) < TOL_BF16


class NormGeluMlp(torch.nn.Module):
    def __init__(self, d=256, h=1024, norm=True, act="gelu"):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d) if norm else torch.nn.Identity()
        self.fc1, self.fc2 = torch.nn.Linear(d, h), torch.nn.Linear(h, d)
        self.act = {"gelu": torch.nn.GELU(), "relu": torch.nn.ReLU(), "gelu_tanh": torch.nn.GELU(approximate="tanh")}[act]

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "input"])
def test_derived_check_keeps_gelu_pointwise(dtype, norm):
    """fc2's check from fc1's input (passes/derived_check.py; h = 4096 x 1024, 8 MiB, over
    rules.derived_lib_min_bytes):
    no reduction over h (the GELU kernel stays pointwise), the flagged-rows template reads h only in
    the rows the flag marks. NaN / Inf rows come out non-finite as in dense; fp16 without a norm: a
    row that might overflow fc1 but does not stays finite, one that does comes out NaN. (The GELU
    kept out of the library's epilogue here.)"""
    model = prepared(NormGeluMlp(norm=norm), "2:4").to(dtype)
    x = torch.randn(4096, 256, device="cuda", dtype=dtype)
    x[1, 3], x[100, 7], x[4095, 0] = float("nan"), float("inf"), -float("inf")
    if dtype == torch.float16 and not norm:
        w1 = model.fc1.weight.detach().float()
        j = int(w1.abs().sum(1).argmax())
        x[200] = w1[j].sign().to(dtype) * 4e4  # fc1's unit j overflows
        x[300, 5] = 3e4  # flagged (max|x| over the bound), finite all through
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "cusparselt", "fx_cache": False,
                                                       "rules": {"lib_activation": False}})
    assert [d.kernel for d in decisions] == ["cusparselt", "cusparselt"], [d.line() for d in decisions]
    assert "then its own input in the rows" in decisions[1].row_check, decisions[1].line()
    gelu = [k for k in kernel_defs(code) if "gelu" in k]
    assert len(gelu) == 1 and gelu[0].startswith("triton_poi_"), kernel_defs(code)
    assert code.count("row_check_flagged(X, MAYBE") == 1, kernel_defs(code)
    with torch.no_grad():
        ref = model(x)
    bad = ~ref.isfinite().all(-1)
    assert torch.equal(~out.isfinite().all(-1), bad) and out[bad].isnan().all()
    if dtype == torch.float16 and not norm:
        assert bool(bad[200]) and not bool(bad[300])
    assert rel_err(out[~bad], fp64(model, x)[~bad]) < TOL[dtype]


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_tanh"])
def test_library_activation_where_it_matches(act):
    """fc1's activation goes into cuSPARSELt's epilogue exactly where the library computes the graph's
    (cusparselt.activation_matches, measured here on every bf16 value): then no activation kernel is
    left after the call; else the Inductor kernel stays. Numerics against fp64 either way."""
    model = prepared(NormGeluMlp(act=act), "2:4")
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    x[7, 1] = float("nan")
    library = "relu" if act == "relu" else "gelu"
    why = cusparselt.activation_matches(library, ACTIVATIONS[act].fn, act, torch.bfloat16, "cuda")
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "cusparselt", "fx_cache": False})
    assert [d.kernel for d in decisions] == ["cusparselt", "cusparselt"], [d.line() for d in decisions]
    fused = act in decisions[0].fused
    # (where the library computes the graph's function, only the layer's algorithm may still refuse it)
    assert fused == (why is None and "the library refused it with alg_id" not in decisions[0].reason), (
        why, decisions[0].line())
    name = "relu" if act == "relu" else "gelu"  # (Inductor names a kernel by the ops it computes)
    assert any(name in k and k.startswith("triton_poi_") for k in kernel_defs(code)) != fused, kernel_defs(code)
    with torch.no_grad():
        ref = model(x)
    bad = ~ref.isfinite().all(-1)
    assert torch.equal(~out.isfinite().all(-1), bad)
    assert rel_err(out[~bad], fp64(model, x)[~bad]) < TOL_BF16


class NormLinear(torch.nn.Module):
    def __init__(self, d=2048, n=256):
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(d), torch.nn.Linear(d, n)

    def forward(self, x):
        return self.fc(self.norm(x))


@pytest.mark.parametrize("mode", ["one-pass", "inductor"])
def test_row_check_kernel_is_one_pass(mode):
    """The non-finite row check over a norm's output fuses with the norm's kernel; under
    reductions="one-pass" (default) that kernel is a persistent reduction (`triton_per_`), where
    Inductor alone loops over the 2048-element row (`triton_red_`)."""
    model = prepared(NormLinear(), "2:4")
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "cusparselt", "fx_cache": False,
                                                       "reductions": mode})
    assert [d.kernel for d in decisions] == ["cusparselt"], [d.line() for d in decisions]
    assert "row_check_acc(X" not in code
    norm = [k for k in kernel_defs(code) if "layer_norm" in k]
    assert len(norm) == 1 and norm[0].startswith("triton_per_" if mode == "one-pass" else "triton_red_"), norm
    assert rel_err(out, fp64(model, x)) < TOL_BF16


@pytest.mark.parametrize("mode", ["one-pass", "inductor"])
def test_quantize_kernel_is_one_pass(mode):
    """options reductions="one-pass" (default): the quantize step of fc2's input is a
    persistent reduction (`triton_per_`: one read of the row, one GELU), where Inductor alone
    loops over the 2048-element row twice (`triton_red_`); the same numbers either way."""
    model = W8A8Mlp().cuda().eval()
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    opts = {"force": True, "kernel": "cusparselt", "fx_cache": False}  # (both tests compile both modes)
    out, code, decisions = compile_and_code(model, x, {**opts, "reductions": mode})
    assert [d.kernel for d in decisions] == ["cusparselt", "cusparselt"], [d.line() for d in decisions]
    quant = [k for k in kernel_defs(code) if "gelu" in k and "amax" in k and "round" in k]
    assert len(quant) == 1, kernel_defs(code)
    assert quant[0].startswith("triton_per_" if mode == "one-pass" else "triton_red_"), quant
    other, _, _ = compile_and_code(model, x, {**opts, "reductions": "inductor" if mode == "one-pass" else "one-pass"})
    # the same arithmetic; a different FMA contraction may move a value across a rounding step of
    # the int8 quantization (one step of one input: far below a bf16 output's rounding)
    assert rel_err(out, other) < TOL_BF16

