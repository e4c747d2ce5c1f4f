"""The transformer, top to bottom: embed, norms, attention, mlp, block, unembed, forward, loss, model.
This file is the specification: plain jnp, written for reading. Axis vocabulary: batch, pos
(query_pos, key_pos), head_index (h), d_model (m), d_head (d), d_mlp, d_vocab.

Every hook point (the one table: ``tinyinterp.hooks.hook_names``) is a call ``hp(name, value)`` where
the value is computed, as TransformerLens' ``self.hook_resid_pre(x)``: ``hp`` (a ``HookContext``)
returns the value, edited by any hook on that point, and records it when a cache asks for it.

``block`` hands each attention sublayer to ``tinyinterp.fast.attention_sublayer`` with the plain
function below; on the CPU it may run Numba kernels instead where nobody reads or edits the hook
points they skip, with this code's values (to float32 rounding) and its gradients.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int

from tinyinterp import fast
from tinyinterp.config import TransformerConfig
from tinyinterp.hooks import (
    HookContext,
    NamesFilter,
    hook_names,
    resolve_fwd_hooks,
    resolve_names,
    zero_like_tree,
)
from tinyinterp.inputs import check_return_type, check_tokens, layer_range
from tinyinterp.params import Params, check_params, count_params, init_params
from tinyinterp.sweeps import rows


# ----------------------------------------------------------------------------- embed
def embed(params: Params, tokens: Int[Array, "batch pos"], cfg: TransformerConfig,
          hp: HookContext) -> Float[Array, "batch pos d_model"]:
    """Token + positional embedding; an out-of-range token embeds as NaN (never silently clamped)."""
    W_E = params["embed"]["W_E"]  # [d_vocab, d_model]
    in_range = (tokens >= 0) & (tokens < cfg.d_vocab)  # [batch, pos]
    tok = jnp.where(in_range[..., None], rows(W_E, jnp.where(in_range, tokens, 0)), jnp.nan)
    tok = hp("hook_embed", tok)  # [batch, pos, d_model]
    W_pos = params["pos_embed"]["W_pos"][: tokens.shape[1]]  # [pos, d_model]
    pos = hp("hook_pos_embed", jnp.broadcast_to(W_pos[None], tok.shape))
    return tok + pos


# ----------------------------------------------------------------------------- norms
def normalize(x: Float[Array, "batch pos d_model"], p: dict, name: str, cfg: TransformerConfig,
              hp: HookContext, *, affine: bool = True) -> Float[Array, "batch pos d_model"]:
    """LN / LNPre / RMS / RMSPre / None, as TransformerLens: hook_scale is sqrt(mean(x^2) + eps)
    [batch, pos, 1] (after centring for LN*); hook_normalized is x / scale, before w and b."""
    kind = cfg.normalization_type
    if kind is None:
        return x
    if kind in ("LN", "LNPre"):
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    scale = hp(f"{name}.hook_scale", jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.eps))
    x = hp(f"{name}.hook_normalized", x / scale)
    if affine and kind in ("LN", "RMS"):
        x = x * p["w"][None, None]  # [d_model] -> [1, 1, d_model]
    if affine and kind == "LN":
        x = x + p["b"][None, None]
    return x


# TL's activations: "gelu" is the exact erf GELU, "gelu_new" and "gelu_fast" the tanh one
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu, "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
}


def activation(x: jax.Array, act_fn: str) -> jax.Array:
    return ACTIVATIONS[act_fn](x)


# ----------------------------------------------------------------------------- attention
def causal_scores(q: Float[Array, "batch query_pos head d_head"], k: Float[Array, "batch key_pos head d_head"]
                  ) -> Float[Array, "batch head query_pos key_pos"]:
    """q . k / sqrt(d_head), -inf above the diagonal: a position sees itself and earlier ones."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(q.shape[-1]))
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), dtype=bool))  # [query_pos, key_pos]
    return jnp.where(causal[None, None], scores, -jnp.inf)


