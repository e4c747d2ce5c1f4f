"""The forward pass, top to bottom: norms, embed, attention, mlp, block, forward, loss, the model.

Axis vocabulary: batch, pos (query_pos, key_pos), head_index, d_model, d_head, d_mlp, d_vocab.
Every hook point of ``tinyinterp.hooks.hook_names(cfg)`` is visited in every run through ``hp``
(a ``HookContext``): ``x = hp("blocks.0.hook_resid_pre", x)`` reads like TransformerLens'
``self.hook_resid_pre(x)``, and costs nothing when nobody caches or hooks that point.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from tinyinterp import attention as attn_backends
from tinyinterp.config import TransformerConfig
from tinyinterp.hooks import (
    HookContext,
    NamesFilter,
    hook_names,
    resolve_fwd_hooks,
    resolve_names,
    zero_like_tree,
)
from tinyinterp.params import Params, count_params, init_params

RETURN_TYPES = ("logits", "loss", "both", None)


# ----------------------------------------------------------------------------- pieces
def normalize(x: Float[Array, "batch pos d_model"], p: dict, name: str, cfg: TransformerConfig,
              hp: HookContext, *, affine: bool = True) -> Float[Array, "batch pos d_model"]:
    """LN / LNPre / RMS / RMSPre / None, as TransformerLens: hook_scale is sqrt(mean(x^2) + eps)
    [batch, pos, 1] (after centring for LN*); hook_normalized is x / scale, before the weight w
    and bias b are applied (TL's convention). ``affine=False`` stops there: the caller applies w
    and b itself (``apply_affine``) or folds them into its next matmul (``fold_affine``)."""
    kind = cfg.normalization_type
    if kind is None:
        return x
    if kind in ("LN", "LNPre"):
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    scale = hp(f"{name}.hook_scale", jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.eps))
    x = hp(f"{name}.hook_normalized", x / scale)
    return apply_affine(x, p, cfg) if affine else x


def apply_affine(x: Float[Array, "batch pos d_model"], p: dict,
                 cfg: TransformerConfig) -> Float[Array, "batch pos d_model"]:
    """x * w + b (LN), x * w (RMS), x (the rest): a norm's weight and bias."""
    if cfg.normalization_type == "LN":
        return x * p["w"][None, None] + p["b"][None, None]  # [d_model] -> [1, 1, d_model]
    if cfg.normalization_type == "RMS":
        return x * p["w"][None, None]
    return x


def fold_affine(W: Float[Array, "d_model n_out"], bias: Float[Array, " n_out"], p: dict,
                cfg: TransformerConfig
                ) -> tuple[Float[Array, "d_model n_out"], Float[Array, " n_out"]]:
    """(x * w + b) @ W + bias = x @ (w[:, None] * W) + (b @ W + bias): a norm's weight and bias
    folded into the matmul that follows it (the same function; rounding differs at float32
    precision), so the normalized activations are never scaled in a pass of their own."""
    if cfg.normalization_type in ("LN", "RMS"):
        W_folded = p["w"][:, None] * W  # [d_model, 1] * [d_model, n]
        if cfg.normalization_type == "LN":
            bias = bias + p["b"] @ W
        return W_folded, bias
    return W, bias


def activation(x: jax.Array, act_fn: str) -> jax.Array:
    """TL's activations: "gelu" is the exact erf GELU, "gelu_new"/"gelu_fast" the tanh one."""
    if act_fn == "relu":
        return jax.nn.relu(x)
    if act_fn == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if act_fn == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    if act_fn == "gelu_fast":  # 0.5 x (1 + tanh(x * 0.7978845608 * (1 + 0.044715 x^2)))
        return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
    if act_fn == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown act_fn {act_fn!r}")


def embed(params: Params, tokens: Int[Array, "batch pos"], cfg: TransformerConfig,
          hp: HookContext) -> Float[Array, "batch pos d_model"]:
    """Token + learned positional embedding. Out-of-range tokens are rejected before the forward
    pass when their values are known; inside a trace they embed as NaN (never silently clamped)."""
    W_E = params["embed"]["W_E"]  # [d_vocab, d_model]
    in_range = (tokens >= 0) & (tokens < cfg.d_vocab)  # [batch, pos]
    safe = jnp.where(in_range, tokens, 0)
    tok = jnp.where(in_range[..., None], W_E[safe], jnp.nan)  # [batch, pos, d_model]
    tok = hp("hook_embed", tok)
    n_pos = tokens.shape[1]
    pos = jnp.broadcast_to(params["pos_embed"]["W_pos"][:n_pos], tok.shape)  # [batch, pos, d_model]
    pos = hp("hook_pos_embed", pos)
    return tok + pos


def attention(p: dict, x: Float[Array, "batch pos d_model"], ln: dict, layer: int,
              cfg: TransformerConfig, hp: HookContext, backend: str
              ) -> Float[Array, "batch pos d_model"]:
    """Multi-head causal self-attention with TL's hook points. ``x`` is the normalized input
    before the norm's weight and bias ``ln`` (TL has no hook point between the two), which are
    applied here or folded into the q/k/v matmul."""
    name = f"blocks.{layer}.attn"
    n_batch, n_pos, d_model = x.shape
    scale = 1.0 / math.sqrt(cfg.d_head)
    s_name, p_name = f"{name}.hook_attn_scores", f"{name}.hook_pattern"
    qkv_names = [f"{name}.hook_{c}" for c in "qkv"]
    packed = (backend == "numba" and not any(hp.wants(n) for n in qkv_names)
              and not hp.replaces(s_name) and not hp.replaces(p_name))
    # q, k, v are needed on their own (read by a cache, or the scores/pattern edited) but nobody
    # edits them: one kernel writes the three, the norm's weight and bias folded into W
    qkv_kernel = (not packed and backend == "numba" and not any(hp.replaces(n) for n in qkv_names)
                  and x.dtype == p["W_Q"].dtype == jnp.float32
                  and attn_backends.qkv_supported(cfg.n_heads, cfg.d_head))
    if qkv_kernel:
        W, b = _packed_qkv_weights(p, ln, cfg)
        qkv = _kernel_with_reference_grad(  # kernels/block.py: qkv_fwd
            lambda x, W, b: attn_backends.qkv_fwd(x, W, b, cfg.n_heads),
            lambda x, W, b: _qkv_reference(x, W, b, cfg.n_heads))(x, W, b)
        q, k, v = (hp(n, a) for n, a in zip(qkv_names, qkv, strict=True))
        return _attention_from_qkv(p, q, k, v, name, hp, backend, scale)
    if not packed:
        x = apply_affine(x, ln, cfg)
    x2 = x.reshape(n_batch * n_pos, d_model)  # [batch*pos, d_model]: plain 2-D matmuls
    # The Numba kernel takes q, k, v as they are, so a bias add would be a pass of its own over
    # each: there x gets a last column of ones (XLA fuses it into the layer norm that makes x) and
    # the bias rides in the matmul against [W; b]. The XLA attention copies q, k, v into its own
    # layout anyway and fuses the bias add into that copy.
    if backend == "numba":
        x2 = jnp.concatenate([x2, jnp.ones((n_batch * n_pos, 1), x.dtype)], axis=1)
    if packed:
        # Nobody looks at q, k, v: one matmul makes them packed [batch, pos, 3, head, d_head],
        # with the norm's weight and bias folded into it; the kernel reads them in place, and the
        # backward is one matmul for their input gradients and one for the weights. (When q, k
        # or v are read, the qkv kernel above writes them as three arrays.)
        qkv = _project_packed(x2, p, ln, cfg, n_batch, n_pos)
        z, scores, pattern = attn_backends.packed_causal_attention(
            qkv, backend=backend, scale=scale, scores=hp.wants(s_name), pattern=hp.wants(p_name))
        for hook_name, value in ((s_name, scores), (p_name, pattern)):
            if value is not None:
                hp(hook_name, value)
        return _attention_out(p, z, name, hp, backend)
    q = hp(f"{name}.hook_q", _project(x2, p["W_Q"], p["b_Q"], n_batch, n_pos))
    k = hp(f"{name}.hook_k", _project(x2, p["W_K"], p["b_K"], n_batch, n_pos))
    v = hp(f"{name}.hook_v", _project(x2, p["W_V"], p["b_V"], n_batch, n_pos))
    return _attention_from_qkv(p, q, k, v, name, hp, backend, scale)


def _attention_from_qkv(p: dict, q: Float[Array, "batch pos head d_head"],
                        k: Float[Array, "batch pos head d_head"],
                        v: Float[Array, "batch pos head d_head"], name: str, hp: HookContext,
                        backend: str, scale: float) -> Float[Array, "batch pos d_model"]:
    """Attention from separate q, k, v: the scores and pattern (materialised, written for a
    cache, or never built), z and the output."""
    s_name, p_name = f"{name}.hook_attn_scores", f"{name}.hook_pattern"
    if hp.replaces(s_name) or hp.replaces(p_name):
        # Someone edits the scores/pattern (or probes them for gradients): materialise them and
        # compute z from the (edited) pattern.
        scores = attn_backends.attention_scores(q, k, backend=backend, scale=scale)
        scores = hp(s_name, scores)  # [batch, head, query_pos, key_pos]
        pattern = hp(p_name, attn_backends.attention_pattern(scores))
        z = attn_backends.apply_pattern(pattern, v, backend=backend)  # [batch, pos, head, d_head]
    elif hp.wants(s_name) or hp.wants(p_name):
        # Someone only reads them (a cache): the fused kernel writes the ones asked for as it goes.
        z, scores, pattern = attn_backends.causal_attention_with_pattern(
            q, k, v, backend=backend, scale=scale, scores=hp.wants(s_name),
            pattern=hp.wants(p_name))
        for hook_name, value in ((s_name, scores), (p_name, pattern)):
            if value is not None:
                hp(hook_name, value)  # recorded, not changed (nothing replaces these points)
    else:
        # Nobody does: the fused path never builds the [batch, head, pos, pos] pattern.
        z = attn_backends.causal_attention(q, k, v, backend=backend, scale=scale)
    return _attention_out(p, z, name, hp, backend)


def _attention_out(p: dict, z: Float[Array, "batch pos head d_head"], name: str,
                   hp: HookContext, backend: str) -> Float[Array, "batch pos d_model"]:
    """hook_z, then the heads' summed output (and hook_result if anyone wants it)."""
    z = hp(f"{name}.hook_z", z)
    W_O, b_O = p["W_O"], p["b_O"]
    r_name = f"{name}.hook_result"
    if not hp.wants(r_name):
        return _summed_out(z, W_O, b_O)
    if (not hp.replaces(r_name) and backend == "numba"
            and z.dtype == W_O.dtype == b_O.dtype == jnp.float32
            and attn_backends.attention_out_supported(W_O.shape[-1])):
        # hook_result is read, not edited: one kernel writes it and the summed output
        result, out = _kernel_with_reference_grad(  # kernels/block.py: attention_out_fwd
            attn_backends.attention_out_fwd, _attention_out_parts)(z, W_O, b_O)
        hp(r_name, result)
        return out
    result = hp(r_name, per_head_result(z, W_O))
    if hp.replaces(r_name):  # edited (or probed for gradients): use it
        return jnp.sum(result, axis=2) + b_O[None, None]
    return _summed_out(z, W_O, b_O)


def _summed_out(z: Float[Array, "batch pos head d_head"], W_O: Float[Array, "head d_head d_model"],
                b_O: Float[Array, " d_model"]) -> Float[Array, "batch pos d_model"]:
    """The attention output: z [batch, pos, head, d_head] @ W_O [head, d_head, d_model] summed
    over heads, + b_O, as one matmul [batch*pos, head*d_head] @ [head*d_head, d_model] (both
    reshapes are free in row-major order; the einsum form made XLA transpose z to
    [..., d_head, head] first)."""
    n_batch, n_pos, n_heads, d_head = z.shape
    d_model = W_O.shape[-1]
    return (z.reshape(n_batch * n_pos, n_heads * d_head) @ W_O.reshape(n_heads * d_head, d_model)
            + b_O[None]).reshape(n_batch, n_pos, d_model)  # b_O [d_model] -> [1, d_model]


def _attention_out_parts(z: Float[Array, "batch pos head d_head"],
                         W_O: Float[Array, "head d_head d_model"], b_O: Float[Array, " d_model"]
                         ) -> tuple[Float[Array, "batch pos head d_model"],
                                    Float[Array, "batch pos d_model"]]:
    """(hook_result, the summed output) in jnp."""
    return per_head_result(z, W_O), _summed_out(z, W_O, b_O)


def _kernel_with_reference_grad(kernel: Callable, reference: Callable) -> Callable:
    """``kernel``'s values with ``reference``'s autodiff rule (both take the same differentiable
    arguments and compute the same function): under ``jax.grad`` the forward runs ``reference``,
    saving what its backward needs, and the backward is its vjp; so the kernel runs only in
    forwards nobody differentiates, and gradients are exactly the reference path's."""
    fn = jax.custom_vjp(kernel)
    fn.defvjp(lambda *args: jax.vjp(reference, *args), lambda vjp, ct: vjp(ct))
    return fn


def _qkv_reference(x: Float[Array, "batch pos d_model"], W: Float[Array, "d_model n_qkv"],
                   b: Float[Array, " n_qkv"], n_heads: int
                   ) -> tuple[Float[Array, "batch pos head d_head"], ...]:
    """q, k, v = x @ W + b split three ways (W, b from _packed_qkv_weights), in jnp."""
    n_batch, n_pos, d_model = x.shape
    qkv = (x.reshape(n_batch * n_pos, d_model) @ W + b[None]).reshape(n_batch, n_pos, 3, n_heads, -1)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _project_packed(x2: Float[Array, "batch_pos d_model_plus_1"], p: dict, ln: dict,
                    cfg: TransformerConfig, n_batch: int, n_pos: int
                    ) -> Float[Array, "batch pos 3 head d_head"]:
    """[x, 1] @ [[W_Q W_K W_V]; [b_Q b_K b_V]] as one matmul, reshaped (for free) to q, k, v
    packed as [batch, pos, 3, head, d_head]; the norm's weight and bias folded in."""
    n_heads, _, d_head = p["W_Q"].shape
    W, b = _packed_qkv_weights(p, ln, cfg)
    W1 = jnp.concatenate([W, b[None]], axis=0)  # [d_model + 1, 3*h*d]
    return (x2 @ W1).reshape(n_batch, n_pos, 3, n_heads, d_head)


def _packed_qkv_weights(p: dict, ln: dict, cfg: TransformerConfig
                        ) -> tuple[Float[Array, "d_model n_qkv"], Float[Array, " n_qkv"]]:
    """[W_Q W_K W_V] as one [d_model, 3*head*d_head] matrix (columns q, k, v, each head-major)
    and its bias [3*head*d_head], with the norm's weight and bias folded in (fold_affine)."""
    n_heads, d_model, d_head = p["W_Q"].shape
    W = jnp.stack([p["W_Q"], p["W_K"], p["W_V"]])  # [3, head, d_model, d_head]
    b = jnp.stack([p["b_Q"], p["b_K"], p["b_V"]])  # [3, head, d_head]
    return fold_affine(jnp.transpose(W, (2, 0, 1, 3)).reshape(d_model, 3 * n_heads * d_head),
                       b.reshape(3 * n_heads * d_head), ln, cfg)


def _project(x2: Float[Array, "batch_pos d_in"], W: Float[Array, "head d_model d_head"],
             b: Float[Array, "head d_head"], n_batch: int, n_pos: int
             ) -> Float[Array, "batch pos head d_head"]:
    """x @ W + b for every head at once, as one flat matmul x [batch*pos, d_model] @
    [d_model, head*d_head] reshaped (for free, row-major) to [batch, pos, head, d_head].

    If x carries a last column of ones ([batch*pos, d_model + 1]), the bias is the matmul's last
    row ([x, 1] @ [W; b]) and no separate add runs. Measured on CPU (XLA's YNNPACK matmuls): the
    einsum "bpm,hmd->bphd" + b[None, None], and a flat matmul + b too, ran the add as a separate
    pass over each of q, k and v when nothing else consumes them before the Numba kernel."""
    n_heads, d_model, d_head = W.shape
    W2 = jnp.transpose(W, (1, 0, 2)).reshape(d_model, n_heads * d_head)  # [d_model, head*d_head]
    b2 = b.reshape(1, n_heads * d_head)
    if x2.shape[1] == d_model + 1:  # ones column: [W; b] [d_model + 1, head*d_head]
        out = x2 @ jnp.concatenate([W2, b2], axis=0)
    else:
        out = x2 @ W2 + b2
    return out.reshape(n_batch, n_pos, n_heads, d_head)


_BLOCK_DIAGONAL_MAX_HEADS = 4  # per_head_result's block-diagonal form up to this many heads


def per_head_result(z: Float[Array, "batch pos head d_head"],
                    W_O: Float[Array, "head d_head d_model"]) -> Float[Array, "batch pos head d_model"]:
    """Each head's output z_h @ W_O[h] (TL's hook_result) [batch, pos, head, d_model].

    Up to ``_BLOCK_DIAGONAL_MAX_HEADS`` heads: one flat matmul of z [batch*pos, head*d_head] with
    the block-diagonal [head*d_head, head*d_model] matrix holding W_O[h] in block (h, h); the
    result comes out in [batch, pos, head, d_model] order (the reshapes are free). It does head x
    the multiply-adds, but needs no transposes: in the full-cache forward of the 4-head benchmark
    model it measured ~6-12% faster than the batched form. With more heads the extra work
    outgrows that (at 12 heads of 64, d_model 768, ~6x slower), so there one batched matmul over
    heads runs, with a transpose of z in and of the result out (~2x faster than the direct
    "bphd,hdm->bphm" einsum)."""
    n_batch, n_pos, n_heads, d_head = z.shape
    d_model = W_O.shape[-1]
    if n_heads <= _BLOCK_DIAGONAL_MAX_HEADS:
        eye = jnp.eye(n_heads, dtype=W_O.dtype)
        # [head, d_head, 1, d_model] * [head, 1, head', 1] -> [head, d_head, head', d_model]
        W_blocks = (W_O[:, :, None, :] * eye[:, None, :, None]).reshape(n_heads * d_head,
                                                                          n_heads * d_model)
        r = z.reshape(n_batch * n_pos, n_heads * d_head) @ W_blocks  # [batch*pos, head*d_model]
        return r.reshape(n_batch, n_pos, n_heads, d_model)
    zh = jnp.transpose(z, (2, 0, 1, 3)).reshape(n_heads, n_batch * n_pos, d_head)
    r = jnp.einsum("hnd,hdm->hnm", zh, W_O)  # [head, batch*pos, d_model]
    return jnp.transpose(r.reshape(n_heads, n_batch, n_pos, d_model), (1, 2, 0, 3))


def _dense3(x: Float[Array, "batch pos n_in"], W: Float[Array, "n_in n_out"]
            ) -> Float[Array, "batch pos n_out"]:
    """x @ W over the last axis as one flat [batch*pos, n_in] @ [n_in, n_out] matmul (the
    reshapes are free). Measured in the reference training step: the unembedding as the einsum
    "bpm,mv->bpv" cost 11.4 ms per step, as this flat matmul 10.7 ms (XLA transposed for the
    einsum's weight gradient)."""
    n_batch, n_pos, n_in = x.shape
    return (x.reshape(n_batch * n_pos, n_in) @ W).reshape(n_batch, n_pos, W.shape[1])


def mlp(p: dict, x: Float[Array, "batch pos d_model"], layer: int, cfg: TransformerConfig,
        hp: HookContext) -> Float[Array, "batch pos d_model"]:
    # x [batch, pos, d_model] @ W_in [d_model, d_mlp] -> [batch, pos, d_mlp]
    pre = hp(f"blocks.{layer}.mlp.hook_pre", _dense3(x, p["W_in"])
             + p["b_in"][None, None])
    post = hp(f"blocks.{layer}.mlp.hook_post", activation(pre, cfg.act_fn))
    # post [batch, pos, d_mlp] @ W_out [d_mlp, d_model] -> [batch, pos, d_model]
    return _dense3(post, p["W_out"]) + p["b_out"][None, None]


def block(p: dict, resid: Float[Array, "batch pos d_model"], layer: int, cfg: TransformerConfig,
          hp: HookContext, backend: str) -> Float[Array, "batch pos d_model"]:
    b = f"blocks.{layer}"
    resid_pre = hp(f"{b}.hook_resid_pre", resid)
    after = f"{b}.hook_resid_post" if cfg.attn_only else f"{b}.hook_resid_mid"
    if _fused_sublayer_ok(resid_pre, layer, cfg, hp, backend):
        resid_mid = hp(after, _fused_attention_sublayer(p, resid_pre, layer, cfg))
    else:
        resid_mid = hp(after, resid_pre + _attention_sublayer(p, resid_pre, layer, cfg, hp, backend))
    if cfg.attn_only:
        return resid_mid
    mlp_in = normalize(resid_mid, p.get("ln2", {}), f"{b}.ln2", cfg, hp)
    mlp_out = hp(f"{b}.hook_mlp_out", mlp(p["mlp"], mlp_in, layer, cfg, hp))
    return hp(f"{b}.hook_resid_post", resid_mid + mlp_out)


def _attention_sublayer(p: dict, resid: Float[Array, "batch pos d_model"], layer: int,
                        cfg: TransformerConfig, hp: HookContext, backend: str
                        ) -> Float[Array, "batch pos d_model"]:
    """ln1, attention, hook_attn_out: the attention sublayer's output (before the residual add)."""
    b = f"blocks.{layer}"
    attn_in = normalize(resid, p.get("ln1", {}), f"{b}.ln1", cfg, hp, affine=False)
    return hp(f"{b}.hook_attn_out",
              attention(p["attn"], attn_in, p.get("ln1", {}), layer, cfg, hp, backend))


def _sublayer_hooks(layer: int, cfg: TransformerConfig) -> list[str]:
    """The hook points strictly inside a block's attention sublayer."""
    b = f"blocks.{layer}"
    names = [] if cfg.normalization_type is None else [f"{b}.ln1.hook_scale",
                                                        f"{b}.ln1.hook_normalized"]
    names += [f"{b}.attn.hook_{k}" for k in ("q", "k", "v", "attn_scores", "pattern", "z",
                                             "result")]
    return names + [f"{b}.hook_attn_out"]


def _fused_sublayer_ok(resid: jax.Array, layer: int, cfg: TransformerConfig, hp: HookContext,
                       backend: str) -> bool:
    """Does the fused kernel run this block's attention sublayer? On the Numba backend, in
    float32, for the shapes it takes, when nobody reads or edits a hook point inside the sublayer
    (a cache of them takes the unfused path, which writes them faster: kernels/block.py)."""
    return (backend == "numba" and resid.dtype == jnp.float32
            and attn_backends.attention_block_supported(resid.shape[0], cfg.d_model, cfg.n_heads,
                                                        cfg.d_head)
            and not any(hp.wants(n) for n in _sublayer_hooks(layer, cfg)))


def _fused_attention_sublayer(p: dict, resid: Float[Array, "batch pos d_model"], layer: int,
                              cfg: TransformerConfig) -> Float[Array, "batch pos d_model"]:
    """resid + the attention sublayer, by one fused kernel (kernels/block.py), with the unfused
    path's (``_attention_sublayer``) autodiff rule."""

    def fused(p_attn, ln, x):
        W, bias = _packed_qkv_weights(p_attn, ln, cfg)
        return attn_backends.attention_block_fwd(
            x, W, bias, p_attn["W_O"], p_attn["b_O"], scale=1.0 / math.sqrt(cfg.d_head),
            eps=cfg.eps, norm=cfg.normalization_type)

    def unfused(p_attn, ln, x):
        return x + _attention_sublayer({"attn": p_attn, "ln1": ln}, x, layer, cfg, HookContext(),
                                       "numba")

    return _kernel_with_reference_grad(fused, unfused)(p["attn"], p.get("ln1", {}), resid)


def unembed(params: Params, resid: Float[Array, "batch pos d_model"], cfg: TransformerConfig,
            hp: HookContext) -> Float[Array, "batch pos d_vocab_out"]:
    ln, W_U, b_U = params.get("ln_final", {}), params["unembed"]["W_U"], params["unembed"]["b_U"]
    x = normalize(resid, ln, "ln_final", cfg, hp, affine=False)
    if hp.wants("unembed.hook_in"):
        x = hp("unembed.hook_in", apply_affine(x, ln, cfg))
    else:  # nobody looks at the norm's output: its weight and bias go into the unembedding
        W_U, b_U = fold_affine(W_U, b_U, ln, cfg)
    # x [batch, pos, d_model] @ W_U [d_model, d_vocab_out] -> [batch, pos, d_vocab_out]
    logits = _dense3(x, W_U)
    return hp("unembed.hook_out", logits + b_U[None, None])


# ----------------------------------------------------------------------------- the whole pass
def _layer_index(i: int | None, n_layers: int, what: str) -> int | None:
    if i is None:
        return None
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"{what} must be an int or None, got {i!r}")
    j = i + n_layers if i < 0 else i
    if not 0 <= j <= n_layers:
        raise ValueError(f"{what}={i} is out of range for a model with {n_layers} layers")
    return j


