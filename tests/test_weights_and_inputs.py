"""What a compiled model does when its weights change after compile, which tensors are frozen at
all, and how the backend validates what it is given (options, environment, grad mode), on CPU.

The compiled model must never answer with a mix of compile-time and current weights: by default a
change seen at call time (PyTorch's version counter, the tensor's identity, its data pointer)
makes that call run the captured graph eagerly with the new values and the frame compile again;
options on_weight_change="raise" raises, "ignore" computes with the compile-time values everywhere.
Outputs are compared with eager in the same dtype: on CPU the reference kernel does eager's
arithmetic on the same values (tests/test_backend.py, TOLERANCES "eager": bitwise equal).
"""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sparse_inductor
from sparse_inductor import backend as backend_mod
from sparse_inductor.options import ENV_DISABLE, ENV_FORCE, SparseOptions, disabled_by_env, resolve_options
from sparse_inductor.prune import prune_24_
from sparse_inductor.report import LayerDecision, collect

FORCE = {"force": True}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """A fresh Dynamo, and no FX graph cache: on a hit the passes do not run and record nothing."""
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


def pruned(lin: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        prune_24_(lin.weight)
    return lin


class MLP(nn.Module):
    """A 2:4 layer between two dense ones (the dense layers alias the parameters they read)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(16, 32)
        self.fc = pruned(nn.Linear(32, 32))
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.inp(x))))


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def decisions(sink: list) -> list[LayerDecision]:
    return [d for d in sink if isinstance(d, LayerDecision)]


def notes(sink: list) -> list[str]:
    return [d for d in sink if isinstance(d, str)]


# ---------------------------------------------------------------- weights that change after compile

@pytest.mark.compat
def test_load_state_dict_after_compile():
    m, other = MLP(0).eval(), MLP(1).eval()
    x = torch.randn(4, 16)
    compiled = torch.compile(m, backend="sparse", options=FORCE)
    with torch.no_grad(), collect() as sink:
        same(compiled(x), m(x))
        m.load_state_dict(other.state_dict())
        same(compiled(x), other(x))  # this call: the graph run eagerly with the new weights
        same(compiled(x), other(x))  # the next: compiled again, with them
        sparse = [d for d in decisions(sink) if d.name == "fc"]
    assert len(sparse) == 2 and all(d.kernel == "reference" for d in sparse)  # sparse before and after
    assert counters["sparse_inductor"]["weights_changed"] == 1
    assert any("changed after compilation" in n and "fc.weight" in n for n in notes(sink)), notes(sink)


@pytest.mark.compat
@pytest.mark.parametrize("which", ["fc.weight", "inp.bias", "out.weight"])
def test_in_place_mul_after_compile(which):
    m = MLP().eval()
    x = torch.randn(4, 16)
    compiled = torch.compile(m, backend="sparse", options=FORCE)
    with torch.no_grad():
        compiled(x)
        m.get_parameter(which).mul_(2)
        same(compiled(x), m(x))
        same(compiled(x), m(x))


def test_optimizer_step_between_evaluations():
    m = MLP()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, target = torch.randn(4, 16), torch.randn(4, 8)
    compiled = torch.compile(m, backend="sparse", options=FORCE)
    for _ in range(2):
        m.eval()
        with torch.no_grad():
            same(compiled(x), m(x))
        m.train()
        loss = F.mse_loss(m(x), target)  # eager training step
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        same(compiled(x), m(x))


def test_new_batch_size_after_a_change_agrees_with_the_old_one():
    """Graphs compiled for two batch sizes, then the weights change: both answer with the new ones."""
    m, other = MLP(0).eval(), MLP(1).eval()
    x4, x7 = torch.randn(4, 16), torch.randn(7, 16)
    compiled = torch.compile(m, backend="sparse", options=FORCE, dynamic=False)
    with torch.no_grad():
        compiled(x4)
        m.load_state_dict(other.state_dict())
        same(compiled(x7), other(x7))
        same(compiled(x4), other(x4))
        same(compiled(x7), other(x7))


def test_parameter_object_replaced():
    m = MLP().eval()
    x = torch.randn(3, 16)
    compiled = torch.compile(m, backend="sparse", options=FORCE)
    with torch.no_grad():
        compiled(x)
        m.fc.weight = nn.Parameter(prune_24_(torch.randn(32, 32)))
        same(compiled(x), m(x))
        m.fc.weight.data = torch.randn(32, 32)  # a new tensor behind the same Parameter: a new data pointer
        same(compiled(x), m(x))


@pytest.mark.compat
def test_on_weight_change_raise_names_the_parameter():
    m = MLP().eval()
    x = torch.randn(3, 16)
    compiled = torch.compile(m, backend="sparse", options={**FORCE, "on_weight_change": "raise"})
    with torch.no_grad():
        compiled(x)
        m.fc.weight.mul_(2)
        with pytest.raises(sparse_inductor.WeightsChangedError, match=r"fc\.weight changed after compilation"):
            compiled(x)


def test_on_weight_change_ignore_keeps_every_weight_of_compile_time():
    """Freezing semantics, consistently: dense layers and biases too keep their compile-time values."""
    m = MLP().eval()
    x = torch.randn(3, 16)
    compiled = torch.compile(m, backend="sparse", options={**FORCE, "on_weight_change": "ignore"})
    with torch.no_grad():
        before = compiled(x)
        expected = m(x)
        for p in m.parameters():
            p.mul_(2)
        same(compiled(x), before)
        same(before, expected)
    assert counters["sparse_inductor"]["weights_changed"] == 0


def test_buffer_written_by_the_graph_stays_an_input():
    """A buffer the model writes to (a counter, a cache) is not frozen, and is not a 'change'."""
    class Counting(MLP):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return super().forward(x)

    m = Counting().eval()
    x = torch.randn(2, 16)
    compiled = torch.compile(m, backend="sparse", options=FORCE)
    with torch.no_grad():
        for _ in range(3):
            out = compiled(x)
    assert m.calls.item() == 3
    m.calls.zero_()
    with torch.no_grad():
        same(out, m(x))
    assert counters["sparse_inductor"]["weights_changed"] == 0
    assert counters["stats"]["unique_graphs"] == 1


def test_unchanged_weights_compile_once():
    m = MLP().eval()
    compiled = torch.compile(m, backend="sparse", options=FORCE)
    with torch.no_grad():
        for _ in range(3):
            compiled(torch.randn(3, 16))
    assert counters["sparse_inductor"]["weights_changed"] == 0
    assert counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------- what is frozen

@pytest.mark.compat
def test_parameter_passed_as_an_argument_stays_an_input():
    w = nn.Parameter(prune_24_(torch.randn(32, 16)))
    b = nn.Parameter(torch.randn(32))

    def f(x, w, b):
        return F.linear(x, w, b)

    compiled = torch.compile(f, backend="sparse", options=FORCE)
    x = torch.randn(4, 16)
    with torch.no_grad(), collect() as sink:
        same(compiled(x, w, b), f(x, w, b))
        w.mul_(1.5)
        same(compiled(x, w, b), f(x, w, b))
    (d,) = decisions(sink)
    assert d.kernel == "dense" and "argument of the compiled function" in d.reason, d.line()
    assert counters["stats"]["unique_graphs"] == 1  # read as an input: nothing to recompile


def test_functional_call_with_tensors_of_its_own():
    m = pruned(nn.Linear(16, 32)).eval()
    params = {k: v.detach().clone() for k, v in m.named_parameters()}

    def f(params, x):
        return torch.func.functional_call(m, params, (x,))

    x = torch.randn(4, 16)
    with torch.inference_mode(), collect() as sink:
        same(torch.compile(f, backend="sparse", options=FORCE)(params, x), f(params, x))
    (d,) = decisions(sink)
    assert d.kernel == "dense" and "no_grad" not in d.reason and "functional_call" in d.reason, d.line()


def test_layers_in_cond_branches_get_a_true_reason():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = pruned(nn.Linear(16, 24)), pruned(nn.Linear(16, 24))

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: self.a(x), lambda x: self.b(x), (x,))

    m = Branches().eval()
    report = sparse_inductor.explain(m, torch.randn(4, 16), options=FORCE)
    assert len(report) == 2
    for d in report:
        assert d.kernel == "dense" and "no_grad" not in d.reason and "control-flow branch" in d.reason, d.line()


def test_freezing_false_is_honoured():
    m = MLP().eval()
    x = torch.randn(3, 16)
    compiled = torch.compile(m, backend="sparse", options={**FORCE, "freezing": False})
    with torch.no_grad(), collect() as sink:
        same(compiled(x), m(x))
        m.fc.weight.mul_(2)
        same(compiled(x), m(x))  # nothing frozen: the weights are read as inputs on every call
    assert [d.kernel for d in decisions(sink)] == ["dense"] * 3
    assert all("freezing=False" in d.reason for d in decisions(sink))


def test_matmuls_of_a_module_named_like_a_linear_are_not_layers():
    class LinearAttention(nn.Module):  # not an nn.Linear: q @ k^T multiplies two activations
        def forward(self, q, k):
            return torch.softmax(q @ k.transpose(-1, -2), -1) @ k

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.proj = LinearAttention(), pruned(nn.Linear(8, 8))

        def forward(self, q, k):
            return self.proj(self.attn(q, k))

    report = sparse_inductor.explain(Model().eval(), torch.randn(5, 8), torch.randn(5, 8), options=FORCE)
    assert [d.name for d in report] == ["proj"], str(report)


# ---------------------------------------------------------------- explain under threads

def _two_layer(n_in: int, name: str) -> nn.Module:
    m = nn.Sequential()
    m.add_module(name, pruned(nn.Linear(n_in, 16)))
    return m.eval()


def test_explain_in_another_thread_records_nothing_here():
    result = {}
    with collect() as mine:
        t = threading.Thread(target=lambda: result.setdefault("r", sparse_inductor.explain(
            _two_layer(8, "theirs"), torch.randn(2, 8), options=FORCE)))
        t.start()
        t.join()
    assert mine == []
    assert [d.name for d in result["r"]] == ["theirs"]


def test_concurrent_explains_get_their_own_layers():
    models = {f"layer{i}": _two_layer(8 + 4 * i, f"layer{i}") for i in range(3)}
    reports, errors = {}, []
    start = threading.Barrier(len(models))

    def go(name):
        try:
            start.wait()
            reports[name] = sparse_inductor.explain(models[name], torch.randn(2, models[name][0].in_features),
                                                    options=FORCE)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(n,)) for n in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, report in reports.items():
        assert [d.name for d in report] == [name], str(report)


# ---------------------------------------------------------------- grad mode

def test_grad_mode_warns_once_for_sparse_weights(monkeypatch):
    monkeypatch.setattr(backend_mod, "_grad_warned", False)
    m = MLP().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(m, backend="sparse")(torch.randn(2, 16))
        torch._dynamo.reset()
        torch.compile(MLP(1).eval(), backend="sparse")(torch.randn(2, 16))
    said = [str(w.message) for w in caught if "grad is enabled" in str(w.message)]
    assert len(said) == 1 and "fc.weight is 2:4 sparse" in said[0], said


def test_grad_mode_does_not_warn_for_dense_weights(monkeypatch):
    monkeypatch.setattr(backend_mod, "_grad_warned", False)
    m = nn.Sequential(nn.Linear(16, 16)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(m, backend="sparse")(torch.randn(2, 16))
    assert not [w for w in caught if "grad is enabled" in str(w.message)]


# ---------------------------------------------------------------- options and environment

@pytest.mark.parametrize("field,value,error", [
    ("min_speedup", "fast", TypeError),
    ("block_sizes", 64, TypeError),
    ("block_sizes", (64, "32"), TypeError),
    ("force", "false", TypeError),
    ("force", 1, TypeError),
    ("fuse_mlp", "yes", TypeError),
    ("fx_cache", None, TypeError),
    ("patterns", "2:4", TypeError),
    ("max_block_density", True, TypeError),
    ("nonfinite", 0, TypeError),
    ("kernel", 3, TypeError),
    ("on_weight_change", "reload", ValueError),
    ("max_block_density", 1.5, ValueError),
])
def test_option_errors_name_the_option(field, value, error):
    with pytest.raises(error, match=field):
        resolve_options(None, {field: value})


def test_good_options_pass():
    opts, _ = resolve_options(None, {"block_sizes": [64, 32], "patterns": ["2:4"], "min_speedup": 1,
                                     "on_weight_change": "ignore"})
    assert opts.block_sizes == (64, 32) and opts.patterns == ("2:4",) and opts.on_weight_change == "ignore"
    assert SparseOptions().on_weight_change == "recompile"


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
                                      ("0", False), ("false", False), ("No", False), ("off", False), ("", False)])
def test_environment_switches(monkeypatch, value, on):
    monkeypatch.setenv(ENV_DISABLE, value)
    assert disabled_by_env() is on
    monkeypatch.setenv(ENV_FORCE, value)
    assert resolve_options(None, {})[0].force is on


@pytest.mark.parametrize("name", [ENV_DISABLE, ENV_FORCE])
@pytest.mark.parametrize("value", ["maybe", "2", "disable"])
def test_environment_switch_rejects_other_values(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        disabled_by_env() if name == ENV_DISABLE else resolve_options(None, {})


def test_disable_false_compiles_with_the_pass(monkeypatch):
    monkeypatch.setenv(ENV_DISABLE, "false")
    with torch.no_grad(), collect() as sink:
        torch.compile(MLP().eval(), backend="sparse", options=FORCE)(torch.randn(2, 16))
    assert any(d.kernel == "reference" for d in decisions(sink))
