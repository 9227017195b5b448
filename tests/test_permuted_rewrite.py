"""Sparsity behind a permutation, end to end on CPU: detection through the backend finds scrambled
weights (prune(..., permute=True)), the rewrite puts the orders into the ops' x_index / out_index or
folds them into a constant neighbour, and graph shuffles next to a sparse linear (index_select,
gather, advanced indexing, a channel shuffle) go into them (passes/fold_permutations.py).

Forced on CPU (options force=True), every sparse layer runs the reference kernel, which un-permutes
its weight: the numbers are dense's arithmetic on the weight's values, so NaN/Inf positions are
eager's exactly and the values are within fp64 tolerances (a fold reorders a sum over K: not
bitwise). Golden graphs: the graph right after the sparse pass (EXPECTTEST_ACCEPT=1 regenerates).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import time

import expecttest
import pytest
import torch
import torch.nn as nn
from torch.testing import FileCheck

import sparse_inductor
from sparse_inductor.options import SparseOptions
from sparse_inductor.passes.detect import detect
from sparse_inductor.prune import prune_24_, prune_blocks_, scramble_

from test_backend import FORCE, assert_close_fp64, assert_same_nonfinite, block_template_on_cpu, run_sparse, seeded
from test_permute import block_weight, weight_24


def linear(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    lin.weight.data.copy_(w)
    return lin


def scrambled_block(n, k, b=16, density=0.25, seed=0, rows=True):
    return scramble_(block_weight(n, k, b, density, seed), rows=rows, seed=seed + 1)


def scrambled_24(n, k, seed=0):
    return scramble_(weight_24(n, k, seed), rows=False, seed=seed + 1)


def check(model: nn.Module, x: torch.Tensor, out: torch.Tensor, dtype=torch.float32) -> None:
    """out against the model in fp64 (values) and eager (NaN / Inf positions)."""
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        eager = model(x)
    assert_same_nonfinite(out, eager)
    fin = ref64.isfinite()
    assert_close_fp64(out[fin], ref64[fin], dtype)


def with_nonfinite(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x.view(-1, x.shape[-1])[0, 3] = math.nan
    x.view(-1, x.shape[-1])[1, -1] = -math.inf
    return x


# ---------------------------------------------------------------- models

class One(nn.Module):
    def __init__(self, w, bias=True, act=True):
        super().__init__()
        self.fc = linear(w, bias)
        self.act = act

    def forward(self, x):
        y = self.fc(x)
        return torch.relu(y) if self.act else y


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2; with `hidden`, the hidden units reordered alike in both weights (fc1's
    rows and bias, fc2's columns): the model computes what it did before."""

    def __init__(self, d=64, h=128, b=16, hidden=False, scramble=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        prune_blocks_(self.fc1.weight.data, b, 0.75)
        prune_blocks_(self.fc2.weight.data, b, 0.75)
        with torch.no_grad():
            if hidden:
                pi = torch.randperm(h)
                self.fc1.weight.copy_(self.fc1.weight[pi])
                self.fc1.bias.copy_(self.fc1.bias[pi])
                self.fc2.weight.copy_(self.fc2.weight[:, pi])
            if scramble:
                scramble_(self.fc1.weight.data, seed=seed + 1)
                scramble_(self.fc2.weight.data, seed=seed + 2)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Shuffled(nn.Module):
    """A constant permutation of a block-sparse linear's input features (index_select) and of its
    output features (gather with an expanded index), with a ReLU between the first and the layer."""

    def __init__(self, n=32, k=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = linear(prune_blocks_(torch.randn(n, k, generator=g), 16, 0.75))
        self.register_buffer("p", torch.randperm(k, generator=g))
        self.register_buffer("q", torch.randperm(n, generator=g))

    def forward(self, x):
        y = self.fc(torch.relu(x.index_select(-1, self.p)))
        return torch.gather(y, -1, self.q.expand_as(y))


class ChannelShuffle(nn.Module):
    """dense fc1, a channel shuffle of its output (view / transpose / reshape), 2:4 fc2; the output
    of fc2 read through advanced indexing."""

    def __init__(self, d=32, h=64, groups=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        prune_24_(self.fc2.weight.data)
        self.groups = groups
        self.register_buffer("r", torch.randperm(d))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = h.view(*h.shape[:-1], self.groups, -1).transpose(-1, -2).reshape(h.shape)
        return self.fc2(h)[..., self.r]


# ---------------------------------------------------------------- golden graphs

class TestGoldenGraphs(expecttest.TestCase):
    """The graph right after the sparse pass, one per way an order goes."""

    def graph(self, model, x, options=FORCE, sparse=1):
        torch._dynamo.reset()
        r = run_sparse(model.eval(), (x,), options=options)
        self.assertEqual(r.notes, [])  # (no fallback to plain Inductor)
        self.assertEqual(len(r.graphs), 1)
        self.assertEqual(sum(d.sparse for d in r.decisions), sparse, [d.line() for d in r.decisions])
        check(model, x, r.outputs[0])
        return r

    def test_block_behind_rows_and_columns(self):
        # the search's orders: x gathered in the kernel's loads, outputs mapped in its store
        r = self.graph(One(scrambled_block(64, 64)), with_nonfinite(torch.randn(4, 64)))
        (d,) = r.decisions
        assert (d.pattern, d.block) == ("block", 16)
        assert re.search(r"^block 16x16 after row and column permutation, 25\.0% of blocks nonzero \(found in "
                         r"[\d.]+ s\); forced", d.reason), d.reason
        assert d.permutation == ("x gathered in the kernel's loads; outputs mapped to their columns in the "
                                 "kernel's store"), d.permutation
        assert r.counts["permutation_search"] == r.counts["permutation_found"] == 1
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg2_1: "f32[4, 64]"):
_sparse_1_x_index: "i32[64]" = self._sparse_1_x_index
_sparse_1_out_index: "i32[64]" = self._sparse_1_out_index
_sparse_0_blocks: "f32[4, 16, 16]" = self._sparse_0_blocks
_sparse_0_row_ptr: "i32[5]" = self._sparse_0_row_ptr
_sparse_0_col_idx: "i32[4]" = self._sparse_0_col_idx
_sparse_0_row_order: "i32[4]" = self._sparse_0_row_order
arg1_1: "f32[64]" = self._frozen_param1
linear_block_default: "f32[4, 64]" = torch.ops.sparse_inductor.linear_block.default(arg2_1, _sparse_0_blocks, _sparse_0_row_ptr, _sparse_0_col_idx, _sparse_0_row_order, arg1_1, 64, 64, 'reference', x_index = _sparse_1_x_index, out_index = _sparse_1_out_index)
relu: "f32[4, 64]" = torch.ops.aten.relu.default(linear_block_default)
return (relu,)""")

    def test_24_behind_columns(self):
        r = self.graph(One(scrambled_24(32, 64), act=False), with_nonfinite(torch.randn(3, 64)))
        (d,) = r.decisions
        assert d.pattern == "2:4" and d.reason.startswith("2:4 after column permutation (found in ")
        assert d.permutation == "x gathered in the kernel's loads"
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg2_1: "f32[3, 64]"):
_sparse_1_x_index: "i32[64]" = self._sparse_1_x_index
_sparse_0_values: "f32[2, 32, 16]" = self._sparse_0_values
_sparse_0_meta: "u8[16, 16]" = self._sparse_0_meta
arg1_1: "f32[32]" = self._frozen_param1
linear_24_default: "f32[3, 32]" = torch.ops.sparse_inductor.linear_24.default(arg2_1, _sparse_0_values, _sparse_0_meta, arg1_1, 'reference', x_index = _sparse_1_x_index)
return (linear_24_default,)""")

    def test_graph_shuffles_folded(self):
        # index_select in front (through the ReLU), gather behind: both gone, in the op's indices
        model = seeded(Shuffled)
        r = self.graph(model, with_nonfinite(torch.randn(2, 3, 64)))
        (d,) = r.decisions
        assert d.permutation == ("index of its input folded; gather of its output folded; x gathered in the "
                                 "kernel's loads; outputs mapped to their columns in the kernel's store"), d.permutation
        assert r.counts["shuffle_fold"] == 2
        assert "index" not in r.graphs[0].replace("x_index", "").replace("out_index", "")
        assert "gather" not in r.graphs[0]
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg4_1: "f32[2, 3, 64]"):
_permuted_bias: "f32[32]" = self._permuted_bias
_sparse_1_x_index: "i32[64]" = self._sparse_1_x_index
_sparse_1_out_index: "i32[32]" = self._sparse_1_out_index
_sparse_0_blocks: "f32[2, 16, 16]" = self._sparse_0_blocks
_sparse_0_row_ptr: "i32[3]" = self._sparse_0_row_ptr
_sparse_0_col_idx: "i32[2]" = self._sparse_0_col_idx
_sparse_0_row_order: "i32[2]" = self._sparse_0_row_order
relu: "f32[2, 3, 64]" = torch.ops.aten.relu.default(arg4_1)
view: "f32[6, 64]" = torch.ops.aten.reshape.default(relu, [6, 64])
linear_block_default: "f32[6, 32]" = torch.ops.sparse_inductor.linear_block.default(view, _sparse_0_blocks, _sparse_0_row_ptr, _sparse_0_col_idx, _sparse_0_row_order, _permuted_bias, 32, 64, 'reference', x_index = _sparse_1_x_index, out_index = _sparse_1_out_index)
view_1: "f32[2, 3, 32]" = torch.ops.aten.reshape.default(linear_block_default, [2, 3, 32])
return (view_1,)""")

    def test_channel_shuffle_into_the_dense_layer_before(self):
        # the channel shuffle between a dense fc1 and a 2:4 fc2 goes into fc1's weight rows and
        # bias; fc2's output indexing into the rows of fc2's constants and its bias
        model = seeded(ChannelShuffle)
        r = self.graph(model, with_nonfinite(torch.randn(2, 3, 32)))
        fc1, fc2 = r.decisions
        assert fc1.kernel == "dense" and fc1.permutation == "weight rows and bias permuted to write fc2's input order"
        assert fc2.permutation == ("channel shuffle of its input folded; index of its output folded; x's order "
                                   "folded into fc1; rows permuted in its constants"), fc2.permutation
        assert r.counts["permutation_fold"] == 1 and r.counts["shuffle_fold"] == 2
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg5_1: "f32[2, 3, 32]"):
_permuted_bias_1: "f32[64]" = self._permuted_bias_1
_permuted_weight: "f32[32, 64]" = self._permuted_weight
_permuted_bias: "f32[32]" = self._permuted_bias
_sparse_0_values: "f32[2, 32, 16]" = self._sparse_0_values
_sparse_0_meta: "u8[16, 16]" = self._sparse_0_meta
view: "f32[6, 32]" = torch.ops.aten.reshape.default(arg5_1, [6, 32])
addmm: "f32[6, 64]" = torch.ops.aten.addmm.default(_permuted_bias_1, view, _permuted_weight)
view_1: "f32[2, 3, 64]" = torch.ops.aten.reshape.default(addmm, [2, 3, 64])
relu: "f32[2, 3, 64]" = torch.ops.aten.relu.default(view_1)
view_4: "f32[6, 64]" = torch.ops.aten.reshape.default(relu, [6, 64])
linear_24_default: "f32[6, 32]" = torch.ops.sparse_inductor.linear_24.default(view_4, _sparse_0_values, _sparse_0_meta, _permuted_bias, 'reference')
view_5: "f32[2, 3, 32]" = torch.ops.aten.reshape.default(linear_24_default, [2, 3, 32])
return (view_5,)""")

    def test_hidden_order_shared_by_fc1_and_fc2(self):
        # the hidden units reordered alike in both weights: one order serves both layers (fc1's
        # blocks in it, fc2's weight columns permuted to it before fc2 is detected, so fc2 is
        # block-sparse as it then stands): neither kernel permutes anything
        model = Mlp(hidden=True)
        r = self.graph(model, with_nonfinite(torch.randn(4, 64)), sparse=2)
        fc1, fc2 = r.decisions
        assert fc1.reason.startswith("block 16x16 after row permutation"), fc1.reason
        assert fc2.reason.startswith("16x16 blocks"), fc2.reason
        assert fc1.permutation == "outputs in fc2's input order (no output map)", fc1.permutation
        assert fc2.permutation == "weight's columns permuted to read fc1's output order", fc2.permutation
        assert "x_index" not in r.graphs[0] and "out_index" not in r.graphs[0]
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg4_1: "f32[4, 64]"):
_sparse_1_blocks: "f32[8, 16, 16]" = self._sparse_1_blocks
_sparse_1_row_ptr: "i32[5]" = self._sparse_1_row_ptr
_sparse_1_col_idx: "i32[8]" = self._sparse_1_col_idx
_sparse_1_row_order: "i32[4]" = self._sparse_1_row_order
_permuted_bias: "f32[128]" = self._permuted_bias
_sparse_0_blocks: "f32[8, 16, 16]" = self._sparse_0_blocks
_sparse_0_row_ptr: "i32[9]" = self._sparse_0_row_ptr
_sparse_0_col_idx: "i32[8]" = self._sparse_0_col_idx
_sparse_0_row_order: "i32[8]" = self._sparse_0_row_order
arg3_1: "f32[64]" = self._frozen_param3
linear_block_default: "f32[4, 128]" = torch.ops.sparse_inductor.linear_block.default(arg4_1, _sparse_0_blocks, _sparse_0_row_ptr, _sparse_0_col_idx, _sparse_0_row_order, _permuted_bias, 128, 64, 'reference')
mul: "f32[4, 128]" = torch.ops.aten.mul.Tensor(linear_block_default, 0.5)
mul_1: "f32[4, 128]" = torch.ops.aten.mul.Tensor(linear_block_default, 0.7071067811865476)
erf: "f32[4, 128]" = torch.ops.aten.erf.default(mul_1)
add: "f32[4, 128]" = torch.ops.aten.add.Tensor(erf, 1)
mul_2: "f32[4, 128]" = torch.ops.aten.mul.Tensor(mul, add)
linear_block_default_1: "f32[4, 64]" = torch.ops.sparse_inductor.linear_block.default(mul_2, _sparse_1_blocks, _sparse_1_row_ptr, _sparse_1_col_idx, _sparse_1_row_order, arg3_1, 64, 128, 'reference')
return (linear_block_default_1,)""")

    def test_independent_orders_compose(self):
        # independent scrambles: fc2's x_index composes with fc1's out_index (fc1 writes where fc2
        # reads); fc1 still gathers its own x and fc2 maps its outputs
        model = Mlp(scramble=True, seed=3)
        r = self.graph(model, with_nonfinite(torch.randn(4, 64)), sparse=2)
        fc1, fc2 = r.decisions
        assert fc1.permutation == ("x gathered in the kernel's loads; outputs mapped to fc2's input order in the "
                                   "kernel's store"), fc1.permutation
        assert fc2.permutation.startswith("x's order folded into fc1"), fc2.permutation
        assert r.graphs[0].count("x_index = ") == 1  # fc1's
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg4_1: "f32[4, 64]"):
_permuted_out_index: "i32[128]" = self._permuted_out_index
_permuted_bias: "f32[128]" = self._permuted_bias
_sparse_3_out_index: "i32[64]" = self._sparse_3_out_index
_sparse_2_blocks: "f32[8, 16, 16]" = self._sparse_2_blocks
_sparse_2_row_ptr: "i32[5]" = self._sparse_2_row_ptr
_sparse_2_col_idx: "i32[8]" = self._sparse_2_col_idx
_sparse_2_row_order: "i32[4]" = self._sparse_2_row_order
_sparse_1_x_index: "i32[64]" = self._sparse_1_x_index
_sparse_0_blocks: "f32[8, 16, 16]" = self._sparse_0_blocks
_sparse_0_row_ptr: "i32[9]" = self._sparse_0_row_ptr
_sparse_0_col_idx: "i32[8]" = self._sparse_0_col_idx
_sparse_0_row_order: "i32[8]" = self._sparse_0_row_order
arg3_1: "f32[64]" = self._frozen_param3
linear_block_default: "f32[4, 128]" = torch.ops.sparse_inductor.linear_block.default(arg4_1, _sparse_0_blocks, _sparse_0_row_ptr, _sparse_0_col_idx, _sparse_0_row_order, _permuted_bias, 128, 64, 'reference', x_index = _sparse_1_x_index, out_index = _permuted_out_index)
mul: "f32[4, 128]" = torch.ops.aten.mul.Tensor(linear_block_default, 0.5)
mul_1: "f32[4, 128]" = torch.ops.aten.mul.Tensor(linear_block_default, 0.7071067811865476)
erf: "f32[4, 128]" = torch.ops.aten.erf.default(mul_1)
add: "f32[4, 128]" = torch.ops.aten.add.Tensor(erf, 1)
mul_2: "f32[4, 128]" = torch.ops.aten.mul.Tensor(mul, add)
linear_block_default_1: "f32[4, 64]" = torch.ops.sparse_inductor.linear_block.default(mul_2, _sparse_2_blocks, _sparse_2_row_ptr, _sparse_2_col_idx, _sparse_2_row_order, arg3_1, 64, 128, 'reference', out_index = _sparse_3_out_index)
return (linear_block_default_1,)""")

    def test_output_order_read_by_a_dense_layer_after(self):
        # fc1 behind a row order, fc2 with no zero at all: fc1 writes its outputs in its blocks'
        # order (no output map) and fc2's weight columns are permuted to read them so
        model = Mlp(d=64, h=128)
        with torch.no_grad():
            model.fc1.weight.copy_(scrambled_block(128, 64, seed=5))
            model.fc2.weight.normal_()
        r = self.graph(model, with_nonfinite(torch.randn(4, 64)), sparse=1)
        fc1, fc2 = r.decisions
        assert fc1.permutation == "x gathered in the kernel's loads; outputs in fc2's input order (no output map)", \
            fc1.permutation
        assert fc2.kernel == "dense" and fc2.permutation == "weight's columns permuted to read fc1's output order"
        assert "out_index" not in r.graphs[0]
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg4_1: "f32[4, 64]"):
_permuted_weight: "f32[128, 64]" = self._permuted_weight
_permuted_bias: "f32[128]" = self._permuted_bias
_sparse_1_x_index: "i32[64]" = self._sparse_1_x_index
_sparse_0_blocks: "f32[9, 16, 16]" = self._sparse_0_blocks
_sparse_0_row_ptr: "i32[9]" = self._sparse_0_row_ptr
_sparse_0_col_idx: "i32[9]" = self._sparse_0_col_idx
_sparse_0_row_order: "i32[8]" = self._sparse_0_row_order
arg3_1: "f32[64]" = self._frozen_param3
linear_block_default: "f32[4, 128]" = torch.ops.sparse_inductor.linear_block.default(arg4_1, _sparse_0_blocks, _sparse_0_row_ptr, _sparse_0_col_idx, _sparse_0_row_order, _permuted_bias, 128, 64, 'reference', x_index = _sparse_1_x_index)
mul: "f32[4, 128]" = torch.ops.aten.mul.Tensor(linear_block_default, 0.5)
mul_1: "f32[4, 128]" = torch.ops.aten.mul.Tensor(linear_block_default, 0.7071067811865476)
erf: "f32[4, 128]" = torch.ops.aten.erf.default(mul_1)
add: "f32[4, 128]" = torch.ops.aten.add.Tensor(erf, 1)
mul_2: "f32[4, 128]" = torch.ops.aten.mul.Tensor(mul, add)
addmm_1: "f32[4, 64]" = torch.ops.aten.addmm.default(arg3_1, mul_2, _permuted_weight)
return (addmm_1,)""")

    def test_orders_applied_in_the_graph(self):
        # the dispatcher's choice (tb._variants, timed on a GPU) to gather x before the call and the
        # outputs after it: the op reads no index vector, two index nodes around it, its bias in
        # its rows' order
        from sparse_inductor.passes import linear_rewrite

        real = linear_rewrite.choose

        def choose(layer, opts, timer):
            c = real(layer, opts, timer)
            assert layer.x_index and layer.out_index
            return dataclasses.replace(c, params={"x": "graph", "y": "graph"})

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(linear_rewrite, "choose", choose)
            r = self.graph(One(scrambled_block(64, 64)), with_nonfinite(torch.randn(4, 64)))
        (d,) = r.decisions
        assert d.permutation == "x gathered before the call; outputs mapped to their columns after the call (a gather)"
        assert "x_index = " not in r.graphs[0] and "out_index = " not in r.graphs[0]
        self.assertExpectedInline(r.graphs[0], """\
