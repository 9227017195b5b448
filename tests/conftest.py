"""Test setup. Without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1), which
must be set before any kernel is defined, hence here, before the package is imported."""
import os
import tempfile

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The dispatcher's timings go to this test run's own cache unless the caller names one: what a test
# times (small or odd inputs, kernels under test) must not decide a later benchmark's or user's
# compile on the same machine, which reads the default cache (a bench run after the GPU tests once
# read 187 us from it for a weight-only layer that times at 22 us, and kept the layer dense).
if "SPARSE_INDUCTOR_CACHE_DIR" not in os.environ:
    _timings = tempfile.TemporaryDirectory(prefix="sparse_inductor_test_timings_")  # removed at exit
    os.environ["SPARSE_INDUCTOR_CACHE_DIR"] = _timings.name

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
