"""Steering vectors and directional ablation: hooks for run_with_hooks and generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp import HookedTransformer
from tinyinterp import steering as S
from tinyinterp.generate import generate
from tinyinterp.testing import CONFIG_POOL, random_params_like

POOL = (CONFIG_POOL[1], CONFIG_POOL[0].replace(attention_backend="xla"))


def _model(cfg, seed):
    return random_params_like(HookedTransformer.from_config(cfg, seed), jax.random.key(seed + 1))


def _close(a, b, tol=2e-4):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


@settings(max_examples=6)
@given(st.sampled_from(POOL), st.integers(0, 2**16), st.data())
def test_act_add_with_coefficient_one_turns_one_prompt_into_the_other(cfg, seed, data):
    """Adding resid(pos) - resid(neg) at layer L to the negative prompt's run makes its residual
    at L the positive prompt's, so everything downstream (the logits) is the positive run's."""
    model = _model(cfg, seed)
    layer = data.draw(st.integers(0, cfg.n_layers - 1))
    key = jax.random.key(seed)
    pos, neg = (jax.random.randint(jax.random.fold_in(key, i), (cfg.n_ctx,), 0, cfg.d_vocab)
                for i in range(2))
    v = S.act_add_vector(model, pos, neg, layer)
    assert v.shape == (cfg.n_ctx, cfg.d_model)
    name = f"blocks.{layer}.hook_resid_pre"
    steered = model.run_with_hooks(neg[None], [(name, S.steering_hook(v, 1.0))])
    _close(steered, model(pos[None]))
    unsteered = model.run_with_hooks(neg[None], [(name, S.steering_hook(v, 0.0))])
    _close(unsteered, model(neg[None]), tol=1e-6)
    # from a position on: earlier positions are untouched
    start = data.draw(st.integers(1, cfg.n_ctx - 1))
    late = model.run_with_hooks(neg[None], [(name, S.steering_hook(v, 1.0, start_pos=start))])
    _close(late[:, :start], model(neg[None])[:, :start], tol=1e-5)


def test_mean_difference_vector_and_generation_with_steering():
    cfg = POOL[0]
    model = _model(cfg, 3)
    key = jax.random.key(0)
    positive = jax.random.randint(jax.random.fold_in(key, 1), (4, 5), 0, cfg.d_vocab)
    negative = jax.random.randint(jax.random.fold_in(key, 2), (3, 5), 0, cfg.d_vocab)
    v = S.mean_difference_vector(model, positive, negative, 1, pos=-1)
    name = "blocks.1.hook_resid_pre"
    _, pc = model.run_with_cache(positive, names_filter=[name])
    _, nc = model.run_with_cache(negative, names_filter=[name])
    _close(v, pc[name][:, -1].mean(0) - nc[name][:, -1].mean(0))
    # one example per side: the vector is ActAdd's at that position
    single = S.mean_difference_vector(model, positive[:1], negative[:1], 1, pos=2)
    _close(single, S.act_add_vector(model, positive[0], negative[0], 1)[2])
    # a steering hook in generation equals steering the argmax step by step
    hook = S.steering_hook(4.0 * v, start_pos=2)
    prompt = negative[:2, :2]
    out = generate(model, prompt, 4, greedy=True, fwd_hooks=[(name, hook)])
    seq = prompt
    for _ in range(4):
        logits = model.run_with_hooks(seq, [(name, hook)])
        seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]], 1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))


@settings(max_examples=5)
@given(st.sampled_from(POOL), st.integers(0, 2**16))
def test_directional_ablation(cfg, seed):
    model = _model(cfg, seed)
    key = jax.random.key(seed)
    tokens = jax.random.randint(key, (2, cfg.n_ctx), 0, cfg.d_vocab)
    r = jax.random.normal(jax.random.fold_in(key, 1), (cfg.d_model,))
    hook = S.directional_ablation_hook(r)
    name = "blocks.1.hook_resid_pre"
    _, cache = model.run_with_cache(tokens, names_filter=[name], fwd_hooks=[(name, hook)])
    r_hat = r / jnp.linalg.norm(r)
    proj = jnp.sum(cache[name] * r_hat[None, None], axis=-1)
    assert float(jnp.abs(proj).max()) < 1e-4 * max(1.0, float(jnp.abs(cache[name]).max()))
    _close(hook(cache[name], name=name), cache[name], tol=1e-5)  # idempotent
    # weight orthogonalization = ablating the direction at every residual writer
    writers = ["hook_embed", "hook_pos_embed"] + [
        f"blocks.{layer}.hook_{w}" for layer in range(cfg.n_layers)
        for w in (("attn_out",) if cfg.attn_only else ("attn_out", "mlp_out"))]
    hooked = model.run_with_hooks(tokens, [(w, hook) for w in writers])
    _close(S.orthogonalize_weights(model, r)(tokens), hooked, tol=1e-4)


def test_steering_errors():
    cfg = POOL[1]
    model = _model(cfg, 0)
    tokens = jnp.zeros((1, 4), jnp.int32)
    wrong = S.steering_hook(jnp.ones(cfg.d_model + 1))
    with pytest.raises(ValueError, match="width"):
        model.run_with_hooks(tokens, [("blocks.0.hook_resid_pre", wrong)])
    with pytest.raises(ValueError, match="width"):
        model.run_with_hooks(tokens, [("blocks.0.hook_resid_pre",
                                       S.directional_ablation_hook(jnp.ones(3)))])
    with pytest.raises(ValueError, match="different lengths"):
        S.act_add_vector(model, jnp.zeros(3, jnp.int32), jnp.zeros(4, jnp.int32), 0)
    with pytest.raises(IndexError, match="layer"):
        S.act_add_vector(model, jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32), 5)
    with pytest.raises(ValueError, match="residual"):
        S.mean_difference_vector(model, tokens, tokens, 0, hook="pattern")
    with pytest.raises(ValueError, match="zero vector"):
        S.directional_ablation_hook(jnp.zeros(cfg.d_model))
    with pytest.raises(ValueError, match="width"):
        S.orthogonalize_weights(model, jnp.ones(cfg.d_model + 2))
