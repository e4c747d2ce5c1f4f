"""The Numba attention backend agrees with the XLA specification, in values and gradients.

Tolerances are rtol = atol = 1e-5 after dividing by the natural magnitude of each quantity.
Large logits (up to 1e3) are tested with inputs whose scores are exact in float32 (integer-valued
q and k, power-of-two scale): then no implementation rounds the scores, and the comparison tests
the kernels rather than float32's conditioning (two correct float32 implementations summing a
1e3-sized dot product in different orders differ by ~1e-4 in a logit, i.e. 1e-4 relative in p).
"""

from __future__ import annotations

import functools
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tinyinterp.fast import attention as attn
from tinyinterp.fast.attention import (
    apply_pattern,
    attention_pattern,
    attention_scores,
    causal_attention,
    causal_attention_with_pattern,
    packed_causal_attention,
    resolve_backend,
)

NUMBA_PROBLEM = attn.numba_unavailable_reason()
needs_numba = pytest.mark.skipif(NUMBA_PROBLEM is not None,
                                 reason=f"numba backend unavailable: {NUMBA_PROBLEM}")
TOL = 1e-5


def _shape_strategy(max_pos: int = 160, max_d: int = 96):
    return st.tuples(st.integers(1, 4), st.integers(1, max_pos), st.integers(1, 4),
                     st.integers(1, max_d))  # (batch, pos, head_index, d_head)


def _close(got, want, magnitude, what: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    mag = max(float(magnitude), 1e-30)
    err = np.abs(got - want) / mag
    bound = TOL + TOL * np.abs(want) / mag
    worst = float(np.max(err - bound)) if err.size else -1.0
    assert worst <= 0, f"{what}: max scaled error {float(np.max(err)):.3g} exceeds tolerance"


@functools.partial(jax.jit, static_argnames=("backend", "scale"))
def _z_and_grads(q, k, v, ct, backend, scale):
    z, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, backend=backend, scale=scale),
                     q, k, v)
    return z, vjp(ct)  # the gradient of sum(z * ct) with respect to q, k, v


def _amax(x) -> float:
    return float(jnp.max(jnp.abs(x)))


def _grad_magnitudes(q, k, v, ct, scale):
    """The size of the terms each gradient sums (and partly cancels): dS = P * (dP - rowsum(P dP))
    with dP = ct . v, so dq ~ scale |k| |ct| |v|, dk ~ scale |q| |ct| |v|, dv ~ |ct| (P <= 1)."""
    s = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    dp = _amax(ct) * _amax(v)
    return s * _amax(k) * dp, s * _amax(q) * dp, _amax(ct)


def _compare_backends(q, k, v, ct, scale):
    z_n, g_n = _z_and_grads(q, k, v, ct, "numba", scale)
    z_x, g_x = _z_and_grads(q, k, v, ct, "xla", scale)
    _close(z_n, z_x, _amax(v), "z")  # z is a convex combination of rows of v
    mags = _grad_magnitudes(q, k, v, ct, scale)
    for name, a, b, mag in zip("qkv", g_n, g_x, mags, strict=True):
        _close(a, b, max(mag, _amax(b)), f"d{name}")
        assert bool(jnp.all(jnp.isfinite(a))), f"d{name} has NaN/inf"
    return z_n


@needs_numba
@settings(max_examples=15)
@given(shape=_shape_strategy(), logit=st.sampled_from([1.0, 30.0, 1e3]), seed=st.integers(0, 99))
@example(shape=(1, 84, 1, 1), logit=1e3, seed=34)  # P from the float32 lse alone: dv off by 3.3e-5
def test_fused_matches_xla_exact_scores_large_logits(shape, logit, seed):
    """Logits up to ~1e3 (integer-valued q, k; power-of-two scale): z and grads agree (the
    backward renormalises the rows of P it recomputes from the float32 lse, whose ulp at 1e3 is
    6e-5)."""
    rng = np.random.default_rng(seed)
    b, t, h, d = shape
    # integers in [-r, r] with d * r^2 * scale ~ logit; scale = 2^-3 keeps the scores exact
    r = max(1, int(np.sqrt(logit * 8 / d)))
    q, k = (jnp.asarray(rng.integers(-r, r + 1, shape).astype(np.float32)) for _ in range(2))
    v = jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 3)
    ct = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    _compare_backends(q, k, v, ct, 0.125)


