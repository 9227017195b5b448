"""sparse_inductor.inductor_pass(): the sparse rewrite as stock Inductor's post_grad_custom_pre_pass
(backend="inductor"), with and without what it needs (freezing while Dynamo traces; on the CPU,
cpp.weight_prepack=False), and the FX graph cache it must bypass."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import sparse_inductor
from sparse_inductor.report import collect
from test_backend import OP_24, OP_BLOCK, _fresh_dynamo, assert_like_eager, pruned_24, pruned_blocks, run_python  # noqa: F401

CPU_PACKING_OFF = {"cpp.weight_prepack": False}


def _model(dense: bool = False) -> nn.Module:
    """2:4 -> block 16x16 (25% of blocks; its index arrays are small enough for Inductor to inline
    them as code, which the backend prevents and this pass cannot) -> dense."""
    torch.manual_seed(0)
    a, b = nn.Linear(32, 32), nn.Linear(32, 32)
    if not dense:
        pruned_24(a), pruned_blocks(b)
    return nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), nn.Linear(32, 16))


def _run(model, options, *, freezing: bool):
    compiled = torch.compile(model, options=options)
    x = torch.randn(4, 32)
    freeze = torch._inductor.config.patch(freezing=True) if freezing else contextlib.nullcontext()
    with torch.no_grad(), freeze, collect() as sink:
        out, code = run_and_get_code(compiled, x)
        ref = model(x)
    return out, ref, "\n".join(code), sink


@pytest.mark.compat
def test_stock_inductor_with_freezing():
    model = _model()
    pass_ = sparse_inductor.inductor_pass({"force": True})
    out, ref, code, sink = _run(model, {"post_grad_custom_pre_pass": pass_, **CPU_PACKING_OFF}, freezing=True)
    assert_like_eager(out, ref)
    FileCheck().check_count(OP_24, 1, exactly=True).check_count(OP_BLOCK, 1, exactly=True).run(code)
    kernels = {d.name: (d.pattern, d.kernel) for d in sink if not isinstance(d, str)}
    assert kernels == {"0": ("2:4", "reference"), "2": ("block", "reference"), "4": ("dense", "dense")}
    assert not [n for n in sink if isinstance(n, str)]
    assert pass_.uuid() is None and counters["inductor"]["fxgraph_cache_bypass"] >= 1


def test_stock_inductor_cache_never_serves_the_sparse_graph_to_a_dense_model():
    """The hazard uuid() None avoids: frozen weights enter Inductor's cache key by shape and dtype
    only, so a dense model of the same shapes would otherwise get the sparse model's graph."""
    options = {"post_grad_custom_pre_pass": sparse_inductor.inductor_pass({"force": True}), **CPU_PACKING_OFF}
    _run(_model(), options, freezing=True)
    torch._dynamo.reset()
    out, ref, code, _ = _run(_model(dense=True), options, freezing=True)
    assert_like_eager(out, ref)
    FileCheck().check_not(OP_24).check_not(OP_BLOCK).run(code)


@pytest.mark.compat
@pytest.mark.parametrize("how", ["off", "options"])
def test_stock_inductor_without_freezing_stays_dense_and_says_why(how):
    """Freezing off, or only in torch.compile's options (Inductor gets it after Dynamo has traced
    the parameters as graph inputs): every linear stays dense, each with its reason, and a note."""
    options = {"post_grad_custom_pre_pass": sparse_inductor.inductor_pass({"force": True}), **CPU_PACKING_OFF}
    if how == "options":
        options["freezing"] = True
    model = _model()
    out, ref, code, sink = _run(model, options, freezing=False)
    assert_like_eager(out, ref)
    FileCheck().check_not(OP_24).check_not(OP_BLOCK).run(code)
    decisions = [d for d in sink if not isinstance(d, str)]
    assert len(decisions) == 3 and all(d.kernel == "dense" for d in decisions)
    assert all(d.reason.startswith("the weight is an input of the graph, not a constant: Inductor's freezing")
               for d in decisions), [d.reason for d in decisions]
    notes = [n for n in sink if isinstance(n, str)]
    assert len(notes) == 1 and notes[0].startswith("sparse_inductor: 3 weight(s) reached the pass as graph inputs")
    assert "torch._inductor.config.freezing = True" in notes[0]


def test_cpu_prepacking_is_named():
    """On the CPU, freezing packs the linears for MKL before the pass unless cpp.weight_prepack is
    off, and once a freezing compile of the process has turned that packing on, Inductor keeps it
    whatever the setting: then the backend too finds packed linears. Each time a note says so.
    In a fresh process, since the packing, once on, stays on for the rest of it."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without mkldnn: nothing is prepacked")
    got = run_python("""
        import json, torch, torch.nn as nn
        import sparse_inductor
        from sparse_inductor.report import collect
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
        sparse_inductor.prune(model[0], "2:4")
        x, out = torch.randn(4, 32), {}
        stock = {"post_grad_custom_pre_pass": sparse_inductor.inductor_pass({"force": True})}
        with torch.no_grad(), torch._inductor.config.patch(freezing=True), collect() as sink:
            y = torch.compile(model, options=stock)(x)
        out["stock"] = [d if isinstance(d, str) else d.kernel for d in sink]
        torch._dynamo.reset()
        with torch.no_grad(), collect() as sink:
            y2 = torch.compile(model, backend="sparse", options={"force": True, "fx_cache": False})(x)
        out["backend"] = [d if isinstance(d, str) else d.kernel for d in sink]
        out["close"] = bool(torch.allclose(y, model(x)) and torch.allclose(y2, model(x)))
        print(json.dumps(out))
    """)
    assert got["close"]
    for path in ("stock", "backend"):
        assert len(got[path]) == 1, got  # one note, no decision: the pass found no linear it can read
        assert "2 linear(s) reached the pass prepacked" in got[path][0] and "TORCHINDUCTOR_CPP_WEIGHT_PREPACK=0" in got[path][0]


def test_inductor_pass_rejects_inductor_settings():
    with pytest.raises(ValueError, match=r"\['freezing'\] are Inductor settings"):
        sparse_inductor.inductor_pass({"force": True, "freezing": True})
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        sparse_inductor.inductor_pass({"patterns": ("1:8",)})


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["2:4", "block"])
def test_stock_inductor_runs_the_templates_on_the_gpu(pattern):
    """Stock Inductor with the pass on CUDA: the layer runs the project's Triton template with the
    bias and ReLU in its store, without the backend's always_keep_tensor_constants. N = 448 with
    64x64 blocks: the block format's index arrays have at most 8 elements, which Inductor inlines
    as code here (the backend keeps them as buffers)."""
    from test_gpu_compile import TOL_BF16, fp64, kernel_defs, rel_err

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 448), nn.ReLU()).cuda().to(torch.bfloat16).eval()
    if pattern == "2:4":
        sparse_inductor.prune(model, "2:4")
    else:
        sparse_inductor.prune(model, "block", block=64, sparsity=0.75)
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    pass_ = sparse_inductor.inductor_pass({"force": True, "kernel": "triton"})
    compiled = torch.compile(model, options={"post_grad_custom_pre_pass": pass_})
    with torch.no_grad(), torch._inductor.config.patch(freezing=True), collect() as sink:
        out, code = run_and_get_code(compiled, x)
    code = "\n".join(code)
    assert [d.kernel for d in sink if not isinstance(d, str)] == ["triton"], [str(d) for d in sink]
    assert rel_err(out, fp64(model, x)) < TOL_BF16
    assert [d for d in kernel_defs(code) if d.startswith("triton_tem_fused_")], kernel_defs(code)
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code
