"""Attention functions, each with its Numba kernels beside the jnp that specifies it.

``backend="xla"`` is plain jnp (the same math as ``tinyinterp.model``); ``"numba"`` runs the kernels
in ``kernels/`` through XLA's typed FFI (``tinyinterp.fast.ffi``). Shapes (TransformerLens order):

    q, k, v   [batch, pos, head_index, d_head]
    scores    [batch, head_index, query_pos, key_pos]   (scaled, -inf above the diagonal)
    pattern   [batch, head_index, query_pos, key_pos]   (softmax of scores over key_pos)
    z         [batch, pos, head_index, d_head]

``causal_attention`` pairs the fused forward kernel (which saves only the per-row log-sum-exp)
with a fused backward kernel that recomputes the probabilities (``jax.custom_vjp``).
``causal_attention_with_pattern`` also writes the scores and/or the pattern (for a cache that reads
them); ``packed_causal_attention`` reads q, k, v packed in one [batch, pos, 3, head_index, d_head]
array and returns one packed gradient; ``attention_scores`` and ``apply_pattern`` are the two halves
around the softmax, for runs whose hooks edit the scores or the pattern. ``attention_block_fwd``,
``qkv_fwd`` and ``attention_out_fwd`` are forward-only kernels that ``tinyinterp.fast.sublayer``
pairs with the jnp they replace.

Dtypes: the Numba kernels compute in float32 and these functions raise ``TypeError`` for any other
dtype on the "numba" backend (they never cast); the model's plan sends other dtypes to the plain
path. The XLA backend accepts any floating dtype.

The binding: kernels/ffi.py holds one Numba ``@cfunc`` handler, registered under every target of
kernels/targets.py, one task, and one kernel entry per target; each target is registered and its
entry compiled on first use (``tinyinterp.fast.ffi.ensure_registered``).

Support check: on first use of the Numba backend (``numba_unavailable_reason``) the jaxlib version
(against the range whose offsets kernels/xla_ffi_abi.py names) and the FFI API version of its
header are checked (``ffi.version_problem``), and a tiny call is compared with the XLA path. If
anything fails (other versions, not on CPU, Numba cannot compile), "auto" and "numba" resolve to
"xla" with one warning that says why.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from tinyinterp.config import ATTENTION_BACKENDS as BACKENDS
from tinyinterp.fast import ffi

_lock = threading.Lock()
_numba_problem: str | None = None  # why the numba backend is unavailable, once checked
_numba_checked = False
_warned = False


def _register_and_probe() -> str | None:
    """Register the FFI targets and compare one tiny call with the XLA spec. None means OK."""
    if (problem := ffi.version_problem()) is not None:
        return problem
    if jax.default_backend() != "cpu":
        return f"the Numba kernels run on CPU only; the default JAX platform is {jax.default_backend()!r}"
    try:
        # The probe uses the packed target, the one a model without hooks on q, k, v runs (and
        # trains) with, so a first run compiles no kernel entry it does not need.
        ffi.ensure_registered(ffi.ATTENTION_FWD_PACKED)  # compiles or loads the handler and its kernel
        x = np.linspace(-1.0, 1.0, 2 * 3 * 3 * 2 * 5, dtype=np.float32).reshape(2, 3, 3, 2, 5)
        x[:, :, 1] = x[:, ::-1, 1]
        x[:, :, 2] = np.cos(x[:, :, 2])
        # The first use may come while jit is tracing: evaluate the probe eagerly regardless.
        with jax.ensure_compile_time_eval():
            qkv = jnp.asarray(x)
            got = np.asarray(_numba_attention_qkv(qkv, 0.5, False, False)[0])
            want = np.asarray(_xla_causal_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], 0.5))
        if not np.allclose(got, want, rtol=1e-5, atol=1e-5):
            return "the probe call through the Numba FFI handler disagreed with the XLA path"
    except Exception as e:  # noqa: BLE001 - any failure means: use XLA, and say why
        return f"registering or calling the Numba FFI handlers failed: {type(e).__name__}: {e}"
    return None


def numba_unavailable_reason() -> str | None:
    """None when the Numba backend works here, else why not. The first call registers and probes."""
    global _numba_problem, _numba_checked
    with _lock:
        if not _numba_checked:
            _numba_problem = _register_and_probe()
            _numba_checked = True
    return _numba_problem


def resolve_backend(backend: str) -> str:
    """"auto" -> "numba" when the Numba binding works on this platform, else "xla".

    "numba" where the binding does not work also resolves to "xla", with one warning per process.
    """
    global _warned
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "xla":
        return "xla"
    problem = numba_unavailable_reason()
    if problem is None:
        return "numba"
    with _lock:
        first, _warned = not _warned, True
    if first:
        warnings.warn(f"tinyinterp: Numba attention backend unavailable ({problem}); "
                      "using the XLA attention path instead.", RuntimeWarning, stacklevel=2)
    return "xla"


def _scale(d_head: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(d_head) if scale is None else float(scale)


# ---- input checks -----------------------------------------------------------------------------


def _check_float(name: str, x, backend: str) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} has dtype {dtype}; attention needs floating-point inputs.")
    if backend == "numba" and dtype != jnp.float32:
        raise TypeError(f"{name} has dtype {dtype}; the numba attention backend computes in float32 "
                        "only (it never casts silently). Cast with .astype(jnp.float32) or use "
                        "backend='xla'.")


def _check_qkv(q, k, v, backend: str) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is None:
            continue
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name} must have rank 4 [batch, pos, head_index, d_head]; "
                             f"got shape {jnp.shape(x)}")
        _check_float(name, x, backend)
    kv = k if k is not None else v
    if kv is not None:
        qs, ks = jnp.shape(q), jnp.shape(kv)
        if (qs[0], qs[2], qs[3]) != (ks[0], ks[2], ks[3]):
            raise ValueError(f"q {qs} and k/v {ks} must agree in batch, head_index and d_head")
        if backend == "numba" and qs[1] != ks[1]:
            raise ValueError(f"causal attention needs as many query as key positions; q {qs}, "
                             f"k/v {ks}")
    if k is not None and v is not None and jnp.shape(k) != jnp.shape(v):
        raise ValueError(f"k {jnp.shape(k)} and v {jnp.shape(v)} must have the same shape")


# ---- XLA (the specification) ------------------------------------------------------------------


def _xla_attention_scores(q, k, scale):
    # q, k: [batch, pos, head, d_head] -> scores [batch, head, query_pos, key_pos]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    n_q, n_k = q.shape[1], k.shape[1]
    causal = jnp.tril(jnp.ones((n_q, n_k), dtype=bool))
    return jnp.where(causal[None, None], scores, -jnp.inf)  # [q, k] -> [1, 1, q, k]


def _xla_apply_pattern(pattern, v):
    # pattern [batch, head, query_pos, key_pos], v [batch, key_pos, head, d_head] -> z [b, q, h, d]
    return jnp.einsum("bhqk,bkhd->bqhd", pattern, v)


def _xla_causal_attention(q, k, v, scale):
    return _xla_apply_pattern(attention_pattern(_xla_attention_scores(q, k, scale)), v)


# ---- Numba through the typed FFI --------------------------------------------------------------
# vmap_method="broadcast_all": under vmap every operand gets the same leading batch dims and the
# handlers fold all leading dims into `batch` (the buffers are contiguous), so a vmapped call is
# one kernel launch with full batch x head parallelism, not a sequential loop of launches.


def _fwd_outputs(n_batch, n_pos, n_heads, d_head, want_scores, want_pattern):
    """Result shapes of the forward kernels: z [b, pos, h, d], lse [b, h, pos], scores and
    pattern [b, h, q, k]; an empty scores or pattern buffer tells the kernel not to write it."""
    full = (n_batch, n_heads, n_pos, n_pos)

    def square(wanted):
        return jax.ShapeDtypeStruct(full if wanted else (0, 0, 0, 0), jnp.float32)

    return (jax.ShapeDtypeStruct((n_batch, n_pos, n_heads, d_head), jnp.float32),
            jax.ShapeDtypeStruct((n_batch, n_heads, n_pos), jnp.float32),
            square(want_scores), square(want_pattern))


def _bwd_call(q, k, v, z, lse, dz, scale):
    out = tuple(jax.ShapeDtypeStruct(q.shape, jnp.float32) for _ in range(3))  # dq, dk, dv
    return ffi.call(ffi.ATTENTION_BWD, out)(
        q, k, v, z, lse, dz, scale=np.float32(scale))


# The fused kernel, which also writes the scores and/or the pattern when a cache or a hook only
# reads them (with neither, it is plain fused attention). Their cotangents are usually symbolic
# zeros (nobody differentiates a cached pattern); when they are not, their contribution to dq, dk
# is added with jnp.


def _fwd_pattern_call(q, k, v, scale, want_scores, want_pattern):
    out = _fwd_outputs(*q.shape, want_scores, want_pattern)
    return ffi.call(ffi.ATTENTION_FWD, out)(q, k, v, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _numba_attention_pattern(q, k, v, scale, want_scores, want_pattern):
    z, _, scores, pattern = _fwd_pattern_call(q, k, v, scale, want_scores, want_pattern)
    return z, scores, pattern


def _numba_attention_pattern_fwd(q, k, v, scale, want_scores, want_pattern):
    q, k, v = q.value, k.value, v.value  # CustomVJPPrimal (symbolic_zeros=True)
    z, lse, scores, pattern = _fwd_pattern_call(q, k, v, scale, want_scores, want_pattern)
    return (z, scores, pattern), (q, k, v, z, lse, pattern)


def _is_zero(ct) -> bool:
    return isinstance(ct, jax.custom_derivatives.SymbolicZero)


def _cached_dscores(pattern, dscores, dpattern, want_scores, want_pattern):
    """d loss / d scores through the cached scores and pattern (None if neither carries a
    gradient), as the jnp spec computes it: softmax backward, no gradient where masked."""
    ds = None
    if want_pattern and not _is_zero(dpattern):
        dpattern = dpattern.astype(jnp.float32)
        ds = pattern * (dpattern - jnp.sum(dpattern * pattern, axis=-1, keepdims=True))
    if want_scores and not _is_zero(dscores):
        n_pos = dscores.shape[-1]
        causal = jnp.tril(jnp.ones((n_pos, n_pos), dtype=bool))[None, None]  # [1, 1, q, k]
        masked = jnp.where(causal, dscores.astype(jnp.float32), 0.0)
        ds = masked if ds is None else ds + masked
    return ds


def _dq_dk_from_dscores(ds, q, k, scale):
    return (scale * jnp.einsum("bhqk,bkhd->bqhd", ds, k),
            scale * jnp.einsum("bhqk,bqhd->bkhd", ds, q))


def _numba_attention_pattern_bwd(scale, want_scores, want_pattern, residuals, cts):
    q, k, v, z, lse, pattern = residuals
    dz, dscores, dpattern = cts
    dz = jnp.zeros_like(z) if _is_zero(dz) else dz.astype(jnp.float32)
    dq, dk, dv = _bwd_call(q, k, v, z, lse, dz, scale)
    ds = _cached_dscores(pattern, dscores, dpattern, want_scores, want_pattern)
    if ds is not None:
        dq_s, dk_s = _dq_dk_from_dscores(ds, q, k, scale)
        dq, dk = dq + dq_s, dk + dk_s
    return dq, dk, dv


_numba_attention_pattern.defvjp(_numba_attention_pattern_fwd, _numba_attention_pattern_bwd,
                                symbolic_zeros=True)


# Packed: q, k, v as one [batch, pos, 3, head, d_head] array, as one projection matmul makes them;
# the kernels read the three from it in place and the backward writes one packed dqkv, so the
# model's backward is one matmul for the three input gradients and one for the three weights.


def _fwd_qkv_call(qkv, scale, want_scores, want_pattern):
    n_batch, n_pos, _, n_heads, d_head = qkv.shape
    out = _fwd_outputs(n_batch, n_pos, n_heads, d_head, want_scores, want_pattern)
    return ffi.call(ffi.ATTENTION_FWD_PACKED, out)(qkv, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _numba_attention_qkv(qkv, scale, want_scores, want_pattern):
    z, _, scores, pattern = _fwd_qkv_call(qkv, scale, want_scores, want_pattern)
    return z, scores, pattern


def _numba_attention_qkv_fwd(qkv, scale, want_scores, want_pattern):
    qkv = qkv.value  # CustomVJPPrimal (symbolic_zeros=True)
    z, lse, scores, pattern = _fwd_qkv_call(qkv, scale, want_scores, want_pattern)
    return (z, scores, pattern), (qkv, z, lse, pattern)


def _numba_attention_qkv_bwd(scale, want_scores, want_pattern, residuals, cts):
    qkv, z, lse, pattern = residuals
    dz, dscores, dpattern = cts
    dz = jnp.zeros_like(z) if _is_zero(dz) else dz.astype(jnp.float32)
    dqkv = ffi.call(ffi.ATTENTION_BWD_PACKED, jax.ShapeDtypeStruct(qkv.shape, jnp.float32))(
        qkv, z, lse, dz, scale=np.float32(scale))
    ds = _cached_dscores(pattern, dscores, dpattern, want_scores, want_pattern)
    if ds is not None:
        dq_s, dk_s = _dq_dk_from_dscores(ds, qkv[:, :, 0], qkv[:, :, 1], scale)
        dqkv = dqkv + jnp.stack([dq_s, dk_s, jnp.zeros_like(dq_s)], axis=2)
    return (dqkv,)


_numba_attention_qkv.defvjp(_numba_attention_qkv_fwd, _numba_attention_qkv_bwd,
                            symbolic_zeros=True)


# The hooked path: scores and pattern are materialised because a hook reads or edits them.


def _scores_call(q, k, scale):
    n_batch, n_pos, n_heads, _ = q.shape
    out = jax.ShapeDtypeStruct((n_batch, n_heads, n_pos, n_pos), jnp.float32)  # [b, h, q, k]
    return ffi.call(ffi.SCORES_FWD, out)(
        q, k, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _numba_scores(q, k, scale):
    return _scores_call(q, k, scale)


def _numba_scores_fwd(q, k, scale):
    return _scores_call(q, k, scale), (q, k)


def _numba_scores_bwd(scale, residuals, dscores):
    q, k = residuals
    out = tuple(jax.ShapeDtypeStruct(q.shape, jnp.float32) for _ in range(2))  # dq, dk
    return ffi.call(ffi.SCORES_BWD, out)(
        q, k, dscores.astype(jnp.float32), scale=np.float32(scale))


_numba_scores.defvjp(_numba_scores_fwd, _numba_scores_bwd)


def _apply_call(pattern, v):
    out = jax.ShapeDtypeStruct(v.shape, jnp.float32)  # z [b, pos, h, d]
    return ffi.call(ffi.APPLY_FWD, out)(pattern, v)


@jax.custom_vjp
def _numba_apply(pattern, v):
    return _apply_call(pattern, v)


def _numba_apply_fwd(pattern, v):
    return _apply_call(pattern, v), (pattern, v)


def _numba_apply_bwd(residuals, dz):
    pattern, v = residuals
    out = (jax.ShapeDtypeStruct(pattern.shape, jnp.float32),  # dpattern [b, h, q, k]
           jax.ShapeDtypeStruct(v.shape, jnp.float32))  # dv [b, pos, h, d]
    return ffi.call(ffi.APPLY_BWD, out)(
        pattern, v, dz.astype(jnp.float32))


_numba_apply.defvjp(_numba_apply_fwd, _numba_apply_bwd)


# ---- public API -------------------------------------------------------------------------------


def attention_scores(q: jax.Array, k: jax.Array, *, backend: str = "xla",
                     scale: float | None = None) -> jax.Array:
    """Causally masked, scaled scores [batch, head, query_pos, key_pos]; -inf above the diagonal.

    With backend="numba" a kernel computes only the unmasked half and fills the rest with -inf;
    its gradient (dq, dk) ignores the masked entries, as the jnp.where of the spec does."""
    backend = resolve_backend(backend)
    _check_qkv(q, k, None, backend)
    s = _scale(q.shape[-1], scale)
    if backend == "numba" and q.size > 0:
        return _numba_scores(q, k, s)  # kernel skips the masked triangle (fills it with -inf)
    return _xla_attention_scores(q, k, s)


def attention_pattern(scores: jax.Array) -> jax.Array:
    """Numerically stable softmax over key_pos (the model's ``softmax_pattern``). A fully masked
    row (all -inf) gives zeros, not NaN."""
    from tinyinterp.model import softmax_pattern

    return softmax_pattern(scores)


def apply_pattern(pattern: jax.Array, v: jax.Array, *, backend: str = "xla") -> jax.Array:
    """z[b, q, h, :] = sum_k pattern[b, h, q, k] v[b, k, h, :] -> [batch, pos, head, d_head].

    A plain contraction over every key, so a hook may put weight anywhere. Differentiable; the
    gradient with respect to the pattern is dense ([batch, head, query_pos, key_pos])."""
    backend = resolve_backend(backend)
    if jnp.ndim(pattern) != 4 or jnp.ndim(v) != 4:
        raise ValueError(f"pattern must be [batch, head, query_pos, key_pos] and v "
                         f"[batch, key_pos, head, d_head]; got {jnp.shape(pattern)} and "
                         f"{jnp.shape(v)}")
    _check_float("pattern", pattern, backend)
    _check_float("v", v, backend)
    ps, vs = jnp.shape(pattern), jnp.shape(v)
    if (ps[0], ps[1], ps[3]) != (vs[0], vs[2], vs[1]):
        raise ValueError(f"pattern {ps} [batch, head, query_pos, key_pos] does not fit v {vs} "
                         "[batch, key_pos, head, d_head]")
    if backend == "numba" and ps[2] == ps[3] and jnp.size(v) > 0:
        # Rows whose weight above the diagonal is exactly zero skip it; rows a hook edited use all
        # keys, as the contraction does. (A non-square pattern takes the XLA path.)
        return _numba_apply(pattern, v)
    return _xla_apply_pattern(pattern, v)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "xla",
                     scale: float | None = None) -> jax.Array:
    """Fused causal attention: z [batch, pos, head_index, d_head], differentiable.

    Used when no hook reads or edits the scores or the pattern. With backend="numba" a fused kernel
    computes it without materialising the [batch, head, query_pos, key_pos] pattern (blocks of 8
    query rows, skipping the masked triangle) and saves only one log-sum-exp per query row; the
    Numba backward recomputes the probabilities from it and returns dq, dk, dv. The numba
    backend needs float32 inputs (TypeError otherwise) and as many query as key positions."""
    backend = resolve_backend(backend)
    _check_qkv(q, k, v, backend)
    s = _scale(q.shape[-1], scale)
    if backend == "numba" and q.size > 0:
        return _numba_attention_pattern(q, k, v, s, False, False)[0]
    return _xla_causal_attention(q, k, v, s)


def causal_attention_with_pattern(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                  backend: str = "xla", scale: float | None = None,
                                  scores: bool = True, pattern: bool = True
                                  ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Causal attention that also returns the scores and/or the pattern, for a cache or a hook
    that reads them without editing them: (z, scores or None, pattern or None).

    Values and gradients are those of ``attention_scores`` -> ``attention_pattern`` ->
    ``apply_pattern``. With backend="numba" the fused kernel writes the [batch, head, query_pos,
    key_pos] arrays asked for while it computes z (one pass, no separate softmax); gradients that
    flow back through the returned scores or pattern are added with jnp. To *edit* the scores or
    the pattern, use those three functions instead."""
    backend = resolve_backend(backend)
    _check_qkv(q, k, v, backend)
    s = _scale(q.shape[-1], scale)
    if backend == "numba" and q.size > 0 and (scores or pattern):
        z, sc, pat = _numba_attention_pattern(q, k, v, s, bool(scores), bool(pattern))
        return z, (sc if scores else None), (pat if pattern else None)
    sc = _xla_attention_scores(q, k, s)
    pat = attention_pattern(sc)
    return _xla_apply_pattern(pat, v), (sc if scores else None), (pat if pattern else None)


def packed_causal_attention(qkv: jax.Array, *, backend: str = "xla", scale: float | None = None,
                            scores: bool = False, pattern: bool = False
                            ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Causal attention of q, k, v packed as qkv [batch, pos, 3, head_index, d_head] (q, k, v =
    qkv[:, :, 0], [:, :, 1], [:, :, 2]), as one projection matmul produces them:
    (z, scores or None, pattern or None), the values and gradients of ``causal_attention_with_pattern``
    on the three slices. With backend="numba" the kernels read the slices in place and the
    gradient comes back packed, so no slice or concatenation is ever copied."""
    backend = resolve_backend(backend)
    if jnp.ndim(qkv) != 5 or jnp.shape(qkv)[2] != 3:
        raise ValueError(f"qkv must be [batch, pos, 3, head_index, d_head]; got shape "
                         f"{jnp.shape(qkv)}")
    _check_float("qkv", qkv, backend)
    s = _scale(qkv.shape[-1], scale)
    if backend == "numba" and qkv.size > 0:
        z, sc, pat = _numba_attention_qkv(qkv, s, bool(scores), bool(pattern))
        return z, (sc if scores else None), (pat if pattern else None)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if scores or pattern:
        return causal_attention_with_pattern(q, k, v, backend=backend, scale=s, scores=scores,
                                             pattern=pattern)
    return _xla_causal_attention(q, k, v, s), None, None


# ---- the fused attention sublayer and the cache kernels (kernels/block.py) ----------------------


def attention_block_fwd(resid: jax.Array, W: jax.Array, bias: jax.Array, W_O: jax.Array,
                        b_O: jax.Array, *, scale: float, eps: float,
                        norm: str | None) -> jax.Array:
    """The fused attention sublayer (Numba backend): resid [batch, pos, d_model] -> resid + the
    sublayer's output. W [d_model, 3 * head * d_head] and bias [3 * head * d_head] project the
    normalized residual (the norm's weight and bias folded in) to q, k, v, packed head-major;
    W_O [head, d_head, d_model], b_O [d_model]; ``norm`` a normalization_type. No autodiff rule
    of its own: tinyinterp.fast.sublayer pairs it with the plain sublayer."""
    f32 = jnp.float32
    centre, divide = norm in ("LN", "LNPre"), norm is not None  # as tinyinterp.model.normalize
    consts = jnp.asarray([scale, eps, centre, divide], f32)
    return ffi.call(ffi.SUBLAYER_FWD, jax.ShapeDtypeStruct(resid.shape, f32),
                    vmap_method="sequential")(  # the weights may be vmapped too: one call each
        resid.astype(f32), W.astype(f32), bias.astype(f32), W_O.astype(f32), b_O.astype(f32),
        consts)


def attention_out_fwd(z: jax.Array, W_O: jax.Array, b_O: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """The attention output with every head's result (Numba backend, kernels/block.py):
    z [batch, pos, head, d_head], W_O [head, d_head, d_model], b_O [d_model] ->
    (result [batch, pos, head, d_model] = z_h @ W_O[h], out [batch, pos, d_model] = the sum over
    heads + b_O). No autodiff rule of its own: tinyinterp.fast.sublayer pairs it with the jnp
    reference."""
    f32 = jnp.float32
    n_batch, n_pos, n_heads, _ = z.shape
    d_model = W_O.shape[-1]
    out = (jax.ShapeDtypeStruct((n_batch, n_pos, n_heads, d_model), f32),
           jax.ShapeDtypeStruct((n_batch, n_pos, d_model), f32))
    return ffi.call(ffi.ATTENTION_OUT_FWD, out, vmap_method="sequential")(
        z.astype(f32), W_O.astype(f32), b_O.astype(f32))


def qkv_fwd(x: jax.Array, W: jax.Array, bias: jax.Array, n_heads: int
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v [batch, pos, head_index, d_head] = x @ W + bias split three ways (Numba backend,
    kernels/block.py): x [batch, pos, d_model], W [d_model, 3 * head_index * d_head] and bias
    [3 * head_index * d_head] with q's columns first, then k's, then v's, each head-major. No
    autodiff rule of its own: tinyinterp.fast.sublayer pairs it with the jnp reference."""
    f32 = jnp.float32
    n_batch, n_pos, _ = x.shape
    d_head = W.shape[1] // (3 * n_heads)
    shape = jax.ShapeDtypeStruct((n_batch, n_pos, n_heads, d_head), f32)
    return ffi.call(ffi.QKV_FWD, (shape, shape, shape), vmap_method="sequential")(
        x.astype(f32), W.astype(f32), bias.astype(f32))