def forward(self, arg2_1: "f32[4, 64]"):
_sparse_2_out_gather: "i32[64]" = self._sparse_2_out_gather
_permuted_bias: "f32[64]" = self._permuted_bias
_sparse_1_x_index: "i32[64]" = self._sparse_1_x_index
_sparse_0_blocks: "f32[4, 16, 16]" = self._sparse_0_blocks
_sparse_0_row_ptr: "i32[5]" = self._sparse_0_row_ptr
_sparse_0_col_idx: "i32[4]" = self._sparse_0_col_idx
_sparse_0_row_order: "i32[4]" = self._sparse_0_row_order
index_tensor: "f32[4, 64]" = torch.ops.aten.index.Tensor(arg2_1, [None, _sparse_1_x_index])
linear_block_default: "f32[4, 64]" = torch.ops.sparse_inductor.linear_block.default(index_tensor, _sparse_0_blocks, _sparse_0_row_ptr, _sparse_0_col_idx, _sparse_0_row_order, _permuted_bias, 64, 64, 'reference')
index_tensor_1: "f32[4, 64]" = torch.ops.aten.index.Tensor(linear_block_default, [None, _sparse_2_out_gather])
relu: "f32[4, 64]" = torch.ops.aten.relu.default(index_tensor_1)
return (relu,)""")

    def test_options_hold_the_orders_in_the_graph(self):
        # options permute_apply="graph" without a timer (CPU): the same graph as the timed choice
        r = self.graph(One(scrambled_block(64, 64)), with_nonfinite(torch.randn(4, 64)),
                       options={**FORCE, "permute_apply": "graph"})
        (d,) = r.decisions
        assert d.permutation == "x gathered before the call; outputs mapped to their columns after the call (a gather)"
        assert r.graphs[0].count("aten.index.Tensor") == 2 and "x_index = " not in r.graphs[0]


class Residual(nn.Module):
    """fc1 -> GELU (+ x, a tensor with columns of its own) -> fc2; or fc1's output also returned."""

    def __init__(self, also_out=False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64)
        with torch.no_grad():
            self.fc1.weight.copy_(scrambled_block(64, 64, seed=7))
        self.also_out = also_out

    def forward(self, x):
        h = self.fc1(x)
        if self.also_out:
            return self.fc2(nn.functional.gelu(h)), h
        return self.fc2(nn.functional.gelu(h) + x)


