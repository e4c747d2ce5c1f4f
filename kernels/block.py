"""The fused attention sublayer: one kernel from the residual stream to the residual stream.

    out = resid + attn(norm(resid)) @ W_O + b_O

for a whole batch row at a time, with the norm, the q/k/v projection, causal attention, the
output projection and the residual add in one pass over the row, so that none of the
intermediates leaves the core's caches (a row of the 2-layer benchmark model is 16 KiB of
residual and 48 KiB of q, k, v). It is the forward of a model block when nobody reads or edits
any of the sublayer's hook points; XLA runs the rest of the model (and every backward: the JAX
side pairs this kernel with the unfused reference: ``tinyinterp.fast.sublayer``,
``with_reference_grad``).

Below it, two row-chunked kernels for runs that read hook points inside the sublayer (a cache):
``qkv_fwd`` writes q, k, v from the normalized residual, ``attention_out_fwd`` writes hook_result
and the summed attention output. They use the same register tiles.

The fused kernel writes no hook points: a variant that also wrote the sublayer's activations for
a cache was slower than the unfused cache path (full cache of the 2-layer benchmark model: 7.7-10.2 ms
against 6.6-7.2 ms; without scores, pattern and result: 4.7-4.9 against 4.0 ms). Its extra
stores into XLA's fresh output buffers ran at a fraction of the bandwidth of XLA's own fusions,
streaming (non-temporal) stores included, so caches keep the unfused path.

Layouts (float32, C-contiguous; ``rows`` = batch, ``n`` = head_index * d_head):

    resid, out                  [batch, pos, d_model]
    W                           [d_model, 3 * n]   q, k, v columns, head-major, the norm's weight
    bias                        [3 * n]            and bias already folded in
                                                   (tinyinterp.fast.sublayer._packed_weights)
    W_O                         [head_index, d_head, d_model]
    b_O                         [d_model]
    consts                      [4]                attention scale, norm eps, centre (1: subtract
                                                   the row mean first, as LayerNorm), divide (1:
                                                   divide by sqrt(mean(x^2) + eps); 0: no norm)

The values are those of the reference path (``tinyinterp.model.attention_sublayer``) up to float32
rounding: sums run in a different order (vector partial sums; the bias starts the matmul's
accumulator; fast-math flags as in kernels/simd.py).

Work items are batch rows, claimed from a shared counter like the attention kernels
(kernels/work.py: a row is computed by one thread in a fixed order, so the results do not
depend on the number of threads). The matmuls use a register tile of 8 rows x 3 vectors of
16 outputs (24 accumulators; ~170 GFLOP/s on one core here, against ~125 for 4 x 4); the caller
guarantees that d_model and n are whole vectors (multiples of 16).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .attention import attention_fwd
from .simd import (
    FASTMATH,
    LANES,
    vadd,
    vbroadcast,
    vdiv,
    vfma,
    vhsum,
    vload,
    vsplat,
    vstore,
    vsub,
    vzero,
)
from .work import FfiKernel, claim

_ROWS = 8  # rows of a matmul register tile
_L = LANES


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _tile8x3(x, xo, xs, k_dim, w, wo, ws, b, bo, out, oo, os):
    """out[oo + r*os + c] = b[bo + c] + sum_k x[xo + r*xs + k] * w[wo + k*ws + c] for the 8 rows
    r and the 48 columns c of one tile (all arrays 1-D)."""
    b0, b1, b2 = vload(b, bo), vload(b, bo + _L), vload(b, bo + 2 * _L)
    a00 = a10 = a20 = a30 = a40 = a50 = a60 = a70 = b0
    a01 = a11 = a21 = a31 = a41 = a51 = a61 = a71 = b1
    a02 = a12 = a22 = a32 = a42 = a52 = a62 = a72 = b2
    for k in range(k_dim):
        p = wo + k * ws
        w0, w1, w2 = vload(w, p), vload(w, p + _L), vload(w, p + 2 * _L)
        s = vbroadcast(x, xo + k)
        a00, a01, a02 = vfma(s, w0, a00), vfma(s, w1, a01), vfma(s, w2, a02)
        s = vbroadcast(x, xo + xs + k)
        a10, a11, a12 = vfma(s, w0, a10), vfma(s, w1, a11), vfma(s, w2, a12)
        s = vbroadcast(x, xo + 2 * xs + k)
        a20, a21, a22 = vfma(s, w0, a20), vfma(s, w1, a21), vfma(s, w2, a22)
        s = vbroadcast(x, xo + 3 * xs + k)
        a30, a31, a32 = vfma(s, w0, a30), vfma(s, w1, a31), vfma(s, w2, a32)
        s = vbroadcast(x, xo + 4 * xs + k)
        a40, a41, a42 = vfma(s, w0, a40), vfma(s, w1, a41), vfma(s, w2, a42)
        s = vbroadcast(x, xo + 5 * xs + k)
        a50, a51, a52 = vfma(s, w0, a50), vfma(s, w1, a51), vfma(s, w2, a52)
        s = vbroadcast(x, xo + 6 * xs + k)
        a60, a61, a62 = vfma(s, w0, a60), vfma(s, w1, a61), vfma(s, w2, a62)
        s = vbroadcast(x, xo + 7 * xs + k)
        a70, a71, a72 = vfma(s, w0, a70), vfma(s, w1, a71), vfma(s, w2, a72)
    vstore(out, oo, a00), vstore(out, oo + _L, a01), vstore(out, oo + 2 * _L, a02)
    oo += os
    vstore(out, oo, a10), vstore(out, oo + _L, a11), vstore(out, oo + 2 * _L, a12)
    oo += os
    vstore(out, oo, a20), vstore(out, oo + _L, a21), vstore(out, oo + 2 * _L, a22)
    oo += os
    vstore(out, oo, a30), vstore(out, oo + _L, a31), vstore(out, oo + 2 * _L, a32)
    oo += os
    vstore(out, oo, a40), vstore(out, oo + _L, a41), vstore(out, oo + 2 * _L, a42)
    oo += os
    vstore(out, oo, a50), vstore(out, oo + _L, a51), vstore(out, oo + 2 * _L, a52)
    oo += os
    vstore(out, oo, a60), vstore(out, oo + _L, a61), vstore(out, oo + 2 * _L, a62)
    oo += os
    vstore(out, oo, a70), vstore(out, oo + _L, a71), vstore(out, oo + 2 * _L, a72)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _tile8x1(x, xo, xs, k_dim, w, wo, ws, b, bo, out, oo, os):
    """_tile8x3 for one vector of 16 columns (the columns left over after the 48-wide tiles)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vload(b, bo)
    for k in range(k_dim):
        w0 = vload(w, wo + k * ws)
        a0 = vfma(vbroadcast(x, xo + k), w0, a0)
        a1 = vfma(vbroadcast(x, xo + xs + k), w0, a1)
        a2 = vfma(vbroadcast(x, xo + 2 * xs + k), w0, a2)
        a3 = vfma(vbroadcast(x, xo + 3 * xs + k), w0, a3)
        a4 = vfma(vbroadcast(x, xo + 4 * xs + k), w0, a4)
        a5 = vfma(vbroadcast(x, xo + 5 * xs + k), w0, a5)
        a6 = vfma(vbroadcast(x, xo + 6 * xs + k), w0, a6)
        a7 = vfma(vbroadcast(x, xo + 7 * xs + k), w0, a7)
    vstore(out, oo, a0), vstore(out, oo + os, a1), vstore(out, oo + 2 * os, a2)
    vstore(out, oo + 3 * os, a3), vstore(out, oo + 4 * os, a4), vstore(out, oo + 5 * os, a5)
    vstore(out, oo + 6 * os, a6), vstore(out, oo + 7 * os, a7)


