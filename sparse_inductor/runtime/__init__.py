"""Bindings to native GPU libraries and the kernels built for them, below the ops: plans, handles,
compiled modules and their caches. Nothing here knows about torch.fx or Inductor."""
