"""Toy models of superposition (Elhage et al. 2022), many independent instances trained at once.

Axis vocabulary (used in every shape below):

    instance   independent toy models trained side by side (vmap axis)
    feature    input/output features, ``n_features`` of them (the paper's n)
    hidden     the bottleneck, ``n_hidden`` dimensions (the paper's m)
    batch      samples in one optimisation step

Models (one instance; the weights are right-multiplied as everywhere in tinyinterp)::

    h  = x @ W                      x [batch, feature], W [feature, hidden] -> h [batch, hidden]
    x' = ReLU(h @ W.T + b)          (ReLU output model)
    x' = h @ W.T + b                (linear model, ``linear=True``)
    loss = mean_batch sum_feature importance * (x - x')**2

Data: each feature is 0 with probability ``S`` (sparsity) and otherwise uniform on [0, 1);
``feature_probability = 1 - S``. Importance and feature probability are given per instance.

Training follows the reference notebook: xavier-normal ``W`` (see "Init scale" below), ``b = 0``,
AdamW (lr 1e-3, torch's default weight decay 0.01), batch 1024, 10,000 steps. All instances are
trained in one jitted function: ``jax.vmap`` over the instance axis of a single-instance step,
``lax.scan`` over a chunk of steps, a Python loop over chunks (the step works on the batch
transposed, [feature, batch], which is faster on CPU). The batch for step ``t`` of an instance
depends only on that instance's key and ``t``, so results do not depend on the chunk size, on
which other instances are trained alongside (for a given init std: the default std depends on
``n_instances``, as the notebook's does), or on whether training was split into several calls
(see ``continue_training``).

Init scale: the notebook calls torch's ``nn.init.xavier_normal_`` on its whole
[instance, feature, hidden] tensor. torch's ``_calculate_fan_in_and_fan_out`` treats a 3-d tensor
like a conv kernel: fan_in = size(1) * size(2) = n_features * n_hidden and fan_out = size(0) *
size(2) = n_instances * n_hidden, so std = sqrt(2 / ((n_features + n_instances) * n_hidden))
(``notebook_init_std``; 0.021 at n=200, m=20, 20 instances) -- not the per-matrix
sqrt(2 / (n_features + n_hidden)) (0.095 there). ``ToyModelConfig.init_std`` sets the std; None
(the default) means the notebook's formula with ``n_instances``. Set it explicitly (e.g.
``xavier_init_std``) to make an instance's init independent of how many instances are trained
alongside; ``tinyinterp reproduce superposition`` does (see its settings for why).

Random data comes from a counter-based integer hash (``uniform_from_counter``), not threefry: the
data stream is the dominant cost on CPU and the hash is ~10x cheaper while being exactly as
deterministic and vmap-invariant (it is plain integer arithmetic on (seed, step, position)).

Metrics (all on ``W [..., feature, hidden]``; any leading axes such as ``instance``):

    feature_norms            ||W_i||
    represented_count        #{i : ||W_i|| > 0.5}
    interference             sum_{j != i} (W_i_hat . W_j)^2
    feature_dimensionality   D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2
    dimensions_per_feature   m / ||W||_F^2
    fraction_clusters        how many D_i sit near each sticky fraction, against the adjacent windows
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, UInt32

from tinyinterp import sweeps
from tinyinterp.train import standard_promotion  # noqa: F401  (re-exported for tinyinterp.sae)

Params = dict  # {"W": [(instance,) feature, hidden], "b": [(instance,) feature]}

__all__ = [
    "ToyModelConfig",
    "TrainResult",
    "uniform_from_counter",
    "notebook_init_std",
    "xavier_init_std",
    "init_instance",
    "init_params",
    "instance_keys",
    "generate_batch",
    "forward",
    "instance_loss",
    "train",
    "train_single",
    "continue_training",
    "feature_norms",
    "represented_count",
    "interference",
    "feature_dimensionality",
    "dimensions_per_feature",
    "STICKY_FRACTIONS",
    "fraction_clusters",
    "feature_probability_schedule",
    "importance_schedule",
]


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ToyModelConfig:
    """Shape of the toy model and how it is trained (defaults: the reference notebook)."""

    n_features: int = 5
    n_hidden: int = 2
    n_instances: int = 10
    linear: bool = False  # x' = W^T W x + b instead of ReLU(W^T W x + b)
    n_steps: int = 10_000
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which the notebook uses
    chunk_size: int = 1000  # steps per jitted lax.scan; Python overhead is paid once per chunk
    # "constant" (the notebook) or "cosine": lr decays as a half cosine from ``lr`` at step 0 to
    # ``lr * lr_final`` at step ``n_steps`` (and stays there); a decayed lr lets the geometry settle
    lr_schedule: str = "constant"
    lr_final: float = 0.0
    # std of the normal init of W; None: the notebook's xavier_normal_ over the joint
    # [instance, feature, hidden] tensor, ``notebook_init_std(n_features, n_hidden, n_instances)``
    init_std: float | None = None

    def __post_init__(self):
        for name in ("n_features", "n_hidden", "n_instances", "batch_size", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ToyModelConfig.{name} must be a positive int, got {value!r}.")
        if not isinstance(self.n_steps, int) or self.n_steps < 0:
            raise ValueError(f"ToyModelConfig.n_steps must be an int >= 0, got {self.n_steps!r}.")
        if not (self.lr > 0):
            raise ValueError(f"ToyModelConfig.lr must be > 0, got {self.lr!r}.")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"ToyModelConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}."
            )
        if not (0.0 <= self.lr_final <= 1.0):
            raise ValueError(f"ToyModelConfig.lr_final must be in [0, 1], got {self.lr_final!r}.")
        if self.init_std is not None and not (self.init_std >= 0 and math.isfinite(self.init_std)):
            raise ValueError(f"ToyModelConfig.init_std must be >= 0 or None, got {self.init_std!r}.")
        if self.batch_size * self.n_features >= 2**24:
            raise ValueError(
                "batch_size * n_features must be < 2**24 (the data hash counts positions within a "
                f"step in 24 bits); got {self.batch_size} * {self.n_features}. Use a smaller batch."
            )


def notebook_init_std(n_features: int, n_hidden: int, n_instances: int) -> float:
    """std of torch's ``xavier_normal_`` on an [n_instances, n_features, n_hidden] tensor.

    torch's ``_calculate_fan_in_and_fan_out`` on a tensor with more than 2 dims: fan_in =
    size(1) * prod(size(2:)) = n_features * n_hidden, fan_out = size(0) * prod(size(2:)) =
    n_instances * n_hidden; xavier std = sqrt(2 / (fan_in + fan_out)).
    """
    return math.sqrt(2.0 / ((n_features + n_instances) * n_hidden))


def xavier_init_std(n_features: int, n_hidden: int) -> float:
    """Per-matrix xavier-normal std, sqrt(2 / (n_features + n_hidden)) (one [feature, hidden] W)."""
    return math.sqrt(2.0 / (n_features + n_hidden))


def _init_std(cfg: ToyModelConfig) -> float:
    if cfg.init_std is not None:
        return float(cfg.init_std)
    return notebook_init_std(cfg.n_features, cfg.n_hidden, cfg.n_instances)


def feature_probability_schedule(n_instances: int) -> Float[Array, " instance"]:
    """The notebook's sparsity sweep: 1 - S = 20 ** -linspace(0, 1, n_instances) (1 ... 0.05)."""
    return (20.0 ** -np.linspace(0.0, 1.0, n_instances)).astype(np.float32)


