"""Sparse autoencoders and transcoders (Sharkey et al. 2022; Bricken et al. 2023).

Axis vocabulary:

    batch     samples (tokens) in one step
    d_in      the activation being encoded (an SAE's input and target)
    d_out     a transcoder's target (e.g. an MLP's output); equals d_in for an SAE
    feature   dictionary elements (``d_sae`` of them)

Parameters (a dict of jnp arrays, right-multiplied as everywhere in tinyinterp)::

    W_enc [d_in, feature]   b_enc [feature]   W_dec [feature, d_out]   b_dec [d_out]

The dictionary directions are the rows of ``W_dec`` (the papers' decoder *columns*); they are kept
at unit norm: before each optimiser step the gradient component parallel to each row is removed,
after it every row is renormalised.

    SAE:         f = ReLU((x - b_dec) @ W_enc + b_enc)     x_hat = f @ W_dec + b_dec
    transcoder:  f = ReLU(x @ W_enc + b_enc)               y_hat = f @ W_dec + b_dec
    loss = mean_batch ||target - prediction||^2 + l1_coefficient * mean_batch ||f||_1

(the SAE's pre-encoder bias is ``-b_dec``; a transcoder's input and output live in different
spaces, so it has none.) Dead features (firing on fewer than ``dead_frequency`` of the samples of a
resampling window) and the less active of two near-duplicate latents (decoder cosine >
``duplicate_cos``; our extension) are resampled from high-loss inputs (Bricken et al.): the
latent's decoder row becomes a residual direction of the high-loss inputs, its encoder column that
direction times 0.2 x the mean alive encoder norm, its bias a threshold (``resample_threshold``),
its Adam first moment zeroed and its second moment set to the kept latents' mean. The direction is
either (``resample_cluster_cos`` > 0, the default) the summed residual of a cluster of high-loss
inputs whose residuals point the same way, clusters taken greedily by the loss they hold, or
(Bricken et al.) the residual of one input sampled with probability proportional to its squared
loss. A single residual mixes all of an input's errors; the cluster's sum keeps what recurs: a
direction the dictionary misses.

Training data come from a pure function ``batch_fn(step) -> x [batch, d_in]`` (or ``(x, y)`` for a
transcoder) traced inside the jitted ``lax.scan``; ``array_batch_fn`` samples from arrays in
memory (e.g. from ``collect_activations``), ``GroundTruth`` generates the papers' synthetic data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from tinyinterp import sweeps
from tinyinterp.superposition import standard_promotion, uniform_from_counter

Params = dict

__all__ = [
    "SAEConfig",
    "SAEResult",
    "GroundTruth",
    "init_params",
    "encode",
    "decode",
    "forward",
    "loss_fn",
    "normalize_decoder",
    "remove_parallel_grad",
    "train_sae",
    "train_sae_sweep",
    "sweep_loss_fn",
    "pre_activations",
    "topk_mask",
    "jumprelu",
    "heaviside_step",
    "ARCHITECTURES",
    "array_batch_fn",
    "array_batches",
    "RunBatches",
    "metrics",
    "mmcs",
    "collect_activations",
]


ARCHITECTURES = ("relu", "topk", "jumprelu")
# The fields a sweep may vary between its runs (each run's sparsity knob); every other field is
# shared, so the runs train as one batched program (``train_sae_sweep``).
SWEEP_FIELDS = ("l1_coefficient", "l0_coefficient", "k")


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool) and math.isfinite(float(value))


@dataclass(frozen=True)
class SAEConfig:
    """Architecture, dictionary size, sparsity knob and training schedule.

    ``architecture``: ``"relu"`` (ReLU + L1 penalty, Bricken et al. 2023; knob
    ``l1_coefficient``), ``"topk"`` (Gao et al. 2024: keep the ``k`` largest pre-activations,
    ReLU'd; no penalty) or ``"jumprelu"`` (Rajamanoharan et al. 2024: a per-latent threshold
    ``exp(log_threshold)``, an L0 penalty ``l0_coefficient * mean_batch ||f||_0``, trained through
    straight-through pseudo-derivatives with a rectangle kernel of width ``jumprelu_bandwidth``).
    ``d_out`` None: an SAE (target = input). Otherwise a transcoder from d_in to d_out.
    ``resample_every`` steps (0: never); see the module docstring for what is resampled.
    """

    d_in: int
    d_sae: int
    d_out: int | None = None
    l1_coefficient: float = 0.03
    lr: float = 1e-3
    batch_size: int = 1024
    n_steps: int = 2000
    resample_every: int = 500
    resample_until: float = 0.75  # no resampling after this fraction of the steps (let them settle)
    resample_pool: int = 16  # batches of candidate inputs scored when resampling
    # Also resample the less active of two latents whose decoder rows have cosine > this (an
    # extension of Bricken et al.: the L1 penalty is indifferent to splitting one feature between
    # two identical latents, so such duplicates never die by themselves). > 1 disables.
    duplicate_cos: float = 0.95
    # Dead = fired on fewer than this fraction of the window's samples (a latent that fires once
    # in 10^5 samples is as useless as a dead one; Bricken et al. call them ultralow-density).
    dead_frequency: float = 1e-4
    # A resampled latent's encoder bias is -resample_threshold x its pre-activation on the input it
    # was made from, so it fires only on similar inputs (0: Bricken et al.'s zero bias, with which
    # a fresh latent fires on about half of all inputs and drifts to a mixture).
    resample_threshold: float = 0.5
    chunk_size: int = 250
    lr_decay_fraction: float = 0.2  # the lr falls linearly to 0 over this last fraction of steps
    # the lr rises linearly from lr / warmup_steps to lr over this first fraction of steps
    # (Anthropic's April 2024 SAE update; SAELens' lr_warm_up_steps); 0: none
    lr_warmup_fraction: float = 0.0
    # Adam second moment of a resampled latent: "alive_mean" (the kept latents' mean) or "zero".
    # optax's bias correction is global, so with "zero" the fresh latent's updates are ~3-6x lr
    # for its first hundreds of steps (m / sqrt(v) while v warms up), throwing it off its direction.
    resample_nu: str = "alive_mean"
    # > 0: resample along the summed residual of a cluster of high-loss inputs (residual cosine
    # above this) instead of one sampled input's residual; see ``_cluster_picks``.
    resample_cluster_cos: float = 0.5
    resample_candidates: int = 512  # highest-loss inputs of the pool considered for clusters
    architecture: str = "relu"
    k: int = 0  # TopK: active latents per input (>= 1 for "topk")
    l0_coefficient: float = 0.01  # JumpReLU: the L0 penalty's weight
    # JumpReLU: the threshold's pseudo-derivative counts pre-activations within bandwidth / 2 of
    # it. The paper and SAELens use 0.001 for both (with ~1e5 steps); on unit-scale data and a few
    # thousand steps the threshold then hardly moves (measured on the test's ground truth: 0.0012
    # after 1500 steps, L0 45 of 48, MMCS 0.46); 0.05 learns it (L0 2.6, MMCS 0.96).
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05

    def __post_init__(self):
        for name in ("d_in", "d_sae", "batch_size", "chunk_size", "resample_pool"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}.")
        if self.d_out is not None and (not isinstance(self.d_out, int) or self.d_out < 1):
            raise ValueError(f"SAEConfig.d_out must be None or a positive int, got {self.d_out!r}.")
        for name in ("l1_coefficient", "l0_coefficient"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ValueError(f"SAEConfig.{name} must be a finite number >= 0, got {value!r}.")
        if not _finite(self.lr) or not self.lr > 0:
            raise ValueError(f"SAEConfig.lr must be a finite number > 0, got {self.lr!r}.")
        for name in ("resample_every", "n_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SAEConfig.{name} must be an int >= 0, got {value!r}.")
        if not _finite(self.dead_frequency) or not 0.0 <= self.dead_frequency < 1.0:
            raise ValueError(
                f"SAEConfig.dead_frequency is the fraction of a resampling window's samples a "
                f"latent must fire on to count as alive, so it must be in [0, 1) (typically "
                f"1e-6 to 1e-3; 0 resamples only duplicates); got {self.dead_frequency!r}.")
        for name in ("resample_until", "lr_decay_fraction", "lr_warmup_fraction"):
            value = getattr(self, name)
            if not _finite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"SAEConfig.{name} is a fraction of the steps and must be in "
                                 f"[0, 1], got {value!r}.")
        for name in ("duplicate_cos", "resample_threshold", "resample_cluster_cos"):
            if not _finite(getattr(self, name)):
                raise ValueError(f"SAEConfig.{name} must be a finite number, got "
                                 f"{getattr(self, name)!r}.")
        if self.resample_nu not in ("alive_mean", "zero"):
            raise ValueError(
                f"SAEConfig.resample_nu must be 'alive_mean' or 'zero', got {self.resample_nu!r}."
            )
        if not isinstance(self.resample_candidates, int) or self.resample_candidates < 1:
            raise ValueError("SAEConfig.resample_candidates must be a positive int.")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAEConfig.architecture must be one of {ARCHITECTURES}, got "
                             f"{self.architecture!r}.")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            raise ValueError(f"SAEConfig.k must be an int >= 0, got {self.k!r}.")
        if self.architecture == "topk" and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"SAEConfig: architecture 'topk' needs 1 <= k <= d_sae={self.d_sae} "
                             f"(the number of active latents per input), got k={self.k}.")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            value = getattr(self, name)
            if not _finite(value) or not value > 0:
                raise ValueError(f"SAEConfig.{name} must be a finite number > 0, got {value!r}.")

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None

    @property
    def target_dim(self) -> int:
        return self.d_in if self.d_out is None else self.d_out

    def replace(self, **changes) -> SAEConfig:
        return dataclasses.replace(self, **changes)

    @property
    def sparsity_knob(self) -> tuple[str, float]:
        """(name, value) of the setting that trades sparsity for reconstruction."""
        name = {"relu": "l1_coefficient", "topk": "k", "jumprelu": "l0_coefficient"}[
            self.architecture]
        return name, getattr(self, name)


# --------------------------------------------------------------------------------------------
# Model


def init_params(
    cfg: SAEConfig, key: jax.Array, b_dec: Float[Array, " d_out"] | None = None
) -> Params:
    """Random unit-norm decoder rows, encoder = decoder transpose (tied init), b_enc = 0; a
    JumpReLU SAE also gets ``log_threshold`` [feature] = log(jumprelu_init_threshold).

    ``b_dec`` [d_out] (e.g. the data mean) defaults to 0.
    """
    d_out = cfg.target_dim
    W_dec = jax.random.normal(key, (cfg.d_sae, d_out), jnp.float32)  # [feature, d_out]
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
    if cfg.is_transcoder:
        W_enc = jax.random.normal(jax.random.fold_in(key, 1), (cfg.d_in, cfg.d_sae), jnp.float32)
        W_enc = W_enc / jnp.linalg.norm(W_enc, axis=0, keepdims=True)  # unit columns
    else:
        W_enc = W_dec.T  # [d_in, feature]
    b = jnp.zeros((d_out,), jnp.float32) if b_dec is None else jnp.asarray(b_dec, jnp.float32)
    if b.shape != (d_out,):
        raise ValueError(f"b_dec must have shape ({d_out},), got {tuple(b.shape)}.")
    params = {"W_enc": W_enc, "b_enc": jnp.zeros((cfg.d_sae,), jnp.float32), "W_dec": W_dec,
              "b_dec": b}
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = jnp.full((cfg.d_sae,), np.log(cfg.jumprelu_init_threshold),
                                           jnp.float32)
    return params


def pre_activations(
    params: Params, x: Float[Array, "batch d_in"], transcoder: bool = False
) -> Float[Array, "batch feature"]:
    """(x - b_dec) W_enc + b_enc (no pre-bias for a transcoder)."""
    x_in = x if transcoder else x - params["b_dec"][None, :]  # [batch, d_in]
    pre = jnp.einsum("bd,df->bf", x_in, params["W_enc"])  # [batch, d_in] x [d_in, feature]
    return pre + params["b_enc"][None, :]


def topk_mask(pre: Float[Array, "batch feature"], k: Array | int, k_max: int
              ) -> Bool[Array, "batch feature"]:
    """True at each row's ``k`` largest entries (``k`` may be traced, ``k <= k_max`` static):
    the entries >= the row's k-th largest value (ties, measure zero, would keep more)."""
    top = jax.lax.top_k(pre, k_max)[0]  # [batch, k_max], descending
    kth = jnp.take_along_axis(top, jnp.broadcast_to(jnp.asarray(k, jnp.int32) - 1,
                                                    (pre.shape[0], 1)), axis=1)  # [batch, 1]
    return pre >= jax.lax.stop_gradient(kth)


