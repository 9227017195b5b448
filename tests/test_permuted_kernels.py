"""The block-sparse and 2:4 Triton kernels on a permuted weight (formats/permute.py): x gathered
at x_index, the block kernel's output written at out_index, against an fp64 reference of the
weight as the model holds it (scrambled), NaN/Inf inputs included.

CPU: the Triton interpreter (tiny shapes; fp16/fp32 where tl.dot runs, bf16 in the gemv, which has
no dot). sm_90a compile checks as tests/sm90.py does. GPU tests (marked gpu) at realistic sizes.
"""
from __future__ import annotations

import math

import pytest
import torch

from sparse_inductor.formats import compress_24, to_gemv_layout
from sparse_inductor.formats import permute as pm
from sparse_inductor.formats.block import compress_block
from sparse_inductor.lowering import triton_24 as t24
from sparse_inductor.lowering import triton_block as tb
from sparse_inductor.lowering.triton_24 import sp24_linear
from sparse_inductor.lowering.triton_block import BlockLinearConfig, block_linear
from sm90 import compile_rows
from test_triton_24 import GEMV_WIDE, GEMV_WORDS, SMALL, TOL as TOL_24, make as make_24, rel_err
from test_triton_block import (DEV, MIXED, _template_kernel, assert_matches, make_bias, make_weight, make_x,
                               random_block_map, reference)

pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # numpy, interpreter
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


def scramble(w, rows=True, seed=7):
    """(W as the model holds it, rows, cols): W = Wp[inverse], so Wp = W[rows][:, cols] is the
    block-sparse one the kernel gets, with x_index = cols and out_index = rows."""
    g = torch.Generator().manual_seed(seed)
    n, k = w.shape
    r = torch.randperm(n, generator=g) if rows else torch.arange(n)
    c = torch.randperm(k, generator=g)
    ws = torch.empty_like(w)
    ws[r.to(w.device)] = w  # row r[i] of ws is row i of w
    ws = ws.clone()
    ws[:, c.to(w.device)] = ws.clone()
    return ws, r.to(w.device), c.to(w.device)


def idx(t):
    return None if t is None else t.to(device=DEV, dtype=torch.int32).contiguous()


# ---------------------------------------------------------------------------------------------
# block: eager kernel
# ---------------------------------------------------------------------------------------------

_BLOCK_CASES = [pytest.param(16, torch.float16, perm, config, id=f"b16-fp16-{perm}-{cid}")
                for perm, config, cid in (("k", None, "tiles"), ("n", None, "tiles"), ("both", None, "tiles"),
                                          ("both", BlockLinearConfig(16, 2, 2, 16), "bn16"))]
_BLOCK_CASES.append(pytest.param(32, torch.float32, "both", None, id="b32-fp32-both-tiles"))


@pytest.mark.parametrize("b,dtype,perm,config", _BLOCK_CASES)
def test_block_permuted_matches_fp64(b, dtype, perm, config):
    """Ragged N and K, mixed block rows; NaN in a column whose block column row 0 alone keeps, Inf
    in the ragged last one: dense's NaN/Inf pattern (the row check reads x gathered too)."""
    m = 33
    n, k = 4 * b - 5, 4 * b - 3
    wp = make_weight(n, k, b, MIXED, dtype)  # block-sparse as the kernel holds it
    ws, rows, cols = scramble(wp, rows=perm != "k")
    if perm == "n":  # columns in place
        ws, cols = pm.permute(ws, None, cols), None
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    assert torch.equal(pm.permute(ws, rows if perm != "k" else None, cols), wp)
    x[0, 5] = math.nan
    x[2, k - 1] = math.inf
    x[3, 2 * b + 1] = -math.inf
    y = block_linear(x, *compress_block(wp, b), bias, n, k, x_index=idx(cols),
                     out_index=idx(rows) if perm != "k" else None, config=config, allow_tf32=False)
    assert_matches(y, reference(x, ws, bias, elementwise=True), dtype)


