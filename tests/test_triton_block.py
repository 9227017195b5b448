"""The block-sparse Triton kernel (lowering/triton_block.py) against an fp64 reference.

On CPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so the CPU
shapes stay tiny; the `gpu` tests check realistic sizes and every table config on a GPU.
"""
import importlib.util
import inspect
import math

import pytest
import torch

from sparse_inductor.formats.block import compress_block
from sparse_inductor.lowering import triton_block as tb
from sparse_inductor.lowering.triton_block import BlockLinearConfig, block_linear
from sm90 import compile_rows

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# triton 3.6's interpreter turns 1-element arrays into loop bounds with int(), which numpy 2.x
# deprecates (and numpy >= 2.4 rejects: use numpy < 2.4 with triton 3.6; triton 3.7 is fine).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# Tolerances against the fp64 reference, which uses the same (already rounded) inputs, so only
# the kernel's own rounding counts: fp32 accumulation and the final cast to the output dtype.
TOL = {
    # fp32 in, fp32 out, tf32 off: fp32 accumulation in another order than fp64 over <= a few
    # hundred unit-scale products (observed <= 2e-6 on the CPU shapes).
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    # fp16 out: rounding to fp16 is <= 2^-11 relative; rtol allows two half-ulps, atol covers the
    # fp32 accumulation error of outputs near 0.
    torch.float16: dict(atol=1e-4, rtol=2e-3),
    # bf16 out: one bf16 ulp is 2^-7 relative. The GPU rounds to nearest (<= half an ulp), but the
    # interpreter's fp32 -> bf16 cast truncates (<= 1 ulp, observed 0.77%): rtol allows two ulps.
    torch.bfloat16: dict(atol=1e-3, rtol=1.6e-2),
    # fp32 in with tf32 tensor cores (GPU only): inputs rounded to 10 mantissa bits, ~2^-11 each,
    # summed over K/10 unit-scale products of unit-scale outputs.
    "tf32": dict(atol=5e-3, rtol=5e-3),
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def make_weight(n, k, b, block_map, dtype, device=DEV, seed=0):
    """A dense W [n, k] whose b x b blocks are nonzero exactly where block_map [ceil(n/b), ceil(k/b)] is.

    Values ~ N(0, 1/fan) with fan the nonzero count of the widest row, so outputs are O(1).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    block_map = torch.as_tensor(block_map, dtype=torch.bool)
    assert block_map.shape == (math.ceil(n / b), math.ceil(k / b))
    mask = block_map.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
    fan = max(1, int(mask.sum(1).max()))
    w = torch.randn(n, k, generator=g) / math.sqrt(fan)
    w = torch.where(mask & (w == 0), 1.0, w)  # a masked-in block never turns all-zero by chance
    return (w * mask).to(device=device, dtype=dtype)


def make_x(m, k, dtype, device=DEV, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(m, k, generator=g).to(device=device, dtype=dtype)


def make_bias(n, dtype, device=DEV, seed=2):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, generator=g).to(device=device, dtype=dtype)


def reference(x, w, bias, elementwise=False):
    """fp64 y = x @ w^T + bias. elementwise=True multiplies every pair explicitly (IEEE 0*Inf = NaN
    everywhere, independent of how a BLAS treats zeros), for the non-finite tests."""
    xd, wd = x.double(), w.double()
    y = (xd[:, None, :] * wd[None, :, :]).sum(-1) if elementwise else xd @ wd.T
    return y if bias is None else y + bias.double()


def run(x, w, bias, b, **kw):
    n, k = w.shape
    return block_linear(x, *compress_block(w, b), bias, n, k, **kw)


def assert_matches(y, ref, tol_key):
    assert y.shape == ref.shape
    fin_y, fin_ref = torch.isfinite(y), torch.isfinite(ref)
    assert torch.equal(fin_y, fin_ref), (
        f"non-finite positions differ: kernel {(~fin_y).nonzero().tolist()[:8]} "
        f"vs dense {(~fin_ref).nonzero().tolist()[:8]}")
    # exactly dense's pattern: NaN where dense has NaN, the same signed Inf where dense has Inf
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.double()[ref.isinf()], ref[ref.isinf()])
    torch.testing.assert_close(y.double()[fin_ref], ref[fin_ref], **TOL[tol_key])


# A mixed block map, rows: full, empty, two blocks (including the ragged last column), one block.
# Block row nonzero counts 4, 0, 2, 1 -> row_order 0, 2, 3, 1 (a real permutation).
MIXED = [[1, 1, 1, 1],
         [0, 0, 0, 0],
         [0, 1, 0, 1],
         [0, 0, 1, 0]]


# ---------------------------------------------------------------------------------------------
# interpreter (CPU) tests; they run on a GPU too
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_mixed_rows_ragged(b, dtype, m, has_bias):
    n, k = 4 * b - 5, 4 * b - 3  # ragged N and K: the last block row and column are padded
    w = make_weight(n, k, b, MIXED, dtype)
    x = make_x(m, k, dtype)
    bias = make_bias(n, dtype) if has_bias else None
    y = run(x, w, bias, b, allow_tf32=False)
    assert y.dtype == dtype and y.is_contiguous()
    assert_matches(y, reference(x, w, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_block_128(dtype):
    b, n, k, m = 128, 200, 130, 3
    w = make_weight(n, k, b, [[1, 0], [1, 1]], dtype)
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    assert_matches(run(x, w, bias, b, allow_tf32=False), reference(x, w, bias), dtype)


@pytest.mark.parametrize("b", [16, 64])
@pytest.mark.parametrize("kind", ["single", "dense"])
def test_single_and_dense(b, kind):
    dtype, m = torch.float16, 5
    n, k = 3 * b, 3 * b
    block_map = torch.ones(3, 3) if kind == "dense" else torch.zeros(3, 3)
    block_map[1, 2] = 1
    w = make_weight(n, k, b, block_map, dtype)
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    assert_matches(run(x, w, bias, b), reference(x, w, bias), dtype)


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_all_zero_weight(has_bias):
    dtype, b, n, k, m = torch.float16, 32, 40, 50, 3
    w = torch.zeros(n, k, dtype=dtype, device=DEV)
    blocks = compress_block(w, b)
    assert blocks.blocks.shape[0] == 0
    x = make_x(m, k, dtype)
    bias = make_bias(n, dtype) if has_bias else None
    y = block_linear(x, *blocks, bias, n, k)
    expect = bias.expand(m, n) if has_bias else torch.zeros(m, n, dtype=dtype, device=DEV)
    assert torch.equal(y, expect)  # 0 + bias in fp32, cast back: exact


def test_degenerate_sizes():
    dtype, b = torch.float32, 16
    w = make_weight(20, 40, b, [[1, 0, 1], [0, 1, 1]], dtype)
    blocks = compress_block(w, b)
    assert block_linear(make_x(0, 40, dtype), *blocks, None, 20, 40).shape == (0, 20)
    # K = 0: no blocks at all; F.linear gives the bias
    w0 = torch.zeros(20, 0, dtype=dtype, device=DEV)
    bias = make_bias(20, dtype)
    y = block_linear(make_x(3, 0, dtype), *compress_block(w0, b), bias, 20, 0)
    assert torch.equal(y, bias.expand(3, 20))


def test_bf16_upcast_under_interpreter():
    # bf16 goes through DOT_FP32 in the interpreter (bf16 tl.dot there is garbage), tl.dot on a GPU
    b, dtype, m = 32, torch.bfloat16, 17
    n, k = 4 * b - 5, 4 * b - 3
    w = make_weight(n, k, b, MIXED, dtype)
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    assert_matches(run(x, w, bias, b), reference(x, w, bias), dtype)


def test_strided_x():
    b, dtype, m = 16, torch.float32, 17
    n, k = 4 * b - 5, 4 * b - 3
    w = make_weight(n, k, b, MIXED, dtype)
    bias = make_bias(n, dtype)
    x_t = make_x(k, m, dtype).t()  # stride (1, m)
    x_s = make_x(m, 2 * k, dtype)[:, ::2]  # stride (2k, 2)
    # columns K.. of the last block column must be masked, not read: NaN there would leak in
    buf = torch.full((m, k + b), math.nan, dtype=dtype, device=DEV)
    buf[:, :k] = make_x(m, k, dtype)
    x_p = buf[:, :k]
    for x in (x_t, x_s, x_p):
        assert not x.is_contiguous()
        assert_matches(run(x, w, bias, b, allow_tf32=False), reference(x, w, bias), dtype)


def _config_id(c):
    return f"bm{c.block_m}" + (f"bn{c.block_n}" if c.block_n else "")


@pytest.mark.parametrize("config", [BlockLinearConfig(16, 4, 2), BlockLinearConfig(32, 4, 3),
                                    BlockLinearConfig(64, 4, 3), BlockLinearConfig(16, 2, 2, 16),
                                    BlockLinearConfig(32, 4, 3, 16)], ids=_config_id)
@pytest.mark.parametrize("m", [3, 33, 70])
def test_explicit_configs(config, m):
    b, dtype = 32, torch.float16
    n, k = 4 * b - 5, 4 * b - 3
    w = make_weight(n, k, b, MIXED, dtype)
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    assert_matches(run(x, w, bias, b, config=config), reference(x, w, bias), dtype)


def test_config_table():
    for b in (16, 32, 64, 128):
        for bucket in tb.M_BUCKETS:
            cfg = tb.CONFIGS[(b, bucket)]
            assert cfg.block_m >= 16 and cfg.block_m & (cfg.block_m - 1) == 0
        for m in (1, 16):
            assert tb.pick_config(b, m, torch.bfloat16).block_m == 16
        assert tb.pick_config(b, 17, torch.bfloat16) == tb.CONFIGS[(b, 32)]
        assert tb.pick_config(b, 8192, torch.bfloat16) == tb.CONFIGS[(b, 256)]
    assert len(tb.CONFIGS) == 4 * len(tb.M_BUCKETS)
    # fp32 tiles are twice the bytes: stages trimmed to the shared-memory budget
    assert tb.pick_config(128, 8192, torch.float32).num_stages < tb.CONFIGS[(128, 256)].num_stages
    # layers with short block rows (few blocks a row) take CONFIGS_SHORT_ROWS' entry where it has one
    for (b, bucket), cfg in tb.CONFIGS_SHORT_ROWS.items():
        assert cfg.block_m >= 16 and cfg.block_m & (cfg.block_m - 1) == 0
        assert tb.pick_config(b, bucket, torch.bfloat16, blocks_per_row=1.2) == cfg
        assert tb.pick_config(b, bucket, torch.bfloat16, blocks_per_row=tb.SHORT_ROWS) == tb.CONFIGS[(b, bucket)]
    assert tb.pick_config(16, 8192, torch.bfloat16, blocks_per_row=1.0) == tb.CONFIGS[(16, 256)]  # no entry


def test_short_rows_config_runs():
    """The launcher picks the short-rows config by the weight's blocks a row, and computes right
    with it (one block row in four holds one block: 0.25 blocks a row)."""
    b, n, k, m = 64, 4 * 64, 2 * 64, 130
    block_map = [[1, 0], [0, 0], [0, 0], [0, 0]]
    w = make_weight(n, k, b, block_map, torch.float16)
    x, bias = make_x(m, k, torch.float16), make_bias(n, torch.float16)
    assert tb.pick_config(b, m, torch.float16, 0.25) == tb.CONFIGS_SHORT_ROWS[(b, 256)]
    assert_matches(run(x, w, bias, b), reference(x, w, bias), torch.float16)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("b", [16, 32])  # 32: nan_where_skipped reads a skipped block 16 columns a step
def test_nonfinite_x(dtype, b):
    m = 5
    n, k = 4 * b - 5, 4 * b - 3
    w = make_weight(n, k, b, MIXED, dtype)
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    x[0, 5] = math.nan  # block column 0: only block row 0 has a block there
    x[2, 2 * b + 1] = math.inf  # block column 2: rows 0 and 3
    x[3, k - 1] = -math.inf  # ragged last block column: rows 0 and 2
    ref = reference(x, w, bias, elementwise=True)
    assert (~torch.isfinite(ref[[0, 2, 3]])).all() and torch.isfinite(ref[[1, 4]]).all()
    assert_matches(run(x, w, bias, b, allow_tf32=False), ref, dtype)
    # without the guard, rows 0, 2, 3 stay finite in the block rows that skip those columns
    y = run(x, w, bias, b, guard=False, allow_tf32=False)
    assert torch.isfinite(y[0, b:]).all() and torch.isfinite(y[2, b:2 * b]).all()
    assert not torch.isfinite(y[0, :b]).any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_nonfinite_w(dtype):
    b, m = 16, 5
    n, k = 4 * b - 5, 4 * b - 3
    w = make_weight(n, k, b, MIXED, dtype)
    w[b + 3, 7] = math.nan  # inside the empty block row: makes that block nonzero
    w[3 * b + 1, 2 * b + 4] = math.inf
    w[2 * b, k - 2] = -math.inf  # in the ragged last block column
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    x[1, 2 * b + 4] = 0.0  # Inf * 0 = NaN in dense; still non-finite here
    ref = reference(x, w, bias, elementwise=True)
    assert (~torch.isfinite(ref[:, [b + 3, 3 * b + 1, 2 * b]])).all()
    assert_matches(run(x, w, bias, b, allow_tf32=False), ref, dtype)


def test_skipped_rows():
    """live / skip_check: the tiles of block rows row_order[live:] stay unwritten, except where
    skip_check flags a row: the program computes that tile. Everything written is y."""
    b, m, dtype = 16, 70, torch.float16
    n, k = 4 * b - 5, 4 * b - 3
    w = make_weight(n, k, b, MIXED, dtype)
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    fmt = compress_block(w, b)
    dead = fmt.row_order[2:].tolist()  # block rows 3 and 1 (one block, none)
    ref = reference(x, w, bias)
    bm = tb.pick_config(b, m, dtype).block_m
    live_cols = [c for c in range(n) if c // b not in dead]
    for flagged in (None, 40):
        check = torch.zeros(m, dtype=torch.float32, device=DEV)
        if flagged is not None:
            check[flagged] = math.nan
        out = torch.full((m, n), math.nan, dtype=dtype, device=DEV)
        block_linear(x, *fmt, bias, n, k, live=2, skip_check=check, out=out, allow_tf32=False)
        assert_matches(out[:, live_cols], ref[:, live_cols], dtype)
        for r in dead:
            cols = slice(r * b, min(n, (r + 1) * b))
            written = torch.zeros(m, dtype=torch.bool, device=DEV)
            if flagged is not None:
                tile = flagged // bm
                written[tile * bm:(tile + 1) * bm] = True
            assert out[~written, cols].isnan().all()
            if written.any():
                assert_matches(out[written, cols], ref[written, cols], dtype)


def _template_module(tmp_path, guard, skip, perm_k=False, perm_n=False):
    """The Inductor template's source (device functions and body) as a module with a plain
    @triton.jit kernel, template_kernel: Inductor's markup replaced by arguments and a tl.store of acc
    (no epilogue), so the interpreter runs the body Inductor would render. Returns its path.
    perm_k / perm_n: a permuted weight's body (inputs X_INDEX, OUT_INDEX; tests/test_permuted_kernels.py)."""
    import re

    from sparse_inductor.lowering.template import template_source

    body = tb._template_body(guard, skip, perm_k, perm_n)
    body = re.sub(r"\{\{def_kernel\(.*?\)\}\}",
                  "@triton.jit\ndef template_kernel(X, BLOCKS, ROW_PTR, COL_IDX, ROW_ORDER, G, S, X_INDEX, OUT_INDEX, Y, M_, N_, K_, "
                  "SXM, SXK, "
                  "BLOCK_M: tl.constexpr, B: tl.constexpr, BN: tl.constexpr, LIVE: tl.constexpr, "
                  "ALLOW_TF32: tl.constexpr):", body)
    for markup, arg in (('size("X", 0)', "M_"), ('size("X", 1)', "K_"), ("size(None, 1)", "N_"),
                        ('stride("X", 0)', "SXM"), ('stride("X", 1)', "SXK")):
        body = body.replace("{{" + markup + "}}", arg)
    body = re.sub(r"^( *)\{\{store_output\(.*\}\}$",
                  r"\1tl.store(Y + idx_m.to(tl.int64) * N + idx_n, acc.to(Y.dtype.element_ty), mask=mask)", body, flags=re.M)
    assert "{{" not in body
    path = tmp_path / f"tem_{int(guard)}_{skip or 'none'}_{int(perm_k)}{int(perm_n)}.py"
    path.write_text(template_source(tb.DEVICE_FUNCTIONS, body))
    return path


def _template_kernel(tmp_path, guard, skip, perm_k=False, perm_n=False):
    """_template_module's kernel, imported."""
    path = _template_module(tmp_path, guard, skip, perm_k, perm_n)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.template_kernel


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("skip", ["", "always", "checked"])
@pytest.mark.parametrize("guard", [True, False], ids=["guard", "noguard"])
def test_template_body_runs(tmp_path, guard, skip):
    """Each variant of the template's body (the Inductor markup replaced, see _template_kernel) under
    the interpreter writes what the eager launcher writes, bit for bit, with a NaN and an Inf in x
    and, with skip, block rows row_order[2:] skippable (the skip check flags row 40)."""
    b, m, dtype = 16, 70, torch.float16
    n, k = 4 * b - 5, 4 * b - 3
    w = make_weight(n, k, b, MIXED, dtype)
    x = make_x(m, k, dtype)
    x[3, 5], x[50, k - 1] = math.nan, math.inf
    fmt = compress_block(w, b)
    cfg = BlockLinearConfig(16, 4, 2)
    g = tb.nonfinite_rows(x)
    check = torch.zeros(m, dtype=torch.float32, device=DEV)
    check[40] = math.nan
    live = 2 if skip else None
    kw = dict(live=live, skip_check=check if skip == "checked" else None)
    want = torch.full((m, n), math.nan, dtype=dtype, device=DEV)
    block_linear(x, *fmt, None, n, k, guard=guard, config=cfg, out=want, **kw)
    got = torch.full((m, n), math.nan, dtype=dtype, device=DEV)
    kernel = _template_kernel(tmp_path, guard, skip)
    grid = (fmt.row_order.numel(), math.ceil(m / cfg.block_m))
    kernel[grid](x, fmt.blocks, fmt.row_ptr, fmt.col_idx, fmt.row_order, g, check, fmt.row_ptr, fmt.row_ptr, got, m, n, k,
                 x.stride(0), x.stride(1),
                 BLOCK_M=cfg.block_m, B=b, BN=b, LIVE=live or fmt.row_order.numel(), ALLOW_TF32=False,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])
    if guard and not skip:
        assert_matches(got, reference(x, w, None, elementwise=True), dtype)


