"""Build, on a machine without a GPU (nvcc and the CUTLASS headers only), every CUTLASS library a GPU
run of bench/gpu_cutlass_rerun.sh asks for, and pack them for carrying to the GPU machine:

- the bench's cutlass section (sparse_inductor.bench.cutlass_kernels: singles, mlp, quant8);
- tests/test_gpu_cutlass.py (its expected_kernels);
- the e2e models with the CUTLASS family a candidate (ViT-B/16 batch 64, ViT-H/14 batch 32, HF
  LlamaForCausalLM batch 32; --models): each is compiled here on the CPU with backend="sparse"
  until the rewrite pass has told the dispatcher of its layers (linear_rewrite's Layer, recorded
  as it is made), then stopped; every layer's candidates (cutlass_24._all_params, one kernel per
  output piece) are listed as the GPU compile would list them. The compile on the GPU builds what
  this missed: correct, slower.

    python bench/cutlass_prebuild.py [--models vit,hf] [--pack .carry/cutlass_libs.tar.xz] [--list]

The libraries go to SPARSE_INDUCTOR_CUTLASS_CACHE_DIR (the library cache, keyed by source, flags
and the nvcc and CUTLASS versions, not torch's); --pack writes the .so files into one tar.xz.
A library takes ~55-70 s of nvcc and ~5 GB of memory: on 2 cores, ~36 minutes for all 64.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "tests")]


class _Enough(BaseException):
    """Raised after the rewrite pass: the layers are known, the CPU compile (and run) not needed.
    A BaseException, so the backend's `except Exception` (never break a compile) lets it through."""


def model_layers(model: torch.nn.Module, example) -> list:
    """The 2:4 layers the rewrite pass makes of `model` (compiled on this machine's CPU), as they
    would be on an sm90 GPU."""
    from sparse_inductor.passes import linear_rewrite, manager

    seen = []
    real_layer, real_tail = linear_rewrite._layer, manager.fuse_cutlass_epilogues

    def spy(*a, **kw):
        layer = real_layer(*a, **kw)
        seen.append(layer)
        return layer

    def stop(*a, **kw):
        raise _Enough

    linear_rewrite._layer, manager.fuse_cutlass_epilogues = spy, stop
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparse", options={"experimental": ("cutlass",)})
        # freezing concatenates linears that share an input (q|k|v, w1|w3) on GPUs, on the CPU only so
        with torch.no_grad(), torch._inductor.config.patch({"cpp.enable_concat_linear": True}):
            compiled(example)
    except _Enough:
        pass
    finally:
        linear_rewrite._layer, manager.fuse_cutlass_epilogues = real_layer, real_tail
        torch._dynamo.reset()
    gpu = [dataclasses.replace(ly, device="cuda", device_name="NVIDIA H100 80GB HBM3") for ly in seen
           if ly.pattern == "2:4"]
    return list(dict.fromkeys(gpu))


def e2e_kernels(models=("vit", "hf")) -> list:
    """The CUTLASS candidates of bench_e2e's models with the family a candidate (their seeds, shapes
    and pruning as there, on the CPU)."""
    from sparse_inductor import bench
    from sparse_inductor.lowering import cutlass_24
    from sparse_inductor.prune import prune

    dt, cases = torch.bfloat16, []
    if "vit" in models:
        import timm  # optional: the ViT cases only

        for name, batch in (("vit_base_patch16_224", 64), ("vit_huge_patch14_224", 32)):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).to(dtype=dt).eval()
            prune(model, "2:4")
            cases.append((name, model, torch.randn(batch, 3, 224, 224, dtype=dt)))
    if "hf" in models:
        from transformers import LlamaConfig, LlamaForCausalLM  # optional: this case only

        torch.manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(**bench.HF_LLAMA)).to(dtype=dt).eval()
        prune(lm, "2:4", filter_fn=lambda m, n: n.endswith("_proj"))
        cases.append(("hf_llama", bench._Logits(lm), torch.randint(0, bench.HF_LLAMA["vocab_size"], (32, 1))))
    out = []
    for name, model, example in cases:
        layers = [ly for ly in model_layers(model, example) if cutlass_24.layer_why_not(ly) is None]
        ks = [k for ly in layers for p in cutlass_24._all_params(ly) for k in cutlass_24._variant_kernels(ly, p)]
        print(f"{name}: {len(layers)} 2:4 layer shapes, {len(set(ks))} CUTLASS candidates", flush=True)
        out += ks
    return list(dict.fromkeys(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit,hf", help="e2e models to list: vit, hf (none: '')")
    ap.add_argument("--pack", default=None, help="write the libraries (.so) into this tar.xz")
    ap.add_argument("--list", action="store_true", help="print the kernels, build nothing")
    a = ap.parse_args(argv)
    os.environ.setdefault("TORCHINDUCTOR_CPP_WEIGHT_PREPACK", "0")  # the CPU compile: no packed linears
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import test_gpu_cutlass

    from sparse_inductor import bench
    from sparse_inductor.runtime import cutlass as rt

    models = tuple(m.strip() for m in a.models.split(",") if m.strip())
    ks = list(dict.fromkeys(test_gpu_cutlass.expected_kernels() + bench.cutlass_kernels() + e2e_kernels(models)))
    if a.list:
        for k in ks:
            print(k.describe())
        print(f"{len(ks)} kernels")
        return
    res = bench.build_cutlass(kernels=ks)
    if a.pack:
        names = sorted(os.path.basename(p) for p in res.values() if isinstance(p, str))
        os.makedirs(os.path.dirname(os.path.abspath(a.pack)), exist_ok=True)
        subprocess.run(["tar", "-cJf", os.path.abspath(a.pack), *names], cwd=rt.cache_dir(), check=True)
        print(f"packed {len(names)} libraries into {a.pack} ({os.path.getsize(a.pack) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
