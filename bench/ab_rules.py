"""A/B of one rewrite rule on whole timm ViTs: the same model compiled with backend="sparse" in
reduce-overhead mode with the rule as shipped (A) and with it switched (B), each compiled and
timed `--rounds` times, alternating, with dense reduce-overhead in the same run. Prints, per form,
the times, the best against dense, and the kernels the dispatcher picked.

    python bench/ab_rules.py --rule pointwise-check [--models vit_base_patch16_224:64,vit_huge_patch14_224:32]
                             [--pattern 2:4|block] [--rounds 2]

Rules (fields of SparseOptions.rules, options.Rules):
- row-fixup (row_fixup_in_graph): cuSPARSELt's non-finite row fixup folded into the pointwise op
  after the call (A) vs the op's own nan_rows_ launch (B) (docs/performance.md).
- pointwise-check (pointwise_producer_check): a row check that joins x's pointwise producer timed
  as one more read of x ("separate", A) vs as free ("fused", B).
- norm-reads (norm_reads_its_input): a check over the GELU after a cuSPARSELt fc1 (whose row fixup
  reads a sum) is its own kernel, timed as a pass (A), vs a reduction in the GELU's kernel timed as
  free (B: any reduction among the sources counts as a norm).
- derived-check (derived_check, passes/fuse_mlp.py): a block fc2's row check read from fc1's input
  (A) vs its own check over the hidden activations (B).
- skip-hidden (skip_hidden, passes/fuse_mlp.py): a block fc1 skips the hidden units fc2 does not
  read or folds (A) vs computes all (B).
- derived-lib-check (derived_lib_check, passes/derived_check.py): a cuSPARSELt fc2's row check from
  fc1's input, then its own input in the flagged rows only (A) vs its check over the hidden
  activations, which makes the GELU kernel a reduction (B).
- lib-activation (lib_activation, passes/lib_activation.py): fc1's activation in cuSPARSELt's
  epilogue where the library computes the graph's (A) vs an Inductor kernel after the call (B).
"""
from __future__ import annotations

import argparse

import torch

from sparse_inductor.bench import _bench, header
from sparse_inductor.options import Rules
from sparse_inductor.prune import prune
from sparse_inductor.report import LayerDecision, collect

# rule -> (the Rules field, its value in form B, names of forms A and B); form A is the default
RULES = {
    "row-fixup": ("row_fixup_in_graph", False, ("in the graph", "in the op")),
    "pointwise-check": ("pointwise_producer_check", "fused", ("check timed as a pass", "check timed as free")),
    "norm-reads": ("norm_reads_its_input", False,
                   ("a norm reads what it reduces", "any reduction among the sources is a norm")),
    "derived-check": ("derived_check", False, ("fc2's check from fc1's input", "fc2's check over h")),
    "skip-hidden": ("skip_hidden", False, ("fc1 skips unread/constant hidden units", "fc1 computes all")),
    "derived-lib-check": ("derived_lib_check", False, ("cslt fc2's check from fc1's input", "cslt fc2's check over h")),
    "lib-activation": ("lib_activation", False, ("activation in cuSPARSELt's epilogue", "activation kernel after the call")),
}


def _kernels(records) -> str:
    ks = [d.kernel for d in records if isinstance(d, LayerDecision)]
    return ", ".join(f"{k} {ks.count(k)}" for k in sorted(set(ks)))


def ab(name: str, batch: int, rule: str, pattern: str, rounds: int) -> None:
    import timm

    field, b_value, forms = RULES[rule]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to("cuda", torch.bfloat16).eval()
    if pattern == "block":  # the bench's ViT-B block case: MLP weights, 90% zero 64x64 blocks
        prune(model, "block", block=64, sparsity=0.9, filter_fn=lambda m, n: ".mlp." in f".{n}.")
    else:
        prune(model, "2:4")
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    a_value = getattr(Rules(), field)
    res: dict = {}
    picks: dict = {}
    with torch.no_grad():
        torch._dynamo.reset()
        dense = torch.compile(model, mode="reduce-overhead")
        dense(x)
        t_dense = _bench(lambda: dense(x), rep=200)
        dense = None
        for _ in range(rounds):
            for form, value in zip(forms, (a_value, b_value)):
                try:
                    torch._dynamo.reset()
                    with collect() as sink:
                        ours = torch.compile(model, backend="sparse", options={
                            "mode": "reduce-overhead", "fx_cache": False, "rules": {field: value}})
                        ours(x)
                    res.setdefault(form, []).append(_bench(lambda: ours(x), rep=200))
                    picks[form] = _kernels(sink)
                finally:
                    ours = None
    print(f"\n| {name} b{batch}, {pattern}, RO: rule {rule} | us | vs dense RO ({t_dense:.1f}) | kernels |")
    print("|---|---|---|---|")
    for form, ts in res.items():
        print(f"| {form} | {' / '.join(f'{t:.1f}' for t in ts)} | {t_dense / min(ts):.3f}x | {picks[form]} |", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rule", choices=sorted(RULES), required=True)
    ap.add_argument("--models", default="vit_base_patch16_224:64", help="name:batch, comma-separated")
    ap.add_argument("--pattern", choices=("2:4", "block"), default="2:4",
                    help="2:4: every linear; block: MLP weights 90%% zero 64x64 blocks")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    print(header(), flush=True)
    for spec in a.models.split(","):
        name, _, batch = spec.partition(":")
        ab(name, int(batch or 64), a.rule, a.pattern, a.rounds)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
