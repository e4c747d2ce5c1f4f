"""Transcoders that replace a model's MLPs: per-layer (PLT) and cross-layer (CLT).

Axis vocabulary: layer (a model block), pos, d_model, feature (a transcoder's latents), n (samples).

A transcoder of source layer l reads the MLP's input at layer l (``blocks.{l}.ln2.hook_normalized``,
before the norm's weight and bias; ``blocks.{l}.hook_resid_mid`` in a model without norms) and
writes into the MLP output (``blocks.{t}.hook_mlp_out``) of its target layers t:

    per-layer   (Dunefsky et al. 2024):  t = l only
    cross-layer (Ameisen et al. 2025):   every t >= l (one decoder per later layer)

    pre_l  = x_l W_enc[l] + b_enc[l]                 [n, feature]
    a_l    = act(pre_l)                              ReLU, TopK (k per sample) or JumpReLU
    out_t  = sum_{l <= t} a_l W_dec[l][:, t - l] + b_dec[t] (+ x_t W_skip[t], Paulo et al. 2025)

Parameters, one dict per source layer (right-multiplied, as everywhere in tinyinterp)::

    W_enc [d_model, feature]  b_enc [feature]  W_dec [feature, n_targets, d_model]  b_dec [d_model]
    log_threshold [feature] (JumpReLU)          W_skip [d_model, d_model] (optional)

``n_targets`` is 1 (per-layer) or n_layers - l (cross-layer). ``b_dec[l]`` is the bias of layer
l's output. Training lives in ``train_transcoders`` (per-layer, through ``tinyinterp.sae``) and
``train_clt`` (cross-layer, with the tanh sparsity penalty of Ameisen et al.).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from tinyinterp import sae, sweeps

__all__ = ["Transcoders", "CLTConfig", "mlp_input_hook", "from_mlps", "random_transcoders",
           "collect_mlp_io", "train_transcoders", "train_clt", "replacement_logits", "evaluate"]

_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def mlp_input_hook(cfg, layer: int) -> str:
    """The hook point a transcoder of ``layer`` reads: the MLP's input before the norm's affine."""
    if cfg.normalization_type is None:
        return f"blocks.{layer}.hook_resid_mid"
    return f"blocks.{layer}.ln2.hook_normalized"


@jax.tree_util.register_pytree_node_class
class Transcoders:
    """One transcoder per MLP layer of a model (see the module docstring for the parameters).

    ``architecture``: "relu" | "topk" (``k`` active latents per sample) | "jumprelu"
    (``log_threshold`` per latent). ``cross_layer``: decoders to every later layer. Immutable; a
    pytree (the params are its leaves), so it passes through ``jax.jit``."""

    def __init__(self, params: Sequence[dict], *, architecture: str = "relu", k: int = 0,
                 cross_layer: bool = False):
        if architecture not in sae.ARCHITECTURES:
            raise ValueError(f"architecture must be one of {sae.ARCHITECTURES}, got "
                             f"{architecture!r}.")
        if architecture == "topk" and (not isinstance(k, int) or k < 1):
            raise ValueError(f"a TopK transcoder needs k >= 1 (active latents per sample), got {k!r}.")
        self.params = tuple(dict(p) for p in params)
        self.architecture, self.k, self.cross_layer = architecture, int(k), bool(cross_layer)
        n = len(self.params)
        for layer, p in enumerate(self.params):
            missing = [key for key in _KEYS if key not in p]
            if architecture == "jumprelu" and "log_threshold" not in p:
                missing.append("log_threshold")
            if missing:
                raise ValueError(f"transcoder of layer {layer} lacks {missing}; it needs "
                                 f"{list(_KEYS)} (+ log_threshold for JumpReLU, W_skip optional).")
            W_dec = p["W_dec"]
            if not hasattr(W_dec, "ndim"):  # placeholders inside JAX transformations
                continue
            want = (n - layer) if cross_layer else 1
            if W_dec.ndim != 3 or W_dec.shape[1] != want:
                raise ValueError(f"transcoder of layer {layer}: W_dec must be [feature, {want}, "
                                 f"d_model] ({'cross-layer' if cross_layer else 'per-layer'}), "
                                 f"got shape {tuple(W_dec.shape)}.")

    # -- pytree protocol: params are the leaves, the rest is static
    def tree_flatten(self):
        return (self.params,), (self.architecture, self.k, self.cross_layer)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.params = tuple(children[0])
        obj.architecture, obj.k, obj.cross_layer = aux
        return obj

    @classmethod
    def from_sae_params(cls, params: Sequence[dict], *, architecture: str = "relu", k: int = 0
                        ) -> Transcoders:
        """Per-layer transcoders from ``tinyinterp.sae`` transcoder params (W_dec [feature,
        d_model])."""
        out = []
        for p in params:
            q = {key: jnp.asarray(v, jnp.float32) for key, v in p.items()}
            if q["W_dec"].ndim == 2:
                q["W_dec"] = q["W_dec"][:, None, :]  # [feature, d_model] -> [feature, 1, d_model]
            out.append(q)
        return cls(out, architecture=architecture, k=k)

    def __repr__(self) -> str:
        kind = "cross-layer" if self.cross_layer else "per-layer"
        return (f"Transcoders({kind}, {self.architecture}, n_layers={self.n_layers}, "
                f"features={[self.n_features(i) for i in range(self.n_layers)]})")

    @property
    def n_layers(self) -> int:
        return len(self.params)

    @property
    def skip(self) -> bool:
        return any("W_skip" in p for p in self.params)

    def n_features(self, layer: int) -> int:
        return int(self.params[layer]["W_enc"].shape[1])

    def targets(self, layer: int) -> range:
        """The layers whose MLP output source layer ``layer`` writes into."""
        return range(layer, self.n_layers) if self.cross_layer else range(layer, layer + 1)

    def replace(self, params: Sequence[dict]) -> Transcoders:
        return Transcoders(params, architecture=self.architecture, k=self.k,
                           cross_layer=self.cross_layer)

    def check(self, cfg) -> None:
        """Clear errors where these transcoders do not fit a model with config ``cfg``."""
        n_mlp = 0 if cfg.attn_only else cfg.n_layers
        if self.n_layers != n_mlp:
            raise ValueError(f"{self.n_layers} transcoders for a model with {n_mlp} MLP layers "
                             f"({'attention-only' if cfg.attn_only else f'{cfg.n_layers} layers'}); "
                             "give one transcoder per MLP layer (none for an attention-only model).")
        for layer, p in enumerate(self.params):
            d_in, n_feat = p["W_enc"].shape
            checks = {"W_enc": (p["W_enc"].shape, (cfg.d_model, n_feat)),
                      "b_enc": (p["b_enc"].shape, (n_feat,)),
                      "W_dec": (p["W_dec"].shape, (n_feat, len(self.targets(layer)), cfg.d_model)),
                      "b_dec": (p["b_dec"].shape, (cfg.d_model,))}
            if "log_threshold" in p:
                checks["log_threshold"] = (p["log_threshold"].shape, (n_feat,))
            if "W_skip" in p:
                checks["W_skip"] = (p["W_skip"].shape, (cfg.d_model, cfg.d_model))
            for key, (got, want) in checks.items():
                if tuple(got) != want:
                    raise ValueError(
                        f"transcoder of layer {layer}: {key} has shape {tuple(got)}, but the model "
                        f"(d_model={cfg.d_model}) needs {want}: a transcoder reads and writes "
                        f"d_model-wide activations ({mlp_input_hook(cfg, layer)} -> "
                        f"blocks.{layer}.hook_mlp_out).")

    # -- the computation
    def encode(self, layer: int, x: Float[Array, "n d_model"]
               ) -> tuple[Float[Array, "n feature"], Float[Array, "n feature"]]:
        """(pre-activations, activations) [n, feature] of source layer ``layer`` on inputs x."""
        p = self.params[layer]
        pre = x @ p["W_enc"] + p["b_enc"][None, :]  # [n, d_model] @ [d_model, feature]
        if self.architecture == "topk":
            acts = jnp.where(sae.topk_mask(pre, self.k, self.k), jax.nn.relu(pre), 0.0)
        elif self.architecture == "jumprelu":
            acts = pre * (pre > jnp.exp(p["log_threshold"])[None, :]).astype(pre.dtype)
        else:
            acts = jax.nn.relu(pre)
        return pre, acts

    def decode_layer(self, t: int, acts: Sequence[Float[Array, "n feature"]],
                     x: Float[Array, "n d_model"] | None = None) -> Float[Array, "n d_model"]:
        """The output [n, d_model] of target layer ``t`` from the activations of the source
        layers ``acts[s]`` (s <= t; later entries are not read) and, with a skip connection, the
        layer's input ``x``."""
        out = self.params[t]["b_dec"][None, :]
        for src in range(t + 1):
            if t in self.targets(src):
                # [n, feature] @ [feature, d_model] (the decoder of source src to target t)
                out = out + acts[src] @ self.params[src]["W_dec"][:, t - src, :]
        if "W_skip" in self.params[t]:
            if x is None:
                raise ValueError("transcoders with a skip connection need the layer's input x.")
            out = out + x @ self.params[t]["W_skip"]
        return out

    def decode(self, acts: Sequence[Float[Array, "n feature"]], xs: Sequence[Array] | None = None
               ) -> list[Float[Array, "n d_model"]]:
        """Outputs [n, d_model] of every target layer from every source layer's activations (and
        the inputs ``xs`` where there is a skip connection)."""
        return [self.decode_layer(t, acts, None if xs is None else xs[t])
                for t in range(self.n_layers)]

    def __call__(self, xs: Sequence[Float[Array, "n d_model"]]):
        """(outputs, pre-activations, activations), each a list over layers."""
        enc = [self.encode(layer, x) for layer, x in enumerate(xs)]
        pres, acts = [e[0] for e in enc], [e[1] for e in enc]
        return self.decode(acts, xs), pres, acts


