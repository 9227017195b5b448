"""The 2:4 Triton kernels (lowering/triton_24.py) against an fp64 reference.

On CPU they run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), fp16/fp32 only
(the interpreter's bf16 dot is wrong), tiles >= 16 for tl.dot. GPU tests (bf16, realistic sizes)
are marked `gpu`.
"""
import itertools
import math

import pytest
import torch

from sparse_inductor.formats import compress_24
from sparse_inductor.lowering.triton_24 import CONFIGS, pick_config, sp24_linear
from sparse_inductor.prune import prune_24_

# Relative Frobenius error vs fp64, by dtype, with the reason for each bound.
TOL = {
    # fp32 inputs, fp32 accumulate, ieee dot: error is accumulation rounding, ~1e-7 at these sizes
    torch.float32: 1e-5,
    # fp16 output rounding (11-bit mantissa: 2^-11 ~ 4.9e-4 relative per element) dominates
    torch.float16: 2e-3,
    # bf16: 8-bit mantissa, 2^-8 ~ 3.9e-3 per element on the output rounding
    torch.bfloat16: 1e-2,
}

# Small tiles for the interpreter (still >= 16 for tl.dot).
SMALL = {
    "gemv": dict(GEMV=True, BLOCK_M=1, BLOCK_N=16, BLOCK_G=16, num_warps=4, num_stages=1),
    "dot16": dict(GEMV=False, BLOCK_M=16, BLOCK_N=16, BLOCK_G=16, num_warps=4, num_stages=1),
    "dot32": dict(GEMV=False, BLOCK_M=32, BLOCK_N=32, BLOCK_G=16, num_warps=4, num_stages=1),
}


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make(n, k, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = prune_24_(torch.randn(n, k, generator=g)).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return w, x, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", sorted(SMALL))
@pytest.mark.parametrize("m,n,k", [(1, 16, 64), (3, 33, 64), (17, 48, 128), (5, 7, 4 * 37)])
def test_matches_fp64(dtype, cfg, m, n, k):
    w, x, b = make(n, k, m, dtype)
    values, meta = compress_24(w)
    ref = x.double() @ w.double().T + b.double()
    y = sp24_linear(x, values, meta, b, config=dict(SMALL[cfg]))
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("cfg", sorted(SMALL))
def test_every_metadata_pattern(cfg):
    """Each of the six kept-pair codes, and groups with 0 or 1 nonzeros, in every row parity."""
    pairs = list(itertools.combinations(range(4), 2))
    n, groups = 12, 16
    w = torch.zeros(n, 4 * groups)
    for r in range(n):
        for g in range(groups):
            kind = (r + g) % 8
            if kind < 6:
                i0, i1 = pairs[kind]
                w[r, 4 * g + i0], w[r, 4 * g + i1] = 1.0 + r, -2.0 - g
            elif kind == 6:
                w[r, 4 * g + (g % 4)] = 3.0
    x = torch.randn(2, 4 * groups)
    values, meta = compress_24(w)
    y = sp24_linear(x, values, meta, config=dict(SMALL[cfg]))
    assert rel_err(y, x.double() @ w.double().T) < TOL[torch.float32]


def test_strided_input():
    w, x, _ = make(32, 64, 20, torch.float32)
    xs = torch.randn(64, 20).t()  # non-contiguous [20, 64]
    values, meta = compress_24(w)
    for cfg in SMALL.values():
        y = sp24_linear(xs, values, meta, config=dict(cfg))
        assert rel_err(y, xs.double() @ w.double().T) < TOL[torch.float32]


@pytest.mark.parametrize("cfg", sorted(SMALL))
def test_nonfinite_inputs_poison_rows_like_dense(cfg):
    w, x, _ = make(32, 64, 4, torch.float32)
    x[1, 3] = math.nan
    x[2, 5] = math.inf
    values, meta = compress_24(w)
    y = sp24_linear(x, values, meta, config=dict(SMALL[cfg]))
    ref = torch.nn.functional.linear(x, w)
    assert ref[2].isinf().any() and ref[2].isnan().any()  # the Inf row has both, as dense does
    # exactly dense's non-finite pattern: NaN where a non-finite x meets a zero (or NaN), +-Inf elsewhere
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    assert torch.equal(y[y.isinf()], ref[ref.isinf()])
    assert rel_err(y[[0, 3]], x[[0, 3]].double() @ w.double().T) < TOL[torch.float32]


def test_nonfinite_weights_propagate():
    w, x, _ = make(16, 64, 3, torch.float32)
    w[4, 1], w[4, 2], w[4, 3] = math.nan, 0.0, 0.0  # keep 2:4 in that group
    w[4, 0] = 0.0
    values, meta = compress_24(w)
    for cfg in SMALL.values():
        y = sp24_linear(x, values, meta, config=dict(cfg))
        assert y[:, 4].isnan().all() and y[:, [0, 5]].isfinite().all()


def test_all_zero_weight_gives_bias():
    w = torch.zeros(16, 64)
    b = torch.randn(16)
    x = torch.randn(2, 64)
    values, meta = compress_24(w)
    for cfg in SMALL.values():
        assert torch.equal(sp24_linear(x, values, meta, b, config=dict(cfg)), b.expand(2, 16))


def test_input_errors():
    w, x, _ = make(16, 64, 2, torch.float32)
    values, meta = compress_24(w)
    with pytest.raises(ValueError, match="K="):
        sp24_linear(x[:, :32], values, meta)
    with pytest.raises(ValueError, match="2-D"):
        sp24_linear(x[None], values, meta)
    with pytest.raises(ValueError, match="dtype|is torch"):
        sp24_linear(x.half(), values, meta)


def test_config_table():
    assert pick_config(1, 14336, 4096)["GEMV"] and pick_config(1, 4096, 4096)["GEMV"]
    for m in (2, 16, 64, 1000, None):
        cfg = pick_config(m, 4096, 4096)
        assert not cfg["GEMV"] and cfg["BLOCK_M"] >= 16 and cfg["BLOCK_G"] >= 16
    for cfg in CONFIGS.values():
        assert cfg["BLOCK_N"] >= (4 if cfg["GEMV"] else 8) and cfg["BLOCK_G"] >= 16
    for n, int8 in itertools.product((14336, 4096), (False, True)):  # the gemv layout: whole meta words a lane
        cfg = pick_config(1, n, 4096, True, int8)
        assert cfg["GEMV"] and cfg["BLOCK_G"] >= 128 and cfg["BLOCK_N"] // 2 % cfg["num_warps"] == 0


# ---- GPU (bf16, sizes of the targets)

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 300])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336), (1000, 512)])
def test_gpu_bf16(m, n, k):
    torch.manual_seed(0)
    w = prune_24_(torch.randn(n, k, device="cuda")).bfloat16()
    x = torch.randn(m, k, device="cuda").bfloat16()
    values, meta = compress_24(w)
    ref = x.double() @ w.double().T
    assert rel_err(sp24_linear(x, values, meta), ref) < TOL[torch.bfloat16]


