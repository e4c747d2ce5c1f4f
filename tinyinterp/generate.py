"""Sampling from a HookedTransformer: one compiled program for the whole generation.

The prompt is written into a fixed-size token buffer [batch, prompt + max_new_tokens]; a
``jax.lax.fori_loop`` runs the (causal) forward pass over the whole buffer at each step and writes
the next token at the next position. Positions after the current one hold placeholders that a
causal model cannot see, so the logits used are exactly those of the prompt so far. Shapes never
change, so nothing recompiles per token (the program is cached per model config, buffer shape,
sampling settings and hooks). There is no KV cache: each step costs one forward pass over the
buffer, which is what a toy model on a CPU can afford and keeps hooks seeing every position.

Hooks (``fwd_hooks``, e.g. steering vectors from tinyinterp.steering) run at every step; a hook
sees the whole buffer, so position-dependent hooks use absolute positions. A hook that mixes
information across positions (e.g. a mean over positions) would see the placeholders.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from tinyinterp.hooks import hook_names, resolve_fwd_hooks
from tinyinterp.model import HookedTransformer, check_tokens, forward


def _static_hooks(fwd_hooks) -> tuple:
    """fwd_hooks -> a hashable tuple of (name or tuple of names or predicate, fn)."""
    out = []
    for entry in fwd_hooks or ():
        if not (isinstance(entry, tuple) and len(entry) == 2 and callable(entry[1])):
            raise TypeError(f"each fwd_hook must be a (name, fn) pair, got {entry!r}")
        target, fn = entry
        if isinstance(target, list):
            target = tuple(target)
        out.append((target, fn))
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("cfg", "n_prompt", "max_new_tokens", "temperature",
                                             "top_k", "greedy", "fwd_hooks"))
def _generate_program(params, buffer, key, *, cfg, n_prompt, max_new_tokens, temperature, top_k,
                      greedy, fwd_hooks):
    """buffer [batch, n_prompt + max_new_tokens] with the prompt in front -> the filled buffer."""
    hooks = list(fwd_hooks)

    def step(i, buf):
        cur = n_prompt + i  # position being written
        logits = forward(params, cfg, buf, fwd_hooks=hooks)  # [batch, total, d_vocab_out]
        # the logits at position cur - 1 predict token cur: [batch, d_vocab_out]
        last = jax.lax.dynamic_index_in_dim(logits, cur - 1, axis=1, keepdims=False)
        if greedy:
            nxt = jnp.argmax(last, axis=-1)
        else:
            scaled = last / jnp.float32(temperature)
            if top_k is not None:
                kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]  # [batch, 1]: the k-th largest
                scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
            nxt = jax.random.categorical(jax.random.fold_in(key, i), scaled, axis=-1)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype)[:, None], cur,
                                                   axis=1)

    return jax.lax.fori_loop(0, max_new_tokens, step, buffer)


def generate(model: HookedTransformer, tokens: Int[Array, "batch pos"], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, greedy: bool = False,
             fwd_hooks=(), seed: int = 0) -> Int[Array, "batch pos_plus_new"]:
    """Sample ``max_new_tokens`` tokens after ``tokens``; returns [batch, pos + max_new_tokens].

    ``greedy`` (or ``temperature=0``) takes the argmax; otherwise softmax(logits / temperature)
    restricted to the ``top_k`` most likely tokens (None = all). Deterministic for a ``seed``
    (step i uses ``fold_in(key(seed), i)``). ``fwd_hooks`` as in run_with_hooks, applied at every
    step. The result may not exceed n_ctx tokens: a longer request is an error (there is no
    sliding window)."""
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"generate needs a HookedTransformer, got {type(model).__name__}")
    cfg = model.cfg
    tokens = check_tokens(tokens, cfg)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or (
            max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    n_batch, n_prompt = tokens.shape
    total = n_prompt + int(max_new_tokens)
    if total > cfg.n_ctx:
        raise ValueError(
            f"generate: prompt of {n_prompt} tokens + max_new_tokens={max_new_tokens} = {total} "
            f"exceeds the model's context n_ctx={cfg.n_ctx}; ask for at most "
            f"{cfg.n_ctx - n_prompt} new tokens (or shorten the prompt)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
    greedy = bool(greedy) or temperature == 0
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= cfg.d_vocab_out):
        raise ValueError(f"top_k must be None or an int in [1, d_vocab_out={cfg.d_vocab_out}], "
                         f"got {top_k!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    hooks = _static_hooks(fwd_hooks)
    resolve_fwd_hooks(hooks, hook_names(cfg))  # unknown hook names: a clear error now
    if max_new_tokens == 0:
        return tokens
    buffer = jnp.zeros((n_batch, total), jnp.int32).at[:, :n_prompt].set(tokens)
    return _generate_program(model.params, buffer, jax.random.key(int(seed)), cfg=cfg,
                             n_prompt=n_prompt, max_new_tokens=int(max_new_tokens),
                             temperature=float(temperature), top_k=None if top_k is None
                             else int(top_k), greedy=greedy, fwd_hooks=hooks)


__all__ = ["generate"]
