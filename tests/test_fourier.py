"""tinyinterp.fourier on synthetic inputs whose spectra are known in closed form."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp import fourier

PRIMES = st.sampled_from([5, 7, 11, 13, 17, 23])


def _cos(p, k, x):
    return np.cos(2 * np.pi * k * np.asarray(x, np.float64) / p)


def _sin(p, k, x):
    return np.sin(2 * np.pi * k * np.asarray(x, np.float64) / p)


def _planted_embedding(p, freqs, d_model=24, noise=0.0, seed=0):
    """W_E [p + 1, d_model] = sum over freqs of cos(w a) u_k + sin(w a) v_k (+ noise); the extra
    row ("=") is large and random: it must not enter the spectrum."""
    rng = np.random.default_rng(seed)
    a = np.arange(p)
    W = noise * rng.normal(size=(p, d_model))
    for k in freqs:
        W += np.outer(_cos(p, k, a), rng.normal(size=d_model))
        W += np.outer(_sin(p, k, a), rng.normal(size=d_model))
    return np.concatenate([W, 50 * rng.normal(size=(1, d_model))]).astype(np.float32)


@settings(max_examples=12)
@given(p=st.integers(2, 40))
def test_basis_is_orthonormal_with_named_rows(p):
    b = fourier.fourier_basis(p)
    m = np.asarray(b.matrix, np.float64)
    assert m.shape == (p, p)
    np.testing.assert_allclose(m @ m.T, np.eye(p), atol=1e-5)
    assert b.labels[0] == "const" and len(b.labels) == p
    if p >= 3:
        assert b.labels[1:3] == ("cos 1", "sin 1")
        np.testing.assert_allclose(m[1], _cos(p, 1, np.arange(p)) / np.sqrt(p / 2), atol=1e-6)
    if p % 2 == 0:  # the Nyquist frequency has only a cosine, (-1)^x
        assert b.labels[-1] == f"cos {p // 2}"
        np.testing.assert_allclose(m[-1] * np.sqrt(p), (-1.0) ** np.arange(p), atol=1e-5)
    assert b.n_freqs == p // 2
    assert sum(len(b.components_of(k)) for k in range(1, p // 2 + 1)) == p - 1


@settings(max_examples=8)
@given(p=PRIMES, data=st.data())
def test_pure_wave_has_energy_at_its_frequency_only(p, data):
    k = data.draw(st.integers(1, p // 2))
    phase = data.draw(st.floats(0, 2 * np.pi))
    x = np.cos(2 * np.pi * k * np.arange(p) / p + phase).astype(np.float32)
    c = fourier.fourier_transform(jnp.asarray(x))
    np.testing.assert_allclose(np.linalg.norm(c), np.linalg.norm(x), rtol=1e-5)  # Parseval
    e = np.asarray(fourier.frequency_energy(c, p))
    assert e.shape == (p // 2,)
    np.testing.assert_allclose(e[k - 1], np.sum(x ** 2), rtol=1e-4)
    np.testing.assert_allclose(np.delete(e, k - 1), 0.0, atol=1e-5)


def test_transform_along_an_axis_and_2d_match_explicit_sums():
    p = 7
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, p, 2)).astype(np.float32)
    F = np.asarray(fourier.fourier_basis(p).matrix, np.float64)
    np.testing.assert_allclose(fourier.fourier_transform(x, p, axis=1),
                               np.einsum("ia,bac->bic", F, x), atol=1e-5)
    y = rng.normal(size=(p, p, 4)).astype(np.float32)
    np.testing.assert_allclose(fourier.fourier_transform_2d(y),
                               np.einsum("ia,jb,abc->ijc", F, F, y), atol=1e-5)
    with pytest.raises(ValueError, match="expected p=5"):
        fourier.fourier_transform(x, 5, axis=1)
    with pytest.raises(ValueError, match=r"\[p, p, \.\.\.\]"):
        fourier.fourier_transform_2d(np.zeros((3, 4), np.float32))
    with pytest.raises(TypeError, match="float"):
        fourier.fourier_transform(np.arange(p))


@settings(max_examples=5)
@given(p=st.sampled_from([23, 29, 31, 37]), seed=st.integers(0, 1000), n=st.integers(1, 5))
def test_planted_embedding_spectrum_and_key_frequencies(p, seed, n):
    rng = np.random.default_rng(seed)
    freqs = sorted(rng.choice(np.arange(1, p // 2 + 1), size=n, replace=False).tolist())
    W_E = _planted_embedding(p, freqs, noise=0.02, seed=seed)
    s = fourier.embedding_spectrum(W_E, p)
    assert s.coeffs.shape == (p, W_E.shape[1]) and s.norms.shape == (p,)
    assert sorted(fourier.key_frequencies(s.energy)) == freqs
    assert float(s.energy_fraction(freqs)) > 0.98
    # norms are the row norms of the coefficients; the "=" row never enters
    np.testing.assert_allclose(np.sum(np.asarray(s.norms) ** 2), np.sum(W_E[:p] ** 2), rtol=1e-4)
    # a random embedding has no key frequencies and a lower Gini coefficient
    noise = np.random.default_rng(seed + 1).normal(size=(p + 1, 24)).astype(np.float32)
    rand = fourier.embedding_spectrum(noise, p)
    assert fourier.key_frequencies(rand.energy) == []
    assert float(s.gini) > float(rand.gini) + 0.3


def test_unembed_spectrum_reads_the_output_axis():
    p, k = 13, 4
    rng = np.random.default_rng(0)
    c = np.arange(p)
    W_L = (np.outer(rng.normal(size=32), _cos(p, k, c))
           + np.outer(rng.normal(size=32), _sin(p, k, c))).astype(np.float32)  # [neuron, c]
    s = fourier.unembed_spectrum(W_L, p)
    assert fourier.key_frequencies(s.energy) == [k]
    assert float(s.energy_fraction([k])) > 0.999
    with pytest.raises(ValueError, match="W_L"):
        fourier.unembed_spectrum(W_L[:, :5], p)


def test_neuron_frequencies_on_planted_neurons():
    p = 17
    a = np.arange(p)[:, None]
    b = np.arange(p)[None, :]
    pure = _cos(p, 3, a) * _cos(p, 3, b) + 0.5 * _sin(p, 3, a) + 2.0  # only freq 3 terms
    other = _sin(p, 5, a) * _cos(p, 5, b) - _cos(p, 5, b)  # only freq 5
    mixed = _cos(p, 2, a) * _cos(p, 2, b) + _cos(p, 7, a) * _cos(p, 7, b)  # half and half
    acts = np.stack([pure, other, mixed], axis=-1).astype(np.float32)  # [a, b, neuron]
    nf = fourier.neuron_frequencies(acts, threshold=0.85)
    np.testing.assert_array_equal(np.asarray(nf.best_freq)[:2], [3, 5])
    np.testing.assert_allclose(np.asarray(nf.frac_explained)[:2], 1.0, atol=1e-5)
    np.testing.assert_allclose(float(nf.frac_explained[2]), 0.5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(nf.explained), [True, True, False])
    np.testing.assert_allclose(float(nf.fraction_explained), 2 / 3, atol=1e-6)
    assert nf.counts() == {3: 1, 5: 1}
    np.testing.assert_allclose(np.asarray(nf.fractions).sum(axis=1)[:2], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[p, p, neuron\]"):
        fourier.neuron_frequencies(acts[:, :, 0])


def _trig_logits(p, freqs, weights=None):
    """logits[a * p + b, c] = sum_k w_k cos(w_k (a + b - c)): the grokked model's readout."""
    a, b, c = np.meshgrid(np.arange(p), np.arange(p), np.arange(p), indexing="ij")
    out = np.zeros((p, p, p))
    for i, k in enumerate(freqs):
        out += (1.0 if weights is None else weights[i]) * _cos(p, k, a + b - c)
    return out.reshape(p * p, p).astype(np.float32)