def _rectangle(u):
    return ((u > -0.5) & (u < 0.5)).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre: Float[Array, "batch feature"], threshold: Float[Array, " feature"],
             bandwidth: float) -> Float[Array, "batch feature"]:
    """JumpReLU_theta(z) = z * H(z - theta) (Rajamanoharan et al. 2024). Gradients: to z only
    where it is active (no straight-through for z); to theta the pseudo-derivative
    -(theta / bandwidth) K((z - theta) / bandwidth), K the rectangle on (-1/2, 1/2), summed over
    the batch (as SAELens does)."""
    return pre * (pre > threshold[None, :]).astype(pre.dtype)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold, bandwidth), (pre, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    pre, threshold = res
    bw = jnp.float32(bandwidth)
    d_pre = g * (pre > threshold[None, :]).astype(g.dtype)
    d_theta = jnp.sum(-(threshold[None, :] / bw) * _rectangle((pre - threshold[None, :]) / bw) * g,
                      axis=0)  # [feature]
    return d_pre, d_theta


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside_step(pre: Float[Array, "batch feature"], threshold: Float[Array, " feature"],
                   bandwidth: float) -> Float[Array, "batch feature"]:
    """H(z - theta) as float32, for the L0 penalty. Gradients: none to z; to theta the
    pseudo-derivative -(1 / bandwidth) K((z - theta) / bandwidth), summed over the batch."""
    return (pre > threshold[None, :]).astype(jnp.float32)


def _step_fwd(pre, threshold, bandwidth):
    return heaviside_step(pre, threshold, bandwidth), (pre, threshold)


def _step_bwd(bandwidth, res, g):
    pre, threshold = res
    bw = jnp.float32(bandwidth)
    d_theta = jnp.sum(-(1.0 / bw) * _rectangle((pre - threshold[None, :]) / bw) * g, axis=0)
    return jnp.zeros_like(pre), d_theta


heaviside_step.defvjp(_step_fwd, _step_bwd)


def _activate(params: Params, pre, architecture: str, k, k_max: int, bandwidth: float):
    if architecture == "topk":
        return jnp.where(topk_mask(pre, k, k_max), jax.nn.relu(pre), jnp.float32(0.0))
    if architecture == "jumprelu":
        return jumprelu(pre, jnp.exp(params["log_threshold"]), bandwidth)
    return jax.nn.relu(pre)


def encode(
    params: Params, x: Float[Array, "batch d_in"], transcoder: bool = False, *,
    cfg: SAEConfig | None = None,
) -> Float[Array, "batch feature"]:
    """Feature activations: the architecture's activation of ``pre_activations`` (ReLU when
    ``cfg`` is None; pass the SAE's ``cfg`` for TopK or JumpReLU)."""
    arch = "relu" if cfg is None else cfg.architecture
    k = 0 if cfg is None else cfg.k
    bw = 1.0 if cfg is None else cfg.jumprelu_bandwidth
    if arch == "jumprelu" and "log_threshold" not in params:
        raise ValueError("a JumpReLU SAE's params need 'log_threshold' [feature]; build them "
                         "with init_params(cfg, key) for architecture='jumprelu'.")
    return _activate(params, pre_activations(params, x, transcoder), arch, k, max(k, 1), bw)


def decode(params: Params, f: Float[Array, "batch feature"]) -> Float[Array, "batch d_out"]:
    """Reconstruction f W_dec + b_dec."""
    out = jnp.einsum("bf,fd->bd", f, params["W_dec"])  # [batch, feature] x [feature, d_out]
    return out + params["b_dec"][None, :]


def forward(params: Params, x: Float[Array, "batch d_in"], transcoder: bool = False, *,
            cfg: SAEConfig | None = None):
    """(prediction [batch, d_out], feature activations [batch, feature])."""
    f = encode(params, x, transcoder, cfg=cfg)
    return decode(params, f), f


def loss_fn(
    params: Params,
    x: Float[Array, "batch d_in"],
    target: Float[Array, "batch d_out"],
    l1_coefficient: float,
    transcoder: bool = False,
):
    """ReLU SAE: (loss, (mse, l1, f)): mse = mean_batch ||target - pred||^2, l1 = mean_batch
    ||f||_1. ``sweep_loss_fn`` is the general form (every architecture)."""
    pred, f = forward(params, x, transcoder)
    mse = jnp.mean(jnp.sum((target - pred) ** 2, axis=-1))
    l1 = jnp.mean(jnp.sum(jnp.abs(f), axis=-1))
    return mse + jnp.float32(l1_coefficient) * l1, (mse, l1, f)


def sweep_loss_fn(params: Params, x: Float[Array, "batch d_in"],
                  target: Float[Array, "batch d_out"], knob: dict, cfg: SAEConfig, k_max: int):
    """(loss, (mse, penalty, f)) for any architecture; ``knob``: {"coefficient": float32 (L1
    for ReLU, L0 for JumpReLU), "k": int32 (TopK)}, traced, so one compiled program serves a
    whole sweep. ReLU: penalty = mean_batch ||f||_1; JumpReLU: mean_batch ||f||_0 (the Heaviside
    with the threshold's pseudo-derivative); TopK: 0."""
    pre = pre_activations(params, x, cfg.is_transcoder)  # [batch, feature]
    f = _activate(params, pre, cfg.architecture, knob["k"], k_max, cfg.jumprelu_bandwidth)
    pred = decode(params, f)
    mse = jnp.mean(jnp.sum((target - pred) ** 2, axis=-1))
    if cfg.architecture == "relu":
        penalty = jnp.mean(jnp.sum(jnp.abs(f), axis=-1))
    elif cfg.architecture == "jumprelu":
        step = heaviside_step(pre, jnp.exp(params["log_threshold"]), cfg.jumprelu_bandwidth)
        penalty = jnp.mean(jnp.sum(step, axis=-1))
    else:
        penalty = jnp.float32(0.0)
    return mse + knob["coefficient"] * penalty, (mse, penalty, f)


def normalize_decoder(params: Params) -> Params:
    """Rescale every decoder row (dictionary direction) to unit norm; returns new params."""
    W = params["W_dec"]  # [feature, d_out]
    norms = jnp.linalg.norm(W, axis=-1, keepdims=True)  # [feature, 1]
    return {**params, "W_dec": W / jnp.maximum(norms, jnp.float32(1e-12))}


def remove_parallel_grad(
    W_dec: Float[Array, "feature d_out"], grad: Float[Array, "feature d_out"]
) -> Float[Array, "feature d_out"]:
    """grad minus its component along each (unit) decoder row: what changes the norm, not the
    direction, is removed (Bricken et al.)."""
    parallel = jnp.sum(grad * W_dec, axis=-1, keepdims=True)  # [feature, 1]
    return grad - parallel * W_dec


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class GroundTruth:
    """Synthetic activations with known features (Sharkey et al.): x = sum_i c_i * feature_i.

    ``features`` [n_features, d] are random unit vectors; feature i is active with probability
    p_i proportional to decay**i, scaled so that on average ``avg_active`` are active; an active
    coefficient is uniform on [0, 1).
    """

    features: np.ndarray  # [feature(true), d_in]
    probabilities: np.ndarray  # [feature(true)]
    seed: int

    @classmethod
    def make(
        cls,
        d: int = 256,
        n_features: int = 512,
        avg_active: float = 5.0,
        decay: float = 0.99,
        seed: int = 0,
    ) -> GroundTruth:
        for name, value in (("d", d), ("n_features", n_features)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GroundTruth.make: {name} must be a positive int, got {value!r}.")
        if not _finite(avg_active) or not 0 < avg_active <= n_features:
            raise ValueError(f"GroundTruth.make: avg_active is the mean number of features present "
                             f"per sample and must be in (0, n_features={n_features}], got "
                             f"{avg_active!r}.")
        if not _finite(decay) or not decay > 0:
            raise ValueError(f"GroundTruth.make: decay (feature i is present with probability ~ "
                             f"decay**i) must be a finite number > 0, got {decay!r}.")
        rng = np.random.default_rng(seed)
        feats = rng.standard_normal((n_features, d)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        p = decay ** np.arange(n_features, dtype=np.float64)
        p = np.minimum(avg_active * p / p.sum(), 1.0).astype(np.float32)
        return cls(feats, p, seed)

    def __post_init__(self):
        p = np.asarray(self.probabilities, np.float64)
        if p.ndim != 1 or not np.all(np.isfinite(p)) or p.min(initial=0) < 0 or p.max(initial=0) > 1:
            raise ValueError("GroundTruth.probabilities must be a [feature] vector of "
                             "probabilities in [0, 1] (no NaN).")
        if not np.any(p > 0):
            raise ValueError("GroundTruth.probabilities are all 0: every sample would be zero.")
        if np.asarray(self.features).shape != (p.shape[0], np.asarray(self.features).shape[-1]):
            raise ValueError(f"GroundTruth.features must be [feature={p.shape[0]}, d], got "
                             f"{np.asarray(self.features).shape}.")

    def coefficients(self, step: Array, batch_size: int) -> Float[Array, "batch feature"]:
        """The true feature coefficients of the batch for ``step`` (pure, jit-able)."""
        n = self.probabilities.shape[0]
        u = uniform_from_counter(jnp.uint32(self.seed * 2654435761 % 2**32), step, (batch_size, n))
        p = jnp.asarray(self.probabilities)[None, :]  # [1, feature]
        return jnp.where(u < p, u / p, jnp.float32(0.0))  # [batch, feature]

    def batch_fn(self, batch_size: int) -> Callable[[Array], Float[Array, "batch d_in"]]:
        feats = jnp.asarray(self.features)

        def fn(step):
            c = self.coefficients(step, batch_size)  # [batch, feature(true)]
            return jnp.einsum("bf,fd->bd", c, feats)  # [batch, feature] x [feature, d_in]

        return fn

    def sample(self, n: int, step: int = -1) -> np.ndarray:
        """``n`` samples [n, d_in] from a step index training never uses (default -1)."""
        return np.asarray(self.batch_fn(n)(jnp.int32(step) if step >= 0 else jnp.uint32(2**31 + 7)))


def array_batch_fn(
    x: Float[Array, "n d_in"], batch_size: int, seed: int = 0, y: Float[Array, "n d_out"] | None = None
) -> Callable:
    """batch_fn sampling rows (with replacement, counter-based) from in-memory arrays.

    Returns x[idx] (SAE) or (x[idx], y[idx]) (transcoder) for the step.
    """
    x = jnp.asarray(x, jnp.float32)
    y = None if y is None else jnp.asarray(y, jnp.float32)
    n = x.shape[0]
    if y is not None and y.shape[0] != n:
        raise ValueError(f"x and y need the same number of rows, got {n} and {y.shape[0]}.")

    def fn(step):
        return _sample_rows(x, y, jnp.uint32(seed), step, batch_size)

    return fn


def _sample_rows(x, y, seed, step, batch_size: int):
    """``batch_size`` rows of x (and y) drawn with replacement by a counter-based sampler."""
    n = x.shape[0]
    u = uniform_from_counter(seed, step, (batch_size,))  # [batch]
    idx = jnp.minimum((u * jnp.float32(n)).astype(jnp.int32), n - 1)  # [batch]
    return x[idx] if y is None else (x[idx], y[idx])


@dataclass(frozen=True, eq=False)
class RunBatches:
    """Training data of a sweep whose runs each have their OWN data (``train_sae_sweep``; e.g.
    one transcoder per layer): run r's batch at step t is ``fn(t, data_r)``, ``data_r`` the r-th
    slice of every leaf of ``data`` (a pytree whose leaves all have a leading [run] axis).
    Calling it on a step gives every run's batch, stacked: x [run, batch, d_in] (or (x, y)).
    ``data`` is an argument of the compiled program, split over devices with the runs."""

    fn: Callable
    data: object

    def __post_init__(self):
        lengths = {np.shape(leaf)[0] if np.ndim(leaf) else None
                   for leaf in jax.tree_util.tree_leaves(self.data)}
        if len(lengths) != 1 or None in lengths:
            raise ValueError(f"RunBatches.data: every leaf needs the same leading [run] axis; "
                             f"got leading sizes {sorted(lengths, key=str)}.")

    @property
    def n_runs(self) -> int:
        return int(np.shape(jax.tree_util.tree_leaves(self.data)[0])[0])

    def __call__(self, step):
        return _draw_runs(self.fn, step, self.data)


def _draw_runs(fn: Callable, step, data):
    """Every run's batch at ``step`` from ``data`` (leading [run] axis): [run, batch, ...]."""
    return jax.vmap(fn, in_axes=(None, 0))(step, data)


def array_batches(
    xs: Float[Array, "run n d_in"], batch_size: int, seeds: Sequence[int],
    ys: Float[Array, "run n d_out"] | None = None,
) -> RunBatches:
    """Per-run ``array_batch_fn``s as one ``RunBatches``: run r samples rows of ``xs[r]`` (and
    ``ys[r]``) exactly as ``array_batch_fn(xs[r], batch_size, seeds[r], ys[r])`` does."""
    xs = jnp.asarray(xs, jnp.float32)
    ys = None if ys is None else jnp.asarray(ys, jnp.float32)
    if xs.ndim != 3 or (ys is not None and (ys.ndim != 3 or ys.shape[:2] != xs.shape[:2])):
        raise ValueError(f"array_batches needs xs [run, n, d_in] and ys [run, n, d_out] with the "
                         f"same run and n; got {xs.shape} and {None if ys is None else ys.shape}.")
    if len(seeds) != xs.shape[0]:
        raise ValueError(f"array_batches: {xs.shape[0]} runs but {len(seeds)} seeds.")
    data = {"x": xs, "seed": jnp.asarray(np.asarray(seeds, np.int64) % 2**32, jnp.uint32)}
    if ys is not None:
        data["y"] = ys
    return RunBatches(_rows_of_run(batch_size), data)


@functools.cache
def _rows_of_run(batch_size: int) -> Callable:
    """The ``RunBatches.fn`` of ``array_batches``: one function per batch size, so training on
    new data of the same shapes reuses the compiled programs (the data are their argument)."""
    def fn(step, d):
        return _sample_rows(d["x"], d.get("y"), d["seed"], step, batch_size)
    return fn


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class SAEResult:
    """Trained params plus per-step history (each [step]) and the resampling log."""

    params: Params
    cfg: SAEConfig
    history: dict  # "loss", "mse", "penalty", "l0", "dead_fraction" -> np.ndarray [step]
    resampled: list  # [(step, n_dead_resampled)]


def _split(batch, transcoder: bool):
    if transcoder:
        if not isinstance(batch, tuple) or len(batch) != 2:
            raise ValueError("a transcoder's batch_fn must return (x [batch, d_in], y [batch, d_out]).")
        return batch
    if isinstance(batch, tuple):
        raise ValueError("an SAE's batch_fn must return one array x [batch, d_in], not a tuple.")
    return batch, batch


def _make_chunk(cfg: SAEConfig, batch_fn: Callable, n_steps: int, opt, k_max: int, mesh=None):
    """One jitted scan of ``n_steps`` steps for a stack of runs [run, ...] that differ only in
    their sparsity knob: each step draws ONE batch (shared by every run) and vmaps the update;
    or, for a ``RunBatches``, each run's own batch [run, batch, ...] from its slice of the
    data (an argument, in_axes 0). With a ``mesh``, each device runs its slice of the runs (and
    of their data; tinyinterp.sweeps)."""
    tc = cfg.is_transcoder

    def one_run(params, opt_state, fired, knob, x, y):
        (loss, (mse, penalty, f)), grads = jax.value_and_grad(sweep_loss_fn, has_aux=True)(
            params, x, y, knob, cfg, k_max
        )
        grads = {**grads, "W_dec": remove_parallel_grad(params["W_dec"], grads["W_dec"])}
        updates, opt_state = opt.update(grads, opt_state, params)
        params = normalize_decoder(optax.apply_updates(params, updates))
        active = f > 0  # [batch, feature]
        fired = fired + jnp.sum(active, axis=0, dtype=jnp.int32)  # [feature]
        l0 = jnp.mean(jnp.sum(active, axis=-1, dtype=jnp.int32).astype(jnp.float32))
        dead = jnp.mean((fired == 0).astype(jnp.float32))
        return params, opt_state, fired, (loss, mse, penalty, l0, dead)

    if isinstance(batch_fn, RunBatches):
        run_fn = batch_fn.fn  # not batch_fn: the compiled code is cached, the data must not be

        def chunk(params, opt_state, fired, knobs, data, start):
            def step_fn(carry, t):
                params, opt_state, fired = carry
                x, y = _split(_draw_runs(run_fn, t, data), tc)  # [run, batch, d_in], [run, batch, d_out]
                params, opt_state, fired, stats = jax.vmap(one_run)(
                    params, opt_state, fired, knobs, x, y)
                return (params, opt_state, fired), stats  # stats: 5 x [run]

            steps = start + jnp.arange(n_steps, dtype=jnp.int32)  # [step]
            return jax.lax.scan(step_fn, (params, opt_state, fired), steps)

        return sweeps.compile_sweep(chunk, mesh, in_axes=(0, 0, 0, 0, 0, None), out_axes=(0, 1))

    def step_fn(carry, t):
        params, opt_state, fired, knobs = carry
        x, y = _split(batch_fn(t), tc)  # [batch, d_in], [batch, d_out]: shared by every run
        params, opt_state, fired, stats = jax.vmap(one_run, in_axes=(0, 0, 0, 0, None, None))(
            params, opt_state, fired, knobs, x, y)
        return (params, opt_state, fired, knobs), stats  # stats: 5 x [run]

    def chunk(params, opt_state, fired, knobs, start):
        steps = start + jnp.arange(n_steps, dtype=jnp.int32)  # [step]
        (params, opt_state, fired, _), stats = jax.lax.scan(
            step_fn, (params, opt_state, fired, knobs), steps)
        return (params, opt_state, fired), stats  # stats: 5 x [step, run]

    return sweeps.compile_sweep(chunk, mesh, in_axes=(0, 0, 0, 0, None), out_axes=(0, 1))


def _cluster_picks(resid, sq, cfg: SAEConfig):
    """Resampling directions from clusters of high-loss residuals.

    A single high-loss input's residual mixes every error in it; a direction the dictionary
    misses recurs in the residuals of many inputs. Among the ``resample_candidates`` highest-loss
    inputs, each candidate's cluster is the candidates whose residual has cosine >
    ``resample_cluster_cos`` with its own; clusters are picked greedily by the loss they hold
    (a picked cluster's members are not picked again while unclustered candidates remain), and a
    pick's direction is its cluster's summed residual. Returns (input index [cand] into the
    pool, unit direction [cand, d_out]) in pick order.
    """
    k = min(cfg.resample_candidates, sq.shape[0])
    top_sq, top = jax.lax.top_k(sq, k)  # [cand]
    r = resid[top]  # [cand, d_out]
    u = r / jnp.maximum(jnp.linalg.norm(r, axis=-1, keepdims=True), jnp.float32(1e-12))
    member = jnp.einsum("cd,ed->ce", u, u) > jnp.float32(cfg.resample_cluster_cos)  # [cand, cand]
    mass = jnp.einsum("ce,e->c", member.astype(jnp.float32), top_sq)  # [cand]: loss held

    def step(state, _):
        picked, covered = state  # [cand] bool each
        key = jnp.where(covered, mass - jnp.float32(1e9), mass)
        i = jnp.argmax(jnp.where(picked, -jnp.inf, key))
        return (picked.at[i].set(True), covered | member[i]), i

    init = (jnp.zeros((k,), bool), jnp.zeros((k,), bool))
    _, order = jax.lax.scan(step, init, None, length=k)  # [cand]
    d = jnp.einsum("ce,ed->cd", member[order].astype(jnp.float32), r)  # [cand, d_out]
    d = d / jnp.maximum(jnp.linalg.norm(d, axis=-1, keepdims=True), jnp.float32(1e-12))
    return top[order], d


def _make_resample(cfg: SAEConfig, batch_fn: Callable, opt, mesh=None):
    """A jitted resampling of a stack of runs [run, ...]: one candidate pool (shared) scored by
    each run's SAE, then the per-run resampling vmapped; for a ``RunBatches``, each run's pool
    drawn from its own data (an argument, in_axes 0)."""
    tc = cfg.is_transcoder

    def one_run(params, opt_state, fired, key, window_samples, x, y):
        dead = fired.astype(jnp.float32) < jnp.float32(cfg.dead_frequency) * window_samples
        W = params["W_dec"]  # [feature, d_out]
        cos = jnp.einsum("fd,gd->fg", W, W)  # [feature, feature(other)]
        idx = jnp.arange(cfg.d_sae)
        more_active = (fired[None, :] > fired[:, None]) | (
            (fired[None, :] == fired[:, None]) & (idx[None, :] < idx[:, None])
        )  # [feature, other]: the other latent is kept in preference to this one
        duplicate = jnp.any((cos > jnp.float32(cfg.duplicate_cos)) & more_active, axis=1)
        dead = dead | duplicate  # [feature]
        pred, _ = forward(params, x, tc, cfg=cfg)
        resid = y - pred  # [pool*batch, d_out]
        sq = jnp.sum(resid**2, axis=-1)  # [pool*batch]
        rank = jnp.cumsum(dead.astype(jnp.int32)) - 1  # [feature]: r for the r-th dead latent
        if cfg.resample_cluster_cos > 0:
            order, cluster_dir = _cluster_picks(resid, sq, cfg)  # [cand], [cand, d_out]
            slot = jnp.clip(rank, 0, order.shape[0] - 1)  # [feature]
            pick = order[slot]  # [feature]
            direction = cluster_dir[slot]  # [feature, d_out]
        else:
            logits = jnp.log(jnp.maximum(sq**2, jnp.float32(1e-30)))  # p ~ loss^2
            # Sample without replacement (Gumbel top-k), so no two resampled latents share an
            # input (they would be born duplicates): the r-th dead latent takes the r-th input.
            gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)  # [pool*batch]
            order = jnp.argsort(-(logits + gumbel))  # [pool*batch]
            pick = order[jnp.clip(rank, 0, order.shape[0] - 1)]  # [feature]
            direction = resid[pick]  # [feature, d_out]
        direction = direction / jnp.maximum(
            jnp.linalg.norm(direction, axis=-1, keepdims=True), jnp.float32(1e-12)
        )
        enc_norms = jnp.linalg.norm(params["W_enc"], axis=0)  # [feature]
        n_alive = jnp.maximum(jnp.sum(~dead), 1)
        alive_mean = jnp.sum(jnp.where(dead, 0.0, enc_norms)) / n_alive.astype(jnp.float32)
        alive_mean = jnp.where(jnp.any(~dead), alive_mean, jnp.float32(1.0))
        if tc:  # the encoder reads the input space: use the picked input itself
            enc_dir = x[pick] / jnp.maximum(
                jnp.linalg.norm(x[pick], axis=-1, keepdims=True), jnp.float32(1e-12)
            )  # [feature, d_in]
        else:
            enc_dir = direction
        # Threshold: the new latent fires on inputs at least ``resample_threshold`` as aligned
        # with its direction as the input it was made from (0 = Bricken et al.'s b_enc = 0).
        x_in = x[pick] if tc else x[pick] - params["b_dec"][None, :]  # [feature, d_in]
        chosen_pre = (0.2 * alive_mean) * jnp.sum(x_in * enc_dir, axis=-1)  # [feature]
        new_b_enc = -jnp.float32(cfg.resample_threshold) * jnp.maximum(chosen_pre, 0.0)
        new = {
            "W_dec": jnp.where(dead[:, None], direction, params["W_dec"]),
            "W_enc": jnp.where(dead[None, :], (0.2 * alive_mean) * enc_dir.T, params["W_enc"]),
            "b_enc": jnp.where(dead, new_b_enc, params["b_enc"]),
            "b_dec": params["b_dec"],
        }
        masks = {
            "W_dec": dead[:, None],
            "W_enc": dead[None, :],
            "b_enc": dead,
            "b_dec": jnp.zeros(params["b_dec"].shape, bool),
        }
        feature_axis = {"W_dec": 0, "W_enc": 1, "b_enc": 0}
        if "log_threshold" in params:  # JumpReLU: a resampled latent's threshold starts afresh
            new["log_threshold"] = jnp.where(
                dead, jnp.float32(np.log(cfg.jumprelu_init_threshold)), params["log_threshold"])
            masks["log_threshold"] = dead
            feature_axis["log_threshold"] = 0

        def fill_nu(nu):
            # Adam's bias correction is global, not per entry: a second moment reset to 0 makes
            # a resampled latent's next hundreds of updates ~3-6x lr (m / sqrt(v) with v still
            # warming up), which throws the fresh latent off its direction. Start it from the
            # mean second moment of the kept latents instead.
            out = {}
            for name, v in nu.items():
                if name not in feature_axis:
                    out[name] = v
                    continue
                k = masks[name]
                axis = feature_axis[name]
                keep = ~k
                n_keep = jnp.maximum(jnp.sum(keep, axis=axis, keepdims=True), 1).astype(v.dtype)
                mean = jnp.sum(jnp.where(keep, v, jnp.zeros_like(v)), axis=axis, keepdims=True)
                out[name] = jnp.where(k, mean / n_keep, v)
            return out

        def reset(state):  # Adam moments of resampled entries: see SAEConfig.resample_nu
            if isinstance(state, optax.ScaleByAdamState):
                zero = lambda m: jax.tree_util.tree_map(  # noqa: E731
                    lambda a, k: jnp.where(k, jnp.zeros_like(a), a), m, masks
                )
                nu = fill_nu(state.nu) if cfg.resample_nu == "alive_mean" else zero(state.nu)
                return state._replace(mu=zero(state.mu), nu=nu)
            return state

        opt_state = jax.tree_util.tree_map(
            reset, opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)
        )
        return new, opt_state, jnp.sum(dead)

    def pool(draw, start, axis):
        xs, ys = [], []
        for i in range(cfg.resample_pool):  # fresh candidate batches (step indices < 0 unused)
            x, y = _split(draw(-(start + 1) * cfg.resample_pool - i), tc)
            xs.append(x)
            ys.append(y)
        return jnp.concatenate(xs, axis=axis), jnp.concatenate(ys, axis=axis)

    if isinstance(batch_fn, RunBatches):
        run_fn = batch_fn.fn  # not batch_fn: the compiled code is cached, the data must not be

        def resample_own(params, opt_state, fired, keys, data, start, window_samples):
            # [run, pool*batch, d_in], [run, pool*batch, d_out]: each run's pool from its data
            x, y = pool(functools.partial(_draw_runs, run_fn, data=data), start, axis=1)
            return jax.vmap(one_run, in_axes=(0, 0, 0, 0, None, 0, 0))(
                params, opt_state, fired, keys, window_samples, x, y)

        return sweeps.compile_sweep(resample_own, mesh, in_axes=(0, 0, 0, 0, 0, None, None))

    def resample(params, opt_state, fired, keys, start, window_samples):
        x, y = pool(batch_fn, start, axis=0)  # [pool*batch, d_in], [pool*batch, d_out]: shared
        return jax.vmap(one_run, in_axes=(0, 0, 0, 0, None, None, None))(
            params, opt_state, fired, keys, window_samples, x, y)

    return sweeps.compile_sweep(resample, mesh, in_axes=(0, 0, 0, 0, None, None))


# Compiled chunk / resample functions per batch_fn object (weakly held), so repeated training on
# the same data source does not recompile.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(batch_fn, key, make):
    # RunBatches: the data are an argument of the compiled code, so its function is the key
    owner = batch_fn.fn if isinstance(batch_fn, RunBatches) else batch_fn
    try:
        table = _COMPILED.setdefault(owner, {})
    except TypeError:  # not weak-referenceable: no caching
        return make()
    if key not in table:
        table[key] = make()
    return table[key]


def _lr_schedule(cfg: SAEConfig):
    """lr x a linear warm-up over the first ``lr_warmup_fraction`` of the steps (from lr /
    warmup_steps at step 0) x a linear decay to 0 over the last ``lr_decay_fraction``."""
    decay_steps = max(int(cfg.n_steps * cfg.lr_decay_fraction), 1)
    warmup_steps = int(cfg.n_steps * cfg.lr_warmup_fraction)
    decays = cfg.lr_decay_fraction > 0 and cfg.n_steps - decay_steps >= 0
    if not decays and warmup_steps == 0:
        return cfg.lr

    def schedule(count):
        c = count.astype(jnp.float32)
        lr = jnp.float32(cfg.lr)
        if decays:
            lr = lr * jnp.clip((jnp.float32(cfg.n_steps) - c) / jnp.float32(decay_steps), 0.0, 1.0)
        if warmup_steps:
            lr = lr * jnp.clip((c + 1.0) / jnp.float32(warmup_steps), 0.0, 1.0)
        return lr

    return schedule


def _shared_config(cfgs: Sequence[SAEConfig]) -> SAEConfig:
    """The settings every run of a sweep shares (the sparsity knobs set to the first run's), or a
    clear error naming what differs."""
    if not cfgs:
        raise ValueError("train_sae_sweep needs at least one SAEConfig.")
    for c in cfgs:
        if not isinstance(c, SAEConfig):
            raise TypeError(f"train_sae_sweep needs SAEConfigs, got {type(c).__name__}.")
    base = cfgs[0]
    neutral = {f: getattr(base, f) for f in SWEEP_FIELDS}
    for i, c in enumerate(cfgs[1:], 1):
        if c.replace(**neutral) != base:
            diff = [f for f in c.__dataclass_fields__ if f not in SWEEP_FIELDS
                    and getattr(c, f) != getattr(base, f)]
            raise ValueError(f"train_sae_sweep: run {i} differs from run 0 in {diff}; the runs of "
                             f"one sweep may differ only in {SWEEP_FIELDS} (train other settings "
                             "as separate sweeps).")
    return base


def train_sae_sweep(
    cfgs: Sequence[SAEConfig],
    keys: Sequence[jax.Array] | jax.Array,
    batch_fn: Callable,
    *,
    params: Params | None = None,
    progress: Callable[[int, dict, Params], None] | None = None,
    devices: sweeps.Devices = None,
) -> list[SAEResult]:
    """Train several SAEs that differ only in their sparsity knob (``l1_coefficient``,
    ``l0_coefficient`` or ``k``) as ONE compiled, batched program: the runs are stacked on a
    leading axis and every step's batch ``batch_fn(step)`` is drawn once and shared.

    ``keys``: one PRNG key per run (initialisation; run i equals ``train_sae(cfgs[i], keys[i],
    batch_fn)``, to float32 rounding). ``batch_fn``: one batch shared by every run, or a
    ``RunBatches`` (e.g. ``array_batches``): each run its own data, run i then equal to
    ``train_sae(cfgs[i], keys[i], <run i's batch_fn>)`` (e.g. per-layer transcoders, trained
    as one program: ``tinyinterp.transcoders.train_transcoders``). ``params``: optional start for
    every run (stacked [run, ...] or one set broadcast). ``progress(step, last_stats, params)``
    after every chunk (stats [run]). Returns one ``SAEResult`` per run, in order. ``devices`` (a
    count, a Mesh or a list of devices) splits the runs (and their own data) over several
    devices or hosts (``tinyinterp.sweeps``); each run trains as on one device.
    """
    cfg = _shared_config(list(cfgs))
    n_runs = len(cfgs)
    keys = list(keys) if not isinstance(keys, jax.Array) or keys.ndim else [keys]
    if len(keys) != n_runs:
        raise ValueError(f"train_sae_sweep: {n_runs} configs but {len(keys)} keys.")
    own = isinstance(batch_fn, RunBatches)  # each run its own data
    if own and batch_fn.n_runs != n_runs:
        raise ValueError(f"train_sae_sweep: {n_runs} configs but the RunBatches hold data for "
                         f"{batch_fn.n_runs} runs.")
    k_max = max(1, max(c.k for c in cfgs))
    knobs = {
        "coefficient": jnp.asarray([c.l0_coefficient if c.architecture == "jumprelu"
                                    else c.l1_coefficient for c in cfgs], jnp.float32),
        "k": jnp.asarray([max(c.k, 1) for c in cfgs], jnp.int32),
    }  # each [run]
    opt = standard_promotion(optax.adam(_lr_schedule(cfg)))
    if params is None:
        _, y0 = _split(batch_fn(jnp.int32(0)), cfg.is_transcoder)  # [(run,) batch, d_out]
        b_dec = [jnp.mean(y0[r] if own else y0, axis=0) for r in range(n_runs)]
        params = jax.tree_util.tree_map(
            lambda *a: jnp.stack(a), *[init_params(cfg, k, b_dec=b) for k, b in zip(keys, b_dec,
                                                                                  strict=True)])
    else:
        ref = init_params(cfg, jax.random.key(0))
        if set(params) != set(ref):
            raise ValueError(f"params have keys {sorted(params)}, expected {sorted(ref)} for "
                             f"architecture {cfg.architecture!r}.")
        params = {n: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n_runs,) + ref[n].shape)
                  if jnp.ndim(v) == ref[n].ndim else jnp.asarray(v, jnp.float32)
                  for n, v in params.items()}
        for n, v in params.items():
            if v.shape != (n_runs,) + ref[n].shape:
                raise ValueError(f"params[{n!r}] has shape {v.shape}; expected {ref[n].shape} "
                                 f"or {(n_runs,) + ref[n].shape}.")
    opt_state = jax.vmap(opt.init)(params)
    fired = jnp.zeros((n_runs, cfg.d_sae), jnp.int32)  # activations since the last resampling
    mesh = sweeps.sweep_mesh(devices)
    keys = keys + keys[-1:] * (sweeps.padded_length(n_runs, mesh) - n_runs)  # padded runs
    params, opt_state, fired, knobs = sweeps.put(
        sweeps.pad((params, opt_state, fired, knobs), mesh), mesh)
    data = (sweeps.put(sweeps.pad(batch_fn.data, mesh), mesh),) if own else ()  # [run, ...]
    names = ("loss", "mse", "penalty", "l0", "dead_fraction")
    hist = {k: [] for k in names}
    resampled: list[list] = [[] for _ in range(n_runs)]
    # chunk boundaries at every resampling step
    stops = set(range(cfg.chunk_size, cfg.n_steps, cfg.chunk_size)) | {cfg.n_steps}
    last_resample = int(cfg.n_steps * cfg.resample_until)
    if cfg.resample_every:
        stops |= set(range(cfg.resample_every, last_resample + 1, cfg.resample_every))
    stops = sorted(s for s in stops if 0 < s <= cfg.n_steps)
    # the compiled code depends on the shared settings (not the knob values, which are traced)
    ckey = (tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                  if f.name not in SWEEP_FIELDS), k_max, len(keys), mesh)
    resample_fn = (
        _compiled(batch_fn, (ckey, "resample"), lambda: _make_resample(cfg, batch_fn, opt, mesh))
        if cfg.resample_every
        else None
    )
    done = 0
    last = 0
    for stop in stops:
        n = stop - done
        chunk = _compiled(batch_fn, (ckey, n), lambda n=n: _make_chunk(cfg, batch_fn, n, opt, k_max, mesh))
        (params, opt_state, fired), stats = chunk(params, opt_state, fired, knobs, *data,
                                                  jnp.int32(done))
        for k, v in zip(names, sweeps.fetch(stats, n_runs, axis=1), strict=True):
            hist[k].append(v)  # [step, run]
        done = stop
        bad = ~np.all(np.isfinite(hist["loss"][-1]), axis=0)  # [run]
        if bad.any():
            raise FloatingPointError(
                f"SAE training loss became non-finite before step {done} in run(s) "
                f"{np.nonzero(bad)[0].tolist()}; lower lr ({cfg.lr}) or check the data for NaN/inf."
            )
        if resample_fn is not None and done % cfg.resample_every == 0 and done <= last_resample:
            window = (done - last) * cfg.batch_size
            run_keys = sweeps.put(jnp.stack([jax.random.fold_in(k, done) for k in keys]), mesh)
            params, opt_state, n_dead = resample_fn(
                params, opt_state, fired, run_keys, *data, jnp.int32(done), jnp.float32(window),
            )
            for r, nd in enumerate(sweeps.fetch(n_dead, n_runs)):
                resampled[r].append((done, int(nd)))
            last = done
            fired = jnp.zeros_like(fired)
        if progress is not None:
            progress(done, {k: np.asarray(v[-1][-1]) for k, v in hist.items()}, params)
    history = {k: (np.concatenate(v) if v else np.zeros((0, n_runs), np.float32))
               for k, v in hist.items()}  # each [step, run]
    if mesh is not None:  # back to host arrays, the padding dropped
        params = jax.tree_util.tree_map(jnp.asarray, sweeps.fetch(params, n_runs))
    return [SAEResult({n: v[r] for n, v in params.items()}, c,
                      {k: history[k][:, r] for k in names}, resampled[r])
            for r, c in enumerate(cfgs)]


