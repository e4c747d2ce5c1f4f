"""Sparse autoencoders / transcoders: unit-norm decoder, resampling, metrics, MMCS on known features,
streaming activations from a model."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp import sae

FULL = os.environ.get("TINYINTERP_FULL") == "1"
GT_STEPS = 10_000 if FULL else 8000


@settings(max_examples=10)
@given(n=st.integers(1, 12), d=st.integers(2, 12), seed=st.integers(0, 2**31 - 1))
def test_remove_parallel_grad_leaves_only_the_orthogonal_part(n, d, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, d)).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    g = rng.standard_normal((n, d)).astype(np.float32)
    out = np.asarray(sae.remove_parallel_grad(jnp.asarray(W), jnp.asarray(g)))
    np.testing.assert_allclose((out * W).sum(axis=1), 0.0, atol=1e-5)
    # what is left is the full orthogonal part of g
    np.testing.assert_allclose(out, g - (g * W).sum(axis=1, keepdims=True) * W, atol=1e-5)


def _gt_small(seed=0):
    return sae.GroundTruth.make(d=32, n_features=48, avg_active=3.0, decay=0.97, seed=seed)


def test_decoder_rows_stay_unit_norm_and_training_is_deterministic():
    gt = _gt_small()
    cfg = sae.SAEConfig(d_in=32, d_sae=64, l1_coefficient=0.05, lr=1e-2, batch_size=128,
                        n_steps=120, resample_every=40, chunk_size=40)
    batch_fn = gt.batch_fn(128)
    a = sae.train_sae(cfg, jax.random.key(0), batch_fn)
    norms = np.linalg.norm(np.asarray(a.params["W_dec"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert np.all(np.isfinite(a.history["loss"])) and a.history["loss"].shape == (120,)
    b = sae.train_sae(cfg, jax.random.key(0), batch_fn)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    np.testing.assert_array_equal(a.history["loss"], b.history["loss"])
    # the training actually lowered the loss
    assert a.history["loss"][-10:].mean() < 0.5 * a.history["loss"][:10].mean()


def test_pre_encoder_bias_is_minus_decoder_bias():
    cfg = sae.SAEConfig(d_in=8, d_sae=16)
    p = sae.init_params(cfg, jax.random.key(0), b_dec=jnp.arange(8, dtype=jnp.float32))
    x = jax.random.normal(jax.random.key(1), (5, 8), jnp.float32)
    expected = jax.nn.relu((x - p["b_dec"][None, :]) @ p["W_enc"] + p["b_enc"][None, :])
    np.testing.assert_allclose(sae.encode(p, x), expected, rtol=1e-6, atol=1e-6)
    # shifting the data and b_dec together leaves the codes unchanged
    shifted = {**p, "b_dec": p["b_dec"] + 3.0}
    np.testing.assert_allclose(sae.encode(shifted, x + 3.0), sae.encode(p, x), atol=1e-5)


def test_resampling_lowers_the_dead_fraction():
    gt = _gt_small(seed=1)
    base = dict(d_in=32, d_sae=64, l1_coefficient=0.05, lr=3e-3, batch_size=128, n_steps=300,
                chunk_size=100)
    # start with half of the latents dead (large negative encoder bias)
    init = sae.init_params(sae.SAEConfig(**base), jax.random.key(0))
    init["b_enc"] = jnp.where(jnp.arange(64) < 32, jnp.float32(-100.0), jnp.float32(0.0))
    x_eval = gt.sample(4096)
    runs = {}
    batch_fn = gt.batch_fn(128)
    for resample_every in (0, 100):
        cfg = sae.SAEConfig(**base, resample_every=resample_every)
        res = sae.train_sae(cfg, jax.random.key(0), batch_fn, params=init)
        runs[resample_every] = sae.metrics(res.params, x_eval)
        if resample_every:
            assert res.resampled[0][1] >= 32  # all the planted dead latents were resampled
    assert runs[0]["dead_fraction"] >= 0.5
    assert runs[100]["dead_fraction"] < 0.1
    assert runs[100]["mse"] < runs[0]["mse"]


def test_cluster_resampling_finds_the_recurring_residual_direction():
    """Planted residuals: a missed direction e recurring (with noise) in 6 inputs, plus 3 inputs
    with larger but unrelated errors. The first pick is the cluster's summed residual (closer to
    e than any single member), the next picks are distinct inputs outside it."""
    rng = np.random.default_rng(0)
    d = 64
    e = np.zeros(d, np.float32)
    e[0] = 1.0
    noise = 0.35 * rng.standard_normal((6, d)).astype(np.float32) / np.sqrt(d)
    cluster = rng.uniform(0.5, 1.0, (6, 1)).astype(np.float32) * e[None, :] + noise
    loners = 1.2 * rng.standard_normal((3, d)).astype(np.float32) / np.sqrt(d)
    small = 0.01 * rng.standard_normal((20, d)).astype(np.float32)
    resid = jnp.asarray(np.concatenate([cluster, loners, small]))
    sq = jnp.sum(resid**2, axis=-1)
    cfg = sae.SAEConfig(d_in=d, d_sae=8, resample_candidates=16)
    order, dirs = sae._cluster_picks(resid, sq, cfg)
    order, dirs = np.asarray(order), np.asarray(dirs)
    assert order.shape == (16,) and len(set(order.tolist())) == 16
    assert order[0] < 6
    single = np.asarray(cluster) / np.linalg.norm(cluster, axis=1, keepdims=True)
    assert dirs[0] @ e > max(0.98, (single @ e).max())
    assert set(order[1:4].tolist()) == {6, 7, 8}  # then the unclustered high-loss inputs
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, atol=1e-5)


def test_metrics_and_mmcs_on_planted_solutions():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((10, 6)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    perm = rng.permutation(10)
    m, best = sae.mmcs(feats, feats[perm] * 2.0)  # permuted and rescaled: still a perfect match
    assert m == pytest.approx(1.0) and best.shape == (10,)
    m_rand, _ = sae.mmcs(feats, rng.standard_normal((10, 6)))
    assert m_rand < 0.95
    # an exact SAE: W_dec = identity-like, perfect reconstruction of non-negative data
    d = 6
    p = {"W_enc": jnp.eye(d, dtype=jnp.float32), "b_enc": jnp.zeros(d, jnp.float32),
         "W_dec": jnp.eye(d, dtype=jnp.float32), "b_dec": jnp.zeros(d, jnp.float32)}
    x = np.abs(rng.standard_normal((50, d))).astype(np.float32)
    x[:, -1] = 0.0  # the last latent never fires
    out = sae.metrics(p, x, batch_size=16)
    assert out["mse"] == pytest.approx(0.0, abs=1e-10)
    assert out["fraction_variance_explained"] == pytest.approx(1.0)
    assert out["dead_fraction"] == pytest.approx(1 / d)
    assert out["l0"] == pytest.approx(float((x > 0).sum(axis=1).mean()))


def test_transcoder_predicts_an_mlp_output_from_its_input():
    rng = np.random.default_rng(0)
    d_in, d_mlp, d_out, n = 12, 6, 10, 8192
    A = rng.standard_normal((d_in, d_mlp)).astype(np.float32)
    B = rng.standard_normal((d_mlp, d_out)).astype(np.float32)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    y = np.maximum(x @ A - 1.0, 0.0) @ B  # a sparse-ish ReLU MLP: [n, d_out]
    cfg = sae.SAEConfig(d_in=d_in, d_sae=24, d_out=d_out, l1_coefficient=1e-3, lr=3e-3,
                        batch_size=256, n_steps=800, resample_every=400, chunk_size=400)
    res = sae.train_sae(cfg, jax.random.key(0), sae.array_batch_fn(x, 256, seed=1, y=y))
    out = sae.metrics(res.params, x, y)
    assert out["fraction_variance_explained"] > 0.9, out
    np.testing.assert_allclose(np.linalg.norm(res.params["W_dec"], axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="transcoder"):
        sae.train_sae(cfg, jax.random.key(0), sae.array_batch_fn(x, 256))


class _FakeModel:
    """run_with_cache like HookedTransformer's: a deterministic function of the tokens."""

    class cfg:  # noqa: N801
        n_ctx, d_vocab = 5, 11

    def __init__(self):
        self.calls = []

    def run_with_cache(self, tokens, names_filter=None):
        self.calls.append((tuple(tokens.shape), tuple(names_filter)))
        t = tokens.astype(jnp.float32)
        act = jnp.stack([t, 2.0 * t, -t], axis=-1)  # [batch, pos, 3]
        return t, {names_filter[0]: act}