@pytest.mark.parametrize("also_out", [False, True], ids=["residual_between", "output_read_twice"])
def test_output_order_stays_mapped_where_the_layer_after_cannot_take_it(also_out):
    model = Residual(also_out).eval()
    x = torch.randn(5, 64)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options=FORCE)
    fc1 = next(d for d in r.decisions if d.name == "fc1")
    assert fc1.sparse and fc1.permutation.endswith("outputs mapped to their columns in the kernel's store"), \
        fc1.permutation
    fc2 = next(d for d in r.decisions if d.name == "fc2")
    assert fc2.permutation == "", fc2.permutation
    outs = r.outputs[0] if also_out else (r.outputs[0],)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
    for o, e in zip(outs, ref64 if also_out else (ref64,)):
        assert_close_fp64(o, e, torch.float32)


# ---------------------------------------------------------------- generated code: no extra kernel

def test_folded_shuffles_leave_no_kernel():
    """On CPU Inductor writes each pointwise kernel as a C++ kernel named after its ops: around the
    dense layer the shuffles are two (the index_select with the ReLU, the gather); folded into the
    sparse op, the ReLU's kernel is all that is left beside the op's extern call."""
    model = seeded(Shuffled)
    x = torch.randn(2, 3, 64)

    def kernels(code):
        return sorted(set(re.findall(r"cpp_fused_\w+", code)))

    dense = run_sparse(model, (x,), options={})  # (on CPU nothing is rewritten unless forced)
    assert kernels(dense.code) == ["cpp_fused_gather_view_1", "cpp_fused_index_select_relu_0"], kernels(dense.code)
    torch._dynamo.reset()
    r = run_sparse(model, (x,), options={**FORCE, "nonfinite": "fast"})
    assert kernels(r.code) == ["cpp_fused_relu_0"], kernels(r.code)
    FileCheck().check("cpp_fused_relu_0").check_count("torch.ops.sparse_inductor.linear_block.default(", 1,
                                                      exactly=True).run(r.code)