def importance_schedule(n_features: int, decay: float) -> Float[Array, " feature"]:
    """importance_i = decay ** i (decay 1.0 gives uniform importance)."""
    return (decay ** np.arange(n_features)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Data


def _hash32(x: UInt32[Array, "..."]) -> UInt32[Array, "..."]:
    """'lowbias32' (C. Wellons): a bijective, well-mixing 32-bit integer hash."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    return x


def _uniform_at(seed: UInt32[Array, ""], step: Array, position: UInt32[Array, "..."]):
    """Uniform [0, 1) float32 for each (seed word, step index, position)."""
    step_word = _hash32(seed.astype(jnp.uint32) ^ _hash32(jnp.asarray(step).astype(jnp.uint32)))
    bits = _hash32(_hash32(position) ^ step_word)
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def uniform_from_counter(
    seed: UInt32[Array, ""], step: Array, shape: Sequence[int]
) -> Float[Array, "..."]:
    """Uniform [0, 1) float32 array of ``shape`` from (seed word, step index, position).

    Counter-based: element ``k`` (row-major position, k < 2**24) of step ``t`` is
    ``hash(hash(k) ^ hash(seed ^ hash(t)))``; no state is carried, so it is trivially deterministic
    and identical under vmap. Distinct steps never share a block of values (the per-position hash
    is applied before mixing in the step word).
    """
    size = math.prod(shape)
    position = jnp.arange(size, dtype=jnp.uint32).reshape(shape)  # [*shape]
    return _uniform_at(seed, step, position)


def _present(u: Float[Array, "..."], p: Float[Array, "..."]) -> Float[Array, "..."]:
    """u < p decides presence and u / p (uniform on [0, 1) given u < p) is the value."""
    return jnp.where(u < p, jnp.minimum(u / p, jnp.float32(1.0 - 2.0**-24)), jnp.float32(0.0))


def generate_batch(
    seed: UInt32[Array, ""],
    step: Array,
    feature_probability: Float[Array, " feature"],
    batch_size: int,
) -> Float[Array, "batch feature"]:
    """One instance's batch: feature i is 0 w.p. 1 - p_i, else uniform on [0, 1).

    One uniform per entry: u < p_i decides presence and u / p_i (uniform on [0, 1) given u < p_i)
    is the value.
    """
    n_features = feature_probability.shape[-1]
    u = uniform_from_counter(seed, step, (batch_size, n_features))  # [batch, feature]
    return _present(u, feature_probability[None, :])


def _generate_batch_feature_major(
    seed: UInt32[Array, ""],
    step: Array,
    feature_probability: Float[Array, " feature"],
    batch_size: int,
) -> Float[Array, "feature batch"]:
    """``generate_batch(...).T`` exactly (same positions, same values), built feature-major."""
    n_features = feature_probability.shape[-1]
    position = (jnp.arange(batch_size, dtype=jnp.uint32)[None, :] * jnp.uint32(n_features)
                + jnp.arange(n_features, dtype=jnp.uint32)[:, None])  # [feature, batch]
    u = _uniform_at(seed, step, position)  # [feature, batch]
    return _present(u, feature_probability[:, None])


# --------------------------------------------------------------------------------------------
# Model


def instance_keys(key: jax.Array, n_instances: int) -> jax.Array:
    """Per-instance keys ``fold_in(key, i)``: instance i's key does not depend on n_instances."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n_instances))


def init_instance(
    key: jax.Array, n_features: int, n_hidden: int, std: float | None = None
) -> Params:
    """One instance: W [feature, hidden] ~ N(0, std^2), b [feature] = 0.

    ``std`` None: per-matrix xavier-normal, sqrt(2 / (n_features + n_hidden)) (training passes
    the config's std, see ``ToyModelConfig.init_std``).
    """
    if std is None:
        std = xavier_init_std(n_features, n_hidden)
    W = jnp.float32(std) * jax.random.normal(
        jax.random.fold_in(key, 0), (n_features, n_hidden), jnp.float32
    )
    return {"W": W, "b": jnp.zeros((n_features,), jnp.float32)}


def init_params(cfg: ToyModelConfig, key: jax.Array) -> Params:
    """All instances: W [instance, feature, hidden], b [instance, feature]."""
    keys = instance_keys(key, cfg.n_instances)
    std = _init_std(cfg)
    return jax.vmap(lambda k: init_instance(k, cfg.n_features, cfg.n_hidden, std))(keys)


def _data_seed(instance_key: jax.Array) -> UInt32[Array, ""]:
    return jax.random.bits(jax.random.fold_in(instance_key, 1), (), jnp.uint32)


def forward(
    params: Params, x: Float[Array, "batch feature"], linear: bool = False
) -> Float[Array, "batch feature"]:
    """One instance's reconstruction x' = ReLU(x W W^T + b) (or without the ReLU when linear)."""
    W, b = params["W"], params["b"]
    h = jnp.einsum("bf,fh->bh", x, W)  # [batch, feature] x [feature, hidden] -> [batch, hidden]
    out = jnp.einsum("bh,fh->bf", h, W) + b[None, :]  # [batch, hidden] x [feature, hidden]
    return out if linear else jax.nn.relu(out)


def instance_loss(
    params: Params,
    x: Float[Array, "batch feature"],
    importance: Float[Array, " feature"],
    linear: bool = False,
) -> Float[Array, ""]:
    """mean over batch of sum_i importance_i * (x_i - x'_i)^2."""
    err = (x - forward(params, x, linear)) ** 2  # [batch, feature]
    return jnp.mean(jnp.sum(importance[None, :] * err, axis=-1))


def _instance_loss_feature_major(
    params: Params,
    xT: Float[Array, "feature batch"],
    importance: Float[Array, " feature"],
    linear: bool = False,
) -> Float[Array, ""]:
    """``instance_loss`` on the transposed batch xT [feature, batch] (equal up to float rounding).

    Training uses this layout: with the batch on the contiguous axis, XLA's CPU code for these
    small matrices (m = 1 ... 20) vectorises over the batch, and the step is 1.3x (n=200, m=20)
    to 3.5x (n=5, m=2; n=2, m=1) faster than with [batch, feature].
    """
    W, b = params["W"], params["b"]
    h = jnp.einsum("fh,fb->hb", W, xT)  # [feature, hidden] x [feature, batch] -> [hidden, batch]
    out = jnp.einsum("fh,hb->fb", W, h) + b[:, None]  # [feature, batch]
    out = out if linear else jax.nn.relu(out)
    err = (xT - out) ** 2  # [feature, batch]
    return jnp.sum(importance * jnp.mean(err, axis=-1))


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    """Trained instances. ``losses[i, t]`` is instance i's training loss at step t.

    ``params``: {"W": [instance, feature, hidden], "b": [instance, feature]}; ``opt_state`` and
    ``step`` allow ``continue_training``; ``seeds`` are the per-instance data seed words.
    """

    params: Params
    opt_state: optax.OptState
    losses: np.ndarray  # [instance, step]
    step: int
    seeds: jax.Array  # [instance] uint32
    importance: jax.Array  # [instance, feature]
    feature_probability: jax.Array  # [instance, feature]
    cfg: ToyModelConfig

    def final_loss(self, last: int = 500) -> np.ndarray:
        """Mean training loss over the last ``last`` steps, per instance [instance]."""
        return self.losses[:, -min(last, self.losses.shape[1]) :].mean(axis=1)


def _learning_rate(cfg: ToyModelConfig):
    """The lr (a float, or an optax schedule of the optimizer's step count)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return optax.cosine_decay_schedule(cfg.lr, max(cfg.n_steps, 1), alpha=cfg.lr_final)


def _optimizer(cfg: ToyModelConfig) -> optax.GradientTransformation:
    return standard_promotion(
        optax.adamw(_learning_rate(cfg), b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
    )


def _make_chunk_fn(cfg: ToyModelConfig, n_steps: int, vmapped: bool, mesh=None):
    """Jitted function running ``n_steps`` steps of one instance (or of all, vmapped; with a
    ``mesh``, each device runs its slice of the instances: tinyinterp.sweeps)."""
    opt = _optimizer(cfg)
    grad_fn = jax.value_and_grad(_instance_loss_feature_major)

    def one_instance(params, opt_state, seed, importance, prob, start):
        def step_fn(carry, t):
            params, opt_state = carry
            xT = _generate_batch_feature_major(seed, t, prob, cfg.batch_size)  # [feature, batch]
            loss, grads = grad_fn(params, xT, importance, cfg.linear)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        steps = start + jnp.arange(n_steps, dtype=jnp.int32)  # [step]
        (params, opt_state), losses = jax.lax.scan(step_fn, (params, opt_state), steps)
        return params, opt_state, losses  # losses [step]

    if vmapped:  # instance axis 0 on everything except the shared start step
        axes = (0, 0, 0, 0, 0, None)
        return sweeps.compile_sweep(jax.vmap(one_instance, in_axes=axes), mesh, in_axes=axes)
    return jax.jit(one_instance)


def _chunk_fn(cfg: ToyModelConfig, n_steps: int, vmapped: bool, mesh=None):
    # Compiled functions depend on the training-relevant fields only (not on n_instances, nor on
    # n_steps unless the lr schedule is defined over it, nor on the init).
    total = cfg.n_steps if cfg.lr_schedule != "constant" else 0
    return _cached_chunk_fn(dataclasses.replace(cfg, n_instances=1, n_steps=total, init_std=None),
                            n_steps, vmapped, mesh)


@functools.lru_cache(maxsize=32)  # bounded: a long sweep of configs does not grow it forever
def _cached_chunk_fn(cfg: ToyModelConfig, n_steps: int, vmapped: bool, mesh=None):
    return _make_chunk_fn(cfg, n_steps, vmapped, mesh)


def _run(cfg, params, opt_state, seeds, importance, prob, start, n_steps, vmapped, progress,
         mesh=None):
    losses = []
    done = 0
    while done < n_steps:
        n = min(cfg.chunk_size, n_steps - done)
        fn = _chunk_fn(cfg, n, vmapped, mesh)
        params, opt_state, chunk_losses = fn(
            params, opt_state, seeds, importance, prob, jnp.int32(start + done)
        )
        losses.append(sweeps.fetch(chunk_losses))
        done += n
        if progress is not None:
            progress(start + done)
    if not losses:
        shape = (seeds.shape[0], 0) if vmapped else (0,)
        return params, opt_state, np.zeros(shape, np.float32)
    return params, opt_state, np.concatenate(losses, axis=-1)


def _check_per_instance(name, value, cfg):
    v = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite; it has {int(np.sum(~np.isfinite(v)))} NaN/inf "
                         "entries.")
    if name == "feature_probability" and (v.min(initial=0.0) < 0 or v.max(initial=0.0) > 1):
        raise ValueError(f"feature_probability is the probability that a feature is present, so "
                         f"each entry must be in [0, 1]; got values in [{v.min():g}, {v.max():g}].")
    if name == "importance" and v.min(initial=0.0) < 0:
        raise ValueError(f"importance weights the loss per feature and must be >= 0 (a negative "
                         f"weight rewards error, and the loss goes negative); got min {v.min():g}.")
    if v.size and not np.all(np.any(v.reshape(-1, v.shape[-1]) > 0, axis=-1)):
        raise ValueError(f"{name} is 0 for every feature of an instance: its data (or loss) is "
                         "all zero and nothing can be learned; give some feature a positive value.")
    arr = jnp.asarray(value, dtype=jnp.float32)
    if arr.ndim == 1:  # shared by all instances
        arr = jnp.broadcast_to(arr[None, :], (cfg.n_instances, arr.shape[0]))
    if arr.shape != (cfg.n_instances, cfg.n_features):
        raise ValueError(
            f"{name} must have shape [feature] = ({cfg.n_features},) or [instance, feature] = "
            f"({cfg.n_instances}, {cfg.n_features}); got {tuple(arr.shape)}."
        )
    return arr


def train(
    cfg: ToyModelConfig,
    key: jax.Array,
    importance: Float[Array, "instance feature"] | Float[Array, " feature"],
    feature_probability: Float[Array, "instance feature"] | Float[Array, " feature"],
    *,
    progress=None,
    devices: sweeps.Devices = None,
) -> TrainResult:
    """Train ``cfg.n_instances`` toy models at once (one jitted vmap, lax.scan over steps).

    importance, feature_probability: [instance, feature] (or [feature], shared by all instances).
    Instance i is initialised from and fed data by ``fold_in(key, i)`` only, so it ends identical
    to ``train_single`` with that key. ``progress(step)`` is called after each chunk if given.
    ``devices`` (a count, a Mesh or a list of devices) splits the instances over several
    devices or hosts (``tinyinterp.sweeps``); each instance trains as on one device.
    """
    importance = _check_per_instance("importance", importance, cfg)
    prob = _check_per_instance("feature_probability", feature_probability, cfg)
    keys = instance_keys(key, cfg.n_instances)  # [instance]
    params = init_params(cfg, key)
    seeds = jax.vmap(_data_seed)(keys)  # [instance] uint32
    opt_state = jax.vmap(_optimizer(cfg).init)(params)
    mesh = sweeps.sweep_mesh(devices)
    state = sweeps.put(sweeps.pad((params, opt_state, seeds, importance, prob), mesh), mesh)
    params, opt_state, losses = _run(cfg, *state, 0, cfg.n_steps, True, progress, mesh)
    if mesh is not None:  # back to host arrays, the padding dropped
        params, opt_state, losses = jax.tree_util.tree_map(
            jnp.asarray, sweeps.fetch((params, opt_state, losses), cfg.n_instances))
        losses = np.asarray(losses)
    _check_finite(losses)
    return TrainResult(params, opt_state, losses, cfg.n_steps, seeds, importance, prob, cfg)


def train_single(
    cfg: ToyModelConfig,
    instance_key: jax.Array,
    importance: Float[Array, " feature"],
    feature_probability: Float[Array, " feature"],
) -> tuple[Params, np.ndarray]:
    """Train ONE instance without vmap (the reference that ``train`` is tested against).

    Returns (params {"W": [feature, hidden], "b": [feature]}, losses [step]).
    """
    params = init_instance(instance_key, cfg.n_features, cfg.n_hidden, _init_std(cfg))
    opt_state = _optimizer(cfg).init(params)
    params, _, losses = _run(
        cfg,
        params,
        opt_state,
        _data_seed(instance_key),
        jnp.asarray(importance, jnp.float32),
        jnp.asarray(feature_probability, jnp.float32),
        0,
        cfg.n_steps,
        False,
        None,
    )
    return params, losses


def continue_training(
    result: TrainResult, n_steps: int, instances: Sequence[int] | None = None
) -> TrainResult:
    """Train (a subset of) instances ``n_steps`` more steps; others are left as they are.

    Because each instance's data depend only on its key and the step index, the continued
    instances end exactly as if they had been trained ``result.step + n_steps`` steps in one go.
    The returned ``losses`` are [instance, result.step + n_steps], NaN where not trained.
    """
    idx = np.arange(result.cfg.n_instances) if instances is None else np.asarray(instances)
    take = lambda tree: jax.tree_util.tree_map(lambda a: a[idx], tree)  # noqa: E731
    params, opt_state, losses = _run(
        result.cfg,
        take(result.params),
        take(result.opt_state),
        result.seeds[idx],
        result.importance[idx],
        result.feature_probability[idx],
        result.step,
        n_steps,
        True,
        None,
    )
    _check_finite(losses)
    put = lambda full, part: full.at[idx].set(part)  # noqa: E731
    new_params = jax.tree_util.tree_map(put, result.params, params)
    new_opt = jax.tree_util.tree_map(
        lambda full, part: put(full, part) if getattr(full, "ndim", 0) > 0 else part,
        result.opt_state,
        opt_state,
    )
    all_losses = np.full((result.cfg.n_instances, result.step + n_steps), np.nan, np.float32)
    all_losses[:, : result.step] = result.losses
    all_losses[idx, result.step :] = losses
    return dataclasses.replace(
        result, params=new_params, opt_state=new_opt, losses=all_losses, step=result.step + n_steps
    )


def _check_finite(losses: np.ndarray) -> None:
    if losses.size and not np.all(np.isfinite(losses)):
        bad = np.argwhere(~np.isfinite(losses))[0]
        raise FloatingPointError(
            f"toy-model training produced a non-finite loss (first at instance/step {tuple(bad)}); "
            "lower the learning rate or check importance / feature_probability for inf or NaN."
        )


# --------------------------------------------------------------------------------------------
# Metrics (numpy-or-jax arrays in, jnp arrays out; any leading axes, e.g. instance)


def feature_norms(W: Float[Array, "*lead feature hidden"]) -> Float[Array, "*lead feature"]:
    """||W_i|| per feature."""
    return jnp.linalg.norm(jnp.asarray(W, jnp.float32), axis=-1)


def represented_count(
    W: Float[Array, "*lead feature hidden"], threshold: float = 0.5
) -> Array:
    """Number of features with ||W_i|| > threshold (the paper's 'represented'), [*lead] int32."""
    return jnp.sum(feature_norms(W) > jnp.float32(threshold), axis=-1, dtype=jnp.int32)


def _overlaps(W: Float[Array, "*lead feature hidden"], eps: float = 1e-8):
    """(W_i_hat . W_j)^2 for all i, j: [*lead, feature, feature] (rows i with ||W_i|| ~ 0 -> 0)."""
    W = jnp.asarray(W, jnp.float32)
    norms = jnp.linalg.norm(W, axis=-1)  # [*lead, feature]
    W_hat = W / jnp.maximum(norms, jnp.float32(eps))[..., None]  # [*lead, feature, hidden]
    dots = jnp.einsum("...ih,...jh->...ij", W_hat, W)  # [*lead, feature(i), feature(j)]
    return norms, dots**2


def interference(W: Float[Array, "*lead feature hidden"]) -> Float[Array, "*lead feature"]:
    """sum_{j != i} (W_i_hat . W_j)^2: how much other features leak into feature i's direction."""
    _, sq = _overlaps(W)  # [*lead, feature, feature]
    n = sq.shape[-1]
    off_diag = sq * (1.0 - jnp.eye(n, dtype=jnp.float32))  # [*lead, feature, feature]
    return jnp.sum(off_diag, axis=-1)


def feature_dimensionality(
    W: Float[Array, "*lead feature hidden"], eps: float = 1e-8
) -> Float[Array, "*lead feature"]:
    """D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2 (the j = i term is ||W_i||^2); 0 for W_i = 0.

    1 for a feature with a dedicated dimension, 1/2 for an antipodal pair, 2/3 for a triangle,
    3/4 for a tetrahedron, 2/5 for a pentagon.
    """
    norms, sq = _overlaps(W, eps)
    denom = jnp.sum(sq, axis=-1)  # [*lead, feature]
    return jnp.where(norms > eps, norms**2 / jnp.maximum(denom, jnp.float32(eps)), 0.0)


def dimensions_per_feature(W: Float[Array, "*lead feature hidden"]) -> Float[Array, "*lead"]:
    """m / ||W||_F^2 (the paper's 'dimensions per feature'; 1/2 for antipodal pairs)."""
    W = jnp.asarray(W, jnp.float32)
    n_hidden = W.shape[-1]
    return jnp.float32(n_hidden) / jnp.sum(W**2, axis=(-2, -1))


# The fractions the paper names for D_i, with the geometry that gives each (k features in d dims,
# D_i = d / k): a dedicated dimension, tetrahedron, triangle, antipodal pair (digon), pentagon,
# square antiprism.
STICKY_FRACTIONS = {"1": 1.0, "3/4": 0.75, "2/3": 2 / 3, "1/2": 0.5, "2/5": 0.4, "3/8": 0.375}
_FRACTION_SHAPES = {"1": "dedicated dimension", "3/4": "tetrahedron", "2/3": "triangle",
                    "1/2": "antipodal pair", "2/5": "pentagon", "3/8": "square antiprism"}


def fraction_clusters(
    D: np.ndarray, fractions: dict | None = None, tol: float = 0.0125, min_count: int = 5
) -> dict:
    """Count values of D (any shape, e.g. the D_i of represented features) near each fraction.

    For fraction f: ``near`` = #{|D - f| < tol}; ``below`` / ``above`` = the counts in the windows
    of the same width just below and above it, [f - 3 tol, f - tol] and [f + tol, f + 3 tol].
    ``cluster`` is True when near >= min_count and near is at least twice the mean count of the
    adjacent windows that do not overlap another fraction's window (``compared_with``; 2/5 and
    3/8 are 2 tol apart, so each is compared with its outer window only): a peak, not part of a
    smooth spread. The default tol (1/80) keeps the windows of 2/5 and 3/8 apart.
    Returns {name: {"value", "shape", "near", "below", "above", "compared_with", "cluster"}}.
    """
    fractions = STICKY_FRACTIONS if fractions is None else fractions
    D = np.asarray(D, np.float64).ravel()
    out = {}
    for name, f in fractions.items():
        d = D - f
        near = int(np.sum(np.abs(d) < tol))
        sides = {"below": int(np.sum((d >= -3 * tol) & (d <= -tol))),
                 "above": int(np.sum((d >= tol) & (d <= 3 * tol)))}
        centres = {"below": f - 2 * tol, "above": f + 2 * tol}
        usable = [side for side, c in centres.items()
                  if not any(abs(c - g) < 2 * tol for other, g in fractions.items() if other != name)]
        background = np.mean([sides[side] for side in usable]) if usable else 0.0
        out[name] = {"value": float(f), "shape": _FRACTION_SHAPES.get(name, ""), "near": near,
                     **sides, "compared_with": usable,
                     "cluster": bool(near >= min_count and near >= 2 * background)}
    return out
