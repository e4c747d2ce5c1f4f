"""The fused attention sublayer and the row-chunked q/k/v and attention-output kernels
(kernels/block.py) against their references.

The kernel alone is checked against a float64 numpy sublayer; inside the model, the plain forward
(which takes the kernel) is checked against the same model run through the unfused path (forced
by an identity hook inside the sublayer) and against the XLA backend, in values and gradients.
Each model test also checks which path ran (the kernel's FFI target is in the compiled HLO, or
not), so that none of them can pass without exercising what it claims to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp import TransformerConfig
from tinyinterp.config import NORMALIZATION_TYPES
from tinyinterp.fast import attention
from tinyinterp.fast.plan import MIN_FUSED_BATCH
from tinyinterp.model import HookedTransformer, forward, forward_with_cache

NUMBA_PROBLEM = attention.numba_unavailable_reason()
needs_numba = pytest.mark.skipif(NUMBA_PROBLEM is not None,
                                 reason=f"numba backend unavailable: {NUMBA_PROBLEM}")
NORMS = NORMALIZATION_TYPES
TARGET = "tinyinterp_attention_block_fwd"
OUT_TARGET = "tinyinterp_attention_out_fwd"
QKV_TARGET = "tinyinterp_qkv_fwd"


def _reference(resid, W, bias, W_O, b_O, scale, eps, norm):
    """The sublayer in float64: resid + attn(norm(resid) @ W + bias) @ W_O + b_O."""
    x = resid.astype(np.float64)
    if norm in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdims=True)
    if norm is not None:
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    n_batch, n_pos, _ = x.shape
    n_heads, d_head, _ = W_O.shape
    qkv = (x @ W + bias).reshape(n_batch, n_pos, 3, n_heads, d_head)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = np.where(np.tril(np.ones((n_pos, n_pos), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    z = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(n_batch, n_pos, n_heads * d_head)
    return resid + z @ W_O.reshape(n_heads * d_head, -1) + b_O


def _heads():  # (head_index, d_head) with head_index * d_head a multiple of 16 (the kernel's rule)
    return st.sampled_from([(1, 16), (2, 8), (4, 4), (3, 16), (4, 16), (2, 24), (1, 48), (5, 16)])


@st.composite
def _kernel_case(draw):
    n_heads, d_head = draw(_heads())
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 40)), draw(st.sampled_from([16, 32, 48])))
    return (shape, n_heads, d_head, draw(st.sampled_from(NORMS)), draw(st.integers(0, 2**16)),
            draw(st.sampled_from(["small", "unit", "exact large logits"])))


def _kernel_inputs(shape, n_heads, d_head, seed, kind="unit"):
    """Random sublayer inputs. "small" and "unit": float residuals of scale 0.01 and 1.
    "exact large logits" (used without a norm): integer-valued residuals and q/k/v weights, so
    that q, k and their dot products are exact in float32 and any implementation gets the same
    logits, in the hundreds: softmax rows that are nearly one-hot test the kernel, not float32's
    conditioning (with rounded logits of that size, two correct float32 implementations differ
    by ~1e-4 in a logit, i.e. in the probabilities of near ties)."""
    rng = np.random.default_rng(seed)
    n_batch, n_pos, d_model = shape
    n = n_heads * d_head
    W_O = (rng.standard_normal((n_heads, d_head, d_model)) / np.sqrt(n)).astype(np.float32)
    b_O = rng.standard_normal(d_model).astype(np.float32) * 0.3
    if kind == "exact large logits":
        resid = rng.integers(-3, 4, shape).astype(np.float32)
        W = rng.integers(-1, 2, (d_model, 3 * n)).astype(np.float32)
        bias = rng.integers(-2, 3, 3 * n).astype(np.float32)
        return resid, W, bias, W_O, b_O
    resid = (rng.standard_normal(shape).astype(np.float32) * 2 + 0.5) * np.float32(
        0.01 if kind == "small" else 1.0)
    W = (rng.standard_normal((d_model, 3 * n)) / np.sqrt(d_model)).astype(np.float32)
    bias = rng.standard_normal(3 * n).astype(np.float32) * 0.3
    return resid, W, bias, W_O, b_O


@needs_numba
@settings(max_examples=30, deadline=None)
@given(case=_kernel_case())
def test_kernel_matches_float64_reference(case):
    """Every norm type; positions that are not whole 8-row tiles; q/k/v widths that use the
    48-column tiles, the 16-column tiles or both; small, unit and (exact) large logits."""
    from tinyinterp.kernels.block import attention_block_fwd

    shape, n_heads, d_head, norm, seed, kind = case
    resid, W, bias, W_O, b_O = _kernel_inputs(shape, n_heads, d_head, seed, kind)
    scale, eps = np.float32(1 / np.sqrt(d_head)), 1e-5
    if kind == "exact large logits":
        norm, scale = None, np.float32(0.25)  # a power of two: the scaled logits stay exact
    out = np.full(shape, np.nan, np.float32)
    centre, divide = norm in ("LN", "LNPre"), norm is not None
    consts = np.array([scale, eps, centre, divide], np.float32)
    done = attention_block_fwd(resid, W.reshape(-1), bias, W_O, b_O, consts, out,
                               np.ones(1, np.int64), 0)
    assert done == shape[0]  # one work item per batch row, all done by this call
    want = _reference(resid, W, bias, W_O, b_O, float(scale), eps, norm)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))


@needs_numba
def test_kernel_under_xla_is_bitwise_the_direct_call():
    """Through the FFI the rows are split over XLA's pool threads; each row is computed by one
    thread in a fixed order, so the bits equal one direct call on one thread."""
    from tinyinterp.kernels.block import attention_block_fwd

    shape, n_heads, d_head = (19, 23, 32), 3, 16
    resid, W, bias, W_O, b_O = _kernel_inputs(shape, n_heads, d_head, 3)
    got = attention.attention_block_fwd(jnp.asarray(resid), jnp.asarray(W), jnp.asarray(bias),
                                        jnp.asarray(W_O), jnp.asarray(b_O), scale=0.25,
                                        eps=1e-5, norm="LN")
    out = np.empty(shape, np.float32)
    attention_block_fwd(resid, W.reshape(-1), bias, W_O, b_O,
                        np.array([0.25, 1e-5, 1, 1], np.float32), out, np.ones(1, np.int64), 0)
    np.testing.assert_array_equal(np.asarray(got), out)


def _config(draw, backend="numba"):
    n_heads, d_head = draw(_heads().filter(lambda h: h[0] * h[1] <= 48))
    return TransformerConfig(
        n_layers=draw(st.integers(1, 2)), d_model=n_heads * d_head, n_heads=n_heads, d_head=d_head,
        d_vocab=draw(st.integers(3, 40)), n_ctx=20,
        attn_only=draw(st.booleans()), d_mlp=32, normalization_type=draw(st.sampled_from(NORMS)),
        attention_backend=backend)


@st.composite
def _model_case(draw):
    cfg = _config(draw)
    n_batch, n_pos = draw(st.integers(2, 11)), draw(st.integers(1, 20))
    seed = draw(st.integers(0, 2**16))
    tokens = np.random.default_rng(seed).integers(0, cfg.d_vocab, (n_batch, n_pos))
    return cfg, jnp.asarray(tokens, jnp.int32), seed


def _perturbed_params(cfg, seed):
    """Init params plus noise on every leaf, so biases and norm weights are not 0/1."""
    params = HookedTransformer.from_config(cfg, seed=seed % 7).params
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys, strict=True)])


def _unfused_hooks(cfg):
    """An identity hook inside every attention sublayer: the model then takes the unfused path."""
    return [(f"blocks.{i}.attn.hook_z", lambda x, *, name: x) for i in range(cfg.n_layers)]


def _compiled(fn, *args):
    """(the compiled jit of fn for these args, whether it runs the fused kernel)."""
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, TARGET in compiled.as_text()


def _runs_kernel(fn, *args) -> bool:
    return _compiled(fn, *args)[1]


@needs_numba
@settings(max_examples=8, deadline=None)
@given(case=_model_case())
def test_model_forward_matches_unfused_and_xla(case):
    cfg, tokens, seed = case
    params = _perturbed_params(cfg, seed)
    cfg_xla = dataclasses.replace(cfg, attention_backend="xla")
    fused, uses_kernel = _compiled(lambda p: forward(p, cfg, tokens), params)
    unfused, unfused_uses_kernel = _compiled(
        lambda p: forward(p, cfg, tokens, fwd_hooks=_unfused_hooks(cfg)), params)
    assert uses_kernel and not unfused_uses_kernel
    got = np.asarray(fused(params))
    scale = max(1.0, float(np.abs(got).max()))
    for other in (unfused(params), jax.jit(lambda p: forward(p, cfg_xla, tokens))(params)):
        np.testing.assert_allclose(got, np.asarray(other), rtol=2e-5, atol=2e-5 * scale)


@needs_numba
@settings(max_examples=4, deadline=None)
@given(case=_model_case())
def test_gradients_are_the_unfused_paths(case):
    """Under jax.grad the kernel does not run (its autodiff rule is the unfused path's), so the
    loss and every parameter gradient equal the unfused run's."""
    cfg, tokens, seed = case
    params = _perturbed_params(cfg, seed)

    def loss(p, hooks):
        return forward(p, cfg, tokens, return_type="loss", fwd_hooks=hooks)

    grad_plain, uses_kernel = _compiled(jax.value_and_grad(lambda p: loss(p, ())), params)
    assert not uses_kernel
    (l_f, g_f), (l_u, g_u) = grad_plain(params), jax.jit(
        jax.value_and_grad(lambda p: loss(p, _unfused_hooks(cfg))))(params)
    np.testing.assert_allclose(float(l_f), float(l_u), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_u), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                   atol=1e-6 * max(1.0, float(np.abs(b).max())))


