"""generate(): greedy = step-by-step argmax, seeded sampling, one program, the n_ctx limit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp import HookedTransformer, TransformerConfig
from tinyinterp.generate import _generate_program, generate
from tinyinterp.testing import CONFIG_POOL, random_params_like

POOL = (CONFIG_POOL[1], CONFIG_POOL[0].replace(attention_backend="xla"))


def _model(cfg, seed):
    return random_params_like(HookedTransformer.from_config(cfg, seed), jax.random.key(seed + 1))


@settings(max_examples=6)
@given(st.sampled_from(POOL), st.integers(0, 2**16))
def test_greedy_generation_is_the_argmax_step_by_step(cfg, seed):
    model = _model(cfg, seed)
    n_prompt = 2
    prompt = jax.random.randint(jax.random.key(seed), (2, n_prompt), 0, cfg.d_vocab)
    n_new = cfg.n_ctx - n_prompt  # up to the context limit
    out = generate(model, prompt, n_new, greedy=True)
    seq = prompt
    for _ in range(n_new):
        nxt = jnp.argmax(model(seq)[:, -1], axis=-1).astype(jnp.int32)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))
    # top_k=1 sampling and temperature 0 are greedy too
    np.testing.assert_array_equal(np.asarray(generate(model, prompt, n_new, top_k=1, seed=5)),
                                  np.asarray(seq))
    np.testing.assert_array_equal(np.asarray(generate(model, prompt, n_new, temperature=0.0)),
                                  np.asarray(seq))


def test_sampling_is_deterministic_for_a_seed_and_compiles_once():
    cfg = POOL[1]
    model = _model(cfg, 0)
    prompt = jnp.zeros((3, 2), jnp.int32)
    a = generate(model, prompt, 5, temperature=2.0, top_k=4, seed=7)
    before = _generate_program._cache_size()
    b = generate(model, prompt, 5, temperature=2.0, top_k=4, seed=7)
    c = generate(_model(cfg, 1), prompt + 1, 5, temperature=2.0, top_k=4, seed=8)
    assert _generate_program._cache_size() == before  # same shapes and settings: no recompile
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert c.shape == a.shape == (3, 7)
    samples = {tuple(np.asarray(generate(model, prompt, 5, temperature=3.0, seed=s)).ravel())
               for s in range(4)}
    assert len(samples) > 1  # different seeds, different samples
    top2 = np.asarray(generate(model, prompt, 5, temperature=3.0, top_k=2, seed=3))
    # every sampled token is one of the two most likely at its step
    for i in range(2, 7):
        logits = model(jnp.asarray(top2[:, :i]))[:, -1]
        allowed = np.argsort(-np.asarray(logits), axis=-1)[:, :2]
        assert all(top2[b, i] in allowed[b] for b in range(3))


def test_generation_errors():
    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=6,
                            attention_backend="xla")
    model = HookedTransformer.from_config(cfg, 0)
    prompt = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="exceeds the model's context n_ctx=6"):
        generate(model, prompt, 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompt, 1, top_k=0)
    with pytest.raises(KeyError, match="unknown hook point"):
        generate(model, prompt, 1, fwd_hooks=[("blocks.0.hook_resid_prex", lambda v, *, name: v)])
    with pytest.raises(ValueError, match="token ids"):
        generate(model, prompt + 20, 1)
    assert generate(model, prompt, 0).shape == (1, 4)