def test_dynamic_batch_keeps_the_folds():
    """A second batch size recompiles with a dynamic batch: the shuffles (a channel shuffle through
    symbolic leading dims included) are folded in that graph too."""
    for model, d in ((seeded(Shuffled), 64), (seeded(ChannelShuffle), 32)):
        torch._dynamo.reset()
        xs = [with_nonfinite(torch.randn(2, 3, d)), with_nonfinite(torch.randn(5, 3, d))]
        r = run_sparse(model, *[(x,) for x in xs])
        assert len(r.graphs) == 2 and r.counts["shuffle_fold"] == 4, (r.counts, r.graphs)
        assert "Sym(" in r.graphs[1]
        for x, out in zip(xs, r.outputs):
            check(model, x, out)


# ---------------------------------------------------------------- detection, budget, cache, options

def test_prune_permute_is_recovered_through_the_backend():
    """prune(..., permute=True) hides each layer's pattern behind a random order; every one of them
    is found again and runs sparse, with NaN/Inf as dense (block 16x16 and 2:4)."""
    for pattern, kw in (("block", dict(block=16, sparsity=0.75)), ("2:4", {})):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64)).eval()
        names = sparse_inductor.prune(model, pattern, permute=True, **kw)
        assert names == ["0", "2"]
        assert all(detect(m.weight, SparseOptions(permute=False)).pattern == "dense" for m in (model[0], model[2]))
        x = with_nonfinite(torch.randn(5, 64))
        torch._dynamo.reset()
        r = run_sparse(model, (x,))
        assert [d.pattern for d in r.decisions] == [pattern, pattern], [d.line() for d in r.decisions]
        assert all(d.sparse and "permutation" in d.reason for d in r.decisions)
        check(model, x, r.outputs[0])