def softmax_pattern(scores: Float[Array, "batch head query_pos key_pos"]
                    ) -> Float[Array, "batch head query_pos key_pos"]:
    """Softmax over key_pos, stable; a fully masked row (all -inf, after a hook) gives zeros, not NaN."""
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.exp(scores - jax.lax.stop_gradient(row_max))
    denom = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(denom > 0, denom, 1.0)


def attention(p: dict, x: Float[Array, "batch pos d_model"], layer: int, cfg: TransformerConfig,
              hp: HookContext) -> Float[Array, "batch pos d_model"]:
    """Multi-head causal self-attention with TL's hook points, in TL's order."""
    name = f"blocks.{layer}.attn"
    # x [batch, pos, d_model] @ W [head, d_model, d_head] + b -> [batch, pos, head, d_head]
    q = hp(f"{name}.hook_q", jnp.einsum("bpm,hmd->bphd", x, p["W_Q"]) + p["b_Q"][None, None])
    k = hp(f"{name}.hook_k", jnp.einsum("bpm,hmd->bphd", x, p["W_K"]) + p["b_K"][None, None])
    v = hp(f"{name}.hook_v", jnp.einsum("bpm,hmd->bphd", x, p["W_V"]) + p["b_V"][None, None])
    scores = hp(f"{name}.hook_attn_scores", causal_scores(q, k))  # [batch, head, query, key]
    pattern = hp(f"{name}.hook_pattern", softmax_pattern(scores))
    # pattern [batch, head, query, key] @ v [batch, key, head, d_head] -> z [batch, query, head, d_head]
    z = hp(f"{name}.hook_z", jnp.einsum("bhqk,bkhd->bqhd", pattern, v))
    # each head's output z_h @ W_O[h]: [batch, pos, head, d_head] -> [batch, pos, head, d_model]
    result = hp(f"{name}.hook_result", jnp.einsum("bphd,hdm->bphm", z, p["W_O"]))
    return jnp.sum(result, axis=2) + p["b_O"][None, None]


def attention_sublayer(p: dict, resid: Float[Array, "batch pos d_model"], layer: int,
                       cfg: TransformerConfig, hp: HookContext) -> Float[Array, "batch pos d_model"]:
    """resid + attention(ln1(resid)): the block's first residual update."""
    x = normalize(resid, p.get("ln1", {}), f"blocks.{layer}.ln1", cfg, hp)
    return resid + hp(f"blocks.{layer}.hook_attn_out", attention(p["attn"], x, layer, cfg, hp))


# ----------------------------------------------------------------------------- mlp
def linear(x: Float[Array, "batch pos n_in"], W: Float[Array, "n_in n_out"], b: Float[Array, " n_out"]
           ) -> Float[Array, "batch pos n_out"]:
    """x @ W + b over the last axis, as one 2-D matmul (XLA's CPU backward of a 3-D one is slower)."""
    return (x.reshape(-1, x.shape[-1]) @ W + b[None]).reshape(*x.shape[:-1], W.shape[-1])


def mlp(p: dict, x: Float[Array, "batch pos d_model"], layer: int, cfg: TransformerConfig,
        hp: HookContext) -> Float[Array, "batch pos d_model"]:
    pre = hp(f"blocks.{layer}.mlp.hook_pre", linear(x, p["W_in"], p["b_in"]))
    post = hp(f"blocks.{layer}.mlp.hook_post", ACTIVATIONS[cfg.act_fn](pre))
    return linear(post, p["W_out"], p["b_out"])


