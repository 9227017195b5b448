"""docs/benchmarks.md and docs/speedup.png from one bench run: the markdown the bench printed
(`python -m sparse_inductor.bench ... | tee bench.md`) and its `--json` rows.

    python bench/benchmarks_doc.py bench.md bench.json [--out docs]

The page is the run's own tables under a fixed introduction (how to reproduce them); the plot is
the speedup over dense torch.compile against M for each single-linear case of the run (sections
linear24, block, cusparselt, cutlass), drawn with matplotlib (an optional bench dependency).
"""
from __future__ import annotations

import argparse
import collections
import json
import os

INTRO = """# Benchmarks

The current numbers, from one run of the bench on one GPU (device, versions and date in the first
line under each heading). Ratios are same-run ratios against dense `torch.compile` of the same model
in the same mode unless a column says otherwise. To reproduce on a CUDA machine:

```bash
python -m sparse_inductor.bench --json bench.json | tee bench.md   # --sections, --quick: see --help
python bench/benchmarks_doc.py bench.md bench.json                  # rewrites this page and the plot
```

![speedup over dense torch.compile against M](speedup.png)

"""

SERIES_SECTIONS = ("linear24", "block", "cusparselt", "cutlass")


def series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{label: [(M, dense compile / ours compiled)]} for the single-linear sections."""
    out: dict[str, list] = collections.defaultdict(list)
    for r in rows:
        if r.get("section") not in SERIES_SECTIONS or not r.get("M"):
            continue
        dense, ours = r.get("dense_compile") or r.get("dense"), r.get("compiled") or r.get("kernel")
        if not dense or not ours:
            continue
        what = {"block": f"block {r.get('block', 64)}x{r.get('block', 64)} {r.get('sparsity', 0):.0%} zero"}.get(
            r["section"], f"2:4 ({r['section']})")
        out[f"{what}, {r['N']}x{r['K']}"].append((int(r["M"]), dense / ours))
    return {k: sorted(v) for k, v in out.items()}


def plot(data: dict, header: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for label, pts in sorted(data.items()):
        ax.plot([m for m, _ in pts], [s for _, s in pts], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup over dense torch.compile")
    ax.set_title(header.split(";")[0], fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("markdown")
    ap.add_argument("json")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs"))
    a = ap.parse_args(argv)
    with open(a.json) as f:
        run = json.load(f)
    with open(a.markdown) as f:
        tables = f.read().strip()
    with open(os.path.join(a.out, "benchmarks.md"), "w") as f:
        f.write(INTRO + tables + "\n")
    data = series(run["rows"])
    if data:
        plot(data, run.get("header", ""), os.path.join(a.out, "speedup.png"))


if __name__ == "__main__":
    main()
