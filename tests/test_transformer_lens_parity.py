"""Same weights -> same activations at every hook point as TransformerLens (float32 rounding).

The project's one check against an independent implementation. The test extra installs torch
(CPU) and transformer-lens (``pip install ".[test]"``); elsewhere the tests skip without them, but
in CI (``CI=true``) a missing TransformerLens is an error, never a skip.
"""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_scenarios import scenario

from tinyinterp.fast.plan import PLANS
from tinyinterp.interop import to_transformer_lens_state_dict
from tinyinterp.testing import configs, models


def _libs():
    """(transformer_lens, torch), imported when a parity test runs, not when tests are collected:
    with torch loaded for the whole session, XLA segfaulted compiling in worker threads (seen in
    a CI run of the superposition reproduction)."""
    if os.environ.get("CI") == "true":
        import torch
        import transformer_lens as tl
    else:
        tl = pytest.importorskip("transformer_lens")
        torch = pytest.importorskip("torch")
    return tl, torch


def tl_model_for(model):
    tl, torch = _libs()
    c = model.cfg
    tl_cfg = tl.HookedTransformerConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_ctx=c.n_ctx, d_head=c.d_head, n_heads=c.n_heads,
        d_mlp=None if c.attn_only else c.d_mlp, d_vocab=c.d_vocab, d_vocab_out=c.d_vocab_out,
        act_fn=c.act_fn, normalization_type=c.normalization_type, attn_only=c.attn_only,
        eps=c.eps, positional_embedding_type="standard", use_attn_result=True, seed=0,
        default_prepend_bos=False)
    tl_model = tl.HookedTransformer(tl_cfg)
    sd = {k: torch.tensor(v) for k, v in to_transformer_lens_state_dict(model).items()}
    missing, unexpected = tl_model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith(("attn.mask", "attn.IGNORE")) for k in missing), missing
    return tl_model.eval()


@settings(max_examples=6)
@given(models(configs(act_fns=("relu", "gelu", "gelu_new", "silu"))), st.integers(0, 2**31 - 1))
def test_every_hook_point_matches_transformer_lens(model, seed):
    _, torch = _libs()
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model.cfg.d_vocab, size=(2, model.cfg.n_ctx)).astype(np.int32)
    logits, cache = model.run_with_cache(tokens)
    tl_model = tl_model_for(model)
    with torch.no_grad():
        tl_logits, tl_cache = tl_model.run_with_cache(torch.tensor(tokens, dtype=torch.long))
    compared = 0
    for name, ours in cache.items():
        if name not in tl_cache.cache_dict:
            assert name.startswith("unembed."), f"{name} missing in TransformerLens"
            continue
        theirs = tl_cache[name].numpy()
        ours = np.asarray(ours)
        assert ours.shape == theirs.shape, name
        finite = np.isfinite(theirs)
        assert np.array_equal(finite, np.isfinite(ours)), name  # same -inf mask in attn_scores
        scale = max(1.0, float(np.abs(theirs[finite]).max(initial=0.0)))
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=name)
        compared += 1
    assert compared >= len(cache) - 2
    np.testing.assert_allclose(np.asarray(logits), tl_logits.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("norm,attn_only,n_heads", [("LN", False, 2), ("RMS", True, 4)])
def test_every_plan_setting_matches_transformer_lens(plan, norm, attn_only, n_heads):
    """Each setting of tinyinterp.fast.PLANS (reached through the hooks and cache of
    tests/plan_scenarios.py on layer 1; layer 0 runs the plain forward's plan) at shapes the
    kernels take (d_model and head_index * d_head whole 16-float vectors, batch >= 2; with
    head_index * d_head equal to d_model and twice it), against TransformerLens: every cached
    value and the logits."""
    import jax

    import tinyinterp
    from tinyinterp.model import forward_with_cache

    _, torch = _libs()

    if plan.route != "plain" and tinyinterp.fast.numba_unavailable_reason() is not None:
        pytest.skip(f"numba backend unavailable: {tinyinterp.fast.numba_unavailable_reason()}")
    cfg = tinyinterp.TransformerConfig(n_layers=2, d_model=32, n_heads=n_heads, d_head=16,
                                       d_vocab=50, n_ctx=12, d_mlp=64, attn_only=attn_only,
                                       normalization_type=norm)
    model = tinyinterp.HookedTransformer.from_config(cfg, seed=3)
    leaves, tree = jax.tree.flatten(model.params)  # biases and norm weights away from 0 / 1
    keys = jax.random.split(jax.random.key(1), len(leaves))
    model = model.with_params(jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]))
    tokens = np.random.default_rng(0).integers(0, cfg.d_vocab, size=(3, cfg.n_ctx)).astype(np.int32)
    names, hooks, backend = scenario(plan, layer=1)
    names = names + ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    logits, cache = jax.jit(lambda p: forward_with_cache(p, cfg, tokens, names, fwd_hooks=hooks,
                                                         backend=backend))(model.params)
    with torch.no_grad():
        tl_logits, tl_cache = tl_model_for(model).run_with_cache(torch.tensor(tokens).long())
    assert set(cache) == set(names)
    for name, ours in cache.items():
        theirs, ours = tl_cache[name].numpy(), np.asarray(ours)
        finite = np.isfinite(theirs)
        assert np.array_equal(finite, np.isfinite(ours)), name
        scale = max(1.0, float(np.abs(theirs[finite]).max(initial=0.0)))
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=name)
    np.testing.assert_allclose(np.asarray(logits), tl_logits.numpy(), rtol=1e-4, atol=1e-4)
