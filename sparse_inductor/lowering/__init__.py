"""Kernels behind the project's ops and their Inductor lowerings, one kernel family per file.

A family describes its kernels as KernelSpecs and registers them in registry.py when its module is
imported (here, in the order the dispatcher lists candidates); lowering/inductor.py registers the
ops' Inductor lowerings. Without a lowering, Inductor runs an op as an extern call of its reference
implementation (ops.py): that is the "reference" kernel.
"""

from . import reference  # noqa: I001,F401  (first: the dispatcher lists candidates in this order)
from . import cusparselt_24, triton_24, triton_block  # noqa: F401
from . import cutlass_24  # noqa: F401,I001  (after the others: its candidates listed last)
from .inductor import register as _register_lowerings

_register_lowerings()
