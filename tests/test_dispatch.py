"""The dispatcher's decision rules (measured and modelled) and the on-disk timing cache, on CPU.

Timings are injected: the rules must hold for any numbers, and the GPU tests
(test_gpu_cusparselt.py) check the real timer on the H100.
"""
import json

import pytest
import torch

from sparse_inductor import measure
from sparse_inductor.dispatch import BUCKET_TOLERANCE, choose, m_buckets
from sparse_inductor.options import SparseOptions
from sparse_inductor.registry import KernelSpec, Layer
from sparse_inductor.report import LayerDecision


@pytest.fixture(autouse=True)
def _cusparselt_runnable(monkeypatch):
    """The rules are about the numbers: let the cuSPARSELt family pass its guard on CPU."""
    from sparse_inductor.runtime import cusparselt

    monkeypatch.setattr(cusparselt, "available", lambda: True)


def layer(m=4096, static=True, n=4096, k=4096):
    return Layer("2:4", m, n, k, torch.bfloat16, "cuda", device_name="NVIDIA H100 80GB HBM3", m_static=static)


def fake_timer(table):
    """table: {kernel: us or {m: us}}; a missing kernel cannot be timed."""
    calls = []

    def timer(name, m):
        calls.append((name, m))
        t = table.get(name)
        if isinstance(t, dict):
            t = t.get(m)
        return None if t is None else (float(t), {"alg_id": 7} if name == "cusparselt" else {})

    timer.calls = calls
    return timer


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.bfloat16, torch.float32])
def test_modelled_times_for_every_operand_dtype(dtype):
    """The roofline estimates take 8-bit layers too (the dense estimate read torch.finfo, which
    int8 has not: the rewrite of an int8 layer on a GPU failed with a TypeError)."""
    from sparse_inductor.lowering import triton_24, triton_block
    from sparse_inductor.registry import dense_us, device_model

    ly = Layer("2:4", 16, 4096, 4096, dtype, "cuda", device_name="NVIDIA H100 80GB HBM3")
    d = dense_us(ly)
    assert d is not None and d > 0
    assert triton_24._estimate_us(ly, device_model(ly)) > 0
    blk = Layer("block", 16, 4096, 4096, dtype, "cuda", device_name="NVIDIA H100 80GB HBM3", block=64, block_density=0.1)
    assert triton_block._estimate_us(blk, device_model(blk)) > 0


def test_measured_picks_the_fastest_sparse_kernel():
    c = choose(layer(), SparseOptions(), fake_timer({"dense": 100, "triton": 90, "cusparselt": 70}))
    assert c.kernel == "cusparselt" and c.measured and c.params == {"alg_id": 7}
    assert c.candidates == {"dense": 100.0, "triton": 90.0, "cusparselt": 70.0}
    assert "measured 1.43x" in c.reason


def test_measured_margin_keeps_dense():
    # 4% faster is below the default 5% margin
    c = choose(layer(), SparseOptions(), fake_timer({"dense": 100, "triton": 120, "cusparselt": 96.2}))
    assert c.kernel == "dense" and "not measured faster" in c.reason
    c = choose(layer(), SparseOptions(min_speedup=1.01), fake_timer({"dense": 100, "cusparselt": 96.2}))
    assert c.kernel == "cusparselt"


def test_measured_force_takes_the_fastest_sparse_even_if_slower():
    c = choose(layer(), SparseOptions(force=True), fake_timer({"dense": 10, "triton": 30, "cusparselt": 20}))
    assert c.kernel == "cusparselt" and c.reason.startswith("forced")


def test_pinned_kernel_is_the_only_candidate():
    t = fake_timer({"dense": 100, "triton": 50, "cusparselt": 40})
    c = choose(layer(), SparseOptions(kernel="triton"), t)
    assert c.kernel == "triton" and "cusparselt" not in {n for n, _ in t.calls}


def test_experimental_family_is_offered_only_where_named(monkeypatch):
    """The CUTLASS family (KernelSpec.experimental) is never timed by default; options experimental
    or kernel name it."""
    from sparse_inductor.lowering import cutlass_24

    monkeypatch.setattr(cutlass_24.rt, "available", lambda device=None: None)  # (as on an H100 with nvcc)
    table = {"dense": 100, "triton": 90, "cusparselt": 80, "cutlass": 50}
    t = fake_timer(table)
    c = choose(layer(), SparseOptions(), t)
    assert c.kernel == "cusparselt" and "cutlass" not in {n for n, _ in t.calls} and "cutlass" not in c.candidates
    for opts in (SparseOptions(experimental=("cutlass",)), SparseOptions(kernel="cutlass")):
        t = fake_timer(table)
        c = choose(layer(), opts, t)
        assert "cutlass" in {n for n, _ in t.calls}, (opts, c)
    with pytest.raises(TypeError, match="experimental"):
        SparseOptions(experimental="cutlass")


