"""torch.compile(backend="sparse") on the GPU: the templates fire, epilogues fuse, numerics hold.

Fusion is proven on the generated code (run_and_get_code + FileCheck), not only on outputs.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn

import sparse_inductor
from sparse_inductor.bench import LlamaMLP
from sparse_inductor.report import LayerDecision, collect

pytestmark = pytest.mark.gpu

# bf16 end to end against fp64: 8-bit mantissa; the template rounds once at the store, the fused
# epilogue works on the fp32 accumulator (Inductor may round between ops): a few 2^-8.
TOL_BF16 = 1e-2


def rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def fp64(model, x):
    """The model in float64 on a copy (model.double() would convert the compiled model's weights)."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


class LinearBiasReLU(nn.Module):
    def __init__(self, k=256, n=512):
        super().__init__()
        self.fc = nn.Linear(k, n)

    def forward(self, x):
        return torch.relu(self.fc(x))


def GatedMLP():
    """A small Llama MLP block (SiLU-gated, residual), the bench's module at test sizes."""
    return LlamaMLP(256, 512)


def compile_and_code(model, x, options=None):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with torch.no_grad(), collect() as sink:
        out, codes = run_and_get_code(torch.compile(model, backend="sparse", options=options), x)
    return out, "\n".join(codes), [d for d in sink if isinstance(d, LayerDecision)]


def kernel_defs(code):
    return [line.split("(")[0].split()[-1] for line in code.splitlines() if line.startswith("def triton_")]


def prepared(model, pattern):
    model = model.cuda().to(torch.bfloat16).eval()
    if pattern == "2:4":
        sparse_inductor.prune(model, "2:4")
    else:
        sparse_inductor.prune(model, "block", block=64, sparsity=0.75)
    return model


@pytest.mark.parametrize("pattern", ["2:4", "block"])
@pytest.mark.parametrize("m", [1, 32, (4, 8)])
def test_linear_bias_relu_is_one_kernel(pattern, m):
    """m=(4, 8): a 3-D input, where passes/sink_views.py moves the reshape below the ReLU."""
    model = prepared(LinearBiasReLU(), pattern)
    x = torch.randn(*(m if isinstance(m, tuple) else (m,)), 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton"})
    assert [d.kernel for d in decisions] == ["triton"]
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    if os.environ.get("OUT"):  # the device tool's output folder: keep the code for reading
        with open(os.path.join(os.environ["OUT"], f"code_lbr_{pattern.replace(':', '')}_{x.shape[0]}_{x.dim()}d.py"), "w") as f:
            f.write(code)
    defs = kernel_defs(code)
    # one kernel for the linear: the template, with bias and ReLU in its store; no extern matmul,
    # no transpose copy. The block kernel also reads its non-finite input check over x: here x is a
    # graph input, so the check is the row-check template (lowering/row_check.py), one read of x.
    tem = [d for d in defs if d.startswith("triton_tem_fused_")]
    others = [d for d in defs if d not in tem]
    assert len(tem) == (1 if pattern == "2:4" else 2) and not others, defs
    if pattern == "block":
        assert len(_sources(code, "row_check_acc(X")) == 1
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code
    torch.testing.FileCheck().check("def triton_tem_fused_").check("maximum").check("tl.store").run(code)


def _sources(code, *needles):
    """The generated Triton kernels' sources (the text between the triple quotes of each
    async_compile.triton call, not the wrapper code after it) that contain every needle."""
    kernels = [c.split("'''")[1] for c in code.split("async_compile.triton(")[1:] if c.count("'''") >= 2]
    return [k for k in kernels if all(n in k for n in needles)]


class NormMLP(nn.Module):
    """A ViT MLP: LayerNorm, fc1, GELU, fc2."""

    def __init__(self, d=256, h=512):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def test_block_mlp_keeps_gelu_in_the_template():
    """Block-sparse fc1 and fc2: fc2's non-finite check is derived from fc1's input
    (passes/fuse_mlp._derive_check): two reductions fused into the LayerNorm, no kernel reads the
    hidden activations for it (as Inductor ops over h, the check would pull the GELU out of fc1's
    template into a reduction kernel). fc1's own check stays in the norm. Dense's NaN/Inf pattern
    holds."""
    model = prepared(NormMLP(), "block")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    x[3, 5], x[10, 2] = float("nan"), float("inf")
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton"})
    assert [d.kernel for d in decisions] == ["triton", "triton"]
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite().all(dim=1)
    assert rel_err(out[finite], fp64(model, x)[finite]) < TOL_BF16
    assert len(_sources(code, "def triton_tem_fused", "block_sparse_acc(X", "erf")) == 1, kernel_defs(code)
    assert not _sources(code, "row_check_acc(X"), kernel_defs(code)
    assert decisions[1].row_check == "from fc1's input, in its norm", decisions[1].line()
    assert not _sources(code, "def triton_red", "erf") and not _sources(code, "def triton_per", "erf")


@pytest.mark.parametrize("m", [1, 32])
def test_block_fast_has_no_row_check(m):
    """options nonfinite="fast": the block template without its row check (linear_block(...,
    guard=False)): one kernel for the linear, no reduction over x, and no nan_where_skipped."""
    model = prepared(LinearBiasReLU(), "block")
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton", "nonfinite": "fast"})
    assert [d.kernel for d in decisions] == ["triton"]
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    defs = kernel_defs(code)
    assert len(defs) == 1 and defs[0].startswith("triton_tem_fused_"), defs
    assert "nan_where_skipped(" not in code.split("def block_sparse_acc")[0] + code.split("def triton_tem")[-1]


@pytest.mark.parametrize("pattern", ["2:4", "block"])
def test_gated_mlp_residual_fused(pattern):
    model = prepared(GatedMLP(), pattern)
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton"})
    assert decisions and all(d.kernel == "triton" for d in decisions)
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    assert "extern_kernels.mm" not in code
    # the residual add is fused into the down projection's template
    torch.testing.FileCheck().check("def triton_tem_fused_add_").run(code)


@pytest.mark.parametrize("pattern,m", [("2:4", 1), ("2:4", 16), ("block", 1), ("block", 16)])
def test_gated_product_fused(pattern, m):
    """Inductor concatenates w1 and w3; the pass splits them back (passes/split_outputs.py) so that
    the SiLU-gated product is the second template's epilogue: template kernels only (the block
    family adds its non-finite row check, a reduction over x)."""
    model = prepared(GatedMLP(), pattern)
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton"})
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    assert any("split" in d.fused for d in decisions), [d.line() for d in decisions]
    defs = [d for d in kernel_defs(code) if not (pattern == "block" and ("red_fused" in d or "per_fused" in d))]
    assert all(d.startswith("triton_tem") for d in defs), kernel_defs(code)


@pytest.mark.parametrize("pattern,kernel", [("2:4", "triton"), ("block", "triton"), ("2:4", "cusparselt")])
def test_dynamic_batch(pattern, kernel):
    """One compile for every M (cuSPARSELt pads M to a multiple of 8)."""
    model = prepared(LinearBiasReLU(), pattern)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparse", options={"force": True, "kernel": kernel}, dynamic=True)
    with torch.no_grad():
        for m in (1, 7, 33, 130):
            x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
            assert rel_err(compiled(x), fp64(model, x)) < TOL_BF16


@pytest.mark.parametrize("pattern,kernel", [("2:4", "triton"), ("block", "triton"), ("2:4", "cusparselt")])
def test_nonfinite_input_rows(pattern, kernel):
    """The Triton kernels give dense's NaN/Inf pattern exactly. Sparse tensor cores skip the pruned
    zeros; cuSPARSELt's row check makes a row with a NaN/Inf input wholly non-finite, as dense is
    (NaN where dense may have +-Inf: checked on the linear alone, ReLU(-Inf) = 0 but ReLU(NaN) = NaN)."""
    model = prepared(LinearBiasReLU(), pattern)
    model = model.fc if kernel == "cusparselt" else model
    x = torch.randn(16 if kernel == "cusparselt" else 4, 256, device="cuda", dtype=torch.bfloat16)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    out, _, _ = compile_and_code(model, x, {"force": True, "kernel": kernel})
    with torch.no_grad():
        ref = model(x)
    if kernel == "cusparselt":
        assert torch.equal(out.isfinite(), ref.isfinite())
    else:
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())


@pytest.mark.timing
def test_default_dispatch_on_h100():
    """Without force: M=1 runs the 2:4 gemv (measured faster), M=64 stays dense (measured slower)."""
    model = prepared(LinearBiasReLU(4096, 4096), "2:4")
    for m, want in ((1, "triton"), (64, "dense")):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        _, _, decisions = compile_and_code(model, x)
        assert [d.kernel for d in decisions] == [want], decisions