def run(params: Params, cfg: TransformerConfig, inputs: jax.Array, hp: HookContext, *,
        start_at_layer: int | None = None, stop_at_layer: int | None = None) -> jax.Array:
    """Tokens [batch, pos] (or, with ``start_at_layer``, the residual [batch, pos, d_model]) ->
    logits [batch, pos, d_vocab_out] (or, with ``stop_at_layer``, the residual before that block)."""
    backend = attn_backends.resolve_backend(cfg.attention_backend)
    start = _layer_index(start_at_layer, cfg.n_layers, "start_at_layer") or 0
    stop = _layer_index(stop_at_layer, cfg.n_layers, "stop_at_layer")
    resid = embed(params, inputs, cfg, hp) if start_at_layer is None else inputs
    for layer in range(start, cfg.n_layers if stop is None else stop):
        resid = block(params["blocks"][layer], resid, layer, cfg, hp, backend)
    if stop is not None:
        return resid
    return unembed(params, resid, cfg, hp)


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


def _output(logits_or_resid, tokens, return_type, loss_per_token, stop_at_layer):
    if stop_at_layer is not None or return_type == "logits":
        return logits_or_resid
    if return_type is None:
        return None
    loss = lm_cross_entropy_loss(logits_or_resid, tokens, per_token=loss_per_token)
    return loss if return_type == "loss" else (logits_or_resid, loss)