@njit(cache=True, fastmath=FASTMATH)
def _matmul(x, xo, xs, n_rows, k_dim, w, wo, ws, n_out, b, bo, out, oo, os, tile):
    """out[oo + r*os + c] = b[bo + c] + sum_k x[xo + r*xs + k] w[wo + k*ws + c] for r < n_rows
    and c < n_out (a multiple of 16); 1-D arrays with row strides xs, ws, os. x must have rows up
    to the next multiple of 8; out only its n_rows: a last partial tile of rows goes through
    ``tile`` (8 * n_out floats of scratch)."""
    c_end = n_out - n_out % (3 * _L)
    for r in range(0, n_rows, _ROWS):
        xr = xo + r * xs
        partial = r + _ROWS > n_rows
        dst, orow, ostride = (tile, 0, n_out) if partial else (out, oo + r * os, os)
        for c in range(0, c_end, 3 * _L):
            _tile8x3(x, xr, xs, k_dim, w, wo + c, ws, b, bo + c, dst, orow + c, ostride)
        for c in range(c_end, n_out, _L):
            _tile8x1(x, xr, xs, k_dim, w, wo + c, ws, b, bo + c, dst, orow + c, ostride)
        if partial:
            for i in range(n_rows - r):
                _copy(tile, i * n_out, out, oo + (r + i) * os, n_out)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _copy(src, so, dst, do, n):
    """dst[do:do + n] = src[so:so + n] for n a multiple of 16 (1-D arrays)."""
    for c in range(0, n, _L):
        vstore(dst, do + c, vload(src, so + c))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _row_sum(x, o, n):
    """sum_{d < n} x[o + d] (n a multiple of 16): vector partial sums, then the lanes."""
    acc = vzero()
    for c in range(0, n, _L):
        acc = vadd(acc, vload(x, o + c))
    return vhsum(acc)