def train_sae(
    cfg: SAEConfig,
    key: jax.Array,
    batch_fn: Callable,
    *,
    params: Params | None = None,
    progress: Callable[[int, dict, Params], None] | None = None,
) -> SAEResult:
    """Train an SAE (or transcoder) on ``batch_fn(step)`` for ``cfg.n_steps`` steps.

    ``batch_fn``: pure jax function int32 step -> x [batch, d_in] (SAE) or (x, y) (transcoder);
    traced once per chunk. ``b_dec`` starts at the mean of the first batch's target unless
    ``params`` are given. Deterministic in (cfg, key, batch_fn). ``progress(step, last_stats,
    params)`` is called after every chunk if given. A sweep of one (``train_sae_sweep``).
    """
    if progress is not None:
        user = progress

        def progress(step, stats, p):  # noqa: F811 - unstack the single run
            user(step, {k: float(v[0]) for k, v in stats.items()},
                 {n: v[0] for n, v in p.items()})

    return train_sae_sweep([cfg], [key], batch_fn, params=params, progress=progress)[0]


# --------------------------------------------------------------------------------------------
# Metrics


_jit_forward = jax.jit(forward, static_argnums=2, static_argnames="cfg")


def metrics(
    params: Params,
    x: Float[Array, "n d_in"],
    y: Float[Array, "n d_out"] | None = None,
    *,
    batch_size: int = 4096,
    cfg: SAEConfig | None = None,
) -> dict:
    """L0, MSE (mean_n ||y - y_hat||^2), fraction of variance explained, dead fraction.

    ``y`` None: an SAE evaluated on reconstructing x. Dead = never active on these ``n`` inputs.
    ``cfg``: the SAE's config (needed for TopK and JumpReLU; None = ReLU). Evaluated in
    batches; returns python floats.
    """
    transcoder = y is not None
    x = jnp.asarray(x, jnp.float32)
    y = x if y is None else jnp.asarray(y, jnp.float32)
    n = x.shape[0]
    sq_err = 0.0
    l0 = 0.0
    fired = np.zeros((params["W_dec"].shape[0],), bool)
    for s in range(0, n, batch_size):
        pred, f = _jit_forward(params, x[s : s + batch_size], transcoder, cfg=cfg)
        sq_err += float(jnp.sum((y[s : s + batch_size] - pred) ** 2))
        active = np.asarray(f > 0)  # [batch, feature]
        l0 += float(active.sum())
        fired |= active.any(axis=0)
    total_var = float(jnp.sum((y - jnp.mean(y, axis=0, keepdims=True)) ** 2))
    return {
        "l0": l0 / n,
        "mse": sq_err / n,
        "fraction_variance_explained": 1.0 - sq_err / total_var if total_var > 0 else float("nan"),
        "dead_fraction": float(1.0 - fired.mean()),
    }


