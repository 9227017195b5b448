"""The CUTLASS sm90 2:4 family: generated source, compressed layout, builds, argument checks; and,
marked gpu, its numerics on an H100 / H200.

CPU, any machine: golden sources (tests/golden/cutlass_*.cu; regenerate with EXPECTTEST_ACCEPT=1
and read the diff), the EVT nodes each epilogue feature adds, config validation, the compressed
layout against a plain-Python loop over CuTe's layouts, `available()` reasons, the launcher's
argument errors, its ctypes call read back through the generated C signatures.
CPU with nvcc and the CUTLASS headers (skipped elsewhere, with the reason): CuTe's own layouts of
the compressed operands printed by a small host program, every offset against formats/cutlass_sm90;
one library built for sm_90a (BUILT; ~80 s of CPU time, 5 GB of memory), then, from the disk cache, its exports, the
layout against the host port of CUTLASS's compressor compiled into it, and its own refusals (error
codes, nothing launched). SPARSE_INDUCTOR_TEST_CUTLASS_BUILDS=all, or CI=true, builds the second
golden kernel too (8-bit layout), the two in one parallel build.
GPU: every dtype, epilogue and token bucket against fp64, odd M, poisoned outputs, NaN/Inf as the
sparse tensor core computes them, and CUTLASS's device compressor against formats/cutlass_sm90.
"""
from __future__ import annotations

import ctypes
import os
import re

import pytest
import torch

from sparse_inductor.formats import cutlass_sm90 as cf
from sparse_inductor.lowering import cutlass_24 as c24
from sparse_inductor.lowering.cutlass_24 import CutlassConfig, CutlassKernel, Epilogue
from sparse_inductor.runtime import cutlass as rt

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
ACCEPT = os.environ.get("EXPECTTEST_ACCEPT", "0") not in ("", "0")

# The smallest useful kernel (decode-size token tile, bias): what CI builds.
BUILT = CutlassKernel("bf16", CutlassConfig((128, 16, 128), (1, 1, 1), "warpspecialized"), Epilogue("bf16", bias="bf16"))
# The second golden: 8-bit operands, per-token and per-channel scales, bias, persistent pingpong.
SCALED = CutlassKernel("int8", CutlassConfig((128, 32, 128), (1, 1, 1), "pingpong"),
                       Epilogue("bf16", bias="bf16", weight_scale="vector", token_scale="vector"))


def _why_no_build():
    why = rt.available()
    return f"no CUTLASS toolchain here: {why}" if why else None


needs_toolchain = pytest.mark.skipif(_why_no_build() is not None, reason=str(_why_no_build()))


# ---------------------------------------------------------------------------------------------
# Generated source
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,golden", [(BUILT, "cutlass_bf16_bias.cu"), (SCALED, "cutlass_int8_scaled.cu")])
def test_golden_source(kernel, golden):
    path = os.path.join(GOLDEN, golden)
    src = kernel.source()
    if ACCEPT:
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:
            f.write(src)
    with open(path) as f:
        assert src == f.read(), f"generated source changed: EXPECTTEST_ACCEPT=1 rewrites {path}"


def _evt(kernel: CutlassKernel) -> str:
    src = kernel.source()
    return src[src.index("// The epilogue:"):src.index("using FusionCallbacks")]


@pytest.mark.parametrize("ep,expect", [
    (Epilogue(), ["Sm90Compute<si_ep::Identity, ElementD", "Sm90AccFetch"]),
    (Epilogue(bias="fp32"), ["Sm90Compute<cutlass::plus, ElementD", "Sm90ColBroadcast<0, TileShape, float,"]),
    (Epilogue(activation="gelu"), ["si_ep::GeluErf, ElementD"]),
    (Epilogue(activation="gelu_tanh"), ["si_ep::GeluTanh, ElementD"]),
    (Epilogue(activation="relu", bias="bf16"), ["si_ep::Relu, ElementD", "cutlass::plus, ElementCompute"]),
    (Epilogue(gate="silu_acc"), ["cutlass::multiplies, ElementD", "si_ep::Silu, ElementCompute", "Sm90SrcFetch<ElementC>"]),
    (Epilogue(gate="silu_aux"), ["cutlass::multiplies, ElementD", "Sm90AccFetch,\n    Evt0"]),
    (Epilogue(residual=True, activation="silu"), ["cutlass::plus, ElementD", "Sm90SrcFetch<ElementC>"]),
    (Epilogue(weight_scale="vector"), ["Sm90ColBroadcast<0, TileShape, float, ElementCompute, Stride<_1, _0"]),
    (Epilogue(token_scale="vector"), ["Sm90RowBroadcast<0, TileShape, float, ElementCompute, Stride<_0, _1"]),
    (Epilogue(token_scale="tensor", weight_scale="tensor"), ["Sm90ScalarBroadcast<float"]),
])
def test_each_epilogue_feature_adds_its_node(ep, expect):
    evt = _evt(CutlassKernel("bf16", CutlassConfig(), ep))
    for s in expect:
        assert s in evt, f"{s!r} not in\n{evt}"


def test_epilogue_order_scales_bias_activation_gate():
    """token scale, weight scale, bias, activation, gate: innermost first."""
    ep = Epilogue("bf16", bias="bf16", activation="relu", gate="silu_acc", weight_scale="vector", token_scale="vector")
    evt = _evt(CutlassKernel("int8", CutlassConfig((128, 32, 128)), ep))
    names = re.findall(r"Sm90Compute<([\w:]+),", evt)
    assert names == ["cutlass::multiplies", "cutlass::multiplies", "cutlass::plus", "si_ep::Relu", "si_ep::Silu",
                     "cutlass::multiplies"]
    assert evt.index("Sm90RowBroadcast") < evt.index("Sm90ColBroadcast<0, TileShape, float")


def test_aux_is_the_c_operand_and_absent_without_one():
    assert "using ElementC = void;" in CutlassKernel().source()
    src = CutlassKernel(epilogue=Epilogue("fp32", residual=True, aux_dtype="bf16")).source()
    assert "using ElementC = cutlass::bfloat16_t;" in src and "using ElementD = float;" in src
    assert "static_cast<ElementC const*>(aux)" in src