def test_dense_weight_is_refused_without_a_search():
    """A trained dense weight (no exact zeros) is refused from its density alone."""
    torch.manual_seed(0)
    r = run_sparse(nn.Sequential(nn.Linear(64, 64)).eval(), (torch.randn(2, 64),))
    (d,) = r.decisions
    assert d.pattern == "dense" and "no row or column order can help (100.0% of the weights nonzero)" in d.reason
    assert "permutation_search" not in r.counts


def test_budget_is_held():
    """A weight for which no column order is 2:4 (one row has three nonzeros in a group), with a
    tiny budget: dense, with the search's reason, within the budget (plus the margin a busy CPU
    needs for what runs between the search's clock checks)."""
    w = weight_24(256, 512, seed=6)
    row = w[0].view(-1, 4)
    row[0, (row[0] == 0).nonzero()[0]] = 1.0
    row[1, (row[1] != 0).nonzero()[0]] = 0.0
    w = scramble_(w, rows=False, seed=7)
    budget = 0.05
    torch._dynamo.reset()
    t0 = time.perf_counter()
    d = detect(w, SparseOptions(permute_budget_s=budget))
    elapsed = time.perf_counter() - t0
    assert d.pattern == "dense" and "2:4" in d.reason and "searched" in d.reason, d.reason
    assert elapsed < budget + 0.5, elapsed
    r = run_sparse(One(w), (torch.randn(2, 512),), options={**FORCE, "permute_budget_s": budget})
    assert r.decisions[0].pattern == "dense" and "searched" in r.decisions[0].reason


