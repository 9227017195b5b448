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
    assert {t[0] for t in TARGETS} == {"block", "2:4", "8-bit"}
