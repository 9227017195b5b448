"""The decision records for notebooks and traces: LayerDecision.to_dict(), Report.to_dict() /
to_markdown(), and the TORCH_TRACE artifact the pass manager writes for each compile."""
from __future__ import annotations

import hashlib
import json

import expecttest
import torch
import torch.nn as nn

import sparse_inductor
from sparse_inductor import report as report_mod
from sparse_inductor.report import SCHEMA_VERSION, TRACE_ARTIFACT, LayerDecision, Report
from test_backend import _fresh_dynamo, run_python  # noqa: F401  (autouse: a fresh Dynamo per test)


def _decisions() -> list[LayerDecision]:
    return [
        LayerDecision("blocks.0.fc1", (64, 32), "bfloat16", "2:4", None, 0.5, "cusparselt", ("bias", "relu"),
                      "2:4; measured 1.31x", m=8192, dense_us=130.0, sparse_us=99.2,
                      candidates={"dense": 130.0, "cusparselt": 99.2, "triton": None}, params={"alg_id": 20, "split_k": 1},
                      measured=True, row_check="own kernel"),
        LayerDecision("head", (16, 64), "float32", "block", 16, 0.25, "dense", (), "kept dense | slower", m=None),
    ]


def test_layer_decision_to_dict_is_json_and_complete():
    d = _decisions()[0].to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON as it stands: tuples are lists, nothing else to convert
    assert d["shape"] == [64, 32] and d["fused"] == ["bias", "relu"] and d["sparse"] is True
    assert d["candidates"] == {"dense": 130.0, "cusparselt": 99.2, "triton": None}
    assert d["params"] == {"alg_id": 20, "split_k": 1} and d["row_check"] == "own kernel" and d["m"] == 8192
    fields = {f.name for f in __import__("dataclasses").fields(LayerDecision)}
    assert set(d) == fields | {"sparse"}
    # NaN (a weight never read) is null: strict JSON, which tlparse's parser requires
    unread = LayerDecision("x", (4, 4), "float32", "dense", None, float("nan"), "dense", (), "not frozen")
    assert unread.to_dict()["density"] is None and "NaN" not in json.dumps(Report([unread]).to_dict())
    # a parameter JSON cannot hold (a dtype) comes out as its str
    odd = LayerDecision("x", (4, 4), "float16", "2:4", None, 0.5, "triton", (), "", params={"acc": torch.float32})
    assert odd.to_dict()["params"] == {"acc": "torch.float32"}


def test_report_to_dict():
    r = Report(_decisions(), ["sparse_inductor: a note"])
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["schema_version"] == SCHEMA_VERSION and d["sparse"] == 1 and d["total"] == 2
    assert [x["name"] for x in d["layers"]] == ["blocks.0.fc1", "head"] and d["notes"] == ["sparse_inductor: a note"]
    assert Report.from_records([*_decisions(), "n"]).to_dict()["notes"] == ["n"]


class TestMarkdown(expecttest.TestCase):
    def test_to_markdown(self):
        self.assertExpectedInline(Report(_decisions(), ["note | one"]).to_markdown(), """\
| layer | N x K | dtype | pattern | density | kernel | fused | timed (M) | reason |
|---|---|---|---|---|---|---|---|---|
| blocks.0.fc1 | 64x32 | bfloat16 | 2:4 | 0.500 | cusparselt(alg_id=20, split_k=1) | bias,relu; row check: own kernel | dense 130.0 us, cusparselt 99.2 us, triton n/a (M=8192) | 2:4; measured 1.31x |
| head | 16x64 | float32 | block 16x16 | 0.250 | dense | - | - | kept dense \\| slower |

1 of 2 linear(s) run sparse

- note \\| one""")


