"""The bench's summary of its targets (bench.target_summary): pure bookkeeping over rows."""
from sparse_inductor.bench import TARGETS, target_summary


def test_summary_reports_met_and_missed_and_skips_absent_cases():
    rows = [
        dict(section="block", M=8192, N=14336, K=4096, block=64, sparsity=0.8, dense=1250.0, compiled=520.0),
        dict(section="block", M=8192, N=14336, K=4096, block=64, sparsity=0.9, dense=1250.0, compiled=300.0),
        dict(section="quant", model="llama8 int8 woq 2:4 decode b1", dense_compile=800.0, sparse=350.0),
    ]
    out = target_summary(rows).splitlines()
    assert out[0].startswith("| group |") and len(out) == 5
    assert "| block | block 80%, M=8192 | 2.40x | >= 2.50x | no |" in out
    assert "| block | block 90%, M=8192 | 4.17x | >= 3.50x | yes |" in out
    assert any(line.startswith("| 8-bit | 8 Llama MLP blocks, int8") and line.endswith("| yes |") for line in out)


def test_e2e_takes_the_best_mode_measured_and_exact_names_only():
    rows = [dict(section="e2e", model="vit_base_patch16_224 batch 64, every linear 2:4", dense_compile=None,
                 sparse=None, dense_ro=6080.8, sparse_ro=5561.7),
            dict(section="e2e", model="vit_huge_patch14_224 batch 32, every linear 2:4 (nonfinite=fast)",
                 dense_ro=100.0, sparse_ro=10.0)]
    out = target_summary(rows)
    assert "| 2:4 | ViT-B/16 b64, every linear 2:4 | 1.09x (RO) | >= 1.10x | no |" in out
    assert "ViT-H" not in out  # a run with other backend options does not count


def test_compose_needs_strictly_faster_and_empty_without_rows():
    rows = [dict(section="compose", model="vit_huge_patch14_224", batch=32, **{"2:4_bf16": 100.0, "int8_dense": 130.0,
                                                                               "int8_+_2:4": 100.0})]
    out = target_summary(rows)
    assert "| 1.00x | > 1.00x | no |" in out and "| 1.30x | > 1.00x | yes |" in out
    assert target_summary([]) == ""
    assert {t[0] for t in TARGETS} == {"block", "2:4", "8-bit", "CUTLASS"}


def test_cutlass_single_linears_by_gpu_time_and_models_by_call_time():
    rows = [dict(section="cutlass", case="linear", N=14336, K=4096, M=16, dense_gpu=45.0, choice_gpu=30.0,
                 dense_ro=70.0, choice_ro=90.0),
            dict(section="cutlass", case="llama_mlp", M=16, dense_gpu=1000.0, choice_gpu=600.0, dense_ro=1050.0,
                 choice_ro=726.0),
            dict(section="cutlass", case="int8_act", M=8192, N=14336, K=4096, bf16_gpu=1400.0, choice_gpu=800.0)]
    out = target_summary(rows)
    assert "| CUTLASS | 14336x4096 M=16, chosen vs dense compile (GPU time) | 1.50x | >= 1.50x | yes |" in out
    assert "| CUTLASS | 8 Llama MLP blocks, decode 16 | 1.45x | >= 1.40x | yes |" in out
    assert "| CUTLASS | int8 activations 8192x14336x4096 vs bf16 F.linear (GPU time) | 1.75x | >= 2.00x | no |" in out
    assert "M=64" not in out


def test_every_json_field_is_documented():
    """Each field a section's rows carry (the keywords of its rows.append(dict(...)) calls in
    bench.py, and _layer_times' keys where a row takes them) is in that section's part of
    docs/benchmarks-schema.md. The compose row's keys are made from labels: checked by name."""
    import ast
    import pathlib
    import re

    from sparse_inductor import bench

    root = pathlib.Path(bench.__file__).resolve().parents[1]
    doc = (root / "docs" / "benchmarks-schema.md").read_text()
    parts = {m.group(1): m.group(2) for m in re.finditer(r'## `section: "(\w+)"`.*?\n(.*?)(?=\n## |\Z)', doc, re.S)}
    layer_times = re.search(r"## Fields of `_layer_times`.*?\n(.*?)(?=\n## )", doc, re.S).group(1)
    tree = ast.parse(pathlib.Path(bench.__file__).read_text())
    lt = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_layer_times")
    lt_keys = [k.arg for n in ast.walk(lt) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "dict"
               for k in n.keywords if k.arg]
    assert lt_keys == ["dense", "dense_compile", "compiled", "chosen"]
    for key in lt_keys:
        assert f"`{key}`" in layer_times, key
    seen = set()
    for call in ast.walk(tree):
        if not (isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "append" and call.args
                and isinstance(call.args[0], ast.Call) and getattr(call.args[0].func, "id", "") == "dict"):
            continue
        kws = {k.arg: k.value for k in call.args[0].keywords}
        section = kws.pop("section").value
        seen.add(section)
        assert section in parts, f"section {section!r} is not documented"
        fields = [k for k in kws if k is not None]  # None: a **mapping
        if any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == "t" for k in call.args[0].keywords):
            fields += lt_keys
        for field in fields:
            assert f"`{field}`" in parts[section], (section, field)
    assert seen == set(bench.SECTIONS) == set(parts)
    for label in ("bf16 dense", "2:4 bf16", "int8 dense", "int8 + 2:4, int32 product", "int8 + 2:4"):
        assert f"`{label.replace(' ', '_')}`" in parts["compose"], label
    assert bench.SCHEMA_VERSION == 1 and '"schema_version": 1' in doc
