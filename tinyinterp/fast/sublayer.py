"""Runs a plan (tinyinterp.fast.plan) of a block's attention sublayer.

Each Numba kernel here is paired with the plain function it replaces (``with_reference_grad``):
under ``jax.grad`` the reference runs, so gradients are exactly the plain code's; the kernel runs
in forwards nobody differentiates. The "kernels" route visits the sublayer's hook points in the
order ``model.attention`` does, skipping only those nobody reads or edits (which the plan
guarantees), so a hook or a cache sees the same values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from tinyinterp import model as spec
from tinyinterp.config import TransformerConfig
from tinyinterp.fast import attention as kernels
from tinyinterp.fast import ffi
from tinyinterp.fast.plan import FUSED, PLAIN, Plan, plan_sublayer
from tinyinterp.hooks import HookContext


def with_reference_grad(kernel: Callable, reference: Callable) -> Callable:
    """``kernel``'s values with ``reference``'s autodiff rule (both take the same differentiable
    arguments and compute the same function): under ``jax.grad`` the forward runs ``reference``,
    saving what its backward needs, and the backward is its vjp."""
    fn = jax.custom_vjp(kernel)
    fn.defvjp(lambda *args: jax.vjp(reference, *args), lambda vjp, ct: vjp(ct))
    return fn


def attention_sublayer(plain: Callable, p: dict, resid: Float[Array, "batch pos d_model"],
                       layer: int, cfg: TransformerConfig, hp: HookContext, backend: str,
                       plan: Plan | None = None) -> Float[Array, "batch pos d_model"]:
    """resid + the attention sublayer, by ``plain`` (model.attention_sublayer) or by the plan made
    for it here (``plan`` forces one, for tests: it must be valid for the run's hooks)."""
    _check_attention_params(p, cfg, layer)
    if plan is None:
        plan = plan_sublayer(backend, cfg, hp, layer, resid.shape, resid.dtype)
        if plan != PLAIN and uneven_split(resid):
            plan = PLAIN
    if plan == PLAIN:
        return plain(p, resid, layer, cfg, hp)
    if plan == FUSED:  # its gradients: those of the plan the sublayer would run unfused
        unfused = plan_sublayer(backend, cfg, HookContext(), layer, resid.shape, resid.dtype,
                                exclude=("fused",))
        return with_reference_grad(
            lambda p, x: _fused(p, x, cfg),
            lambda p, x: attention_sublayer(plain, p, x, layer, cfg, HookContext(), backend,
                                            unfused))(p, resid)
    return _kernels(plan, p, resid, layer, cfg, hp)


_warned_uneven = False


def uneven_split(resid: jax.Array) -> bool:
    """Whether ``resid``'s batch lives on several devices that do not divide it (plain
    ``jax.jit`` on a mesh, issue 23): the kernels would need padded rows moved between the
    devices (``ffi.batch_local``), so the sublayer takes the XLA path, which XLA partitions
    itself. Warns once per process."""
    global _warned_uneven
    mesh, axes = ffi.batch_axes(resid)
    n_dev = math.prod(mesh.shape[n] for n in axes) if axes else 1
    if resid.shape[0] % n_dev == 0:
        return False
    if not _warned_uneven:
        _warned_uneven = True
        warnings.warn(f"tinyinterp: a batch of {resid.shape[0]} on {n_dev} devices (mesh axes "
                      f"{axes}), which do not divide it: the attention takes the XLA path, not "
                      "the Numba kernels (they run on equal per-device shares). Use a batch the "
                      "devices divide to run them.", RuntimeWarning, stacklevel=2)
    return True


def _check_attention_params(p: dict, cfg: TransformerConfig, layer: int) -> None:
    """The kernels read raw buffers: their shapes must be the config's (checked at trace time)."""
    h, m, d = cfg.n_heads, cfg.d_model, cfg.d_head
    want = {"W_Q": (h, m, d), "W_K": (h, m, d), "W_V": (h, m, d), "W_O": (h, d, m),
            "b_Q": (h, d), "b_K": (h, d), "b_V": (h, d), "b_O": (m,)}
    for k, shape in want.items():
        got = tuple(jnp.shape(p["attn"][k]))
        if got != shape:
            raise ValueError(f"blocks.{layer}.attn.{k} has shape {got}, but the config "
                             f"(n_heads={h}, d_model={m}, d_head={d}) needs {shape}")


def _packed_weights(p: dict, ln: dict, cfg: TransformerConfig
                    ) -> tuple[Float[Array, "d_model n_qkv"], Float[Array, " n_qkv"]]:
    """[W_Q W_K W_V] as one [d_model, 3*head*d_head] matrix (columns q, k, v, each head-major) and
    its bias, with the norm's weight w and bias b folded in: (x*w + b) @ W + c = x @ (w W) + (b W + c)."""
    h, m, d = p["W_Q"].shape
    W = jnp.stack([p["W_Q"], p["W_K"], p["W_V"]])  # [3, head, d_model, d_head]
    W = jnp.transpose(W, (2, 0, 1, 3)).reshape(m, 3 * h * d)  # [d_model, 3*head*d_head]
    bias = jnp.stack([p["b_Q"], p["b_K"], p["b_V"]]).reshape(3 * h * d)  # [3*head*d_head]
    if cfg.normalization_type in ("LN", "RMS"):
        if cfg.normalization_type == "LN":
            bias = bias + ln["b"] @ W
        W = ln["w"][:, None] * W  # [d_model, 1] * [d_model, 3*head*d_head]
    return W, bias


def _fused(p: dict, resid: jax.Array, cfg: TransformerConfig) -> jax.Array:
    W, bias = _packed_weights(p["attn"], p.get("ln1", {}), cfg)
    return kernels.attention_block_fwd(resid, W, bias, p["attn"]["W_O"], p["attn"]["b_O"],
                                       scale=1.0 / math.sqrt(cfg.d_head), eps=cfg.eps,
                                       norm=cfg.normalization_type)


def _qkv_reference(x: Float[Array, "batch pos d_model"], W: Float[Array, "d_model n_qkv"],
                   b: Float[Array, " n_qkv"], n_heads: int):
    """q, k, v = x @ W + b split three ways: [batch, pos, d_model] -> 3 x [batch, pos, head, d_head]
    (one 2-D matmul [batch*pos, d_model] @ [d_model, 3*head*d_head], then sliced)."""
    qkv = spec.linear(x, W, b).reshape(*x.shape[:2], 3, n_heads, -1)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _out_reference(z: Float[Array, "batch pos head d_head"], W_O: Float[Array, "head d_head d_model"],
                   b_O: Float[Array, " d_model"]):
    """(hook_result [batch, pos, head, d_model], the summed output [batch, pos, d_model])."""
    result = jnp.einsum("bphd,hdm->bphm", z, W_O)
    return result, jnp.sum(result, axis=2) + b_O[None, None]


def _summed_out(z: Float[Array, "batch pos head d_head"], W_O: Float[Array, "head d_head d_model"],
                b_O: Float[Array, " d_model"]) -> Float[Array, "batch pos d_model"]:
    """sum_h z_h @ W_O[h] + b_O as one matmul [batch*pos, head*d_head] @ [head*d_head, d_model]."""
    b, n, h, d = z.shape  # (reshapes that keep the batch axis whole: Explicit meshes split it)
    return spec.linear(z.reshape(b, n, h * d), W_O.reshape(h * d, W_O.shape[-1]), b_O)


def _kernels(plan: Plan, p: dict, resid: jax.Array, layer: int, cfg: TransformerConfig,
             hp: HookContext) -> jax.Array:
    """The "kernels" route: model.attention_sublayer step by step with the plan's kernels."""
    a, ln, pa = f"blocks.{layer}.attn", p.get("ln1", {}), p["attn"]
    scale = 1.0 / math.sqrt(cfg.d_head)
    x = spec.normalize(resid, ln, f"blocks.{layer}.ln1", cfg, hp, affine=False)  # w, b folded
    want_s, want_p = hp.wants(f"{a}.hook_attn_scores"), hp.wants(f"{a}.hook_pattern")
    if plan.qkv == "packed":  # q, k, v never leave the packed array; nobody reads the pattern
        W, bias = _packed_weights(pa, ln, cfg)
        # [batch*pos, d_model] @ [d_model, 3*head*d_head] -> [batch, pos, 3, head, d_head]
        qkv = spec.linear(x, W, bias).reshape(
            *x.shape[:2], 3, cfg.n_heads, cfg.d_head)
        z, _, _ = kernels.packed_causal_attention(qkv, backend="numba", scale=scale)
    else:
        W, bias = _packed_weights(pa, ln, cfg)  # q, k, v from one [d_model, 3*head*d_head] matrix
        if plan.qkv == "kernel":
            q, k, v = with_reference_grad(
                lambda x, W, b: kernels.qkv_fwd(x, W, b, cfg.n_heads),
                lambda x, W, b: _qkv_reference(x, W, b, cfg.n_heads))(x, W, bias)
        else:
            q, k, v = _qkv_reference(x, W, bias, cfg.n_heads)
        q, k, v = (hp(f"{a}.hook_{c}", t) for c, t in zip("qkv", (q, k, v), strict=True))
        if plan.core == "split":
            scores = hp(f"{a}.hook_attn_scores",
                        kernels.attention_scores(q, k, backend="numba", scale=scale))
            pattern = hp(f"{a}.hook_pattern", spec.softmax_pattern(scores))
            z = kernels.apply_pattern(pattern, v, backend="numba")
        elif plan.core == "writes":
            z, scores, pattern = kernels.causal_attention_with_pattern(
                q, k, v, backend="numba", scale=scale, scores=want_s, pattern=want_p)
            for name, value in ((f"{a}.hook_attn_scores", scores), (f"{a}.hook_pattern", pattern)):
                if value is not None:
                    hp(name, value)
        else:
            z = kernels.causal_attention(q, k, v, backend="numba", scale=scale)
    z = hp(f"{a}.hook_z", z)
    r = f"{a}.hook_result"
    if plan.out == "kernel":
        result, out = with_reference_grad(kernels.attention_out_fwd, _out_reference)(
            z, pa["W_O"], pa["b_O"])
        hp(r, result)
    elif hp.replaces(r):  # a hook edits the per-head results: the output is their sum
        out = jnp.sum(hp(r, jnp.einsum("bphd,hdm->bphm", z, pa["W_O"])), axis=2) + pa["b_O"][None, None]
    else:
        if hp.wants(r):
            hp(r, jnp.einsum("bphd,hdm->bphm", z, pa["W_O"]))
        out = _summed_out(z, pa["W_O"], pa["b_O"])
    return resid + hp(f"blocks.{layer}.hook_attn_out", out)