def test_untimeable_kernel_is_skipped_and_untimeable_dense_falls_back_to_the_model():
    c = choose(layer(), SparseOptions(), fake_timer({"dense": 100, "triton": 50}))
    assert c.kernel == "triton" and c.candidates["cusparselt"] is None
    c = choose(layer(), SparseOptions(), fake_timer({"triton": 50}))
    assert not c.measured and c.dense_us is not None  # the roofline's estimate


def test_dispatch_model_never_times():
    t = fake_timer({"dense": 100, "cusparselt": 10})
    c = choose(layer(), SparseOptions(dispatch="model"), t)
    assert not t.calls and not c.measured


def test_dynamic_m_must_not_lose_at_any_bucket():
    ly = layer(m=4096, static=False)
    ms = m_buckets(ly)
    assert ms[0] == 4096 and 1 in ms and len(set(ms)) == len(ms)
    dense = {m: 100.0 for m in ms}
    wins_everywhere = {m: 80.0 for m in ms}
    loses_at_1 = {**wins_everywhere, 1: 100.0 * BUCKET_TOLERANCE * 1.5}
    assert choose(ly, SparseOptions(), fake_timer({"dense": dense, "cusparselt": wins_everywhere})).kernel == "cusparselt"
    c = choose(ly, SparseOptions(), fake_timer({"dense": dense, "cusparselt": loses_at_1}))
    assert c.kernel == "dense" and "another batch size" in c.reason
    assert m_buckets(layer(m=16)) == [16]


def test_decision_line_shows_times_and_params():
    d = LayerDecision("fc", (4096, 4096), "bfloat16", "2:4", None, 0.5, "cusparselt", ("bias",), "why", 4096,
                      100.0, 70.0, {"dense": 100.0, "cusparselt": 70.0, "triton": None}, {"alg_id": 7}, True)
    line = d.line()
    assert "cusparselt(alg_id=7)" in line and "dense 100.0 us, cusparselt 70.0 us, triton n/a" in line


def test_options_dispatch_validated():
    with pytest.raises(ValueError, match="unknown dispatch"):
        SparseOptions(dispatch="fastest")


# ---- the timer and its disk cache, with a fake kernel family on CPU tensors

def _spec(calls):
    def runner(t, bias, ly, params):
        calls.append(params["v"])
        if params["v"] == 3:
            raise RuntimeError("this variant cannot run")
        return lambda x: x @ t["w"].t()

    return KernelSpec("fake", "2:4", ("cuda",), lambda ly: None, lambda ly, m: None, runner=runner,
                      variants=lambda ly, t: [{"v": v} for v in (1, 2, 3)])


def test_timer_picks_the_best_variant_and_caches_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv(measure.ENV_CACHE_DIR, str(tmp_path))
    speeds = iter([50.0, 40.0, 30.0])  # dense, variant 1, variant 2 (3 fails before timing)
    monkeypatch.setattr(measure, "time_us", lambda fn, count_host: (fn(), next(speeds))[1])
    w = torch.randn(32, 64)
    ly = Layer("2:4", 8, 32, 64, torch.float32, "cpu")
    calls = []
    spec = _spec(calls)
    made = []

    def tensors(s):
        made.append(s.name)
        return {"w": w}

    timer = measure.LayerTimer(ly, w, False, SparseOptions(), {"fake": spec}, tensors)
    assert timer("dense", 8) == (50.0, {})
    assert timer("fake", 8) == (30.0, {"v": 2})
    data = json.loads((tmp_path / "timings.json").read_text())
    assert len(data) == 2 and any("|fake|" in k for k in data)

    def boom(*a, **k):
        raise AssertionError("timed again despite the cache")

    monkeypatch.setattr(measure, "time_us", boom)
    measure.CACHE.path = None  # as a new process would: read the file again
    again = measure.LayerTimer(ly, w, False, SparseOptions(), {"fake": spec}, tensors)
    assert again("fake", 8) == (30.0, {"v": 2}) and again("dense", 8) == (50.0, {})
    # another M is another key; a failure to time is reported as None and cached as such
    assert again("fake", 16) is None


