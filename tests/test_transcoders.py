"""Transcoders (tinyinterp.transcoders): per-layer (with a skip connection) and cross-layer, trained
on a model's cached MLP inputs and outputs; the per-layer report; the tanh sparsity penalty."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinyinterp
from tinyinterp import transcoders as T


@pytest.fixture(scope="module")
def setup():
    cfg = tinyinterp.TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=20,
                                       n_ctx=16, d_mlp=64, act_fn="relu")
    model = tinyinterp.HookedTransformer.from_config(cfg, seed=1)
    toks = np.random.default_rng(0).integers(0, 20, (48, 16)).astype(np.int32)
    xs, ys = T.collect_mlp_io(model, toks[:32])
    return model, toks, xs, ys


def test_mlp_io_and_a_transcoder_equal_to_the_mlp(setup):
    model, toks, xs, ys = setup
    assert xs.shape == ys.shape == (2, 32 * 16, 32)
    _, cache = model.run_with_cache(toks[:1])
    np.testing.assert_allclose(xs[1, :16], np.asarray(cache["blocks.1.ln2.hook_normalized"][0]),
                               rtol=1e-5, atol=1e-5)
    report = T.evaluate(model, T.from_mlps(model), toks[32:])
    assert report["prediction_agreement"] == 1.0
    for row in report["layers"]:
        assert row["normalized_mse"] < 1e-10 and row["dead_fraction"] < 1.0 and row["l0"] > 0


def test_per_layer_skip_transcoders_learn(setup):
    model, toks, xs, ys = setup
    tc = T.train_transcoders(xs, ys, 96, architecture="jumprelu", skip=True, l0_coefficient=1e-3,
                             n_steps=300, batch_size=256, resample_every=0, chunk_size=300,
                             lr=3e-3)
    assert tc.skip and all(p["W_skip"].shape == (32, 32) for p in tc.params)
    # the thresholds moved from their start: the straight-through threshold gradient acts
    assert all(np.abs(np.asarray(p["log_threshold"]) - np.log(0.05)).max() > 1e-3
               for p in tc.params)
    report = T.evaluate(model, tc, toks[32:])  # held-out sequences
    for row in report["layers"]:
        assert row["normalized_mse"] < 0.5, row
        assert 0 < row["l0"] < 96 and 0.0 <= row["dead_fraction"] < 0.5
    assert 0.3 < report["prediction_agreement"] <= 1.0


def test_layers_train_as_one_program():
    """Every layer's transcoder trains in one batched program (each layer its own data), and
    each equals what training that layer alone (sae.train_sae) gives: the batched matmuls round
    differently, so losses agree to a relative 1e-6 (measured: <= 2.3e-7), params to 1e-6
    (measured: <= 2.4e-7); the resampling picks the same latents."""
    from tinyinterp import sae

    xs = np.asarray(jax.random.normal(jax.random.key(1), (2, 200, 8)))
    ys = np.tanh(xs @ np.asarray(jax.random.normal(jax.random.key(2), (8, 8))))
    kw = dict(n_steps=20, batch_size=32, resample_every=10, chunk_size=10, lr=3e-3,
              architecture="jumprelu", l0_coefficient=1e-3)
    cfg = sae.SAEConfig(d_in=8, d_sae=16, d_out=8, **kw)
    keys = [jax.random.key(2 * 1000 + layer) for layer in range(2)]
    swept = sae.train_sae_sweep([cfg] * 2, keys, sae.array_batches(xs, 32, [2, 3], ys=ys))
    tc = T.train_transcoders(xs, ys, 16, seed=2, **kw)
    for layer in range(2):
        alone = sae.train_sae(cfg, keys[layer], sae.array_batch_fn(xs[layer], 32, seed=2 + layer,
                                                                   y=ys[layer]))
        np.testing.assert_allclose(swept[layer].history["loss"], alone.history["loss"], rtol=1e-6)
        assert swept[layer].resampled == alone.resampled and alone.resampled
        for k, v in alone.params.items():
            np.testing.assert_allclose(swept[layer].params[k], v, rtol=0, atol=1e-6, err_msg=k)
            got = tc.params[layer][k]
            np.testing.assert_array_equal(got[:, 0] if k == "W_dec" else got,
                                          swept[layer].params[k])
    with pytest.raises(ValueError, match="RunBatches hold data for 2 runs"):
        sae.train_sae_sweep([cfg] * 3, keys + keys[:1], sae.array_batches(xs, 32, [2, 3], ys=ys))
    with pytest.raises(ValueError, match="2 runs but 3 seeds"):
        sae.array_batches(xs, 32, [2, 3, 4], ys=ys)


def test_cross_layer_transcoder_penalty_and_training(setup):
    model, toks, xs, ys = setup
    # the penalty by hand: one layer's 2 features with concatenated decoder norms 5 and 0.5
    c = T.CLTConfig(n_features=2, architecture="relu", sparsity=0.1, tanh_c=2.0)
    params = [{"W_enc": jnp.eye(2, dtype=jnp.float32), "b_enc": jnp.zeros(2, jnp.float32),
               "W_dec": jnp.array([[[3.0, 4.0]], [[0.3, 0.4]]], jnp.float32),
               "b_dec": jnp.zeros(2, jnp.float32)}]
    x = jnp.array([[[1.0, 2.0]]], jnp.float32)  # [layer, n, d]
    loss, (mse, pen, l0) = T._clt_loss(params, x, jnp.zeros_like(x), c)
    want_pen = np.tanh(2.0 * 5.0 * 1.0) + np.tanh(2.0 * 0.5 * 2.0)
    out = np.array([1.0 * 3 + 2.0 * 0.3, 1.0 * 4 + 2.0 * 0.4])
    assert float(pen) == pytest.approx(want_pen, rel=1e-6)
    assert float(mse) == pytest.approx(float(out @ out), rel=1e-6)
    assert float(loss) == pytest.approx(float(out @ out) + 0.1 * want_pen, rel=1e-6)
    assert float(l0[0]) == 2.0

    cfg = T.CLTConfig(n_features=96, n_steps=300, batch_size=256, sparsity=1e-2, chunk_size=300)
    tc, hist = T.train_clt(xs, ys, cfg, seed=0)
    assert tc.cross_layer and [p["W_dec"].shape for p in tc.params] == [(96, 2, 32), (96, 1, 32)]
    assert hist["loss"][-20:].mean() < 0.2 * hist["loss"][:20].mean()
    tc.check(model.cfg)
    report = T.evaluate(model, tc, toks[32:])
    assert all(row["normalized_mse"] < 0.5 for row in report["layers"]), report


def test_bad_input(setup):
    model, toks, xs, ys = setup
    with pytest.raises(ValueError, match="architecture"):
        T.CLTConfig(n_features=4, architecture="topk")
    with pytest.raises(ValueError, match="n_features"):
        T.CLTConfig(n_features=0)
    with pytest.raises(ValueError, match=r"\[layer, n, d_model\]"):
        T.train_clt(xs, ys[:, :10], T.CLTConfig(n_features=4))
    with pytest.raises(ValueError, match=r"\[layer, n, d_model\]"):
        T.train_transcoders(xs[0], ys[0], 4)
    attn_only = tinyinterp.HookedTransformer.from_config(
        tinyinterp.TransformerConfig(n_layers=1, d_model=16, d_head=4, d_vocab=8, n_ctx=8,
                                     attn_only=True))
    with pytest.raises(ValueError, match="no MLPs"):
        T.collect_mlp_io(attn_only, np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="W_dec must be"):
        T.Transcoders([{"W_enc": jnp.zeros((32, 4)), "b_enc": jnp.zeros(4),
                        "W_dec": jnp.zeros((4, 32)), "b_dec": jnp.zeros(32)}])
    with pytest.raises(ValueError, match="lacks"):
        T.Transcoders([{"W_enc": jnp.zeros((32, 4))}])
    with pytest.raises(ValueError, match="k >= 1"):
        T.Transcoders([], architecture="topk")

