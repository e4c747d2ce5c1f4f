"""Causal attention kernels for the CPU: numpy in, numpy out, no JAX.

Layouts (TransformerLens order, C-contiguous float32):

    q, k, v, z, dz, dq, dk, dv   [batch, pos, head_index, d_head]
    lse                          [batch, head_index, pos]   log-sum-exp of each scaled score row
    scores, pattern              [batch, head_index, query_pos, key_pos]

Every kernel writes into output arrays that the caller provides (the FFI handlers in
``kernels/ffi.py`` hand in XLA's own buffers, zero-copy) and keeps no state between calls: scratch
is allocated inside each call, so the kernels are reentrant and may be called from several XLA
threads at once. Work is split over batch x head items, claimed from a shared atomic counter (see
"Work distribution" below); each item is computed by one thread in a fixed order, so results are
bitwise independent of the number of threads. The kernels themselves are serial: the FFI handlers
run one on several of XLA's own threads at once (no second thread pool competing for the cores).

The fused forward never materialises the [query, key] pattern: it works on blocks of 8 query
rows, holding only their scores (8 x pos floats) at a time. Within a block the softmax is exact
(row max, then exp and sum over the block's keys), so no online rescaling is needed.

How the fused kernels are fast:
  * they are written with explicit 16-lane vectors (``kernels/simd.py``): keys come in tiles of
    16, one vector per query row, and a block's 8 rows are 8 independent accumulator chains held
    in registers (enough to hide the FMA latency);
  * the masked upper triangle is never computed: a block of rows i0..i0+7 touches the key tiles
    up to key i0+7 only; inside those tiles the keys past each row's diagonal are set to -inf
    (probability 0) with a vector select;
  * each (batch, head) slice is first copied into contiguous scratch padded to whole tiles (zeros),
    so no loop has a scalar remainder: Q scaled, K transposed ([d_head, pos], so that a tile of
    keys is one contiguous vector), V as rows (P V is a sum of V rows times broadcast
    probabilities);
  * softmax uses a vector exp (Cody-Waite range reduction + Cephes polynomial, 2^k built from
    exponent bits; Numba's exp is a scalar libm call without Intel SVML);
  * the forward keeps only the per-row log-sum-exp; the backward recomputes the probabilities
    from it (FlashAttention-2 style) instead of storing the [query, key] pattern, and
    renormalises each recomputed row (see attention_bwd).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .simd import (
    FASTMATH,
    LANES,
    vadd,
    vexp_le0,
    vfma,
    vhmax,
    vhsum,
    vload,
    vmask_after,
    vmax,
    vmul,
    vsplat,
    vstore,
    vsub,
    vtranspose,
    vzero,
)
from .work import FfiKernel, claim, lead_folded3, lead_folded4

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)


# Work distribution (kernels/work.py): every kernel here computes work items of (batch, head)
# slices, ``first`` and then those claimed from a shared counter; it returns how many it computed.
# An item is all heads of one batch row when there are enough batch rows (work_items): the heads
# of a position sit next to each other in memory, so one thread then reads and writes whole runs
# of cache lines. With one head per item the two threads took alternate heads, i.e. alternate
# 64-byte lines of the same rows (d_head 16), which x86 prefetches and shares in 128-byte pairs:
# jitted packed attention at (64, 64, 4, 16) took 0.49 ms forward and 1.72 ms forward+backward
# that way, 0.43 and 1.23 ms with whole rows.
_ROWS_PER_THREAD = 8  # batch rows per thread (2 cores here) before items take whole rows


@njit(cache=True, inline="always")
def work_items(n_batch, n_heads):
    """(number of work items, (batch, head) slices per item) of a kernel call: item i covers the
    slices bh = i * per_item ... (i + 1) * per_item - 1, with b = bh // n_heads, h = bh % n_heads."""
    per_item = n_heads if n_batch >= 2 * _ROWS_PER_THREAD else 1
    return (n_batch * n_heads + per_item - 1) // per_item, per_item


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _row_times_mat(out, n, qrow, mt):
    """out[:n] = sum_d qrow[d] * mt[d, :n]: one query row against K^T (or dz row against V^T).

    d is unrolled by 4 so that each pass over out[:n] does 4 FMAs per load/store of out (the
    store port, not the FMA unit, would otherwise be the limit); the j loop is contiguous."""
    d_head = qrow.shape[0]
    for j in range(n):
        out[j] = _ZERO
    d = 0
    while d + 4 <= d_head:
        q0, q1, q2, q3 = qrow[d], qrow[d + 1], qrow[d + 2], qrow[d + 3]
        m0, m1, m2, m3 = mt[d], mt[d + 1], mt[d + 2], mt[d + 3]
        for j in range(n):
            out[j] += (q0 * m0[j] + q1 * m1[j]) + (q2 * m2[j] + q3 * m3[j])
        d += 4
    while d < d_head:
        qd, md = qrow[d], mt[d]
        for j in range(n):
            out[j] += qd * md[j]
        d += 1


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _mat_times_row(out, p, n, mt, factor):
    """out[d] = factor * sum_j p[j] * mt[d, j] for every d: a row of P times V (or dS times K).

    Four output columns per pass over p[:n]: 5 loads per 4 FMAs, vectorised reductions over j."""
    d_head = mt.shape[0]
    d = 0
    while d + 4 <= d_head:
        m0, m1, m2, m3 = mt[d], mt[d + 1], mt[d + 2], mt[d + 3]
        a0 = a1 = a2 = a3 = _ZERO
        for j in range(n):
            pj = p[j]
            a0 += pj * m0[j]
            a1 += pj * m1[j]
            a2 += pj * m2[j]
            a3 += pj * m3[j]
        out[d], out[d + 1], out[d + 2], out[d + 3] = a0 * factor, a1 * factor, a2 * factor, a3 * factor
        d += 4
    while d < d_head:
        md = mt[d]
        a = _ZERO
        for j in range(n):
            a += p[j] * md[j]
        out[d] = a * factor
        d += 1