# ----------------------------------------------------------------------------- block
def block(p: dict, resid: Float[Array, "batch pos d_model"], layer: int, cfg: TransformerConfig,
          hp: HookContext, backend: str) -> Float[Array, "batch pos d_model"]:
    b = f"blocks.{layer}"
    resid = hp(f"{b}.hook_resid_pre", resid)
    # the plain attention_sublayer, or the plan tinyinterp.fast makes of it for this backend
    resid = fast.attention_sublayer(attention_sublayer, p, resid, layer, cfg, hp, backend)
    if cfg.attn_only:
        return hp(f"{b}.hook_resid_post", resid)
    resid = hp(f"{b}.hook_resid_mid", resid)
    x = normalize(resid, p.get("ln2", {}), f"{b}.ln2", cfg, hp)
    return hp(f"{b}.hook_resid_post", resid + hp(f"{b}.hook_mlp_out", mlp(p["mlp"], x, layer, cfg, hp)))


# ----------------------------------------------------------------------------- unembed
def unembed(params: Params, resid: Float[Array, "batch pos d_model"], cfg: TransformerConfig,
            hp: HookContext) -> Float[Array, "batch pos d_vocab_out"]:
    x = hp("unembed.hook_in", normalize(resid, params.get("ln_final", {}), "ln_final", cfg, hp))
    return hp("unembed.hook_out", linear(x, params["unembed"]["W_U"], params["unembed"]["b_U"]))


# ----------------------------------------------------------------------------- forward
def run(params: Params, cfg: TransformerConfig, inputs: ArrayLike, hp: HookContext, *,
        start_at_layer: int | None = None, stop_at_layer: int | None = None,
        backend: str | None = None) -> jax.Array:
    """Tokens [batch, pos] (or a residual [batch, pos, d_model] from ``start_at_layer``) -> logits
    [batch, pos, d_vocab_out] (or the residual before block ``stop_at_layer``)."""
    backend = fast.resolve_backend(cfg.attention_backend if backend is None else backend)
    start, stop = layer_range(start_at_layer, stop_at_layer, cfg.n_layers)
    inputs = jnp.asarray(inputs)  # numpy in, jax arrays inside
    resid = embed(params, inputs, cfg, hp) if start_at_layer is None else inputs
    for layer in range(start, stop):
        resid = block(params["blocks"][layer], resid, layer, cfg, hp, backend)
    return resid if stop_at_layer is not None else unembed(params, resid, cfg, hp)


def forward(params: Params, cfg: TransformerConfig, tokens: ArrayLike, *,
            return_type: str | None = "logits", loss_per_token: bool = False, fwd_hooks=(),
            start_at_layer: int | None = None, stop_at_layer: int | None = None,
            backend: str | None = None) -> Any:
    """Pure forward pass: ``forward(params, cfg, tokens)`` -> logits [batch, pos, d_vocab_out];
    jit-able with ``cfg`` static. ``fwd_hooks``: ``[(name | names | predicate, fn)]``. ``backend``
    ("auto" | "numba" | "xla") overrides ``cfg.attention_backend`` for this run."""
    return forward_with_cache(params, cfg, tokens, (), return_type=return_type, backend=backend,
                              loss_per_token=loss_per_token, fwd_hooks=fwd_hooks,
                              start_at_layer=start_at_layer, stop_at_layer=stop_at_layer)[0]


def forward_with_cache(params: Params, cfg: TransformerConfig, tokens: ArrayLike,
                       names: frozenset[str] | list[str] | tuple[str, ...], *,
                       return_type: str | None = "logits", loss_per_token: bool = False,
                       fwd_hooks=(), start_at_layer: int | None = None,
                       stop_at_layer: int | None = None, deltas: dict[str, jax.Array] | None = None,
                       backend: str | None = None) -> tuple[Any, dict[str, Array]]:
    """Pure forward pass that also returns {hook name: activation} for ``names``. ``deltas`` (zeros,
    by hook name) are added at their points: their gradient is the gradient at those points."""
    check_return_type(return_type, start_at_layer)
    hp = HookContext(fwd_hooks=resolve_fwd_hooks(fwd_hooks, hook_names(cfg)),
                     cache_names=frozenset(names), deltas=deltas)
    out = run(params, cfg, tokens, hp, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer,
              backend=backend)
    if stop_at_layer is not None or return_type in ("logits", None):
        return (None if return_type is None and stop_at_layer is None else out), hp.cache
    loss = lm_cross_entropy_loss(out, tokens, per_token=loss_per_token)
    return (loss if return_type == "loss" else (out, loss)), hp.cache


