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

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from tinyinterp import sae

__all__ = ["Transcoders", "mlp_input_hook", "from_mlps", "random_transcoders"]

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

    def decode(self, acts: Sequence[Float[Array, "n feature"]], xs: Sequence[Array] | None = None
               ) -> list[Float[Array, "n d_model"]]:
        """Outputs [n, d_model] of every target layer from every source layer's activations (and
        the inputs ``xs`` where there is a skip connection)."""
        outs = []
        for t in range(self.n_layers):
            out = jnp.broadcast_to(self.params[t]["b_dec"][None, :], (acts[t].shape[0],
                                                                      self.params[t]["b_dec"].shape[0]))
            for src in range(t + 1):
                if t in self.targets(src):
                    # [n, feature] @ [feature, d_model] (the decoder to target t)
                    out = out + acts[src] @ self.params[src]["W_dec"][:, t - src, :]
            if "W_skip" in self.params[t]:
                if xs is None:
                    raise ValueError("transcoders with a skip connection need the inputs xs.")
                out = out + xs[t] @ self.params[t]["W_skip"]
            outs.append(out)
        return outs

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
