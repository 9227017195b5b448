"""2:4 sparse linear in Triton: load compressed, expand in registers, multiply.

    y[M, N] = x[M, K] @ W[N, K]^T          (bias and activations are Inductor epilogues)

W in the compressed 2:4 layout of formats/sparse24.py (G = K / 4 groups per row):
    values [2, N, G]   V0 = values[0], V1 = values[1]: the two kept values of each group, the lower
                       position in V0
    meta   [ceil(N/2), G] uint8: code i0 | i1 << 2 per group, rows 2r / 2r+1 in the low / high nibble

Two kernels, both computing an fp32 tile of y^T (the nn.Linear transpose is done by indexing; no
transposed copy of x, W or y is made):

* dot (any M): per step, BLOCK_G groups of BLOCK_N rows of W are loaded as V0, V1 and meta tiles
  [BLOCK_N, BLOCK_G]; the dense weight is rebuilt as its four position planes
  W_p[n, g] = W[n, 4g + p] (p = 0..3) with two selects each, and
  acc[BLOCK_N, BLOCK_M] += sum_p W_p @ X_p^T, where X_p[m, g] = x[m, 4g + p] is loaded with a stride
  of four elements. The rebuilt W is the left operand, so on Hopper it stays in registers; no
  reshape or join of register tiles is needed. Zeros are real zeros in W_p, so NaN/Inf in x
  propagate exactly as in a dense matmul.
* gemv (M == 1): CUDA cores instead of tensor cores. Even and odd rows are separate tiles, laid
  out so that each thread holds P consecutive groups of four rows and loads x for exactly those
  groups itself (no shared-memory exchange); for each kept value the matching x is picked with
  two selects on bits of the meta byte (i0 in 0..2, i1 in 1..3);
  acc += v0 * x[i0] + v1 * x[i1], summed at the end. int8 values become fp32 by the 2^23 magic
  number (exact, no I2F).
  Dense would also compute 0 * x for the skipped zeros, turning a NaN/Inf in x into NaN there;
  the kernel sums x after the main loop and, only when the sum is not finite (a non-finite input,
  rare; or an overflow, harmless), runs a second pass that marks exactly the outputs where such an x meets a zero of W.
  The same gemv reads the gemv layout (formats/sparse24.to_gemv_layout: int32 meta words, int8
  values offset-binary), which the dispatcher makes for a static M of 1 with bf16 x: there one
  mask, one multiply-add and two byte permutes pick x for both rows of a group (no selects, no bit
  tests), and the sum of x is taken from the words the loop loads (sp24_gemv_words_acc). Its
  warps may split K as well as the rows (config KSPLIT): more, shorter programs for narrow N.

Launch configs: CONFIGS (by M bucket and shape), with per-GPU replacements in DEVICE_CONFIGS;
pick_config reads both, for the launcher and the template alike.

The @triton.jit device functions below are self-contained: their source is pasted into the
Inductor template (lowering/template.py) and they are also called by the eager kernel that the
tests run under the interpreter.
"""
from __future__ import annotations

import math
from typing import Optional

import sympy
import torch
import triton
import triton.language as tl

from .._compat import INTERPRETING, inductor_size_hint
from ..formats import compress_24, from_gemv_layout, gemv_layout_ok, to_gemv_layout
from ..registry import KernelSpec, dense_us, register_kernel
from .template import get_template, grid_nm, template_source

__all__ = ["sp24_dot_acc", "sp24_gemv_acc", "sp24_linear", "pick_config", "DEVICE_FUNCTIONS"]


