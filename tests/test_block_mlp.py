"""The fused block-sparse MLP: its kernel (lowering/block_mlp.py) under the Triton interpreter on the
CPU against an fp64 reference, and the pass that makes it (passes/fuse_mlp.py): which chains it
fuses, the activation it identifies, the golden graph, and dense's non-finite rows. GPU tests (the
template, its epilogue, the fused kernel on the device) are at the end, marked gpu."""
from __future__ import annotations

import copy
import dataclasses
import zlib

import expecttest
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_inductor.formats import compress_block
from sparse_inductor.lowering import block_mlp as bm
from sparse_inductor.prune import prune_blocks_

from test_backend import _fresh_dynamo  # noqa: F401  (autouse: a fresh Dynamo per test, as there)
from test_backend import (OP_BLOCK, TOLERANCES, assert_close_fp64, assert_like_eager, assert_same_nonfinite,
                          block_template_on_cpu, run_sparse)

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: the interpreter (conftest)

ACTS = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}
MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}

# How far the fused kernel may be from the fp64 reference, per output element, by dtype: a bound
# written as data, A * (|h| @ |W2|^T) + B * |y| + C, each with its reason.
# - A, the hidden values: the reference rounds fc1's exact output to the dtype; the kernel rounds
#   its fp32 sum, which can land on the neighbouring value (one ulp: 2^-7 relative for bf16, 2^-10
#   for fp16); the activation (slope at most ~1.13 for GELU / SiLU, 1 for ReLU) carries that over
#   and its own rounding can flip once more: ~2.2 ulp of |h|, fc2 multiplies it by |W2|. So bf16
#   2^-5, fp16 2^-8; fp32: only fp32 sums (K, H <= 128 terms: ~2^-17 with room).
# - B, the output's own rounding to the dtype (half an ulp) plus fc2's fp32 sums: bf16 2^-7, fp16
#   2^-10, fp32 2^-17.
# - C, what is left near zero after cancellation: 1e-3 / 1e-4 / 1e-6.
# A plain rtol / atol pair cannot be both right and tight: an output that cancels to ~0 still
# carries the hidden values' rounding, which scales with |h| @ |W2|, not with |y|.
BOUND = {
    torch.float32: (2.0 ** -17, 2.0 ** -17, 1e-6),
    torch.float16: (2.0 ** -8, 2.0 ** -10, 1e-4),
    torch.bfloat16: (2.0 ** -5, 2.0 ** -7, 1e-3),
}


def assert_near(y: torch.Tensor, ref: torch.Tensor, h: torch.Tensor, w2: torch.Tensor, dtype) -> None:
    """y (any device) within BOUND of ref (fp64), h the reference's hidden values, W2 fc2's weight."""
    a, b, c = BOUND[dtype]
    y = y.double().cpu()
    bound = a * (h.double().abs().cpu() @ w2.double().abs().cpu().t()) + b * ref.abs() + c
    err = (y - ref).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{dtype}: max |y - ref| / bound = {worst:.3g} (max |y - ref| {err.max().item():.3g})"


def blocky(n: int, k: int, b: int, density: float, dtype, gen) -> torch.Tensor:
    keep = torch.rand((n + b - 1) // b, (k + b - 1) // b, generator=gen) < density
    mask = keep.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
    return (torch.randn(n, k, generator=gen) * mask).to(dtype)


def reference(x, w1, b1, w2, act, dtype):
    """(y, h): fp64 products, fc1's output rounded to dtype (as the op writes it), the activation
    on it in fp32 rounded to dtype (as PyTorch computes it on that dtype)."""
    h = F.linear(x.double(), w1.double(), None if b1 is None else b1.double()).to(dtype)
    h = ACTS[act](h.float()).to(dtype)
    return F.linear(h.double(), w2.double()), h


def run(x, w1, b1, w2, act, b, **kw):
    """block_mlp on DEV; the result back on x's device."""
    c1, c2 = compress_block(w1.to(DEV), b), compress_block(w2.to(DEV), b)
    y = bm.block_mlp(x.to(DEV), (c1.blocks, c1.row_ptr, c1.col_idx), None if b1 is None else b1.to(DEV),
                     (c2.blocks, c2.row_ptr, c2.col_idx, c2.row_order), w1.shape[0], w2.shape[0], act, **kw)
    return y.to(x.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(37, 48, 80, 40, 16), (1, 32, 64, 32, 32), (20, 50, 70, 30, 16)])