def test_trace_is_lazy_without_torch_trace(monkeypatch):
    """Without a trace handler, trace_decisions builds nothing (the payload function is never
    called). Torch's own trace handler removes itself at its first record where TORCH_TRACE is
    unset; pytest's log capture adds handlers of its own, so the test takes them all away."""
    from torch._logging._internal import trace_log

    monkeypatch.setattr(trace_log, "handlers", [])

    def boom(*a, **k):
        raise AssertionError("payload built without a trace")

    monkeypatch.setattr(Report, "from_records", boom)
    report_mod.trace_decisions(_decisions())


def _artifacts(log_text: str, name: str) -> list[tuple[dict, str]]:
    """(metadata, payload) of each structured-trace record of artifact `name` in a TORCH_TRACE log:
    a glog-prefixed JSON line, then the payload's lines, each after a tab."""
    out, lines = [], log_text.splitlines()
    for i, line in enumerate(lines):
        if "{" not in line:
            continue
        try:
            meta = json.loads(line[line.index("{"):])
        except ValueError:
            continue
        if meta.get("artifact", {}).get("name") != name:
            continue
        payload = []
        for nxt in lines[i + 1:]:
            if not nxt.startswith("\t"):
                break
            payload.append(nxt[1:])
        out.append((meta, "\n".join(payload)))
    return out


def test_torch_trace_artifact(tmp_path):
    """A compile under TORCH_TRACE writes the decisions table into the compile's frame [0/0].
    fx_cache=False: on an FX graph cache hit the pass does not run and writes nothing."""
    trace_dir = tmp_path / "trace"
    got = run_python(f"""
        import json, torch, torch.nn as nn
        import sparse_inductor
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
        sparse_inductor.prune(model[0], "2:4")
        sparse_inductor.prune(model[2], "block", block=16, sparsity=0.75)
        compiled = torch.compile(model, backend="sparse", options={{"force": True, "fx_cache": False}})
        with torch.inference_mode():
            x = torch.randn(4, 32)
            print(json.dumps({{"equal": torch.equal(compiled(x), model(x))}}))
    """, env={"TORCH_TRACE": str(trace_dir), "TRITON_INTERPRET": "1"})
    assert got == {"equal": True}
    logs = list(trace_dir.iterdir())
    assert len(logs) == 1, logs
    found = _artifacts(logs[0].read_text(), TRACE_ARTIFACT)
    assert len(found) == 1, found
    meta, payload = found[0]
    assert meta["artifact"] == {"name": TRACE_ARTIFACT, "encoding": "json"}
    assert (meta["frame_id"], meta["frame_compile_id"]) == (0, 0)  # inside the compile's frame
    assert meta["has_payload"] == hashlib.md5(payload.encode()).hexdigest()
    table = json.loads(payload)
    assert table["schema_version"] == SCHEMA_VERSION and table["sparse"] == 2 and table["total"] == 3
    rows = {d["name"]: d for d in table["layers"]}
    assert set(rows) == {"0", "2", "4"}
    assert (rows["0"]["pattern"], rows["0"]["kernel"], rows["0"]["shape"], rows["0"]["m"]) == ("2:4", "reference", [32, 32], 4)
    assert (rows["2"]["pattern"], rows["2"]["block"], rows["2"]["density"]) == ("block", 16, 0.25)
    assert rows["4"]["kernel"] == "dense" and rows["4"]["reason"].startswith("not 2:4")
    assert all(set(d) == set(rows["0"]) for d in table["layers"])
    assert rows["0"]["fused"] == ["transpose", "bias"]


def test_nested_collect():
    """A collect() inside another (the pass manager's inside explain's) gets what is recorded while
    it is open; the outer one gets everything, and both close whatever their contents."""
    from sparse_inductor.report import collect, record

    with collect() as outer:
        record(_decisions()[1])
        with collect() as inner:
            record(_decisions()[0])
        record(_decisions()[1])
    assert [d.name for d in outer] == ["head", "blocks.0.fc1", "head"] and [d.name for d in inner] == ["blocks.0.fc1"]
    assert not report_mod._sinks()