@njit(cache=True, fastmath=FASTMATH)
def _normalize_row(x, o, n, centre, divide, eps, dst, do):
    """dst[do:do + n] = the normalized row x[o:o + n] (before the norm's weight and bias, which
    are folded into W), as tinyinterp.model.normalize: x - mean (if ``centre``), then
    x / sqrt(mean(x^2) + eps) (if ``divide``; without it the row is copied unchanged)."""
    if not divide:
        _copy(x, o, dst, do, n)
        return
    if centre:
        mean = vsplat(_row_sum(x, o, n) / np.float32(n))
        for c in range(0, n, _L):
            vstore(dst, do + c, vsub(vload(x, o + c), mean))
    else:
        for c in range(0, n, _L):
            vstore(dst, do + c, vload(x, o + c))
    acc = vzero()
    for c in range(0, n, _L):
        y = vload(dst, do + c)
        acc = vfma(y, y, acc)
    s = vsplat(np.float32(np.sqrt(vhsum(acc) / np.float32(n) + eps)))
    for c in range(0, n, _L):
        vstore(dst, do + c, vdiv(vload(dst, do + c), s))


@njit(cache=True, fastmath=FASTMATH)
def attention_block_fwd(resid, W, bias, W_O, b_O, consts, out, counter, first):
    """The fused attention sublayer (module docstring) for batch rows: ``first`` (already
    claimed), then rows claimed from ``counter`` until none are left. Returns how many it did.

    resid, out [batch, pos, d_model]; W, bias, b_O, consts 1-D; W_O [head, d_head, d_model]."""
    n_batch, n_pos, d_model = resid.shape
    n_heads, d_head = W_O.shape[0], W_O.shape[1]
    n = n_heads * d_head
    scale, eps, centre, divide = consts[0], consts[1], consts[2] != 0, consts[3] != 0
    rows = (n_pos + _ROWS - 1) // _ROWS * _ROWS  # padded to whole tiles (zeros)
    xn = np.zeros(rows * d_model, np.float32)  # normalized rows
    qkv = np.zeros((1, rows, 3 * n_heads, d_head), np.float32)  # q, k, v of the row, packed
    qkv_flat = qkv.reshape(rows * 3 * n)
    z_flat = np.zeros(rows * n, np.float32)
    z = z_flat[:n_pos * n].reshape(1, n_pos, n_heads, d_head)
    lse = np.empty((1, n_heads, n_pos), np.float32)
    no_pattern = np.empty((0, 0, 0, 0), np.float32)
    o = np.empty(rows * d_model, np.float32)  # attention output of the row
    tile = np.empty(_ROWS * max(3 * n, d_model), np.float32)
    w_flat = W_O.reshape(n * d_model)
    local = np.ones(1, np.int64)  # a row's heads are all done by this thread
    first0 = np.int64(0)  # (an int64, not a literal 0: the specialisation the FFI task compiled)
    offsets = (0, n_heads, 2 * n_heads)
    row_d = n_pos * d_model  # floats per batch row
    item, count = first, 0
    while item < n_batch:
        x = resid[item].reshape(row_d)
        for t in range(n_pos):
            _normalize_row(x, t * d_model, d_model, centre, divide, eps, xn, t * d_model)
        _matmul(xn, 0, d_model, rows, d_model, W, 0, 3 * n, 3 * n, bias, 0, qkv_flat, 0, 3 * n,
                tile)
        local[0] = 1
        attention_fwd(qkv, qkv, qkv, offsets, scale, z, lse, no_pattern, no_pattern, local, first0)
        _matmul(z_flat, 0, n, rows, n, w_flat, 0, d_model, d_model, b_O, 0, o, 0, d_model, tile)
        ob = out[item].reshape(row_d)
        for c in range(0, row_d, _L):
            vstore(ob, c, vadd(vload(x, c), vload(o, c)))
        count += 1
        item = claim(counter)
    return count