def test_collect_activations_streams_batches_from_a_callable_and_an_iterable():
    model = _FakeModel()
    source = lambda k: jax.random.randint(k, (4, 5), 0, 11, dtype=jnp.int32)  # noqa: E731
    acts = sae.collect_activations(model, source, "blocks.0.hook_resid_post", n_tokens=37,
                                   batch_size=4, key=jax.random.key(2))
    assert acts.shape == (37, 3) and acts.dtype == np.float32
    assert len(model.calls) == 2  # 20 tokens per batch: two batches, never all at once
    assert all(c == ((4, 5), ("blocks.0.hook_resid_post",)) for c in model.calls)
    toks = np.concatenate([np.asarray(source(jax.random.fold_in(jax.random.key(2), i))).reshape(-1)
                           for i in range(2)])[:37]
    np.testing.assert_array_equal(acts[:, 1], 2.0 * toks)
    # an iterable of token arrays is re-batched to batch_size rows
    model2 = _FakeModel()
    big = np.arange(60, dtype=np.int32).reshape(12, 5) % 11
    acts2 = sae.collect_activations(model2, [big], "hook", n_tokens=60, batch_size=5)
    assert [c[0] for c in model2.calls] == [(5, 5), (5, 5), (2, 5)]
    np.testing.assert_array_equal(acts2[:, 0], big.reshape(-1))
    with pytest.raises(ValueError, match="ran out"):
        sae.collect_activations(_FakeModel(), [big], "hook", n_tokens=61, batch_size=5)
    with pytest.raises(ValueError, match="int"):
        sae.collect_activations(_FakeModel(), [big.astype(np.float32)], "hook", 5, 5)


