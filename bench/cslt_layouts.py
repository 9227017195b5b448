"""Probe: is another layout / order formulation of the same 2:4 GEMM faster in cuSPARSELt?

    python bench/cslt_layouts.py [--quick] [--shapes 8192x14336x4096,...] [--extra] [--algs 0-20]

y[M, N] = x[M, K] @ W[N, K]^T, bf16, W 2:4 along K. Every formulation writes the same y (or, with
--extra, y^T / reads x^T: layouts a caller would have to provide). Two forms, in cuSPARSELt's
D = op(A) @ op(B) (C = D, beta = 0):
  form A (the project's): op(A) = W [N, K] structured, op(B) = x^T [K, M], D = y^T [N, M]
  form B (W as the structured B): op(A) = x [M, K], op(B) = W^T [K, N], D = y [M, N]
Each matrix lives in memory as a contiguous (row-major) array: W as [N, K] ("NK", torch's) or as
W^T [K, N] ("KN": free, the weight is compressed offline), x as [M, K] (or x^T [K, M], --extra),
y as [M, N] (or y^T [N, M], --extra). A matrix stored as [R, C] is described either as it is,
(R, C, ld C, ROW), or as its transpose (C, R, ld C, COL); the op (N/T) follows from what the
formulation needs, and D's description is forced (no op). Variant names spell it out, e.g. the
project's: "A: W NK:R,N; x MK:R,T; y MN:C" (memory, descriptor order R/C, op).
Each plan compresses W itself (cusparseLtSpMMACompressedSize/Compress take the plan), checks its
output against x.float() @ w.float().t() (WRONG if the relative error >= --tol), and is timed as
a CUDA-graph replay (do_bench median, L2 flushed): all alg ids screened briefly, the --top best
re-timed. "P" is the project's own `_Plan`, as-is. Dense F.linear is timed in the same run.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import itertools
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton

from sparse_inductor.lowering import cusparselt as cs
from sparse_inductor.lowering.cusparselt import (_ALG_CONFIG_ID, _ALG_CONFIG_MAX_ID, _ALG_DEFAULT, _COMPUTE_32F,
                                                  _CUDA_TYPE, _OP_N, _OP_T, _ORDER_COL, _ORDER_ROW, _SPARSITY_50,
                                                  _Opaque)
from sparse_inductor.measure import graphed
from sparse_inductor.prune import prune_24_

SHAPES = "8192x14336x4096,8192x4096x14336,12608x3072x768,12608x768x3072"
BF16 = _CUDA_TYPE[torch.bfloat16]
i64, u32, vp = ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p


class Variant(NamedTuple):
    form: str     # "A": W is the structured A; "B": W^T is the structured B
    w_t: bool     # W stored as W^T [K, N] (else [N, K])
    w_view: bool  # W's descriptor is the transposed (COL) view of its memory
    x_t: bool     # x stored as x^T [K, M] (--extra)
    x_view: bool
    y_t: bool     # y written as y^T [N, M] (--extra)

    def layout(self, m, n, k) -> dict:
        """{"W" / "x" / "y": (memory shape, descriptor (rows, cols, ld, order), op)}; op None for y (D).
        Form A needs op(W) = W, op(x) = x^T, D = y^T; form B op(W) = W^T, op(x) = x, D = y."""
        need_w, need_x, need_y = (False, True, True) if self.form == "A" else (True, False, False)
        out = {}
        for key, base, mem_t, view, need in (("W", (n, k), self.w_t, self.w_view, need_w),
                                             ("x", (m, k), self.x_t, self.x_view, need_x),
                                             ("y", (m, n), self.y_t, self.y_t ^ need_y, need_y)):
            r, c = base[::-1] if mem_t else base  # memory: a contiguous [r, c] array
            desc = (c, r, c, _ORDER_COL) if view else (r, c, c, _ORDER_ROW)  # as stored, or its transpose
            # the described matrix is the base transposed iff mem_t != view; op T where that differs from the need
            op = None if key == "y" else _OP_T if (mem_t ^ view) != need else _OP_N
            out[key] = ((r, c), desc, op)
        return out

    def name(self) -> str:
        lay = self.layout("M", "N", "K")  # symbolic: only swaps, no arithmetic
        parts = [f"{key} {''.join(mem)}:{'R' if d[3] == _ORDER_ROW else 'C'}" + ("" if op is None else "," + "NT"[op])
                 for key, (mem, d, op) in lay.items()]
        return f"{self.form}: " + "; ".join(parts)


def variants(extra: bool) -> list[Variant]:
    """Same-memory variants (x [M, K], y [M, N]; W either way): 2 forms x 2 W memories x 2 W views
    x 2 x views. --extra: x^T in or y^T out, descriptors as stored (ROW), both forms, both W."""
    out = [Variant(f, wt, wv, False, xv, False) for f, wt, wv, xv in itertools.product("AB", *[(False, True)] * 3)]
    if extra:
        out += [Variant(f, wt, False, xt, False, not xt) for f, wt, xt in itertools.product("AB", (False, True),
                                                                                           (True, False))]
    return out


class LayoutPlan:
    """Descriptors, alg selection, plan, workspace and compressed W of one variant at one alg id."""

    def __init__(self, lib, v: Variant, x, w, alg: int):
        self.lib, self.v, self.h = lib, v, lib.handle(torch.cuda.current_device()).ptr
        self.descs, self.sel, self.plan, self.live = [], None, None, False
        try:
            self._build(x, w, alg)
        except Exception:
            self.close()
            raise

    def _build(self, x, w, alg):
        lib, dll, v, h = self.lib, self.lib.dll, self.v, self.h
        (m, k), n = x.shape, w.shape[0]
        lay = v.layout(m, n, k)
        # the operands in memory, as this variant stores them (contiguous)
        self.w_mem = w.t().contiguous() if v.w_t else w
        self.x_mem = x.t().contiguous() if v.x_t else x
        self.y = torch.full(lay["y"][0], float("nan"), dtype=x.dtype, device=x.device)
        assert (tuple(self.w_mem.shape), tuple(self.x_mem.shape)) == (lay["W"][0], lay["x"][0])
        wd, xd, yd = (self._desc(lay[key][1], key == "W", key) for key in ("W", "x", "y"))
        op_w, op_x = lay["W"][2], lay["x"][2]
        a, b, opa, opb = (wd, xd, op_w, op_x) if v.form == "A" else (xd, wd, op_x, op_w)
        self.mm = _Opaque()
        lib.check(dll.cusparseLtMatmulDescriptorInit(h, self.mm.ptr, opa, opb, a.ptr, b.ptr, yd.ptr, yd.ptr,
                                                     _COMPUTE_32F), "matmul descriptor")
        self.sel = _Opaque()
        lib.check(dll.cusparseLtMatmulAlgSelectionInit(h, self.sel.ptr, self.mm.ptr, _ALG_DEFAULT), "alg selection")
        cnt = ctypes.c_int(0)
        lib.check(dll.cusparseLtMatmulAlgGetAttribute(h, self.sel.ptr, _ALG_CONFIG_MAX_ID, ctypes.byref(cnt),
                                                      ctypes.c_size_t(4)), "alg count")
        self.alg_count = cnt.value  # a count: valid ids 0..count-1
        a_id = ctypes.c_int(alg)
        lib.check(dll.cusparseLtMatmulAlgSetAttribute(h, self.sel.ptr, _ALG_CONFIG_ID, ctypes.byref(a_id),
                                                      ctypes.c_size_t(4)), f"alg id {alg}")
        self.plan = _Opaque()
        lib.check(dll.cusparseLtMatmulPlanInit(h, self.plan.ptr, self.mm.ptr, self.sel.ptr), "plan")
        self.live = True
        ws = ctypes.c_size_t(0)
        lib.check(dll.cusparseLtMatmulGetWorkspace(h, self.plan.ptr, ctypes.byref(ws)), "workspace size")
        self.ws = torch.empty(max(ws.value, 1), dtype=torch.uint8, device=x.device)
        # compress W for this plan (the compressed layout may depend on the formulation)
        csz, bsz = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.check(dll.cusparseLtSpMMACompressedSize(h, self.plan.ptr, ctypes.byref(csz), ctypes.byref(bsz)),
                  "compressed size")
        self.wc = torch.empty(csz.value, dtype=torch.uint8, device=x.device)
        buf = torch.empty(max(bsz.value, 1), dtype=torch.uint8, device=x.device)
        lib.check(dll.cusparseLtSpMMACompress(h, self.plan.ptr, vp(self.w_mem.data_ptr()), vp(self.wc.data_ptr()),
                                              vp(buf.data_ptr()), vp(torch.cuda.current_stream().cuda_stream)),
                  "compress")
        torch.cuda.synchronize()  # buf is freed on return
        fn = dll.cusparseLtMatmul  # the same argtypes as cusparselt._Plan sets
        fn.argtypes = [vp] * 9 + [vp, ctypes.c_int32]
        fn.restype = ctypes.c_int
        self._mm, self._stream = fn, vp(0)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        pa, pb = (self.wc, self.x_mem) if v.form == "A" else (self.x_mem, self.wc)
        self._args = (pa.data_ptr(), pb.data_ptr(), self.y.data_ptr())

    def _desc(self, desc, structured, what):
        d = _Opaque()
        r, c, ld, order = desc
        args = (self.h, d.ptr, i64(r), i64(c), i64(ld), u32(16), BF16, order)
        st = (self.lib.dll.cusparseLtStructuredDescriptorInit(*args, _SPARSITY_50) if structured
              else self.lib.dll.cusparseLtDenseDescriptorInit(*args))
        self.lib.check(st, f"{what} descriptor ({r}x{c} ld {ld}, {'ROW' if order == _ORDER_ROW else 'COL'})")
        self.descs.append(d)
        return d

    def __call__(self):
        """One matmul on the current stream (a capture stream too); returns y as [M, N]."""
        self._stream.value = torch.cuda.current_stream().cuda_stream
        pa, pb, py = self._args
        st = self._mm(self.h.value, self.plan.ptr.value, ctypes.addressof(self.alpha), pa, pb,
                      ctypes.addressof(self.beta), py, py, self.ws.data_ptr(), ctypes.addressof(self._stream), 1)
        self.lib.check(st, "matmul")
        return self.y.t() if self.v.y_t else self.y

    def close(self):
        dll = self.lib.dll
        if self.live:
            dll.cusparseLtMatmulPlanDestroy(self.plan.ptr)
            self.live = False
        if self.sel is not None and hasattr(dll, "cusparseLtMatmulAlgSelectionDestroy"):
            dll.cusparseLtMatmulAlgSelectionDestroy(self.sel.ptr)
            self.sel = None
        for d in self.descs:
            dll.cusparseLtMatDescriptorDestroy(d.ptr)
        self.descs = []


class ProjectPlan:
    """The project's formulation, its `_Plan` as-is (y preallocated, as for the variants)."""

    def __init__(self, lib, x, w, wc, alg: int):
        m, k = x.shape
        self.p = cs._Plan(lib, torch.cuda.current_device(), m, w.shape[0], k, x.dtype, 0, alg, 1)
        self.alg_count = self.p.max_alg_id + 1
        self.x, self.wc = x, wc
        self.y = torch.full((m, w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)

    def __call__(self):
        self.p(self.wc, self.x, self.y, torch.cuda.current_stream().cuda_stream)
        return self.y

    def close(self):
        pass  # _Plan.__del__ frees it


def time_us(fn, rep: int, warmup: int, use_graph: bool):
    """(median us, graphed?) of fn, L2 flushed by do_bench; plain calls if the capture fails."""
    from triton.testing import do_bench

    f, graph = fn, False
    if use_graph:
        try:
            f, graph = graphed(fn), True
        except Exception as e:
            print(f"      (graph capture failed, timing plainly: {type(e).__name__}: {e})", flush=True)
            torch.cuda.synchronize()
    return do_bench(f, warmup=warmup, rep=rep, return_mode="median") * 1e3, graph


def rel_err(y, ref) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def why(e: Exception) -> str:
    msg = str(e).splitlines()[0][:160] if str(e) else ""
    return msg.replace("cuSPARSELt ", "") if isinstance(e, RuntimeError) else f"{type(e).__name__}: {msg}"


def sweep(label, make, algs, ref, args):
    """Screen every alg id (verify, short timing), re-time the --top best. Returns (best us, alg,
    graphed, note); best us None when no alg gave a right answer (note: WRONG / failed: why)."""
    screened, wrong, failed, first_fail, count = {}, set(), 0, None, None
    alg_list, i = list(algs), 0
    while i < len(alg_list):
        alg, p = alg_list[i], None
        i += 1
        try:
            p = make(alg)
            if count is None:  # the variant's own alg count (ids 0..count-1; id == count probes that)
                count = p.alg_count
                alg_list = alg_list[:i] + [a for a in alg_list[i:] if a <= count]
            if alg == count:
                print(f"    {label}: alg id {count} accepted: MAX_ID is not a count here?", flush=True)
            err = rel_err(p(), ref)
            if not err < args.tol:  # NaN (y left unwritten) counts as wrong too
                wrong.add(alg)
                print(f"    {label} alg {alg}: WRONG (rel err {err:.3g})", flush=True)
                continue
            screened[alg] = time_us(p, args.screen_rep, 5, not args.no_graph)[0]
        except Exception as e:
            if count is not None and alg == count:  # refused, as a count says: not a failure
                continue
            failed += 1
            first_fail = first_fail or f"alg {alg}: {why(e)}"
            if count is None:  # not even a plan: the formulation itself is refused
                break
        finally:
            if p is not None:
                p.close()
    best = (None, None, False)
    for alg in sorted(screened, key=screened.get)[:args.top]:
        p = None
        try:
            p = make(alg)
            if not rel_err(p(), ref) < args.tol:
                wrong.add(alg)
                continue
            t, graph = time_us(p, args.rep, 25, not args.no_graph)
            if best[0] is None or t < best[0]:
                best = (t, alg, graph)
        except Exception as e:
            first_fail = first_fail or f"alg {alg} (re-time): {why(e)}"
        finally:
            if p is not None:
                p.close()
    top = " ".join(f"{a}:{screened[a]:.1f}" for a in sorted(screened, key=screened.get)[:5])
    print(f"  {label}: best {None if best[0] is None else round(best[0], 1)} us (alg {best[1]}); screen {top}; "
          f"algs {count}, ok {len(screened)}, wrong {sorted(wrong)}, failed {failed}"
          + (f" (first: {first_fail})" if first_fail else ""), flush=True)
    if best[0] is None:
        return None, None, False, ("WRONG" if wrong else f"failed: {(first_fail or 'no alg')[:80]}")
    return best[0], best[1], best[2], (f"{len(wrong)} algs WRONG" if wrong else "")


def parse_algs(spec):
    """'0-20' / '12,17,19' -> ids; None -> all (cut at each variant's alg count)."""
    if spec is None:
        return range(0, 1000)
    return [a for part in spec.split(",") for a in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]


def run_shape(shape, lib, todo, algs, args, results):
    """Dense F.linear and every variant in `todo` at one (M, N, K); cells into results."""
    m, n, k = shape
    print(f"\n## M={m} N={n} K={k}", flush=True)
    torch.manual_seed(0)
    w = prune_24_(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w.float().t()
    wc = cs.compress(w)  # torch._cslt_compress: the project's compressed W (variant P)
    dense, graph = time_us(lambda: F.linear(x, w), args.rep, 25, not args.no_graph)
    results[(shape, "dense")] = f"{dense:.1f}{'' if graph else '*'}"
    print(f"  dense F.linear: {dense:.1f} us", flush=True)
    for vid, v in todo:
        if v is None:
            make = lambda alg: ProjectPlan(lib, x, w, wc, alg)  # noqa: E731
        else:
            make = lambda alg, v=v: LayoutPlan(lib, v, x, w, alg)  # noqa: E731
        try:
            t, alg, graph, note = sweep(vid, make, algs, ref, args)
            if t is not None:
                results[(shape, vid, "ratio")] = dense / t
            results[(shape, vid)] = (note if t is None else f"{t:.1f}{'' if graph else '*'} ({alg}) {dense / t:.2f}x"
                                     + (f" [{note}]" if note else ""))
        except Exception as e:  # never stop the run
            results[(shape, vid)] = f"failed: {type(e).__name__}"
            print(f"  {vid}: failed: {type(e).__name__}: {e}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SHAPES, help="MxNxK,... (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="only the first shape")
    ap.add_argument("--extra", action="store_true", help="also x^T-in / y^T-out layouts (need the caller's help)")
    ap.add_argument("--algs", help="alg ids to try, e.g. '0-20' or '12,17,19' (default: all the library offers)")
    ap.add_argument("--variants", help="comma-separated variant ids to run (P, A1..A8, B1..B8, X1..X8)")
    ap.add_argument("--top", type=int, default=2, help="re-time this many best screened algs (default 2)")
    ap.add_argument("--screen-rep", type=int, default=15, help="do_bench rep (ms) of the screening")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms) of the final timings")
    ap.add_argument("--tol", type=float, default=2e-2, help="max relative error vs fp32 (default 2e-2)")
    ap.add_argument("--no-graph", action="store_true", help="time plain calls, not CUDA-graph replays")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("cslt_layouts: no CUDA device; nothing to probe")
    lib = cs._lib() if cs.available() else None
    if lib is None:
        sys.exit(f"cslt_layouts: cuSPARSELt unavailable ({cs._LIB_ERROR or 'torch built without it'})")
    ver = ctypes.c_int(0)
    lib.dll.cusparseLtGetVersion(lib.handle(torch.cuda.current_device()).ptr, ctypes.byref(ver))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, cuSPARSELt {cs._version_str()} "
          f"(torch {cs.version()}, loaded {ver.value}: {cs._library_path()}), {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print("# bf16; do_bench medians (L2 flushed), us; CUDA-graph replays unless marked *; "
          f"screen rep {args.screen_rep} ms, final rep {args.rep} ms, top {args.top}")

    vs = variants(args.extra)
    ids = ["P"] + [f"{v.form}{i % 8 + 1}" if i < 16 else f"X{i - 15}" for i, v in enumerate(vs)]
    names = ["project _Plan: " + Variant("A", False, False, False, False, False).name()] + [v.name() for v in vs]
    keep = set(args.variants.split(",")) if args.variants else set(ids)
    print("\nvariants (memory layout : descriptor order R=ROW C=COL , op):")
    for vid, nm in zip(ids, names):
        print(f"  {vid:>3}  {nm}")
    shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shapes.split(",")]
    shapes = shapes[:1] if args.quick else shapes
    algs, results, t_start = parse_algs(args.algs), {}, time.time()
    todo = [(vid, v) for vid, v in zip(ids, [None] + vs) if vid in keep]
    for shape in shapes:
        try:
            run_shape(shape, lib, todo, algs, args, results)
        except Exception as e:  # e.g. out of memory at setup: the next shape still runs
            print(f"  shape {shape} failed: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
        print(f"  ({time.time() - t_start:.0f} s so far)", flush=True)

    print(f"\n# summary ({time.time() - t_start:.0f} s): best us (alg) and dense / variant; * = not graphed\n")
    cols = [f"{m}x{n}x{k}" for m, n, k in shapes]
    print("| variant | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    print("| dense F.linear (us) | " + " | ".join(results.get((s, "dense"), "-") for s in shapes) + " |")
    for vid, nm in zip(ids, names):
        if vid in keep:
            print(f"| {vid}: {nm} | " + " | ".join(str(results.get((s, vid), "-")) for s in shapes) + " |")
    for s in shapes:  # the fastest right formulation per shape
        got = [(results[key], key[1]) for key in results if key[0] == s and key[2:] == ("ratio",)]
        if got:
            r, vid = max(got)
            print(f"best at {'x'.join(map(str, s))}: {vid} {r:.2f}x dense (P: {results.get((s, 'P', 'ratio'), 0):.2f}x)")


if __name__ == "__main__":
    main()
