"""Kernels behind the project's ops and their Inductor lowerings, one kernel family per file.

Importing this package registers each family with the dispatcher (dispatch.register_kernel) and
its lowering with Inductor. Without a lowering, Inductor runs an op as an extern call of its
reference implementation (ops.py): that is the "reference" kernel.
"""

from . import cusparselt, triton_24, triton_block  # noqa: E402,F401  (register the kernel families with the dispatcher)
from .inductor import register as _register_lowerings  # noqa: E402

_register_lowerings()
