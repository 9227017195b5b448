"""FX graph passes, one per file: detect.py (what a weight is), linear_rewrite.py (linears into
sparse ops), manager.py (the pass Inductor calls, with its cache-safe uuid)."""