def from_mlps(model) -> Transcoders:
    """Per-layer ReLU transcoders whose weights are the model's own ReLU MLPs (their errors are
    zero to float32 rounding): the norm's weight and bias fold into the encoder, as
    ``(x * w + b) @ W_in + b_in = x @ (w[:, None] * W_in) + (b @ W_in + b_in)``."""
    cfg = model.cfg
    if cfg.attn_only:
        return Transcoders([])
    if cfg.act_fn != "relu":
        raise ValueError(f"from_mlps needs a ReLU MLP (the transcoder's activation), got "
                         f"act_fn={cfg.act_fn!r}.")
    out = []
    for layer in range(cfg.n_layers):
        blk = model.params["blocks"][layer]
        mlp = blk["mlp"]
        W_in, b_in = mlp["W_in"], mlp["b_in"]
        ln = blk.get("ln2", {})
        if cfg.normalization_type in ("LN", "RMS"):
            W_in_eff = ln["w"][:, None] * W_in  # [d_model, 1] * [d_model, d_mlp]
            b_eff = b_in + (ln["b"] @ W_in if cfg.normalization_type == "LN" else 0.0)
        else:
            W_in_eff, b_eff = W_in, b_in
        out.append({"W_enc": W_in_eff, "b_enc": b_eff, "W_dec": mlp["W_out"][:, None, :],
                    "b_dec": mlp["b_out"]})
    return Transcoders(out)