@needs_numba
def test_vmap_over_models_and_small_batches():
    """vmap over two parameter sets runs the kernel once per set (its weights differ); a batch
    below MIN_FUSED_BATCH, or a d_model that is not whole vectors, takes the unfused
    path. All agree with the unfused forward."""
    cfg = TransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_vocab=11, n_ctx=9,
                            attn_only=True, attention_backend="numba")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (8, 9)), jnp.int32)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), _perturbed_params(cfg, 1),
                           _perturbed_params(cfg, 2))
    batched = jax.jit(jax.vmap(lambda p: forward(p, cfg, tokens)))
    assert TARGET in batched.lower(stacked).compile().as_text()
    got = np.asarray(batched(stacked))
    for i in range(2):
        p = jax.tree.map(lambda x, i=i: x[i], stacked)
        want = jax.jit(lambda p: forward(p, cfg, tokens, fwd_hooks=_unfused_hooks(cfg)))(p)
        np.testing.assert_allclose(got[i], np.asarray(want), rtol=2e-5, atol=2e-5)
    small = tokens[:MIN_FUSED_BATCH - 1]
    assert not _runs_kernel(lambda p: forward(p, cfg, small), _perturbed_params(cfg, 1))
    odd = dataclasses.replace(cfg, d_model=24, d_head=12)
    assert not _runs_kernel(lambda p: forward(p, odd, tokens), _perturbed_params(odd, 1))