@needs_numba
@settings(max_examples=15)
@given(shape=_shape_strategy(), seed=st.integers(0, 99), size=st.sampled_from([0.1, 1.0, 2.0]))
def test_fused_matches_xla_random_floats(shape, seed, size):
    """Arbitrary float32 inputs with the default scale 1/sqrt(d_head): z and grads agree."""
    rng = np.random.default_rng(seed)
    q, k, v, ct = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * size)
                   for _ in range(4))
    _compare_backends(q, k, v, ct, None)


@needs_numba
@settings(max_examples=8)
@given(shape=_shape_strategy(max_pos=64, max_d=32), seed=st.integers(0, 99),
       logit=st.sampled_from([1e4, 1e6]))
def test_no_nan_for_huge_logits(shape, seed, logit):
    """Huge logits give finite z (each row a convex combination of v rows) and finite grads."""
    rng = np.random.default_rng(seed)
    b, t, h, d = shape
    q, k = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.sqrt(logit))
            for _ in range(2))
    v, ct = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2))
    z, grads = _z_and_grads(q, k, v, ct, "numba", None)
    assert bool(jnp.all(jnp.isfinite(z)))
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g)))
    # z[b, i] is a convex combination of v[b, :i+1]
    v_max = jax.lax.cummax(v, axis=1)
    v_min = -jax.lax.cummax(-v, axis=1)
    assert bool(jnp.all((z <= v_max + 1e-5) & (z >= v_min - 1e-5)))


@needs_numba
@pytest.mark.parametrize("shape", [(3, 77, 4, 24), (17, 20, 3, 16)])  # items of 1 head / whole rows
def test_results_do_not_depend_on_thread_count(shape):
    """Under XLA the handlers run each kernel on all of XLA's pool threads; the kernels called
    directly on one thread must give the same bits (each (batch, head) slice is computed by one
    thread, in a fixed order), for the values, the log-sum-exp and the gradients."""
    from tinyinterp.kernels.attention import attention_bwd, attention_fwd, work_items

    rng = np.random.default_rng(0)
    n_batch, n_pos, n_heads, _ = shape
    q, k, v, ct = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    scale = np.float32(1 / np.sqrt(shape[-1]))
    z_xla, lse_xla = attn.ffi.call(attn.ffi.ATTENTION_FWD, attn._fwd_outputs(*shape, False, False))(
        q, k, v, scale=scale)[:2]
    grads_xla = attn._bwd_call(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), z_xla, lse_xla,
                               jnp.asarray(ct), scale)
    n_items, per_item = work_items(n_batch, n_heads)
    assert per_item == (n_heads if n_batch >= 16 else 1)
    empty = np.empty((0, 0, 0, 0), np.float32)
    z, lse = np.empty(shape, np.float32), np.empty((n_batch, n_heads, n_pos), np.float32)
    # the item counter starts at 1: item 0 is claimed by the call itself
    assert attention_fwd(q, k, v, (0, 0, 0), scale, z, lse, empty, empty, np.ones(1, np.int64),
                         0) == n_items
    grads = tuple(np.empty(shape, np.float32) for _ in range(3))
    assert attention_bwd(q, k, v, (0, 0, 0), z, lse, ct, scale, *grads, np.ones(1, np.int64),
                         0) == n_items
    np.testing.assert_array_equal(np.asarray(z_xla), z)
    np.testing.assert_array_equal(np.asarray(lse_xla), lse)
    for a, b in zip(grads_xla, grads, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


@needs_numba
def test_concurrent_calls_from_several_threads():
    """The handlers are reentrant: XLA (or user threads) may run them at the same time."""
    rng = np.random.default_rng(1)
    shape = (2, 50, 3, 16)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(3))
    f = jax.jit(lambda q, k, v: causal_attention(q, k, v, backend="numba"))
    want = np.asarray(f(q, k, v))
    out, errors = [None] * 6, []

    def work(i):
        try:
            for _ in range(5):
                out[i] = np.asarray(f(q * 1.0, k, v))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for o in out:
        np.testing.assert_array_equal(o, want)