def test_collect_activations_from_a_real_model_matches_one_big_run():
    model_mod = pytest.importorskip("tinyinterp.model")
    from tinyinterp.config import TransformerConfig

    cfg = TransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=4, d_vocab=13,
                            attention_backend="xla")
    model = model_mod.HookedTransformer.from_config(cfg, seed=0)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (6, 8), 0, 13, dtype=jnp.int32))
    hook = "blocks.0.mlp.hook_post"
    acts = sae.collect_activations(model, [tokens], hook, n_tokens=48, batch_size=2)
    _, cache = model.run_with_cache(jnp.asarray(tokens), names_filter=[hook])
    ref = np.asarray(cache[hook]).reshape(48, -1)
    np.testing.assert_allclose(acts, ref, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ground_truth_sae():
    """Sharkey et al.'s setting: dim 256, 512 true features, ~5 active, p_i ~ 0.99**i, an SAE with
    a dictionary of 512 at lambda 0.1 (L0 ~5.6 against the data's 5.0). Reduced: 8000 steps of
    batch 256 (2M samples; the rarest feature occurs ~600 times)."""
    gt = sae.GroundTruth.make(d=256, n_features=512, avg_active=5.0, decay=0.99, seed=0)
    batch = 256
    cfg = sae.SAEConfig(d_in=256, d_sae=512, l1_coefficient=0.1, lr=3e-3, batch_size=batch,
                        n_steps=GT_STEPS, resample_every=250, chunk_size=250)
    res = sae.train_sae(cfg, jax.random.key(0), gt.batch_fn(batch))
    score, best = sae.mmcs(gt.features, res.params["W_dec"])
    return gt, res, score, best


@pytest.mark.slow
def test_sae_recovers_ground_truth_features_mmcs_099(ground_truth_sae):
    """The issue's target: MMCS >= 0.99 at a good lambda with dictionary 512."""
    _, _, score, _ = ground_truth_sae
    assert score >= 0.99, score


@pytest.mark.slow
def test_sae_ground_truth_run_is_clean(ground_truth_sae):
    """Beyond the mean: the 256 most frequent true features are matched to cos > 0.99, at most 1%
    of all (the rarest have p ~ 3e-4) lack a latent with cos > 0.9, at most 1% of the latents are
    dead, the code is about as sparse as the data (~5 active), the decoder rows are unit norm."""
    gt, res, score, best = ground_truth_sae
    assert best[:256].min() > 0.99, np.sort(best[:256])[:5]
    assert np.sum(best < 0.9) <= 5, np.sort(best)[:8]
    np.testing.assert_allclose(np.linalg.norm(res.params["W_dec"], axis=1), 1.0, atol=1e-5)
    m = sae.metrics(res.params, gt.sample(32768))  # enough for a p ~ 3e-4 latent to fire
    assert 4.0 < m["l0"] < 7.0 and m["fraction_variance_explained"] > 0.95, m
    assert m["dead_fraction"] <= 0.01, m


@pytest.mark.slow
def test_reproduce_quick_writes_a_valid_report(tmp_path):
    import json

    from tinyinterp.reproduce import sae as rep

    report = rep.run(tmp_path, seed=0, quick=True, verbose=False)
    on_disk = json.loads((tmp_path / "report.json").read_text())  # valid JSON (no NaN)
    assert on_disk["summary"] == report["summary"] and report["summary"]
    for name in report["figures"]:
        assert (tmp_path / name).stat().st_size > 5000
    runs = report["ground_truth"]["runs"]
    assert len(runs) == 4 and all(0.0 <= r["mmcs"] <= 1.0 for r in runs)
    # the sweep's shape (quick data: 128 true features): MMCS is highest with a dictionary as
    # large as the true feature count at the good lambda, and falls with a dictionary half that
    # size or a lambda 10x too small (measured 0.77 vs 0.66 and 0.53)
    by = {(r["l1_coefficient"], r["dict_size"]): r["mmcs"] for r in runs}
    assert by[(0.3, 128)] > by[(0.3, 64)] + 0.05 and by[(0.3, 128)] > by[(0.03, 128)] + 0.1, by
    assert 0.0 <= report["toy_model"]["mmcs_over_represented"] <= 1.0
    # TopK and JumpReLU beside it, each sweep one batched program (quick run measured: TopK
    # MMCS 0.76-0.81 at L0 = k, JumpReLU 0.61-0.70 with L0 falling as lambda_0 grows)
    variants = report["ground_truth"]["variants"]
    assert [v["architecture"] for v in variants] == ["topk"] * 3 + ["jumprelu"] * 3
    for v in variants:
        assert 0.5 < v["mmcs"] <= 1.0, v
        if v["architecture"] == "topk":
            assert v["l0"] <= v["knob_value"] + 1e-6
    l0s = [v["l0"] for v in variants if v["architecture"] == "jumprelu"]
    assert l0s == sorted(l0s, reverse=True), l0s
    assert "TopK" in "\n".join(report["summary"]) and "JumpReLU" in "\n".join(report["summary"])


# -------------------------------------------------------------------------------- variants, sweeps
@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_topk_keeps_exactly_the_k_largest_pre_activations(k, seed):
    cfg = sae.SAEConfig(d_in=8, d_sae=16, architecture="topk", k=k)
    p = sae.init_params(cfg, jax.random.key(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (32, 8), jnp.float32)
    pre = np.asarray(sae.pre_activations(p, x))
    f = np.asarray(sae.encode(p, x, cfg=cfg))
    top = np.argsort(-pre, axis=1)[:, :k]  # numpy's own ranking
    expected = np.zeros_like(pre)
    np.put_along_axis(expected, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0), axis=1)
    np.testing.assert_allclose(f, expected, rtol=1e-6, atol=1e-6)
    assert ((f > 0).sum(axis=1) <= k).all()
    # every pre-activation positive: exactly k active latents on every input
    shifted = {**p, "b_enc": p["b_enc"] + 100.0}
    assert ((np.asarray(sae.encode(shifted, x, cfg=cfg)) > 0).sum(axis=1) == k).all()


def test_jumprelu_threshold_gets_the_pseudo_derivative():
    """Rajamanoharan et al. (2024): d/dtheta H(z - theta) = -(1/eps) K((z - theta)/eps) and
    d/dtheta JumpReLU = -(theta/eps) K(...), K the rectangle on (-1/2, 1/2); z's gradient is the
    plain one where active and nothing through the jump."""
    bw = 0.1
    theta = jnp.asarray([0.5, 1.0], jnp.float32)
    z = jnp.asarray([[0.47, 0.2], [0.58, 1.04], [0.52, 0.96], [0.9, 2.0]], jnp.float32)
    near = (np.abs(np.asarray(z) - np.asarray(theta)[None]) < bw / 2)  # in the kernel's window
    g_step = jax.grad(lambda t: jnp.sum(sae.heaviside_step(z, t, bw)))(theta)
    np.testing.assert_allclose(g_step, -near.sum(0) / bw, rtol=1e-6)
    g_theta, g_z = jax.grad(lambda t, zz: jnp.sum(sae.jumprelu(zz, t, bw)), argnums=(0, 1))(theta, z)
    np.testing.assert_allclose(g_theta, -np.asarray(theta) * near.sum(0) / bw, rtol=1e-6)
    np.testing.assert_array_equal(g_z, (np.asarray(z) > np.asarray(theta)[None]).astype(np.float32))
    assert np.all(np.asarray(g_step) < 0)  # the L0 penalty raises every threshold it can see
    # and through the training loss, log_threshold gets a gradient
    cfg = sae.SAEConfig(d_in=8, d_sae=16, architecture="jumprelu", jumprelu_bandwidth=0.5,
                        jumprelu_init_threshold=0.2)
    p = sae.init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, 8), jnp.float32)
    knob = {"coefficient": jnp.float32(0.1), "k": jnp.int32(1)}
    grads = jax.grad(lambda q: sae.sweep_loss_fn(q, x, x, knob, cfg, 1)[0])(p)
    assert np.count_nonzero(np.asarray(grads["log_threshold"])) > 8