_ROWS = 4  # query rows per block of the hooked-path backward kernels below

# ---- the fused kernels: explicit 16-lane vectors (kernels/simd.py) ----------------------------
#
# A block is 8 query rows; keys come in tiles of LANES (16) keys, one vector per row. Scratch is
# padded to whole tiles (zeros), so no loop has a scalar remainder; keys past a row's diagonal
# (including the padding) are set to -inf by vmask_after before the softmax.

_BLOCK = 8  # query rows per block: 8 independent accumulator chains hide the FMA latency
_L = LANES


@njit(cache=True, fastmath=FASTMATH)
def _copy_rows(src, b, h, factor, dst):
    """dst[t, :d_head] = factor * src[b, t, h, :] for every position t (contiguous rows)."""
    d_head = src.shape[3]
    for t in range(src.shape[1]):
        _scale_row(src[b, t, h], dst[t, :d_head], factor)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _load_tile(src, b, t0, h, c):
    """The L x L tile src[b, t0:t0 + L, h, c:c + L] as L row vectors."""
    return (vload(src[b, t0, h], c), vload(src[b, t0 + 1, h], c), vload(src[b, t0 + 2, h], c),
            vload(src[b, t0 + 3, h], c), vload(src[b, t0 + 4, h], c), vload(src[b, t0 + 5, h], c),
            vload(src[b, t0 + 6, h], c), vload(src[b, t0 + 7, h], c), vload(src[b, t0 + 8, h], c),
            vload(src[b, t0 + 9, h], c), vload(src[b, t0 + 10, h], c),
            vload(src[b, t0 + 11, h], c), vload(src[b, t0 + 12, h], c),
            vload(src[b, t0 + 13, h], c), vload(src[b, t0 + 14, h], c),
            vload(src[b, t0 + 15, h], c))


@njit(cache=True, fastmath=FASTMATH)
def _copy_transposed(src, b, h, dst):
    """dst[d, t] = src[b, t, h, d]: whole L x L tiles transposed in registers, edges scalar."""
    n_pos, d_head = src.shape[1], src.shape[3]
    t_end, c_end = n_pos - n_pos % _L, d_head - d_head % _L
    for t0 in range(0, t_end, _L):
        for c in range(0, c_end, _L):
            cols = vtranspose(_load_tile(src, b, t0, h, c))
            for d in range(_L):
                vstore(dst[c + d], t0, cols[d])
        for d in range(c_end, d_head):
            out = dst[d]
            for t in range(t0, t0 + _L):
                out[t] = src[b, t, h, d]
    for t in range(t_end, n_pos):
        for d in range(d_head):
            dst[d, t] = src[b, t, h, d]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _scale_row(row, out, factor):
    """out[:] = factor * row[:len(out)] (row may be longer: padded scratch)."""
    n, f = out.shape[0], vsplat(factor)
    c = 0
    while c + _L <= n:
        vstore(out, c, vmul(vload(row, c), f))
        c += _L
    for d in range(c, n):
        out[d] = row[d] * factor


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _dot_row(a, b, n):
    """sum_{d < n} a[d] b[d]: vector partial sums, then the lanes, then the scalar tail."""
    acc = vzero()
    c = 0
    while c + _L <= n:
        acc = vfma(vload(a, c), vload(b, c), acc)
        c += _L
    total = vhsum(acc)
    for d in range(c, n):
        total += a[d] * b[d]
    return total


@njit(cache=True, fastmath=FASTMATH)
def _store_rows(src, n, dst, b, h, i0, factor, row_factors):
    """dst[b, i0 + r, h, :] = factor * row_factors[r] * src[r, :d_head] for the first n rows of a
    block."""
    for r in range(n):
        _scale_row(src[r], dst[b, i0 + r, h], factor * row_factors[r])


