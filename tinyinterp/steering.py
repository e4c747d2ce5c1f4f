"""Steering: vectors added to the residual stream, and directions removed from it.

* Activation addition (Turner et al. 2023, "Activation addition: steering language models without
  optimization"): the difference of two prompts' residual streams at one layer, position by
  position, added with a coefficient to another run from a position on (``act_add_vector`` +
  ``steering_hook``).
* Mean-difference vectors (Rimsky et al. 2023, "Steering Llama 2 via contrastive activation
  addition"): the mean over a set of positive inputs minus the mean over negative ones of the
  residual at one position (``mean_difference_vector``), added at every position from one on.
* Directional ablation (Arditi et al. 2024, "Refusal in language models is mediated by a single
  direction"): x - (x . r) r for a unit direction r, as a hook (``directional_ablation_hook``)
  or folded into the weights that write to the residual stream (``orthogonalize_weights``).

Every hook is ``fn(value, *, name) -> value``: use it with ``model.run_with_hooks`` and with
``tinyinterp.generate.generate(..., fwd_hooks=...)`` (positions are absolute positions of the
sequence, so "from a position on" keeps its meaning while generating).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from tinyinterp.hooks import get_act_name, hook_names, unknown_hook_error
from tinyinterp.model import HookedTransformer, check_tokens

_RESID_LIKE = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def _hook_name(model: HookedTransformer, layer: int, hook: str) -> str:
    cfg = model.cfg
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not (
            0 <= layer < cfg.n_layers):
        raise IndexError(f"layer must be in [0, n_layers={cfg.n_layers}), got {layer!r}")
    name = get_act_name(hook, int(layer))
    valid = hook_names(cfg)
    if name not in valid:
        raise unknown_hook_error(name, valid)
    if not name.endswith(tuple(f"hook_{h}" for h in _RESID_LIKE)):
        raise ValueError(f"steering vectors live in the residual stream; {name!r} is not one of "
                         f"the residual-width points {_RESID_LIKE}")
    return name


def _activations(model: HookedTransformer, tokens, name: str) -> jax.Array:
    tokens = check_tokens(tokens if np.ndim(tokens) == 2 else np.asarray(tokens)[None], model.cfg)
    return model.run_with_cache(tokens, names_filter=[name])[1][name]  # [batch, pos, d_model]


def act_add_vector(model: HookedTransformer, positive: Int[Array, " pos"],
                   negative: Int[Array, " pos"], layer: int, *, hook: str = "resid_pre"
                   ) -> Float[Array, "pos d_model"]:
    """ActAdd's steering vector: residual(positive) - residual(negative) at ``hook`` of ``layer``,
    per position [pos, d_model]. The two prompts must have the same length (ActAdd pads the
    shorter with a filler token: do that before calling)."""
    name = _hook_name(model, layer, hook)
    pos_t, neg_t = np.asarray(positive), np.asarray(negative)
    if pos_t.ndim != 1 or neg_t.ndim != 1:
        raise ValueError(f"act_add_vector takes two prompts as 1-D token arrays, got shapes "
                         f"{pos_t.shape} and {neg_t.shape}")
    if pos_t.shape != neg_t.shape:
        raise ValueError(f"the two prompts have different lengths ({pos_t.shape[0]} and "
                         f"{neg_t.shape[0]}); pad the shorter one with a filler token (ActAdd "
                         "pads with spaces) so the positions line up")
    return _activations(model, pos_t, name)[0] - _activations(model, neg_t, name)[0]


def mean_difference_vector(model: HookedTransformer, positive: Int[Array, "n pos"],
                           negative: Int[Array, "m pos2"], layer: int, *,
                           hook: str = "resid_pre", pos: int = -1) -> Float[Array, " d_model"]:
    """mean_i resid(positive_i)[pos] - mean_j resid(negative_j)[pos] at ``hook`` of ``layer``
    [d_model] (contrastive activation addition; ``pos`` = -1 reads the last token, e.g. the
    answer letter of a multiple-choice prompt)."""
    name = _hook_name(model, layer, hook)
    means = []
    for what, toks in (("positive", positive), ("negative", negative)):
        acts = _activations(model, toks, name)  # [n, pos, d_model]
        if not -acts.shape[1] <= pos < acts.shape[1]:
            raise IndexError(f"pos={pos} is outside the {what} inputs' {acts.shape[1]} positions")
        means.append(jnp.mean(acts[:, pos], axis=0))
    return means[0] - means[1]


def _check_vector(vector, name: str) -> jax.Array:
    v = jnp.asarray(vector)
    if not jnp.issubdtype(v.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got dtype {v.dtype}")
    if v.ndim not in (1, 2):
        raise ValueError(f"{name} must be [d_model] or [pos, d_model], got shape {tuple(v.shape)}")
    if not isinstance(v, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(v))):
        raise ValueError(f"{name} has NaN or inf entries")
    return v.astype(jnp.float32)


def _check_width(v: jax.Array, value: jax.Array, name: str, what: str) -> None:
    if v.shape[-1] != value.shape[-1]:
        raise ValueError(f"{what} has width {v.shape[-1]} but hook point {name!r} has width "
                         f"{value.shape[-1]} (its shape is {tuple(value.shape)}); a steering vector "
                         "must match d_model and be attached to a residual-width hook point")


def steering_hook(vector: Float[Array, " d_model"] | Float[Array, "n d_model"],
                  coeff: float = 1.0, *, start_pos: int = 0) -> Callable:
    """A hook adding ``coeff * vector`` to the residual from position ``start_pos`` on.

    ``vector`` [d_model] is added at every position >= start_pos (mean-difference steering);
    [n, d_model] (ActAdd) is added at positions start_pos .. start_pos + n - 1, the part beyond
    the sequence dropped."""
    v = _check_vector(vector, "steering vector")
    if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)) or start_pos < 0:
        raise ValueError(f"start_pos must be a non-negative int, got {start_pos!r}")
    c = jnp.float32(coeff)

    def hook(value, *, name):
        _check_width(v, value, name, "the steering vector")
        n_pos = value.shape[1]
        if v.ndim == 1:
            on = (jnp.arange(n_pos) >= start_pos)[:, None]  # [pos, 1]
            add = jnp.where(on, c * v[None], 0.0)  # [pos, d_model]
        else:
            add = jnp.zeros((n_pos, v.shape[-1]), jnp.float32)
            stop = min(n_pos, start_pos + v.shape[0])
            if stop > start_pos:
                add = add.at[start_pos:stop].set(c * v[: stop - start_pos])
        return value + add[None].astype(value.dtype)

    return hook


def directional_ablation_hook(direction: Float[Array, " d_model"]) -> Callable:
    """A hook removing the component along ``direction`` (normalized here): x - (x . r) r."""
    r = _unit(direction)

    def hook(value, *, name):
        _check_width(r, value, name, "the direction")
        rb = r.reshape((1,) * (value.ndim - 1) + r.shape).astype(value.dtype)  # [1, .., d_model]
        proj = jnp.sum(value * rb, axis=-1, keepdims=True)  # [..., 1]
        return value - proj * rb

    return hook


def _unit(direction) -> jax.Array:
    r = _check_vector(direction, "direction")
    if r.ndim != 1:
        raise ValueError(f"a direction is one vector [d_model], got shape {tuple(r.shape)}")
    norm = jnp.linalg.norm(r)
    if not isinstance(norm, jax.core.Tracer) and not float(norm) > 0:
        raise ValueError("the direction is the zero vector")
    return r / norm


def orthogonalize_weights(model: HookedTransformer, direction: Float[Array, " d_model"]
                          ) -> HookedTransformer:
    """A new model whose every residual writer (W_E, W_pos, W_O, b_O, W_out, b_out) has its
    component along ``direction`` removed: W - (W r) r^T. The same as directional ablation at
    hook_embed, hook_pos_embed, every hook_attn_out and hook_mlp_out (Arditi et al. 2024's
    weight orthogonalization); the old model is untouched."""
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"orthogonalize_weights needs a HookedTransformer, got {type(model).__name__}")
    r = _unit(direction)
    if r.shape[0] != model.cfg.d_model:
        raise ValueError(f"the direction has width {r.shape[0]}, the model's d_model is "
                         f"{model.cfg.d_model}")

    def ortho(W):  # [..., d_model]
        rb = r.reshape((1,) * (W.ndim - 1) + r.shape)
        return W - jnp.sum(W * rb, axis=-1, keepdims=True) * rb

    p = model.params
    blocks = []
    for blk in p["blocks"]:
        new = dict(blk)
        new["attn"] = dict(blk["attn"], W_O=ortho(blk["attn"]["W_O"]), b_O=ortho(blk["attn"]["b_O"]))
        if "mlp" in blk:
            new["mlp"] = dict(blk["mlp"], W_out=ortho(blk["mlp"]["W_out"]),
                              b_out=ortho(blk["mlp"]["b_out"]))
        blocks.append(new)
    params = dict(p, embed={"W_E": ortho(p["embed"]["W_E"])},
                  pos_embed={"W_pos": ortho(p["pos_embed"]["W_pos"])}, blocks=blocks)
    return model.with_params(params)


__all__ = ["act_add_vector", "directional_ablation_hook", "mean_difference_vector",
           "orthogonalize_weights", "steering_hook"]