def test_block_found_by_the_search():
    """End to end: the model's scrambled weight, the search's order, the kernel."""
    b, dtype, m = 16, torch.float32, 20
    w = make_weight(96, 80, b, random_block_map(6, 5, 0.3, seed=5), dtype)
    ws, _, _ = scramble(w)
    res = pm.find_permutation(ws, patterns=("block",), block_sizes=(b,), max_block_density=1.0)
    assert res.pattern == "block"
    x_index, out_index = pm.kernel_indices(res)
    x, bias = make_x(m, 80, dtype), make_bias(96, dtype)
    y = block_linear(x, *compress_block(res.apply(ws), b), bias, 96, 80, x_index=x_index, out_index=out_index,
                     allow_tf32=False)
    assert_matches(y, reference(x, ws, bias), dtype)


def test_block_permuted_skipped_rows():
    """live / skip_check on a permuted weight: the skipped block rows' outputs (at their permuted
    columns) stay unwritten, everything written is y."""
    b, m, dtype = 16, 70, torch.float16
    n, k = 4 * b - 5, 4 * b - 3
    wp = make_weight(n, k, b, MIXED, dtype)
    ws, rows, cols = scramble(wp)
    fmt = compress_block(wp, b)
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    out = torch.full((m, n), math.nan, dtype=dtype, device=DEV)
    block_linear(x, *fmt, bias, n, k, live=2, out=out, x_index=idx(cols), out_index=idx(rows), allow_tf32=False)
    ref = reference(x, ws, bias)
    dead = [c for r in fmt.row_order[2:].tolist() for c in range(r * b, min(n, (r + 1) * b))]
    dead_y = rows[dead]  # the columns of y those weight rows write
    live_y = torch.tensor([c for c in range(n) if c not in set(dead_y.tolist())])
    assert out[:, dead_y].isnan().all()
    assert_matches(out[:, live_y], ref[:, live_y], dtype)


def test_block_runner_variants_match_fp64():
    """The dispatcher's runner for each place the orders are applied (tb._variants: in the
    kernel's loads / store, or gathered in the graph before / after the call): the same y (finite
    x: the runner times the kernel without its row check, guard=False)."""
    from sparse_inductor.registry import Layer

    b, m, dtype = 16, 21, torch.float16
    n, k = 4 * b - 5, 4 * b - 3
    wp = make_weight(n, k, b, MIXED, dtype)
    ws, rows, cols = scramble(wp)
    fmt = compress_block(wp, b)
    t = {"blocks": fmt.blocks, "row_ptr": fmt.row_ptr, "col_idx": fmt.col_idx, "row_order": fmt.row_order,
         "x_index": idx(cols), "out_index": idx(rows)}
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    layer = Layer("block", m, n, k, dtype, DEV, b, 0.5, x_index=True, out_index=True, row_check="none")
    variants = tb._variants(layer, t)
    assert variants == [{"x": "loads", "y": "store"}, {"x": "loads", "y": "graph"},
                        {"x": "graph", "y": "store"}, {"x": "graph", "y": "graph"}]
    ref = reference(x, ws, bias, elementwise=True)
    for params in variants:
        assert_matches(tb._runner(t, bias, layer, params)(x), ref, dtype)
    plain = Layer("block", m, n, k, dtype, DEV, b, 0.5)
    assert tb._variants(plain, t) == [{}]