@njit(cache=True, fastmath=FASTMATH)
def _store_block(src, rows, n_cols, dst, b, h, i0, factors, fill):
    """dst[b, h, i0 + r, j] = factors[r] * src[r, j] for j < n_cols (the block's tiles) and
    ``fill`` for the keys past them, for the first ``rows`` rows."""
    n_keys = dst.shape[3]
    n = min(n_cols, n_keys)
    v = vsplat(fill)
    for r in range(rows):
        row, out = src[r], dst[b, h, i0 + r]
        factor = factors[r]
        f = vsplat(factor)
        c = 0
        while c + _L <= n:  # whole vectors, then a scalar tail (out is exactly n_keys long)
            vstore(out, c, vmul(vload(row, c), f))
            c += _L
        for j in range(c, n):
            out[j] = row[j] * factor
        c = n
        while c + _L <= n_keys:
            vstore(out, c, v)
            c += _L
        for j in range(c, n_keys):
            out[j] = fill


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _scores_tile(a, i0, mt, j, n_d):
    """The 8 rows' dot products with one tile of keys: sum_d a[i0 + r, d] * mt[d, j:j + L]."""
    a0, a1, a2, a3 = a[i0], a[i0 + 1], a[i0 + 2], a[i0 + 3]
    a4, a5, a6, a7 = a[i0 + 4], a[i0 + 5], a[i0 + 6], a[i0 + 7]
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = vzero()
    for d in range(n_d):
        x = vload(mt[d], j)
        c0 = vfma(vsplat(a0[d]), x, c0)
        c1 = vfma(vsplat(a1[d]), x, c1)
        c2 = vfma(vsplat(a2[d]), x, c2)
        c3 = vfma(vsplat(a3[d]), x, c3)
        c4 = vfma(vsplat(a4[d]), x, c4)
        c5 = vfma(vsplat(a5[d]), x, c5)
        c6 = vfma(vsplat(a6[d]), x, c6)
        c7 = vfma(vsplat(a7[d]), x, c7)
    return c0, c1, c2, c3, c4, c5, c6, c7


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _mask_tile(c, j, i0):
    """Row r of the block keeps keys <= i0 + r; later keys (and padding) become -inf."""
    if j + _L <= i0 + 1:  # the whole tile is at or below every row's diagonal
        return c
    return (vmask_after(c[0], j, i0), vmask_after(c[1], j, i0 + 1),
            vmask_after(c[2], j, i0 + 2), vmask_after(c[3], j, i0 + 3),
            vmask_after(c[4], j, i0 + 4), vmask_after(c[5], j, i0 + 5),
            vmask_after(c[6], j, i0 + 6), vmask_after(c[7], j, i0 + 7))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _store_tile(s, j, c):
    for r in range(_BLOCK):
        vstore(s[r], j, c[r])


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _rows_times_mat(out, p, n, m, n_cols):
    """out[r, c:c + L] = sum_{j < n} p[r, j] * m[j, c:c + L] for the 8 rows and every column tile
    (P V, or dS K): one vector of m per key, shared by the 8 rows."""
    p0, p1, p2, p3, p4, p5, p6, p7 = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    for c in range(0, n_cols, _L):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
        for j in range(n):
            x = vload(m[j], c)
            a0 = vfma(vsplat(p0[j]), x, a0)
            a1 = vfma(vsplat(p1[j]), x, a1)
            a2 = vfma(vsplat(p2[j]), x, a2)
            a3 = vfma(vsplat(p3[j]), x, a3)
            a4 = vfma(vsplat(p4[j]), x, a4)
            a5 = vfma(vsplat(p5[j]), x, a5)
            a6 = vfma(vsplat(p6[j]), x, a6)
            a7 = vfma(vsplat(p7[j]), x, a7)
        vstore(out[0], c, a0)
        vstore(out[1], c, a1)
        vstore(out[2], c, a2)
        vstore(out[3], c, a3)
        vstore(out[4], c, a4)
        vstore(out[5], c, a5)
        vstore(out[6], c, a6)
        vstore(out[7], c, a7)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _accumulate_outer(acc, n, w, rows, i0, n_cols, f):
    """acc[j, c:c + L] += sum_r f[r] w[r, j] * rows[i0 + r, c:c + L] for keys j < n (dK += dS^T q,
    dV += P^T dz, with the rows' factors f). Rows are summed in two chains (even, odd) and then
    added, in a fixed order."""
    w0, w1, w2, w3, w4, w5, w6, w7 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]
    for c in range(0, n_cols, _L):
        y0 = vmul(vload(rows[i0], c), vsplat(f[0]))
        y1 = vmul(vload(rows[i0 + 1], c), vsplat(f[1]))
        y2 = vmul(vload(rows[i0 + 2], c), vsplat(f[2]))
        y3 = vmul(vload(rows[i0 + 3], c), vsplat(f[3]))
        y4 = vmul(vload(rows[i0 + 4], c), vsplat(f[4]))
        y5 = vmul(vload(rows[i0 + 5], c), vsplat(f[5]))
        y6 = vmul(vload(rows[i0 + 6], c), vsplat(f[6]))
        y7 = vmul(vload(rows[i0 + 7], c), vsplat(f[7]))
        for j in range(n):
            even = vfma(vsplat(w0[j]), y0, vload(acc[j], c))
            even = vfma(vsplat(w2[j]), y2, even)
            even = vfma(vsplat(w4[j]), y4, even)
            even = vfma(vsplat(w6[j]), y6, even)
            odd = vmul(vsplat(w1[j]), y1)
            odd = vfma(vsplat(w3[j]), y3, odd)
            odd = vfma(vsplat(w5[j]), y5, odd)
            odd = vfma(vsplat(w7[j]), y7, odd)
            vstore(acc[j], c, vadd(even, odd))