def random_transcoders(cfg, n_features: int, *, architecture: str = "relu", k: int = 0,
                       cross_layer: bool = False, skip: bool = False, threshold: float = 0.5,
                       seed: int = 0) -> Transcoders:
    """Untrained transcoders for ``cfg`` (tests and benchmarks): encoder columns and decoder rows
    random with unit norm, ``b_enc`` = -``threshold`` / 2, a JumpReLU threshold of ``threshold``,
    decoder rows scaled by 1 / sqrt(n_features), a skip matrix at 0.1 / sqrt(d_model)."""
    if cfg.attn_only:
        return Transcoders([])
    rng = np.random.default_rng(seed)
    d, L = cfg.d_model, cfg.n_layers
    out = []
    for layer in range(L):
        n_t = L - layer if cross_layer else 1
        W_enc = rng.standard_normal((d, n_features)).astype(np.float32)
        W_dec = rng.standard_normal((n_features, n_t, d)).astype(np.float32)
        p = {"W_enc": W_enc / np.linalg.norm(W_enc, axis=0, keepdims=True),
             "b_enc": np.full(n_features, -threshold / 2, np.float32),
             "W_dec": W_dec / np.linalg.norm(W_dec, axis=-1, keepdims=True) / np.sqrt(n_features),
             "b_dec": 0.1 * rng.standard_normal(d).astype(np.float32)}
        if architecture == "jumprelu":
            p["log_threshold"] = np.full(n_features, np.log(threshold), np.float32)
        if skip:
            p["W_skip"] = (0.1 / np.sqrt(d)) * rng.standard_normal((d, d)).astype(np.float32)
        out.append({key: jnp.asarray(v, jnp.float32) for key, v in p.items()})
    return Transcoders(out, architecture=architecture, k=k, cross_layer=cross_layer)