def test_dispatch_gemv_only_for_static_m1():
    """A dynamic M whose hint is 1 gets the tensor-core template (lower() never picks the gemv for
    a symbolic M), so the dispatcher must not price it as the gemv."""
    from sparse_inductor.dispatch import choose
    from sparse_inductor.options import SparseOptions
    from sparse_inductor.registry import Layer

    def layer(static):
        return Layer("2:4", 1, 14336, 4096, torch.bfloat16, "cuda", device_name="NVIDIA H100 80GB HBM3",
                     m_static=static)

    assert choose(layer(True), SparseOptions()).kernel == "triton"
    assert choose(layer(False), SparseOptions()).kernel == "dense"


# The gemv with four groups a lane (BLOCK_G 128 over 32 lanes): meta read as 32-bit words when
# G % BLOCK_G == 0 (K = 512), bytes otherwise; two row pairs a warp (BLOCK_N 16, 4 warps).
GEMV_WIDE = dict(GEMV=True, BLOCK_M=1, BLOCK_N=16, BLOCK_G=128, num_warps=4, num_stages=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(16, 512), (33, 1024), (7, 4 * 37), (48, 4 * 200)])
def test_gemv_wide_matches_fp64(dtype, n, k):
    w, x, b = make(n, k, 1, dtype)
    values, meta = compress_24(w)
    y = sp24_linear(x, values, meta, b, config=dict(GEMV_WIDE))
    assert rel_err(y, x.double() @ w.double().T + b.double()) < TOL[dtype]