@njit(cache=True, fastmath=FASTMATH)
def attention_fwd(q, k, v, offsets, scale, z, lse, scores, pattern, counter, first):
    """Fused causal attention forward for (batch, head) items: ``first`` (already claimed), then
    items claimed from ``counter`` (kernels/work.py) until none are left. Returns how many it computed.

    Writes z [b, pos, h, d] and lse [b, h, pos], and, unless they are empty (shape[0] == 0), the
    scaled masked scores and the pattern [b, h, q, k] too. q, k, v are [b, pos, heads', d]; head
    h is read at index h + offsets[i] (offsets (0, 0, 0) for separate arrays; (0, h, 2h) for one
    packed [b, pos, 3 * h, d] array). Scratch is allocated once per call."""
    n_batch, n_pos, n_heads, d_head = z.shape
    item, count = first, 0
    n_items, per_item = work_items(n_batch, n_heads)
    pp = (n_pos + _L - 1) // _L * _L  # keys padded to whole tiles
    dp = (d_head + _L - 1) // _L * _L  # head dimension padded to whole vectors
    qs = np.zeros((pp + _BLOCK, d_head), np.float32)  # q * scale; rows padded to whole blocks
    kt = np.zeros((d_head, pp), np.float32)  # K^T: a tile of keys is one contiguous vector
    vp = np.zeros((pp, dp), np.float32)  # V rows, padded
    s = np.empty((_BLOCK, pp), np.float32)  # scores, then unnormalised probabilities
    zb = np.empty((_BLOCK, dp), np.float32)
    totals = np.empty(_BLOCK, np.float32)
    shifts = np.empty(_BLOCK, np.float32)
    inverses = np.empty(_BLOCK, np.float32)
    ones = np.ones(_BLOCK, np.float32)
    neg_inf = vsplat(-np.float32(np.inf))
    write_scores, write_pattern = scores.shape[0] > 0, pattern.shape[0] > 0
    while item < n_items:
        for bh in range(item * per_item, min((item + 1) * per_item, n_batch * n_heads)):
            b, h = bh // n_heads, bh % n_heads
            _copy_rows(q, b, h + offsets[0], scale, qs)
            _copy_rows(v, b, h + offsets[2], _ONE, vp)
            _copy_transposed(k, b, h + offsets[1], kt)
            for i0 in range(0, n_pos, _BLOCK):
                n = min(i0 + _BLOCK, n_pos)  # keys seen by the block; the rest of the triangle is skipped
                n_tiles = (n + _L - 1) // _L
                m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = neg_inf
                for t in range(n_tiles):
                    c = _mask_tile(_scores_tile(qs, i0, kt, t * _L, d_head), t * _L, i0)
                    _store_tile(s, t * _L, c)
                    m0, m1, m2, m3 = vmax(m0, c[0]), vmax(m1, c[1]), vmax(m2, c[2]), vmax(m3, c[3])
                    m4, m5, m6, m7 = vmax(m4, c[4]), vmax(m5, c[5]), vmax(m6, c[6]), vmax(m7, c[7])
                # Row maxima: only a shift for the softmax (maxnum skips NaN, but a NaN score still
                # reaches the output through exp(NaN - shift) in the row sum).
                shifts[0], shifts[1], shifts[2], shifts[3] = vhmax(m0), vhmax(m1), vhmax(m2), vhmax(m3)
                shifts[4], shifts[5], shifts[6], shifts[7] = vhmax(m4), vhmax(m5), vhmax(m6), vhmax(m7)
                rows = n - i0
                if write_scores:  # masked, scaled scores; -inf above the diagonal
                    _store_block(s, rows, n_tiles * _L, scores, b, h, i0, ones, -np.float32(np.inf))
                for r in range(_BLOCK):
                    row, shift, acc = s[r], vsplat(shifts[r]), vzero()
                    for t in range(n_tiles):
                        e = vexp_le0(vsub(vload(row, t * _L), shift))  # 0 where masked
                        vstore(row, t * _L, e)
                        acc = vadd(acc, e)
                    totals[r] = vhsum(acc)
                for r in range(rows):
                    lse[b, h, i0 + r] = shifts[r] + np.log(totals[r])
                if write_pattern:  # probabilities; 0 above the diagonal
                    for r in range(rows):
                        inverses[r] = _ONE / totals[r]
                    _store_block(s, rows, n_tiles * _L, pattern, b, h, i0, inverses, _ZERO)
                _rows_times_mat(zb, s, n, vp, dp)  # unnormalised P V
                for r in range(rows):
                    _scale_row(zb[r], z[b, i0 + r, h], _ONE / totals[r])
        count += 1
        item = claim(counter)
    return count


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _p_ds(scores, dp, shift, delta, p_row, ds_row, j):
    """One row's tile: P = exp(scores - lse) (0 where masked), dS = P (dP - delta)."""
    pr = vexp_le0(vsub(scores, vsplat(shift)))
    vstore(p_row, j, pr)
    vstore(ds_row, j, vmul(pr, vsub(dp, vsplat(delta))))