def test_second_compile_hits_the_cache(tmp_path, monkeypatch):
    """The search's result is cached under the cache directory (memory and one file a weight): a
    second compile of the model does not search again."""
    monkeypatch.setenv("SPARSE_INDUCTOR_CACHE_DIR", str(tmp_path))
    model = One(scrambled_block(64, 48, seed=11))
    x = torch.randn(3, 48)
    first = run_sparse(model, (x,))
    assert first.counts["permutation_search"] == 1 and "permutation_cached" not in first.counts
    assert len(os.listdir(tmp_path / "permutations")) == 1
    torch._dynamo.reset()
    second = run_sparse(model, (x,))
    assert second.counts["permutation_cached"] == 1 and "permutation_search" not in second.counts
    assert "cached" in second.decisions[0].reason
    torch.testing.assert_close(second.outputs[0], first.outputs[0], rtol=0, atol=0)


def test_permute_off_keeps_the_layer_dense():
    model = One(scrambled_block(64, 64))
    r = run_sparse(model, (torch.randn(2, 64),), options={**FORCE, "permute": False})
    assert r.decisions[0].pattern == "dense" and "permutation" not in r.decisions[0].reason
    assert not r.counts.get("permutation_search")


@pytest.mark.parametrize("kw,err,match", [
    ({"permute": 1}, TypeError, "'permute' must be True or False"),
    ({"permute_budget_s": "2"}, TypeError, "'permute_budget_s' must be a number"),
    ({"permute_budget_s": 0}, ValueError, "permute_budget_s must be a positive number"),
    ({"permute_budget_s": float("nan")}, ValueError, "permute_budget_s must be a positive number"),
    ({"permute_apply": "store"}, ValueError, "unknown permute_apply 'store'"),
    ({"permute_apply": None}, TypeError, "'permute_apply' must be a string"),
])
def test_bad_options(kw, err, match):
    with pytest.raises(err, match=match):
        SparseOptions(**kw)


