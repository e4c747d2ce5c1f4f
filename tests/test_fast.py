"""Every plan setting of tinyinterp.fast against the plain model: values and gradients.

The plain model (model.attention_sublayer on the "xla" backend) is the specification; each
setting of ``tinyinterp.fast.PLANS`` is reached by a run whose hooks and cache make the planner
choose it (tests/plan_scenarios.py), and must give the plain values (float32 rounding) and the
plain gradients, with identity hooks, on configs whose d_model and n_heads * d_head are whole
16-float vectors (the shapes the kernels take), for every normalization type, with n_heads * d_head
equal to d_model and not (TransformerLens allows that; tracr's compiled models need it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_scenarios import scenario

from tinyinterp import fast
from tinyinterp.config import NORMALIZATION_TYPES, TransformerConfig
from tinyinterp.hooks import HookContext, hook_names, resolve_fwd_hooks
from tinyinterp.model import forward, forward_with_cache, run
from tinyinterp.testing import CONFIG_POOL, random_params_like

NUMBA_PROBLEM = fast.numba_unavailable_reason()
needs_numba = pytest.mark.skipif(NUMBA_PROBLEM is not None, reason=f"numba: {NUMBA_PROBLEM}")


def _cfg(norm, n_heads=2):
    return TransformerConfig(n_layers=2, d_model=16, n_heads=n_heads, d_head=8, d_mlp=12,
                             d_vocab=10, n_ctx=6, attn_only=False, normalization_type=norm,
                             act_fn="gelu")


def _model(cfg, seed):
    from tinyinterp.model import HookedTransformer

    return random_params_like(HookedTransformer.from_config(cfg, seed=seed),
                              jax.random.key(seed + 1))


def test_plans_are_listed_once_and_printable():
    assert len(set(fast.PLANS)) == len(fast.PLANS)
    assert all(str(p) for p in fast.PLANS)


# Each plan on both head layouts, the norm types taken in turn: every plan meets two of them, and
# every norm type meets the kernels route on both layouts (24 compiled pairs: each costs seconds).
_CASES = [(plan, n_heads, NORMALIZATION_TYPES[(2 * i + j) % len(NORMALIZATION_TYPES)])
          for i, plan in enumerate(fast.PLANS) for j, n_heads in enumerate((2, 4))]


@needs_numba
@pytest.mark.parametrize("plan, n_heads, norm", _CASES,
                         ids=[f"{p}-heads{h}-{n}" for p, h, n in _CASES])
@settings(max_examples=1)
@given(seed=st.integers(0, 2**16))
def test_every_plan_matches_the_plain_model(plan, n_heads, norm, seed):
    cfg = _cfg(norm, n_heads)
    model = _model(cfg, seed)
    tokens = jax.random.randint(jax.random.key(seed), (2, cfg.n_ctx), 0, cfg.d_vocab, jnp.int32)
    names, hooks, backend = scenario(plan, layer=1)
    hp = HookContext(fwd_hooks=resolve_fwd_hooks(hooks, hook_names(cfg)),
                     cache_names=frozenset(names))
    chosen = fast.plan_sublayer(fast.resolve_backend(backend), cfg, hp, 1, tokens.shape + (16,),
                                jnp.float32)
    assert chosen == plan, f"the scenario for {plan} planned {chosen}"

    def scalar(params, backend):
        logits, cache = forward_with_cache(params, cfg, tokens, names, fwd_hooks=hooks,
                                           backend=backend)
        w = jnp.cos(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
        total = jnp.mean(logits * w)
        for value in cache.values():  # gradients through the cached values too
            total = total + jnp.mean(jnp.tanh(jnp.where(jnp.isfinite(value), value, 0.0)) ** 2)
        return total, (logits, cache)

    grad = jax.jit(jax.value_and_grad(scalar, has_aux=True), static_argnums=1)
    (v_fast, (logits_fast, cache_fast)), g_fast = grad(model.params, backend)
    (v_ref, (logits_ref, cache_ref)), g_ref = grad(model.params, "xla")
    np.testing.assert_allclose(logits_fast, logits_ref, rtol=1e-4, atol=1e-5)
    assert list(cache_fast) == list(cache_ref)
    for k in cache_ref:
        np.testing.assert_allclose(cache_fast[k], cache_ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("backend", ["xla", "numba"])
@pytest.mark.parametrize("cfg", CONFIG_POOL, ids=lambda c: f"{c.normalization_type}-{c.d_model}")
def test_the_model_visits_exactly_the_hook_table_in_order(cfg, backend):
    """hooks.hook_names is the one table: a full cache visits every name in it, in its order, and
    nothing else; a plain run (fast paths free to skip points nobody asked for) visits nothing
    outside it, in the same order."""
    if backend == "numba" and NUMBA_PROBLEM is not None:
        pytest.skip(NUMBA_PROBLEM)
    model = _model(cfg, 0)
    tokens = jnp.zeros((2, cfg.n_ctx), jnp.int32)
    table = hook_names(cfg)
    full = HookContext(cache_names=frozenset(table), visited=[])
    jax.eval_shape(lambda p: run(p, cfg, tokens, full, backend=backend), model.params)
    assert full.visited == table
    bare = HookContext(visited=[])
    jax.eval_shape(lambda p: run(p, cfg, tokens, bare, backend=backend), model.params)
    assert set(bare.visited) <= set(table)
    assert bare.visited == [n for n in table if n in set(bare.visited)]


def test_disabled_fast_paths_are_checked_and_scoped():
    cfg = _cfg("LN")
    with pytest.raises(ValueError, match="unknown fast paths"):
        with fast.disabled("fuzed"):
            pass
    with fast.disabled("fused"):
        plan = fast.plan_sublayer("numba", cfg, HookContext(), 0, (2, 6, 16), jnp.float32)
        assert plan.route == "kernels"
    assert fast.plan_sublayer("numba", cfg, HookContext(), 0, (2, 6, 16), jnp.float32) == fast.Plan("fused")


def test_params_of_the_wrong_shape_never_reach_a_kernel():
    cfg = _cfg("LN")
    model = _model(cfg, 0)
    bad = jax.tree.map(lambda x: x, model.params)
    bad["blocks"][0]["attn"]["W_O"] = jnp.zeros((3, 8, 16), jnp.float32)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.W_O'\] has shape \(3, 8, 16\)"):
        model.with_params(bad)  # the model object checks every parameter when it is built
    for backend in ("numba", "xla"):  # the pure forward checks what a kernel would read
        with pytest.raises(ValueError, match=r"blocks\.0\.attn\.W_O has shape \(3, 8, 16\)"):
            forward(bad, cfg, jnp.zeros((2, 4), jnp.int32), backend=backend)