def forward(params: Params, cfg: TransformerConfig, tokens: jax.Array, *,
            return_type: str | None = "logits", loss_per_token: bool = False,
            fwd_hooks=(), start_at_layer: int | None = None,
            stop_at_layer: int | None = None) -> Any:
    """Pure forward pass: ``forward(params, cfg, tokens)`` -> logits [batch, pos, d_vocab_out].

    jit-able with ``cfg`` static. ``fwd_hooks``: ``[(name | names | predicate, fn)]``."""
    _check_return_type(return_type, start_at_layer)
    hp = HookContext(fwd_hooks=resolve_fwd_hooks(fwd_hooks, hook_names(cfg)))
    out = run(params, cfg, tokens, hp, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer)
    return _output(out, tokens, return_type, loss_per_token, stop_at_layer)


def forward_with_cache(params: Params, cfg: TransformerConfig, tokens: jax.Array,
                       names: frozenset[str] | list[str], *, return_type: str | None = "logits",
                       loss_per_token: bool = False, fwd_hooks=(),
                       start_at_layer: int | None = None, stop_at_layer: int | None = None,
                       deltas: dict[str, jax.Array] | None = None) -> tuple[Any, dict[str, Array]]:
    """Pure forward pass that also returns {hook name: activation} for ``names``.

    ``deltas`` (zeros, by hook name) are added at their hook points; differentiating with respect
    to them gives the gradient of any scalar at those points."""
    _check_return_type(return_type, start_at_layer)
    hp = HookContext(fwd_hooks=resolve_fwd_hooks(fwd_hooks, hook_names(cfg)),
                     cache_names=frozenset(names), deltas=deltas)
    out = run(params, cfg, tokens, hp, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer)
    return _output(out, tokens, return_type, loss_per_token, stop_at_layer), hp.cache