@njit(cache=True, fastmath=FASTMATH)
def attention_bwd(q, k, v, offsets, z, lse, dz, scale, dq, dk, dv, counter, first):
    """Backward of attention_fwd for (batch, head) items (``first``, then claimed from ``counter``;
    returns how many): writes dq, dk, dv (laid out as q, k, v, with the same head offsets; they
    may be one packed array). Recomputes P from lse; scratch allocated once per call.

    Per block of 8 query rows: P = exp(scores - lse) (recomputed), dP = dz V^T, dS = P (dP - delta)
    with delta_i = dz_i . z_i, then dQ = dS K * scale, dK += dS^T (q * scale), dV += P^T dz.
    The offsets place head h in q, k, v and in dq, dk, dv alike (see attention_fwd).

    The recomputed rows of P are renormalised to sum to 1 (a factor per row, applied where dS and
    P are used): lse is a float32, so at logits of magnitude L, exp(scores - lse) is off by a
    common factor of up to half an ulp of L per row (3e-5 at L = 1000, where XLA's softmax
    backward is exact to 1e-7); the row's sum of P removes that factor."""
    n_batch, n_pos, n_heads, d_head = z.shape
    item, count = first, 0
    n_items, per_item = work_items(n_batch, n_heads)
    pp = (n_pos + _L - 1) // _L * _L
    dp = (d_head + _L - 1) // _L * _L
    qs = np.zeros((pp + _BLOCK, dp), np.float32)  # q * scale, padded rows and columns
    dzs = np.zeros((pp + _BLOCK, dp), np.float32)  # dz, padded
    kt = np.zeros((d_head, pp), np.float32)  # K^T and V^T: tiles of keys
    vt = np.zeros((d_head, pp), np.float32)
    kp = np.zeros((pp, dp), np.float32)  # K rows, for dQ = dS K
    dkp = np.zeros((pp, dp), np.float32)  # dK and dV accumulated over the blocks
    dvp = np.zeros((pp, dp), np.float32)
    delta = np.zeros(pp + _BLOCK, np.float32)
    p = np.empty((_BLOCK, pp), np.float32)
    ds = np.empty((_BLOCK, pp), np.float32)
    dqb = np.empty((_BLOCK, dp), np.float32)
    shifts = np.empty(_BLOCK, np.float32)
    norms = np.empty(_BLOCK, np.float32)  # 1 / the row sums of the recomputed P
    pos_inf = np.float32(np.inf)
    while item < n_items:
        for bh in range(item * per_item, min((item + 1) * per_item, n_batch * n_heads)):
            b, h = bh // n_heads, bh % n_heads
            hq, hk, hv = h + offsets[0], h + offsets[1], h + offsets[2]
            _copy_rows(q, b, hq, scale, qs)
            _copy_rows(dz, b, h, _ONE, dzs)
            _copy_rows(k, b, hk, _ONE, kp)
            _copy_transposed(k, b, hk, kt)
            _copy_transposed(v, b, hv, vt)
            for t in range(n_pos):
                delta[t] = _dot_row(dzs[t], z[b, t, h], d_head)  # rowsum(dP * P) = dz_i . z_i
            dkp[:] = _ZERO
            dvp[:] = _ZERO
            for i0 in range(0, n_pos, _BLOCK):
                n = min(i0 + _BLOCK, n_pos)
                n_tiles = (n + _L - 1) // _L
                for r in range(_BLOCK):
                    # a padding row (past the end) gets shift +inf, so its P and dS are exactly 0
                    shifts[r] = lse[b, h, i0 + r] if i0 + r < n_pos else pos_inf
                for t in range(n_tiles):
                    j = t * _L
                    c = _mask_tile(_scores_tile(qs, i0, kt, j, d_head), j, i0)
                    g = _scores_tile(dzs, i0, vt, j, d_head)  # dP = dz_i . v_j
                    _p_ds(c[0], g[0], shifts[0], delta[i0], p[0], ds[0], j)
                    _p_ds(c[1], g[1], shifts[1], delta[i0 + 1], p[1], ds[1], j)
                    _p_ds(c[2], g[2], shifts[2], delta[i0 + 2], p[2], ds[2], j)
                    _p_ds(c[3], g[3], shifts[3], delta[i0 + 3], p[3], ds[3], j)
                    _p_ds(c[4], g[4], shifts[4], delta[i0 + 4], p[4], ds[4], j)
                    _p_ds(c[5], g[5], shifts[5], delta[i0 + 5], p[5], ds[5], j)
                    _p_ds(c[6], g[6], shifts[6], delta[i0 + 6], p[6], ds[6], j)
                    _p_ds(c[7], g[7], shifts[7], delta[i0 + 7], p[7], ds[7], j)
                for r in range(_BLOCK):  # row sums of P, read back from the block's scratch
                    acc = vzero()
                    for t in range(n_tiles):
                        acc = vadd(acc, vload(p[r], t * _L))
                    total = vhsum(acc)  # padding rows (0) and NaN rows keep a factor of 1
                    norms[r] = _ONE / total if total > _ZERO else _ONE
                _rows_times_mat(dqb, ds, n, kp, dp)  # dQ = dS K (times scale below)
                _store_rows(dqb, n - i0, dq, b, hq, i0, scale, norms)
                _accumulate_outer(dkp, n, ds, qs, i0, dp, norms)  # dK += dS^T (q * scale)
                _accumulate_outer(dvp, n, p, dzs, i0, dp, norms)  # dV += P^T dz
            for t in range(n_pos):
                _scale_row(dkp[t], dk[b, t, hk], _ONE)
                _scale_row(dvp[t], dv[b, t, hv], _ONE)
        count += 1
        item = claim(counter)
    return count


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _rank4_update(out_t, n, rows, coefs):
    """out_t[d, :n] += sum_r coefs[r, d] * rows[r, :n] for 4 rows at once (dK^T, dV^T updates).

    4 output rows d per pass: per vector of keys, 4 loads of rows and 4 loads + 4 stores of
    out_t feed 16 FMAs."""
    d_head = out_t.shape[0]
    r0, r1, r2, r3 = rows[0], rows[1], rows[2], rows[3]
    d = 0
    while d + 4 <= d_head:
        o0, o1, o2, o3 = out_t[d], out_t[d + 1], out_t[d + 2], out_t[d + 3]
        x0, x1, x2, x3 = coefs[0, d], coefs[1, d], coefs[2, d], coefs[3, d]
        y0, y1, y2, y3 = coefs[0, d + 1], coefs[1, d + 1], coefs[2, d + 1], coefs[3, d + 1]
        z0, z1, z2, z3 = coefs[0, d + 2], coefs[1, d + 2], coefs[2, d + 2], coefs[3, d + 2]
        w0, w1, w2, w3 = coefs[0, d + 3], coefs[1, d + 3], coefs[2, d + 3], coefs[3, d + 3]
        for j in range(n):
            a, b, c, e = r0[j], r1[j], r2[j], r3[j]
            o0[j] += (a * x0 + b * x1) + (c * x2 + e * x3)
            o1[j] += (a * y0 + b * y1) + (c * y2 + e * y3)
            o2[j] += (a * z0 + b * z1) + (c * z2 + e * z3)
            o3[j] += (a * w0 + b * w1) + (c * w2 + e * w3)
        d += 4
    while d < d_head:
        od = out_t[d]
        c0, c1, c2, c3 = coefs[0, d], coefs[1, d], coefs[2, d], coefs[3, d]
        for j in range(n):
            od[j] += (r0[j] * c0 + r1[j] * c1) + (r2[j] * c2 + r3[j] * c3)
        d += 1