def test_options_enter_the_digest():
    assert SparseOptions().digest() != SparseOptions(permute=False).digest()
    assert SparseOptions().digest() != SparseOptions(permute_budget_s=1.0).digest()
    assert SparseOptions().digest() != SparseOptions(permute_apply="graph").digest()


def test_pinned_variants():
    from sparse_inductor.measure import pinned

    both = [{"x": a, "y": b} for a in ("loads", "graph") for b in ("store", "graph")]
    assert pinned(both, "timed") == both
    assert pinned(both, "kernel") == [{"x": "loads", "y": "store"}]
    assert pinned(both, "graph") == [{"x": "graph", "y": "graph"}]
    assert pinned([{"alg_id": 1}, {"alg_id": 2}], "graph") == [{"alg_id": 1}, {"alg_id": 2}]


def test_explain_says_what_was_found_and_where_it_went():
    model = Mlp(scramble=True, seed=3).eval()
    report = sparse_inductor.explain(model, torch.randn(2, 64), options=FORCE)
    text = str(report)
    assert "block 16x16 after row and column permutation" in text, text
    assert "permutation: x gathered in the kernel's loads" in text, text
    assert "x's order folded into fc1" in text, text


# ---------------------------------------------------------------- the row checks

def test_row_checks_of_permuted_block_layers():
    """The block template (made available on the CPU, where its lowering falls back to the
    reference): the row check is a sum over x's row, the same for any order of its columns, so a
    permuted layer's check reads x as it is, and fc2's check comes from fc1's input (the derived
    check, fp16) also when the pair is permuted; the NaN/Inf positions are eager's."""
    model = Mlp(scramble=True, seed=3).half()
    x = with_nonfinite(torch.randn(4, 64)).half()
    with block_template_on_cpu():
        torch._dynamo.reset()
        r = run_sparse(model, (x,), options={**FORCE, "kernel": "triton", "fx_cache": False})
    fc1, fc2 = r.decisions
    assert fc1.row_check == "own kernel" and fc2.row_check == "from fc1's input", (fc1.line(), fc2.line())
    assert r.counts["derived_check"] == 1
    assert "row_check.default(arg" in r.graphs[0]  # fc1's check over the graph's input itself
    check(model, x, r.outputs[0], torch.float16)


# ---------------------------------------------------------------- GPU: the templates, fused

class GpuShuffled(nn.Module):
    """A constant permutation of the input features (advanced indexing) and of the output
    features (gather) of a block-sparse linear with a ReLU after it: folded, one template kernel."""

    def __init__(self, n=512, k=256, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = linear(prune_blocks_(torch.randn(n, k, generator=g), 64, 0.75))
        self.register_buffer("p", torch.randperm(k, generator=g))
        self.register_buffer("q", torch.randperm(n, generator=g))

    def forward(self, x):
        y = torch.relu(self.fc(x[..., self.p]))
        return torch.gather(y, -1, self.q.expand_as(y))


def _gpu(model):
    return model.cuda().to(torch.bfloat16).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64])
def test_gpu_permuted_block_layer_is_one_kernel(m):
    """A block-sparse weight stored scrambled (rows and columns): the template reads x at X_INDEX
    and writes through out_columns(OUT_INDEX...), with the bias and ReLU in its store: one kernel
    (nonfinite="fast": no row-check kernel); values against fp64."""
    from test_gpu_compile import TOL_BF16, _sources, compile_and_code, fp64, kernel_defs, rel_err

    torch.manual_seed(0)
    model = _gpu(nn.Sequential(nn.Linear(256, 512), nn.ReLU()))
    sparse_inductor.prune(model, "block", block=64, sparsity=0.75, permute=True)
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton", "nonfinite": "fast",
                                                       "permute_apply": "kernel"})
    (d,) = decisions
    assert d.kernel == "triton" and "after row and column permutation" in d.reason, d.line()
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    defs = kernel_defs(code)
    assert len(defs) == 1 and defs[0].startswith("triton_tem_fused_"), defs
    assert len(_sources(code, "X_INDEX, True", "out_columns(OUT_INDEX", "maximum")) == 1
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code