# ----------------------------------------------------------------------------- training data
def collect_mlp_io(model, tokens, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys) [layer, n, d_model]: every MLP's input (``mlp_input_hook``) and output
    (``hook_mlp_out``) at every position of ``tokens`` [n_seq, pos] (n = n_seq * pos), one model
    batch at a time."""
    cfg = model.cfg
    if cfg.attn_only:
        raise ValueError("an attention-only model has no MLPs to train transcoders on")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_seq, pos], got shape {tokens.shape}")
    names = [n for layer in range(cfg.n_layers)
             for n in (mlp_input_hook(cfg, layer), f"blocks.{layer}.hook_mlp_out")]
    xs, ys = [], []
    for s in range(0, tokens.shape[0], batch_size):
        _, cache = model.run_with_cache(tokens[s:s + batch_size], names_filter=names)
        xs.append(np.stack([np.asarray(cache[names[2 * i]]).reshape(-1, cfg.d_model)
                            for i in range(cfg.n_layers)]))
        ys.append(np.stack([np.asarray(cache[names[2 * i + 1]]).reshape(-1, cfg.d_model)
                            for i in range(cfg.n_layers)]))
    return np.concatenate(xs, axis=1), np.concatenate(ys, axis=1)


def _skip_fit(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Least-squares W_skip [d_model, d_model] of y on x (centred, ridge-regularised)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    gram = xc.T @ xc / len(x)
    return np.linalg.solve(gram + ridge * np.trace(gram) / len(gram) * np.eye(len(gram)),
                           xc.T @ yc / len(x)).astype(np.float32)


def train_transcoders(xs: np.ndarray, ys: np.ndarray, n_features: int, *,
                      architecture: str = "relu", skip: bool = False, seed: int = 0,
                      devices: sweeps.Devices = None, **sae_config) -> Transcoders:
    """Per-layer transcoders (``x_l -> y_l``) from ``collect_mlp_io`` data, trained by
    ``tinyinterp.sae`` (ReLU + L1, TopK, JumpReLU with straight-through threshold gradients;
    resampling of dead latents). ``sae_config``: further ``SAEConfig`` fields
    (``l1_coefficient``, ``k``, ``l0_coefficient``, ``n_steps``, ``batch_size``, ``lr``, ...).

    Every layer trains at once, as ONE compiled program whose runs are the layers, each on its
    own data (``sae.train_sae_sweep`` with ``sae.array_batches``): layer l is what
    ``sae.train_sae(cfg, jax.random.key(seed * 1000 + l), sae.array_batch_fn(xs[l],
    batch_size, seed=seed + l, y=target_l))`` gives, to float32 rounding. ``devices`` (a count,
    a Mesh or a list of devices) splits the layers over several devices or hosts
    (``tinyinterp.sweeps``).

    ``skip``: a skip transcoder (Paulo et al. 2025): a linear map W_skip from input to output,
    fitted first by (ridge) least squares; the sparse latents are then trained on what it leaves
    (y - x W_skip)."""
    xs, ys = np.asarray(xs, np.float32), np.asarray(ys, np.float32)
    if xs.ndim != 3 or xs.shape != ys.shape:
        raise ValueError(f"xs and ys must both be [layer, n, d_model], got {xs.shape} and {ys.shape}")
    n_layers, d = xs.shape[0], xs.shape[-1]
    W_skip = [_skip_fit(xs[layer], ys[layer]) for layer in range(n_layers)] if skip else None
    targets = np.stack([ys[layer] - xs[layer] @ W_skip[layer] for layer in range(n_layers)]
                       ) if skip else ys  # [layer, n, d_model]
    cfg = sae.SAEConfig(d_in=d, d_sae=n_features, d_out=d, architecture=architecture,
                        **sae_config)
    batches = sae.array_batches(xs, cfg.batch_size, [seed + layer for layer in range(n_layers)],
                                ys=targets)
    results = sae.train_sae_sweep([cfg] * n_layers,
                                  [jax.random.key(seed * 1000 + layer) for layer in range(n_layers)],
                                  batches, devices=devices)
    out = []
    for layer, res in enumerate(results):
        p = dict(res.params)
        if skip:
            p["W_skip"] = jnp.asarray(W_skip[layer])
        out.append(p)
    return Transcoders.from_sae_params(out, architecture=architecture,
                                       k=sae_config.get("k", 0))


@dataclass(frozen=True)
class CLTConfig:
    """Cross-layer transcoder training (Ameisen et al. 2025). Loss = sum over target layers of
    mean_batch ||y_t - out_t||^2 + ``sparsity`` * sum_l mean_batch sum_f tanh(``tanh_c`` *
    ||W_dec[l][f]|| * a_l,f), ||W_dec[l][f]|| the norm of the feature's decoders to every later
    layer, concatenated. ``architecture``: "relu" or "jumprelu" (straight-through threshold
    gradients, ``tinyinterp.sae.jumprelu``)."""

    n_features: int
    architecture: str = "jumprelu"
    sparsity: float = 1e-3
    tanh_c: float = 1.0
    lr: float = 2e-3
    batch_size: int = 512
    n_steps: int = 2000
    chunk_size: int = 250
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05

    def __post_init__(self):
        if self.architecture not in ("relu", "jumprelu"):
            raise ValueError(f"CLTConfig.architecture must be 'relu' or 'jumprelu', got "
                             f"{self.architecture!r}")
        for name in ("n_features", "batch_size", "n_steps", "chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"CLTConfig.{name} must be a positive int, got {v!r}")
        for name in ("sparsity", "tanh_c", "lr", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0 or (
                    name != "sparsity" and v == 0):
                raise ValueError(f"CLTConfig.{name} must be a finite number > 0 (>= 0 for "
                                 f"sparsity), got {v!r}")


def _clt_forward(params: Sequence[dict], xs: Float[Array, "layer n d_model"], c: CLTConfig):
    """(outputs [layer, n, d_model], activations per layer [n, feature])."""
    n_layers = len(params)
    acts = []
    for layer, p in enumerate(params):
        pre = xs[layer] @ p["W_enc"] + p["b_enc"][None, :]  # [n, feature]
        if c.architecture == "jumprelu":
            acts.append(sae.jumprelu(pre, jnp.exp(p["log_threshold"]), c.jumprelu_bandwidth))
        else:
            acts.append(jax.nn.relu(pre))
    outs = []
    for t in range(n_layers):
        out = params[t]["b_dec"][None, :]
        for src in range(t + 1):
            out = out + acts[src] @ params[src]["W_dec"][:, t - src, :]
        outs.append(out)
    return jnp.stack(outs), acts


def _clt_loss(params, xs, ys, c: CLTConfig):
    outs, acts = _clt_forward(params, xs, c)
    mse = jnp.sum(jnp.mean(jnp.sum((ys - outs) ** 2, axis=-1), axis=-1))
    penalty = jnp.float32(0.0)
    l0 = []
    for p, a in zip(params, acts, strict=True):
        norm = jnp.sqrt(jnp.sum(p["W_dec"] ** 2, axis=(1, 2)))  # [feature]: all targets, concatenated
        penalty = penalty + jnp.mean(jnp.sum(jnp.tanh(c.tanh_c * norm[None, :] * a), axis=-1))
        l0.append(jnp.mean(jnp.sum((a > 0).astype(jnp.float32), axis=-1)))
    return mse + jnp.float32(c.sparsity) * penalty, (mse, penalty, jnp.stack(l0))


def train_clt(xs: np.ndarray, ys: np.ndarray, c: CLTConfig, *, seed: int = 0
              ) -> tuple[Transcoders, dict]:
    """Cross-layer transcoders from ``collect_mlp_io`` data ([layer, n, d_model] each): one
    encoder per layer, a decoder to every later layer's MLP output. Adam; batches drawn by a
    counter-based sampler (deterministic in ``seed``). -> (Transcoders, history {"loss", "mse",
    "penalty": [step], "l0": [step, layer]})."""
    from tinyinterp.superposition import uniform_from_counter
    from tinyinterp.train import standard_promotion

    xs, ys = jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)
    if xs.ndim != 3 or xs.shape != ys.shape:
        raise ValueError(f"xs and ys must both be [layer, n, d_model], got {xs.shape} and {ys.shape}")
    n_layers, n, d = xs.shape
    rng = np.random.default_rng(seed)
    F = c.n_features
    params = []
    for layer in range(n_layers):
        W_enc = rng.standard_normal((d, F)).astype(np.float32)
        p = {"W_enc": jnp.asarray(W_enc / np.linalg.norm(W_enc, axis=0, keepdims=True)),
             "b_enc": jnp.zeros((F,), jnp.float32),
             "W_dec": jnp.asarray(rng.uniform(-1, 1, (F, n_layers - layer, d)).astype(np.float32)
                                  / np.float32(np.sqrt(n_layers * d))),
             "b_dec": jnp.mean(ys[layer], axis=0)}
        if c.architecture == "jumprelu":
            p["log_threshold"] = jnp.full((F,), np.log(c.jumprelu_init_threshold), jnp.float32)
        params.append(p)
    opt = standard_promotion(optax.adam(c.lr))
    opt_state = opt.init(params)

    @functools.partial(jax.jit, static_argnames="n_steps")
    def chunk(params, opt_state, start, n_steps):
        def step(carry, t):
            params, opt_state = carry
            u = uniform_from_counter(jnp.uint32(seed), t, (c.batch_size,))
            idx = jnp.minimum((u * jnp.float32(n)).astype(jnp.int32), n - 1)  # [batch]
            (loss, (mse, pen, l0)), g = jax.value_and_grad(_clt_loss, has_aux=True)(
                params, xs[:, idx], ys[:, idx], c)
            updates, opt_state = opt.update(g, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, mse, pen, l0)

        steps = start + jnp.arange(n_steps, dtype=jnp.int32)
        return jax.lax.scan(step, (params, opt_state), steps)

    hist = {"loss": [], "mse": [], "penalty": [], "l0": []}
    done = 0
    while done < c.n_steps:
        m = min(c.chunk_size, c.n_steps - done)
        (params, opt_state), stats = chunk(params, opt_state, jnp.int32(done), m)
        for key, v in zip(hist, stats, strict=True):
            hist[key].append(np.asarray(v))
        if not np.all(np.isfinite(hist["loss"][-1])):
            raise FloatingPointError(f"cross-layer transcoder loss became non-finite before step "
                                     f"{done + m}; lower lr ({c.lr}) or check the data.")
        done += m
    tc = Transcoders(params, architecture=c.architecture, cross_layer=True)
    return tc, {k: np.concatenate(v) for k, v in hist.items()}


# ----------------------------------------------------------------------------- evaluation
def replacement_logits(model, tc: Transcoders, tokens) -> Float[Array, "batch pos vocab"]:
    """Logits of the replacement model: every MLP replaced by its transcoder (no error terms),
    attention and norms computed as usual."""
    tc.check(model.cfg)
    return _replacement_logits(model.params, tc, jnp.asarray(tokens), cfg=model.cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def _replacement_logits(params, tc: Transcoders, tokens, *, cfg):
    from tinyinterp.model import forward

    state: dict = {"xs": {}, "acts": {}}

    def read(v, *, name):
        layer = int(name.split(".")[1])
        state["xs"][layer] = v.reshape(-1, v.shape[-1])  # [batch * pos, d_model]
        state["acts"][layer] = tc.encode(layer, state["xs"][layer])[1]
        return v

    def write(v, *, name):
        t = int(name.split(".")[1])
        return tc.decode_layer(t, state["acts"], state["xs"][t]).reshape(v.shape)

    hooks = [(mlp_input_hook(cfg, i), read) for i in range(tc.n_layers)]
    hooks += [(f"blocks.{i}.hook_mlp_out", write) for i in range(tc.n_layers)]
    return forward(params, cfg, tokens, fwd_hooks=hooks)


@jax.jit
def _run_all(tc: Transcoders, xs):
    return tc(list(xs))


def evaluate(model, tc: Transcoders, tokens, *, batch_size: int = 64) -> dict:
    """Per layer: normalised MSE (mean ||y - y_hat||^2 / mean ||y - mean y||^2), L0 (active
    latents per token) and dead fraction (latents never active on these tokens); and
    ``prediction_agreement``: the fraction of next-token predictions (argmax, every position)
    kept when the transcoders replace the MLPs with no error terms."""
    xs, ys = collect_mlp_io(model, tokens, batch_size=batch_size)
    outs, _, acts = _run_all(tc, jnp.asarray(xs))
    layers = []
    for layer in range(tc.n_layers):
        y, yhat, a = ys[layer], np.asarray(outs[layer]), np.asarray(acts[layer])
        var = float(np.mean(np.sum((y - y.mean(0)) ** 2, axis=-1)))
        layers.append({"layer": layer,
                       "normalized_mse": float(np.mean(np.sum((y - yhat) ** 2, axis=-1))) / var,
                       "l0": float(np.mean(np.sum(a > 0, axis=-1))),
                       "dead_fraction": float(np.mean(~np.any(a > 0, axis=0)))})
    agree = []
    tokens = np.asarray(tokens)
    for s in range(0, tokens.shape[0], batch_size):
        t = tokens[s:s + batch_size]
        agree.append(np.asarray(jnp.argmax(model(t), -1) == jnp.argmax(replacement_logits(
            model, tc, t), -1)).ravel())
    return {"layers": layers, "prediction_agreement": float(np.concatenate(agree).mean())}