# ----------------------------------------------------------------------------- loss
def lm_cross_entropy_loss(logits: Float[Array, "batch pos d_vocab_out"],
                          tokens: Int[Array, "batch pos"], per_token: bool = False,
                          loss_mask: Array | None = None) -> jax.Array:
    """Next-token cross-entropy: position p predicts token p + 1. ``per_token`` gives
    [batch, pos - 1]; else the mean (over ``loss_mask`` [batch, pos - 1] positions if given)."""
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [batch, pos-1, d_vocab_out]
    nll = -jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, pos-1]
    if per_token:
        return nll
    if loss_mask is None:
        return jnp.mean(nll)
    m = loss_mask.astype(nll.dtype)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


# ----------------------------------------------------------------------------- the model object
_STATIC = ("cfg", "names", "return_type", "loss_per_token", "start_at_layer", "stop_at_layer",
           "backend")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _jit_forward_with_cache(params, tokens, cfg, names, return_type, loss_per_token,
                            start_at_layer, stop_at_layer, backend):
    return forward_with_cache(params, cfg, tokens, names, return_type=return_type,
                              loss_per_token=loss_per_token, start_at_layer=start_at_layer,
                              stop_at_layer=stop_at_layer, backend=backend)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "fwd_hooks", "metric"))
def _jit_grads(params, tokens, deltas, cfg, names, return_type, loss_per_token, start_at_layer,
               stop_at_layer, backend, fwd_hooks, metric):
    """(grads at the cached points, (output, cache)), compiled once per (config, names, hooks, ...)."""
    def scalar(deltas):
        out, cache = forward_with_cache(
            params, cfg, tokens, names, return_type=return_type, loss_per_token=loss_per_token,
            fwd_hooks=fwd_hooks, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer,
            deltas=deltas, backend=backend)
        value = metric(out) if metric is not None else out
        if not (hasattr(value, "shape") and value.shape == ()):
            raise ValueError("incl_bwd=True needs a scalar: use return_type='loss' or pass "
                             "metric=fn(output) -> scalar")
        return value, (out, cache)

    return jax.grad(scalar, has_aux=True)(deltas)


