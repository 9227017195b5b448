"""The non-finite row check as a kernel of its own (lowering/row_check.py, op sparse_inductor::row_check).

On the CPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1). The
result is exact: 0 for a finite row, NaN for a row holding a NaN or an Inf, whatever the dtype.
"""
import pytest
import triton
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_inductor  # noqa: F401  (defines the ops)
from sparse_inductor import _compat
from sparse_inductor.lowering.row_check import pick_config, row_check_eager

DEV = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def reference(x: torch.Tensor) -> torch.Tensor:
    """fp64: 0 where every entry of the row is finite, NaN elsewhere."""
    finite = x.double().isfinite().all(dim=1)
    return torch.where(finite, 0.0, float("nan")).double()


def poisoned(m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 100).to(dtype)
    specials = [float("nan"), float("inf"), float("-inf")]
    for i, r in enumerate(range(1, m, 3)):  # every third row one special value, at varying columns
        x[r, (7 * i) % k] = specials[i % 3]
    return x.to(DEV)


def check(g, x):
    ref = reference(x.cpu())
    assert g.dtype == torch.float32 and g.shape == (x.shape[0],)
    assert torch.equal(g.cpu().isnan(), ref.isnan()), (g, ref)
    assert torch.equal(g.cpu()[~ref.isnan()], torch.zeros(int((~ref.isnan()).sum())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 16), (5, 3), (33, 17), (9, 1030), (16, 4096)])
def test_kernel_matches_reference(m, k, dtype):
    """Ragged M and K (a K of 1030 takes two steps of 1024 with a masked tail)."""
    x = poisoned(m, k, dtype)
    check(row_check_eager(x), x)


def test_kernel_strided_and_empty():
    x = poisoned(24, 40, torch.float32).t().contiguous().t()  # column-major: stride (1, 24)
    assert x.stride() == (1, 24)
    check(row_check_eager(x), x)
    check(row_check_eager(x[::2]), x[::2])  # every other row
    assert row_check_eager(torch.empty(0, 8, device=DEV)).shape == (0,)
    with pytest.raises(ValueError, match="2-D"):
        row_check_eager(torch.empty(2, 3, 4, device=DEV))