@pytest.mark.parametrize("k", [512, 4 * 37])
def test_gemv_int8_values_exact_over_all_256(k):
    """int8 values become fp32 by the 2^23 magic (no I2F): exact for every byte. Integer x and
    sums below 2^24 make fp32 exact, so y must equal the integer reference exactly."""
    n = 64
    g = torch.Generator().manual_seed(3)
    w = torch.zeros(n, k)
    vals = (torch.arange(n * k // 2) % 256 - 128).float()  # every int8 value, many times
    pos = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2].sort(-1).values
    wg = w.view(n, k // 4, 4)
    wg.scatter_(-1, pos, vals.view(n, k // 4, 2))
    values, meta = compress_24(w.to(torch.int8))
    assert values.dtype == torch.int8 and set(values.unique().tolist()) == set(range(-128, 128))
    x = torch.randint(-3, 4, (1, k), generator=g).float()
    ref = (x.double() @ w.double().T)
    for cfg in (GEMV_WIDE, SMALL["gemv"]):
        y = sp24_linear(x, values, meta, config=dict(cfg))
        assert torch.equal(y.double(), ref)


@pytest.mark.parametrize("k", [512, 4 * 37])
def test_gemv_wide_nonfinite_inputs_like_dense(k):
    w, x, _ = make(33, k, 3, torch.float32)
    x[1, 3] = math.nan
    x[2, 5] = math.inf
    values, meta = compress_24(w)
    ref = torch.nn.functional.linear(x, w)
    for i in range(3):  # M = 1 each: the gemv
        y = sp24_linear(x[i:i + 1], values, meta, config=dict(GEMV_WIDE))
        assert torch.equal(y.isnan(), ref[i:i + 1].isnan()) and torch.equal(y.isinf(), ref[i:i + 1].isinf())
        assert torch.equal(y[y.isinf()], ref[i:i + 1][ref[i:i + 1].isinf()])


@pytest.mark.parametrize("module", ["triton_24", "triton_block"])
def test_template_source_has_every_device_function_it_calls(module):
    """The Inductor templates paste DEVICE_FUNCTIONS' sources ahead of their kernel: a jit function
    called from them (or from the template body) but missing from the tuple fails only when the
    template compiles, on the GPU, and the backend then falls back to plain Inductor."""
    import importlib
    import inspect
    import re

    mod = importlib.import_module(f"sparse_inductor.lowering.{module}")
    jit = {name for name, f in vars(mod).items() if inspect.isfunction(getattr(f, "fn", None))}
    listed = {f.fn.__name__ for f in mod.DEVICE_FUNCTIONS}
    sources = [inspect.getsource(f.fn) for f in mod.DEVICE_FUNCTIONS] + [mod._TEMPLATE_BODY]
    called = {name for name in jit for src in sources if re.search(rf"\b{name}\(", src)}
    assert called <= listed, f"called from the template but not in DEVICE_FUNCTIONS: {called - listed}"


# ---- the gemv layout (formats/sparse24.to_gemv_layout): int32 meta words, int8 values as uint8,
# read by the M = 1 kernel for bf16 x. The interpreter's bf16 is fine here (no tl.dot).

GEMV_WORDS = dict(GEMV=True, BLOCK_M=1, BLOCK_N=8, BLOCK_G=128, num_warps=2, num_stages=1)


def _words(w):
    from sparse_inductor.formats import to_gemv_layout

    values, meta = compress_24(w)
    vw, mw = to_gemv_layout(values, meta)
    assert mw.dtype == torch.int32 and mw.shape == (math.ceil(w.shape[0] / 2), w.shape[1] // 16)
    return (values, meta), (vw, mw)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("n,k,cfg", [(16, 512, GEMV_WORDS), (33, 1040, GEMV_WORDS), (7, 256, GEMV_WORDS),
                                     (48, 1024, dict(GEMV_WORDS, BLOCK_N=16, BLOCK_G=256, num_warps=4)),
                                     (14, 1536, dict(GEMV_WORDS, BLOCK_N=4, BLOCK_G=512, num_warps=1)),
                                     # warps splitting K (KSPLIT): even and ragged K, one row pair a program
                                     (20, 1024, dict(GEMV_WORDS, BLOCK_N=4, BLOCK_G=128, num_warps=2, KSPLIT=2)),
                                     (13, 2064, dict(GEMV_WORDS, BLOCK_N=8, BLOCK_G=128, num_warps=4, KSPLIT=2)),
                                     (5, 2560, dict(GEMV_WORDS, BLOCK_N=2, BLOCK_G=128, num_warps=4, KSPLIT=4)),
                                     # the H200 table's int8 entries (DEVICE_CONFIGS)
                                     (12, 1024, dict(GEMV_WORDS, BLOCK_N=4, BLOCK_G=128, num_warps=1)),
                                     (9, 2064, dict(GEMV_WORDS, BLOCK_N=2, BLOCK_G=256, num_warps=2, KSPLIT=2))])
def test_gemv_layout_matches_byte_layout_and_fp64(wdtype, n, k, cfg):
    """Same outputs as the byte layout (the same products in the same order), within bf16 of fp64;
    K = 1040 leaves a partial step (masked loads), N = 33 and 7 a half row pair."""
    w, x, b = make(n, k, 1, torch.float32)
    w = (w * 20).round().clamp(-128, 127).to(torch.int8) if wdtype == torch.int8 else w.bfloat16()
    x, b = x.bfloat16(), b.bfloat16()
    (values, meta), (vw, mw) = _words(w)
    assert vw.dtype == (torch.uint8 if wdtype == torch.int8 else torch.bfloat16)
    y = sp24_linear(x, vw, mw, b, config=dict(cfg))
    y_bytes = sp24_linear(x, values, meta, b, config=dict(GEMV_WIDE))
    assert torch.equal(y, y_bytes)
    assert rel_err(y, x.double() @ w.double().T + b.double()) < TOL[torch.bfloat16]


def test_ksplit_only_for_the_gemv_layout():
    w, x, _ = make(16, 512, 2, torch.float32)
    values, meta = compress_24(w.bfloat16())
    with pytest.raises(ValueError, match="KSPLIT"):
        sp24_linear(x.bfloat16(), values, meta, config=dict(GEMV_WIDE, KSPLIT=2))


def test_device_configs_replace_the_table(monkeypatch):
    """DEVICE_CONFIGS entries replace the table's for a GPU whose name holds the key; other GPUs,
    CPU tensors and an unknown device get the table."""
    from sparse_inductor.lowering import triton_24 as t24

    special = dict(CONFIGS["gemv_words_int8"], BLOCK_G=128)
    monkeypatch.setitem(t24.DEVICE_CONFIGS, "FAKE GPU", {"gemv_words_int8": special})
    monkeypatch.setattr(t24, "_device_name", lambda d: {"a": "NVIDIA FAKE GPU X", "b": "NVIDIA H100"}.get(d, ""))
    assert pick_config(1, 14336, 4096, True, True, device="a") == special
    assert pick_config(1, 14336, 4096, True, True, device="b") == CONFIGS["gemv_words_int8"]
    assert pick_config(1, 14336, 4096, True, True) == CONFIGS["gemv_words_int8"]
    assert pick_config(1, 4096, 4096, True, True, device="a") == CONFIGS["gemv_words_narrow_int8"]


@pytest.mark.parametrize("cfg", [dict(GEMV_WORDS), dict(GEMV_WORDS, BLOCK_N=4, num_warps=2, KSPLIT=2)])
@pytest.mark.parametrize("where", ["nan", "inf", "-inf", "huge"])
def test_gemv_layout_nonfinite_inputs_like_dense(where, cfg):
    """A NaN/Inf x meets the skipped zeros: the sum of x taken in the loop (packed bf16 adds under
    PTX, fp32 here) must catch it; a huge finite x only makes that sum overflow (harmless: the
    exact second pass then finds nothing)."""
    w, x, _ = make(40, 512, 1, torch.float32)
    if where == "huge":  # x's sum overflows (4e38), no product or output does (|w| small there)
        w[:, 36:40] *= 0.05
        x[0, 37] = x[0, 38] = 2e38
    else:
        x[0, 37] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[where]
    w, x = w.bfloat16(), x.bfloat16()
    _, (vw, mw) = _words(w)
    ref = torch.nn.functional.linear(x.double(), w.double())
    y = sp24_linear(x, vw, mw, config=dict(cfg))
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    if where == "huge":
        assert ref.isfinite().all() and rel_err(y, ref) < TOL[torch.bfloat16]


def test_gemv_layout_int8_exact_over_all_256():
    """Offset-binary uint8 values (v + 128) become fp32 exactly for every byte: the same outputs as
    the byte layout, whose conversion test_gemv_int8_values_exact_over_all_256 proves exact (bf16 x
    here, so the outputs are rounded to bf16; the interpreter's rounding is not the GPU's, hence no
    comparison with a rounded reference)."""
    n, k = 64, 512
    g = torch.Generator().manual_seed(3)
    w = torch.zeros(n, k)
    vals = (torch.arange(n * k // 2) % 256 - 128).float()
    pos = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2].sort(-1).values
    w.view(n, k // 4, 4).scatter_(-1, pos, vals.view(n, k // 4, 2))
    (values, meta), (vw, mw) = _words(w.to(torch.int8))
    assert set(vw.unique().tolist()) == set(range(256))
    x = torch.randint(-3, 4, (1, k), generator=g).bfloat16()
    y = sp24_linear(x, vw, mw, config=dict(GEMV_WORDS))
    assert torch.equal(y, sp24_linear(x, values, meta, config=dict(GEMV_WIDE)))
    assert rel_err(y, x.double() @ w.double().T) < TOL[torch.bfloat16]


def test_gemv_layout_unaligned_or_strided_x():
    """x is read as 32-bit words: a view at an odd element offset or with a K stride is copied first."""
    w, x, b = make(24, 256, 1, torch.float32)
    w, b = w.bfloat16(), b.bfloat16()
    (values, meta), (vw, mw) = _words(w)
    big = torch.randn(3, 2 * 256 + 1).bfloat16()
    for xx in (big[0:1, 1:257], big[1:2, 1:513:2]):
        assert xx.data_ptr() % 4 or xx.stride(1) != 1
        ref = sp24_linear(xx.contiguous().clone(), values, meta, b, config=dict(GEMV_WIDE))
        assert torch.equal(sp24_linear(xx, vw, mw, b, config=dict(GEMV_WORDS)), ref)


def test_gemv_layout_other_uses_convert_back():
    """The launcher reads a gemv-layout weight for M > 1 or fp16 x too (converted back)."""
    w, x, b = make(24, 256, 5, torch.float16)
    (values, meta), (vw, mw) = _words(w)
    for xx in (x, x[:1]):
        assert torch.equal(sp24_linear(xx, vw, mw, b, config=dict(SMALL["dot16"] if len(xx) > 1 else SMALL["gemv"])),
                           sp24_linear(xx, values, meta, b, config=dict(SMALL["dot16"] if len(xx) > 1 else SMALL["gemv"])))


def test_gemv_layout_chosen_for_static_m1_bf16_only():
    from sparse_inductor.lowering.triton_24 import _compress, _fmt
    from sparse_inductor.registry import Layer

    def layer(m=1, static=True, dtype=torch.bfloat16, k=4096):
        return Layer("2:4", m, 64, k, dtype, "cuda", m_static=static)

    assert _fmt(layer()) == "sp24-gemv"
    for other in (layer(m=2), layer(static=False), layer(dtype=torch.float16), layer(k=4 * 37)):
        assert _fmt(other) == "sp24"
    w = prune_24_(torch.randn(64, 4096)).bfloat16()
    assert _compress(w, layer())["meta"].dtype == torch.int32
    assert _compress(w, layer(m=16))["meta"].dtype == torch.uint8


def test_gemv_layout_round_trip():
    from sparse_inductor.formats import decompress_24, from_gemv_layout

    for dt in (torch.bfloat16, torch.int8, torch.float32):
        w = prune_24_(torch.randn(9, 64) * 40).clamp(-128, 127).to(dt)
        (values, meta), (vw, mw) = _words(w)
        v2, m2 = from_gemv_layout(vw, mw)
        assert torch.equal(v2, values) and torch.equal(m2, meta)
        assert torch.equal(decompress_24(vw, mw), w)


def _gemv_table_configs():
    """Every gemv-layout config a GPU may run: the table's and each DEVICE_CONFIGS entry's, with
    the value dtype its key is for ("..._int8": int8 values, else bf16)."""
    from sparse_inductor.lowering.triton_24 import DEVICE_CONFIGS

    out = []
    for where, table in [("table", CONFIGS), *DEVICE_CONFIGS.items()]:
        for key, cfg in table.items():
            if key.startswith("gemv_words"):
                out.append(pytest.param(cfg, torch.int8 if key.endswith("int8") else torch.bfloat16,
                                        id=f"{where}-{key}"))
    return out


# Every gemv-layout table config, the per-GPU entries included, compiled for sm_90a (tests/sm90.py).
_SM90_GEMV = r"""
from sparse_inductor.lowering import triton_24 as t
k = t._sp24_linear_kernel
names = k.arg_names
for where, table in [("table", t.CONFIGS), *t.DEVICE_CONFIGS.items()]:
    for key, cfg in table.items():
        if not key.startswith("gemv_words"):
            continue
        sig = {n: "constexpr" for n in names}
        sig.update(X="*bf16", V="*u8" if key.endswith("int8") else "*bf16", META="*i32", B="*bf16", Y="*bf16",
                   N="i32", K="i32", stride_xm="i32", stride_ym="i32")
        consts = dict(M=1, stride_xk=1, stride_yn=1, HAS_BIAS=False, ACT="none", GEMV=True, BLOCK_M=1,
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"], EVEN_G=True, ALLOW_TF32=False, UPCAST=False,
                      NUM_WARPS=cfg["num_warps"], PTX=True, KSPLIT=cfg.get("KSPLIT", 1))
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("X", "V", "META", "B", "Y", "N", "K",
                                                                        "stride_xm", "stride_ym")}
        c = triton.compile(ASTSource(k, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        print(json.dumps(dict(where=where, key=key, shared=c.metadata.shared)))
"""


def test_gemv_table_configs_compile_for_sm90(tmp_path):
    from sm90 import compile_rows

    rows = compile_rows(_SM90_GEMV, tmp_path)
    assert len(rows) == len(_gemv_table_configs())
    for r in rows:
        assert r["shared"] <= 227 * 1024, r  # a Hopper block's shared memory (opt-in)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg,wdtype", _gemv_table_configs())
@pytest.mark.parametrize("n,k", [(4096, 14336), (1000, 528)])
def test_gpu_every_gemv_table_config(cfg, wdtype, n, k):
    """Every table entry, the per-GPU ones included (whichever GPU runs the test), on the GPU
    against fp64, NaN/Inf inputs like dense."""
    torch.manual_seed(1)
    w = prune_24_(torch.randn(n, k, device="cuda"))
    w = (w * 20).round().clamp(-128, 127).to(torch.int8) if wdtype == torch.int8 else w.bfloat16()
    x = torch.randn(1, k, device="cuda").bfloat16()
    _, (vw, mw) = _words(w)
    assert rel_err(sp24_linear(x, vw, mw, config=dict(cfg)), x.double() @ w.double().T) < TOL[torch.bfloat16]
    x[0, 5] = math.nan
    ref = torch.nn.functional.linear(x.double(), w.double())
    y = sp24_linear(x, vw, mw, config=dict(cfg))
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())


@pytest.mark.gpu
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336), (1000, 528)])
@pytest.mark.parametrize("ksplit", [1, 2])
def test_gpu_gemv_layout(wdtype, n, k, ksplit):
    """The gemv layout on the GPU (inline PTX: byte permutes, packed bf16 sums of x): the byte
    layout's outputs within bf16 of fp64, and NaN/Inf inputs like dense; ksplit 2: the warps
    splitting K (the H200 table's narrow config), else the table's config."""
    torch.manual_seed(0)
    w = prune_24_(torch.randn(n, k, device="cuda"))
    w = (w * 20).round().clamp(-128, 127).to(torch.int8) if wdtype == torch.int8 else w.bfloat16()
    x = torch.randn(1, k, device="cuda").bfloat16()
    (values, meta), (vw, mw) = _words(w)
    cfg = None if ksplit == 1 else dict(GEMV=True, BLOCK_M=1, BLOCK_N=8, BLOCK_G=256, num_warps=4, num_stages=2,
                                        KSPLIT=2)
    ref = x.double() @ w.double().T
    y = sp24_linear(x, vw, mw, config=cfg)
    assert rel_err(y, ref) < TOL[torch.bfloat16]
    assert rel_err(y, sp24_linear(x, values, meta).double()) < 1e-3
    x[0, 7] = math.inf
    x[0, k - 3] = math.nan if k > 1000 else -math.inf
    ref = torch.nn.functional.linear(x.double(), w.double())
    y = sp24_linear(x, vw, mw, config=cfg)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