# ---- row-chunked kernels for caches: q/k/v and the attention output --------------------------
# When a cache (or a hook that only reads) wants q, k, v or the per-head results, the model runs
# unfused and these write those hook points. Work items are chunks of CHUNK_ROWS rows of the
# flattened [batch * pos] activations, ``first`` (already claimed) and then those claimed from
# ``counter``; each chunk is done by one thread in a fixed order, so the bits do not depend on the
# number of threads. Each returns how many items it did.

CHUNK_ROWS = 64  # a multiple of 8 (_ROWS)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _chunk(x, width, n_rows, item, pad):
    """(first row, rows, array, offset) of work item ``item`` of x [n_rows * width] (1-D): a
    chunk that is not whole 8-row tiles (the last) is copied into ``pad`` (zeros after it), as
    _matmul reads whole tiles."""
    r0 = item * CHUNK_ROWS
    rows = min(CHUNK_ROWS, n_rows - r0)
    if rows % _ROWS:
        for i in range(rows * width):
            pad[i] = x[r0 * width + i]
        return r0, rows, pad, 0
    return r0, rows, x, r0 * width


@njit(cache=True, fastmath=FASTMATH)
def qkv_fwd(x, W, bias, q, k, v, counter, first):
    """q, k, v [rows, n] = x [rows, d_model] @ W [d_model, 3 * n] + bias [3 * n], the columns
    of W and bias being q's, then k's, then v's (tinyinterp.fast.sublayer._packed_weights, the
    norm's weight and bias folded in); n (= head_index * d_head) a multiple of 16.

    XLA runs these as three [rows, d_model + 1] @ [d_model + 1, n] matmuls (the bias as a row
    against a column of ones); here the same 8-row tiles as the fused sublayer write the three
    outputs (4096 rows, d_model 64, n 64: 0.41 ms against XLA's 0.68)."""
    n_rows, d_model = x.shape
    n = q.shape[1]
    n_items = (n_rows + CHUNK_ROWS - 1) // CHUNK_ROWS
    x_flat = x.reshape(n_rows * d_model)
    w_flat = W.reshape(d_model * 3 * n)
    outs = (q.reshape(n_rows * n), k.reshape(n_rows * n), v.reshape(n_rows * n))
    pad = np.zeros(CHUNK_ROWS * d_model, np.float32)
    tile = np.empty(_ROWS * n, np.float32)
    item, count = first, 0
    while item < n_items:
        r0, rows, xs, xo = _chunk(x_flat, d_model, n_rows, item, pad)
        for c in range(3):
            _matmul(xs, xo, d_model, rows, d_model, w_flat, c * n, 3 * n, n, bias, c * n,
                    outs[c], r0 * n, n, tile)
        count += 1
        item = claim(counter)
    return count


@njit(cache=True, fastmath=FASTMATH)
def attention_out_fwd(z, W_O, b_O, result, out, counter, first):
    """The attention output when its per-head results are cached too: for every row r of
    z [rows, head, d_head] (rows = batch * pos),

        result[r, h] = z[r, h] @ W_O[h]                  [rows, head, d_model]
        out[r]       = z[r].ravel() @ W_O.reshape(head * d_head, d_model) + b_O    [rows, d_model]

    as tinyinterp.fast.sublayer._out_reference computes them (the per-head results, and their
    sum plus b_O), up to float32 rounding. d_model must be a multiple of 16 (d_head may be anything).

    XLA writes hook_result as one matmul against a block-diagonal [head*d_head, head*d_model]
    matrix (head x the multiply-adds) or as a batched matmul with transposes; here each head's
    8-row register tiles write straight into result's [row, head, d_model] layout (4096 rows,
    4 heads of 16, d_model 64, with the summed output: 0.36 ms against XLA's 0.86)."""
    n_rows, n_heads, d_head = z.shape
    d_model = W_O.shape[2]
    n = n_heads * d_head
    n_items = (n_rows + CHUNK_ROWS - 1) // CHUNK_ROWS
    z_flat = z.reshape(n_rows * n)
    w_flat = W_O.reshape(n * d_model)
    r_flat = result.reshape(n_rows * n_heads * d_model)
    o_flat = out.reshape(n_rows * d_model)
    zero = np.zeros(d_model, np.float32)
    pad = np.zeros(CHUNK_ROWS * n, np.float32)
    tile = np.empty(_ROWS * d_model, np.float32)
    item, count = first, 0
    while item < n_items:
        r0, rows, x, xo = _chunk(z_flat, n, n_rows, item, pad)
        for h in range(n_heads):
            _matmul(x, xo + h * d_head, n, rows, d_head, w_flat, h * d_head * d_model, d_model,
                    d_model, zero, 0, r_flat, (r0 * n_heads + h) * d_model, n_heads * d_model,
                    tile)
        _matmul(x, xo, n, rows, n, w_flat, 0, d_model, d_model, b_O, 0, o_flat, r0 * d_model,
                d_model, tile)
        count += 1
        item = claim(counter)
    return count