def test_huge_finite_values_stay_finite():
    """0 * x is 0 for every finite x, the largest included: no false alarms."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.full((3, 64), torch.finfo(dtype).max, dtype=dtype, device=DEV)
        x[1] = torch.finfo(dtype).min
        x[2] = torch.finfo(dtype).tiny
        assert torch.equal(row_check_eager(x).cpu(), torch.zeros(3))


def test_op_matches_kernel():
    x = poisoned(10, 48, torch.float16)
    check(torch.ops.sparse_inductor.row_check(x), x)


def test_config_tiles():
    """Power-of-two tiles of at least 16 columns and at most 4096 elements; rows share a program
    only while the grid keeps MIN_PROGRAMS programs; a row alone takes its K in one step up to 4096."""
    from sparse_inductor.lowering.row_check import MIN_PROGRAMS

    for k in (1, 3, 16, 100, 768, 3072, 5120, 14336):
        for m in (None, 1, 16, 300, 1100, 12608):
            cfg = pick_config(k, m)
            bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
            assert bk >= 16 and bm * bk <= 4096 and bk & (bk - 1) == 0 and bm & (bm - 1) == 0, (k, m, cfg)
            if m is not None and bm > 1:
                assert -(-m // bm) >= MIN_PROGRAMS, (k, m, cfg)
            if bm == 1:
                assert bk >= min(k, 4096), (k, m, cfg)
    assert pick_config(4096, 16)["BLOCK_M"] == 1 and pick_config(4096, 16)["BLOCK_K"] == 4096
    assert pick_config(3072, 12608)["BLOCK_M"] == 4


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), bad=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 299),
                                                                         st.sampled_from(["nan", "inf", "-inf"])),
                                                               max_size=6),
       dtype=st.sampled_from([torch.float32, torch.float16]), rows=st.sampled_from([1, 2, 4, 8]))
def test_kernel_any_shape_any_config(m, k, bad, dtype, rows):
    """Any shape, any placement of NaN/Inf, the table's config and others (rows a program, and a
    BLOCK_K smaller than K so that the loop and its masked tail run)."""
    x = torch.randn(m, k).to(dtype)
    for r, c, v in bad:
        x[r % m, c % k] = float(v)
    x = x.to(DEV)
    check(row_check_eager(x), x)
    check(row_check_eager(x, dict(BLOCK_M=rows, BLOCK_K=16 if k > 16 else 64, num_warps=4, num_stages=2)), x)


@pytest.mark.compat
@pytest.mark.parametrize("zero", [0.0, pytest.param(0, marks=pytest.mark.xfail(_compat.FOLDS_MUL_BY_INT_ZERO, strict=True, reason=(
    "Inductor up to 2.13 folds x * 0 with an integer zero to 0, so the check would lose its NaN rows: "
    "passes/linear_rewrite.py writes a float zero")))])
def test_inductor_keeps_the_check_with_a_float_zero(zero):
    # the check as linear_rewrite builds it in the graph ("fused" mode: mul, sum), compiled by Inductor:
    # the NaN / Inf rows must survive (a canary for the Inductor behaviour the rewrite relies on)
    aten = torch.ops.aten

    def check(x):
        return aten.sum.dim_IntList(aten.mul.Tensor(x, zero), [1], dtype=torch.float32)

    torch._dynamo.reset()
    x = torch.randn(4, 64)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    g = torch.compile(check)(x)
    assert g.isnan().tolist() == [False, True, True, False]


# ---- with maybe: the rows read only where maybe is NaN

def flagged_reference(x: torch.Tensor, maybe: torch.Tensor) -> torch.Tensor:
    return torch.where(maybe.cpu().isnan(), reference(x.cpu()), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 16), (5, 3), (70, 17), (9, 1030), (130, 64)])
def test_flagged_rows_only(m, k, dtype):
    """g where maybe flags the row, 0 elsewhere: a non-finite row that maybe does not flag is not
    read (0), a flagged finite row gives 0, a flagged non-finite row NaN; programs with no flagged
    row (all of them but one where M > 64) read nothing of x."""
    x = poisoned(m, k, dtype)
    maybe = torch.zeros(m, device=DEV)
    maybe[::2] = float("nan")  # rows 0, 2, 4, ...: the poisoned rows 1, 4, 7, ... half flagged
    if m > 64:
        maybe[64:] = 0.0  # the second program (64 rows a program) has no flagged row
        maybe[m - 1] = float("nan")
    for cfg in (None, dict(BLOCK_M=16, BLOCK_K=16, num_warps=4, num_stages=2)):
        g = row_check_eager(x, cfg, maybe=maybe)
        want = flagged_reference(x, maybe)
        assert torch.equal(g.cpu().isnan(), want.isnan()), (g, want)
        assert torch.equal(g.cpu()[~want.isnan()], torch.zeros(int((~want.isnan()).sum())))
    torch.testing.assert_close(torch.ops.sparse_inductor.row_check(x, maybe).cpu(), want.float(), equal_nan=True)


def test_flagged_unflagged_rows_are_not_read():
    """An unflagged row is never loaded: here it holds NaN and its g is 0 all the same (the op's
    contract: the caller guarantees such rows are finite; the kernel's way of not reading them)."""
    x = torch.full((40, 32), float("nan"), device=DEV)
    maybe = torch.zeros(40, device=DEV)
    assert torch.equal(row_check_eager(x, maybe=maybe).cpu(), torch.zeros(40))
    maybe[7] = float("nan")
    assert row_check_eager(x, maybe=maybe).cpu().isnan().nonzero().flatten().tolist() == [7]
    with pytest.raises(ValueError, match="maybe"):
        row_check_eager(x, maybe=torch.zeros(39, device=DEV))


def test_flagged_config():
    for k in (1, 16, 768, 3072):
        for m in (None, 1, 3, 64, 12608):
            cfg = pick_config(k, m, flagged=True)
            bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
            assert 16 <= bk and bm * bk <= 4096 and bm <= 64 and bk & (bk - 1) == 0 and bm & (bm - 1) == 0, (k, m, cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flagged_op_compiled(dtype):
    """The op with maybe through Inductor on the CPU (its mul + sum + where lowering)."""
    x = poisoned(12, 40, dtype)
    maybe = torch.zeros(12)
    maybe[1], maybe[3], maybe[4] = float("nan"), float("nan"), float("nan")
    torch._dynamo.reset()
    g = torch.compile(lambda a, b: torch.ops.sparse_inductor.row_check(a, b))(x, maybe)
    want = flagged_reference(x, maybe)
    assert torch.equal(g.isnan(), want.isnan())
    assert torch.equal(g[~want.isnan()], torch.zeros(int((~want.isnan()).sum())))


_SM90_COMPILE = r"""
from sparse_inductor.lowering import row_check as rc
kernel = rc._row_check_kernel
names = kernel.arg_names
for flagged in (False, True):
    for k, m in ((768, 12608), (3072, 12608), (4096, 1)):
        cfg = rc.pick_config(k, m, flagged=flagged)
        sig = {n: "constexpr" for n in names}
        sig.update(x_ptr="*bf16", maybe_ptr="*fp32", g_ptr="*fp32", M="i32", K="i32", stride_xm="i32")
        consts = dict(stride_xk=1, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], HAS_MAYBE=flagged)
        attrs = {(names.index(n),): [["tt.divisibility", 16]]
                 for n in ("x_ptr", "maybe_ptr", "g_ptr", "K", "stride_xm")}
        c = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        print(json.dumps(dict(flagged=flagged, k=k, m=m, shared=c.metadata.shared,
                              branch="bra" in c.asm["ptx"], loads=c.asm["ptx"].count("ld.global"))))
"""


def test_kernels_compile_for_sm90(tmp_path):
    """Both kernels compile for sm_90a (Triton's compiler and ptxas, no GPU); the flagged one keeps
    its reads of x behind a branch (a program whose rows are unflagged loads maybe only)."""
    from sm90 import compile_rows

    rows = compile_rows(_SM90_COMPILE, tmp_path)
    assert len(rows) == 6
    for r in rows:
        assert r["shared"] <= 227 * 1024, r
        if r["flagged"]:
            assert r["branch"], r


@pytest.mark.parametrize("flagged", [False, True], ids=["plain", "flagged"])
def test_template_body_runs(tmp_path, flagged):
    """Both template bodies with Inductor's markup replaced by arguments and a tl.store (what
    Inductor renders, less its store): under the interpreter they write what the eager kernel does."""
    import importlib.util
    import re

    from sparse_inductor.lowering import row_check as rc
    from sparse_inductor.lowering.template import template_source

    body = rc._FLAGGED_BODY if flagged else rc._TEMPLATE_BODY
    body = re.sub(r"\{\{def_kernel\(.*?\)\}\}", "@triton.jit\ndef template_kernel(X, MAYBE, G, M_, K_, SXM, SXK, "
                  "BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):", body)
    for markup, arg in (('size("X", 0)', "M_"), ('size("X", 1)', "K_"), ('stride("X", 0)', "SXM"),
                        ('stride("X", 1)', "SXK")):
        body = body.replace("{{" + markup + "}}", arg)
    body = re.sub(r"^( *)\{\{store_output\(.*\}\}$", r"\1tl.store(G + idx_m, g, mask=mask)", body, flags=re.M)
    assert "{{" not in body
    path = tmp_path / f"rc_{int(flagged)}.py"
    path.write_text("import triton\nimport triton.language as tl\n" + template_source(rc.DEVICE_FUNCTIONS, body))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = poisoned(70, 40, torch.float16)
    maybe = torch.zeros(70, device=DEV)
    maybe[1::3] = float("nan")  # flags every poisoned row but one (row 4 is poisoned, unflagged)
    maybe[4] = 0.0
    cfg = pick_config(40, 70, flagged=flagged)
    got = torch.empty(70, device=DEV)
    mod.template_kernel[(triton.cdiv(70, cfg["BLOCK_M"]),)](x, maybe, got, 70, 40, x.stride(0), x.stride(1),
                                                            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"])
    want = row_check_eager(x, maybe=maybe if flagged else None)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])
    assert bool(want[4].isnan()) != flagged
