"""Toy models of superposition: metrics on exact geometry, training determinism and the dense regime."""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp import superposition as sp

FULL = os.environ.get("TINYINTERP_FULL") == "1"


def _polygon(k: int) -> np.ndarray:
    """k unit vectors evenly spaced on a circle: [feature=k, hidden=2]."""
    angles = 2 * np.pi * np.arange(k) / k
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _tetrahedron() -> np.ndarray:
    """4 unit vectors at the vertices of a regular tetrahedron: [feature=4, hidden=3]."""
    v = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
    return v / np.sqrt(3.0)


POLYTOPES = {
    "digon": (_polygon(2), 1 / 2),
    "triangle": (_polygon(3), 2 / 3),
    "tetrahedron": (_tetrahedron(), 3 / 4),
    "pentagon": (_polygon(5), 2 / 5),
}


def _random_rotation(rng, n):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


@pytest.mark.parametrize("name", list(POLYTOPES))
def test_feature_dimensionality_of_exact_polytopes(name):
    W, expected = POLYTOPES[name]
    D = np.asarray(sp.feature_dimensionality(jnp.asarray(W, jnp.float32)))
    np.testing.assert_allclose(D, expected, rtol=1e-5)
    # dimensions per feature of the polytope alone: m / ||W||_F^2 = m / k
    dpf = float(sp.dimensions_per_feature(jnp.asarray(W, jnp.float32)))
    assert dpf == pytest.approx(W.shape[1] / W.shape[0], rel=1e-5)


@settings(max_examples=12)
@given(
    names=st.lists(st.sampled_from(list(POLYTOPES)), min_size=1, max_size=3),
    n_dedicated=st.integers(0, 2),
    n_dropped=st.integers(0, 2),
    # away from the 'represented' threshold 0.5 by more than float32 rounding of the rotated rows'
    # norms (0.50000001201 is 0.5 in float32: on the threshold, not above it); the threshold
    # itself is tested exactly in test_represented_count_threshold_is_strict
    scale=st.floats(0.3, 3.0).filter(lambda s: abs(s - 0.5) > 1e-5),
    seed=st.integers(0, 2**31 - 1),
)
def test_feature_dimensionality_of_tegum_products(names, n_dedicated, n_dropped, scale, seed):
    """Polytopes in mutually orthogonal subspaces (a tegum product), rotated and scaled, plus
    features with a dedicated dimension and dropped (zero) features: each keeps its fraction."""
    blocks = [POLYTOPES[n][0] for n in names] + [np.ones((1, 1))] * n_dedicated
    expected = [POLYTOPES[n][1] for n in names for _ in range(POLYTOPES[n][0].shape[0])]
    expected += [1.0] * n_dedicated + [0.0] * n_dropped
    m = sum(b.shape[1] for b in blocks)
    rows, col = [], 0
    for b in blocks:
        block = np.zeros((b.shape[0], m))
        block[:, col : col + b.shape[1]] = b
        rows.append(block)
        col += b.shape[1]
    rows.append(np.zeros((n_dropped, m)))
    W = np.concatenate(rows, axis=0) * scale  # [feature, hidden]
    rng = np.random.default_rng(seed)
    W = W @ _random_rotation(rng, m)  # D_i is rotation and scale invariant
    perm = rng.permutation(W.shape[0])
    D = np.asarray(sp.feature_dimensionality(jnp.asarray(W[perm], jnp.float32)))
    np.testing.assert_allclose(D, np.asarray(expected)[perm], rtol=1e-4, atol=1e-5)
    n_represented = int(sp.represented_count(jnp.asarray(W, jnp.float32)))
    assert n_represented == (W.shape[0] - n_dropped if scale > 0.5 else 0)


def test_represented_count_threshold_is_strict():
    # the paper's 'represented' is ||W_i|| > 0.5: a norm of exactly 0.5 (in float32) is not
    # (norms exact in float32: one non-zero entry per row)
    W = np.array([[0.5, 0.0], [0.0, -0.5], [0.0, 0.5001], [0.50000001201, 0.0]])
    assert np.float32(0.50000001201) == np.float32(0.5)
    assert int(sp.represented_count(jnp.asarray(W, jnp.float32))) == 1
    assert int(sp.represented_count(jnp.asarray(W, jnp.float32), threshold=0.4)) == 4