def test_kernel_matches_reference(dtype, act, shape):
    m, k, h, n, b = shape  # ragged M, K, H, N (masked loads, padded blocks)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((act, shape, str(dtype))).encode()))
    w1, w2 = blocky(h, k, b, 0.4, dtype, gen), blocky(n, h, b, 0.4, dtype, gen)
    b1 = torch.randn(h, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    ref, hid = reference(x, w1, b1, w2, act, dtype)
    for exact in (True, False):
        y = run(x, w1, b1, w2, act, b, exact=exact)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_near(y, ref, hid, w2, dtype)


def test_empty_rows_and_columns():
    # W2 block rows with no block (y = 0 there), W1 block rows with none (h = act(b1) there, read
    # by W2), a single nonzero block in each, no bias
    gen = torch.Generator().manual_seed(1)
    dt, b = torch.float32, 16
    w1 = torch.zeros(64, 32)
    w1[16:32, 0:16] = torch.randn(16, 16, generator=gen)
    w2 = torch.zeros(48, 64)
    w2[0:16, 48:64] = torch.randn(16, 16, generator=gen)  # reads a hidden block W1 has no block in
    w2[32:48, 16:32] = torch.randn(16, 16, generator=gen)
    x = torch.randn(19, 32, generator=gen)
    b1 = torch.randn(64, generator=gen)
    for bias in (None, b1):
        y = run(x, w1, bias, w2, "gelu", b)
        assert_near(y, *reference(x, w1, bias, w2, "gelu", dt), w2, dt)
        assert torch.equal(y[:, 16:32], torch.zeros(19, 16, device=y.device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_nonfinite_rows_as_dense(dtype, act):
    # NaN / Inf in x, and a finite x so large that fc1 overflows the dtype: the exact path gives
    # dense's NaN / Inf pattern (the two layers computed densely); rows without any stay the same
    gen = torch.Generator().manual_seed(2)
    m, k, h, n, b = 40, 48, 96, 32, 16
    w1, w2 = blocky(h, k, b, 0.3, dtype, gen), blocky(n, h, b, 0.3, dtype, gen)
    b1 = torch.randn(h, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    x[21, 40] = float("-inf")
    x[30, 1] = 6e4 if dtype == torch.float16 else 1e38  # overflows fc1 for some hidden units
    y = run(x, w1, b1, w2, act, b)
    # dense: the two layers in the dtype's arithmetic of the unfused ops (fp32 products), fp32 out
    h_ = ACTS[act](F.linear(x.float(), w1.float(), b1.float()).to(dtype).float()).to(dtype)
    ref = F.linear(h_.float(), w2.float())
    fin = ref.isfinite().all(1)
    assert not fin[[3, 7, 21]].any()
    for r in range(m):
        if fin[r]:
            continue
        assert torch.equal(y[r].float().isnan(), ref[r].isnan()), r
        assert torch.equal(y[r].float().isposinf(), ref[r].isposinf()) or dtype == torch.float16, r
    assert_near(y[fin], *reference(x[fin], w1, b1, w2, act, dtype), w2, dtype)
    # nonfinite="fast": no flag, no exact path; finite rows unchanged
    y_fast = run(x, w1, b1, w2, act, b, exact=False)
    torch.testing.assert_close(y_fast[fin], y[fin], rtol=0, atol=0)


def test_safe_bound():
    w = torch.zeros(32, 16)
    w[0:16, 0:16] = 2.0  # row sums 32
    c = compress_block(w, 16)
    s = bm.safe_bound(c.blocks, c.row_ptr, torch.full((32,), 3.0), torch.bfloat16)
    assert s == pytest.approx((3.0e38 - 3.0) / (32 * 1.001))
    zero = compress_block(torch.zeros(32, 16), 16)
    assert bm.safe_bound(zero.blocks, zero.row_ptr, None, torch.float16) == 6.0e4  # Inf still flagged
    assert bm.safe_bound(c.blocks, c.row_ptr, torch.full((32,), float("inf")), torch.float16) == 0.0
    x = torch.tensor([[1.0, -5.0], [float("nan"), 0.0], [float("-inf"), 1.0]])
    f = bm.row_flag(x)
    assert f[0] == 5.0 and f[1].isnan() and f[2].isnan()


# ---------------------------------------------------------------- the pass

class Mlp(nn.Module):
    def __init__(self, d=64, h=128, act="gelu", bias=True, norm=True):
        super().__init__()
        self.norm = nn.LayerNorm(d) if norm else nn.Identity()
        self.fc1 = prune_lin(nn.Linear(d, h, bias=bias))
        self.act = MODULES[act]() if act in MODULES else nn.Tanh()
        self.fc2 = prune_lin(nn.Linear(h, d, bias=bias))

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def prune_lin(lin: nn.Linear) -> nn.Linear:
    prune_blocks_(lin.weight.data, 16, 0.75)
    return lin


@pytest.fixture
def triton_on_cpu():
    """The block template family made available on the CPU (its lowering falls back to the
    reference there), and the options that pin it."""
    with block_template_on_cpu():
        yield {"force": True, "kernel": "triton", "fx_cache": False}


class TestDerivedCheck(expecttest.TestCase):
    """Without fusion (the default), fc2's row check comes from fc1's input: no check over the
    hidden activations, two reductions over x beside the LayerNorm."""

    @pytest.fixture(autouse=True)
    def _opts(self, triton_on_cpu):
        self.opts = triton_on_cpu

    def test_graph_and_decision(self):
        model, x = seeded_mlp(), torch.randn(2, 5, 64, dtype=torch.bfloat16)
        r = run_sparse(model, (x,), options=self.opts)
        # (fc2's constant inputs folded into an fp32 bias: not eager's order of operations)
        assert_close_fp64(r.outputs[0], copy.deepcopy(model).double()(x.double()).detach(), torch.bfloat16)
        gm = r.graphs[0]
        # (the decisions and notes say why, should the pass not derive the check: it did not once in a
        # fresh-clone CI run, cause unknown)
        why = "\n".join([d.line() for d in r.decisions] + r.notes)
        self.assertNotIn("sparse_inductor.row_check", gm, why)
        self.assertIn("amax_default", gm)
        self.assertIn("aten.log.default", gm)
        self.assertIn("'triton', row_check = mul_tensor_", gm)
        assert r.by_name("fc2").row_check == "from fc1's input, in its norm", r.by_name("fc2").line()
        assert "non-finite row check read from fc1's input (through the gelu)" in r.by_name("fc2").reason

    def test_hidden_units_skipped(self):
        """fc1 computes only the block rows fc2 reads (live, skip_check = the derived check); fc2's
        blocks on constant units go into an fp32 bias after it. With options rules.skip_hidden off,
        neither; under nonfinite="fast", fc1 skips with no check."""
        model, x = seeded_mlp(), torch.randn(2, 5, 64, dtype=torch.bfloat16)
        r = run_sparse(model, (x,), options=self.opts)
        gm = r.graphs[0]
        self.assertIn("128, 64, 'triton', live = 3, skip_check = mul_tensor_5)", gm)
        self.assertIn("_sparse_hidden_row_order_1, None, 64, 128, 'triton', row_check = mul_tensor_5)", gm)
        self.assertIn('add_tensor_3: "f32[10, 64]" = torch.ops.aten.add.Tensor(convert_element_type_default_3, '
                      "_sparse_hidden_bias)", gm)
        fc1, fc2 = r.by_name("fc1"), r.by_name("fc2")
        assert "hidden-skip" in fc1.fused and "hidden-fold" in fc2.fused, (fc1.line(), fc2.line())
        assert "computes 3 of its 8 block rows (3 that fc2 does not read, 2 constant" in fc1.reason
        assert {k: r.counts[k] for k in ("derived_check", "hidden_skip", "hidden_fold")} == \
            {"derived_check": 1, "hidden_skip": 1, "hidden_fold": 1}, r.counts
        fast = run_sparse(model, (x,), options={**self.opts, "nonfinite": "fast"})
        self.assertIn("'triton', guard = False, live = 3, skip_check = None)", fast.graphs[0])
        assert_close_fp64(fast.outputs[0], copy.deepcopy(model).double()(x.double()).detach(), torch.bfloat16)
        off = run_sparse(model, (x,), options={**self.opts, "rules": {"skip_hidden": False}})
        self.assertNotIn("live =", off.graphs[0])
        self.assertNotIn("hidden", off.by_name("fc1").fused_text() + off.by_name("fc2").fused_text())
        assert_like_eager(off.outputs[0], model(x).detach())

    def test_not_derived(self):
        # nonfinite="fast": no check at all; K > H without a norm: the check over h is the cheaper read;
        # an Inf in W1 (a nonzero block): even a zero row of x gives a non-finite h (safe_bound 0)
        inf_w1 = seeded_mlp()
        with torch.no_grad():
            inf_w1.fc1.weight.view(-1)[inf_w1.fc1.weight.view(-1).nonzero()[0]] = float("inf")
        # (with the reason fc2's record gives; None: no check to derive)
        for model, opts, why in ((seeded_mlp(), {"nonfinite": "fast"}, None),
                                 (seeded_mlp(d=128, h=64, norm=False), {}, "reading fc1's input costs more than reading fc2's"),
                                 (inf_w1, {}, "fc1's weight or bias holds a NaN/Inf")):
            x = torch.randn(3, model.fc1.in_features, dtype=torch.bfloat16)
            r = run_sparse(model, (x,), options={**self.opts, **opts})
            fc2 = r.by_name("fc2")
            assert fc2.kernel == "triton", fc2.line()
            self.assertNotIn("aten.log.default", r.graphs[0])
            self.assertNotIn("from fc1", fc2.row_check)
            said = "non-finite row check over its own input, not from fc1's"
            assert (f"{said}: {why}" in fc2.reason) if why else said not in fc2.reason, fc2.line()


def test_dispatcher_times_the_derived_check(triton_on_cpu, monkeypatch):
    """fc2 (N 64) is timed without a pass over h (Layer.derived_check) where fuse_mlp will give it its
    check from fc1's input; with the pass where it will not: nonfinite="fast" (no check), the rule
    off, K > H without a norm, an Inf in W1. fc1 (N 128) never; and the block runner then sums x only
    without it."""
    from sparse_inductor.lowering import triton_block
    from sparse_inductor.passes import linear_rewrite

    seen, real = {}, linear_rewrite.choose

    def choose(layer, opts, timer):
        seen[layer.n] = layer
        return real(layer, opts, timer)

    monkeypatch.setattr(linear_rewrite, "choose", choose)
    run_sparse(seeded_mlp(), (torch.randn(3, 64, dtype=torch.bfloat16),), options=triton_on_cpu)
    assert seen[64].derived_check and seen[64].row_check == "separate" and not seen[128].derived_check
    inf_w1 = seeded_mlp()
    with torch.no_grad():
        inf_w1.fc1.weight.view(-1)[inf_w1.fc1.weight.view(-1).nonzero()[0]] = float("inf")
    for model, opts in ((seeded_mlp(), {"nonfinite": "fast"}), (seeded_mlp(), {"rules": {"derived_check": False}}),
                        (seeded_mlp(d=128, h=64, norm=False), {}), (inf_w1, {})):
        seen.clear()
        run_sparse(model, (torch.randn(3, model.fc1.in_features, dtype=torch.bfloat16),),
                   options={**triton_on_cpu, **opts})
        assert not seen[model.fc2.out_features].derived_check, opts
    sums = []
    monkeypatch.setattr(torch, "sum", lambda *a, **kw: sums.append(a[0].shape))
    monkeypatch.setattr(triton_block, "block_linear", lambda *a, **kw: None)
    for derived in (True, False):
        ly = dataclasses.replace(seen[128], row_check="separate", derived_check=derived)
        triton_block._runner({"blocks": None, "row_ptr": None, "col_idx": None, "row_order": None}, None, ly, {})(
            torch.zeros(3, 64))
    assert sums == [(3, 64)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_derived_check_gives_dense_pattern(dtype):
    """The fc2 kernel with the derived check: NaN / Inf / overflowing rows of x give dense's pattern
    (the fixup reads h where the flag says it may be non-finite); a flagged row whose h stays
    finite is computed as it is (not made NaN)."""
    from sparse_inductor.lowering import triton_block as tb

    gen = torch.Generator().manual_seed(4)
    m, k, h, n, b = 24, 32, 64, 48, 16
    w1, w2 = blocky(h, k, b, 0.5, dtype, gen), blocky(n, h, b, 0.3, dtype, gen)
    b1 = torch.randn(h, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    x[2, 3], x[5, 0] = float("nan"), float("-inf")
    big = 6e4 if dtype == torch.float16 else 1e38
    x[9, 1] = big  # overflows fc1
    c1 = compress_block(w1, b)
    safe = bm.safe_bound(c1.blocks, c1.row_ptr, b1, dtype)
    x[13, 2] = min(big, safe * 4)  # flagged, but |x| * the row sums of W1 in column 2 may stay in range
    hid = F.gelu(F.linear(x.float(), w1.float(), b1.float()).to(dtype).float()).to(dtype)
    flag = bm.row_flag(x)
    g = ((flag - safe) * -1.0).log() * 0.0
    assert g[[2, 5, 9, 13]].isnan().all() and not g[[0, 1, 20]].isnan().any()
    c2 = compress_block(w2.to(DEV), b)
    y = tb.block_linear(hid.to(DEV), c2.blocks, c2.row_ptr, c2.col_idx, c2.row_order, None, n, h,
                        row_check=g.to(DEV)).cpu()
    ref = F.linear(hid.float(), w2.float())
    assert torch.equal(y.float().isnan(), ref.isnan())
    assert torch.equal(y.float().isinf(), ref.isinf())
    fin = ref.isfinite().all(1)
    assert_near(y[fin], F.linear(hid[fin].double(), w2.double()), torch.zeros_like(hid[fin]), w2, dtype)


def _hidden_case(dtype, gen, h=128):
    """W1 [h, 32], W2 [48, h] in 16x16 blocks with hidden block 1 unread (W2's column empty),
    block 2 constant (W1's row empty, W2 reads it), block 3 both; biases."""
    m, k, n, b = 40, 32, 48, 16
    w1, w2 = blocky(h, k, b, 0.5, dtype, gen), blocky(n, h, b, 0.4, dtype, gen)
    w2[:, 16:32] = 0
    w1[32:64] = 0
    w2[:, 48:64] = 0
    w2[:16, 32:48] = torch.randn(16, 16, generator=gen).to(dtype)
    b1, b2 = torch.randn(h, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    return x, w1, b1, w2, b2, (m, k, h, n, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h, bias1", [(128, True), (120, True), (128, False)])  # 120: a ragged last hidden block
def test_skip_hidden_gives_dense(dtype, h, bias1):
    """fc1 writing only the hidden units fc2 reads (hidden_plan; linear_block live / skip_check),
    fc2 without its blocks on constant units and their product in an fp32 bias, with the derived
    check: dense's values and NaN/Inf pattern. The tiles fc1 may skip start as NaN (out=), so a
    read of one would show; fc2's M tile (32) spans a flagged and an unflagged tile of fc1 (16)."""
    from sparse_inductor.formats import block_nonzero_map
    from sparse_inductor.lowering import triton_block as tb
    from sparse_inductor.passes.fuse_mlp import hidden_plan

    gen = torch.Generator().manual_seed(11)
    x, w1, b1, w2, b2, (m, k, h, n, b) = _hidden_case(dtype, gen, h)
    b1 = b1 if bias1 else None
    x[2, 3], x[37, 0] = float("nan"), float("-inf")  # fc1 tiles 0 and 2 flagged; tile 1 (rows 16-31) not
    c1, c2 = compress_block(w1, b), compress_block(w2, b)
    plan = hidden_plan(c1.blocks, c1.row_ptr, c1.row_order, b1, c2.blocks, c2.row_ptr, c2.col_idx, b2, h, n, "gelu")
    used, full1 = block_nonzero_map(w2, b).any(0), block_nonzero_map(w1, b).any(1)
    assert (plan.unread, plan.constant) == (int((~used).sum()), int((used & ~full1).sum()))
    assert plan.unread >= 2 and plan.constant >= 1 and plan.dropped >= 1
    skipped = plan.row_order1[plan.live:].long()
    assert set(skipped.tolist()) == set((~used | ~full1).nonzero().flatten().tolist())

    safe = bm.safe_bound(c1.blocks, c1.row_ptr, b1, dtype)
    g = ((bm.row_flag(x) - safe) * -1.0).log() * 0.0
    assert g.isnan().tolist() == [i in (2, 37) for i in range(m)]
    dev = lambda t: t.to(DEV)  # noqa: E731
    y1 = torch.full((m, h), float("nan"), dtype=dtype, device=DEV)
    bias = None if b1 is None else dev(b1)
    tb.block_linear(dev(x), dev(c1.blocks), dev(c1.row_ptr), dev(c1.col_idx), dev(plan.row_order1), bias, h, k,
                    live=plan.live, skip_check=dev(g), out=y1, config=tb.BlockLinearConfig(16, 4, 1))
    full = tb.block_linear(dev(x), dev(c1.blocks), dev(c1.row_ptr), dev(c1.col_idx), dev(c1.row_order), bias, h, k,
                           config=tb.BlockLinearConfig(16, 4, 1)).cpu()
    y1 = y1.cpu()
    cols = (skipped[:, None] * b + torch.arange(b)).flatten()
    cols = cols[cols < h]
    written = torch.ones(m, h, dtype=torch.bool)
    written[16:32, cols] = False
    assert y1[16:32][:, cols].isnan().all()  # left unwritten
    assert torch.equal(y1[written].isnan(), full[written].isnan())
    assert torch.equal(y1[written].nan_to_num(), full[written].nan_to_num())
    hid, hid_full = (F.gelu(t.float()).to(dtype) for t in (y1, full))

    y2 = tb.block_linear(dev(hid), *(dev(t) for t in plan.weight2), None, n, h, row_check=dev(g),
                         config=tb.BlockLinearConfig(32, 4, 1)).cpu()
    y = (y2.float() + plan.bias2).to(dtype)
    ref = F.linear(hid_full.double(), w2.double(), b2.double())
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    fin = ref.isfinite().all(1)
    assert fin.sum() == m - 2
    assert_near(y[fin], ref[fin], hid_full[fin], w2, dtype)


def test_hidden_plan_leaves_what_it_cannot_fold():
    """A NaN in a W2 block on a constant unit (or act(b1) not finite) is not folded: that unit stays
    computed, the unread ones are still skipped; no unread or constant unit: no plan."""
    from sparse_inductor.passes.fuse_mlp import hidden_plan

    gen = torch.Generator().manual_seed(12)
    x, w1, b1, w2, b2, (m, k, h, n, b) = _hidden_case(torch.bfloat16, gen)
    w2[0, 32] = float("nan")
    c1, c2 = compress_block(w1, b), compress_block(w2, b)
    plan = hidden_plan(c1.blocks, c1.row_ptr, c1.row_order, b1, c2.blocks, c2.row_ptr, c2.col_idx, b2, h, n, "gelu")
    assert plan.constant == 0 and plan.dropped == 0 and plan.weight2 is None and plan.unread >= 2
    w1, w2 = torch.ones(64, 32, dtype=torch.bfloat16), torch.ones(32, 64, dtype=torch.bfloat16)
    c1, c2 = compress_block(w1, 16), compress_block(w2, 16)
    assert hidden_plan(c1.blocks, c1.row_ptr, c1.row_order, None, c2.blocks, c2.row_ptr, c2.col_idx, None, 64, 32,
                       "relu") is None


def seeded_mlp(dtype=torch.bfloat16, **kw):
    torch.manual_seed(0)
    return Mlp(**kw).to(dtype).eval()


class TestFusePass(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _opts(self, triton_on_cpu):
        self.opts = {**triton_on_cpu, "fuse_mlp": True}

    def fused(self, model, x, **opts):
        """Compile with the pass; the output equals eager's (the ops' reference kernels on the CPU
        compute what the model does, the fused op included), up to the rounding of the ops Inductor
        generates around them (fp32: the LayerNorm's and GELU's order of operations)."""
        r = run_sparse(model, (x,), options={**self.opts, **opts})
        ref = model(x).detach()
        if x.dtype == torch.float32:
            torch.testing.assert_close(r.outputs[0], ref, rtol=1e-5, atol=1e-6, equal_nan=True)
        elif any("hidden-fold" in d.fused for d in r.decisions):
            # (left apart, fc2's inputs that are constant went into an fp32 bias: not eager's order of
            # operations, so the fp64 reference; the non-finite pattern is eager's all the same)
            assert_same_nonfinite(r.outputs[0], ref)
            ref64 = copy.deepcopy(model).double()(x.double()).detach()
            torch.testing.assert_close(r.outputs[0].double(), ref64, equal_nan=True, **TOLERANCES[("fp64", x.dtype)])
        else:
            assert_like_eager(r.outputs[0], ref)
        return r

    def test_golden_graph(self):
        x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
        r = self.fused(seeded_mlp(), x)
        gm = r.graphs[0]
        self.assertNotIn("linear_block", gm)
        self.assertNotIn("erf", gm)
        # the LayerNorm, then the flag (two reductions that fuse into the norm), one op for both
        # layers and the GELU, the residual add after it
        self.assertExpectedInline(gm, """\
def forward(self, arg6_1: "bf16[2, 5, 64]"):
_sparse_1_blocks: "bf16[8, 16, 16]" = self._sparse_1_blocks
_sparse_1_row_ptr: "i32[5]" = self._sparse_1_row_ptr
_sparse_1_col_idx: "i32[8]" = self._sparse_1_col_idx
_sparse_1_row_order: "i32[4]" = self._sparse_1_row_order
_sparse_0_blocks: "bf16[8, 16, 16]" = self._sparse_0_blocks
_sparse_0_row_ptr: "i32[9]" = self._sparse_0_row_ptr
_sparse_0_col_idx: "i32[8]" = self._sparse_0_col_idx
arg0_1: "bf16[64]" = self._frozen_param0
arg1_1: "bf16[64]" = self._frozen_param1
arg3_1: "bf16[128]" = self._frozen_param3
arg5_1: "bf16[64]" = self._frozen_param5
convert_element_type: "f32[2, 5, 64]" = torch.ops.prims.convert_element_type.default(arg6_1, torch.float32)
var_mean = torch.ops.aten.var_mean.correction(convert_element_type, [2], correction = 0, keepdim = True)
getitem: "f32[2, 5, 1]" = var_mean[0]
getitem_1: "f32[2, 5, 1]" = var_mean[1]
sub: "f32[2, 5, 64]" = torch.ops.aten.sub.Tensor(convert_element_type, getitem_1)
add: "f32[2, 5, 1]" = torch.ops.aten.add.Tensor(getitem, 1e-05)
rsqrt: "f32[2, 5, 1]" = torch.ops.aten.rsqrt.default(add)
mul: "f32[2, 5, 64]" = torch.ops.aten.mul.Tensor(sub, rsqrt)
mul_1: "f32[2, 5, 64]" = torch.ops.aten.mul.Tensor(mul, arg0_1)
add_1: "f32[2, 5, 64]" = torch.ops.aten.add.Tensor(mul_1, arg1_1)
convert_element_type_1: "bf16[2, 5, 64]" = torch.ops.prims.convert_element_type.default(add_1, torch.bfloat16)
view: "bf16[10, 64]" = torch.ops.aten.reshape.default(convert_element_type_1, [10, 64])
convert_element_type_default_2: "f32[10, 64]" = torch.ops.prims.convert_element_type.default(view, torch.float32)
abs_default: "f32[10, 64]" = torch.ops.aten.abs.default(convert_element_type_default_2)
amax_default: "f32[10]" = torch.ops.aten.amax.default(abs_default, [1])
mul_tensor_3: "f32[10, 64]" = torch.ops.aten.mul.Tensor(convert_element_type_default_2, 0.0)
sum_dim_int_list: "f32[10]" = torch.ops.aten.sum.dim_IntList(mul_tensor_3, [1])
add_tensor_2: "f32[10]" = torch.ops.aten.add.Tensor(amax_default, sum_dim_int_list)
mlp_block_default: "bf16[10, 64]" = torch.ops.sparse_inductor.mlp_block.default(view, _sparse_0_blocks, _sparse_0_row_ptr, _sparse_0_col_idx, arg3_1, _sparse_1_blocks, _sparse_1_row_ptr, _sparse_1_col_idx, _sparse_1_row_order, arg5_1, 128, 64, 'gelu', 'triton', 1.2056299622593083e+38, add_tensor_2)
reshape_default: "bf16[10, 64]" = torch.ops.aten.reshape.default(arg6_1, [10, 64])
add_tensor: "bf16[10, 64]" = torch.ops.aten.add.Tensor(reshape_default, mlp_block_default)
reshape_default_1: "bf16[2, 5, 64]" = torch.ops.aten.reshape.default(add_tensor, [2, 5, 64])
return (reshape_default_1,)""")

    def test_decisions_say_fused(self):
        x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
        r = self.fused(seeded_mlp(), x)
        for name, other, check in (("fc1", "fc2", "MLP flag in x's norm"), ("fc2", "fc1", "in the MLP kernel")):
            d = r.by_name(name)
            assert d.kernel == "triton" and d.fused[-1] == "mlp", d.line()
            assert f"fused with {other} and the gelu between them" in d.reason, d.line()
            assert d.row_check == check, d.line()
        assert r.counts["mlp_fused"] == 1, r.counts

    def test_other_activations(self):
        for act in ("relu", "silu", "none"):
            torch._dynamo.reset()
            torch.manual_seed(0)
            if act == "none":
                model = nn.Sequential(prune_lin(nn.Linear(64, 128)), prune_lin(nn.Linear(128, 64))).to(torch.bfloat16)
            else:
                model = seeded_mlp(act=act)
            r = self.fused(model.eval(), torch.randn(3, 64, dtype=torch.bfloat16))
            assert "mlp_block" in r.graphs[0] and f"'{act}', 'triton'" in r.graphs[0], r.graphs[0]

    def test_not_fused(self):
        # tanh is not an activation the kernel has; fp32 is not probed exhaustively; fuse_mlp=False
        for model, x, opts in ((seeded_mlp(act="tanh"), torch.randn(3, 64, dtype=torch.bfloat16), {}),
                               (seeded_mlp(torch.float32), torch.randn(3, 64), {}),
                               (seeded_mlp(), torch.randn(3, 64, dtype=torch.bfloat16), {"fuse_mlp": False})):
            r = self.fused(model, x, **opts)
            assert "mlp_block" not in r.graphs[0] and r.graphs[0].count(OP_BLOCK) == 2, r.graphs[0]
            assert all("mlp" not in d.fused for d in r.decisions)

    def test_hidden_used_twice_not_fused(self):
        class Twice(Mlp):
            def forward(self, x):
                a = self.act(self.fc1(x))
                return self.fc2(a) + a[..., :64]

        torch.manual_seed(0)
        r = self.fused(Twice(norm=False).to(torch.bfloat16).eval(), torch.randn(3, 64, dtype=torch.bfloat16))
        assert "mlp_block" not in r.graphs[0] and r.graphs[0].count(OP_BLOCK) == 2, r.graphs[0]

    def test_nonfinite_rows(self):
        model = seeded_mlp()
        x = torch.randn(4, 64, dtype=torch.bfloat16)
        x[1, 3] = float("nan")
        x[2, 0] = float("inf")
        r = self.fused(model, x)
        assert "mlp_block" in r.graphs[0]
        assert r.outputs[0][1].isnan().all() and r.outputs[0][2].isnan().all()

    def test_fast_mode_has_no_flag(self):
        r = self.fused(seeded_mlp(), torch.randn(3, 64, dtype=torch.bfloat16), nonfinite="fast")
        assert "mlp_block" in r.graphs[0] and "amax" not in r.graphs[0], r.graphs[0]


def test_identify_activation_rejects_lookalikes():
    import torch.fx as fx

    from sparse_inductor.passes.graph import identify_activation

    def chain(fn):
        g = fx.symbolic_trace(fn).graph
        nodes = [n for n in g.nodes if n.op == "call_function"]
        start = next(n for n in g.nodes if n.op == "placeholder")
        return nodes, start

    aten, prims = torch.ops.aten, torch.ops.prims

    def f32(t):
        return prims.convert_element_type.default(t, torch.float32)

    def bf16(t):
        return prims.convert_element_type.default(t, torch.bfloat16)

    def gelu(t):  # as the post-grad graph has it (Inductor's decomposition)
        u = f32(t)
        return bf16(aten.mul.Tensor(aten.mul.Tensor(u, 0.5), aten.add.Tensor(aten.erf.default(
            aten.mul.Tensor(u, 0.7071067811865476)), 1)))

    ok = {
        "gelu": gelu,
        "relu": lambda t: aten.relu.default(t),
        "silu": lambda t: bf16(aten.mul.Tensor(f32(t), aten.sigmoid.default(f32(t)))),
        "none": lambda t: aten.clone.default(t),
    }
    for name, fn in ok.items():
        nodes, start = chain(fn)
        assert identify_activation(nodes, start, torch.bfloat16) == name
    for fn in (lambda t: bf16(aten.gelu.default(f32(t), approximate="tanh")), lambda t: aten.mul.Tensor(t, 2),
               lambda t: aten.clamp_min.default(t, 0.0001),
               lambda t: bf16(aten.mul.Tensor(aten.mul.Tensor(f32(t), 0.5), aten.add.Tensor(aten.erf.default(
                   aten.mul.Tensor(f32(t), 0.7)), 1)))):  # a GELU with the wrong constant
        nodes, start = chain(fn)
        assert identify_activation(nodes, start, torch.bfloat16) is None
    nodes, start = chain(ok["gelu"])
    assert identify_activation(nodes, start, torch.float32) is None  # not probed exhaustively


# ---------------------------------------------------------------- GPU

class ResidualMlp(nn.Module):
    """A ViT block's MLP half: x + fc2(GELU(fc1(LayerNorm(x))))."""

    def __init__(self, d=256, h=1024):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _gpu_model(d=256, h=1024, sparsity=0.75):
    import sparse_inductor

    torch.manual_seed(0)
    model = ResidualMlp(d, h).cuda().to(torch.bfloat16).eval()
    sparse_inductor.prune(model, "block", block=64, sparsity=sparsity)
    return model


def assert_like_dense(model, x, out):
    """out has eager's (dense) NaN/Inf positions, and its finite rows match fp64."""
    from test_gpu_compile import TOL_BF16, fp64, rel_err

    with torch.no_grad():
        ref = model(x)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite().all(dim=1)
    assert rel_err(out[finite], fp64(model, x)[finite]) < TOL_BF16


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 200])
def test_gpu_fused_template_with_residual(m):
    """One template kernel computes both layers, the GELU between them and the residual add after;
    no other kernel computes an erf; dense's NaN/Inf rows come back; finite rows match fp64."""
    from test_gpu_compile import _sources, compile_and_code, kernel_defs

    model = _gpu_model()
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    if m > 1:  # (a huge finite x is the kernel test's: the LayerNorm's own overflow differs from eager's)
        x[3, 5], x[10, 2] = float("nan"), float("inf")
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton", "fuse_mlp": True})
    assert [d.kernel for d in decisions] == ["triton", "triton"] and all("mlp" in d.fused for d in decisions)
    assert_like_dense(model, x, out)
    tem = _sources(code, "def triton_tem_fused", "block_mlp_acc(X")
    assert len(tem) == 1, kernel_defs(code)
    torch.testing.FileCheck().check("acc = block_mlp_acc(X").check("tl.store").run(tem[0])
    assert "+ tmp" in tem[0].split("acc = block_mlp_acc(X")[1] or "tl.load(in_ptr" in tem[0].split("acc = block_mlp_acc(X")[1]
    assert not [k for k in _sources(code, "erf") if "block_mlp_acc(X" not in k], kernel_defs(code)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernel_exact_path(dtype):
    """The launcher on the device: finite rows against fp64, and a finite x large enough to overflow
    fc1 takes the exact path (dense's NaN/Inf pattern)."""
    gen = torch.Generator().manual_seed(3)
    m, k, h, n, b = 300, 256, 512, 192, 64
    w1, w2 = blocky(h, k, b, 0.25, dtype, gen), blocky(n, h, b, 0.25, dtype, gen)
    b1 = torch.randn(h, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    x[17, 0] = 6e4 if dtype == torch.float16 else 1e38
    x[200, 9] = float("nan")
    w1, w2, b1, x = (t.cuda() for t in (w1, w2, b1, x))
    y = run(x, w1, b1, w2, "gelu", b)
    h_ = F.gelu(F.linear(x, w1, b1))
    ref = F.linear(h_, w2)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    fin = ref.isfinite().all(1)
    assert not fin[17] and not fin[200]
    ref, hid = reference(x[fin].cpu(), w1.cpu(), b1.cpu(), w2.cpu(), "gelu", dtype)
    assert_near(y[fin], ref, hid, w2, dtype)


@pytest.mark.gpu
def test_gpu_fusion_is_timed():
    """With fuse_mlp the pass times the fused kernel against the two layers' times and says so."""
    from test_gpu_compile import compile_and_code

    model = _gpu_model(768, 3072, 0.9)
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"kernel": "triton", "fuse_mlp": True})
    fc1 = next(d for d in decisions if d.name.endswith("fc1"))
    if fc1.kernel == "triton" and next(d for d in decisions if d.name.endswith("fc2")).kernel == "triton":
        assert "us apart" in fc1.reason, fc1.line()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 200])
@pytest.mark.parametrize("nonfinite", ["exact", "fast"])
def test_gpu_hidden_units_skipped(m, nonfinite):
    """Left apart (the default), fc1's template skips the hidden units fc2 does not read (skip_tile,
    checked against the derived check in exact mode; always under "fast") and fc2 takes the constant
    ones as an fp32 bias: fp64's values, and in exact mode dense's NaN/Inf rows."""
    from test_gpu_compile import _sources, compile_and_code, kernel_defs

    model = _gpu_model()
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    if m > 1 and nonfinite == "exact":
        x[3, 5], x[130, 2] = float("nan"), float("inf")
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton", "nonfinite": nonfinite})
    fc1, fc2 = decisions
    assert "hidden-skip" in fc1.fused and "hidden-fold" in fc2.fused, (fc1.line(), fc2.line())
    assert_like_dense(model, x, out)
    tem = _sources(code, "def triton_tem_fused", "block_sparse_acc(X")
    assert len(tem) == 2, kernel_defs(code)
    skip = "if p >= LIVE:" if nonfinite == "fast" else "if skip_tile(S, p, LIVE, pid_m, M, BLOCK_M, True):"
    assert sum(skip in t for t in tem) == 1, kernel_defs(code)


@pytest.mark.filterwarnings("error:Raw SymInt value")
def test_dynamic_batch_3d(triton_on_cpu):
    """A 3-D input with a dynamic batch: the pass's new reshapes (sink_views) take sizes the graph can
    hold (torch.fx warns of a raw SymInt in a node's arguments: an error here); fc2's derived check
    and the hidden-unit skip still apply; NaN rows as dense."""
    model = seeded_mlp()
    xs = [torch.randn(b, 5, 64, dtype=torch.bfloat16) for b in (2, 3, 6)]
    xs[1][0, 1, 3] = float("nan")
    r = run_sparse(model, *[(x,) for x in xs], options=triton_on_cpu, dynamic=True)
    assert not [n for n in r.notes if "failed" in n], r.notes
    assert r.by_name("fc2").row_check == "from fc1's input, in its norm", r.by_name("fc2").line()
    for x, out in zip(xs, r.outputs):
        ref = copy.deepcopy(model).double()(x.double()).detach()
        bad = ~ref.isfinite()
        assert torch.equal(~out.isfinite(), bad)
        assert_close_fp64(out[~bad], ref[~bad], torch.bfloat16)


@settings(max_examples=6, deadline=None)
@given(d=st.sampled_from([32, 64]), h=st.sampled_from([64, 128]), m=st.integers(1, 9),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), act=st.sampled_from(["gelu", "relu", "silu"]),
       norm=st.booleans(), fast=st.booleans(),
       bad=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 63), st.sampled_from(["nan", "inf", "-inf", "big"])),
                    max_size=4))