def test_schedules_and_scheduler_in_source():
    src = CutlassKernel("e4m3", CutlassConfig((128, 64, 128), (2, 1, 1), "cooperative", scheduler="streamk",
                                             fast_accum=True)).source()
    assert "KernelTmaWarpSpecializedCooperativeFP8FastAccum" in src
    assert "cutlass::epilogue::TmaWarpSpecializedCooperative;" in src
    assert "cutlass::gemm::StreamKScheduler" in src and "Decomposition::SplitK" in src
    assert "using ClusterShape = Shape<_2, _1, _1>;" in src
    ws = CutlassKernel(config=CutlassConfig((128, 16, 128), kernel_schedule="warpspecialized", stages=4)).source()
    assert re.search(r"CollectiveEpilogue,\s+void>;", ws)  # not persistent: no tile scheduler
    assert "StageCount<4>" in ws and "KernelTmaWarpSpecialized;" in ws
    pp = CutlassKernel(config=CutlassConfig((128, 64, 128), kernel_schedule="pingpong")).source()
    assert re.search(r"CollectiveEpilogue,\s+cutlass::gemm::PersistentScheduler>;", pp)
    assert "StageCountAutoCarveout" in pp


def test_names_are_stable_and_distinct():
    a = CutlassKernel("bf16", CutlassConfig(), Epilogue(bias="bf16"))
    assert a.name == CutlassKernel("bf16", CutlassConfig(), Epilogue(bias="bf16")).name
    names = {CutlassKernel(d, CutlassConfig((128, 64, 128)), e).name
             for d in c24.DTYPES for e in (Epilogue(), Epilogue(bias="bf16"), Epilogue("fp16"))}
    assert len(names) == 12
    assert re.fullmatch(r"bf16_[0-9a-f]{12}", a.name)


@pytest.mark.parametrize("fast,kdim,chain", [(False, 512, 4), (True, 512, 8), (True, 4096, 64), (False, 128, 2)])
def test_fp8_error_bound_follows_the_mma_chain(fast, kdim, chain):
    """e4m3: 2^-13 per sparse wgmma (k = 64) between fp32 promotions, every 4 MMAs or, with
    FP8FastAccum, never (cutlass_24.error_bound's comment); fp32 sums: K * 2^-24."""
    k = CutlassKernel("e4m3", CutlassConfig((128, 32, 128), fast_accum=fast), Epilogue("fp32"))
    x, w = torch.ones(1, kdim, dtype=torch.float64), torch.ones(1, kdim, dtype=torch.float64)
    ref = torch.zeros(1, 1, dtype=torch.float64)
    mmas = kdim // 64
    want = (chain * 2.0 ** -13 + mmas / chain * 2.0 ** -24 + 16 * 2.0 ** -24) * kdim
    assert c24.error_bound(k, x, w, ref).item() == pytest.approx(want, rel=1e-12)
    bf = CutlassKernel("bf16", CutlassConfig((128, 32, 64)), Epilogue("fp32"))
    assert c24.error_bound(bf, x, w, ref).item() == pytest.approx((kdim + 16) * 2.0 ** -24 * kdim, rel=1e-12)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(tile=(96, 64, 64)), "tile M 96"),
    (dict(tile=(64, 64, 64), kernel_schedule="cooperative"), "128 or 256"),
    (dict(tile=(128, 12, 64)), "tile N 12"),
    (dict(tile=(128, 64, 32)), "tile K 32"),
    (dict(cluster=(3, 1, 1)), "cluster"),
    (dict(cluster=(4, 4, 1)), "cluster"),
    (dict(kernel_schedule="persistent"), "kernel_schedule"),
    (dict(scheduler="streamk"), "cooperative kernel schedule only"),
    (dict(epilogue_schedule="tma_cooperative"), "does not go with pingpong"),
    (dict(stages=0), "stages"),
])
def test_config_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        CutlassConfig(**kwargs)