@pytest.mark.parametrize("arch,knob", [("topk", {"k": 3}), ("jumprelu", {"l0_coefficient": 0.03})])
def test_variants_recover_planted_features(arch, knob):
    """48 planted features in 32 dims (~3 active): TopK (k=3) and JumpReLU (lambda_0 0.03) find
    them at about the data's L0 (measured MMCS: TopK 0.968 with key 1; JumpReLU 0.921 with key 0,
    0.958 with key 1; the ReLU SAE at lambda 0.1: 0.985; a random dictionary of 48: ~0.5)."""
    gt = _gt_small()
    cfg = sae.SAEConfig(d_in=32, d_sae=48, lr=3e-3, batch_size=128, n_steps=1500,
                        resample_every=250, chunk_size=250, architecture=arch, **knob)
    res = sae.train_sae(cfg, jax.random.key(0), gt.batch_fn(128))
    score, _ = sae.mmcs(gt.features, res.params["W_dec"])
    m = sae.metrics(res.params, gt.sample(8192), cfg=cfg)
    assert score > 0.9, (score, m)
    assert 1.5 < m["l0"] < 4.5 and m["fraction_variance_explained"] > 0.85, m
    np.testing.assert_allclose(np.linalg.norm(res.params["W_dec"], axis=1), 1.0, atol=1e-5)