def test_block_pair_any_input(d, h, m, dtype, act, norm, fast, bad):
    """Block MLP pairs apart (derived check, hidden units skipped or folded), any shape, dtype,
    activation and placement of NaN / Inf / huge values, against the model compiled by plain Inductor
    (its LayerNorm is ours): in exact mode the same NaN / Inf positions (the block kernel's fixup is
    exact); the rows without a special value close (fast mode: those rows only)."""
    with block_template_on_cpu():
        model = seeded_mlp(dtype, d=d, h=h, act=act, norm=norm)
        x = torch.randn(m, d, dtype=dtype)
        for r, c, v in bad:
            x[r % m, c % d] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
                               "big": torch.finfo(dtype).max / 2}[v]
        opts = {"force": True, "kernel": "triton", "fx_cache": False, **({"nonfinite": "fast"} if fast else {})}
        r = run_sparse(model, (x,), options=opts)
        assert not [n for n in r.notes if "failed" in n], r.notes
        torch._dynamo.reset()
        with torch.no_grad():
            ref = torch.compile(model)(x)
        out = r.outputs[0]
        if not fast:
            assert_same_nonfinite(out, ref)
        plain = torch.ones(m, dtype=torch.bool)
        for row, _, _ in bad:
            plain[row % m] = False
        torch.testing.assert_close(out[plain], ref[plain], **TOLERANCES[("fp64", dtype)])