# ---- attention_out_fwd: hook_result and the summed output in one kernel -----------------------


def _out_inputs(n_rows, n_heads, d_head, d_model, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_rows, n_heads, d_head)).astype(np.float32)
    W_O = (rng.standard_normal((n_heads, d_head, d_model)) / np.sqrt(d_head)).astype(np.float32)
    return z, W_O, rng.standard_normal(d_model).astype(np.float32)


@needs_numba
@settings(max_examples=30, deadline=None)
@given(n_rows=st.integers(1, 150), n_heads=st.integers(1, 5), d_head=st.integers(1, 24),
       d_model=st.sampled_from([16, 32, 48, 64, 80]), seed=st.integers(0, 2**16))
def test_attention_out_kernel_matches_float64_reference(n_rows, n_heads, d_head, d_model, seed):
    """Row counts that are not whole 8-row tiles or whole CHUNK_ROWS items (up to 3 items), any
    d_head, d_model that uses the 48-column tiles, the 16-column tiles or both."""
    from tinyinterp.kernels.block import CHUNK_ROWS, attention_out_fwd

    z, W_O, b_O = _out_inputs(n_rows, n_heads, d_head, d_model, seed)
    result = np.full((n_rows, n_heads, d_model), np.nan, np.float32)
    out = np.full((n_rows, d_model), np.nan, np.float32)
    done = attention_out_fwd(z, W_O, b_O, result, out, np.ones(1, np.int64), 0)
    assert done == -(-n_rows // CHUNK_ROWS)  # every item, by this call
    want = np.einsum("rhd,hdm->rhm", z.astype(np.float64), W_O.astype(np.float64))
    scale = max(1.0, np.abs(want).max())
    np.testing.assert_allclose(result, want, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(out, want.sum(1) + b_O, rtol=1e-5, atol=1e-6 * n_heads * scale)


@needs_numba
def test_attention_out_under_xla_is_bitwise_the_direct_call():
    """Through the FFI the chunks of rows are split over XLA's pool threads; each is computed by
    one thread in a fixed order, so the bits equal one direct call on one thread."""
    from tinyinterp.kernels.block import CHUNK_ROWS, attention_out_fwd

    n_batch, n_pos, n_heads, d_head, d_model = 7, 29, 3, 16, 48
    assert n_batch * n_pos > 2 * CHUNK_ROWS
    z, W_O, b_O = _out_inputs(n_batch * n_pos, n_heads, d_head, d_model, 5)
    got_r, got_o = jax.jit(attention.attention_out_fwd)(
        jnp.asarray(z).reshape(n_batch, n_pos, n_heads, d_head), jnp.asarray(W_O),
        jnp.asarray(b_O))
    result = np.empty((n_batch * n_pos, n_heads, d_model), np.float32)
    out = np.empty((n_batch * n_pos, d_model), np.float32)
    attention_out_fwd(z, W_O, b_O, result, out, np.ones(1, np.int64), 0)
    np.testing.assert_array_equal(np.asarray(got_r).reshape(result.shape), result)
    np.testing.assert_array_equal(np.asarray(got_o).reshape(out.shape), out)


def _reads_result(cfg):
    return [f"blocks.{i}.attn.hook_result" for i in range(cfg.n_layers)]


def _qkv_names(cfg):
    return [f"blocks.{i}.attn.hook_{c}" for i in range(cfg.n_layers) for c in "qkv"]


def _identity_hooks(names):
    return [(n, lambda x, *, name: x) for n in names]


def _check_cache_paths(cfg, tokens, params, names, edit, target):
    """The cache of ``names`` takes the kernel ``target``; it agrees with the run whose hooks
    ``edit`` force the jnp path and with the XLA backend, in the cached values and the logits."""
    runs = {}
    for label, c, hooks in (("kernel", cfg, ()), ("jnp", cfg, edit),
                            ("xla", dataclasses.replace(cfg, attention_backend="xla"), ())):
        fn = jax.jit(lambda p, c=c, hooks=hooks: forward_with_cache(p, c, tokens, names,
                                                                     fwd_hooks=hooks))
        assert (target in fn.lower(params).compile().as_text()) == (label == "kernel")
        runs[label] = fn(params)
    logits, cache = runs["kernel"]
    for label in ("jnp", "xla"):
        other_logits, other = runs[label]
        np.testing.assert_allclose(np.asarray(logits), np.asarray(other_logits), rtol=2e-5,
                                   atol=2e-5 * max(1.0, float(np.abs(logits).max())))
        for n in names:
            want = np.asarray(other[n])
            np.testing.assert_allclose(np.asarray(cache[n]), want, rtol=2e-5,
                                       atol=2e-5 * max(1.0, np.abs(want).max()))


def _check_cache_gradients(cfg, tokens, params, names, edit, target):
    """A metric of the cached ``names`` and the loss, differentiated: the kernel ``target`` does
    not run under jax.grad (its autodiff rule is the jnp reference's), and the value and every
    parameter gradient equal those of the run whose hooks ``edit`` force the jnp path. (The
    metric's terms are all positive, so its relative rounding is that of its parts.)"""

    def metric(p, hooks):
        loss, cache = forward_with_cache(p, cfg, tokens, names, return_type="loss",
                                         fwd_hooks=hooks)
        return loss + sum(jnp.mean(jnp.tanh(cache[n]) ** 2) for n in names)

    grad_kernel = jax.jit(jax.value_and_grad(lambda p: metric(p, ())))
    assert target not in grad_kernel.lower(params).compile().as_text()
    (m_k, g_k), (m_j, g_j) = grad_kernel(params), jax.jit(
        jax.value_and_grad(lambda p: metric(p, edit)))(params)
    np.testing.assert_allclose(float(m_k), float(m_j), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_j), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                   atol=1e-5 * max(1.0, float(np.abs(b).max())))


@needs_numba
@settings(max_examples=6, deadline=None)
@given(case=_model_case())
def test_cached_result_matches_reference_paths(case):
    """A cache of hook_result (with the residual stream after it) takes the kernel; the jnp path
    is forced by identity hooks on hook_result (which then sums the results)."""
    cfg, tokens, seed = case
    names = _reads_result(cfg) + [f"blocks.{i}.hook_resid_post" for i in range(cfg.n_layers)]
    _check_cache_paths(cfg, tokens, _perturbed_params(cfg, seed), names,
                       _identity_hooks(_reads_result(cfg)), OUT_TARGET)


@needs_numba
@settings(max_examples=4, deadline=None)
@given(case=_model_case())
def test_gradients_through_cached_result_are_the_references(case):
    cfg, tokens, seed = case
    names = _reads_result(cfg)
    _check_cache_gradients(cfg, tokens, _perturbed_params(cfg, seed), names,
                           _identity_hooks(names), OUT_TARGET)


@needs_numba
def test_row_kernels_vmap_and_unsupported_shapes():
    """vmap over two parameter sets runs the q/k/v and attention-output kernels once per set;
    d_model and head_index * d_head that are not whole 16-float vectors take the jnp path. Both
    agree with the jnp path."""
    cfg = TransformerConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_vocab=11, n_ctx=9,
                            attn_only=True, attention_backend="numba")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (3, 9)), jnp.int32)
    names = _reads_result(cfg) + ["blocks.0.attn.hook_q"]
    edit = _identity_hooks(_reads_result(cfg) + _qkv_names(cfg))
    stacked = jax.tree.map(lambda *x: jnp.stack(x), _perturbed_params(cfg, 1),
                           _perturbed_params(cfg, 2))
    batched = jax.jit(jax.vmap(lambda p: forward_with_cache(p, cfg, tokens, names)[1]))
    hlo = batched.lower(stacked).compile().as_text()
    assert OUT_TARGET in hlo and QKV_TARGET in hlo
    got = batched(stacked)
    for i in range(2):
        p = jax.tree.map(lambda x, i=i: x[i], stacked)
        want = jax.jit(lambda p: forward_with_cache(p, cfg, tokens, names, fwd_hooks=edit)[1])(p)
        for n in names:
            np.testing.assert_allclose(np.asarray(got[n][i]), np.asarray(want[n]), rtol=2e-5,
                                       atol=2e-5)
    odd = dataclasses.replace(cfg, d_model=24, d_head=12)
    fn = jax.jit(lambda p: forward_with_cache(p, odd, tokens, names)[1])
    hlo = fn.lower(_perturbed_params(odd, 1)).compile().as_text()
    assert OUT_TARGET not in hlo and QKV_TARGET not in hlo


