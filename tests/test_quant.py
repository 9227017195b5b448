"""Weight-only int8 2:4 linears: detection of the int8 -> float convert feeding the matmul after
freezing, the rewrite (int8 values into sparse_inductor::linear_24, the scale left as a mul after
it for Inductor to fuse into the template's store), the kernel on int8 values (interpreter), and
what stays dense with a reason (per-group scales, fp16, block-sparse int8).
"""
import expecttest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_inductor.formats import compress_24
from sparse_inductor.lowering import cusparselt_24, triton_24, triton_block
from sparse_inductor.lowering.triton_24 import sp24_linear
from sparse_inductor.prune import prune_24_
from sparse_inductor.registry import Layer

from test_backend import run_sparse
from test_triton_24 import SMALL, TOL, rel_err

# bf16 compute: the dequantized weight is exact (int8 fits bf16's 8-bit mantissa); what remains is
# bf16 rounding of the matmul output and of the scale/bias/ReLU epilogue: a few 2^-8.
TOL_BF16 = 1e-2


def int8_24(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = prune_24_(torch.randn(n, k, generator=g))
    return (w * 20).round().clamp(-127, 127).to(torch.int8)


class W8Linear(nn.Module):
    """A weight-only int8 linear as users write it: per-output-channel scale, bias, ReLU."""

    def __init__(self, k=32, n=16, bias=True, act=True, dtype=torch.bfloat16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed + 1)
        self.register_buffer("wq", int8_24(n, k, seed))
        self.register_buffer("scale", (torch.rand(n, generator=g) / 20).to(dtype))
        self.bias = nn.Parameter(torch.randn(n, generator=g).to(dtype)) if bias else None
        self.act = act

    def forward(self, x):
        y = F.linear(x, self.wq.to(x.dtype)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return torch.relu(y) if self.act else y

    def fp64(self, x):
        y = x.double() @ self.wq.double().T * self.scale.double()
        if self.bias is not None:
            y = y + self.bias.double()
        return torch.relu(y) if self.act else y


class W8PerGroup(nn.Module):
    """Per-group scales: the dequantization is computed before the matmul."""

    def __init__(self, k=32, n=16, group=8):
        super().__init__()
        self.register_buffer("wq", int8_24(n, k))
        self.register_buffer("scale", (torch.rand(n, k // group, 1) / 20).to(torch.bfloat16))
        self.group = group

    def forward(self, x):
        n, k = self.wq.shape
        w = (self.wq.to(x.dtype).view(n, k // self.group, self.group) * self.scale).view(n, k)
        return F.linear(x, w)


class TestWeightOnlyGraph(expecttest.TestCase):
    def test_golden(self):
        torch.manual_seed(0)
        model = W8Linear().eval()
        x = torch.randn(4, 32, dtype=torch.bfloat16)
        torch._dynamo.reset()
        r = run_sparse(model, (x,))
        (d,) = r.decisions
        assert d.kernel == "reference" and d.pattern == "2:4" and d.dtype == "int8->bfloat16 (weight-only)", d.line()
        assert rel_err(r.outputs[0], model.fp64(x)) < TOL_BF16
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg3_1: "bf16[4, 32]"):
_sparse_0_values: "i8[2, 16, 8]" = self._sparse_0_values
_sparse_0_meta: "u8[8, 8]" = self._sparse_0_meta
arg0_1: "bf16[16]" = self._frozen_param0
arg2_1: "bf16[16]" = self._frozen_param2
linear_24_default: "bf16[4, 16]" = torch.ops.sparse_inductor.linear_24.default(arg3_1, _sparse_0_values, _sparse_0_meta, None, 'reference')
mul: "bf16[4, 16]" = torch.ops.aten.mul.Tensor(linear_24_default, arg2_1)
add: "bf16[4, 16]" = torch.ops.aten.add.Tensor(mul, arg0_1)
relu: "bf16[4, 16]" = torch.ops.aten.relu.default(add)
return (relu,)""")


@pytest.mark.parametrize("m", [1, 5])
def test_no_bias_3d_and_batch(m):
    torch.manual_seed(0)
    model = W8Linear(64, 32, bias=False, act=False).eval()
    x = torch.randn(m, 3, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,))
    assert [d.kernel for d in r.decisions] == ["reference"]
    assert rel_err(r.outputs[0], model.fp64(x)) < TOL_BF16


def test_per_group_scales_stay_dense_with_a_reason():
    model = W8PerGroup().eval()
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,))
    assert all(d.kernel == "dense" for d in r.decisions)
    assert any("computed in the graph" in d.reason for d in r.decisions), [d.line() for d in r.decisions]
    torch.testing.assert_close(r.outputs[0].float(), model(x).float(), rtol=2e-2, atol=2e-2)


def test_nothing_forced_on_cpu():
    """Without force nothing is rewritten on the CPU (no fast kernel there), int8 or not."""
    model = W8Linear().eval()
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options={})
    assert [d.kernel for d in r.decisions] == ["dense"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", sorted(SMALL))
@pytest.mark.parametrize("m,n,k", [(1, 16, 64), (3, 33, 64), (17, 48, 128)])
def test_kernel_on_int8_values(dtype, cfg, m, n, k):
    """The kernel reads int8 values and multiplies in x's dtype (fp32 accumulate)."""
    wq = int8_24(n, k)
    values, meta = compress_24(wq)
    assert values.dtype == torch.int8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    y = sp24_linear(x, values, meta, b, config=dict(SMALL[cfg]))
    ref = x.double() @ wq.double().T + b.double()
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]


def test_kernel_families_on_weight_only_layers():
    ly = Layer("2:4", 1, 4096, 4096, torch.bfloat16, "cuda", device_name="NVIDIA H100 80GB HBM3",
               weight_dtype=torch.int8)
    assert triton_24._check(ly) is None
    assert "cuSPARSELt" in cusparselt_24._check(ly)
    blk = Layer("block", 1, 4096, 4096, torch.bfloat16, "cuda", block=64, block_density=0.1, weight_dtype=torch.int8)
    assert triton_block._check_layer(blk) is None
    # the gemv reads 2.5 bytes per four weights instead of 4.5 (bf16 2:4) or 8 (bf16 dense)
    import dataclasses

    from sparse_inductor.registry import dense_us, device_model

    bf16 = dataclasses.replace(ly, weight_dtype=None)
    model = device_model(ly)
    assert triton_24._estimate_us(ly, model) < triton_24._estimate_us(bf16, model) < dense_us(ly)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 17])
def test_block_kernel_on_int8_blocks(dtype, m):
    from sparse_inductor.formats.block import compress_block
    from sparse_inductor.lowering.triton_block import block_linear
    from test_triton_block import MIXED, make_weight

    b = 16
    n, k = 4 * b - 5, 4 * b - 3
    wq = (make_weight(n, k, b, MIXED, torch.float32, device="cpu") * 60).round().clamp(-127, 127).to(torch.int8)
    bs = compress_block(wq, b)
    assert bs.blocks.dtype == torch.int8
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, k, generator=g).to(dtype)
    y = block_linear(x, *bs, None, n, k, allow_tf32=False)
    ref = x.double() @ wq.double().T
    assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]


def test_block_sparse_int8_rewrite():
    from sparse_inductor.prune import prune_blocks_

    torch.manual_seed(0)
    model = W8Linear(64, 64, act=False).eval()
    w = prune_blocks_(torch.randn(64, 64), 16, 0.75)
    model.wq.copy_((w * 20).round().clamp(-127, 127).to(torch.int8))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    r = run_sparse(model, (x,))
    (d,) = r.decisions
    assert (d.pattern, d.block, d.kernel) == ("block", 16, "reference"), d.line()
    assert "dequant" in d.fused
    assert rel_err(r.outputs[0], model.fp64(x)) < TOL_BF16


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 32])
def test_gpu_scale_bias_relu_fused_into_the_template(m):
    """On the GPU the int8 template takes the per-channel scale, bias and ReLU into its store."""
    from test_gpu_compile import compile_and_code, kernel_defs

    model = W8Linear(256, 512).cuda().eval()
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton"})
    assert [d.kernel for d in decisions] == ["triton"], [d.line() for d in decisions]
    assert rel_err(out, model.fp64(x)) < TOL_BF16
    defs = kernel_defs(code)
    assert len(defs) == 1 and defs[0].startswith("triton_tem_fused_"), defs
    torch.testing.FileCheck().check("def triton_tem_fused_").check("maximum").check("tl.store").run(code)
