"""Which kernel runs a sparse layer: `choose`, over the kernel families in the registry.

Every kernel family registers a KernelSpec (registry.py): the pattern it serves, the devices it
runs on, a guard that returns why it cannot run a layer (or None), an estimate of its time, and
(for measuring) how to build its weights and run it eagerly. `choose` keeps a layer dense unless
the best runnable kernel beats dense by `min_speedup`, or `force` is set.

Two ways to know "beats": measured (the default on CUDA, options dispatch="auto"/"measure"): the
rewrite pass hands `choose` a timer (measure.py) that times dense and every candidate on the device
at the layer's M, with the layer's real compressed weight, and caches the times on disk; or
modelled (dispatch="model", and wherever measuring is impossible): a roofline (bytes over bandwidth,
flops over peak, plus a launch cost) per device (registry.device_model). Devices with neither (the
CPU) keep every layer dense unless forced.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

from . import lowering  # noqa: F401  (imports every kernel family: each registers itself)
from .options import SparseOptions
from .registry import KernelSpec, Layer, dense_us, device_model, kernels

__all__ = ["Choice", "Timer", "choose", "m_buckets", "BUCKET_TOLERANCE"]


# A timer: (kernel name or "dense", M) -> (median us, params) or None when it could not be timed.
Timer = Callable[[str, int], Optional[tuple]]


@dataclasses.dataclass(frozen=True)
class Choice:
    kernel: str  # "dense" or a KernelSpec name
    reason: str
    dense_us: Optional[float] = None
    sparse_us: Optional[float] = None
    params: dict = dataclasses.field(default_factory=dict)  # the kernel's parameters (e.g. alg_id)
    candidates: dict = dataclasses.field(default_factory=dict)  # measured: {"dense": us, kernel: us}
    measured: bool = False


def choose(layer: Layer, opts: SparseOptions, timer: Optional[Timer] = None) -> Choice:
    cands = [k for k in kernels(layer.pattern) if layer.device in k.devices and k.enabled(opts)]
    if opts.kernel is not None:
        cands = [k for k in cands if k.name == opts.kernel]
    if not cands:
        pinned = f" named {opts.kernel!r}" if opts.kernel else ""
        return Choice("dense", f"no {layer.pattern} kernel{pinned} for device {layer.device}")
    runnable, why_not = [], []
    for k in cands:
        reason = k.check(layer)
        (why_not.append(f"{k.name}: {reason}") if reason else runnable.append(k))
    if not runnable:
        return Choice("dense", "no kernel can run this layer (" + "; ".join(why_not) + ")")
    if timer is not None and opts.dispatch != "model" and layer.m is not None:
        measured = _choose_measured(layer, opts, [k for k in runnable if not k.reference and k.runner], timer)
        if measured is not None:
            return measured
    model = device_model(layer)
    d_us = dense_us(layer, model)

    def rank(k: KernelSpec):
        est = k.estimate_us(layer, model)
        return (k.reference, math.inf if est is None else est)

    best = min(runnable, key=rank)
    est = best.estimate_us(layer, model)
    if opts.force:
        return Choice(best.name, "forced (options force=True)", d_us, est)
    if d_us is None or est is None:
        what = "M unknown" if layer.m is None else f"no cost model for {layer.device_name or layer.device}"
        return Choice("dense", f"{what}: stays dense unless forced", d_us, est)
    if est * opts.min_speedup <= d_us:
        return Choice(best.name, f"expected {d_us / est:.2f}x faster than dense ({est:.1f} vs {d_us:.1f} us)", d_us, est)
    return Choice("dense", f"sparse not expected to win ({best.name} {est:.1f} us vs dense {d_us:.1f} us)", d_us, est)


def m_buckets(layer: Layer) -> list[int]:
    """The Ms a layer is timed at: its own for a static M; for a dynamic one the hint and a spread
    of batch sizes around it (the op runs one kernel for every M, so it must not lose at any)."""
    if layer.m_static:
        return [layer.m]
    spread = [1, 16, 128, 1024, 8192]
    return [layer.m] + [m for m in spread if m != layer.m and m <= max(8 * layer.m, 16)]


# A kernel chosen for a dynamic M may lose to dense at another bucket by at most this much.
BUCKET_TOLERANCE = 1.02


def _choose_measured(layer: Layer, opts: SparseOptions, cands: list[KernelSpec], timer: Timer) -> Optional[Choice]:
    ms = m_buckets(layer)
    dense = [timer("dense", m) for m in ms]
    if any(d is None for d in dense):
        return None  # cannot measure dense here: the caller falls back to the model
    dense_t = [d[0] for d in dense]
    table: dict = {"dense": dense_t[0]}
    best = None
    for k in cands:
        ts = [timer(k.name, m) for m in ms]
        if any(t is None for t in ts):
            table[k.name] = None
            continue
        table[k.name] = ts[0][0]
        worst = max(t[0] / d for t, d in zip(ts, dense_t))  # slowest ratio vs dense over the buckets
        if best is None or ts[0][0] < best[1]:
            best = (k, ts[0][0], ts[0][1], worst)
    where = f"M={layer.m}" + ("" if layer.m_static else f" (dynamic; buckets {ms})")
    if best is None:
        failures = getattr(timer, "failures", None) or {}  # (measure.LayerTimer says why)
        why = "; ".join(f"{k.name}: {failures[k.name]}" for k in cands if failures.get(k.name))
        return Choice("dense", f"no sparse kernel could be timed at {where}" + (f" ({why})" if why else ""),
                      dense_t[0], None, {}, table, True)
    k, t, params, worst = best
    speedup = dense_t[0] / t
    if opts.force:
        return Choice(k.name, f"forced (options force=True); measured {speedup:.2f}x vs dense at {where}",
                      dense_t[0], t, params, table, True)
    if t * opts.min_speedup <= dense_t[0] and worst <= BUCKET_TOLERANCE:
        return Choice(k.name, f"measured {speedup:.2f}x faster than dense at {where} ({t:.1f} vs {dense_t[0]:.1f} us)",
                      dense_t[0], t, params, table, True)
    if worst > BUCKET_TOLERANCE and speedup >= opts.min_speedup:
        why = f"{k.name} wins at M={layer.m} but is {worst:.2f}x dense's time at another batch size ({ms})"
    else:
        why = (f"sparse not measured faster by {opts.min_speedup:.2f}x at {where} "
               f"({k.name} {t:.1f} us vs dense {dense_t[0]:.1f} us)")
    return Choice("dense", why, dense_t[0], t, {}, table, True)