def _vmapped_attention(backend: str, k_batched: bool):
    """vmap over a leading `instance` axis; k may be shared (unbatched) across instances."""
    in_axes = (0, 0 if k_batched else None, 0)
    return jax.vmap(lambda q, k, v: causal_attention(q, k, v, backend=backend), in_axes=in_axes)


def _loss_of(fn, ct):
    return lambda *args: jnp.sum(fn(*args) * ct)


@needs_numba
def test_vmap_and_grad_of_vmap():
    rng = np.random.default_rng(2)
    shape = (3, 2, 19, 2, 8)  # (instance, batch, pos, head_index, d_head)
    q, k, v, ct = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(4))
    for k_batched in (True, False):  # broadcast_all also covers an unbatched operand
        kk = k if k_batched else k[0]
        out = {}
        for backend in ("numba", "xla"):
            f = _vmapped_attention(backend, k_batched)
            out[backend] = (jax.jit(f)(q, kk, v),
                            jax.jit(jax.grad(_loss_of(f, ct), (0, 1, 2)))(q, kk, v))
        (z_n, g_n), (z_x, g_x) = out["numba"], out["xla"]
        _close(z_n, z_x, 1.0, "vmapped z")
        for a, b in zip(g_n, g_x, strict=True):
            _close(a, b, max(1.0, _amax(b)), "grad of vmapped attention")
    # the packed and cached-pattern kernels under vmap (leading dims folded into batch)
    qkv = jnp.stack([q, k, v], axis=3)  # [instance, batch, pos, 3, head, d_head]
    out = {}
    for backend in ("numba", "xla"):
        def packed(x, backend=backend):
            return packed_causal_attention(x, backend=backend, pattern=True)

        def loss(x, packed=packed):
            z, _, pattern = jax.vmap(packed)(x)
            return jnp.sum(z * ct) + jnp.sum(pattern * pattern)

        out[backend] = (jax.jit(jax.vmap(packed))(qkv), jax.jit(jax.grad(loss))(qkv))
    for a, b in zip(out["numba"][0], out["xla"][0], strict=True):
        if a is not None:
            _close(a, b, 1.0, "vmapped packed attention")
    _close(out["numba"][1], out["xla"][1], max(1.0, _amax(out["xla"][1])), "grad of vmapped packed")
    # the hooked path (scores, apply_pattern) under vmap, with gradients
    out = {}
    for backend in ("numba", "xla"):
        f = jax.vmap(functools.partial(_z_hooked, backend=backend))
        out[backend] = (jax.jit(f)(q, k, v), jax.jit(jax.grad(_loss_of(f, ct), (0, 1, 2)))(q, k, v))
    _close(out["numba"][0], out["xla"][0], 1.0, "vmapped hooked z")
    for a, b in zip(out["numba"][1], out["xla"][1], strict=True):
        _close(a, b, max(1.0, _amax(b)), "grad of vmapped hooked attention")


def _hooked(q, k, v, backend):
    """The model's path when a hook reads the scores or the pattern."""
    scores = attention_scores(q, k, backend=backend)
    pattern = attention_pattern(scores)
    return scores, pattern, apply_pattern(pattern, v, backend=backend)


def _z_hooked(q, k, v, backend):
    return _hooked(q, k, v, backend)[2]