@pytest.mark.parametrize("seed", range(12))
def test_random_block_maps(seed):
    # random shapes, densities and block sizes; M spans one to three tiles of the table's BLOCK_M
    g = torch.Generator().manual_seed(100 + seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    b = (16, 32, 64)[seed % 3]
    n, k, m = pick(1, 3 * b), pick(1, 3 * b), pick(1, 40)
    density = (0.0, 0.3, 0.7, 1.0)[seed % 4]
    block_map = torch.rand(math.ceil(n / b), math.ceil(k / b), generator=g) < density
    dtype = torch.float32
    w = make_weight(n, k, b, block_map, dtype, seed=seed)
    x, bias = make_x(m, k, dtype, seed=seed), make_bias(n, dtype, seed=seed)
    assert_matches(run(x, w, bias, b, allow_tf32=False), reference(x, w, bias), dtype)


def _bad_inputs():
    b, n, k, dtype = 16, 20, 40, torch.float32
    w = make_weight(n, k, b, [[1, 0, 1], [0, 1, 1]], dtype)
    blocks, row_ptr, col_idx, row_order = compress_block(w, b)
    x, bias = make_x(3, k, dtype), make_bias(n, dtype)
    ok = dict(x=x, blocks=blocks, row_ptr=row_ptr, col_idx=col_idx, row_order=row_order, bias=bias,
              n=n, k=k)
    return [
        (dict(ok, x=x[0]), "x must be 2-D"),
        (dict(ok, x=x.to(torch.float64)), "x dtype"),
        (dict(ok, blocks=blocks.half()), "blocks dtype"),
        (dict(ok, blocks=blocks[:, :, :8]), r"blocks must be \[nnzb, b, b\]"),
        (dict(ok, x=make_x(3, k + 1, dtype)), "x has K=41"),
        (dict(ok, row_ptr=row_ptr.long()), "row_ptr must be a contiguous 1-D int32"),
        (dict(ok, row_ptr=row_ptr[:-1]), "row_ptr must have 3 entries"),
        (dict(ok, row_order=row_order[:1]), "row_order must have 2 entries"),
        (dict(ok, col_idx=col_idx[:-1]), "col_idx must have 4 entries"),
        (dict(ok, bias=bias[:-1]), r"bias must be \[20\]"),
        (dict(ok, bias=bias.half()), "bias dtype"),
        (dict(ok, blocks=blocks.transpose(1, 2)), "blocks must be contiguous"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_input_errors(case):
    kwargs, msg = _bad_inputs()[case]
    with pytest.raises(ValueError, match=msg):
        block_linear(**kwargs)


def test_device_source_is_self_contained(tmp_path):
    """The device functions refer only to tl/triton, their arguments and the device functions
    before them, have no jinja markers, and work when pasted alone into a fresh module (as the
    Inductor template will do)."""
    for i, f in enumerate(tb.DEVICE_FUNCTIONS):
        earlier = {g.fn.__name__ for g in tb.DEVICE_FUNCTIONS[:i]}
        assert set(inspect.getclosurevars(f.fn).globals) <= {"tl", "triton"} | earlier
    src = tb.device_source()
    for marker in ("{{", "{%", "{#"):
        assert marker not in src
    kernel_src = '''
@triton.jit
def probe_kernel(x_ptr, blocks_ptr, row_ptr_ptr, col_idx_ptr, row_order_ptr, y_ptr, M, N, K,
                 stride_xm, stride_xk, BLOCK_M: tl.constexpr, B: tl.constexpr):
    rb = tl.load(row_order_ptr + tl.program_id(0))
    pid_m = tl.program_id(1)
    acc = block_sparse_acc(x_ptr, blocks_ptr, row_ptr_ptr, col_idx_ptr, rb, 0, pid_m, M, N, K,
                           stride_xm, stride_xk, BLOCK_M, B, B, False, False)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = rb * B + tl.arange(0, B)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
'''
    path = tmp_path / "probe_block_template.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n" + src + "\n\n" + kernel_src)
    spec = importlib.util.spec_from_file_location("probe_block_template", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    b, m, dtype = 16, 17, torch.float32
    n, k = 4 * b - 5, 4 * b - 3
    w = make_weight(n, k, b, MIXED, dtype)
    x = make_x(m, k, dtype)
    blocks, row_ptr, col_idx, row_order = compress_block(w, b)
    y = torch.empty(m, n, dtype=torch.float32, device=DEV)
    mod.probe_kernel[(row_ptr.numel() - 1, math.ceil(m / 16))](
        x, blocks, row_ptr, col_idx, row_order, y, m, n, k, x.stride(0), x.stride(1),
        BLOCK_M=16, B=b)
    assert_matches(y, reference(x, w, None), torch.float32)


# Every table config compiled for sm_90a (tests/sm90.py): also that the block loop keeps its
# software pipelining.
_SM90_COMPILE = r"""
from sparse_inductor.lowering import triton_block as tb
kernel = tb._block_linear_kernel
names = kernel.arg_names
for tname, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
  for table, configs in (("table", tb.CONFIGS), ("short", tb.CONFIGS_SHORT_ROWS)):
    for (b, bucket) in configs:
        cfg = tb._fit_stages(configs[(b, bucket)], b, dtype.itemsize)
        sig = {n: "constexpr" for n in names}
        sig.update({n: "*" + tname for n in ("x_ptr", "blocks_ptr", "bias_ptr", "y_ptr")})
        sig.update({n: "*i32" for n in ("row_ptr_ptr", "col_idx_ptr", "row_order_ptr")})
        sig.update({"g_ptr": "*fp32"}, **{n: "i32" for n in ("M", "N", "K", "stride_xm", "stride_ym")})
        consts = dict(stride_xk=1, stride_yn=1, BLOCK_M=cfg.block_m, B=b, BN=cfg.block_n or b, HAS_BIAS=True,
                      HAS_GUARD=True, ALLOW_TF32=tname == "fp32", DOT_FP32=False)
        aligned = [n for n, t in sig.items() if t != "constexpr" and n != "M"]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        c = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        bufs = [int(n) for n in re.findall(r"memdesc<(\d+)x\d+x\d+x" + tname, c.asm["ttgir"])]
        print(json.dumps(dict(dtype=tname, table=table, b=b, bucket=bucket, cfg=list(cfg), shared=c.metadata.shared,
                              buffers=min(bufs, default=0))))
"""


def test_table_configs_compile_for_sm90(tmp_path):
    rows = compile_rows(_SM90_COMPILE, tmp_path)
    assert len(rows) == 2 * (len(tb.CONFIGS) + len(tb.CONFIGS_SHORT_ROWS))
    for r in rows:
        assert r["shared"] <= 227 * 1024, r  # the H100's shared memory per block (opt-in)
        if r["dtype"] == "bf16" and r["table"] == "table":
            assert r["buffers"] >= 2, r  # the block loop is software-pipelined (prefetch >= 1)


# ---------------------------------------------------------------------------------------------
# GPU tests (skipped on CPU)
# ---------------------------------------------------------------------------------------------

def random_block_map(nb, kb, density, seed=3):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(nb, kb, generator=g) < density


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 16, 128, 8192])
def test_gpu_llama_mlp_shape(dtype, m):
    # the up/gate projection of an 8B-class model, 90% of its 64x64 blocks zero
    b, n, k = 64, 14336, 4096
    w = make_weight(n, k, b, random_block_map(n // b, k // b, 0.1), dtype)
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    assert_matches(run(x, w, bias, b), reference(x, w, bias), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("b", [16, 32, 64, 128])
def test_gpu_every_table_config(dtype, b):
    # one M per bucket, so every table entry (with fp32's trimmed stages) compiles and runs
    n, k = 1000, 1100  # ragged for every block size
    w = make_weight(n, k, b, random_block_map(math.ceil(n / b), math.ceil(k / b), 0.3), dtype)
    bias = make_bias(n, dtype)
    for m in (1, 20, 50, 100, 300):
        x = make_x(m, k, dtype)
        assert_matches(run(x, w, bias, b, allow_tf32=False), reference(x, w, bias), dtype)


@pytest.mark.gpu
def test_gpu_tf32():
    b, n, k, m, dtype = 64, 2048, 2048, 256, torch.float32
    w = make_weight(n, k, b, random_block_map(n // b, k // b, 0.2), dtype)
    x = make_x(m, k, dtype)
    assert_matches(run(x, w, None, b, allow_tf32=True), reference(x, w, None), "tf32")


@pytest.mark.gpu
def test_gpu_nonfinite():
    b, n, k, m, dtype = 64, 1024, 1024, 300, torch.bfloat16
    w = make_weight(n, k, b, random_block_map(n // b, k // b, 0.1), dtype)
    w[5, 100] = math.nan
    x, bias = make_x(m, k, dtype), make_bias(n, dtype)
    x[3, 17] = math.inf
    x[40, 900] = math.nan
    x[299, 1023] = -math.inf  # the ragged last M tile
    assert_matches(run(x, w, bias, b), reference(x, w, bias, elementwise=True), dtype)
