"""The rewrite's rules (options.Rules): given as options, validated with errors that name the
field, and part of the options digest, so of the pass's FX-cache key: two compiles that differ
only in a rule never share a cache entry."""
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from sparse_inductor.options import Rules, SparseOptions, resolve_options
from sparse_inductor.passes.manager import SparseGraphPass

from test_backend import FORCE, cache_model, fx_cache_on, run_sparse


def test_rules_from_options():
    assert SparseOptions().rules == Rules()
    opts = SparseOptions(rules={"derived_check": False})
    assert opts.rules == Rules(derived_check=False) and opts.rules.lib_activation
    assert SparseOptions(rules=Rules(skip_hidden=False)).rules.skip_hidden is False
    ours, inductor = resolve_options(options={"force": True, "rules": {"pointwise_producer_check": "fused"}})
    assert ours.rules.pointwise_producer_check == "fused" and inductor == {}
    # a SparseOptions given whole keeps its rules (it travels as a dict through resolve_options)
    assert resolve_options(options=opts)[0] == opts


@pytest.mark.parametrize("rules,error,match", [
    ({"derived_chek": False}, ValueError, r"unknown rule\(s\) \['derived_chek'\] in option 'rules'; the rules are "),
    ({"derived_check": "no"}, TypeError, "option 'rules.derived_check' must be True or False, got str 'no'"),
    ({"derived_lib_min_bytes": 1.5}, TypeError, "option 'rules.derived_lib_min_bytes' must be an int"),
    ({"derived_lib_min_bytes": -1}, ValueError, "option 'rules.derived_lib_min_bytes' must be >= 0, got -1"),
    ({"pointwise_producer_check": "free"}, ValueError, "unknown rules.pointwise_producer_check 'free'"),
    (["derived_check"], TypeError, "option 'rules' must be a Rules or a dict of its fields, got list"),
])
def test_rule_errors_name_the_field(rules, error, match):
    with pytest.raises(error, match=match):
        SparseOptions(rules=rules)
    with pytest.raises(error, match=match):
        resolve_options(options={"rules": rules})


def test_every_rule_enters_the_digest_and_the_uuid():
    base = SparseOptions()
    digests, uuids = {base.digest()}, {SparseGraphPass(base, "weights").uuid()}
    for f in dataclasses.fields(Rules):
        default = getattr(Rules(), f.name)
        other = {bool: lambda v: not v, int: lambda v: v + 1, str: lambda v: "fused"}[type(default)](default)
        opts = SparseOptions(rules={f.name: other})
        digests.add(opts.digest())
        uuids.add(SparseGraphPass(opts, "weights").uuid())
    assert len(digests) == len(uuids) == 1 + len(dataclasses.fields(Rules))


def _cache_status(m, x, rules) -> str:
    before = dict(counters["inductor"])
    torch._dynamo.reset()
    run_sparse(m, (x,), options={**FORCE, "rules": rules}, bypass_cache=False)
    delta = {k: counters["inductor"][k] - before.get(k, 0)
             for k in ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")}
    assert sum(delta.values()) == 1, delta
    return next(k for k, v in delta.items() if v).replace("fxgraph_cache_", "")


def test_compiles_differing_in_a_rule_do_not_share_an_fx_cache_entry(tmp_path):
    """The same model compiled with the FX graph cache on: a second compile with the same rules hits,
    one with a rule switched misses (its graph would be the same here; the key must still differ),
    and then hits in its turn."""
    x = torch.randn(4, 16)
    with fx_cache_on(tmp_path):
        assert _cache_status(cache_model(0, True), x, {}) == "miss"
        assert _cache_status(cache_model(0, True), x, {}) == "hit"
        assert _cache_status(cache_model(0, True), x, {"derived_check": False}) == "miss"
        assert _cache_status(cache_model(0, True), x, {"derived_check": False}) == "hit"