def test_interference_and_norms_on_known_geometry():
    W = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.8], [0.0, 0.0]], np.float32)  # [feature, hidden]
    np.testing.assert_allclose(sp.feature_norms(W), [1.0, 1.0, 0.8, 0.0], rtol=1e-6)
    # antipodal pair interferes fully (1.0); the orthogonal feature and the zero one not at all
    np.testing.assert_allclose(sp.interference(W), [1.0, 1.0, 0.0, 0.0], atol=1e-6)
    assert int(sp.represented_count(W)) == 3
    # metrics broadcast over leading (instance) axes
    stacked = np.stack([W, 2 * W])  # [instance, feature, hidden]
    assert sp.feature_dimensionality(stacked).shape == (2, 4)
    np.testing.assert_array_equal(sp.represented_count(stacked), [3, 3])


def test_data_distribution_matches_feature_probability():
    p = jnp.asarray([1.0, 0.5, 0.1, 0.01], jnp.float32)
    x = np.concatenate(
        [np.asarray(sp.generate_batch(jnp.uint32(7), jnp.int32(t), p, 4096)) for t in range(10)]
    )  # [batch, feature]
    frac = (x > 0).mean(axis=0)
    np.testing.assert_allclose(frac, p, atol=4 * np.sqrt(0.25 / x.shape[0]) + 1e-3)
    assert x.min() >= 0.0 and x.max() < 1.0
    # present values are uniform on [0, 1): mean 1/2, variance 1/12
    present = x[:, 0]
    assert abs(present.mean() - 0.5) < 0.01 and abs(present.var() - 1 / 12) < 0.005
    # different steps and different seeds give different data
    a = sp.generate_batch(jnp.uint32(7), jnp.int32(0), p, 64)
    assert not np.array_equal(a, sp.generate_batch(jnp.uint32(7), jnp.int32(1), p, 64))
    assert not np.array_equal(a, sp.generate_batch(jnp.uint32(8), jnp.int32(0), p, 64))


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 30), m=st.integers(1, 8), batch=st.integers(1, 64),
       linear=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_feature_major_training_loss_equals_the_reference_loss(n, m, batch, linear, seed):
    """Training builds the batch transposed ([feature, batch], faster on CPU): the same numbers as
    generate_batch, and the same loss and gradients as instance_loss up to float32 rounding."""
    rng = np.random.default_rng(seed)
    prob = jnp.asarray(rng.uniform(0.05, 1.0, n), jnp.float32)
    x = sp.generate_batch(jnp.uint32(seed), jnp.int32(seed % 1000), prob, batch)  # [batch, feature]
    xT = sp._generate_batch_feature_major(jnp.uint32(seed), jnp.int32(seed % 1000), prob, batch)
    np.testing.assert_array_equal(xT, x.T)
    params = {"W": jnp.asarray(rng.normal(0, 0.5, (n, m)), jnp.float32),
              "b": jnp.asarray(rng.normal(0, 0.2, n), jnp.float32)}
    imp = jnp.asarray(rng.uniform(0.1, 1.0, n), jnp.float32)
    ref, g_ref = jax.jit(jax.value_and_grad(sp.instance_loss), static_argnums=3)(
        params, x, imp, linear)
    got, g_got = jax.jit(jax.value_and_grad(sp._instance_loss_feature_major), static_argnums=3)(
        params, xT, imp, linear)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    for k in params:
        np.testing.assert_allclose(g_got[k], g_ref[k], rtol=1e-4, atol=1e-5)


def _small_cfg(**kw):
    base = dict(n_features=5, n_hidden=2, n_instances=3, n_steps=300, batch_size=64, chunk_size=100)
    return sp.ToyModelConfig(**{**base, **kw})