def test_block_index_errors():
    b, n, k, dtype = 16, 20, 40, torch.float32
    w = make_weight(n, k, b, [[1, 0, 1], [0, 1, 1]], dtype)
    fmt = compress_block(w, b)
    x = make_x(3, k, dtype)
    with pytest.raises(ValueError, match="x_index must be"):
        block_linear(x, *fmt, None, n, k, x_index=torch.arange(k, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="out_index must be"):
        block_linear(x, *fmt, None, n, k, out_index=torch.arange(n - 1, dtype=torch.int32, device=DEV))


# ---------------------------------------------------------------------------------------------
# block: the Inductor template's body
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("perm_k,perm_n", [(True, True), (True, False), (False, True)], ids=["both", "k", "n"])
def test_block_template_body_permuted(tmp_path, perm_k, perm_n):
    """The template's body with X_INDEX / OUT_INDEX under the interpreter (its store is at the
    permuted columns idx_n, as Inductor's store_output with its epilogue would be): what the eager
    launcher writes, bit for bit, with a NaN and an Inf in x."""
    b, m, dtype = 16, 70, torch.float16
    n, k = 4 * b - 5, 4 * b - 3
    wp = make_weight(n, k, b, MIXED, dtype)
    _, rows, cols = scramble(wp)
    xi, oi = idx(cols) if perm_k else None, idx(rows) if perm_n else None
    x = make_x(m, k, dtype)
    x[3, 5], x[50, k - 1] = math.nan, math.inf
    fmt = compress_block(wp, b)
    cfg = BlockLinearConfig(16, 4, 2)
    want = block_linear(x, *fmt, None, n, k, config=cfg, x_index=xi, out_index=oi)
    got = torch.full((m, n), math.nan, dtype=dtype, device=DEV)
    kernel = _template_kernel(tmp_path, True, "", perm_k, perm_n)
    grid = (fmt.row_order.numel(), math.ceil(m / cfg.block_m))
    dummy = fmt.row_ptr
    kernel[grid](x, fmt.blocks, fmt.row_ptr, fmt.col_idx, fmt.row_order, tb.nonfinite_rows(x), dummy,
                 xi if perm_k else dummy, oi if perm_n else dummy, got, m, n, k, x.stride(0), x.stride(1),
                 BLOCK_M=cfg.block_m, B=b, BN=b, LIVE=fmt.row_order.numel(), ALLOW_TF32=False,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_block_template_sources():
    """The permuted bodies take their index inputs and pass them on; the plain body is unchanged
    by them (no out_columns call, no index input)."""
    plain = tb._template_body(True, "")
    assert "X_INDEX" not in plain and "OUT_INDEX" not in plain and "out_columns" not in plain
    body = tb._template_body(True, "checked", True, True)
    assert '"X_INDEX", "OUT_INDEX")}}' in body
    assert body.count("X_INDEX, True") == 2  # the reduction and the non-finite fixup
    assert "out_columns(OUT_INDEX" in body
    assert tb.out_columns in tb.DEVICE_FUNCTIONS


# ---------------------------------------------------------------------------------------------
# 2:4
# ---------------------------------------------------------------------------------------------

def scrambled_24(n, k, m, dtype, seed=0):
    """(x, W as the model holds it, bias, values, meta, x_index) for a 2:4 weight whose columns
    the model holds scrambled."""
    wp, x, bias = make_24(n, k, m, dtype, seed)
    ws, _, cols = scramble(wp, rows=False, seed=seed + 3)
    assert torch.equal(pm.permute(ws, None, cols), wp)
    values, meta = compress_24(wp)
    return x, ws, bias, values, meta, idx(cols)


@pytest.mark.parametrize("cfg", sorted(SMALL))
@pytest.mark.parametrize("dtype,m,n,k", [(torch.float16, 3, 33, 64), (torch.float32, 5, 7, 4 * 37)], ids=["fp16", "fp32"])
def test_24_permuted_matches_fp64(cfg, dtype, m, n, k):
    x, ws, bias, values, meta, x_index = scrambled_24(n, k, m, dtype)
    ref = x.double() @ ws.double().T + bias.double()
    y = sp24_linear(x, values, meta, bias, config=dict(SMALL[cfg]), x_index=x_index)
    assert rel_err(y, ref) < TOL_24[dtype]


@pytest.mark.parametrize("cfg", sorted(SMALL))
def test_24_permuted_nonfinite_like_dense(cfg):
    """A NaN and an Inf in x (the gemv's fixup reads x gathered): dense's NaN / Inf pattern."""
    x, ws, bias, values, meta, x_index = scrambled_24(33, 64, 3, torch.float32)
    x[0, 5], x[2, 63] = math.nan, -math.inf
    ref = torch.nn.functional.linear(x.double(), ws.double(), bias.double())
    y = sp24_linear(x, values, meta, bias, config=dict(SMALL[cfg]), x_index=x_index)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    fin = ref.isfinite()
    assert fin.any() and rel_err(y[fin], ref[fin]) < TOL_24[torch.float32]


@pytest.mark.parametrize("cfg,n,k", [(dict(GEMV_WORDS), 9, 528), (dict(GEMV_WORDS, BLOCK_N=4, num_warps=2, KSPLIT=2), 16, 512)],
                         ids=["words", "ksplit"])
def test_24_gemv_layout_permuted(cfg, n, k):
    """The gemv layout (x as 32-bit words, each built from two gathered bf16 halves): the same
    outputs as the byte layout's permuted gemv, within bf16 of fp64; NaN and Inf like dense."""
    wp, x, bias = make_24(n, k, 1, torch.float32)
    wp, x, bias = wp.bfloat16(), x.bfloat16(), bias.bfloat16()
    ws, _, cols = scramble(wp, rows=False)
    values, meta = compress_24(wp)
    vw, mw = to_gemv_layout(values, meta)
    y = sp24_linear(x, vw, mw, bias, config=dict(cfg), x_index=idx(cols))
    y_bytes = sp24_linear(x, values, meta, bias, config=dict(GEMV_WIDE), x_index=idx(cols))
    assert torch.equal(y, y_bytes)
    assert rel_err(y, x.double() @ ws.double().T + bias.double()) < TOL_24[torch.bfloat16]
    x[0, 37], x[0, k - 2] = math.inf, math.nan
    ref = torch.nn.functional.linear(x.double(), ws.double())
    y = sp24_linear(x, vw, mw, config=dict(cfg), x_index=idx(cols))
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())


def test_24_template_source_permuted():
    body = t24._template_body(True)
    assert 'def_kernel("X", "V", "META", "X_INDEX")' in body
    assert body.count("X_INDEX, True)") == 2  # the gemv and the dot
    assert t24._template_body(False) == t24._TEMPLATE_BODY


def test_24_runner_variants_match_fp64():
    """The dispatcher's runner with x gathered in the kernel's loads or before the call (t24._variants)."""
    from sparse_inductor.registry import Layer

    m, n, k = 3, 33, 64
    x, ws, bias, values, meta, x_index = scrambled_24(n, k, m, torch.float32)
    layer = Layer("2:4", m, n, k, torch.float32, DEV, m_static=False, x_index=True)
    assert t24._variants(layer, {}) == [{"x": "loads"}, {"x": "graph"}]
    assert t24._variants(Layer("2:4", m, n, k, torch.float32, DEV), {}) == [{}]
    ref = x.double() @ ws.double().T + bias.double()
    t = {"values": values, "meta": meta, "x_index": x_index}
    for params in t24._variants(layer, t):
        assert rel_err(t24._runner(t, bias, layer, params)(x), ref) < TOL_24[torch.float32]


def test_24_index_errors():
    x, ws, bias, values, meta, x_index = scrambled_24(16, 64, 2, torch.float32)
    with pytest.raises(ValueError, match="x_index must be"):
        sp24_linear(x, values, meta, x_index=x_index.long())


# ---------------------------------------------------------------------------------------------
# sm_90a compile checks (tests/sm90.py)
# ---------------------------------------------------------------------------------------------

_SM90_PERMUTED = r"""
from sparse_inductor.lowering import triton_block as tb, triton_24 as t24
k = tb._block_linear_kernel
names = k.arg_names
for (b, bucket) in [(64, 16), (64, 256), (128, 256)]:
    cfg = tb._fit_stages(tb.CONFIGS[(b, bucket)], b, 2)
    sig = {n: "constexpr" for n in names}
    sig.update({n: "*bf16" for n in ("x_ptr", "blocks_ptr", "bias_ptr", "y_ptr")})
    sig.update({n: "*i32" for n in ("row_ptr_ptr", "col_idx_ptr", "row_order_ptr", "xidx_ptr", "oidx_ptr")})
    sig.update({"g_ptr": "*fp32"}, **{n: "i32" for n in ("M", "N", "K", "stride_xm", "stride_ym")})
    consts = dict(stride_xk=1, stride_yn=1, BLOCK_M=cfg.block_m, B=b, BN=cfg.block_n or b, HAS_BIAS=True,
                  HAS_GUARD=True, ALLOW_TF32=False, DOT_FP32=False, PERM_K=True, PERM_N=True)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t != "constexpr" and n != "M"}
    c = triton.compile(ASTSource(k, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    bufs = [int(n) for n in re.findall(r"memdesc<(\d+)x\d+x\d+xbf16", c.asm["ttgir"])]
    print(json.dumps(dict(kernel="block", cfg=[b, bucket], shared=c.metadata.shared, buffers=min(bufs, default=0))))
k = t24._sp24_linear_kernel
names = k.arg_names
for key in ("m16", "m128", "gemv_words"):
    cfg = dict(t24.CONFIGS[key])
    words = key.startswith("gemv_words")
    sig = {n: "constexpr" for n in names}
    sig.update(X="*bf16", V="*u8" if key.endswith("int8") else "*bf16", META="*i32" if words else "*u8", B="*bf16",
               Y="*bf16", XIDX="*i32", N="i32", K="i32", stride_xm="i32", stride_ym="i32")
    consts = dict(stride_xk=1, stride_yn=1, HAS_BIAS=False, ACT="none", GEMV=cfg["GEMV"], BLOCK_M=cfg["BLOCK_M"],
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"], EVEN_G=True, ALLOW_TF32=False, UPCAST=False,
                  NUM_WARPS=cfg["num_warps"], PTX=True, KSPLIT=cfg.get("KSPLIT", 1), PERM_K=True)
    if cfg["GEMV"]:
        consts["M"] = 1
    else:
        sig["M"] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("X", "V", "META", "B", "Y", "XIDX", "N", "K",
                                                                    "stride_xm", "stride_ym")}
    c = triton.compile(ASTSource(k, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    print(json.dumps(dict(kernel="2:4", cfg=key, shared=c.metadata.shared)))
"""


def test_permuted_kernels_compile_for_sm90(tmp_path):
    """The permuted variants (x gathered, the block kernel's output columns mapped) of table
    configs compile for sm_90a within a Hopper block's shared memory, the block kernel's weight
    loads still multi-buffered. (The gathered x tile is loaded to registers, not through shared
    memory: per-element 2-byte gathers are below cp.async's 4 bytes; its speed is the bench's.)"""
    rows = compile_rows(_SM90_PERMUTED, tmp_path)
    assert len(rows) == 3 + 3
    for r in rows:
        assert r["shared"] <= 227 * 1024, r
        if r["kernel"] == "block":
            assert r["buffers"] >= 2, r


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 8192])
def test_gpu_block_permuted_llama_shape(m):
    """14336x4096, 90% of the 64x64 blocks zero, rows and columns scrambled: the search recovers
    it and the permuted kernel matches fp64, NaN/Inf included."""
    b, n, k, dtype = 64, 14336, 4096, torch.bfloat16
    wp = make_weight(n, k, b, random_block_map(n // b, k // b, 0.1), dtype)
    ws, _, _ = scramble(wp)
    res = pm.find_permutation(ws, patterns=("block",))
    assert res.pattern == "block" and res.block == b, res.reason
    x_index, out_index = pm.kernel_indices(res)
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    x[0, 17] = math.nan
    fmt = compress_block(res.apply(ws), b)
    y = block_linear(x, *fmt, bias, n, k, x_index=x_index, out_index=out_index)
    # the elementwise fp64 reference holds M x N x K products: 16 rows of it (the NaN row among them)
    rows = torch.arange(min(m, 16), device=x.device)
    assert_matches(y[rows], reference(x[rows], ws, bias, elementwise=True), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("words", [False, True])
def test_gpu_24_permuted_gemv(words):
    n, k = 14336, 4096
    wp, x, _ = make_24(n, k, 1, torch.float32)
    wp, x = wp.cuda().bfloat16(), x.cuda().bfloat16()
    ws, _, cols = scramble(wp, rows=False)
    values, meta = compress_24(wp)
    if words:
        values, meta = to_gemv_layout(values, meta)
    y = sp24_linear(x, values, meta, x_index=cols.to(torch.int32).contiguous())
    assert rel_err(y, x.double() @ ws.double().T) < TOL_24[torch.bfloat16]