# ---- the hooked path: scores and pattern materialised (a hook reads or edits them) ------------


@njit(cache=True, fastmath=FASTMATH)
def _scores_slice(q, k, b, h, scale, scores):
    n_pos, d_head = q.shape[1], q.shape[3]
    qs = np.empty((n_pos, d_head), np.float32)
    kt = np.empty((d_head, n_pos), np.float32)
    for t in range(n_pos):
        for d in range(d_head):
            qs[t, d] = q[b, t, h, d] * scale
            kt[d, t] = k[b, t, h, d]
    neg_inf = -np.float32(np.inf)
    for i in range(n_pos):
        row = scores[b, h, i]
        _row_times_mat(row, i + 1, qs[i], kt)
        for j in range(i + 1, n_pos):
            row[j] = neg_inf


@njit(cache=True, fastmath=FASTMATH)
def scores_fwd(q, k, scale, scores, counter, first):
    """scores [b, h, q, k] = scale * q . k for key <= query, -inf above the diagonal.
    Items ``first``, then claimed from ``counter``; returns how many."""
    n_batch, n_heads = q.shape[0], q.shape[2]
    item, count = first, 0
    n_items, per_item = work_items(n_batch, n_heads)
    while item < n_items:
        for bh in range(item * per_item, min((item + 1) * per_item, n_batch * n_heads)):
            _scores_slice(q, k, bh // n_heads, bh % n_heads, scale, scores)
        count += 1
        item = claim(counter)
    return count


@njit(cache=True, fastmath=FASTMATH)
def _scores_bwd_slice(q, k, dscores, b, h, scale, dq, dk):
    n_pos, d_head = q.shape[1], q.shape[3]
    qs = np.empty((n_pos, d_head), np.float32)
    kt = np.empty((d_head, n_pos), np.float32)
    for t in range(n_pos):
        for d in range(d_head):
            qs[t, d] = q[b, t, h, d] * scale
            kt[d, t] = k[b, t, h, d]
    dkt = np.zeros((d_head, n_pos), np.float32)
    ds = np.zeros((_ROWS, n_pos), np.float32)  # dscores rows, zero above the diagonal
    qb = np.zeros((_ROWS, d_head), np.float32)
    dqrow = np.empty(d_head, np.float32)
    for i0 in range(0, n_pos, _ROWS):
        n_max = min(i0 + _ROWS, n_pos)
        for r in range(_ROWS):
            i = i0 + r
            dsr = ds[r]
            if i >= n_pos:
                for j in range(n_max):
                    dsr[j] = _ZERO
                continue
            n = i + 1  # the masked entries get no gradient (jnp.where in the spec)
            src = dscores[b, h, i]
            for j in range(n):
                dsr[j] = src[j]
            for j in range(n, n_max):
                dsr[j] = _ZERO
            for d in range(d_head):
                qb[r, d] = qs[i, d]
            _mat_times_row(dqrow, dsr, n, kt, scale)  # dq_i = scale * sum_j ds_ij k_j
            for d in range(d_head):
                dq[b, i, h, d] = dqrow[d]
        _rank4_update(dkt, n_max, ds, qb)  # dk_j = sum_i ds_ij (scale * q_i)
    for t in range(n_pos):
        for d in range(d_head):
            dk[b, t, h, d] = dkt[d, t]


@njit(cache=True, fastmath=FASTMATH)
def scores_bwd(q, k, dscores, scale, dq, dk, counter, first):
    """Backward of scores_fwd: dq, dk [b, pos, h, d] from dscores [b, h, q, k] (masked part ignored).
    Items ``first``, then claimed from ``counter``; returns how many."""
    n_batch, n_heads = q.shape[0], q.shape[2]
    item, count = first, 0
    n_items, per_item = work_items(n_batch, n_heads)
    while item < n_items:
        for bh in range(item * per_item, min((item + 1) * per_item, n_batch * n_heads)):
            _scores_bwd_slice(q, k, dscores, bh // n_heads, bh % n_heads, scale, dq, dk)
        count += 1
        item = claim(counter)
    return count


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _used_keys(prow, i):
    """i + 1 if prow[i+1:] is all zero (the causal case: skip the masked triangle), else all keys.

    A hook may have put weight above the diagonal; then the full row is used, exactly as the
    plain contraction in the spec does. (abs-sum is vectorisable; NaN also takes the full path.)"""
    n_pos = prow.shape[0]
    above = _ZERO
    for j in range(i + 1, n_pos):
        above += np.abs(prow[j])
    return i + 1 if above == _ZERO else n_pos


@njit(cache=True, fastmath=FASTMATH)
def _apply_slice(pattern, v, b, h, z):
    n_pos, d_head = v.shape[1], v.shape[3]
    vt = np.empty((d_head, n_pos), np.float32)
    for t in range(n_pos):
        for d in range(d_head):
            vt[d, t] = v[b, t, h, d]
    zrow = np.empty(d_head, np.float32)
    for i in range(n_pos):
        prow = pattern[b, h, i]
        _mat_times_row(zrow, prow, _used_keys(prow, i), vt, _ONE)
        for d in range(d_head):
            z[b, i, h, d] = zrow[d]


@njit(cache=True, fastmath=FASTMATH)
def apply_fwd(pattern, v, z, counter, first):
    """z[b, i, h] = sum_j pattern[b, h, i, j] v[b, j, h] (every j that carries weight).
    Items ``first``, then claimed from ``counter``; returns how many."""
    n_batch, n_heads = v.shape[0], v.shape[2]
    item, count = first, 0
    n_items, per_item = work_items(n_batch, n_heads)
    while item < n_items:
        for bh in range(item * per_item, min((item + 1) * per_item, n_batch * n_heads)):
            _apply_slice(pattern, v, bh // n_heads, bh % n_heads, z)
        count += 1
        item = claim(counter)
    return count


@njit(cache=True, fastmath=FASTMATH)
def _apply_bwd_slice(pattern, v, dz, b, h, dpattern, dv):
    n_pos, d_head = v.shape[1], v.shape[3]
    vt = np.empty((d_head, n_pos), np.float32)
    for t in range(n_pos):
        for d in range(d_head):
            vt[d, t] = v[b, t, h, d]
    dvt = np.zeros((d_head, n_pos), np.float32)
    dzb = np.zeros((_ROWS, d_head), np.float32)
    p = np.zeros((_ROWS, n_pos), np.float32)
    for i0 in range(0, n_pos, _ROWS):
        n_max = 0
        for r in range(_ROWS):
            i = i0 + r
            if i >= n_pos:
                for j in range(n_pos):
                    p[r, j] = _ZERO
                continue
            for d in range(d_head):
                dzb[r, d] = dz[b, i, h, d]
            # dpattern_ij = dz_i . v_j for every j: the gradient of the plain contraction
            _row_times_mat(dpattern[b, h, i], n_pos, dzb[r], vt)
            prow = pattern[b, h, i]
            n = _used_keys(prow, i)
            n_max = max(n_max, n)
            for j in range(n_pos):
                p[r, j] = prow[j]
        _rank4_update(dvt, n_max, p, dzb)  # dv_j = sum_i p_ij dz_i
    for t in range(n_pos):
        for d in range(d_head):
            dv[b, t, h, d] = dvt[d, t]


@njit(cache=True, fastmath=FASTMATH)
def apply_bwd(pattern, v, dz, dpattern, dv, counter, first):
    """Backward of apply_fwd: dpattern [b, h, q, k] (full) and dv [b, pos, h, d].
    Items ``first``, then claimed from ``counter``; returns how many."""
    n_batch, n_heads = v.shape[0], v.shape[2]
    item, count = first, 0
    n_items, per_item = work_items(n_batch, n_heads)
    while item < n_items:
        for bh in range(item * per_item, min((item + 1) * per_item, n_batch * n_heads)):
            _apply_bwd_slice(pattern, v, dz, bh // n_heads, bh % n_heads, dpattern, dv)
        count += 1
        item = claim(counter)
    return count


# ---- how the XLA FFI binding runs these kernels (kernels/ffi.py, kernels/work.py: FfiKernel) ---
# Every buffer is [*lead, ...]: under jax.vmap (vmap_method "broadcast_all") each carries the same
# extra leading dimensions, folded here into the batch. Work items are (batch, head) slices of
# the folded batch (work_items), counted from z (or q for the scores kernels, v for apply).


@njit(cache=True, inline="always")
def _head_items(shape):
    """The number of work items of a kernel over a [*lead, pos, head, d] buffer of this shape."""
    r = shape.shape[0]
    lead = 1
    for i in range(r - 3):
        lead *= shape[i]
    return work_items(lead, shape[r - 2])[0]


@njit(cache=True, inline="always")
def _packed(flat, shape):
    """A [*lead, pos, 3, head, d] buffer (q, k, v packed) as [prod(lead), pos, 3 * head, d] and its
    number of heads: q, k, v of head h are at head index h, head + h, 2 head + h."""
    r = shape.shape[0]
    lead = 1
    for i in range(r - 4):
        lead *= shape[i]
    n_heads = shape[r - 2]
    return flat.reshape((lead, shape[r - 4], 3 * n_heads, shape[r - 1])), n_heads


@njit(cache=True, inline="always")
def _run_attention_fwd(bufs, shapes, scale, counter, first):
    """args q, k, v; rets z, lse, scores, pattern (an empty scores or pattern is not written)."""
    return attention_fwd(lead_folded4(bufs[0], shapes[0]), lead_folded4(bufs[1], shapes[1]),
                         lead_folded4(bufs[2], shapes[2]), (0, 0, 0), scale,
                         lead_folded4(bufs[3], shapes[3]), lead_folded3(bufs[4], shapes[4]),
                         lead_folded4(bufs[5], shapes[5]), lead_folded4(bufs[6], shapes[6]),
                         counter, first)


@njit(cache=True, inline="always")
def _run_attention_bwd(bufs, shapes, scale, counter, first):
    """args q, k, v, z, lse, dz; rets dq, dk, dv."""
    return attention_bwd(lead_folded4(bufs[0], shapes[0]), lead_folded4(bufs[1], shapes[1]),
                         lead_folded4(bufs[2], shapes[2]), (0, 0, 0),
                         lead_folded4(bufs[3], shapes[3]), lead_folded3(bufs[4], shapes[4]),
                         lead_folded4(bufs[5], shapes[5]), scale, lead_folded4(bufs[6], shapes[6]),
                         lead_folded4(bufs[7], shapes[7]), lead_folded4(bufs[8], shapes[8]),
                         counter, first)


@njit(cache=True, inline="always")
def _run_attention_fwd_packed(bufs, shapes, scale, counter, first):
    """arg qkv [*lead, pos, 3, head, d]; rets z, lse, scores, pattern."""
    x, n_heads = _packed(bufs[0], shapes[0])
    return attention_fwd(x, x, x, (0, n_heads, 2 * n_heads), scale,
                         lead_folded4(bufs[1], shapes[1]), lead_folded3(bufs[2], shapes[2]),
                         lead_folded4(bufs[3], shapes[3]), lead_folded4(bufs[4], shapes[4]),
                         counter, first)


@njit(cache=True, inline="always")
def _run_attention_bwd_packed(bufs, shapes, scale, counter, first):
    """args qkv, z, lse, dz; ret dqkv (laid out as qkv)."""
    x, n_heads = _packed(bufs[0], shapes[0])
    dx, _ = _packed(bufs[4], shapes[4])
    return attention_bwd(x, x, x, (0, n_heads, 2 * n_heads), lead_folded4(bufs[1], shapes[1]),
                         lead_folded3(bufs[2], shapes[2]), lead_folded4(bufs[3], shapes[3]),
                         scale, dx, dx, dx, counter, first)


@njit(cache=True, inline="always")
def _run_scores_fwd(bufs, shapes, scale, counter, first):
    """args q, k; ret scores."""
    return scores_fwd(lead_folded4(bufs[0], shapes[0]), lead_folded4(bufs[1], shapes[1]), scale,
                      lead_folded4(bufs[2], shapes[2]), counter, first)


@njit(cache=True, inline="always")
def _run_scores_bwd(bufs, shapes, scale, counter, first):
    """args q, k, dscores; rets dq, dk."""
    return scores_bwd(lead_folded4(bufs[0], shapes[0]), lead_folded4(bufs[1], shapes[1]),
                      lead_folded4(bufs[2], shapes[2]), scale, lead_folded4(bufs[3], shapes[3]),
                      lead_folded4(bufs[4], shapes[4]), counter, first)


@njit(cache=True, inline="always")
def _run_apply_fwd(bufs, shapes, scale, counter, first):
    """args pattern, v; ret z."""
    return apply_fwd(lead_folded4(bufs[0], shapes[0]), lead_folded4(bufs[1], shapes[1]),
                     lead_folded4(bufs[2], shapes[2]), counter, first)


@njit(cache=True, inline="always")
def _run_apply_bwd(bufs, shapes, scale, counter, first):
    """args pattern, v, dz; rets dpattern, dv."""
    return apply_bwd(lead_folded4(bufs[0], shapes[0]), lead_folded4(bufs[1], shapes[1]),
                     lead_folded4(bufs[2], shapes[2]), lead_folded4(bufs[3], shapes[3]),
                     lead_folded4(bufs[4], shapes[4]), counter, first)


# FfiKernel(args ranks, rets ranks, scale, batched, split buffer, items, run); shapes:
# q, k, v, z, dz [b, pos, h, d]; lse [b, h, pos]; scores, pattern [b, h, q, k];
# qkv [b, pos, 3, h, d].
ATTENTION_FWD = FfiKernel((4, 4, 4), (4, 3, 4, 4), True, True, 3, _head_items, _run_attention_fwd)
ATTENTION_BWD = FfiKernel((4, 4, 4, 4, 3, 4), (4, 4, 4), True, True, 3, _head_items,
                          _run_attention_bwd)
ATTENTION_FWD_PACKED = FfiKernel((5,), (4, 3, 4, 4), True, True, 1, _head_items,
                                 _run_attention_fwd_packed)
ATTENTION_BWD_PACKED = FfiKernel((5, 4, 3, 4), (5,), True, True, 1, _head_items,
                                 _run_attention_bwd_packed)
SCORES_FWD = FfiKernel((4, 4), (4,), True, True, 0, _head_items, _run_scores_fwd)
SCORES_BWD = FfiKernel((4, 4, 4), (4, 4), True, True, 0, _head_items, _run_scores_bwd)
APPLY_FWD = FfiKernel((4, 4), (4,), False, True, 1, _head_items, _run_apply_fwd)
APPLY_BWD = FfiKernel((4, 4, 4), (4, 4), False, True, 1, _head_items, _run_apply_bwd)
