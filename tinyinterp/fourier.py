"""Fourier analysis over Z_p for models of modular arithmetic (Nanda et al. 2023, "Progress
measures for grokking via mechanistic interpretability").

A one-layer transformer that has grokked ``(a + b) mod p`` embeds each token ``a`` as
``cos(w_k a), sin(w_k a)`` for a few key frequencies ``w_k = 2 pi k / p``, multiplies them in its
MLP into ``cos(w_k (a + b))`` and ``sin(w_k (a + b))`` (the addition identities), and reads out
``logit(c) ~ sum_k cos(w_k (a + b - c))``, which peaks at ``c = a + b mod p``. Everything here
looks at weights and activations in the Fourier basis of Z_p to see that circuit form:

``fourier_basis(p)``                  the orthonormal real basis: const, cos 1, sin 1, ..., [p, p]
``fourier_transform`` / ``fourier_transform_2d``    coefficients along one axis / two axes (a, b)
``embedding_spectrum(W_E)``           W_E's Fourier norms per component and energy per frequency
``unembed_spectrum(W_L)``             the same along the output axis of W_L = W_out @ W_U
``neuron_frequencies(acts)``          which single frequency explains each MLP neuron over (a, b)
``logits_fourier_2d(logits)``         the 2-D transform of the logits over (a, b), norm over c
``sum_directions(p, freqs)``          cos(w_k (a + b)), sin(w_k (a + b)) as unit vectors in R^(p*p)
``restricted_logits`` / ``excluded_logits`` and ``restricted_loss`` / ``excluded_loss``: the
                                      paper's two progress measures
``key_frequencies(energy)``           the few frequencies that stand out of a spectrum
``gini(x)``                           the paper's sparsity measure of a spectrum

Axis vocabulary: ``component`` (the p basis vectors: const, cos 1, sin 1, ..., in that order),
``freq`` (1 .. p // 2), ``a``, ``b`` (the two inputs), ``c`` (the output class), ``pair``
(``a * p + b``, all p^2 inputs in that order), ``neuron`` (d_mlp), ``d_model``.

Everything is a pure ``jnp`` function (jit- and vmap-able; float32), with the basis built in
float64 numpy once per ``p``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "FourierBasis", "Spectrum", "NeuronFrequencies", "fourier_basis", "fourier_transform",
    "fourier_transform_2d", "frequency_energy", "embedding_spectrum", "unembed_spectrum",
    "neuron_frequencies", "logits_fourier_2d", "sum_directions", "restricted_logits",
    "excluded_logits", "restricted_loss", "excluded_loss", "cross_entropy", "key_frequencies",
    "gini",
]


# ----------------------------------------------------------------------------- the basis
@dataclasses.dataclass(frozen=True)
class FourierBasis:
    """The real Fourier basis of functions on Z_p, orthonormal.

    ``matrix`` [component, p]: row 0 is the constant 1/sqrt(p); rows ``2k - 1`` and ``2k`` are
    cos(2 pi k x / p) and sin(2 pi k x / p), normalised, for k = 1 .. (p - 1) // 2; for even p the
    last row is cos(pi x) = (-1)^x (its sine is zero). ``labels`` ["const", "cos 1", "sin 1", ...];
    ``freq_of_component`` [component] (0 for const).
    """

    p: int
    matrix: Float[Array, "component p"]
    labels: tuple[str, ...]
    freq_of_component: tuple[int, ...]

    @property
    def n_freqs(self) -> int:
        """Number of frequencies 1 .. p // 2."""
        return self.p // 2

    def components_of(self, freq: int) -> tuple[int, ...]:
        """The rows of frequency ``freq``: (cos, sin), or (cos,) for freq p / 2 with p even."""
        _check_freq(freq, self.p)
        return tuple(i for i, f in enumerate(self.freq_of_component) if f == freq)


def _check_p(p) -> int:
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 2:
        raise ValueError(f"p must be an int >= 2 (the modulus), got {p!r}")
    return int(p)