def test_logits_fourier_2d_of_a_trig_readout():
    p, k = 11, 3
    m = np.asarray(fourier.logits_fourier_2d(_trig_logits(p, [k])))
    labels = fourier.fourier_basis(p).labels
    big = {(labels[i], labels[j]) for i, j in zip(*np.nonzero(m > 1e-3 * m.max()), strict=True)}
    # cos(w(a+b-c)) = [cos a cos b - sin a sin b] cos c + [sin a cos b + cos a sin b] sin c
    assert big == {(f"{x} {k}", f"{y} {k}") for x in ("cos", "sin") for y in ("cos", "sin")}
    vals = m[m > 1e-3 * m.max()]
    np.testing.assert_allclose(vals, vals[0], rtol=1e-4)
    with pytest.raises(ValueError, match="not a square"):
        fourier.logits_fourier_2d(np.zeros((10, 3), np.float32))


@settings(max_examples=10)
@given(p=st.sampled_from([7, 11, 13]), data=st.data())
def test_sum_directions_are_orthonormal(p, data):
    freqs = data.draw(st.lists(st.integers(1, p // 2), min_size=1, max_size=p // 2, unique=True))
    U = np.asarray(fourier.sum_directions(p, freqs), np.float64)
    assert U.shape == (2 * len(freqs), p * p)
    np.testing.assert_allclose(U @ U.T, np.eye(len(U)), atol=1e-5)
    s = np.add.outer(np.arange(p), np.arange(p)).ravel()
    cos_dir = _cos(p, freqs[0], s)
    np.testing.assert_allclose(U[0], cos_dir / np.linalg.norm(cos_dir), atol=1e-6)


def test_restricted_and_excluded_logits_split_a_planted_readout():
    p = 13
    key, other = [2, 5], [3]
    rng = np.random.default_rng(0)
    L_key = _trig_logits(p, key, weights=[3.0, 2.0])
    L_other = _trig_logits(p, other, weights=[1.5])
    bias = rng.normal(size=(1, p)).astype(np.float32)  # constant over inputs
    L = L_key + L_other + bias
    r = np.asarray(fourier.restricted_logits(L, key))
    e = np.asarray(fourier.excluded_logits(L, key))
    np.testing.assert_allclose(r, L_key + bias, atol=1e-4)  # bias kept by the correction
    np.testing.assert_allclose(e, L_other + bias, atol=1e-4)
    np.testing.assert_allclose(np.asarray(fourier.excluded_logits(r, key)), np.broadcast_to(bias, r.shape),
                               atol=1e-4)
    labels = (np.add.outer(np.arange(p), np.arange(p)).ravel() % p).astype(np.int32)
    # the key readout alone predicts a + b; with it cut out, the rest (freq 3) still does, but
    # the loss gets worse; a readout made only of key frequencies is at chance when excluded
    assert float(fourier.restricted_loss(L, labels, key)) < float(fourier.cross_entropy(L_other, labels))
    np.testing.assert_allclose(float(fourier.excluded_loss(L_key, labels, key)), np.log(p), rtol=1e-4)
    mask = np.zeros(p * p, bool)
    mask[:40] = True
    np.testing.assert_allclose(
        float(fourier.excluded_loss(L, labels, key, mask)),
        float(fourier.cross_entropy(e[:40], labels[:40])), rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        fourier.restricted_logits(L, [0])
    with pytest.raises(ValueError, match="distinct"):
        fourier.excluded_logits(L, [2, 2])


def test_key_frequencies_gap_rule():
    flat = np.ones(20)
    assert fourier.key_frequencies(flat) == []
    e = np.full(20, 0.1)
    e[[4, 9, 13]] = [10.0, 8.0, 5.0]
    assert fourier.key_frequencies(e) == [5, 10, 14]  # largest first
    e[2] = 1.0  # a step below the keys, still far above the floor: the largest drop decides
    assert fourier.key_frequencies(e) == [5, 10, 14, 3]
    # a grokked W_E with keys of unequal strength (measured: p 43, seed 1): three strong, two
    # weaker but far above the floor, then leftovers ~3.5x above the median
    measured = np.array([24.51, 20.75, 19.66, 6.23, 4.65, 1.31, 1.24, 1.14] + [0.35] * 13)
    assert fourier.key_frequencies(measured) == [1, 2, 3, 4, 5]
    # one outlier in noise is not a key frequency unless it clears the floor
    noise = np.full(20, 1.0)
    noise[7] = 5.0
    assert fourier.key_frequencies(noise) == []
    noise[7] = 50.0
    assert fourier.key_frequencies(noise) == [8]
    assert fourier.key_frequencies(np.zeros(5)) == []
    with pytest.raises(ValueError, match="non-negative"):
        fourier.key_frequencies(-flat)
    with pytest.raises(ValueError, match="min_ratio"):
        fourier.key_frequencies(flat, min_ratio=1.0)


@settings(max_examples=10)
@given(x=st.lists(st.floats(0.0, 100.0), min_size=2, max_size=30), scale=st.floats(0.1, 10.0))
def test_gini_bounds_and_scale_invariance(x, scale):
    x = np.asarray(x, np.float32)
    n = len(x)
    g = float(fourier.gini(x))
    if x.sum() > 1e-3:
        assert -1e-5 <= g <= (n - 1) / n + 1e-5
        np.testing.assert_allclose(float(fourier.gini(x * np.float32(scale))), g, atol=1e-4)
        # the definition: mean absolute difference over twice the mean
        ref = np.abs(x[:, None] - x[None, :]).mean() / (2 * x.mean())
        np.testing.assert_allclose(g, ref, atol=1e-4)
    np.testing.assert_allclose(float(fourier.gini(np.ones(n, np.float32))), 0.0, atol=1e-6)
    onehot = np.zeros(n, np.float32)
    onehot[0] = 1.0
    np.testing.assert_allclose(float(fourier.gini(onehot)), (n - 1) / n, atol=1e-6)
    batched = np.asarray(fourier.gini(np.stack([x, np.ones(n, np.float32)])))
    assert batched.shape == (2,)


def test_bad_p_and_frequencies_are_clear_errors():
    with pytest.raises(ValueError, match="p must be an int >= 2"):
        fourier.fourier_basis(1)
    with pytest.raises(ValueError, match="1 .. 3"):
        fourier.fourier_basis(7).components_of(4)
    with pytest.raises(ValueError, match="1 .. 3"):
        fourier.sum_directions(7, [5])