@needs_numba
def test_scores_and_pattern_paths_match_xla():
    """The hooked path (scores -> pattern -> apply_pattern) with backend="numba" matches XLA and
    matches the fused kernel, in values and gradients."""
    rng = np.random.default_rng(3)
    for shape in ((2, 33, 3, 7), (1, 5, 1, 1)):
        q, k, v, ct = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
                       for _ in range(4))

        s_n, p_n, z_n = jax.jit(_hooked, static_argnames="backend")(q, k, v, "numba")
        s_x, p_x, z_x = jax.jit(_hooked, static_argnames="backend")(q, k, v, "xla")
        upper = ~np.tril(np.ones((shape[1], shape[1]), bool))
        assert bool(np.all(np.isneginf(np.asarray(s_n)[..., upper])))
        finite = ~upper
        _close(np.asarray(s_n)[..., finite], np.asarray(s_x)[..., finite], 1.0, "scores")
        _close(p_n, p_x, 1.0, "pattern")
        _close(z_n, z_x, 1.0, "z via pattern")
        _close(z_n, causal_attention(q, k, v, backend="numba"), 1.0, "hooked vs fused")
        grads = [jax.jit(jax.grad(_loss_of(functools.partial(_z_hooked, backend=b), ct),
                                  (0, 1, 2)))(q, k, v) for b in ("numba", "xla")]
        mags = _grad_magnitudes(q, k, v, ct, None)
        for a, b, mag in zip(*grads, mags, strict=True):
            _close(a, b, max(mag, _amax(b)), "hooked-path gradient")


def _reads_all(outputs, cts):
    """A scalar that reads z, the scores (except the masked -inf entries) and the pattern."""
    z, s, p = outputs
    total = jnp.sum(z * cts[0])
    if s is not None:
        total += jnp.sum(jnp.where(jnp.isfinite(s), s, 0.0) * cts[1])
    if p is not None:
        total += jnp.sum(p * cts[2])
    return total


@functools.partial(jax.jit, static_argnames=("backend", "want_scores", "want_pattern"))
def _with_pattern_and_grads(q, k, v, cts, backend, want_scores, want_pattern):
    """Values of causal_attention_with_pattern and the gradient of _reads_all."""
    def f(q, k, v):
        return causal_attention_with_pattern(q, k, v, backend=backend, scores=want_scores,
                                             pattern=want_pattern)

    return f(q, k, v), jax.grad(lambda *a: _reads_all(f(*a), cts), (0, 1, 2))(q, k, v)


@needs_numba
@settings(max_examples=12)
@given(shape=_shape_strategy(max_pos=70, max_d=40), seed=st.integers(0, 99),
       wanted=st.sampled_from([(True, True), (True, False), (False, True)]))
def test_fused_kernel_with_cached_pattern_matches_xla(shape, seed, wanted):
    """The fused kernel that also writes the scores and/or the pattern (for a cache) matches the
    XLA spec in values, and in gradients that flow back through z, the scores and the pattern."""
    rng = np.random.default_rng(seed)
    b, t, h, d = shape
    q, k, v = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(3))
    cts = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)),
           *(jnp.asarray(rng.standard_normal((b, h, t, t), dtype=np.float32)) for _ in range(2)))
    (z_n, s_n, p_n), g_n = _with_pattern_and_grads(q, k, v, cts, "numba", *wanted)
    (z_x, s_x, p_x), g_x = _with_pattern_and_grads(q, k, v, cts, "xla", *wanted)
    _close(z_n, z_x, _amax(v), "z")
    _close(z_n, causal_attention(q, k, v, backend="numba"), _amax(v), "z vs the plain kernel")
    assert (s_n is None) == (not wanted[0]) and (p_n is None) == (not wanted[1])
    if wanted[0]:
        upper = ~np.tril(np.ones((t, t), bool))
        assert bool(np.all(np.isneginf(np.asarray(s_n)[..., upper])))
        _close(np.asarray(s_n)[..., ~upper], np.asarray(s_x)[..., ~upper], _amax(s_x[..., ~upper]),
               "scores")
    if wanted[1]:
        _close(p_n, p_x, 1.0, "pattern")
    # The size of the terms each gradient sums: through z and the pattern, dS = P (dP - rowsum)
    # with P summing to 1 over keys; through the scores, dS is the cotangent itself, summed over
    # up to t keys (dq) or t queries (dk).
    per_ds = 2 * (_amax(cts[0]) * _amax(v) + _amax(cts[2])) + t * _amax(cts[1])
    scale = 1.0 / np.sqrt(d)
    mags = (scale * _amax(k) * per_ds, scale * _amax(q) * per_ds, _amax(cts[0]))
    for name, a, c, mag in zip("qkv", g_n, g_x, mags, strict=True):
        _close(a, c, max(mag, _amax(c)), f"d{name}")