@triton.jit
def sp24_dot_acc(X, V, META, M, N, K, stride_xm, stride_xk, pid_m, pid_n,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                 EVEN_G: tl.constexpr, ALLOW_TF32: tl.constexpr, UPCAST: tl.constexpr,
                 XIDX=None, PERM_K: tl.constexpr = False):
    """fp32 [BLOCK_N, BLOCK_M] tile of y^T for rows pid_n * BLOCK_N.. of W, pid_m * BLOCK_M.. of x.
    PERM_K: W's columns are permuted (formats/permute.py): x is read at x[m, XIDX[k]]."""
    G = K // 4
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.where(rn < N, rn, 0)  # clamp: rows past N compute garbage that the store masks out
    m_ok = rm < M
    shift = ((rn & 1) * 4)[:, None]
    v_ptr = V + rn[:, None] * G
    meta_ptr = META + (rn // 2)[:, None] * G
    x_ptr = X + rm[:, None] * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        rg = g0 + tl.arange(0, BLOCK_G)
        g_ok = rg < G
        if EVEN_G:
            v0 = tl.load(v_ptr + rg[None, :])
            v1 = tl.load(v_ptr + N * G + rg[None, :])
            mb = tl.load(meta_ptr + rg[None, :])
        else:
            v0 = tl.load(v_ptr + rg[None, :], mask=g_ok[None, :], other=0.0)
            v1 = tl.load(v_ptr + N * G + rg[None, :], mask=g_ok[None, :], other=0.0)
            mb = tl.load(meta_ptr + rg[None, :], mask=g_ok[None, :], other=0)
        # int8 weight-only: the values dequantize to x's dtype here (exact for int8 in fp16/bf16);
        # the per-channel scale is a mul after the op that Inductor fuses into the store
        v0 = v0.to(X.dtype.element_ty)
        v1 = v1.to(X.dtype.element_ty)
        code = (mb.to(tl.int32) >> shift) & 15
        i0 = code & 3
        i1 = code >> 2
        zero = tl.zeros_like(v0)
        w0 = tl.where(i0 == 0, v0, zero)
        w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
        w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
        w3 = tl.where(i1 == 3, v1, zero)
        # x as one contiguous [BLOCK_M, 4 * BLOCK_G] tile, split in registers into its four planes
        # X_p[m, g] = x[m, 4g + p] (measured faster than four strided loads: 61 vs 66 us at
        # M=16 N=14336 K=4096, 72 vs 111 us at N=4096 K=14336, H100 bf16)
        rk = 4 * g0 + tl.arange(0, 4 * BLOCK_G)
        if PERM_K:
            kx = tl.load(XIDX + rk, mask=rk < K, other=0)
        else:
            kx = rk
        xt = tl.load(x_ptr + kx[None, :] * stride_xk, mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
        a, b = tl.split(tl.reshape(xt, (BLOCK_M, BLOCK_G, 2, 2)))  # a: p = 0, 2; b: p = 1, 3
        x0, x2 = tl.split(a)
        x1, x3 = tl.split(b)
        x0, x1, x2, x3 = tl.trans(x0), tl.trans(x1), tl.trans(x2), tl.trans(x3)
        if UPCAST:  # the interpreter's bf16 dot is wrong: do it in fp32 there
            w0, w1, w2, w3 = w0.to(tl.float32), w1.to(tl.float32), w2.to(tl.float32), w3.to(tl.float32)
            x0, x1, x2, x3 = x0.to(tl.float32), x1.to(tl.float32), x2.to(tl.float32), x3.to(tl.float32)
        acc = tl.dot(w0, x0, acc, allow_tf32=ALLOW_TF32)
        acc = tl.dot(w1, x1, acc, allow_tf32=ALLOW_TF32)
        acc = tl.dot(w2, x2, acc, allow_tf32=ALLOW_TF32)
        acc = tl.dot(w3, x3, acc, allow_tf32=ALLOW_TF32)
    return acc


@triton.jit
def sp24_to_f32(v, PTX: tl.constexpr):
    """v (int8, bf16, fp16 or fp32) as fp32, exactly, in few instructions: int8 without I2F (a
    1/8-rate instruction): the bits 0x4B000000 | (u ^ 0x80), u the byte, are the float 2^23 + v + 128;
    bf16 by a shift of its bits (one op, not two). PTX: inline PTX allowed (False under the
    interpreter): per 4 int8 values one xor and a byte permute each; uint8 is int8 stored
    offset-binary (v + 128, the gemv layout): the byte permutes only."""
    if v.dtype == tl.int8:
        if PTX:
            asm: tl.constexpr = ("{.reg .b32 t; xor.b32 t, $4, 0x80808080; "
                                 "prmt.b32 $0, t, 0x4B000000, 0x7440; prmt.b32 $1, t, 0x4B000000, 0x7441; "
                                 "prmt.b32 $2, t, 0x4B000000, 0x7442; prmt.b32 $3, t, 0x4B000000, 0x7443;}")
            bits = tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r", [v], dtype=tl.int32, is_pure=True, pack=4)
        else:
            bits = v.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080
        return bits.to(tl.float32, bitcast=True) - 8388736.0
    elif v.dtype == tl.uint8:  # int8 stored offset-binary (v + 128, the gemv layout): no xor needed
        if PTX:
            asm_u: tl.constexpr = ("prmt.b32 $0, $4, 0x4B000000, 0x7440; prmt.b32 $1, $4, 0x4B000000, 0x7441; "
                                   "prmt.b32 $2, $4, 0x4B000000, 0x7442; prmt.b32 $3, $4, 0x4B000000, 0x7443;")
            bits = tl.inline_asm_elementwise(asm_u, "=r,=r,=r,=r,r", [v], dtype=tl.int32, is_pure=True, pack=4)
        else:
            bits = v.to(tl.int32) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - 8388736.0
    elif v.dtype == tl.bfloat16:
        return (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def sp24_gemv_step(acc, v0, v1, mb, x0, x1, x2, x3, SHIFT: tl.constexpr):
    """acc + v0 * x[i0] + v1 * x[i1], with i0 = bits SHIFT..SHIFT+1 (0..2) and i1 = bits SHIFT+2..+3
    (1..3) of the meta byte mb: two selects each, on single bits."""
    xs0 = tl.where((mb & (2 << SHIFT)) != 0, x2, tl.where((mb & (1 << SHIFT)) != 0, x1, x0))
    xs1 = tl.where((mb & (8 << SHIFT)) != 0, tl.where((mb & (4 << SHIFT)) != 0, x3, x2), x1)
    acc += v0 * xs0
    acc += v1 * xs1
    return acc


@triton.jit
def sp24_gemv_rows(V, N, G, pid_n, RH: tl.constexpr, RR: tl.constexpr, W: tl.constexpr, L: tl.constexpr,
                   P: tl.constexpr, KS: tl.constexpr = 1):
    """The gemv's tile of rows, laid out [lanes L, warps W, row pairs per warp RR, groups per lane P]:
    lane [L, 1, 1, 1], the row pair [1, W, RR, 1] (clamped to row pairs < N), the group within the
    step gl ([L, 1, 1, P]; [L, W, 1, P] for KS > 1), and the pointers to the even and the odd rows'
    first-slot values. KS > 1 splits K over the warps: W / KS warps along the rows, and warp w takes
    the (w // (W / KS))-th slice of L * P groups of a step of KS * L * P."""
    lane = tl.arange(0, L)[:, None, None, None]
    if KS == 1:
        pair = pid_n * RH + tl.arange(0, RR)[None, None, :, None] * W + tl.arange(0, W)[None, :, None, None]
        gl = lane * P + tl.arange(0, P)[None, None, None, :]
    else:
        WR: tl.constexpr = W // KS
        w = tl.arange(0, W)[None, :, None, None]
        pair = pid_n * RH + tl.arange(0, RR)[None, None, :, None] * WR + w % WR
        gl = (w // WR) * (L * P) + lane * P + tl.arange(0, P)[None, None, None, :]
    row_e = 2 * pair
    row_o = row_e + 1
    row_e = tl.where(row_e < N, row_e, 0)  # clamp: rows past N compute garbage that the store masks out
    row_o = tl.where(row_o < N, row_o, 0)
    pair = tl.where(2 * pair < N, pair, 0)
    return lane, pair, gl, V + row_e * G + gl, V + row_o * G + gl


@triton.jit
def sp24_gemv_out(acc_e, acc_o, RH: tl.constexpr, BLOCK_N: tl.constexpr, KS: tl.constexpr = 1):
    """The [L, W, RR, *] accumulators of the even and the odd rows summed to the [BLOCK_N] slice
    (with KS > 1, also over the KS warps that split K: warp w = k slice * W / KS + row slot)."""
    se = tl.sum(tl.sum(acc_e, axis=3), axis=0)  # [W, RR]
    so = tl.sum(tl.sum(acc_o, axis=3), axis=0)
    if KS > 1:
        se = tl.sum(tl.reshape(se, (KS, se.shape[0] // KS, se.shape[1])), axis=0)
        so = tl.sum(tl.reshape(so, (KS, so.shape[0] // KS, so.shape[1])), axis=0)
    out_e = tl.reshape(tl.trans(se), (RH,))  # [W / KS, RR] -> pair r * W / KS + w
    out_o = tl.reshape(tl.trans(so), (RH,))
    return tl.reshape(tl.join(out_e, out_o), (BLOCK_N,))


@triton.jit
def sp24_gemv_bytes_acc(X, V, META, m, N, K, stride_xm, stride_xk, pid_n,
                  BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN_G: tl.constexpr,
                  NUM_WARPS: tl.constexpr, PTX: tl.constexpr, XIDX=None, PERM_K: tl.constexpr = False):
    """fp32 [BLOCK_N] slice of y[m, :] for rows pid_n * BLOCK_N.. of W (CUDA cores).

    Even and odd rows are two tiles (the meta nibble of each is then a constant bit position), laid
    out as [lanes, warps, row pairs per warp, groups per lane] so that the loads give every thread
    P consecutive groups of its rows and x for exactly those groups: each warp loads all of x's
    step, with no shared-memory exchange (NUM_WARPS must be the launch's num_warps for that; any
    value is correct). PTX: inline PTX allowed (False under the interpreter). PERM_K: x read at
    XIDX (sp24_dot_acc)."""
    G = K // 4
    if EVEN_G:
        G = tl.multiple_of(G, BLOCK_G)
    RH: tl.constexpr = BLOCK_N // 2                       # row pairs (2r, 2r + 1 share meta[r])
    W: tl.constexpr = min(NUM_WARPS, RH)
    RR: tl.constexpr = RH // W                            # row pairs per warp
    L: tl.constexpr = min(32, BLOCK_G)                    # lanes along the groups
    P: tl.constexpr = BLOCK_G // L                        # consecutive groups per lane
    XB: tl.constexpr = 16 // (X.dtype.element_ty.primitive_bitwidth // 8)  # x elements per 16-byte load
    H: tl.constexpr = max(4 * P // XB, 1)
    XE: tl.constexpr = 4 * P // H
    WORDS: tl.constexpr = EVEN_G and P % 4 == 0           # meta as 32-bit words (4 groups, aligned)
    lane, pair, gl, ve_ptr, vo_ptr = sp24_gemv_rows(V, N, G, pid_n, RH, RR, W, L, P)
    meta_ptr = META + pair * G + gl
    if WORDS:
        mw_ptr = META.to(tl.pointer_type(tl.int32)) + pair * (G // 4) + lane * (P // 4) + tl.arange(0, P // 4)[None, None, None, :]
    # x of the lane's groups, [L, W, H, XE]: the same addresses for every warp
    xl = (4 * P * lane + XE * tl.arange(0, H)[None, None, :, None] + tl.arange(0, XE)[None, None, None, :]
          + 0 * tl.arange(0, W)[None, :, None, None])
    x_ptr = X + m * stride_xm + xl * stride_xk
    acc_e = tl.zeros((L, W, RR, P), dtype=tl.float32)
    acc_o = tl.zeros((L, W, RR, P), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        if EVEN_G:
            ve0 = tl.load(ve_ptr + g0, eviction_policy="evict_first")
            ve1 = tl.load(ve_ptr + N * G + g0, eviction_policy="evict_first")
            vo0 = tl.load(vo_ptr + g0, eviction_policy="evict_first")
            vo1 = tl.load(vo_ptr + N * G + g0, eviction_policy="evict_first")
            if PERM_K:
                xt = tl.load(X + m * stride_xm + tl.load(XIDX + 4 * g0 + xl) * stride_xk, eviction_policy="evict_last")
            else:
                xt = tl.load(x_ptr + 4 * g0 * stride_xk, eviction_policy="evict_last")
        else:
            g_ok = g0 + gl < G
            ve0 = tl.load(ve_ptr + g0, mask=g_ok, other=0.0, eviction_policy="evict_first")
            ve1 = tl.load(ve_ptr + N * G + g0, mask=g_ok, other=0.0, eviction_policy="evict_first")
            vo0 = tl.load(vo_ptr + g0, mask=g_ok, other=0.0, eviction_policy="evict_first")
            vo1 = tl.load(vo_ptr + N * G + g0, mask=g_ok, other=0.0, eviction_policy="evict_first")
            if PERM_K:
                kx = tl.load(XIDX + 4 * g0 + xl, mask=4 * g0 + xl < K, other=0)
                xt = tl.load(X + m * stride_xm + kx * stride_xk, mask=4 * g0 + xl < K, other=0.0,
                             eviction_policy="evict_last")
            else:
                xt = tl.load(x_ptr + 4 * g0 * stride_xk, mask=4 * g0 + xl < K, other=0.0, eviction_policy="evict_last")
        if WORDS:  # bit tests on the loaded words need no byte extraction
            mw = tl.load(mw_ptr + g0 // 4, eviction_policy="evict_first")
            mb = tl.reshape(mw[:, :, :, :, None] >> (8 * tl.arange(0, 4))[None, None, None, None, :], (L, W, RR, P))
        elif EVEN_G:
            mb = tl.load(meta_ptr + g0, eviction_policy="evict_first").to(tl.int32)
        else:
            mb = tl.load(meta_ptr + g0, mask=g_ok, other=0, eviction_policy="evict_first").to(tl.int32)
        # [L, W, H, XE] -> the four planes x_p[g] = x[4g + p] as [L, W, 1, P]
        xt = sp24_to_f32(xt, PTX)
        a, b = tl.split(tl.reshape(xt, (L, W, 1, P, 2, 2)))  # a: p = 0, 2; b: p = 1, 3
        x0, x2 = tl.split(a)
        x1, x3 = tl.split(b)
        # even rows: the low nibble of the meta byte, odd rows: the high one
        acc_e = sp24_gemv_step(acc_e, sp24_to_f32(ve0, PTX), sp24_to_f32(ve1, PTX), mb, x0, x1, x2, x3, 0)
        acc_o = sp24_gemv_step(acc_o, sp24_to_f32(vo0, PTX), sp24_to_f32(vo1, PTX), mb, x0, x1, x2, x3, 4)
    out = sp24_gemv_out(acc_e, acc_o, RH, BLOCK_N)
    # Non-finite x? The sum of x is non-finite iff some x is NaN/Inf (or, harmlessly, on overflow).
    # One pass over x after the main loop (x is in cache), each x once per program rather than once
    # per warp in the loop: packed bf16 adds where x is bf16 (the range of fp32), else fp32.
    PT: tl.constexpr = tl.bfloat16 if X.dtype.element_ty == tl.bfloat16 else tl.float32
    poison = tl.zeros((32 * NUM_WARPS * XB,), dtype=PT)
    for kx in range(0, K, 32 * NUM_WARPS * XB):
        rk = kx + tl.arange(0, 32 * NUM_WARPS * XB)
        poison += tl.load(X + m * stride_xm + rk * stride_xk, mask=rk < K, other=0.0).to(PT)
    p = tl.sum(poison.to(tl.float32), axis=0)
    return sp24_gemv_fixup(out, p, X, META, m, N, K, stride_xm, stride_xk, pid_n, BLOCK_N, BLOCK_G, XIDX, PERM_K)


@triton.jit
def sp24_gemv_fixup(out, p, X, META, m, N, K, stride_xm, stride_xk, pid_n,
                    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, XIDX=None, PERM_K: tl.constexpr = False):
    """out [BLOCK_N], with NaN where dense would have one that the zero-skipping gemv lost: p is a sum
    of every x[m, k], non-finite iff some x is NaN/Inf (or, harmlessly, on overflow). Its tiles are
    at most 32 groups wide: the rare path should not set the kernel's register count. PERM_K: x
    read at XIDX (sp24_dot_acc)."""
    G = K // 4
    FG: tl.constexpr = min(BLOCK_G, 32)
    if p * 0.0 != 0.0:
        # Some x[m, k] is NaN/Inf (rare; the branch is uniform over the program). Dense computes
        # 0 * x for the zeros this kernel skips, so y[m, n] is NaN wherever such an x meets a zero
        # of row n: count the non-finite x of each group and those at the kept positions.
        bad = tl.zeros((BLOCK_N,), dtype=tl.int32)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rn = tl.where(rn < N, rn, 0)
        x_row = X + m * stride_xm
        for g0 in range(0, G, FG):
            rg = g0 + tl.arange(0, FG)
            g_ok = rg < G
            if META.dtype.element_ty == tl.int32:  # the gemv layout's words
                wd = tl.load(META + (rn // 2)[:, None] * (G // 4) + (rg // 4)[None, :], mask=g_ok[None, :], other=0)
                base = 2 * (rg % 4)[None, :] + 16 * (rn & 1)[:, None]
                i0 = (wd >> base) & 3
                i1 = (wd >> (base + 8)) & 3
            else:
                mb = tl.load(META + (rn // 2)[:, None] * G + rg[None, :], mask=g_ok[None, :], other=0)
                code = (mb.to(tl.int32) >> ((rn & 1) * 4)[:, None]) & 15
                i0 = code & 3
                i1 = code >> 2
            if PERM_K:
                z0 = tl.load(x_row + tl.load(XIDX + 4 * rg, mask=g_ok, other=0) * stride_xk, mask=g_ok,
                             other=0.0).to(tl.float32) * 0.0
                z1 = tl.load(x_row + tl.load(XIDX + 4 * rg + 1, mask=g_ok, other=0) * stride_xk, mask=g_ok,
                             other=0.0).to(tl.float32) * 0.0
                z2 = tl.load(x_row + tl.load(XIDX + 4 * rg + 2, mask=g_ok, other=0) * stride_xk, mask=g_ok,
                             other=0.0).to(tl.float32) * 0.0
                z3 = tl.load(x_row + tl.load(XIDX + 4 * rg + 3, mask=g_ok, other=0) * stride_xk, mask=g_ok,
                             other=0.0).to(tl.float32) * 0.0
            else:
                xp = x_row + 4 * rg * stride_xk
                z0 = tl.load(xp, mask=g_ok, other=0.0).to(tl.float32) * 0.0
                z1 = tl.load(xp + stride_xk, mask=g_ok, other=0.0).to(tl.float32) * 0.0
                z2 = tl.load(xp + 2 * stride_xk, mask=g_ok, other=0.0).to(tl.float32) * 0.0
                z3 = tl.load(xp + 3 * stride_xk, mask=g_ok, other=0.0).to(tl.float32) * 0.0
            n_group = (z0 != z0).to(tl.int32) + (z1 != z1).to(tl.int32) + (z2 != z2).to(tl.int32) + (z3 != z3).to(tl.int32)
            z0b, z1b, z2b, z3b = z0[None, :], z1[None, :], z2[None, :], z3[None, :]
            k0 = tl.where(i0 == 0, z0b, tl.where(i0 == 1, z1b, z2b))
            k1 = tl.where(i1 == 3, z3b, tl.where(i1 == 2, z2b, z1b))
            n_kept = (k0 != k0).to(tl.int32) + (k1 != k1).to(tl.int32)
            bad += tl.sum((n_group[None, :] > n_kept).to(tl.int32), axis=1)
        out = tl.where(bad > 0, float("nan"), out)
    return out


@triton.jit
def sp24_prmt(a, b, s, PTX: tl.constexpr):
    """PTX prmt.b32 (default mode): byte j of the result is byte (s >> 4j) & 7 of the eight bytes
    {b, a} (a holds bytes 0..3); only the low 16 bits of s are read. PTX False: the same in
    integer ops (the interpreter)."""
    if PTX:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, s],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        t = (b.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | a.to(tl.uint32, bitcast=True).to(tl.uint64)
        out = tl.zeros_like(s)
        for j in tl.static_range(4):
            sh = ((s >> (4 * j)) & 7).to(tl.uint64) * 8
            out |= ((t >> sh) & 0xFF).to(tl.int32) << (8 * j)
        return out


@triton.jit
def sp24_quarters(t):
    """[..., 4n] -> the four [..., n] tensors of its elements 4i + j, j = 0..3."""
    a, b = tl.split(tl.reshape(t, t.shape[:-1] + (t.shape[-1] // 4, 2, 2)))  # a: j = 0, 2; b: j = 1, 3
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def sp24_words_step(acc_e, acc_o, ve0, ve1, vo0, vo1, s, xa, xb, PTX: tl.constexpr):
    """One group of a row pair: acc + v0 * x[i0] + v1 * x[i1] for the even and the odd row. xa, xb:
    x[4g..4g+1], x[4g+2..4g+3] as words of two bf16; s: (word >> 2j) & 0x03030303 of the meta word,
    the positions i0, i1 (even row), i0, i1 (odd row) as bytes. One multiply-add makes both rows'
    byte-permute selectors (0x10 + 0x22 * i per byte: the two bytes of x[i]); one permute puts x[i0]
    in the low and x[i1] in the high half of a word, which are then fp32 by a shift and a mask."""
    sel = s * 0x22 + 0x10101010  # uint32
    r = sp24_prmt(xa, xb, sel.to(tl.int32, bitcast=True), PTX)
    acc_e += ve0 * (r << 16).to(tl.float32, bitcast=True)
    acc_e += ve1 * (r & -65536).to(tl.float32, bitcast=True)
    r = sp24_prmt(xa, xb, (sel >> 16).to(tl.int32, bitcast=True), PTX)
    acc_o += vo0 * (r << 16).to(tl.float32, bitcast=True)
    acc_o += vo1 * (r & -65536).to(tl.float32, bitcast=True)
    return acc_e, acc_o


@triton.jit
def sp24_gemv_words_acc(X, V, META, m, N, K, stride_xm, pid_n,
                        BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN_G: tl.constexpr,
                        NUM_WARPS: tl.constexpr, PTX: tl.constexpr, KSPLIT: tl.constexpr = 1,
                        XIDX=None, PERM_K: tl.constexpr = False):
    """sp24_gemv_bytes_acc for the gemv layout (formats/sparse24.py: int32 meta words; int8 values as
    uint8 v + 128) and bf16 x with unit stride along K. Same tiles; x is loaded as 32-bit words
    (x[4g..4g+1], x[4g+2..4g+3]), and per group and row pair a mask, a multiply-add and two byte
    permutes pick the x of both rows' kept values, with no selects and no bit tests (13.1 SASS
    instructions per group and thread for int8, 11.1 for bf16, against 16.9 and 14.5). The sum of x
    for the non-finite check is taken from the same words in the loop (packed bf16 adds), not by
    a second pass over x.

    KSPLIT > 1: the warps split K as well as the rows (NUM_WARPS / KSPLIT along the rows; a step is
    KSPLIT * BLOCK_G groups, warp slices of BLOCK_G): fewer rows a program for the same warps,
    so a grid with more, shorter programs (a smaller last wave).

    PERM_K: x read at XIDX (sp24_dot_acc): each word is built from the two gathered bf16 halves."""
    G = K // 4
    STEP: tl.constexpr = KSPLIT * BLOCK_G
    if EVEN_G:
        G = tl.multiple_of(G, STEP)
    RH: tl.constexpr = BLOCK_N // 2
    W: tl.constexpr = min(NUM_WARPS, RH) if KSPLIT == 1 else NUM_WARPS
    RR: tl.constexpr = RH // (W // KSPLIT)
    tl.static_assert(RR * (W // KSPLIT) == RH, "NUM_WARPS / KSPLIT must divide the row pairs")
    L: tl.constexpr = min(32, BLOCK_G)
    P: tl.constexpr = BLOCK_G // L
    tl.static_assert(P % 4 == 0, "the gemv layout needs BLOCK_G >= 128 (whole meta words per lane)")
    PW: tl.constexpr = P // 4                             # meta words per lane and step
    lane, pair, gl, ve_ptr, vo_ptr = sp24_gemv_rows(V, N, G, pid_n, RH, RR, W, L, P, KSPLIT)
    wl = lane * PW + tl.arange(0, PW)[None, None, None, :]  # [L, 1, 1, PW]: meta word within the step
    if KSPLIT > 1:  # the warp's slice of the step, in groups
        kofs = (tl.arange(0, W)[None, :, None, None] // (W // KSPLIT)) * BLOCK_G
        wl = wl + kofs // 4
    mw_ptr = META + pair * (G // 4) + wl
    # x as words, [L, W, H, 4]: 16-byte pieces (a [L, W, 1, 2P] tile would not get the lane's words
    # into one thread, and a layout conversion through shared memory would follow); the same
    # addresses for every warp (each warp reads all of x)
    H: tl.constexpr = P // 2
    xl = (2 * P * lane + 4 * tl.arange(0, H)[None, None, :, None] + tl.arange(0, 4)[None, None, None, :]
          + 0 * tl.arange(0, W)[None, :, None, None])
    if KSPLIT > 1:
        xl = xl + 2 * kofs
    x_ptr = X.to(tl.pointer_type(tl.int32)) + (m * stride_xm) // 2 + xl
    x_half = X.to(tl.pointer_type(tl.int16)) + m * stride_xm  # PERM_K: bf16 bits, gathered
    acc_e = tl.zeros((L, W, RR, PW), dtype=tl.float32)
    acc_o = tl.zeros((L, W, RR, PW), dtype=tl.float32)
    if PTX:
        poison = tl.zeros((L, W, H, 4), dtype=tl.int32)  # bf16x2 sums
    else:
        poison = tl.zeros((L, W, H, 4), dtype=tl.float32)
    for g0 in range(0, G, STEP):
        if EVEN_G:
            ve0 = tl.load(ve_ptr + g0, eviction_policy="evict_first")
            ve1 = tl.load(ve_ptr + N * G + g0, eviction_policy="evict_first")
            vo0 = tl.load(vo_ptr + g0, eviction_policy="evict_first")
            vo1 = tl.load(vo_ptr + N * G + g0, eviction_policy="evict_first")
            mw = tl.load(mw_ptr + g0 // 4, eviction_policy="evict_first")
            if PERM_K:
                ke = 2 * (2 * g0 + xl)
                lo = tl.load(x_half + tl.load(XIDX + ke), eviction_policy="evict_last").to(tl.int32) & 0xFFFF
                hi = tl.load(x_half + tl.load(XIDX + ke + 1), eviction_policy="evict_last").to(tl.int32)
                xw = lo | (hi << 16)
            else:
                xw = tl.load(x_ptr + 2 * g0, eviction_policy="evict_last")
        else:
            g_ok = g0 + gl < G
            ve0 = tl.load(ve_ptr + g0, mask=g_ok, other=0, eviction_policy="evict_first")
            ve1 = tl.load(ve_ptr + N * G + g0, mask=g_ok, other=0, eviction_policy="evict_first")
            vo0 = tl.load(vo_ptr + g0, mask=g_ok, other=0, eviction_policy="evict_first")
            vo1 = tl.load(vo_ptr + N * G + g0, mask=g_ok, other=0, eviction_policy="evict_first")
            mw = tl.load(mw_ptr + g0 // 4, mask=g0 // 4 + wl < G // 4, other=0, eviction_policy="evict_first")
            if PERM_K:
                ke = 2 * (2 * g0 + xl)
                x_ok = 2 * g0 + xl < 2 * G
                lo = tl.load(x_half + tl.load(XIDX + ke, mask=x_ok, other=0), mask=x_ok, other=0,
                             eviction_policy="evict_last").to(tl.int32) & 0xFFFF
                hi = tl.load(x_half + tl.load(XIDX + ke + 1, mask=x_ok, other=0), mask=x_ok, other=0,
                             eviction_policy="evict_last").to(tl.int32)
                xw = lo | (hi << 16)
            else:
                xw = tl.load(x_ptr + 2 * g0, mask=2 * g0 + xl < 2 * G, other=0, eviction_policy="evict_last")
        if PTX:
            poison = tl.inline_asm_elementwise(
                "{.reg .b32 one; mov.b32 one, 0x3F803F80; fma.rn.bf16x2 $0, $1, one, $2;}", "=r,r,r",
                [xw, poison], dtype=tl.int32, is_pure=True, pack=1)
        else:
            poison += (xw << 16).to(tl.float32, bitcast=True) + (xw & -65536).to(tl.float32, bitcast=True)
        xa, xb = tl.split(tl.reshape(xw, (L, W, 1, P, 2)))
        xa0, xa1, xa2, xa3 = sp24_quarters(xa)
        xb0, xb1, xb2, xb3 = sp24_quarters(xb)
        e00, e01, e02, e03 = sp24_quarters(sp24_to_f32(ve0, PTX))
        e10, e11, e12, e13 = sp24_quarters(sp24_to_f32(ve1, PTX))
        o00, o01, o02, o03 = sp24_quarters(sp24_to_f32(vo0, PTX))
        o10, o11, o12, o13 = sp24_quarters(sp24_to_f32(vo1, PTX))
        mwu = mw.to(tl.uint32, bitcast=True)
        acc_e, acc_o = sp24_words_step(acc_e, acc_o, e00, e10, o00, o10, mwu & 0x03030303, xa0, xb0, PTX)
        acc_e, acc_o = sp24_words_step(acc_e, acc_o, e01, e11, o01, o11, (mwu >> 2) & 0x03030303, xa1, xb1, PTX)
        acc_e, acc_o = sp24_words_step(acc_e, acc_o, e02, e12, o02, o12, (mwu >> 4) & 0x03030303, xa2, xb2, PTX)
        acc_e, acc_o = sp24_words_step(acc_e, acc_o, e03, e13, o03, o13, (mwu >> 6) & 0x03030303, xa3, xb3, PTX)
    out = sp24_gemv_out(acc_e, acc_o, RH, BLOCK_N, KSPLIT)
    if PTX:
        poison = (poison << 16).to(tl.float32, bitcast=True) + (poison & -65536).to(tl.float32, bitcast=True)
    p = tl.sum(tl.reshape(poison, (L * W * H * 4,)), axis=0)
    return sp24_gemv_fixup(out, p, X, META, m, N, K, stride_xm, 1, pid_n, BLOCK_N, BLOCK_G, XIDX, PERM_K)


@triton.jit
def sp24_gemv_acc(X, V, META, m, N, K, stride_xm, stride_xk, pid_n,
                  BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN_G: tl.constexpr,
                  NUM_WARPS: tl.constexpr, PTX: tl.constexpr, KSPLIT: tl.constexpr = 1,
                  XIDX=None, PERM_K: tl.constexpr = False):
    """fp32 [BLOCK_N] slice of y[m, :] for rows pid_n * BLOCK_N.. of W (CUDA cores), for either
    meta layout: int32 words (the gemv layout; x bf16 with stride_xk 1) or the uint8 bytes.
    PERM_K: x read at XIDX (sp24_dot_acc)."""
    if META.dtype.element_ty == tl.int32:
        out = sp24_gemv_words_acc(X, V, META, m, N, K, stride_xm, pid_n, BLOCK_N, BLOCK_G, EVEN_G, NUM_WARPS, PTX,
                                  KSPLIT, XIDX, PERM_K)
    else:
        out = sp24_gemv_bytes_acc(X, V, META, m, N, K, stride_xm, stride_xk, pid_n, BLOCK_N, BLOCK_G, EVEN_G,
                                  NUM_WARPS, PTX, XIDX, PERM_K)
    return out


# Sources pasted into the Inductor template, in dependency order.
DEVICE_FUNCTIONS = (sp24_dot_acc, sp24_to_f32, sp24_gemv_step, sp24_gemv_fixup, sp24_gemv_rows, sp24_gemv_out,
                    sp24_gemv_bytes_acc, sp24_prmt,
                    sp24_quarters, sp24_words_step, sp24_gemv_words_acc, sp24_gemv_acc)


@triton.jit
def _sp24_linear_kernel(X, V, META, B, Y, XIDX, M, N, K, stride_xm, stride_xk, stride_ym, stride_yn,
                        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GEMV: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                        EVEN_G: tl.constexpr, ALLOW_TF32: tl.constexpr, UPCAST: tl.constexpr,
                        NUM_WARPS: tl.constexpr, PTX: tl.constexpr, KSPLIT: tl.constexpr,
                        PERM_K: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if GEMV:
        rm = pid_m + tl.arange(0, 1)
        acc = sp24_gemv_acc(X, V, META, pid_m, N, K, stride_xm, stride_xk, pid_n,
                            BLOCK_N, BLOCK_G, EVEN_G, NUM_WARPS, PTX, KSPLIT, XIDX, PERM_K)[:, None]
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = sp24_dot_acc(X, V, META, M, N, K, stride_xm, stride_xk, pid_m, pid_n,
                           BLOCK_M, BLOCK_N, BLOCK_G, EVEN_G, ALLOW_TF32, UPCAST, XIDX, PERM_K)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    if ACT == "relu":
        acc = tl.maximum(acc, 0.0)
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    tl.store(Y + rm[None, :] * stride_ym + rn[:, None] * stride_yn, acc.to(Y.dtype.element_ty), mask=mask)


# ---- launch parameters: one table (bucket of M -> config), the measurements behind each entry

CONFIGS = {
    # M == 1: CUDA-core gemv, many programs (N / BLOCK_N) and long K steps. The configs below (four
    # rows and eight groups a thread; num_warps = BLOCK_N / 4 so every warp has two row pairs) were
    # chosen from the SASS count, then swept on the H100 (bench/sweep_gemv.py):
    # N=14336 K=4096 int8 24.1 us (best 23.9), bf16 31.1 (best); the narrow shapes are fastest with
    # BLOCK_G 512: int8 12.1 / 24.7 us at 4096x4096 / 4096x14336 (256: 12.8 / 27.4), bf16 14.5-14.6 / 33.2.
    "gemv": dict(GEMV=True, BLOCK_M=1, BLOCK_N=16, BLOCK_G=256, num_warps=4, num_stages=2),
    "gemv_narrow": dict(GEMV=True, BLOCK_M=1, BLOCK_N=16, BLOCK_G=512, num_warps=4, num_stages=2),
    # The gemv layout (int32 meta words, bf16 x), H100, us (eager launch / compiled
    # template; they differ: the template's literal N and K change ptxas's register count, e.g. 80
    # instead of 128 for 8 rows, 2 warps, BLOCK_G 256, and with it the number of waves):
    # int8 values, N >= 8192: 4 rows, 1 warp, BLOCK_G 512: 22.3 / 22.4 at 14336x4096 (8 rows, 2 warps,
    # BLOCK_G 256: 21.7 / 24.5); the byte layout's table 24.2-24.4 / 24.0-24.6. int8, N < 8192: 16
    # rows, 4 warps, BLOCK_G 512: 11.7 / - at 4096x4096, 22.4 / 22.5 at 4096x14336 (bytes 25.0-27.1 /
    # 24.0-25.1). bf16 values: 8 rows, 2 warps, BLOCK_G 256: 30.8 / 31.6 and 13.8 / 14.6 (bytes
    # 31.1-31.5 / 31.1, 14.6 / 14.7).
    "gemv_words": dict(GEMV=True, BLOCK_M=1, BLOCK_N=8, BLOCK_G=256, num_warps=2, num_stages=2),
    "gemv_words_narrow": dict(GEMV=True, BLOCK_M=1, BLOCK_N=8, BLOCK_G=256, num_warps=2, num_stages=2),  # N < 8192
    "gemv_words_int8": dict(GEMV=True, BLOCK_M=1, BLOCK_N=4, BLOCK_G=512, num_warps=1, num_stages=2),
    "gemv_words_narrow_int8": dict(GEMV=True, BLOCK_M=1, BLOCK_N=16, BLOCK_G=512, num_warps=4, num_stages=2),
    # M > 1: tensor cores. Best found on the H100 (bf16), still slower than dense: M=16 at
    # 0.79-0.94x, M=64 at 0.61-0.80x (docs/performance.md); the dispatcher keeps those layers dense.
    "m16": dict(GEMV=False, BLOCK_M=16, BLOCK_N=32, BLOCK_G=64, num_warps=4, num_stages=3),
    "m64": dict(GEMV=False, BLOCK_M=64, BLOCK_N=64, BLOCK_G=32, num_warps=4, num_stages=3),
    "m128": dict(GEMV=False, BLOCK_M=128, BLOCK_N=128, BLOCK_G=32, num_warps=8, num_stages=3),
}


# Per-GPU replacements of CONFIGS entries, by a substring of the device name (the first match wins).
# H200, weight-only int8 (docs/performance.md; bench/sweep_gemv.py --compiled-configs).
# The compiled template's register count, not the launcher's, sets the programs per SM and with it
# the waves: Inductor renders N and K as literals and ptxas then budgets a config differently (4 rows,
# 1 warp, BLOCK_G 256: 128 registers as launcher, 79 as template: 25 programs per SM, 1.09 waves at
# N = 14336, compiled 20.5 us where the launcher takes 18.0). Chosen by the template's waves:
# * N >= 8192: 4 rows, 1 warp, BLOCK_G 128 (63 registers as template, 32 programs per SM: all 3584
#   programs of N = 14336 in one wave): compiled 18.8 us at 14336x4096 against the table's 20.4.
# * N < 8192: 2 rows, 2 warps splitting K (KSPLIT 2), BLOCK_G 256 (64 registers, 16 programs per
#   SM: 0.97 waves at N = 4096): compiled 17.5 us at 4096x14336 (8 rows, 4 warps, KSPLIT 2:
#   17.6-17.8; the table's 16 rows, 4 warps: 20.0, a short last wave).
# Together: 8 Llama MLP blocks, decode b1, 352.2 / 352.6 us against 376.8 / 378.5 with the table's
# entries (2.20x of dense compile against 2.06x). The H100 has as many SMs (132); these are
# not timed there.
# bf16 values, the same two shapes of config (compiled): N >= 8192, 14336x4096: 23.3 us
# against the table's 8 rows / 2 warps / BLOCK_G 256 at 25.1 (8 rows, 2 warps, BLOCK_G 128: 23.7);
# N < 8192, 4096x14336: 24.2 against 27.9 (BLOCK_G 128: 24.3; 8 or 16 rows at BLOCK_G 128: 32-33).
# 8 Llama MLP blocks, bf16 2:4, decode b1: 455.5 / 455.4 us against 522.8 / 522.4 (1.72x of dense
# compile against 1.50x).
DEVICE_CONFIGS: dict[str, dict[str, dict]] = {
    "H200": {
        "gemv_words": dict(GEMV=True, BLOCK_M=1, BLOCK_N=4, BLOCK_G=128, num_warps=1, num_stages=2),
        "gemv_words_narrow": dict(GEMV=True, BLOCK_M=1, BLOCK_N=2, BLOCK_G=256, num_warps=2, num_stages=2, KSPLIT=2),
        "gemv_words_int8": dict(GEMV=True, BLOCK_M=1, BLOCK_N=4, BLOCK_G=128, num_warps=1, num_stages=2),
        "gemv_words_narrow_int8": dict(GEMV=True, BLOCK_M=1, BLOCK_N=2, BLOCK_G=256, num_warps=2, num_stages=2,
                                       KSPLIT=2),
    },
}


def _device_name(device) -> str:
    if device is None or getattr(device, "type", "cuda") != "cuda" or not torch.cuda.is_available():
        return ""
    try:
        return torch.cuda.get_device_name(device)
    except Exception:  # a device this process cannot query: the default table
        return ""


def _config(key: str, device) -> dict:
    name = _device_name(device)
    for sub, table in DEVICE_CONFIGS.items():
        if sub in name and key in table:
            return dict(table[key])
    return dict(CONFIGS[key])


def gemv_words_key(n: int, int8: bool) -> str:
    """The CONFIGS / DEVICE_CONFIGS key of the gemv layout's kernel for N rows and int8 or bf16 values."""
    return ("gemv_words_narrow" if n < 8192 else "gemv_words") + ("_int8" if int8 else "")


def pick_config(m: Optional[int], n: int, k: int, words: bool = False, int8: bool = False, device=None) -> dict:
    """The launch configuration for an M (None: unknown / dynamic); words: the gemv layout (M = 1),
    int8: its values are int8 (stored as uint8); device (a torch.device, or None for the default
    table): the GPU, whose DEVICE_CONFIGS entries replace the table's."""
    if m == 1 and words:
        return _config(gemv_words_key(n, int8), device)
    if m == 1:
        return dict(CONFIGS["gemv"] if n >= 8192 else CONFIGS["gemv_narrow"])
    if m is not None and m <= 16:
        return dict(CONFIGS["m16"])
    if m is not None and m <= 64:
        return dict(CONFIGS["m64"])
    return dict(CONFIGS["m128"])


def allow_tf32(dtype: torch.dtype) -> bool:
    """tf32 for fp32 inputs only where torch allows it for dense matmuls (never in the interpreter)."""
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRETING


def sp24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None,
                *, activation: Optional[str] = None, config: Optional[dict] = None,
                x_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eager launcher: y = act(x @ W^T + bias) for a 2-D x [M, K] and W in the 2:4 layout.

    x_index [K] int32 (formats/permute.kernel_indices): (values, meta) hold a column-permuted weight
    Wp = W[:, cols] and x_index = cols: the kernels read x[:, x_index], so y = x @ W^T.
    values may be int8 (a weight-only quantized W): W is then used as its integer values in x's
    dtype, and the caller applies the scales (in a compiled graph, a mul fused into the store).
    (values, meta) may also be in the gemv layout (formats/sparse24.to_gemv_layout: int32 meta words,
    int8 values as uint8): the M = 1 kernel reads it as is when x is bf16, else it is converted back."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _, n, g = values.shape
    m, k = x.shape
    if k != 4 * g:
        raise ValueError(f"x has K={k} but the weight has K={4 * g}")
    words = meta.dtype == torch.int32
    if words:
        if meta.shape != (math.ceil(n / 2), g // 4) or g % 4:
            raise ValueError(f"gemv-layout meta must be int32 [{math.ceil(n / 2)}, {g // 4}], got {tuple(meta.shape)}")
        if m != 1 or x.dtype != torch.bfloat16 or (config is not None and not config.get("GEMV")):
            values, meta = from_gemv_layout(values, meta)
            words = False
        elif x.stride(1) != 1 or x.data_ptr() % 16:  # read as 32-bit words: unit stride, aligned
            x = x.clone(memory_format=torch.contiguous_format)
    elif meta.shape != (math.ceil(n / 2), g) or meta.dtype != torch.uint8:
        raise ValueError(f"meta must be uint8 [{math.ceil(n / 2)}, {g}], got {meta.dtype} {tuple(meta.shape)}")
    if x_index is not None and not (x_index.dtype == torch.int32 and x_index.shape == (k,) and x_index.is_contiguous()
                                    and x_index.device == x.device):
        raise ValueError(f"x_index must be a contiguous int32 [{k}] tensor on {x.device}, got "
                         f"{x_index.dtype} {tuple(x_index.shape)} on {x_index.device}")
    int8 = values.dtype in (torch.int8, torch.uint8)
    if values.dtype not in (x.dtype, torch.int8) and not (words and values.dtype == torch.uint8):
        raise ValueError(f"x is {x.dtype} but the weight is {values.dtype} (int8 values: weight-only quantized)")
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    values, meta = values.contiguous(), meta.contiguous()
    cfg = dict(config or pick_config(m, n, k, words, int8, device=x.device))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    cfg.setdefault("KSPLIT", 1)
    if cfg["KSPLIT"] != 1 and not (words and cfg["GEMV"]):
        raise ValueError("config KSPLIT > 1 is for the gemv layout's kernel (M = 1, bf16 x) only")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), m if cfg["GEMV"] else triton.cdiv(m, cfg["BLOCK_M"]))
    _sp24_linear_kernel[grid](
        x, values, meta, bias if bias is not None else x, y, x_index if x_index is not None else meta, m, n, k,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, ACT=activation or "none",
        EVEN_G=g % (cfg["BLOCK_G"] * cfg["KSPLIT"]) == 0, ALLOW_TF32=allow_tf32(x.dtype),
        UPCAST=INTERPRETING, NUM_WARPS=num_warps, PTX=not INTERPRETING, PERM_K=x_index is not None,
        num_warps=num_warps, num_stages=num_stages, **cfg)
    return y


# ---- the Inductor template: the device functions above plus a body Inductor renders

_TEMPLATE_BODY = r'''
{{def_kernel("X", "V", "META")}}
    M = {{size("X", 0)}}
    K = {{size("X", 1)}}
    N = {{size("V", 1)}}
    stride_xm = {{stride("X", 0)}}
    stride_xk = {{stride("X", 1)}}
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
{%- if GEMV %}
    rm = pid_m + tl.arange(0, 1)
    acc = sp24_gemv_acc(X, V, META, pid_m, N, K, stride_xm, stride_xk, pid_n,
                        BLOCK_N, BLOCK_G, EVEN_G, NUM_WARPS, True, KSPLIT)[:, None]
{%- else %}
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = sp24_dot_acc(X, V, META, M, N, K, stride_xm, stride_xk, pid_m, pid_n,
                       BLOCK_M, BLOCK_N, BLOCK_G, EVEN_G, ALLOW_TF32, UPCAST)
{%- endif %}
    idx_m = rm[None, :]
    idx_n = rn[:, None]
    mask = (idx_m < M) & (idx_n < N)
    {{store_output(("idx_m", "idx_n"), "acc", "mask", val_shape=("BLOCK_N", "BLOCK_M"))}}
'''

TEMPLATE_NAME = "sparse_inductor_sp24"


def _template_body(perm_k: bool = False) -> str:
    """The template body; perm_k: a column-permuted weight, x read at input X_INDEX (sp24_linear's
    x_index). Only x's reads change: the store and the epilogue see y's own columns."""
    if not perm_k:
        return _TEMPLATE_BODY
    return _TEMPLATE_BODY.replace('def_kernel("X", "V", "META")', 'def_kernel("X", "V", "META", "X_INDEX")') \
        .replace("NUM_WARPS, True, KSPLIT)", "NUM_WARPS, True, KSPLIT, X_INDEX, True)") \
        .replace("ALLOW_TF32, UPCAST)", "ALLOW_TF32, UPCAST, X_INDEX, True)")


def template(perm_k: bool = False):
    return get_template(TEMPLATE_NAME + ("_permk" if perm_k else ""),
                        lambda: template_source(DEVICE_FUNCTIONS, _template_body(perm_k)), grid_nm())


def lower(x, values, meta, *, n: int, x_index=None):
    """Inductor lowering of sparse_inductor::linear_24 (without bias) to the template. One choice
    only, so that Inductor fuses what follows into the template's store (with an extern choice
    beside it under max_autotune, the template won but its epilogue was not fused: torch 2.11,
    H100). x_index: a column-permuted weight (sp24_linear's; an int32 constant), None: the identity."""
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.ir import FixedLayout
    from torch._inductor.select_algorithm import autotune_select_algorithm, realize_inputs

    perm = (x_index,) if x_index is not None else ()
    x, values, meta, *perm = realize_inputs(x, values, meta, *perm)
    m, k = x.get_size()
    n, g = (int(s) for s in values.get_size()[1:])
    words = meta.get_dtype() == torch.int32  # the gemv layout: made only for a static M of 1 and bf16 x
    if words:
        # Inductor's internals: loaded by the compile that calls this
        from torch._inductor.ir import ExternKernel

        if not (isinstance(m, (int, sympy.Integer)) and int(m) == 1 and x.get_dtype() == torch.bfloat16):
            raise RuntimeError(f"2:4 gemv layout needs a static M of 1 and bf16 x, got M={m}, {x.get_dtype()}")
        # the kernel reads x as 32-bit words: unit stride, and aligned (a view at an odd element
        # offset is not even 4-byte aligned; 16 bytes keep the loads vectorized): else a copy
        x = ExternKernel.require_contiguous(x)
        try:
            offset = x.get_layout().offset
        except Exception:  # an IR node without a layout here: copy rather than guess
            offset = None
        if not (isinstance(offset, (int, sympy.Integer)) and int(offset) % 8 == 0):
            x = ExternKernel.copy_input(x)
        cfg = pick_config(1, n, 4 * g, True, values.get_dtype() == torch.uint8, device=x.get_device())
    elif isinstance(m, (int, sympy.Integer)):
        cfg = pick_config(int(m), n, 4 * g)
    else:  # dynamic M: a tensor-core config that is right for any M, sized by the hint
        cfg = pick_config(max(2, inductor_size_hint(m, 64)), n, 4 * g)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    cfg.setdefault("KSPLIT", 1)
    layout = FixedLayout(x.get_device(), x.get_dtype(), [m, n])
    choices: list = []
    err = template(bool(perm)).maybe_append_choice(
        choices, input_nodes=(x, values, meta, *perm), layout=layout, num_stages=num_stages, num_warps=num_warps,
        EVEN_G=g % (cfg["BLOCK_G"] * cfg["KSPLIT"]) == 0, ALLOW_TF32=allow_tf32(x.get_dtype()), UPCAST=False,
        NUM_WARPS=num_warps, **cfg)
    if err is not None or not choices:
        raise RuntimeError(f"2:4 template rejected the layer: {err}")
    return autotune_select_algorithm("sparse_inductor_sp24", choices, [x, values, meta, *perm], layout)


# ---- the dispatcher's view of this family

def _check(layer) -> Optional[str]:
    if layer.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {layer.dtype} not supported"
    if layer.weight_dtype not in (None, layer.dtype, torch.int8):
        return f"weight dtype {layer.weight_dtype} not supported"
    if layer.out_index:
        return "the 2:4 kernels map no output columns (a 2:4 weight's rows are permuted in its constants)"
    return None


# Calibration from the H100 sweeps (bf16, docs/performance.md): the gemv streams the compressed
# weight at ~2.1 TB/s (0.8 of the model's 2.6); the tensor-core path reached at best 0.94x of dense
# at M=16 and 0.80x at M=64, so it is modelled as dense time / 0.85 and never wins on its own.
_GEMV_BW, _DOT_VS_DENSE = 0.8, 0.85


def _estimate_us(layer, model) -> Optional[float]:
    if model is None or layer.m is None:
        return None
    es = layer.dtype.itemsize
    m, n, k = layer.m, layer.n, layer.k
    ws = 1 if layer.weight_dtype == torch.int8 else es  # int8 weight-only: one byte a value
    if m == 1 and layer.m_static:  # the gemv template is used only for a static M of 1 (see lower)
        byts = n * k * ws / 2 + n * k / 8 + (k + n) * es
        return byts / (model.bytes_per_us * _GEMV_BW) + model.launch_us
    return dense_us(layer, model) / _DOT_VS_DENSE


def _runner(t, bias, layer, params):
    """The kernel as the lowering emits it: the gemv only for a static M of 1, else the tensor-core
    config sized by the hint (see lower). A column-permuted weight (layer.x_index): x gathered in
    the kernel's loads (params x "loads"), or before the call ("graph": a pass of its own here; in
    the compiled graph Inductor can fuse it into the kernel that makes x)."""
    cfg = None if layer.m_static else pick_config(max(2, layer.m), layer.n, layer.k)
    xi = t.get("x_index") if layer.x_index else None
    if xi is not None and params.get("x") == "graph":
        return lambda x: sp24_linear(x.index_select(1, xi), t["values"], t["meta"], bias, config=cfg)
    return lambda x: sp24_linear(x, t["values"], t["meta"], bias, config=cfg, x_index=xi)


def _variants(layer, tensors) -> list[dict]:
    """A column-permuted weight: x gathered in the kernel's loads or before the call (_runner)."""
    return [{"x": "loads"}, {"x": "graph"}] if layer.x_index else [{}]


def _gemv_layout(layer) -> bool:
    """Whether the layer's constants are made in the gemv layout (formats/sparse24.py): the gemv
    runs it (a static M of 1), x is bf16 and K a multiple of 16."""
    return layer.m_static and layer.m == 1 and layer.dtype == torch.bfloat16 and gemv_layout_ok(layer.k)


def _fmt(layer) -> str:
    return "sp24-gemv" if _gemv_layout(layer) else "sp24"


def _compress(w, layer) -> dict:
    values, meta = compress_24(w)
    if _gemv_layout(layer):
        values, meta = to_gemv_layout(values, meta)
    return {"values": values, "meta": meta}


register_kernel(KernelSpec("triton", "2:4", ("cuda",), _check, _estimate_us, compress=_compress, fmt=_fmt,
                           runner=_runner, variants=_variants, split_outputs=True))