def test_timer_key_separates_what_changes_the_time(tmp_path, monkeypatch):
    monkeypatch.setenv(measure.ENV_CACHE_DIR, str(tmp_path))
    w = torch.randn(32, 64)
    base = dict(w=w, has_bias=False, opts=SparseOptions(), specs={}, tensors=lambda s: {})
    k = measure.LayerTimer(Layer("2:4", 8, 32, 64, torch.float32, "cpu"), **base).key("fake", 8)
    others = [
        measure.LayerTimer(Layer("2:4", 8, 32, 64, torch.float16, "cpu"), **base).key("fake", 8),
        measure.LayerTimer(Layer("2:4", 8, 32, 64, torch.float32, "cpu"), **dict(base, has_bias=True)).key("fake", 8),
        measure.LayerTimer(Layer("2:4", 8, 32, 64, torch.float32, "cpu"),
                           **dict(base, opts=SparseOptions(mode="reduce-overhead"))).key("fake", 8),
        measure.LayerTimer(Layer("2:4", 8, 32, 64, torch.float32, "cpu"), **base).key("fake", 16),
        measure.LayerTimer(Layer("2:4", 8, 32, 64, torch.float32, "cpu"), **base, structure="density=0.1").key("fake", 8),
        # int8 x int8: the library's output dtype changes its best algorithm (an int32-timed alg id
        # reused for a bf16 output ran 1.9x slower on the H100), so the two forms are timed apart
        measure.LayerTimer(Layer("2:4", 8, 32, 64, torch.int8, "cpu", product=torch.int32), **base).key("fake", 8),
        measure.LayerTimer(Layer("2:4", 8, 32, 64, torch.int8, "cpu", product=torch.bfloat16), **base).key("fake", 8),
    ]
    assert len({k, *others}) == 8
    assert torch.__version__ in k


def test_a_candidate_that_computes_something_else_is_dropped_with_the_reason(tmp_path, monkeypatch):
    """Checked against fp64 before it is timed: a wrong variant is not timed, a right one is."""
    monkeypatch.setenv(measure.ENV_CACHE_DIR, str(tmp_path))
    timed = []
    monkeypatch.setattr(measure, "time_us", lambda fn, count_host: (timed.append(1), 10.0)[1])
    w = torch.randn(32, 64)
    ly = Layer("2:4", 8, 32, 64, torch.float32, "cpu")

    def runner(t, bias, ly, params):
        if params["v"] == "transposed-meta":  # a layout mix-up: the right shape, the wrong numbers
            return lambda x: x @ t["w"].flip(1).t()
        if params["v"] == "nan":
            return lambda x: torch.full((x.shape[0], 32), float("nan"))
        return lambda x: x @ t["w"].t()

    def spec(variants):
        return KernelSpec("fake", "2:4", ("cuda",), lambda ly: None, lambda ly, m: None, runner=runner,
                          variants=lambda ly, t: [{"v": v} for v in variants])

    bad = measure.LayerTimer(ly, w, False, SparseOptions(), {"fake": spec(["transposed-meta", "nan"])},
                             lambda s: {"w": w})
    assert bad("fake", 8) is None and timed == []
    assert "wrong result: relative error" in bad.failures["fake"] and "M=8" in bad.failures["fake"]
    good = measure.LayerTimer(ly, w, False, SparseOptions(), {"fake": spec(["nan", "right"])},
                              lambda s: {"w": w})
    assert good("fake", 16) == (10.0, {"v": "right"}) and timed == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_output_passes_a_correct_rounding_and_fails_a_perturbed_one(dtype):
    torch.manual_seed(0)
    x, w, b = (torch.randn(100, 64).to(dtype), torch.randn(48, 64).to(dtype), torch.randn(48).to(dtype))
    y = (x.double() @ w.double().t() + b.double()).to(dtype)  # the exact result, rounded once
    assert measure.check_output(y, x, w, b) is None
    assert "wrong result" in measure.check_output(y * 1.1, x, w, b)
    assert "wrong output shape" in measure.check_output(y[:, :47], x, w, b)
    y[0, 5] = float("inf")  # row 0 is always among the checked rows
    assert "non-finite" in measure.check_output(y, x, w, b)