def test_sweep_is_the_runs_one_at_a_time():
    """train_sae_sweep trains the runs as one batched program: each run equals train_sae with its
    own config and key (to float32 rounding), resampling included."""
    gt = _gt_small()
    base = dict(d_in=32, d_sae=64, lr=1e-2, batch_size=128, n_steps=120, resample_every=40,
                chunk_size=40)
    cfgs = [sae.SAEConfig(**base, l1_coefficient=lam) for lam in (0.01, 0.3)]
    keys = [jax.random.key(3), jax.random.key(4)]
    batch_fn = gt.batch_fn(128)
    swept = sae.train_sae_sweep(cfgs, keys, batch_fn)
    for c, k, r in zip(cfgs, keys, swept, strict=True):
        one = sae.train_sae(c, k, batch_fn)
        np.testing.assert_allclose(r.history["loss"], one.history["loss"], rtol=2e-3, atol=1e-5)
        assert r.resampled == one.resampled and r.cfg == c
        for name in one.params:
            np.testing.assert_allclose(r.params[name], one.params[name], rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="differ only"):
        sae.train_sae_sweep([cfgs[0], cfgs[1].replace(lr=1e-3)], keys, batch_fn)


def test_lr_schedule_warms_up_then_decays_to_zero():
    """Linear warm-up over the first lr_warmup_fraction, flat, linear decay to 0 over the last
    lr_decay_fraction; without warm-up exactly the decay-only schedule (today's)."""
    from tinyinterp.sae import _lr_schedule

    cfg = sae.SAEConfig(d_in=8, d_sae=16, lr=1e-2, n_steps=100, lr_warmup_fraction=0.1)
    lr = np.array([float(_lr_schedule(cfg)(jnp.int32(t))) for t in range(101)])
    np.testing.assert_allclose(lr[:10], 1e-2 * np.arange(1, 11) / 10, rtol=1e-6)
    np.testing.assert_allclose(lr[10:81], 1e-2, rtol=1e-6)
    np.testing.assert_allclose(lr[80:], 1e-2 * (100 - np.arange(80, 101)) / 20, rtol=1e-6,
                               atol=1e-9)
    plain = _lr_schedule(cfg.replace(lr_warmup_fraction=0.0))
    f32 = float(np.float32(1e-2))
    assert [float(plain(jnp.int32(t))) for t in (0, 50, 90)] == [f32, f32, f32 / 2]
    assert _lr_schedule(cfg.replace(lr_warmup_fraction=0.0, lr_decay_fraction=0.0)) == 1e-2