def _check_return_type(return_type, start_at_layer) -> None:
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    if start_at_layer is not None and return_type in ("loss", "both"):
        raise ValueError("return_type 'loss'/'both' needs tokens; with start_at_layer the input is "
                         "the residual stream, so compute the loss from the logits yourself")


# ----------------------------------------------------------------------------- input checks
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


# ----------------------------------------------------------------------------- the model object
@functools.partial(jax.jit, static_argnames=("cfg", "return_type", "loss_per_token",
                                             "start_at_layer", "stop_at_layer"))
def _jit_forward(params, tokens, cfg, return_type, loss_per_token, start_at_layer, stop_at_layer):
    return forward(params, cfg, tokens, return_type=return_type, loss_per_token=loss_per_token,
                   start_at_layer=start_at_layer, stop_at_layer=stop_at_layer)


@functools.partial(jax.jit, static_argnames=("cfg", "names", "return_type", "loss_per_token",
                                             "start_at_layer", "stop_at_layer"))
def _jit_forward_with_cache(params, tokens, cfg, names, return_type, loss_per_token,
                            start_at_layer, stop_at_layer):
    return forward_with_cache(params, cfg, tokens, names, return_type=return_type,
                              loss_per_token=loss_per_token, start_at_layer=start_at_layer,
                              stop_at_layer=stop_at_layer)