def mmcs(
    true_features: Float[Array, "n_true d"], learned: Float[Array, "n_learned d"]
) -> tuple[float, np.ndarray]:
    """Mean max cosine similarity (Sharkey et al.): mean over the true features of the largest
    (signed) cosine with any learned feature.

    Returns (mmcs, per-true-feature max cosine [n_true]). Decoder rows are the learned features.
    """
    a = np.asarray(true_features, np.float64)
    b = np.asarray(learned, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = a @ b.T  # [n_true, d] x [d, n_learned] -> [n_true, n_learned]
    best = cos.max(axis=1)
    return float(best.mean()), best


# --------------------------------------------------------------------------------------------
# Activations from a model


def collect_activations(
    model,
    token_source: Callable[[jax.Array], Int[Array, "batch pos"]] | Iterable,
    hook_name: str,
    n_tokens: int,
    batch_size: int,
    *,
    key: jax.Array | None = None,
) -> Float[Array, "n_tokens ..."]:
    """Activations at ``hook_name`` for ``n_tokens`` token positions, one model batch at a time.

    model: anything with ``model.run_with_cache(tokens, names_filter=[hook_name])`` returning
    ``(logits, cache)`` with ``cache[hook_name]`` of shape [batch, pos, ...] (a HookedTransformer).
    token_source: either a callable ``key -> int32 tokens [batch_size, pos]`` (called with
    ``fold_in(key, i)`` for batch i; ``key`` defaults to ``jax.random.key(0)``; e.g.
    ``lambda k: jax.random.randint(k, (64, cfg.n_ctx), 0, cfg.d_vocab)``), or an iterable
    yielding int32 token arrays [rows, pos] (rows of one array are fed ``batch_size`` at a time).
    Batch and position axes are
    flattened: the result is [n_tokens, ...] (e.g. [n_tokens, d_model]) as a numpy float32 array.
    Only one batch's cache (restricted to ``hook_name``) is alive at any time.
    """
    if n_tokens < 1 or batch_size < 1:
        raise ValueError(f"n_tokens and batch_size must be >= 1, got {n_tokens}, {batch_size}.")
    if callable(token_source):
        key = jax.random.key(0) if key is None else key

        def batches():
            i = 0
            while True:
                yield token_source(jax.random.fold_in(key, i))
                i += 1

        source = batches()
    else:

        def rebatched():
            for arr in token_source:
                arr = jnp.asarray(arr)
                for s in range(0, max(arr.shape[0], 1), batch_size):
                    yield arr[s : s + batch_size]

        source = rebatched()
    out = None
    filled = 0
    while filled < n_tokens:
        try:
            tokens = next(source)
        except StopIteration:
            raise ValueError(
                f"token_source ran out after {filled} of the {n_tokens} requested tokens; "
                "give a longer iterable, a callable, or ask for fewer tokens."
            ) from None
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"token batches must be int [batch, pos], got {tokens.dtype} {tuple(tokens.shape)}."
            )
        if callable(token_source) and tokens.shape[0] != batch_size:
            raise ValueError(
                f"token_source(key) returned {tokens.shape[0]} rows, expected batch_size={batch_size}."
            )
        _, cache = model.run_with_cache(tokens, names_filter=[hook_name])
        act = np.asarray(cache[hook_name], dtype=np.float32)  # [batch, pos, *rest]
        del cache
        act = act.reshape((-1,) + act.shape[2:])  # [batch * pos, *rest]
        if out is None:
            out = np.empty((n_tokens,) + act.shape[1:], np.float32)
        take = min(act.shape[0], n_tokens - filled)
        out[filled : filled + take] = act[:take]
        filled += take
    return out