# ---- qkv_fwd: q, k, v written separately, for caches and hooks that read them ------------------


@needs_numba
@settings(max_examples=30, deadline=None)
@given(n_rows=st.integers(1, 150), heads=_heads(), d_model=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_qkv_kernel_matches_float64_reference(n_rows, heads, d_model, seed):
    """Row counts that are not whole tiles or chunks, any d_model, q/k/v widths that use the
    48-column tiles, the 16-column tiles or both."""
    from tinyinterp.kernels.block import CHUNK_ROWS, qkv_fwd

    n_heads, d_head = heads
    n = n_heads * d_head
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, d_model)).astype(np.float32)
    W = (rng.standard_normal((d_model, 3 * n)) / np.sqrt(d_model)).astype(np.float32)
    bias = rng.standard_normal(3 * n).astype(np.float32)
    outs = [np.full((n_rows, n), np.nan, np.float32) for _ in range(3)]
    done = qkv_fwd(x, W, bias, *outs, np.ones(1, np.int64), 0)
    assert done == -(-n_rows // CHUNK_ROWS)
    want = x.astype(np.float64) @ W.astype(np.float64) + bias
    for i, got in enumerate(outs):
        np.testing.assert_allclose(got, want[:, i * n:(i + 1) * n], rtol=1e-5, atol=1e-5)


@needs_numba
def test_qkv_under_xla_is_bitwise_the_direct_call():
    from tinyinterp.kernels.block import CHUNK_ROWS, qkv_fwd

    n_batch, n_pos, d_model, n_heads, d_head = 5, 31, 40, 3, 16
    assert n_batch * n_pos > 2 * CHUNK_ROWS
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n_batch, n_pos, d_model)).astype(np.float32)
    W = rng.standard_normal((d_model, 3 * n_heads * d_head)).astype(np.float32)
    bias = rng.standard_normal(3 * n_heads * d_head).astype(np.float32)
    got = jax.jit(attention.qkv_fwd, static_argnums=3)(x, W, bias, n_heads)
    outs = [np.empty((n_batch * n_pos, n_heads * d_head), np.float32) for _ in range(3)]
    qkv_fwd(x.reshape(-1, d_model), W, bias, *outs, np.ones(1, np.int64), 0)
    for g, o in zip(got, outs, strict=True):
        np.testing.assert_array_equal(np.asarray(g).reshape(o.shape), o)