@functools.partial(jax.jit, static_argnames=("backend", "want_scores", "want_pattern"))
def _packed_and_grad(qkv, cts, backend, want_scores, want_pattern):
    def f(qkv):
        return packed_causal_attention(qkv, backend=backend, scores=want_scores,
                                       pattern=want_pattern)

    return f(qkv), jax.grad(lambda x: _reads_all(f(x), cts))(qkv)


@needs_numba
@settings(max_examples=12)
@given(shape=_shape_strategy(max_pos=70, max_d=40), seed=st.integers(0, 99),
       wanted=st.sampled_from([(False, False), (True, True), (False, True)]))
def test_packed_qkv_matches_separate_and_xla(shape, seed, wanted):
    """q, k, v packed in one [batch, pos, 3, head, d_head] array: the Numba kernels read them in
    place and return one packed gradient; values and gradients match the XLA spec on the three
    slices, and the unpacked Numba kernel bit for bit in z."""
    rng = np.random.default_rng(seed)
    b, t, h, d = shape
    qkv = jnp.asarray(rng.standard_normal((b, t, 3, h, d), dtype=np.float32))
    cts = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)),
           *(jnp.asarray(rng.standard_normal((b, h, t, t), dtype=np.float32)) for _ in range(2)))
    (z_n, s_n, p_n), g_n = _packed_and_grad(qkv, cts, "numba", *wanted)
    (z_x, s_x, p_x), g_x = _packed_and_grad(qkv, cts, "xla", *wanted)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert np.array_equal(z_n, causal_attention(q, k, v, backend="numba"))
    _close(z_n, z_x, _amax(v), "z")
    assert (s_n is None) == (not wanted[0]) and (p_n is None) == (not wanted[1])
    if wanted[0]:
        finite = np.isfinite(np.asarray(s_x))
        assert np.array_equal(finite, np.isfinite(np.asarray(s_n)))
        _close(np.asarray(s_n)[finite], np.asarray(s_x)[finite], _amax(s_x[finite]), "scores")
    if wanted[1]:
        _close(p_n, p_x, 1.0, "pattern")
    per_ds = 2 * (_amax(cts[0]) * _amax(v) + _amax(cts[2])) + t * _amax(cts[1])
    scale = 1.0 / np.sqrt(d)
    mags = (scale * _amax(k) * per_ds, scale * _amax(q) * per_ds, _amax(cts[0]))
    for i, mag in enumerate(mags):
        _close(g_n[:, :, i], g_x[:, :, i], max(mag, _amax(g_x[:, :, i])), f"d{'qkv'[i]} (packed)")


def test_packed_qkv_bad_shape():
    with pytest.raises(ValueError, match="3, head_index"):
        packed_causal_attention(jnp.zeros((1, 4, 2, 1, 8)))


def test_apply_pattern_uses_an_edited_pattern_above_the_diagonal():
    """apply_pattern is a plain contraction: a hook may put weight on future positions."""
    rng = np.random.default_rng(4)
    shape = (1, 6, 2, 3)
    v = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    pattern = jnp.full((1, 2, 6, 6), 1.0 / 6, jnp.float32)  # uniform over all positions
    want = jnp.broadcast_to(jnp.mean(v, axis=1, keepdims=True), shape)
    for backend in ("xla",) + (("numba",) if NUMBA_PROBLEM is None else ()):
        _close(apply_pattern(pattern, v, backend=backend), want, 1.0, backend)