@pytest.mark.parametrize("field,value,match", [
    ("l1_coefficient", float("nan"), "l1_coefficient"),
    ("l1_coefficient", -0.1, "l1_coefficient"),
    ("l0_coefficient", float("inf"), "l0_coefficient"),
    ("dead_frequency", 5.0, "dead_frequency"),
    ("dead_frequency", -1e-4, "dead_frequency"),
    ("dead_frequency", float("nan"), "dead_frequency"),
    ("lr", float("nan"), "lr"),
    ("resample_until", 1.5, "resample_until"),
    ("lr_warmup_fraction", -0.1, "lr_warmup_fraction"),
    ("architecture", "gated", "architecture"),
    ("jumprelu_bandwidth", 0.0, "jumprelu_bandwidth"),
])
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        sae.SAEConfig(d_in=8, d_sae=16, **{field: value})
    with pytest.raises(ValueError, match="k"):
        sae.SAEConfig(d_in=8, d_sae=16, architecture="topk")  # k is required


@pytest.mark.parametrize("kw,match", [({"avg_active": float("nan")}, "avg_active"),
                                      ({"avg_active": 0.0}, "avg_active"),
                                      ({"avg_active": 1000.0}, "avg_active"),
                                      ({"decay": -0.5}, "decay"),
                                      ({"decay": float("nan")}, "decay")])
def test_ground_truth_rejects_bad_probabilities(kw, match):
    with pytest.raises(ValueError, match=match):
        sae.GroundTruth.make(d=8, n_features=16, **kw)
    with pytest.raises(ValueError, match="probabilities"):
        sae.GroundTruth(np.eye(4, dtype=np.float32), np.array([0.1, np.nan, 0.2, 0.3]), 0)
