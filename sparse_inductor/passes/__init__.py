"""FX graph passes, one per file: detect.py (what a weight is), linear_rewrite.py (linears into
sparse ops), sink_views.py (reshapes below the pointwise ops after a linear), split_outputs.py (a
fused linear's outputs apart), fuse_mlp.py (block-sparse MLP pairs), derived_check.py (a
cuSPARSELt fc2's row check from fc1's input), lib_activation.py (an activation into
cuSPARSELt's epilogue where the library computes it), cutlass_epilogue.py (what follows a CUTLASS
layer into its generated epilogue), manager.py (the pass Inductor calls, with its
cache-safe uuid). What they share: graph.py (walks, the ops' arguments by name, constants, marks,
LayerNote), row_checks.py (the non-finite row checks) and
epilogues.py (the chains a generated epilogue computes, and their prediction for the dispatcher)."""