def test_xla_backend_is_the_spec():
    rng = np.random.default_rng(5)
    shape = (2, 9, 3, 4)
    q, k, v = (rng.standard_normal(shape).astype(np.float64) for _ in range(3))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    s = np.where(np.tril(np.ones((9, 9), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd->bqhd", p, v)
    got = causal_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), backend="xla")
    _close(got, want, 1.0, "xla spec")


@pytest.mark.parametrize("backend", ["xla", "numba"])
def test_bad_inputs_give_clear_errors(backend):
    if backend == "numba" and NUMBA_PROBLEM is not None:
        pytest.skip(f"numba backend unavailable: {NUMBA_PROBLEM}")
    x = jnp.zeros((2, 5, 3, 4), jnp.float32)
    with pytest.raises(ValueError, match="rank 4"):
        causal_attention(x[0], x[0], x[0], backend=backend)
    with pytest.raises(ValueError, match="same shape|agree"):
        causal_attention(x, x, x[:, :, :2], backend=backend)
    with pytest.raises(TypeError, match="floating"):
        causal_attention(x.astype(jnp.int32), x, x, backend=backend)
    with pytest.raises(ValueError, match="pattern"):
        apply_pattern(jnp.zeros((2, 3, 5, 4), jnp.float32), x, backend=backend)
    if backend == "numba":
        with pytest.raises(TypeError, match="float32"):
            causal_attention(x.astype(jnp.float16), x.astype(jnp.float16),
                             x.astype(jnp.float16), backend="numba")
        with pytest.raises(TypeError, match="float32"):
            attention_scores(x.astype(jnp.bfloat16), x.astype(jnp.bfloat16), backend="numba")


@needs_numba
def test_ffi_handlers_reject_a_wrong_call_with_a_clear_error():
    """Called directly with a buffer of the wrong rank, without the 'scale' or 'target'
    attribute, with an attribute of the wrong type or name, with a target index out of range or
    whose entry is not compiled in this process, or with another kernel's index, the one handler
    returns an XLA error that says which check failed (it never reads out of bounds or calls a
    null entry or task)."""
    from tinyinterp.kernels import ffi as kffi

    x = jnp.zeros((1, 4, 2, 8), jnp.float32)
    z = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    lse = jax.ShapeDtypeStruct((1, 2, 4), jnp.float32)
    none = jax.ShapeDtypeStruct((0, 0, 0, 0), jnp.float32)  # no scores, no pattern
    attn.ffi.ensure_registered(attn.ffi.ATTENTION_FWD)
    call = jax.ffi.ffi_call(attn.ffi.ATTENTION_FWD, (z, lse, none, none))
    target = kffi.attributes(attn.ffi.ATTENTION_FWD)["target"]
    out = call(x, x, x, scale=np.float32(1.0), target=target)  # the right call works
    assert not np.any(np.isnan(np.asarray(out[0])))
    # (jax caches eager calls by attribute values, and np.int32(1) == np.float32(1.0): the
    # wrong scale below is 2)
    with pytest.raises(Exception, match="not float32 or does not have the expected rank"):
        jax.block_until_ready(call(x, x, x[0], scale=np.float32(1.0), target=target))
    with pytest.raises(Exception, match="unexpected XLA FFI call frame"):
        jax.block_until_ready(call(x, x, x, target=target))
    with pytest.raises(Exception, match="'scale' \\(a float32 scalar\\)"):
        jax.block_until_ready(call(x, x, x, scale=np.int32(2), target=target))
    n = len(kffi.TARGETS)
    for i, wrong in enumerate(({"target": np.int64(-1)}, {"target": np.int64(n)},
                               {"target": np.float32(1.0)}, {"target": np.int32(target)},
                               {"extra": np.int64(1)})):  # (a scale of its own: not a cached call)
        with pytest.raises(Exception, match="must be 'target'"):
            jax.block_until_ready(call(x, x, x, **{"scale": np.float32(10.0 + i), "target": target,
                                                   **wrong}))
    with pytest.raises(Exception, match="must be 'target'"):
        jax.block_until_ready(call(x, x, x, scale=np.float32(2.0)))
    # a target whose entry this process has not compiled (its slot in the table is 0)
    saved = int(kffi._ADDRESS_TABLE[target])
    kffi._ADDRESS_TABLE[target] = 0
    try:
        with pytest.raises(Exception, match="compiled in this process"):
            jax.block_until_ready(call(x, x, x, scale=np.float32(3.0), target=target))
    finally:
        kffi._ADDRESS_TABLE[target] = saved
    # another kernel's index checks the call against that kernel: 2 arguments, 1 result
    other = kffi.attributes(attn.ffi.SCORES_FWD)["target"]
    with pytest.raises(Exception, match="unexpected XLA FFI call frame"):
        jax.block_until_ready(call(x, x, x, scale=np.float32(1.0), target=other))


def test_resolve_backend():
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("cuda")
    assert resolve_backend("xla") == "xla"
    assert resolve_backend("auto") == ("numba" if NUMBA_PROBLEM is None else "xla")


def test_unsupported_binding_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(attn, "_numba_checked", True)
    monkeypatch.setattr(attn, "_numba_problem", "simulated: FFI API version mismatch")
    monkeypatch.setattr(attn, "_warned", False)
    x = jnp.ones((1, 3, 1, 2), jnp.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("auto") == "xla"
        assert resolve_backend("numba") == "xla"
        z = causal_attention(x, x, x, backend="numba")
    assert len(caught) == 1
    assert "simulated: FFI API version mismatch" in str(caught[0].message)
    np.testing.assert_allclose(np.asarray(z), np.ones((1, 3, 1, 2)), rtol=1e-6)


def _tree_close(got, want, what: str) -> None:
    flat_got, flat_want = jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want), what
    for (path, a), b in zip(flat_got, flat_want, strict=True):
        _close(a, b, max(1e-3, _amax(b)), f"{what} {jax.tree_util.keystr(path)}")


@needs_numba
def test_whole_model_agrees_across_backends():
    """Logits, the activation cache (which materialises scores and pattern), a hook that edits
    the pattern, and parameter gradients are the same with attention_backend numba and xla."""
    import dataclasses

    from tinyinterp import TransformerConfig
    from tinyinterp.model import HookedTransformer, forward, forward_with_cache

    cfg_x = TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=37, n_ctx=29,
                              attn_only=True, attention_backend="xla")
    cfg_n = dataclasses.replace(cfg_x, attention_backend="numba")
    params = HookedTransformer.from_config(cfg_x, seed=0).params
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 37, (3, 29)), jnp.int32)
    names = frozenset(f"blocks.{i}.attn.{n}" for i in range(2)
                      for n in ("hook_attn_scores", "hook_pattern", "hook_z"))
    run_cached = jax.jit(forward_with_cache, static_argnums=(1, 3))
    (logits_n, cache_n), (logits_x, cache_x) = (
        run_cached(params, cfg, tokens, names) for cfg in (cfg_n, cfg_x))
    _close(logits_n, logits_x, 1.0, "logits with cache")
    for name in names:
        a, b = np.asarray(cache_n[name]), np.asarray(cache_x[name])
        finite = np.isfinite(b)
        assert np.array_equal(np.isfinite(a), finite), name  # same -inf mask for the scores
        _close(a[finite], b[finite], max(1.0, float(np.max(np.abs(b[finite])))), name)

    def uniform_pattern(pattern, *, name):  # edits the pattern, including above the diagonal
        return jnp.full_like(pattern, 1.0 / pattern.shape[-1])

    def run_hooked(p, cfg):
        return forward(p, cfg, tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", uniform_pattern)])

    run_hooked = jax.jit(run_hooked, static_argnums=1)
    _close(run_hooked(params, cfg_n), run_hooked(params, cfg_x), 1.0, "logits, edited pattern")

    def loss(p, cfg):  # nothing reads the pattern here: the fused kernels run
        return forward(p, cfg, tokens, return_type="loss")

    loss_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (loss_n, grad_n), (loss_x, grad_x) = (loss_and_grad(params, c) for c in (cfg_n, cfg_x))
    _close(loss_n, loss_x, 1.0, "loss")
    _tree_close(grad_n, grad_x, "parameter gradient")
