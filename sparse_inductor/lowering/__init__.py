"""Kernels behind the project's ops and their Inductor lowerings, one kernel family per file.

Importing this package registers each family with the dispatcher (dispatch.register_kernel) and
its lowering with Inductor. Without a lowering, Inductor runs an op as an extern call of its
reference implementation (ops.py): that is the "reference" kernel.
"""