@pytest.mark.gpu
def test_gpu_gathers_in_the_graph_join_their_neighbours():
    """permute_apply="graph": x's gather joins the LayerNorm kernel that makes x, the outputs'
    gather the GELU kernel that reads them: three kernels (the norm, the template, the GELU), none
    a gather alone; values against fp64."""
    from test_gpu_compile import TOL_BF16, compile_and_code, fp64, kernel_defs, rel_err

    torch.manual_seed(0)
    model = _gpu(nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 512), nn.GELU()))
    sparse_inductor.prune(model, "block", block=64, sparsity=0.75, permute=True)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton", "nonfinite": "fast",
                                                       "permute_apply": "graph"})
    (d,) = decisions
    assert d.permutation == "x gathered before the call; outputs mapped to their columns after the call (a gather)"
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    defs = kernel_defs(code)
    assert len(defs) == 3, defs
    assert sum(n.startswith("triton_tem_") for n in defs) == 1, defs
    # the two gathers are in no kernel of their own (five kernels otherwise); Inductor names a
    # kernel by its ops' origins, which leave the gathers out (on H100: "..._native_layer_norm_0",
    # "triton_tem_fused_addmm_native_layer_norm_1", "..._addmm_gelu_native_layer_norm_2")
    assert sum("layer_norm" in n and not n.startswith("triton_tem_") for n in defs) == 2, defs
    assert sum("gelu" in n for n in defs) == 1, defs


@pytest.mark.gpu
def test_gpu_permuted_block_nonfinite_like_dense():
    """Exact mode (the row check over x, the fixup reading x gathered): dense's NaN / Inf positions."""
    from test_gpu_compile import TOL_BF16, compile_and_code, fp64, rel_err

    torch.manual_seed(0)
    model = _gpu(nn.Sequential(nn.Linear(256, 512)))
    sparse_inductor.prune(model, "block", block=64, sparsity=0.75, permute=True)
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    x[3, 5], x[10, 200] = float("nan"), float("-inf")
    out, _, _ = compile_and_code(model, x, {"force": True, "kernel": "triton"})
    with torch.no_grad():
        eager = model(x)
    assert_same_nonfinite(out, eager)
    fin = eager.isfinite()
    assert rel_err(out[fin], fp64(model, x)[fin]) < TOL_BF16


@pytest.mark.gpu
def test_gpu_permuted_24_gemv_is_one_kernel():
    """A 2:4 weight with its columns scrambled, M = 1: the gemv template gathers x (X_INDEX); the
    bias in its store."""
    from test_gpu_compile import TOL_BF16, _sources, compile_and_code, fp64, kernel_defs, rel_err

    torch.manual_seed(0)
    model = _gpu(nn.Sequential(nn.Linear(1024, 2048)))
    sparse_inductor.prune(model, "2:4", permute=True)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton"})
    assert decisions[0].reason.startswith("2:4 after column permutation"), decisions[0].line()
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    defs = kernel_defs(code)
    assert len(defs) == 1 and defs[0].startswith("triton_tem_"), defs
    assert len(_sources(code, "X_INDEX, True")) == 1


@pytest.mark.gpu
def test_gpu_graph_shuffles_leave_one_kernel():
    """The shuffles around the layer (dense: two gather kernels beside the matmul) are folded: one
    template kernel, which gathers x, maps its output columns and applies bias and ReLU."""
    from test_gpu_compile import TOL_BF16, _sources, compile_and_code, fp64, kernel_defs, rel_err

    model = _gpu(seeded(GpuShuffled))
    x = torch.randn(4, 16, 256, device="cuda", dtype=torch.bfloat16)
    _, dense_code, _ = compile_and_code(model, x, {"patterns": ()})  # (every layer dense)
    assert kernel_defs(dense_code)  # (the gathers: kernels of their own)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton", "nonfinite": "fast",
                                                       "permute_apply": "kernel"})
    assert "index of its input folded; gather of its output folded" in decisions[0].permutation
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    defs = kernel_defs(code)
    assert len(defs) == 1 and defs[0].startswith("triton_tem_fused_"), defs
    assert len(_sources(code, "X_INDEX, True", "out_columns(OUT_INDEX", "maximum")) == 1


@pytest.mark.gpu
def test_gpu_hidden_order_shared_keeps_the_plain_kernels():
    """fc1's rows and fc2's columns reordered alike: the two layers agree on one hidden order, so
    both templates are the plain ones (no X_INDEX, no OUT_INDEX) and the GELU stays in fc1's."""
    from test_gpu_compile import TOL_BF16, _sources, compile_and_code, fp64, kernel_defs, rel_err

    model = _gpu(Mlp(d=256, h=512, b=64, hidden=True))
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    out, code, decisions = compile_and_code(model, x, {"force": True, "kernel": "triton", "nonfinite": "fast"})
    assert [d.kernel for d in decisions] == ["triton", "triton"], [d.line() for d in decisions]
    assert decisions[0].permutation == "outputs in fc2's input order (no output map)", decisions[0].permutation
    assert decisions[1].permutation == "weight's columns permuted to read fc1's output order", decisions[1].permutation
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    tem = [d for d in kernel_defs(code) if d.startswith("triton_tem_fused_")]
    assert len(tem) == 2, kernel_defs(code)
    assert not _sources(code, "X_INDEX") and not _sources(code, "OUT_INDEX")
    assert len(_sources(code, "erf")) == 1