def test_vmap_trained_instances_equal_individually_trained():
    cfg = _small_cfg()
    importance = sp.importance_schedule(5, 0.9)
    probs = np.array([1.0, 0.3, 0.05], np.float32)[:, None] * np.ones((1, 5), np.float32)
    key = jax.random.key(3)
    result = sp.train(cfg, key, importance, probs)
    keys = sp.instance_keys(key, cfg.n_instances)
    for i in range(cfg.n_instances):
        params, losses = sp.train_single(cfg, keys[i], importance, probs[i])
        # equal up to float32 rounding (a batched matmul may sum in another order): ~1 ulp
        np.testing.assert_allclose(result.params["W"][i], params["W"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.params["b"][i], params["b"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.losses[i], losses, rtol=1e-5, atol=1e-7)


def test_training_is_deterministic_and_chunking_invariant():
    cfg = _small_cfg(n_steps=200)
    imp, probs = sp.importance_schedule(5, 0.9), np.full((5,), 0.2, np.float32)
    a = sp.train(cfg, jax.random.key(0), imp, probs)
    b = sp.train(cfg, jax.random.key(0), imp, probs)
    np.testing.assert_array_equal(a.params["W"], b.params["W"])
    np.testing.assert_array_equal(a.losses, b.losses)
    # 200 steps in one call == 120 steps then 80 more (continue_training), chunked differently
    c = sp.train(sp.ToyModelConfig(**{**cfg.__dict__, "n_steps": 120, "chunk_size": 50}),
                 jax.random.key(0), imp, probs)
    c = sp.continue_training(c, 80)
    np.testing.assert_allclose(a.params["W"], c.params["W"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.losses, c.losses, rtol=1e-6, atol=1e-8)
    # another seed gives another model
    d = sp.train(cfg, jax.random.key(1), imp, probs)
    assert not np.array_equal(a.params["W"], d.params["W"])


def test_continue_training_a_subset_leaves_others_untouched():
    cfg = _small_cfg(n_steps=100)
    imp, probs = sp.importance_schedule(5, 0.9), np.full((5,), 0.2, np.float32)
    a = sp.train(cfg, jax.random.key(0), imp, probs)
    b = sp.continue_training(a, 50, instances=[2])
    np.testing.assert_array_equal(b.params["W"][:2], a.params["W"][:2])
    assert not np.array_equal(b.params["W"][2], a.params["W"][2])
    assert np.isnan(b.losses[0, 100:]).all() and np.isfinite(b.losses[2]).all()
    full = sp.train(sp.ToyModelConfig(**{**cfg.__dict__, "n_steps": 150}), jax.random.key(0), imp, probs)
    np.testing.assert_allclose(b.params["W"][2], full.params["W"][2], rtol=1e-6, atol=1e-7)


def test_cosine_schedule_decays_and_keeps_vmap_and_chunking_invariance():
    """With lr_schedule="cosine" the lr falls from lr to lr * lr_final over n_steps; training stays
    identical vmapped or alone and whatever the chunk size (the schedule follows the step count)."""
    cfg = _small_cfg(n_steps=200, chunk_size=200, lr=3e-3, lr_schedule="cosine")
    lr = sp._learning_rate(cfg)
    assert float(lr(0)) == pytest.approx(3e-3) and float(lr(200)) == pytest.approx(0.0, abs=1e-9)
    assert float(lr(100)) == pytest.approx(1.5e-3, rel=1e-5)
    half = sp._learning_rate(_small_cfg(n_steps=200, lr_schedule="cosine", lr_final=0.5))
    assert float(half(200)) == pytest.approx(0.5e-3, rel=1e-5)
    imp = sp.importance_schedule(5, 0.9)
    probs = np.array([1.0, 0.3, 0.05], np.float32)[:, None] * np.ones((1, 5), np.float32)
    key = jax.random.key(5)
    a = sp.train(cfg, key, imp, probs)
    b = sp.train(sp.ToyModelConfig(**{**cfg.__dict__, "chunk_size": 30}), key, imp, probs)
    np.testing.assert_allclose(a.params["W"], b.params["W"], rtol=1e-6, atol=1e-7)
    params, losses = sp.train_single(cfg, sp.instance_keys(key, 3)[2], imp, probs[2])
    np.testing.assert_allclose(a.params["W"][2], params["W"], rtol=1e-5, atol=1e-6)
    # the decayed lr really changes training (not silently constant)
    c = sp.train(sp.ToyModelConfig(**{**cfg.__dict__, "lr_schedule": "constant"}), key, imp, probs)
    assert not np.allclose(a.params["W"], c.params["W"])


@settings(max_examples=20)
@given(
    fraction=st.sampled_from(list(sp.STICKY_FRACTIONS)),
    n_planted=st.integers(8, 40),
    n_spread=st.integers(0, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_fraction_clusters_find_a_planted_line_and_no_line_in_a_smooth_spread(
    fraction, n_planted, n_spread, seed
):
    rng = np.random.default_rng(seed)
    v = sp.STICKY_FRACTIONS[fraction]
    tol = 0.0125
    spread = rng.uniform(0.0, 1.1, n_spread)  # density n_spread / 1.1 per unit: no peak anywhere
    planted = v + rng.uniform(-tol / 2, tol / 2, n_planted)
    out = sp.fraction_clusters(np.concatenate([spread, planted]), tol=tol)
    # counts are exact window counts
    assert out[fraction]["near"] == int(np.sum(np.abs(np.concatenate([spread, planted]) - v) < tol))
    assert out[fraction]["near"] >= n_planted
    if n_spread <= 40:  # < 1 spread value expected per window: the planted line stands out
        assert out[fraction]["cluster"], out[fraction]
    # a smooth spread alone has no cluster at any fraction (windows hold ~n_spread * 0.023 each)
    alone = sp.fraction_clusters(rng.uniform(0.0, 1.1, 4000), tol=tol)
    assert not any(c["cluster"] for c in alone.values()), alone


def test_fraction_clusters_of_exact_polytopes():
    """D_i of exact polytopes (a tegum product, as in the tests above) land in their windows."""
    D = np.concatenate([np.full(2 * k, POLYTOPES[name][1]) for k, name in
                        enumerate(["digon", "triangle", "tetrahedron", "pentagon"], start=3)])
    out = sp.fraction_clusters(D)
    assert [k for k, c in out.items() if c["cluster"]] == ["3/4", "2/3", "1/2", "2/5"]
    assert out["1/2"]["near"] == 6 and out["2/5"]["near"] == 12 and out["3/8"]["near"] == 0
    # 2/5 and 3/8 are two windows apart: each is compared with its outer neighbour only, so two
    # adjacent lines are both found, and a line at one does not hide the other
    both = sp.fraction_clusters(np.array([0.4] * 10 + [0.375] * 10))
    assert both["2/5"]["compared_with"] == ["above"] and both["3/8"]["compared_with"] == ["below"]
    assert both["2/5"]["cluster"] and both["3/8"]["cluster"] and both["2/5"]["below"] == 10
    assert both["1/2"]["compared_with"] == ["below", "above"] and not both["1/2"]["cluster"]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="n_hidden"):
        sp.ToyModelConfig(n_hidden=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        sp.ToyModelConfig(lr_schedule="linear")
    cfg = _small_cfg()
    with pytest.raises(ValueError, match="importance must have shape"):
        sp.train(cfg, jax.random.key(0), np.ones(4, np.float32), np.ones(5, np.float32))
    with pytest.raises(ValueError, match="importance must be finite"):  # refused before training
        sp.train(cfg, jax.random.key(0), np.full(5, np.nan, np.float32), np.ones(5, np.float32))


@pytest.mark.slow
def test_dense_regime_keeps_top_features_orthogonal_and_drops_the_rest():
    """n=5, m=2, importance 0.9**i, dense data: the two most important features get orthogonal
    unit directions, the other three are dropped and their bias sits near E[x_i] = 1/2."""
    # The reference setup (10k steps, batch 1024); the dropped features take ~8k steps to die.
    cfg = sp.ToyModelConfig(n_features=5, n_hidden=2, n_instances=2, n_steps=10_000, batch_size=1024)
    res = sp.train(cfg, jax.random.key(0), sp.importance_schedule(5, 0.9), np.ones(5, np.float32))
    for i in range(cfg.n_instances):
        W, b = np.asarray(res.params["W"][i]), np.asarray(res.params["b"][i])
        norms = np.linalg.norm(W, axis=1)
        np.testing.assert_allclose(norms[:2], 1.0, atol=0.05)
        assert np.all(norms[2:] < 0.2), norms
        cos = W[0] @ W[1] / (norms[0] * norms[1])
        assert abs(cos) < 0.05, cos
        np.testing.assert_allclose(b[2:], 0.5, atol=0.1)
        assert int(sp.represented_count(W)) == 2
        assert float(sp.dimensions_per_feature(W)) == pytest.approx(1.0, abs=0.05)


@pytest.mark.slow
def test_sparse_regime_puts_more_features_in_superposition():
    """n=20, m=5, importance 0.7**i: more features are represented when sparse than when dense."""
    cfg = sp.ToyModelConfig(n_features=20, n_hidden=5, n_instances=2,
                            n_steps=10_000, batch_size=1024 if FULL else 256)
    probs = np.array([1.0, 0.03], np.float32)[:, None] * np.ones((1, 20), np.float32)
    res = sp.train(cfg, jax.random.key(0), sp.importance_schedule(20, 0.7), probs)
    counts = np.asarray(sp.represented_count(res.params["W"]))
    assert counts[0] == 5, counts
    assert counts[1] >= 8, counts
    assert math.isclose(float(sp.dimensions_per_feature(res.params["W"][0])), 1.0, abs_tol=0.05)


@pytest.mark.slow
def test_reproduce_quick_writes_a_valid_report(tmp_path):
    import json

    from tinyinterp.reproduce import superposition as rep

    report = rep.run(tmp_path, seed=0, quick=True, verbose=False, workers=2)
    on_disk = json.loads((tmp_path / "report.json").read_text())  # valid JSON (no NaN)
    assert on_disk["summary"] == report["summary"] and report["summary"]
    for name in report["figures"]:
        assert (tmp_path / name).stat().st_size > 5000
        assert f"]({name})" in (tmp_path / "report.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    levels = report["pentagon"]["levels"]
    assert levels[1]["best_geometry"] == "antipodal pairs"  # 1-S = 0.2
    assert levels[2]["best_geometry"] == "pentagon"  # 1-S = 0.1
    counts = [lv["represented"] for lv in report["counts"]["levels"]]
    assert counts[0] == 5 and counts[-1] > counts[0]
    assert set(report["phase"]["regime_counts"]) >= {"not represented", "antipodal superposition"}
    ge = report["geometry"]
    # D* is ~1 when dense and falls with sparsity; the fraction counts are window counts of the
    # represented D_i and the report names exactly the fractions flagged as clusters
    dpf = [lv["dimensions_per_feature"] for lv in ge["levels"]]
    assert abs(dpf[0] - 1.0) < 0.05 and dpf[-1] < dpf[0]
    assert sum(c["near"] for c in ge["fractions"].values()) <= ge["represented_D_total"]
    assert ge["fractions_found"] == [k for k, c in ge["fractions"].items() if c["cluster"]]
    for k, c in ge["fractions"].items():
        assert c["near"] == sum(lv["D_near"][k] for lv in ge["levels"])
    assert "feature_dimensionality.png" in report["figures"]
    # the sweep trained in the second thread equals the same experiment run here
    key = jax.random.fold_in(jax.random.key(0), 3)
    direct, _ = rep.exp_geometry(key, rep.settings(True)["geometry"])
    assert [lv["D_near"] for lv in direct["levels"]] == [lv["D_near"] for lv in ge["levels"]]
    np.testing.assert_allclose([lv["dimensions_per_feature"] for lv in direct["levels"]], dpf,
                               rtol=1e-6)


def test_notebook_init_std_matches_torch_fans():
    # torch's _calculate_fan_in_and_fan_out on [instance, feature, hidden]: fan_in = feature *
    # hidden, fan_out = instance * hidden; xavier std = sqrt(2 / (fan_in + fan_out))
    assert sp.notebook_init_std(200, 20, 20) == pytest.approx(math.sqrt(2 / (200 * 20 + 20 * 20)))
    assert sp.notebook_init_std(200, 20, 20) == pytest.approx(0.0213, abs=1e-4)
    assert sp.xavier_init_std(200, 20) == pytest.approx(math.sqrt(2 / 220))


def test_init_std_option():
    key = jax.random.key(0)
    default = sp.ToyModelConfig(n_features=200, n_hidden=20, n_instances=20)
    W = np.asarray(sp.init_params(default, key)["W"])
    assert W.std() == pytest.approx(sp.notebook_init_std(200, 20, 20), rel=0.02)
    explicit = dataclasses.replace(default, init_std=0.5)
    assert np.asarray(sp.init_params(explicit, key)["W"]).std() == pytest.approx(0.5, rel=0.02)
    # an explicit std makes an instance's init independent of the instance count
    fixed = dict(n_features=5, n_hidden=2, init_std=0.3)
    a = sp.init_params(sp.ToyModelConfig(n_instances=2, **fixed), key)["W"]
    b = sp.init_params(sp.ToyModelConfig(n_instances=7, **fixed), key)["W"]
    np.testing.assert_array_equal(a, b[:2])
    with pytest.raises(ValueError, match="init_std"):
        sp.ToyModelConfig(init_std=-1.0)


@pytest.mark.parametrize("importance,probability,match", [
    (1.0, float("nan"), "finite"),
    (1.0, 1.5, r"\[0, 1\]"),
    (1.0, -0.1, r"\[0, 1\]"),
    (1.0, 0.0, "all zero"),
    (-1.0, 0.1, ">= 0"),
    (float("inf"), 0.1, "finite"),
    (0.0, 0.1, "all zero"),
])
def test_train_rejects_bad_probability_and_importance(importance, probability, match):
    """A NaN or out-of-range feature probability (all-zero data, loss 0), or a negative
    importance (negative loss), is a clear error before any training."""
    cfg = sp.ToyModelConfig(n_features=5, n_hidden=2, n_instances=2, n_steps=10, batch_size=8)
    imp = np.full((5,), importance, np.float32)
    prob = np.full((5,), probability, np.float32)
    with pytest.raises(ValueError, match=match):
        sp.train(cfg, jax.random.key(0), imp, prob)
    if probability == 1.5:  # per instance too: one bad instance is enough
        ok = np.full((2, 5), 0.1, np.float32)
        ok[1, 3] = 1.5
        with pytest.raises(ValueError, match="feature_probability"):
            sp.train(cfg, jax.random.key(0), np.ones(5, np.float32), ok)