# ---- how the XLA FFI binding runs these kernels (kernels/ffi.py, kernels/work.py: FfiKernel) ---
# They take weights, which jax.vmap may batch too, so the JAX side calls them with vmap_method
# "sequential" (one call per vmapped element): the ranks are exact (no folded leading dims).


@njit(cache=True, inline="always")
def _row_items(shape):
    """One work item per batch row of resid [batch, pos, d_model]."""
    return shape[0]


@njit(cache=True, inline="always")
def _chunk_items(shape):
    """Chunks of CHUNK_ROWS of the batch * pos rows of a [batch, pos, ...] buffer."""
    return (shape[0] * shape[1] + CHUNK_ROWS - 1) // CHUNK_ROWS


@njit(cache=True, inline="always")
def _run_sublayer_fwd(bufs, shapes, scale, counter, first):
    """args resid [b, pos, d_model], W [d_model, 3n], bias [3n], W_O [h, d, d_model],
    b_O [d_model], consts [3]; ret out [b, pos, d_model]."""
    s0, s3, s6 = shapes[0], shapes[3], shapes[6]
    return attention_block_fwd(bufs[0].reshape((s0[0], s0[1], s0[2])), bufs[1], bufs[2],
                               bufs[3].reshape((s3[0], s3[1], s3[2])), bufs[4], bufs[5],
                               bufs[6].reshape((s6[0], s6[1], s6[2])), counter, first)


@njit(cache=True, inline="always")
def _run_qkv_fwd(bufs, shapes, scale, counter, first):
    """args x [b, pos, d_model], W [d_model, 3n], bias [3n]; rets q, k, v [b, pos, h, d]."""
    sx = shapes[0]
    n_rows, d_model = sx[0] * sx[1], sx[2]
    n = bufs[3].shape[0] // n_rows
    return qkv_fwd(bufs[0].reshape((n_rows, d_model)), bufs[1].reshape((d_model, 3 * n)),
                   bufs[2], bufs[3].reshape((n_rows, n)), bufs[4].reshape((n_rows, n)),
                   bufs[5].reshape((n_rows, n)), counter, first)


@njit(cache=True, inline="always")
def _run_attention_out_fwd(bufs, shapes, scale, counter, first):
    """args z [b, pos, h, d], W_O [h, d, d_model], b_O [d_model]; rets result
    [b, pos, h, d_model], out [b, pos, d_model]."""
    sz, sw = shapes[0], shapes[1]
    n_rows, n_heads, d_model = sz[0] * sz[1], sz[2], sw[2]
    return attention_out_fwd(bufs[0].reshape((n_rows, n_heads, sz[3])),
                             bufs[1].reshape((sw[0], sw[1], d_model)), bufs[2],
                             bufs[3].reshape((n_rows, n_heads, d_model)),
                             bufs[4].reshape((n_rows, d_model)), counter, first)


# FfiKernel(args ranks, rets ranks, scale, batched, split buffer, items, run)
SUBLAYER_FWD = FfiKernel((3, 2, 1, 3, 1, 1), (3,), False, False, 0, _row_items, _run_sublayer_fwd)
QKV_FWD = FfiKernel((3, 2, 1), (4, 4, 4), False, False, 0, _chunk_items, _run_qkv_fwd)
ATTENTION_OUT_FWD = FfiKernel((4, 3, 1), (4, 3), False, False, 0, _chunk_items,
                              _run_attention_out_fwd)
