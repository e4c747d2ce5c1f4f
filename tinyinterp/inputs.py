"""Checks on what a user passes to the model, before any computation: tokens, residual inputs,
layer indices and return types. Each failure says what was wrong and what is allowed."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tinyinterp.config import TransformerConfig

RETURN_TYPES = ("logits", "loss", "both", None)


def check_tokens(tokens: Any, cfg: TransformerConfig, *, is_resid: bool = False) -> jax.Array:
    """Validate tokens [batch, pos] (or a residual [batch, pos, d_model] with ``is_resid``) before
    any computation. Values are checked whenever they are concrete (outside a trace)."""
    if is_resid:
        x = jnp.asarray(tokens)
        if x.ndim != 3 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"with start_at_layer the input must be a residual stream "
                             f"[batch, pos, d_model={cfg.d_model}], got shape {tuple(x.shape)}")
        if x.shape[1] > cfg.n_ctx:
            raise ValueError(f"sequence length {x.shape[1]} exceeds n_ctx={cfg.n_ctx}")
        return x
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens)
    if not hasattr(tokens, "dtype") or not hasattr(tokens, "shape"):
        raise TypeError(f"tokens must be an integer array [batch, pos], got {type(tokens).__name__}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}; token ids index the "
                        f"vocabulary [0, {cfg.d_vocab}) (use tokens.astype(jnp.int32) if they are "
                        "whole numbers stored as floats)")
    if tokens.ndim != 2:
        hint = " (add a batch axis: tokens[None])" if tokens.ndim == 1 else ""
        raise ValueError(f"tokens must have rank 2 [batch, pos], got shape {tuple(tokens.shape)}"
                         + hint)
    if tokens.shape[1] > cfg.n_ctx:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds n_ctx={cfg.n_ctx}; "
                         f"truncate to tokens[:, :{cfg.n_ctx}] or build a model with larger n_ctx")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
    if not isinstance(tokens, jax.core.Tracer):
        t = np.asarray(tokens)
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= cfg.d_vocab:
            bad = t[(t < 0) | (t >= cfg.d_vocab)]
            raise ValueError(f"token ids must lie in [0, d_vocab={cfg.d_vocab}); found "
                             f"{np.unique(bad)[:10].tolist()} (min {lo}, max {hi})")
    return jnp.asarray(tokens, dtype=jnp.int32)


def layer_range(start_at_layer: int | None, stop_at_layer: int | None,
                n_layers: int) -> tuple[int, int]:
    """(first block to run, one past the last) from TL's start_at_layer / stop_at_layer (negative
    indices count from the end; None means the first / past the last block)."""

    def index(i: int | None, what: str, default: int) -> int:
        if i is None:
            return default
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{what} must be an int or None, got {i!r}")
        j = i + n_layers if i < 0 else i
        if not 0 <= j <= n_layers:
            raise ValueError(f"{what}={i} is out of range for a model with {n_layers} layers")
        return j

    start = index(start_at_layer, "start_at_layer", 0)
    stop = index(stop_at_layer, "stop_at_layer", n_layers)
    if start > stop:
        raise ValueError(f"start_at_layer={start_at_layer} comes after stop_at_layer="
                         f"{stop_at_layer}: the run would go backwards (blocks {start} to {stop})")
    return start, stop


def check_return_type(return_type: str | None, start_at_layer: int | None) -> None:
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    if start_at_layer is not None and return_type in ("loss", "both"):
        raise ValueError("return_type 'loss'/'both' needs tokens; with start_at_layer the input is "
                         "the residual stream, so compute the loss from the logits yourself")