@jax.tree_util.register_pytree_node_class
class HookedTransformer:
    """An immutable transformer: ``cfg`` (static) + ``params`` (a pytree). It is itself a pytree,
    so it passes through ``jax.jit``/``jax.grad``. Surgery returns a new model (``with_params``)."""

    def __init__(self, cfg: TransformerConfig, params: Params):
        self.cfg = cfg
        self.params = params

    # pytree protocol
    def tree_flatten(self):
        return (self.params,), self.cfg

    @classmethod
    def tree_unflatten(cls, cfg, children):
        return cls(cfg, children[0])

    # construction
    @classmethod
    def from_config(cls, cfg: TransformerConfig, seed: int = 0) -> HookedTransformer:
        """A freshly initialised model; the same (cfg, seed) gives bitwise the same params."""
        return cls(cfg, init_params(cfg, jax.random.key(seed)))

    def with_params(self, params: Params) -> HookedTransformer:
        return HookedTransformer(self.cfg, params)

    @property
    def hook_names(self) -> list[str]:
        """Every hook point of this model, in forward order."""
        return hook_names(self.cfg)

    @property
    def n_params(self) -> int:
        return count_params(self.params)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedTransformer(n_layers={c.n_layers}, d_model={c.d_model}, n_heads={c.n_heads}"
                f", d_head={c.d_head}, d_vocab={c.d_vocab}, n_ctx={c.n_ctx}, "
                f"attn_only={c.attn_only}, params={self.n_params:,})")

    # running
    def _inputs(self, tokens, start_at_layer):
        return check_tokens(tokens, self.cfg, is_resid=start_at_layer is not None)

    def __call__(self, tokens, return_type: str | None = "logits", *, loss_per_token: bool = False,
                 start_at_layer: int | None = None, stop_at_layer: int | None = None):
        """tokens [batch, pos] -> logits [batch, pos, d_vocab_out] | loss | (logits, loss)."""
        x = self._inputs(tokens, start_at_layer)
        _check_return_type(return_type, start_at_layer)
        return _jit_forward(self.params, x, self.cfg, return_type, loss_per_token,
                            start_at_layer, stop_at_layer)

    forward = __call__

    def run_with_hooks(self, tokens, fwd_hooks=(), return_type: str | None = "logits", *,
                       loss_per_token: bool = False, start_at_layer: int | None = None,
                       stop_at_layer: int | None = None):
        """Run with hooks ``[(name | names | predicate, fn(value, *, name) -> value)]`` applied in
        order. Runs as traced by the caller: wrap in ``jax.jit`` for speed (the model is a pytree)."""
        x = self._inputs(tokens, start_at_layer)
        return forward(self.params, self.cfg, x, return_type=return_type,
                       loss_per_token=loss_per_token, fwd_hooks=fwd_hooks,
                       start_at_layer=start_at_layer, stop_at_layer=stop_at_layer)

    def run_with_cache(self, tokens, names_filter: NamesFilter = None,
                       return_type: str | None = "logits", *, fwd_hooks=(),
                       incl_bwd: bool = False, metric: Callable[[Any], jax.Array] | None = None,
                       loss_per_token: bool = False, start_at_layer: int | None = None,
                       stop_at_layer: int | None = None, remove_batch_dim: bool = False):
        """(output, ActivationCache) for the hook points ``names_filter`` selects (None = all).

        ``incl_bwd=True`` also stores ``"{name}_grad"``: the gradient at each cached point of the
        scalar output (``return_type="loss"``) or of ``metric(output)``."""
        from tinyinterp.cache import ActivationCache

        x = self._inputs(tokens, start_at_layer)
        _check_return_type(return_type, start_at_layer)
        names = frozenset(resolve_names(names_filter, self.hook_names))
        if incl_bwd:
            out, cache = self._run_with_grads(x, names, return_type, fwd_hooks, metric,
                                              loss_per_token, start_at_layer, stop_at_layer)
        elif fwd_hooks:
            out, cache = forward_with_cache(self.params, self.cfg, x, names,
                                            return_type=return_type, loss_per_token=loss_per_token,
                                            fwd_hooks=fwd_hooks, start_at_layer=start_at_layer,
                                            stop_at_layer=stop_at_layer)
        else:
            out, cache = _jit_forward_with_cache(self.params, x, self.cfg, names, return_type,
                                                 loss_per_token, start_at_layer, stop_at_layer)
        cache = ActivationCache(cache, self, has_batch_dim=True)
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        return out, cache

    def _run_with_grads(self, x, names, return_type, fwd_hooks, metric, loss_per_token,
                        start_at_layer, stop_at_layer):
        def run_fn(deltas):
            return forward_with_cache(self.params, self.cfg, x, names, return_type=return_type,
                                      loss_per_token=loss_per_token, fwd_hooks=fwd_hooks,
                                      start_at_layer=start_at_layer, stop_at_layer=stop_at_layer,
                                      deltas=deltas)

        shapes = jax.eval_shape(lambda: run_fn(None)[1])

        def scalar(deltas):
            out, cache = run_fn(deltas)
            value = metric(out) if metric is not None else out
            if not (hasattr(value, "shape") and value.shape == ()):
                raise ValueError("incl_bwd=True needs a scalar: use return_type='loss' or pass "
                                 "metric=fn(output) -> scalar")
            return value, (out, cache)

        # One compiled program (op-by-op dispatch of a backward pass is slow); hooks are traced.
        grads, (out, cache) = jax.jit(jax.grad(scalar, has_aux=True))(zero_like_tree(shapes))
        cache = dict(cache)
        cache.update({f"{k}_grad": g for k, g in grads.items()})
        return out, cache

    # saving
    def save(self, path) -> None:
        """Write config + params (safetensors, never pickle) atomically to ``path``."""
        from tinyinterp.checkpoint import save_model

        save_model(self, path)

    @classmethod
    def load(cls, path) -> HookedTransformer:
        from tinyinterp.checkpoint import load_model

        return load_model(path)