def _check_freq(freq, p: int) -> int:
    if isinstance(freq, bool) or not isinstance(freq, (int, np.integer)) or not 1 <= freq <= p // 2:
        raise ValueError(f"frequency {freq!r} is out of range: frequencies of Z_{p} are the ints "
                         f"1 .. {p // 2} (p // 2)")
    return int(freq)


@functools.lru_cache(maxsize=32)
def _basis_np(p: int) -> tuple[np.ndarray, tuple[str, ...], tuple[int, ...]]:
    x = np.arange(p, dtype=np.float64)
    rows, labels, freqs = [np.ones(p) / np.sqrt(p)], ["const"], [0]
    for k in range(1, p // 2 + 1):
        for name, fn in (("cos", np.cos), ("sin", np.sin)):
            v = fn(2 * np.pi * k * x / p)
            if np.linalg.norm(v) < 1e-9:  # sin(pi x) for even p
                continue
            rows.append(v / np.linalg.norm(v))
            labels.append(f"{name} {k}")
            freqs.append(k)
    return np.stack(rows), tuple(labels), tuple(freqs)


def fourier_basis(p: int) -> FourierBasis:
    """The orthonormal real Fourier basis of Z_p (see ``FourierBasis``): ``matrix @ matrix.T = I``.

    Same ordering as Nanda et al.'s ``make_fourier_basis`` (const, cos 1, sin 1, cos 2, ...)."""
    p = _check_p(p)
    m, labels, freqs = _basis_np(p)
    return FourierBasis(p=p, matrix=jnp.asarray(m, jnp.float32), labels=labels,
                        freq_of_component=freqs)


def _as_f32(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
    return x.astype(jnp.float32)


def fourier_transform(x: Float[Array, "*batch"], p: int | None = None, *,
                      axis: int = 0) -> Float[Array, "*batch"]:
    """Coefficients of ``x`` in the Fourier basis along ``axis`` (whose length is p): the same
    shape, with that axis now indexing components. Orthonormal, so norms are preserved."""
    x = _as_f32(x, "x")
    n = x.shape[axis]
    if p is not None and n != p:
        raise ValueError(f"fourier_transform: axis {axis} has length {n}, expected p={p}")
    F = fourier_basis(n).matrix  # [component, p]
    moved = jnp.moveaxis(x, axis, 0)  # [p, ...]
    out = jnp.tensordot(F, moved, axes=([1], [0]))  # [component, p] x [p, ...] -> [component, ...]
    return jnp.moveaxis(out, 0, axis)


def fourier_transform_2d(x: Float[Array, "a b *rest"]) -> Float[Array, "a_component b_component *rest"]:
    """2-D coefficients over the first two axes (both of length p): ``F x F^T`` for each trailing
    index; entry [i, j] is the component (basis row i in a) x (basis row j in b)."""
    x = _as_f32(x, "x")
    if x.ndim < 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"fourier_transform_2d needs [p, p, ...] (inputs a and b on the first two "
                         f"axes), got shape {tuple(x.shape)}; reshape a [p*p, ...] array with "
                         "x.reshape(p, p, ...)")
    F = fourier_basis(x.shape[0]).matrix  # [component, p]
    # [i, a] x [a, b, ...] -> [i, b, ...]; then [j, b] x [i, b, ...] -> [i, j, ...]
    y = jnp.tensordot(F, x, axes=([1], [0]))
    return jnp.moveaxis(jnp.tensordot(F, y, axes=([1], [1])), 0, 1)


def frequency_energy(coeffs: Float[Array, "component ..."], p: int) -> Float[Array, " freq"]:
    """Summed squared coefficients per frequency 1 .. p // 2 (cos and sin rows, all trailing
    entries) from Fourier coefficients [component, ...]; the constant is left out."""
    coeffs = _as_f32(coeffs, "coeffs")
    if coeffs.shape[0] != p:
        raise ValueError(f"frequency_energy: expected {p} components on axis 0, got {coeffs.shape[0]}")
    sq = jnp.sum(coeffs.reshape(p, -1) ** 2, axis=1)  # [component]
    onehot = np.zeros((p // 2, p), np.float32)  # [freq, component]
    for i, f in enumerate(_basis_np(p)[2]):
        if f:
            onehot[f - 1, i] = 1.0
    return jnp.asarray(onehot) @ sq  # [freq]


# ----------------------------------------------------------------------------- spectra
@dataclasses.dataclass(frozen=True)
class Spectrum:
    """A weight matrix seen in the Fourier basis along its token (or output) axis.

    ``coeffs`` [component, other]: the coefficients; ``norms`` [component]: the norm of each
    component's row (what the paper plots); ``energy`` [freq]: squared norms summed per frequency
    1 .. p // 2 (cos^2 + sin^2); ``labels`` the component names; ``gini``: Gini coefficient of
    ``norms`` (0 = spread evenly, near 1 = on a few components)."""

    p: int
    coeffs: Float[Array, "component other"]
    norms: Float[Array, " component"]
    energy: Float[Array, " freq"]
    labels: tuple[str, ...]
    gini: Float[Array, ""]

    def energy_fraction(self, freqs) -> Float[Array, ""]:
        """Share of the non-constant energy carried by ``freqs`` (a list of frequencies)."""
        idx = jnp.asarray([_check_freq(f, self.p) - 1 for f in freqs], jnp.int32)
        total = jnp.sum(self.energy)
        return jnp.sum(self.energy[idx]) / jnp.maximum(total, jnp.float32(1e-30))


# pytrees (arrays as leaves, p / labels / threshold static), so a jitted analysis can return them
jax.tree_util.register_dataclass(Spectrum, data_fields=["coeffs", "norms", "energy", "gini"],
                                 meta_fields=["p", "labels"])


def _spectrum(W: Float[Array, "p other"], p: int) -> Spectrum:
    coeffs = fourier_transform(W, p, axis=0)  # [component, other]
    norms = jnp.sqrt(jnp.sum(coeffs * coeffs, axis=1))  # [component]
    return Spectrum(p=p, coeffs=coeffs, norms=norms, energy=frequency_energy(coeffs, p),
                    labels=fourier_basis(p).labels, gini=gini(norms))


def embedding_spectrum(W_E: Float[Array, "d_vocab d_model"], p: int) -> Spectrum:
    """W_E's rows for the p number tokens 0 .. p-1 (extra rows, e.g. "=", are left out) in the
    Fourier basis over the token: a grokked model's energy sits on a few key frequencies."""
    W_E = _as_f32(W_E, "W_E")
    if W_E.ndim != 2 or W_E.shape[0] < p:
        raise ValueError(f"embedding_spectrum needs W_E [d_vocab >= p={p}, d_model], got shape "
                         f"{tuple(W_E.shape)}")
    return _spectrum(W_E[:p], p)


def unembed_spectrum(W_L: Float[Array, "d_mlp d_vocab_out"], p: int) -> Spectrum:
    """W_L = W_out @ W_U [neuron, c] in the Fourier basis over the output c (the first p columns):
    the neuron-to-logit map of a grokked model reads out the same few frequencies."""
    W_L = _as_f32(W_L, "W_L")
    if W_L.ndim != 2 or W_L.shape[1] < p:
        raise ValueError(f"unembed_spectrum needs W_L [d_mlp, d_vocab_out >= p={p}], got shape "
                         f"{tuple(W_L.shape)}")
    return _spectrum(W_L[:, :p].T, p)


@dataclasses.dataclass(frozen=True)
class NeuronFrequencies:
    """Which single frequency explains each neuron's activation over the p x p inputs.

    ``fractions`` [neuron, freq]: share of the neuron's centred variance in the 2-D components of
    that frequency alone (the 3 x 3 block const/cos k/sin k in a times the same in b, constant
    term excluded, as ``extract_freq_2d`` in the paper's code); ``best_freq`` [neuron] and
    ``frac_explained`` [neuron] its best frequency and share; ``threshold`` the share above which a
    neuron counts as explained by one frequency; ``explained`` [neuron] bool."""

    p: int
    fractions: Float[Array, "neuron freq"]
    best_freq: Int[Array, " neuron"]
    frac_explained: Float[Array, " neuron"]
    explained: Bool[Array, " neuron"]
    threshold: float

    @property
    def fraction_explained(self) -> Float[Array, ""]:
        """Fraction of neurons explained by one frequency (``explained`` mean)."""
        return jnp.mean(self.explained.astype(jnp.float32))

    def counts(self) -> dict[int, int]:
        """{frequency: number of explained neurons whose best frequency it is}."""
        f = np.asarray(self.best_freq)[np.asarray(self.explained)]
        vals, n = np.unique(f, return_counts=True)
        return {int(v): int(c) for v, c in zip(vals, n, strict=True)}


jax.tree_util.register_dataclass(NeuronFrequencies,
                                 data_fields=["fractions", "best_freq", "frac_explained", "explained"],
                                 meta_fields=["p", "threshold"])


def neuron_frequencies(acts: Float[Array, "a b neuron"], *, threshold: float = 0.85
                       ) -> NeuronFrequencies:
    """For MLP activations over all inputs ``acts`` [p, p, neuron] (e.g. ``mlp.hook_post`` at the
    last position, reshaped from [p*p, neuron]), the share of each neuron's centred variance that
    one frequency's 2-D terms (1, cos w a, sin w a) x (1, cos w b, sin w b) explain. A grokked
    model's neurons are each ~85-99% one frequency (the paper's 0.85 threshold)."""
    acts = _as_f32(acts, "acts")
    if acts.ndim != 3 or acts.shape[0] != acts.shape[1]:
        raise ValueError(f"neuron_frequencies needs acts [p, p, neuron], got shape {tuple(acts.shape)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    p = acts.shape[0]
    centred = acts - jnp.mean(acts, axis=(0, 1), keepdims=True)
    sq = fourier_transform_2d(centred) ** 2  # [component_a, component_b, neuron]
    fr = np.asarray(_basis_np(p)[2])
    # block mask [freq, component_a, component_b]: a and b both in {0} u components of freq,
    # minus the const x const entry (0 after centring anyway)
    mask = np.zeros((p // 2, p, p), np.float32)
    for k in range(1, p // 2 + 1):
        in_k = (fr == k) | (fr == 0)
        mask[k - 1] = np.outer(in_k, in_k)
        mask[k - 1, 0, 0] = 0.0
    num = jnp.einsum("fij,ijn->nf", jnp.asarray(mask), sq)  # [neuron, freq]
    den = jnp.sum(sq, axis=(0, 1))  # [neuron]
    fractions = num / jnp.maximum(den, jnp.float32(1e-30))[:, None]
    best = jnp.argmax(fractions, axis=1).astype(jnp.int32)  # [neuron]
    frac = jnp.max(fractions, axis=1)
    return NeuronFrequencies(p=p, fractions=fractions, best_freq=best + 1, frac_explained=frac,
                             explained=frac >= threshold, threshold=float(threshold))


def logits_fourier_2d(logits: Float[Array, "pair c"]) -> Float[Array, "a_component b_component"]:
    """The 2-D Fourier transform of the logits over the inputs (a, b), as the norm over the output
    c of each (a-component, b-component) coefficient [p, p]. For a grokked model it is nearly all
    in the (cos k, cos k) and (sin k, sin k) entries of the key frequencies: the logits are
    cos(w (a + b - c)) = cos(w a) cos(w b) cos(w c) - ... sums."""
    logits = _as_f32(logits, "logits")
    p = _p_of_pairs(logits.shape[0])
    coeffs = fourier_transform_2d(logits.reshape(p, p, -1))  # [i, j, c]
    return jnp.sqrt(jnp.sum(coeffs * coeffs, axis=-1))


def _p_of_pairs(n: int) -> int:
    p = int(round(np.sqrt(n)))
    if p * p != n or p < 2:
        raise ValueError(f"expected all p*p input pairs on axis 0 (pair = a * p + b), got {n} rows, "
                         "which is not a square")
    return p


# ----------------------------------------------------------------------------- progress measures
def sum_directions(p: int, freqs) -> Float[Array, "direction pair"]:
    """Unit vectors in R^(p*p) (pair = a * p + b) along cos(w_k (a + b)) and sin(w_k (a + b)) for
    each frequency k of ``freqs``: rows [cos k_1, sin k_1, cos k_2, ...] (just cos for k = p / 2).
    They are orthonormal: cos(w(a+b)) = cos(wa)cos(wb) - sin(wa)sin(wb) is one 2-D basis
    direction, (cos k x cos k - sin k x sin k) / sqrt(2), as in the paper's
    ``get_component_cos_xpy``."""
    p = _check_p(p)
    freqs = [_check_freq(f, p) for f in freqs]
    if len(set(freqs)) != len(freqs):
        raise ValueError(f"frequencies must be distinct, got {freqs}")
    s = np.add.outer(np.arange(p), np.arange(p)).reshape(-1).astype(np.float64)  # [pair] a + b
    rows = []
    for k in freqs:
        for fn in (np.cos, np.sin):
            v = fn(2 * np.pi * k * s / p)
            if np.linalg.norm(v) > 1e-9:
                rows.append(v / np.linalg.norm(v))
    if not rows:
        return jnp.zeros((0, p * p), jnp.float32)
    return jnp.asarray(np.stack(rows), jnp.float32)


def _projection(logits: Float[Array, "pair c"], freqs) -> Float[Array, "pair c"]:
    logits = _as_f32(logits, "logits")
    if logits.ndim != 2:
        raise ValueError(f"logits must be [p*p, c] (all input pairs, pair = a * p + b), got shape "
                         f"{tuple(logits.shape)}")
    U = sum_directions(_p_of_pairs(logits.shape[0]), freqs)  # [direction, pair]
    return U.T @ (U @ logits)  # [pair, direction] @ [direction, c]


def restricted_logits(logits: Float[Array, "pair c"], freqs) -> Float[Array, "pair c"]:
    """Only the parts of the logits along cos(w_k (a + b)) and sin(w_k (a + b)) for the key
    frequencies ``freqs`` (per output c), plus the mean logit over inputs (the paper's bias
    correction): what the Fourier circuit alone predicts."""
    logits = _as_f32(logits, "logits")
    kept = _projection(logits, freqs)
    return kept + (jnp.mean(logits, axis=0) - jnp.mean(kept, axis=0))[None, :]


def excluded_logits(logits: Float[Array, "pair c"], freqs) -> Float[Array, "pair c"]:
    """The logits with their parts along cos(w_k (a + b)), sin(w_k (a + b)) for the key
    frequencies removed: what is left once the Fourier circuit is cut out."""
    logits = _as_f32(logits, "logits")
    return logits - _projection(logits, freqs)


def cross_entropy(logits: Float[Array, "n c"], labels: Int[Array, " n"],
                  mask: Bool[Array, " n"] | None = None) -> Float[Array, ""]:
    """Mean cross-entropy (float32 log-softmax) over the rows where ``mask`` is True (all if None)."""
    logits = _as_f32(logits, "logits")
    labels = jnp.asarray(labels)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [{logits.shape[0]}], got shape {tuple(labels.shape)}")
    lp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(lp, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]  # [n]
    if mask is None:
        return jnp.mean(nll)
    m = jnp.asarray(mask).astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), jnp.float32(1.0))


def restricted_loss(logits: Float[Array, "pair c"], labels: Int[Array, " pair"], freqs,
                    mask: Bool[Array, " pair"] | None = None) -> Float[Array, ""]:
    """Loss of ``restricted_logits`` (over all pairs by default, as in the paper). It falls
    during circuit formation, before the test loss does: the circuit is there before the
    memorisation that hides it is removed."""
    return cross_entropy(restricted_logits(logits, freqs), labels, mask)


def excluded_loss(logits: Float[Array, "pair c"], labels: Int[Array, " pair"], freqs,
                  mask: Bool[Array, " pair"] | None = None) -> Float[Array, ""]:
    """Loss of ``excluded_logits`` on the rows of ``mask`` (the paper uses the training pairs).
    It rises above the train loss as the model comes to rely on the Fourier circuit to fit its
    training data."""
    return cross_entropy(excluded_logits(logits, freqs), labels, mask)


# ----------------------------------------------------------------------------- summary statistics
def key_frequencies(energy: Float[Array, " freq"], *, min_ratio: float = 2.5,
                    floor: float = 10.0, max_freqs: int | None = None) -> list[int]:
    """The frequencies that stand out of a spectrum ``energy`` [freq] (entry i is frequency
    i + 1, e.g. ``Spectrum.energy``): sort the energies, and cut at the largest drop between
    neighbours (as a ratio) among the cuts that keep only frequencies at least ``floor`` times the
    median energy (the noise floor); the frequencies above the cut are the key ones if that drop
    is at least ``min_ratio``. Otherwise none stand out and the result is empty. Sorted by
    energy, largest first.

    Why a gap above a floor, not a share of energy: a share always finds "key" frequencies, even
    in a flat (random) spectrum; the floor keeps noise out, and the gap separates the circuit's
    frequencies from weaker leftovers (a grokked W_E: 3-5 frequencies 50-180x the median, the
    rest within ~10x). ``max_freqs`` (default all) bounds how many can be key."""
    e = np.asarray(energy, np.float64)
    if e.ndim != 1 or e.size < 2:
        raise ValueError(f"energy must be a 1-D spectrum over >= 2 frequencies, got shape {e.shape}")
    if not np.all(np.isfinite(e)) or np.any(e < 0):
        raise ValueError("energy must be finite and non-negative")
    if min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be > 1, got {min_ratio}")
    if floor < 1.0:
        raise ValueError(f"floor must be >= 1 (a multiple of the median energy), got {floor}")
    order = np.argsort(-e, kind="stable")
    s = e[order]
    top = len(s) - 1 if max_freqs is None else max(1, min(int(max_freqs), len(s) - 1))
    above = int(np.sum(s[:top] >= floor * np.median(e)))  # cuts after 1 .. `above` freqs allowed
    if above == 0 or s[0] == 0.0:  # nothing above the floor, or an all-zero spectrum
        return []
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = s[:above] / np.maximum(s[1:above + 1], np.finfo(np.float64).tiny)
    i = int(np.argmax(ratios))
    if not ratios[i] >= min_ratio:
        return []
    return [int(f) + 1 for f in order[:i + 1]]


def gini(x: Float[Array, "*batch n"]) -> Float[Array, "*batch"]:
    """Gini coefficient of non-negative values along the last axis: 0 when all are equal, (n-1)/n
    when one holds everything. Mean absolute difference / (2 mean), as the paper uses it for the
    sparsity of W_E's and W_L's Fourier norms."""
    x = _as_f32(x, "x")
    n = x.shape[-1]
    s = jnp.sort(x, axis=-1)
    i = jnp.arange(1, n + 1, dtype=jnp.float32)  # [n] rank of each sorted entry
    w = (2.0 * i - jnp.float32(n + 1)).reshape((1,) * (s.ndim - 1) + (n,))  # [1.., n]
    total = jnp.sum(s, axis=-1)
    # sum_ij |x_i - x_j| / (2 n^2 mean) = sum_i (2 i - n - 1) s_i / (n sum s)
    num = jnp.sum(w * s, axis=-1)
    return num / (jnp.float32(n) * jnp.maximum(total, jnp.float32(1e-30)))
