"""bench/benchmarks_doc.py on CPU: the page and the plot's data from bench markdown / JSON pairs."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "benchmarks_doc", os.path.join(os.path.dirname(__file__), "..", "bench", "benchmarks_doc.py"))
doc = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(doc)

HEADER = "NVIDIA H100 80GB HBM3, torch 2.11.0, triton 3.6.0; bf16; medians of do_bench (L2 flushed), us"
ROWS_A = [dict(section="linear24", M=1, N=14336, K=4096, dense_compile=53.0, compiled=30.0, chosen="triton"),
          dict(section="linear24", M=16, N=14336, K=4096, dense_compile=54.0, compiled=70.0, chosen="dense"),
          dict(section="block", M=1, N=14336, K=4096, block=64, sparsity=0.9, dense_compile=53.0, compiled=15.0,
               chosen="triton"),
          dict(section="block", M=8192, N=14336, K=4096, block=64, sparsity=0.9, dense=1240.0, dense_compile=1280.0,
               compiled=336.0, chosen="triton"),
          dict(section="guard", mode="default", checked=661.0, unchecked=660.0)]
ROWS_B = [dict(section="cusparselt", M=8192, N=14336, K=4096, dense_compile=1357.0, compiled=964.0,
               chosen="cusparselt"),
          dict(section="cusparselt", M=12608, N=3072, K=768, dense_compile=92.0, compiled=96.0, chosen="dense"),
          dict(section="cutlass", case="linear", M=16, N=4096, K=4096, dense_ro=24.0, choice_ro=20.0),
          dict(section="cutlass", case="linear", M=64, N=4096, K=4096, dense_ro=24.0, choice_ro=22.0)]


def test_series_is_what_the_dispatcher_gives():
    s = doc.series(ROWS_A + ROWS_B)
    # linear24 and cusparselt rows of one shape make one line; a layer kept dense counts 1.0x
    assert s["2:4, 14336x4096"] == [(1, pytest.approx(53 / 30)), (16, 1.0), (8192, pytest.approx(1357 / 964))]
    assert s["block 64x64, 90% zero, 14336x4096"] == [(1, pytest.approx(53 / 15)), (8192, pytest.approx(1280 / 336))]
    assert s["2:4 with CUTLASS (experimental), 4096x4096"] == [(16, 1.2), (64, pytest.approx(24 / 22))]
    assert "2:4, 3072x768" not in s  # one M: a point, not a line


def _write(tmp_path, name, rows, md):
    (tmp_path / f"{name}.json").write_text(json.dumps(dict(schema_version=1, header=HEADER, rows=rows)))
    (tmp_path / f"{name}.md").write_text(md)
    return [str(tmp_path / f"{name}.md"), str(tmp_path / f"{name}.json")]


def test_pairs_make_one_page_with_one_targets_table(tmp_path):
    targets = f"\n{doc.TARGETS_HEADING}\n\n{HEADER}\n\n| group | case | measured | target | met |\n|---|---|---|---|---|\n"
    a = _write(tmp_path, "a", ROWS_A, f"{HEADER}\n\n## One 2:4 linear\n\n| M |\n|---|\n| 1 |\n{targets}| x | a | 1x | 2x | no |\n")
    b = _write(tmp_path, "b", ROWS_B, f"{HEADER}\n\n## Whole models\n\n| model |\n|---|\n{targets}| x | b | 1x | 2x | no |\n")
    out = tmp_path / "docs"
    out.mkdir()
    (out / "benchmarks.md").write_text(f"# Benchmarks\n\nintro\n\n{doc.BEGIN}\nold tables\n{doc.END}\n\n## Measured apart\n")
    doc.main(a + b + ["--out", str(out)])
    page = (out / "benchmarks.md").read_text()
    assert page.startswith("# Benchmarks\n\nintro\n\n" + doc.BEGIN)
    assert "old tables" not in page and page.rstrip().endswith("## Measured apart")
    assert page.index("## One 2:4 linear") < page.index("## Whole models") < page.index(doc.TARGETS_HEADING)
    assert page.count(doc.TARGETS_HEADING) == 1 and "| x | a |" not in page  # the invocations' own tables dropped
    assert "block 90%, M=8192" in page  # ... and one over all rows (bench.TARGETS)
    if importlib.util.find_spec("matplotlib"):
        assert (out / "speedup.png").stat().st_size > 1000


def test_one_pair_without_markers_is_the_whole_page(tmp_path):
    a = _write(tmp_path, "a", ROWS_A, f"{HEADER}\n\n## One 2:4 linear\n")
    out = tmp_path / "docs"
    out.mkdir()
    doc.main(a + ["--out", str(out)])
    page = (out / "benchmarks.md").read_text()
    assert page.startswith(doc.INTRO) and "## One 2:4 linear" in page


def test_odd_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        doc.main(["only.md"])
    assert "pairs" in capsys.readouterr().err