@pytest.mark.parametrize("make,msg", [
    (lambda: Epilogue(gate="silu_acc", residual=True), "not both"),
    (lambda: Epilogue(activation="tanh"), "activation"),
    (lambda: Epilogue(out_dtype="int8"), "out_dtype"),
    (lambda: Epilogue(weight_scale="row"), "weight_scale"),
    (lambda: CutlassKernel("int8", CutlassConfig((128, 64, 64))), "multiple of 128 for 8-bit"),
    (lambda: CutlassKernel("bf16", CutlassConfig(fast_accum=True)), "fp8"),
    (lambda: CutlassKernel("fp32"), "dtype"),
])
def test_kernel_validation(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_config_table_covers_buckets_in_the_spec_layouts():
    for m in (1, 16, 17, 33, 64, 200, 256, 512, 1000, 8192):
        cands = c24.configs_for(m)
        assert cands and all(c.tile[1] <= max(16, 2 * m) or m > 256 for c in cands), (m, cands)
        for dt in c24.DTYPES:
            ks = [CutlassKernel(dt, c) for c in c24.configs_for(m, dt)]
            assert {k.layout_key[1] for k in ks} <= set(c24.LAYOUT_TILE_KS)
            if dt in ("int8", "e4m3"):
                assert {k.layout_key[1] for k in ks} == {128}


def test_promoting_fp8_configs_keep_each_warpgroups_accumulator_small():
    # the promoting fp8 mainloop holds the accumulators twice: 64 x 256 fp32 per warpgroup spills
    for m in (1, 16, 64, 256, 512, 8192):
        for c in c24.configs_for(m, "e4m3"):
            per_wg = c.tile[0] * c.tile[1] // (2 if c.kernel_schedule == "cooperative" else 1)
            assert per_wg <= 64 * 128 and not c.fast_accum, (m, c.short())
        fast = c24.configs_for(m, "e4m3", fast_accum=True)
        assert [c.tile for c in fast] == [c.tile for c in c24.configs_for(m, "int8")], m  # the table's tiles
    assert c24._promoting_fp8(CutlassConfig((128, 256, 128), (2, 1, 1), "cooperative")).tile == (128, 128, 128)
    assert c24._promoting_fp8(CutlassConfig((128, 128, 128), (1, 1, 1), "pingpong")).tile == (128, 64, 128)


# ---------------------------------------------------------------------------------------------
# The compressed layout
# ---------------------------------------------------------------------------------------------

def _random_24(n, k, dtype, seed=0, empty=0.2):
    """A 2:4 W with some groups holding one or no nonzero, -0.0 in pruned places, NaN / Inf kept
    (made in fp32, then cast: fp8 has few CPU ops; its Inf becomes NaN)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (n, k), generator=g).float()
    else:
        w = torch.randn(n, k, generator=g).to(dtype).float()
    w[w == 0] = 1
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(n, k // 4, 4, generator=g) >= empty
    mask = mask.reshape(n, k)
    w = torch.where(mask, w, torch.zeros(()))
    if dtype.is_floating_point:
        w[~mask & (torch.rand(n, k, generator=g) < 0.5)] = -0.0
        kept = mask.view(-1).nonzero().view(-1)
        w.view(-1)[kept[:3]] = float("nan")
        w.view(-1)[kept[3:5]] = float("inf")
    return w.to(dtype)


def _ordered_strides(shape, order):
    """CuTe's make_ordered_layout on flat tuples: compact strides in the order of `order`."""
    strides, acc = [0] * len(shape), 1
    for i in sorted(range(len(shape)), key=lambda i: order[i]):
        strides[i], acc = acc, acc * shape[i]
    return strides


def _colex(coord, sizes, strides):
    off = 0
    for s, d in zip(sizes, strides):
        off += (coord % s) * d
        coord //= s
    return off


def _loop_reference(w: torch.Tensor, tile_k: int):
    """The compressor and fill_layoutE written out from sm90_sparse_config.inl, one byte at a time."""
    n, k = w.shape
    bits = cf.element_bits(w.dtype)
    t = min(tile_k, 128)
    if bits == 16:  # TensorEAtom_16bit
        m_sizes, k_sizes = (8, 2, 4), (16, 2, t // 32)
        st = _ordered_strides(m_sizes + k_sizes, (3, 1, 5, 0, 4, 2))
        m_str, k_str = st[:3], st[3:]
    else:  # TensorEAtom_8bit: (64, T) with steps (1, 0)
        m_sizes, k_sizes = (64,), (t,)
        m_str, k_str = [t], [1]
    atom_m, cosize = 64, 64 * t
    me, ke_logical = -(-n // atom_m) * atom_m, -(-k // t) * t
    align = 16 if bits == 16 else 32
    kv = -(-k // align) * align // 2
    u = w.view(torch.int16 if bits == 16 else torch.int8).tolist()
    sign = (1 << (bits - 1)) if w.dtype.is_floating_point else 0
    values = [[0] * kv for _ in range(n)]
    meta = [0] * (me * ke_logical // 8)
    for r in range(n):
        for c in range(k // 4):
            grp = [u[r][4 * c + i] & ((1 << bits) - 1) for i in range(4)]
            nz = [i for i in range(4) if grp[i] & ~sign]
            assert len(nz) <= 2
            if len(nz) == 2:
                idx, vals = nz, [grp[nz[0]], grp[nz[1]]]
            elif nz == [3]:
                idx, vals = [0, 3], [0, grp[3]]
            elif len(nz) == 1:
                idx, vals = [nz[0], 3], [grp[nz[0]], 0]
            else:
                idx, vals = [0, 0], [0, 0]
            values[r][2 * c], values[r][2 * c + 1] = vals
            kk = 4 * c
            offs = []
            for j in range(4):  # the four logical elements of the group, in logical units
                q = kk + j
                offs.append(_colex(r % atom_m, m_sizes, m_str) + cosize * (r // atom_m)
                            + _colex(q % t, k_sizes, k_str) + me * t * (q // t))
            assert offs == list(range(offs[0], offs[0] + 4)), "a byte's 8 logical elements must be adjacent"
            byte = offs[0] // 8
            meta[byte] |= (idx[0] | idx[1] << 2) << (4 * (c % 2))
    vt = torch.tensor(values, dtype=torch.int32).to(torch.int16 if bits == 16 else torch.int8)
    return vt, torch.tensor(meta, dtype=torch.int32).to(torch.uint8).view(me, ke_logical // 8)


@pytest.mark.parametrize("dtype,tile_k,n,k", [
    (torch.bfloat16, 128, 72, 200), (torch.float16, 64, 130, 96), (torch.bfloat16, 256, 64, 260),
    (torch.int8, 128, 66, 160), (torch.float8_e4m3fn, 256, 64, 384), (torch.int8, 128, 8, 4),
])
def test_layout_matches_loop_reference(dtype, tile_k, n, k):
    w = _random_24(n, k, dtype, seed=n + k)
    values, meta = cf.compress(w, tile_k)
    ref_values, ref_meta = _loop_reference(w, tile_k)
    bits = torch.int16 if cf.element_bits(dtype) == 16 else torch.int8
    assert torch.equal(values.view(bits), ref_values)
    assert torch.equal(meta, ref_meta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn])
def test_decompress_inverts_and_selected_positions(dtype):
    n, k = 40, 96
    w = _random_24(n, k, dtype, seed=3)
    values, meta = cf.compress(w, 128)
    bits = torch.int16 if cf.element_bits(dtype) == 16 else torch.int8
    back = cf.decompress(values, meta, n, k, 128).view(bits)
    expect = w.view(bits).clone()
    if dtype.is_floating_point:  # -0.0 is a zero: it comes back as +0.0
        expect[(expect & (0x7FFF if bits == torch.int16 else 0x7F)) == 0] = 0
    assert torch.equal(back, expect)
    vals, idx = cf.selected_positions(values, meta, n, k, 128)
    assert vals.shape == idx.shape == (n, k // 2)
    assert bool(((idx // 4) == torch.arange(k // 4).repeat_interleave(2)).all())  # each slot in its group
    picked = torch.gather(w.view(bits), 1, idx)
    nonzero = vals.view(bits) != 0
    assert torch.equal(picked[nonzero], vals.view(bits)[nonzero])


def test_compress_refuses_a_non_24_weight():
    w = torch.ones(8, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not 2:4"):
        cf.compress(w)
    with pytest.raises(ValueError, match="K % 4"):
        cf.compress(torch.zeros(8, 6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not supported"):
        cf.compress(torch.zeros(8, 8))


# ---------------------------------------------------------------------------------------------
# available() and the launcher's checks (no library needed)
# ---------------------------------------------------------------------------------------------

def test_available_reasons(monkeypatch, tmp_path):
    assert rt.available("cpu") == "needs a CUDA device, got cpu"
    monkeypatch.setenv(rt.ENV_NVCC, str(tmp_path / "no-nvcc"))
    assert rt.available().startswith("nvcc not found")
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.1, V12.1.105'\n")
    fake.chmod(0o755)
    monkeypatch.setenv(rt.ENV_NVCC, str(fake))
    rt._nvcc_version_of.cache_clear()
    assert "needs CUDA 12.2 or newer" in rt.available()
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    rt._nvcc_version_of.cache_clear()
    monkeypatch.setenv(rt.ENV_CUTLASS_DIR, str(tmp_path))
    assert rt.available() == (f"CUTLASS headers not found in {rt.ENV_CUTLASS_DIR}={tmp_path}: "
                              "pip install 'sparse_inductor[cutlass]'")
    monkeypatch.delenv(rt.ENV_CUTLASS_DIR)
    monkeypatch.setattr(rt, "cutlass_dirs", lambda: ("inc", "util"))
    assert rt.available() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert rt.available("cuda") == "needs sm90 (Hopper: H100 / H200), got sm80"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (10, 0))
    assert rt.available("cuda") == "needs sm90 (Hopper: H100 / H200), got sm100"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert rt.available("cuda") is None
    rt._nvcc_version_of.cache_clear()


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(rt.ENV_CACHE_DIR, str(tmp_path / "libs"))
    assert rt.cache_dir() == str(tmp_path / "libs")
    monkeypatch.delenv(rt.ENV_CACHE_DIR)
    monkeypatch.setenv("SPARSE_INDUCTOR_CACHE_DIR", str(tmp_path))
    assert rt.cache_dir() == str(tmp_path / "cutlass")


class _NoLibrary(rt.GemmLibrary):
    """The launcher's Python checks without a loaded library (shapes from formats/cutlass_sm90)."""

    def __init__(self, sig):
        self.sig, self.path = sig, "-"

    def compressed_shape(self, n, k):
        return cf.compressed_shape(n, k, self.sig.dtype, self.sig.tile_k)


def _call_args(m=4, n=64, k=128, dtype=torch.bfloat16):
    (vr, vc), (me, ke) = cf.compressed_shape(n, k, dtype)
    return dict(x=torch.zeros(m, k, dtype=dtype), values=torch.zeros(vr, vc, dtype=dtype),
                meta=torch.zeros(me, ke, dtype=torch.uint8), n=n)


@pytest.mark.parametrize("kernel,change,msg", [
    (BUILT, dict(x=torch.zeros(4, 128)), "x: expected dtype torch.bfloat16, got torch.float32"),
    (BUILT, dict(x=torch.zeros(2, 4, 128, dtype=torch.bfloat16)), r"x: expected a 2-D \[M, K\] tensor"),
    (BUILT, dict(x=torch.zeros(128, 4, dtype=torch.bfloat16).t()), "x: must be contiguous"),
    (BUILT, dict(x=torch.zeros(4 * 128 + 1, dtype=torch.bfloat16)[1:].view(4, 128)), "x: data pointer must be 16-byte aligned"),
    (BUILT, dict(values=torch.zeros(64, 32, dtype=torch.bfloat16)), r"values: expected shape \[64, 64\]"),
    (BUILT, dict(meta=torch.zeros(64, 16, dtype=torch.int8)), "meta: expected dtype torch.uint8"),
    (BUILT, dict(bias=torch.zeros(63, dtype=torch.bfloat16)), r"bias: expected shape \[64\]"),
    (BUILT, dict(bias=torch.zeros(64)), "bias: expected dtype torch.bfloat16"),
    (BUILT, dict(aux=torch.zeros(4, 64, dtype=torch.bfloat16)), "aux: this kernel's epilogue reads no aux"),
    (BUILT, dict(token_scale=torch.ones(4)), "token_scale: this kernel's epilogue reads no token_scale"),
    (BUILT, dict(splits=2), "splits=2: this kernel has no stream-K scheduler"),
    (BUILT, dict(out=torch.zeros(4, 64)), "out: expected dtype torch.bfloat16"),
    (BUILT, dict(n=60, values=torch.zeros(60, 64, dtype=torch.bfloat16)), "N=60 must be a multiple of 8"),
    (BUILT, dict(x=torch.zeros(4, 120, dtype=torch.bfloat16)), "K=120 must be a multiple of 16"),
    (BUILT, {}, "x: expected a CUDA tensor, got cpu"),
    (SCALED, {}, "weight_scale: this kernel's epilogue needs one"),
    (SCALED, dict(weight_scale=torch.ones(64), token_scale=torch.ones(5)), r"token_scale: expected shape \[4\]"),
    (SCALED, dict(weight_scale=torch.ones(64, dtype=torch.float64), token_scale=torch.ones(4)),
     "weight_scale: expected dtype torch.float32"),
    (CutlassKernel("bf16", CutlassConfig((128, 64, 128)), Epilogue(residual=True)), {}, "aux: this kernel's epilogue needs one"),
    (CutlassKernel("bf16", CutlassConfig((128, 64, 128)), Epilogue(token_scale="tensor")),
     dict(token_scale=torch.ones(2)), "token_scale: expected one number"),
])
def test_launcher_argument_errors(kernel, change, msg):
    dtype = kernel.torch_dtype
    args = _call_args(dtype=dtype)
    if dtype == torch.int8 and "x" not in change:
        args["x"] = torch.zeros(4, 128, dtype=torch.int8)
    args.update(change)
    x, values, meta, n = args.pop("x"), args.pop("values"), args.pop("meta"), args.pop("n")
    with pytest.raises((ValueError, TypeError), match=msg):
        _NoLibrary(kernel.signature())(x, values, meta, n, **args)


def _c_params(src: str, fn: str) -> list[tuple[str, str]]:
    """[(C type, name)] of the generated extern "C" function `fn` (its full name)."""
    m = re.search(rf"SI_EXPORT [\w ]+?\*? ?{fn}\((.*?)\)\s*\{{", src, re.S)
    assert m, fn
    params = [re.match(r"(.*?)(\w+)$", p.strip()).groups() for p in m.group(1).split(",")]
    return [(" ".join(t.split()), name) for t, name in params]


_CTYPE = {"const void*": ctypes.c_void_p, "void*": ctypes.c_void_p, "cudaStream_t": ctypes.c_void_p,
          "int": ctypes.c_int, "size_t": ctypes.c_size_t, "long long*": ctypes.POINTER(ctypes.c_longlong),
          "void": None, "const char*": ctypes.c_char_p}


def test_launcher_signatures_are_the_generated_ones():
    """Every export's parameter types (and si_gemm's names) as GemmLibrary declares them to ctypes."""
    for kernel in (BUILT, SCALED):
        src = kernel.source()
        params = _c_params(src, f"si_gemm_{kernel.name}")
        assert tuple(name for _, name in params) == rt.GEMM_PARAMS
        exported = set(re.findall(rf"SI_EXPORT [\w ]+?\*? ?si_(\w+)_{kernel.name}\(", src))
        assert exported == set(rt._FUNCTIONS)
        for fn, (restype, argtypes) in rt._FUNCTIONS.items():
            ret = re.search(rf"SI_EXPORT ([\w ]+?\*?) ?si_{fn}_{kernel.name}\(", src).group(1).strip()
            assert _CTYPE[ret] == restype, fn
            assert [_CTYPE[t] for t, _ in _c_params(src, f"si_{fn}_{kernel.name}")] == argtypes, fn
    with pytest.raises(TypeError, match=r"missing \['y'\]"):
        rt.gemm_call_args(**{p: 0 for p in rt.GEMM_PARAMS if p != "y"})


def test_launcher_passes_each_pointer_where_the_library_reads_it(monkeypatch):
    """The ctypes call, recorded, read back through the generated C signature: the compressed values
    go to a_values, x to x, and so on (ctypes takes any address anywhere: a swap gives no error,
    only wrong outputs, or an illegal address where a buffer is shorter than the one it stands for)."""
    import contextlib
    import types

    kernel = CutlassKernel("bf16", CutlassConfig((128, 64, 128)),
                           Epilogue(bias="bf16", residual=True, weight_scale="vector", token_scale="vector"))
    calls = []
    lib = _NoLibrary(kernel.signature())
    lib._gemm = lambda *a: calls.append(a) or 0
    lib.workspace_bytes = lambda m, n, k, splits=1: 256
    monkeypatch.setattr(rt, "_check_cuda", lambda t, name: None)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: types.SimpleNamespace(cuda_stream=12345))
    m, n, k = 4, 64, 128
    a = _call_args(m, n, k)
    t = dict(bias=torch.zeros(n, dtype=torch.bfloat16), aux=torch.zeros(m, n, dtype=torch.bfloat16),
             weight_scale=torch.ones(n), token_scale=torch.ones(m), out=torch.empty(m, n, dtype=torch.bfloat16))
    y = lib(a["x"], a["values"], a["meta"], n, **t)
    assert y is t["out"] and len(calls) == 1
    got = dict(zip((name for _, name in _c_params(kernel.source(), f"si_gemm_{kernel.name}")), calls[0]))
    expect = {"a_values": a["values"].data_ptr(), "a_meta": a["meta"].data_ptr(), "x": a["x"].data_ptr(),
              "y": t["out"].data_ptr(), "M": m, "N": n, "K": k, "splits": 1, "workspace_bytes": 256,
              "stream": 12345, **{name: t[name].data_ptr() for name in ("bias", "aux", "weight_scale", "token_scale")}}
    assert {p: got[p] for p in expect} == expect
    assert got["workspace"] not in (None, 0)


# ---------------------------------------------------------------------------------------------
# Built for sm_90a on this machine (nvcc and the headers), no GPU needed
# ---------------------------------------------------------------------------------------------

# CI (CI=true) builds both golden kernels: the compile-only check of two configs
BUILD_ALL = os.environ.get("SPARSE_INDUCTOR_TEST_CUTLASS_BUILDS") == "all" or os.environ.get("CI") == "true"


@pytest.fixture(scope="module")
def built():
    """BUILT's library, compiled once per cache (the tests below reuse it from the disk cache); with
    SPARSE_INDUCTOR_TEST_CUTLASS_BUILDS=all SCALED's too, the two in one parallel build (CI)."""
    if _why_no_build():
        pytest.skip(_why_no_build())
    if BUILD_ALL:
        bad = {k.describe(): str(p)[-2000:] for k, p in c24.build([BUILT, SCALED]).items() if isinstance(p, Exception)}
        assert not bad, bad
    return c24.library(BUILT)


@needs_toolchain
def test_build_for_sm90a(built):
    path = rt.library_path(BUILT.name, BUILT.source())
    assert built.path == path and os.path.getsize(path) > 100_000
    lib = ctypes.CDLL(path)  # the exports are visible (the library is built with -fvisibility=hidden)
    for fn in ("gemm", "can_implement", "workspace", "compress", "compress_workspace", "compressed_shape",
               "host_compress", "error_string"):
        assert hasattr(lib, f"si_{fn}_{BUILT.name}")
    assert not hasattr(lib, "cudaMalloc")  # the static CUDA runtime stays inside
    assert rt.build(BUILT.name, BUILT.source()) == path  # cached: no second compile


@pytest.mark.skipif(not BUILD_ALL,
                    reason="one more sm90a build (~80 s of CPU, 5 GB): SPARSE_INDUCTOR_TEST_CUTLASS_BUILDS=all (CI: always)")
@needs_toolchain
def test_build_second_golden_kernel(built):
    lib = c24.library(SCALED)
    assert lib.compressed_shape(64, 256) == cf.compressed_shape(64, 256, torch.int8, 128)
    w = _random_24(72, 256, torch.int8, seed=5)
    values, meta = lib.compress_on_host(w)
    v2, m2 = cf.compress(w, 128)
    assert torch.equal(values, v2) and torch.equal(meta, m2)


@needs_toolchain
@pytest.mark.parametrize("n,k", [(64, 128), (72, 200), (130, 96), (256, 512), (8, 4)])
def test_layout_matches_cutlass_host_port(built, n, k):
    assert built.compressed_shape(n, k) == cf.compressed_shape(n, k, torch.bfloat16, 128)
    w = _random_24(n, k, torch.bfloat16, seed=n * k)
    values, meta = built.compress_on_host(w)
    v2, m2 = cf.compress(w, 128)
    assert torch.equal(values.view(torch.int16), v2.view(torch.int16))
    assert torch.equal(meta, m2)


# A host-only program (no GPU, ~10 s to compile): where CuTe's fill_layoutA / fill_layoutE of
# Sm90GemmSparseConfig put each compressed value and each metadata byte, for every dtype and both
# metadata tile Ks, printed as "dtype N K T" then the byte offsets of E [Me, Ke] and the element
# offsets of the values [N, Kv] (in the order of the layouts' (row, column) coordinates).
_LAYOUT_PROBE = r"""
#include <cstdio>
#include <vector>
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/collective/builders/sm90_sparse_config.inl"
using namespace cute;
template <class Raw, int T> void probe(const char* name, int N, int K) {
  using Config = cutlass::Sm90GemmSparseConfig<sparse_elem<2, Raw>, GMMA::Major::K, sparse_elem<8, uint8_t>, Int<T>>;
  using U = uint_bit_t<sizeof_bits_v<Raw>>;
  auto problem = make_tuple(N, 1, K, 1);
  std::vector<uint8_t> e(1 << 20);
  std::vector<U> a(1 << 20);
  Tensor gE = recast<uint8_t>(make_tensor(make_gmem_ptr(recast_ptr<sparse_elem<8, uint8_t>>(e.data())),
                                          Config::fill_layoutE(problem)));
  Tensor gA = recast<U>(make_tensor(make_gmem_ptr(recast_ptr<sparse_elem<2, U>>(a.data())),
                                    Config::fill_layoutA(problem)));
  printf("%s %d %d %d\n", name, N, K, T);
  for (int m = 0; m < size<0>(gE); ++m)
    for (int kb = 0; kb < size<1>(gE); ++kb) printf("%ld ", long(&gE(m, kb, 0) - e.data()));
  printf("\n%d %d\n", int(size<0>(gE)), int(size<1>(gE)));
  for (int n = 0; n < size<0>(gA); ++n)
    for (int k = 0; k < size<1>(gA); ++k) printf("%ld ", long(&gA(n, k, 0) - a.data()));
  printf("\n%d %d\n", int(size<0>(gA)), int(size<1>(gA)));
}
int main() {
  probe<cutlass::bfloat16_t, 128>("bf16", 72, 200);
  probe<cutlass::bfloat16_t, 64>("bf16", 130, 96);
  probe<cutlass::half_t, 64>("fp16", 64, 384);
  probe<cutlass::half_t, 128>("fp16", 8, 4);
  probe<int8_t, 128>("int8", 66, 160);
  probe<int8_t, 128>("int8", 130, 384);
  probe<cutlass::float_e4m3_t, 128>("e4m3", 64, 256);
  return 0;
}
"""


@needs_toolchain
def test_layout_matches_cute_layouts(tmp_path):
    """formats/cutlass_sm90 against CuTe's own layouts (the ones the mainloop's TMA reads with), every
    offset, for 16- and 8-bit operands and metadata tile K 64 and 128."""
    import subprocess

    inc, util = rt.cutlass_dirs()
    (tmp_path / "probe.cu").write_text(_LAYOUT_PROBE)
    exe = str(tmp_path / "probe")
    subprocess.run([rt.nvcc_path(), "-std=c++17", "--expt-relaxed-constexpr", "-I", inc, "-I", util, "-o", exe,
                    str(tmp_path / "probe.cu")], check=True, capture_output=True, timeout=600)
    lines = subprocess.run([exe], check=True, capture_output=True, text=True).stdout.splitlines()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8, "e4m3": torch.float8_e4m3fn}
    assert len(lines) == 7 * 5
    for i in range(0, len(lines), 5):
        name, n, k, t = lines[i].split()
        n, k, t, dtype = int(n), int(k), int(t), dtypes[name]
        e_shape, a_shape = tuple(map(int, lines[i + 2].split())), tuple(map(int, lines[i + 4].split()))
        (vr, vc), (me, ke) = cf.compressed_shape(n, k, dtype, t)
        assert e_shape == (me, ke) and a_shape == (vr, vc), lines[i]
        e_off = torch.tensor([int(v) for v in lines[i + 1].split()]).view(me, ke)
        assert torch.equal(e_off, cf.meta_byte_offsets(me, ke, cf.element_bits(dtype), t)), lines[i]
        a_off = torch.tensor([int(v) for v in lines[i + 3].split()]).view(vr, vc)
        assert torch.equal(a_off, torch.arange(vr * vc).view(vr, vc)), lines[i]  # plain row-major [N, Kv]


@needs_toolchain
def test_host_port_refuses_non_24(built):
    with pytest.raises(ValueError, match="not 2:4"):
        built.compress_on_host(torch.ones(8, 8, dtype=torch.bfloat16))


@needs_toolchain
def test_library_refusals_are_codes(built):
    """The library's own checks and CUTLASS's can_implement answer with codes, launching nothing."""
    assert built.can_implement(16, 4096, 4096) == 0
    assert built.can_implement(1, 64, 128) == 0
    assert built.can_implement(0, 64, 128) == 2004
    assert built.can_implement(16, 64, 128, splits=2) == 2001
    bad_k = built.can_implement(16, 64, 120)  # compressed rows of 60 bf16: not 16-byte multiples
    bad_n = built.can_implement(16, 60, 128)  # y's rows (N contiguous) not 16-byte multiples
    for code in (bad_k, bad_n):
        assert code == rt.CANNOT_IMPLEMENT
        assert built.error_string(code).startswith("CUTLASS's can_implement refused the problem")
    assert built.error_string(2001) == "splits > 1 needs the stream-K scheduler"
    # si_gemm refuses before it touches a pointer (dummy addresses; a launch would fault)
    gemm = built._gemm
    assert gemm(16, 16, 16, 16, None, None, None, None, 16, 64, 128, 2, None, 0, None) == 2001
    assert gemm(16, 16, 16, 16, None, 16, None, None, 16, 64, 128, 1, None, 0, None) == 2003
    assert gemm(16, 16, 16, 16, None, None, None, None, 0, 64, 128, 1, None, 0, None) == 2004
    assert gemm(16, 16, 16, 16, None, None, None, None, 16, 64, 120, 1, None, 0, None) == bad_k
    if not torch.cuda.is_available():  # a call that passes every check still finds no device here
        assert gemm(16, 16, 16, 16, None, None, None, None, 16, 64, 128, 1, None, 0, None) == 2005
        assert built.workspace_bytes(16, 64, 128) == 0


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

_E = Epilogue
# One kernel per line: together every dtype, epilogue feature, schedule and scheduler.
GPU_KERNELS = [
    BUILT,
    SCALED,
    CutlassKernel("bf16", CutlassConfig((128, 64, 128), (1, 1, 1), "pingpong"), _E("bf16", bias="bf16", activation="gelu")),
    CutlassKernel("fp16", CutlassConfig((64, 32, 128), (2, 1, 1), "pingpong"), _E("fp16", gate="silu_acc")),
    CutlassKernel("bf16", CutlassConfig((128, 128, 128), (1, 2, 1), "cooperative"),
                  _E("fp32", bias="fp32", activation="relu", gate="silu_aux", aux_dtype="bf16")),
    CutlassKernel("bf16", CutlassConfig((128, 256, 64), (1, 1, 1), "cooperative", scheduler="streamk"),
                  _E("bf16", activation="silu", residual=True)),
    CutlassKernel("e4m3", CutlassConfig((128, 64, 128), (1, 1, 1), "cooperative", scheduler="streamk"),
                  _E("bf16", activation="gelu_tanh", residual=True, weight_scale="tensor", token_scale="tensor")),
    CutlassKernel("e4m3", CutlassConfig((128, 32, 256), (1, 1, 1), "warpspecialized", fast_accum=True),
                  _E("fp16", bias="fp16", weight_scale="vector", token_scale="vector")),
    CutlassKernel("int8", CutlassConfig((128, 16, 128), (1, 1, 1), "warpspecialized"), _E("fp32")),
    CutlassKernel("fp16", CutlassConfig((128, 16, 64), (1, 1, 1), "warpspecialized"), _E("fp16", bias="fp16")),
]

GPU_MS = (1, 16, 17, 32, 33, 64, 128, 200, 256, 512, 1024)


def _inputs(k: CutlassKernel, m: int, n: int, kdim: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = k.torch_dtype
    if dt == torch.int8:
        w = torch.randint(-127, 128, (n, kdim), device="cuda", generator=g).float()
        x = torch.randint(-127, 128, (m, kdim), device="cuda", generator=g).to(dt)
    else:
        w = torch.randn(n, kdim, device="cuda", generator=g)
        x = torch.randn(m, kdim, device="cuda", generator=g).to(dt)
    keep = torch.rand(n, kdim // 4, 4, device="cuda", generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, kdim // 4, 4, dtype=torch.bool, device="cuda").scatter_(-1, keep, True).reshape(n, kdim)
    w = (w * mask).to(dt)  # made in fp32: fp8 has few CUDA ops
    ep = k.epilogue
    out = c24.OUT_DTYPES[ep.out_dtype][1]
    extra = {}
    if ep.bias:
        extra["bias"] = torch.randn(n, device="cuda", generator=g).to(c24.OUT_DTYPES[ep.bias][1])
    if ep.has_aux:
        extra["aux"] = torch.randn(m, n, device="cuda", generator=g).to(c24.OUT_DTYPES[ep.resolved_aux_dtype][1])
    for name, kind, length in (("weight_scale", ep.weight_scale, n), ("token_scale", ep.token_scale, m)):
        if kind:
            extra[name] = torch.rand(length if kind == "vector" else (), device="cuda", generator=g) * 0.02 + 0.01
    return x, w, extra, out


def _check_close(k, y, x, w, extra):
    """y against the fp64 reference within cutlass_24.error_bound (its comment gives the reasons)."""
    ref = c24.reference(k, x, w, **extra)
    bound = c24.error_bound(k, x, w, ref, **extra)
    err = (y.to(torch.float64) - ref).abs()
    assert not torch.isnan(y).any(), f"{k.describe()}: NaN in the output"
    worst = (err - bound).max().item()
    assert worst <= 0, f"{k.describe()}: error exceeds the bound by {worst:.3g} (max err {err.max().item():.3g})"


@pytest.fixture(scope="module")
def gpu_libraries():
    """Every GPU kernel, built in parallel (from the disk cache after bench/gpu_cutlass.sh's build)."""
    why = rt.available("cuda") if torch.cuda.is_available() else "no GPU"
    if why:
        pytest.skip(why)
    built_paths = c24.build(GPU_KERNELS)
    return {k: p if isinstance(p, Exception) else c24.library(k) for k, p in built_paths.items()}


def _lib(libraries, kernel):
    """The kernel's library, or this test fails with its build error (the other kernels still run)."""
    lib = libraries[kernel]
    if isinstance(lib, Exception):
        pytest.fail(f"{kernel.describe()} did not build: {str(lib)[-2000:]}")
    return lib


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", GPU_KERNELS, ids=lambda k: k.describe().replace(" ", "-"))
def test_gpu_numerics_against_fp64(gpu_libraries, kernel):
    lib = _lib(gpu_libraries, kernel)
    n, kdim = 256, 512
    for m in GPU_MS:
        x, w, extra, out_dt = _inputs(kernel, m, n, kdim, seed=m)
        values, meta = cf.compress(w, kernel.config.tile[2])
        out = torch.full((m, n), float("nan"), dtype=out_dt, device="cuda")  # poisoned: every element written
        y = lib(x, values, meta, n, out=out, **extra)
        assert y.data_ptr() == out.data_ptr()
        _check_close(kernel, y, x, w, extra)
        if kernel.config.scheduler == "streamk":
            for splits in (0, 2, 3):
                _check_close(kernel, lib(x, values, meta, n, splits=splits, **extra), x, w, extra)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tile_k", [("bf16", 128), ("fp16", 64), ("int8", 128), ("e4m3", 256)])
def test_gpu_device_compressor_matches_formats(gpu_libraries, dtype, tile_k):
    kernel = next(k for k in GPU_KERNELS if k.dtype == dtype and k.layout_key[1] == min(tile_k, 128))
    lib = _lib(gpu_libraries, kernel)
    for n, kdim in ((256, 512), (72, 160), (130, 384)):
        w = _random_24(n, kdim, kernel.torch_dtype, seed=n).cuda()
        values, meta = lib.compress_on_device(w)
        v2, m2 = cf.compress(w, tile_k)
        bits = torch.int16 if cf.element_bits(w.dtype) == 16 else torch.int8
        assert torch.equal(values.view(bits), v2.view(bits)), (dtype, n, kdim)
        assert torch.equal(meta, m2), (dtype, n, kdim)


@pytest.mark.gpu
def test_gpu_nonfinite_inputs_as_the_sparse_tensor_core(gpu_libraries):
    """The raw kernel multiplies only the stored slots: a NaN/Inf input makes y NaN/Inf where it
    meets a stored slot (a kept value, or a half-empty group's zero) and leaves y finite where it
    meets only skipped positions, which dense would turn into NaN (0 * NaN). The fp64 reference over
    the selected positions (formats/cutlass_sm90.selected_positions) predicts every NaN and Inf."""
    kernel = BUILT
    lib = _lib(gpu_libraries, kernel)
    n, kdim, m = 128, 256, 24
    x, w, extra, _ = _inputs(kernel, m, n, kdim, seed=7)
    w[:, 0:4] = torch.tensor([0.5, 0, 0, 0], dtype=w.dtype)  # one nonzero at 0: slots (0, 3); 1, 2 skipped
    values, meta = cf.compress(w, 128)
    x[0, 1] = float("nan")  # skipped by every row: finite y, dense NaN
    x[1, 3] = float("nan")  # the half-empty slot: NaN in every column
    x[2, 0] = float("inf")  # meets 0.5: +Inf in every column
    x[3, 2] = float("-inf")  # skipped
    y = lib(x, values, meta, n, **extra).to(torch.float64)
    vals, idx = cf.selected_positions(values, meta, n, kdim, 128)
    xs = x.to(torch.float64)[:, idx]  # [M, N, K/2]
    ref = (xs * vals.to(torch.float64).unsqueeze(0)).sum(-1) + extra["bias"].to(torch.float64)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref)) and torch.equal(torch.isneginf(y), torch.isneginf(ref))
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()
    assert torch.isnan(y[1]).all() and torch.isposinf(y[2]).all()
    dense = torch.nn.functional.linear(x.float(), w.float(), extra["bias"].float())
    assert torch.isnan(dense[0]).all() and torch.isnan(dense[3]).all()  # what dense does instead
    finite = torch.isfinite(ref)
    mag = (xs.abs() * vals.to(torch.float64).abs().unsqueeze(0)).sum(-1) + extra["bias"].to(torch.float64).abs()
    bound = 2.0 ** -8 * ref.abs() + (kdim + 16) * 2.0 ** -24 * mag  # as cutlass_24.error_bound
    assert bool(((y - ref).abs()[finite] <= bound[finite]).all())


@pytest.mark.gpu
def test_gpu_call_checks_and_cuda_graph(gpu_libraries):
    lib = _lib(gpu_libraries, BUILT)
    n, kdim = 256, 512
    x, w, extra, _ = _inputs(BUILT, 16, n, kdim)
    values, meta = cf.compress(w, 128)
    with pytest.raises(ValueError, match="x: expected dtype"):
        lib(x.float(), values, meta, n, **extra)
    y0 = lib(x, values, meta, n, **extra)
    lib(x, values, meta, n, **extra)
    g = torch.cuda.CUDAGraph()
    out = torch.empty_like(y0)
    with torch.cuda.graph(g):
        lib(x, values, meta, n, out=out, **extra)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y0)
    _check_close(BUILT, lib(x, values, meta, n), x, w, {})  # a kernel with a bias adds 0 without one


@pytest.mark.gpu
def test_gpu_kernel_spec_runner(gpu_libraries):
    """kernel_spec()'s compress / variants / runner as the dispatcher's timer calls them."""
    from sparse_inductor.dispatch import Layer

    spec = c24.kernel_spec()
    layer = Layer("2:4", 16, 256, 512, torch.bfloat16, "cuda", device_name=torch.cuda.get_device_name())
    assert spec.check(layer) is None
    assert "N % 8 == 0" in spec.check(Layer("2:4", 16, 250, 512, torch.bfloat16, "cuda"))
    x, w, extra, _ = _inputs(BUILT, 16, 256, 512)
    tensors = spec.compress(w, layer)
    params = spec.variants(layer, tensors)
    assert params
    for p in params:
        _check_close(BUILT, spec.runner(tensors, extra["bias"], layer, p)(x), x, w, extra)