@needs_numba
@settings(max_examples=3, deadline=None)
@given(case=_model_case(), which=st.sampled_from(["q", "qkv", "v+pattern"]))
def test_cached_qkv_matches_reference_paths(case, which):
    """A cache of q, k or v takes the kernel; the jnp path (XLA matmuls) is forced by identity
    hooks on q, k, v. With the pattern cached too, the attention after it is the one a cache of
    the pattern takes."""
    cfg, tokens, seed = case
    names = {"q": [f"blocks.{i}.attn.hook_q" for i in range(cfg.n_layers)],
             "qkv": _qkv_names(cfg),
             "v+pattern": [f"blocks.{i}.attn.hook_{c}" for i in range(cfg.n_layers)
                           for c in ("v", "pattern")]}[which]
    _check_cache_paths(cfg, tokens, _perturbed_params(cfg, seed), names,
                       _identity_hooks(_qkv_names(cfg)), QKV_TARGET)


@needs_numba
@settings(max_examples=2, deadline=None)
@given(case=_model_case())
def test_gradients_through_cached_qkv_are_the_references(case):
    cfg, tokens, seed = case
    names = _qkv_names(cfg)
    _check_cache_gradients(cfg, tokens, _perturbed_params(cfg, seed), names,
                           _identity_hooks(names), QKV_TARGET)