@jax.tree_util.register_pytree_node_class
class HookedTransformer:
    """An immutable transformer, ``cfg`` (static) + ``params``: a pytree through ``jax.jit`` and
    ``jax.grad``. Surgery returns a new model (``with_params``)."""

    def __init__(self, cfg: TransformerConfig, params: Params):
        check_params(params, cfg)  # shapes and dtypes only (tracers too): no kernel sees others
        self.cfg, self.params = cfg, params

    def tree_flatten(self):  # the pytree protocol: params are the leaves, cfg is static
        return (self.params,), self.cfg

    @classmethod
    def tree_unflatten(cls, cfg, children):  # JAX unflattens with placeholder leaves: no check
        model = object.__new__(cls)
        model.cfg, model.params = cfg, children[0]
        return model

    @classmethod
    def from_config(cls, cfg: TransformerConfig, seed: int = 0) -> HookedTransformer:
        """A freshly initialised model; the same (cfg, seed) gives bitwise the same params."""
        return cls(cfg, init_params(cfg, jax.random.key(seed)))

    def with_params(self, params: Params) -> HookedTransformer:
        return HookedTransformer(self.cfg, params)

    def process_weights(self, **flags) -> HookedTransformer:
        """TransformerLens' weight processing (fold_ln, center_writing_weights, ...): a new model."""
        from tinyinterp.processing import process_weights

        return process_weights(self, **flags)

    @property
    def hook_names(self) -> list[str]:  # every hook point, in forward order
        return hook_names(self.cfg)

    n_params = property(lambda self: count_params(self.params))

    def __repr__(self) -> str:
        c, keys = self.cfg, ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx", "attn_only")
        return f"HookedTransformer({', '.join(f'{k}={getattr(c, k)}' for k in keys)}, " \
            f"params={self.n_params:,})"

    def __call__(self, tokens, return_type: str | None = "logits", *, loss_per_token: bool = False,
                 start_at_layer: int | None = None, stop_at_layer: int | None = None,
                 backend: str | None = None):
        """tokens [batch, pos] -> logits [batch, pos, d_vocab_out] | loss | (logits, loss)."""
        return self.run_with_cache(tokens, (), return_type, loss_per_token=loss_per_token,
                                   start_at_layer=start_at_layer, stop_at_layer=stop_at_layer,
                                   backend=backend)[0]

    forward = __call__

    def run_with_hooks(self, tokens, fwd_hooks=(), return_type: str | None = "logits", *,
                       loss_per_token: bool = False, start_at_layer: int | None = None,
                       stop_at_layer: int | None = None, backend: str | None = None):
        """Run with hooks ``[(name | names | predicate, fn(value, *, name) -> value)]`` applied in
        order. Runs as traced by the caller: wrap in ``jax.jit`` for speed (the model is a pytree)."""
        x = check_tokens(tokens, self.cfg, is_resid=start_at_layer is not None)
        return forward(self.params, self.cfg, x, return_type=return_type,
                       loss_per_token=loss_per_token, fwd_hooks=fwd_hooks,
                       start_at_layer=start_at_layer, stop_at_layer=stop_at_layer, backend=backend)

    def run_with_cache(self, tokens, names_filter: NamesFilter = None,
                       return_type: str | None = "logits", *, fwd_hooks=(),
                       incl_bwd: bool = False, metric: Callable[[Any], jax.Array] | None = None,
                       loss_per_token: bool = False, start_at_layer: int | None = None,
                       stop_at_layer: int | None = None, remove_batch_dim: bool = False,
                       backend: str | None = None):
        """(output, ActivationCache) for the hook points ``names_filter`` selects (None = all).

        ``incl_bwd=True`` also stores ``"{name}_grad"``: the gradient at each cached point of the
        scalar output (``return_type="loss"``) or of ``metric(output)``."""
        from tinyinterp.cache import ActivationCache

        x = check_tokens(tokens, self.cfg, is_resid=start_at_layer is not None)
        check_return_type(return_type, start_at_layer)
        names = tuple(resolve_names(names_filter, self.hook_names))
        run = dict(return_type=return_type, loss_per_token=loss_per_token, backend=backend,
                   start_at_layer=start_at_layer, stop_at_layer=stop_at_layer)
        if incl_bwd:  # hooks become a static argument: a tuple of (target, fn), hashable
            hooks = tuple((tuple(t) if isinstance(t, list) else t, fn) for t, fn in fwd_hooks)
            shapes = jax.eval_shape(lambda: forward_with_cache(self.params, self.cfg, x, names,
                                                               fwd_hooks=hooks, **run)[1])
            grads, (out, cache) = _jit_grads(self.params, x, zero_like_tree(shapes), cfg=self.cfg,
                                             names=names, fwd_hooks=hooks, metric=metric, **run)
            cache = {**cache, **{f"{k}_grad": g for k, g in grads.items()}}
        elif fwd_hooks:  # hooks may close over the caller's traced values: run as traced
            out, cache = forward_with_cache(self.params, self.cfg, x, names, fwd_hooks=fwd_hooks,
                                            **run)
        else:
            out, cache = _jit_forward_with_cache(self.params, x, cfg=self.cfg, names=names, **run)
        cache = ActivationCache(cache, self, has_batch_dim=True)
        return out, (cache.remove_batch_dim() if remove_batch_dim else cache)
