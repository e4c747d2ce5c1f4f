"""Feature attribution on the hook points: metrics, gradients, integrated gradients, occlusion, LRP,
attention rollout, direct logit attribution and the logit lens.

    from tinyinterp import attribution as A
    metric = A.logit_diff(pos=-1, correct=answer_ids, wrong=other_ids)   # A.logit, A.log_prob, A.loss
    a = A.integrated_gradients(model, tokens, metric, steps=64, baseline="zeros")
    a.values     # [batch, pos, d_model]; a.per_position() [batch, pos]; a.completeness_error [batch]
    a = A.saliency(model, tokens, metric, at="blocks.1.attn.hook_z")      # any hook point
    a = A.lrp(model, tokens, metric, rule="conservative")                # or rule="attnlrp"
    r = A.attention_rollout(cache)                                       # [batch, pos, pos]
    dla = A.direct_logit_attribution(cache, metric)                      # per head / neuron / component
    lens = A.logit_lens(cache, tokens, metric)                           # per layer

A metric is ``fn(logits [batch, pos, d_vocab_out], tokens [batch, pos]) -> [batch]``: one value per
example, so attributions of a batch are the batch's own (rows never mix in a transformer). The
target (``at``) is the token embeddings by default: ``hook_embed`` and ``hook_pos_embed``, reported
separately in ``parts`` and summed in ``values`` (for saliency, whose gradient is the same at both,
``values`` is that gradient). Any hook point may be named instead; values are then shaped like that
point (per-head points give per-head attributions).

Every method is a pure function, runs inside ``jax.jit`` (the model is a pytree), on both attention
backends, and every sweep (integration points, occlusion windows, ablated features) is one compiled
batched program: the points are folded into the batch axis and chunked with ``lax.scan`` to bound
memory, never a Python loop of forwards. The modified backward passes of LRP are hooks that keep
each forward value and change only its gradient (``stop_gradient`` and two small ``custom_vjp``
identities); no second model is written.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from tinyinterp import sweeps
from tinyinterp.cache import ActivationCache
from tinyinterp.hooks import hook_names, resolve_names
from tinyinterp.model import activation, check_tokens, forward, forward_with_cache

__all__ = [
    "Attribution", "DirectLogitAttribution", "LogitLens", "Metric", "Occlusion", "Rollout",
    "attention_rollout", "direct_logit_attribution", "feature_ablation", "gradient_x_input",
    "integrated_gradients", "integration_points", "log_prob", "logit", "logit_diff", "logit_lens",
    "loss", "lrp", "occlusion", "saliency", "softmax_rule", "uniform_rule",
]

EMBEDDINGS = ("hook_embed", "hook_pos_embed")
IG_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
              "gausslegendre")
LRP_RULES = ("conservative", "attnlrp")
HEAD_FUSIONS = ("mean", "max", "min")
MetricFn = Callable[[jax.Array, jax.Array], jax.Array]


# ============================================================================ metrics
@functools.partial(jax.tree_util.register_dataclass, data_fields=["pos", "correct", "wrong"],
                   meta_fields=["kind"])
@dataclass(frozen=True)
class Metric:
    """A built-in metric: ``metric(logits, tokens) -> [batch]``. A pytree (the position and the
    token ids are its leaves), so it passes through ``jax.jit`` and a new position or new ids
    reuse the compiled program. ``linear_in_logits`` says whether it is a linear
    function of the logits (logit, logit_diff): then LRP's conservation and DLA are exact."""

    kind: str  # "logit" | "logit_diff" | "log_prob" | "loss"
    pos: int | None
    correct: Any = None  # int or [batch] token ids
    wrong: Any = None

    @property
    def linear_in_logits(self) -> bool:
        return self.kind in ("logit", "logit_diff")

    def __call__(self, logits: Float[Array, "batch pos d_vocab_out"],
                 tokens: Int[Array, "batch pos"]) -> Float[Array, " batch"]:
        if self.kind == "loss":
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [batch, pos-1, d_vocab_out]
            nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, pos-1]
            if self.pos is None:
                return jnp.mean(nll, axis=-1)
            return nll[:, self.pos]
        at = logits[:, self.pos]  # [batch, d_vocab_out]
        if self.kind == "log_prob":
            at = jax.nn.log_softmax(at, axis=-1)
        value = _pick(at, self.correct, "correct")
        if self.kind == "logit_diff":
            value = value - _pick(at, self.wrong, "wrong")
        return value


def _pick(at: Float[Array, "batch d_vocab_out"], ids, what: str) -> Float[Array, " batch"]:
    """at[b, ids[b]] with ids an int or [batch]; out-of-range ids are an error when concrete."""
    ids = jnp.asarray(ids)
    n_batch, d_vocab = at.shape
    if ids.ndim > 1 or (ids.ndim == 1 and ids.shape[0] != n_batch):
        raise ValueError(f"metric: {what} token ids must be an int or one per example [batch="
                         f"{n_batch}], got shape {tuple(ids.shape)}")
    if not isinstance(ids, jax.core.Tracer):
        lo, hi = int(np.min(np.asarray(ids))), int(np.max(np.asarray(ids)))
        if lo < 0 or hi >= d_vocab:
            raise ValueError(f"metric: {what} token ids must lie in [0, d_vocab_out={d_vocab}), got "
                             f"min {lo}, max {hi} (JAX would silently clamp them)")
    ids = jnp.broadcast_to(ids.astype(jnp.int32), (n_batch,))
    return jnp.take_along_axis(at, ids[:, None], axis=-1)[:, 0]


def _check_ids(ids, what: str):
    if ids is None:
        raise ValueError(f"{what} is required")
    a = ids if isinstance(ids, jax.Array) else np.asarray(ids)
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise TypeError(f"{what} must be integer token ids (an int or [batch]), got dtype {a.dtype}")
    if a.ndim > 1:
        raise ValueError(f"{what} must be an int or [batch] token ids, got shape {tuple(a.shape)}")
    return jnp.asarray(a, jnp.int32)


def _check_pos(pos, what="pos"):
    if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)):
        raise TypeError(f"{what} must be an int position (negative counts from the end), got {pos!r}")
    return int(pos)


def logit(token, pos: int = -1) -> Metric:
    """The logit of ``token`` (an int or [batch] ids) at position ``pos``: logits[b, pos, token_b]."""
    return Metric("logit", _check_pos(pos), _check_ids(token, "token"))


def logit_diff(correct, wrong, pos: int = -1) -> Metric:
    """logits[b, pos, correct_b] - logits[b, pos, wrong_b] (the IOI-style logit difference)."""
    return Metric("logit_diff", _check_pos(pos), _check_ids(correct, "correct"),
                  _check_ids(wrong, "wrong"))


def log_prob(token, pos: int = -1) -> Metric:
    """log_softmax(logits[b, pos])[token_b]: the log-probability of ``token`` at ``pos``."""
    return Metric("log_prob", _check_pos(pos), _check_ids(token, "token"))


def loss(pos: int | None = None) -> Metric:
    """Next-token cross-entropy per example: the mean over positions, or the loss of predicting
    token ``pos + 1`` at ``pos``."""
    return Metric("loss", None if pos is None else _check_pos(pos))


# A built-in metric of these kinds reads the logits at one position (``Metric.pos``). A run for it
# needs the last block and the unembedding at that position only (its keys and values still come
# from every position) when nothing inside the last block is hooked: on the reference shape this
# skips about a third of a forward and of a backward (benchmarks/patching.py, attribution.py).
ONE_POSITION_KINDS = ("logit", "logit_diff", "log_prob")


def reads_one_position(metric) -> bool:
    """Whether ``metric`` is a built-in metric that reads the logits at one position only."""
    return (isinstance(metric, Metric) and metric.kind in ONE_POSITION_KINDS
            and metric.pos is not None)


def last_block_at(params: dict, cfg, resid: Float[Array, "batch pos d_model"], pos
                  ) -> Float[Array, "batch 1 d_vocab_out"]:
    """The last block and the unembedding at one position: ``resid`` entering block
    n_layers - 1 -> the logits at ``pos`` (an int or a traced int; negative counts from the end),
    equal to ``forward(..., start_at_layer=n_layers - 1)[:, pos]``: the query at ``pos`` only,
    the keys and values of every position it sees, the same plain functions of model.py. No hook
    point is visited (callers use it where nothing inside the last block is hooked)."""
    from tinyinterp import model as M
    from tinyinterp.hooks import HookContext

    last = cfg.n_layers - 1
    p, hp, n_pos = params["blocks"][last], HookContext(), resid.shape[1]
    i = jnp.asarray(pos, jnp.int32) % n_pos
    x = M.normalize(resid, p.get("ln1", {}), f"blocks.{last}.ln1", cfg, hp)
    at = p["attn"]
    x_i = jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1)  # [batch, 1, d_model]
    # [batch, pos, d_model] @ [head, d_model, d_head] -> [batch, pos, head, d_head]
    q = jnp.einsum("bpm,hmd->bphd", x_i, at["W_Q"]) + at["b_Q"][None, None]
    k = jnp.einsum("bpm,hmd->bphd", x, at["W_K"]) + at["b_K"][None, None]
    v = jnp.einsum("bpm,hmd->bphd", x, at["W_V"]) + at["b_V"][None, None]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(cfg.d_head))  # [b, h, 1, pos]
    scores = jnp.where((jnp.arange(n_pos) <= i)[None, None, None], scores, -jnp.inf)
    z = jnp.einsum("bhqk,bkhd->bqhd", M.softmax_pattern(scores), v)  # [batch, 1, head, d_head]
    out = jnp.einsum("bqhd,hdm->bqm", z, at["W_O"]) + at["b_O"][None, None]
    r = jax.lax.dynamic_slice_in_dim(resid, i, 1, axis=1) + out  # [batch, 1, d_model]
    if not cfg.attn_only:
        r = r + M.mlp(p["mlp"], M.normalize(r, p.get("ln2", {}), f"blocks.{last}.ln2", cfg, hp),
                      last, cfg, hp)
    return M.unembed(params, r, cfg, hp)


def _hook_before_last_block(name, cfg) -> bool:
    """A hook point the last block only reads: the embeddings, an earlier block's, or the residual
    stream entering the last block."""
    last = cfg.n_layers - 1
    if not isinstance(name, str):
        return False
    if name in EMBEDDINGS:
        return True
    return name.startswith("blocks.") and (int(name.split(".")[1]) < last
                                           or name == f"blocks.{last}.hook_resid_pre")


def logits_for_metric(params, cfg, inputs, metric, fwd_hooks=(), *, start_at_layer=None):
    """(logits, metric to apply to them) of a hooked run: the whole model's logits and ``metric``;
    or, for a built-in metric at one position with every hook before the last block, the logits
    at that position only [batch, 1, d_vocab_out] (``last_block_at``) and the metric at position
    0 of them. Both give the same metric values."""
    last = cfg.n_layers - 1
    if not (reads_one_position(metric) and all(_hook_before_last_block(n, cfg) for n, _ in fwd_hooks)
            and (start_at_layer is None or start_at_layer <= last)):
        return forward(params, cfg, inputs, fwd_hooks=fwd_hooks, start_at_layer=start_at_layer), metric
    entering = f"blocks.{last}.hook_resid_pre"  # visited by the last block: applied here instead
    resid = inputs
    if start_at_layer is None or start_at_layer < last:
        resid = forward(params, cfg, inputs, fwd_hooks=[h for h in fwd_hooks if h[0] != entering],
                        start_at_layer=start_at_layer, stop_at_layer=last)
    for name, fn in fwd_hooks:
        if name == entering:
            resid = fn(resid, name=name)
    return last_block_at(params, cfg, resid, metric.pos), dataclasses.replace(metric, pos=0)


def _metric_values(metric: MetricFn, logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """metric(logits, tokens), checked to be one float per example [batch]."""
    value = metric(logits, tokens)
    n_batch = tokens.shape[0]
    if not hasattr(value, "shape") or tuple(value.shape) != (n_batch,):
        shape = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
        raise ValueError(
            f"the metric must return one value per example, shape [batch={n_batch}], got {shape}. "
            "Write it as fn(logits [batch, pos, d_vocab_out], tokens [batch, pos]) -> [batch] "
            "(e.g. logits[:, -1, t] rather than a mean over the batch), or use A.logit / "
            "A.logit_diff / A.log_prob / A.loss")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"the metric must return floats, got dtype {value.dtype}")
    return value


def _check_metric(metric) -> None:
    if not callable(metric):
        raise TypeError(f"metric must be callable fn(logits, tokens) -> [batch], got "
                        f"{type(metric).__name__}")


# ============================================================================ results
def _pairs(d: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v if not isinstance(v, list) else tuple(v)) for k, v in d.items())


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["values", "parts", "tokens", "metric_at_input",
                                "metric_at_baseline", "error", "bias_relevance"],
                   meta_fields=["method", "target", "axes", "error_kind", "settings", "labels"])
@dataclass(frozen=True, eq=False)
class Attribution:
    """An attribution to one target (the embeddings, or one hook point).

    ``values``: shaped like the target, [batch, pos, d_model] for the embeddings (the sum of
    ``parts``, one entry per hook point of the target). ``metric_at_input`` [batch];
    ``metric_at_baseline`` [batch] (IG; None elsewhere). ``error`` [batch]: IG's completeness
    error sum(attr) - (f(x) - f(x')) or LRP's conservation error sum(R) + bias_relevance - f(x);
    ``error_kind`` says which. ``bias_relevance`` [batch]: LRP's share of the biases downstream of
    the target. ``axes`` names the axes of ``values``; ``labels`` ((axis, labels) pairs) labels
    its non-batch axes; ``settings`` ((name, value) pairs) records how it was computed. A pytree:
    it can be returned from ``jax.jit``."""

    method: str
    target: tuple[str, ...]
    values: jax.Array
    parts: dict[str, jax.Array]
    axes: tuple[str, ...]
    tokens: jax.Array
    metric_at_input: jax.Array
    metric_at_baseline: jax.Array | None = None
    error: jax.Array | None = None
    error_kind: str | None = None
    bias_relevance: jax.Array | None = None
    settings: tuple[tuple[str, Any], ...] = ()
    labels: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def completeness_error(self) -> Float[Array, " batch"]:
        """IG's sum(attributions) - (f(x) - f(baseline)) per example."""
        if self.error_kind != "completeness":
            raise AttributeError(f"{self.method} has no completeness error (it is integrated "
                                 "gradients' axiom); see .error / .error_kind")
        return self.error

    @property
    def conservation_error(self) -> Float[Array, " batch"]:
        """LRP's sum(relevance) + bias_relevance - f(x) per example."""
        if self.error_kind != "conservation":
            raise AttributeError(f"{self.method} has no conservation error (it is LRP's); see "
                                 ".error / .error_kind")
        return self.error

    def setting(self, name: str) -> Any:
        return dict(self.settings)[name]

    def axis_labels(self, axis: str) -> tuple[str, ...]:
        return dict(self.labels)[axis]

    def total(self) -> Float[Array, " batch"]:
        """The sum of all attributions per example (IG: ~ f(x) - f(x'); LRP: ~ f(x) - biases)."""
        return jnp.sum(self.values.reshape(self.values.shape[0], -1), axis=-1)

    def per_position(self, reduce: str | None = None) -> Float[Array, "batch pos"]:
        """One number per position: the sum over the other axes (``reduce="sum"``, the default
        except for saliency) or their L2 norm (``"l2"``, saliency's default: Simonyan et al.'s
        map is the gradient's magnitude). For pattern/score points the position is the key
        position (summed over heads and queries)."""
        reduce = reduce or ("l2" if self.method == "saliency" else "sum")
        if reduce not in ("sum", "l2"):
            raise ValueError(f"reduce must be 'sum' or 'l2', got {reduce!r}")
        v = self.values
        pos_axis = self.axes.index("key_pos") if "key_pos" in self.axes else 1
        v = jnp.moveaxis(v, pos_axis, 1).reshape(v.shape[0], v.shape[pos_axis], -1)
        return jnp.sum(v, axis=-1) if reduce == "sum" else jnp.sqrt(jnp.sum(v * v, axis=-1))

    def per_head(self) -> Float[Array, "batch pos head_index"]:
        """For per-head points [batch, pos, head, d]: the sum over d -> [batch, pos, head];
        for pattern/score points [batch, head, q, k]: the sum over k -> [batch, q, head]."""
        if "head_index" not in self.axes:
            raise ValueError(f"per_head needs a per-head hook point; this target has axes {self.axes}")
        if self.axes[1] == "head_index":  # [batch, head, q, k]
            return jnp.moveaxis(jnp.sum(self.values, axis=-1), 1, 2)
        return jnp.sum(self.values, axis=-1)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["values", "window_deltas", "metric_at_input", "tokens"],
                   meta_fields=["window_starts", "settings", "labels"])
@dataclass(frozen=True, eq=False)
class Occlusion:
    """Occlusion / feature ablation. ``values``: [batch, pos] (token occlusion) or
    [batch, *groups] (ablation at a hook point: groups per position / head); each value is
    f(x) - f(x with that feature replaced), averaged over the windows covering it (Captum's
    Occlusion). ``window_deltas`` [batch, n_windows]: f(x) - f(x_w) per window/group."""

    values: jax.Array
    window_deltas: jax.Array
    metric_at_input: jax.Array
    tokens: jax.Array
    window_starts: tuple[int, ...]
    settings: tuple[tuple[str, Any], ...] = ()
    labels: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def per_position(self) -> jax.Array:
        return self.values if self.values.ndim == 2 else jnp.sum(
            self.values.reshape(*self.values.shape[:2], -1), axis=-1)

    def axis_labels(self, axis: str) -> tuple[str, ...]:
        return dict(self.labels)[axis]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "per_layer"],
                   meta_fields=["settings", "labels"])
@dataclass(frozen=True, eq=False)
class Rollout:
    """Attention rollout: ``values`` [batch, query_pos, key_pos], rows are distributions over
    earlier positions; ``per_layer`` [layer, batch, query_pos, key_pos], the rollout through
    layers 0..l."""

    values: jax.Array
    per_layer: jax.Array
    settings: tuple[tuple[str, Any], ...] = ()
    labels: tuple[tuple[str, tuple[str, ...]], ...] = ()


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["values", "bias_terms", "metric_value"],
                   meta_fields=["labels", "bias_labels", "n_layers", "n_heads", "d_mlp", "settings"])
@dataclass(frozen=True, eq=False)
class DirectLogitAttribution:
    """Direct logit attribution: ``values`` [batch, component] with ``labels`` ("L{l}H{h}" heads,
    "L{l}N{n}" neurons or "{l}_mlp_out", "embed", "pos_embed", "bias" = the summed b_O / b_out);
    ``bias_terms`` [batch, 2] ("ln_final.b", "b_U"): what the final norm's bias and the unembed
    bias add. ``values`` summed with ``bias_terms`` equals ``metric_value`` [batch] (the logit
    difference the direction reads) up to float32 rounding."""

    values: jax.Array
    bias_terms: jax.Array
    metric_value: jax.Array
    labels: tuple[str, ...]
    bias_labels: tuple[str, ...]
    n_layers: int
    n_heads: int
    d_mlp: int | None
    settings: tuple[tuple[str, Any], ...] = ()

    def total(self) -> Float[Array, " batch"]:
        return jnp.sum(self.values, axis=-1) + jnp.sum(self.bias_terms, axis=-1)

    def per_head(self) -> Float[Array, "batch layer head_index"]:
        """[batch, n_layers, n_heads] (the "L{l}H{h}" components)."""
        idx = [self.labels.index(f"L{i}H{h}") for i in range(self.n_layers)
               for h in range(self.n_heads)]
        return self.values[:, np.asarray(idx)].reshape(-1, self.n_layers, self.n_heads)

    def per_neuron(self) -> Float[Array, "batch layer d_mlp"]:
        """[batch, n_layers, d_mlp] (needs ``expand_neurons=True`` and a model with MLPs)."""
        if self.d_mlp is None or f"L0N0" not in self.labels:  # noqa: F541
            raise ValueError("per_neuron needs MLP neurons: a model with MLPs and "
                             "direct_logit_attribution(..., expand_neurons=True)")
        start = self.labels.index("L0N0")
        n = self.n_layers * self.d_mlp
        return self.values[:, start:start + n].reshape(-1, self.n_layers, self.d_mlp)

    def per_component(self) -> tuple[jax.Array, tuple[str, ...]]:
        """Grouped: embed, pos_embed, "L{l}_attn" (its heads), "L{l}_mlp" (its neurons), "bias"
        (b_O, b_out), "ln_final.b", "b_U" -> ([batch, groups], labels); sums to the metric."""
        groups: dict[str, list[int]] = {}
        for i, lab in enumerate(self.labels):
            if lab.startswith("L") and "H" in lab:
                key = f"L{lab[1:].split('H')[0]}_attn"
            elif lab.startswith("L") and "N" in lab:
                key = f"L{lab[1:].split('N')[0]}_mlp"
            elif lab.endswith("_mlp_out"):
                key = f"L{lab.split('_')[0]}_mlp"
            else:
                key = lab
            groups.setdefault(key, []).append(i)
        cols = [jnp.sum(self.values[:, np.asarray(ix)], axis=-1) for ix in groups.values()]
        cols += [self.bias_terms[:, j] for j in range(self.bias_terms.shape[1])]
        return jnp.stack(cols, axis=-1), tuple(groups) + self.bias_labels


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["logits", "metric_values"], meta_fields=["labels", "settings"])
@dataclass(frozen=True, eq=False)
class LogitLens:
    """The logit lens: ``logits`` [layer, batch, pos, d_vocab_out] read from the residual stream
    at each layer's input (labels "0_pre", ..., "final_post") through ln_final (its own statistics,
    w and b) and the unembedding; ``metric_values`` [layer, batch] (None without a metric)."""

    logits: jax.Array
    metric_values: jax.Array | None
    labels: tuple[str, ...]
    settings: tuple[tuple[str, Any], ...] = ()

    def predictions(self) -> Int[Array, "layer batch pos"]:
        return jnp.argmax(self.logits, axis=-1)


# ============================================================================ targets and inputs
def _resolve_target(model, at) -> tuple[str, ...]:
    if at is None or at == "embed" or (isinstance(at, (tuple, list)) and tuple(at) == EMBEDDINGS):
        return EMBEDDINGS
    if not isinstance(at, str):
        raise TypeError(f"at must be None (the token embeddings) or one hook name, got {at!r}")
    resolve_names(at, hook_names(model.cfg))  # unknown names: a clear error with close matches
    return (at,)


def _point_axes(name: str) -> tuple[str, ...]:
    if name.endswith(("hook_attn_scores", "hook_pattern")):
        return ("batch", "head_index", "query_pos", "key_pos")
    if name.endswith(("hook_q", "hook_k", "hook_v", "hook_z")):
        return ("batch", "pos", "head_index", "d_head")
    if name.endswith("hook_result"):
        return ("batch", "pos", "head_index", "d_model")
    if name.endswith("hook_scale"):
        return ("batch", "pos", "one")
    if name.endswith(("hook_pre", "hook_post")):
        return ("batch", "pos", "d_mlp")
    if name == "unembed.hook_out":
        return ("batch", "pos", "d_vocab_out")
    return ("batch", "pos", "d_model")


def _labels(model, names: tuple[str, ...], n_pos: int) -> tuple[tuple[str, tuple[str, ...]], ...]:
    axes = _point_axes(names[0])
    out = []
    for ax in axes[1:]:
        if ax in ("pos", "query_pos", "key_pos"):
            out.append((ax, tuple(f"p{i}" for i in range(n_pos))))
        elif ax == "head_index":
            out.append((ax, tuple(f"H{h}" for h in range(model.cfg.n_heads))))
    return tuple(out)


def _tokens(model, tokens) -> jax.Array:
    return check_tokens(tokens, model.cfg)


def _clean(model, tokens, names: tuple[str, ...]) -> dict[str, jax.Array]:
    """The activations at ``names`` on ``tokens``."""
    stop = 0 if set(names) <= set(EMBEDDINGS) else None
    _, cache = forward_with_cache(model.params, model.cfg, tokens, frozenset(names),
                                  return_type=None if stop is None else "logits", stop_at_layer=stop)
    return {n: cache[n] for n in names}


def _baseline(model, tokens, names: tuple[str, ...], x: dict[str, jax.Array], baseline
              ) -> dict[str, jax.Array]:
    """The baseline x' at each target point (see integrated_gradients for the options)."""
    cfg = model.cfg
    if isinstance(baseline, str):
        if baseline == "zeros":
            return {n: jnp.zeros_like(v) for n, v in x.items()}
        if baseline == "mean":
            if names == EMBEDDINGS:
                mean = jnp.mean(model.params["embed"]["W_E"], axis=0)  # [d_model]
                return {"hook_embed": jnp.broadcast_to(mean[None, None], x["hook_embed"].shape),
                        "hook_pos_embed": x["hook_pos_embed"]}
            return {n: jnp.broadcast_to(jnp.mean(v, axis=0, keepdims=True), v.shape)
                    for n, v in x.items()}
        raise ValueError(f"baseline {baseline!r} is not known; use 'zeros', 'mean', a baseline token "
                         "id (int), baseline tokens [batch, pos] (ints), an array shaped like the "
                         "target, or a dict {hook name: array}")
    if isinstance(baseline, Mapping):
        if set(baseline) != set(names):
            raise ValueError(f"a dict baseline needs exactly the target's hook points {list(names)},"
                             f" got {sorted(baseline)}")
        return {n: _float_baseline(baseline[n], x[n], n) for n in names}
    b = baseline if isinstance(baseline, jax.Array) else np.asarray(baseline)
    if jnp.issubdtype(b.dtype, jnp.integer):
        if b.ndim == 0:
            b = jnp.full(tokens.shape, jnp.asarray(b, jnp.int32))
        elif b.ndim == 1:
            b = jnp.broadcast_to(jnp.asarray(b, jnp.int32)[None], tokens.shape)
        if tuple(b.shape) != tuple(tokens.shape):
            raise ValueError(f"baseline tokens must be an int id, [pos] or [batch, pos] = "
                             f"{tuple(tokens.shape)}, got shape {tuple(b.shape)}")
        b = check_tokens(b, cfg)
        return _clean(model, b, names)
    if names == EMBEDDINGS:
        return {"hook_embed": _float_baseline(b, x["hook_embed"], "hook_embed"),
                "hook_pos_embed": x["hook_pos_embed"]}
    return {names[0]: _float_baseline(b, x[names[0]], names[0])}


def _float_baseline(b, like: jax.Array, name: str) -> jax.Array:
    b = jnp.asarray(b)
    if not jnp.issubdtype(b.dtype, jnp.floating):
        raise TypeError(f"the baseline for {name!r} must be a float array, got dtype {b.dtype}")
    shape = tuple(like.shape)
    if tuple(b.shape) == shape[1:]:
        b = jnp.broadcast_to(b[None], shape)
    if tuple(b.shape) != shape:
        raise ValueError(f"the baseline for {name!r} must have the point's shape {shape} (or "
                         f"{shape[1:]}, shared by the batch), got {tuple(b.shape)}")
    return b.astype(like.dtype)


def _replace_hooks(values: Mapping[str, jax.Array]) -> list:
    return [(n, functools.partial(_const, v)) for n, v in values.items()]


def _const(v, value, *, name):
    del value, name
    return v


def _tile(tokens: jax.Array, k: int) -> jax.Array:
    """[batch, pos] -> [k*batch, pos] (k copies, point-major)."""
    return jnp.broadcast_to(tokens[None], (k, *tokens.shape)).reshape(k * tokens.shape[0], -1)


def _folded_metric(model, tokens, metric, k: int, hooks) -> jax.Array:
    """metric for k variants folded into the batch: -> [k, batch]. The model runs once on
    [k*batch, pos]; the metric sees each variant's [batch] logits (so per-example ids still fit)."""
    logits, at = logits_for_metric(model.params, model.cfg, _tile(tokens, k), metric, hooks)
    logits = logits.reshape(k, tokens.shape[0], *logits.shape[1:])
    return jax.vmap(lambda lg: _metric_values(at, lg, tokens))(logits)


def _chunk(n_points: int, n_batch: int, cfg, n_pos: int, chunk_size: int | None) -> int:
    """Points per compiled step: ``chunk_size`` or what keeps the activations of a step near
    2**23 floats (32 MiB: at the benchmark shape, 5 IG points of 8 x 64 tokens; smaller steps
    stayed in cache and took less CPU time than 16 or 64 points per step)."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        return min(chunk_size, n_points)
    d_mlp = 0 if cfg.attn_only else cfg.d_mlp
    per_token = cfg.n_layers * (12 * cfg.d_model + 3 * d_mlp + 3 * cfg.n_heads * n_pos) + 2 * cfg.d_vocab_out
    return max(1, min(n_points, (1 << 23) // max(1, per_token * n_pos * n_batch)))


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return int(steps)


# ============================================================================ gradient methods
def _grad_at(model, tokens, metric, names, x, hooks_before=(), hooks_after=()):
    """(metric [batch], {name: d sum(metric) / d x[name]}) with the target replaced by ``x``."""

    def f(x):
        logits, at = logits_for_metric(model.params, model.cfg, tokens, metric,
                                       [*hooks_before, *_replace_hooks(x), *hooks_after])
        m = _metric_values(at, logits, tokens)
        return jnp.sum(m), m

    g, m = jax.grad(f, has_aux=True)(x)
    return m, g


@functools.partial(jax.jit, static_argnames=("names", "method", "metric_static"))
def _gradient_method(model, tokens, metric_dyn, metric_static, names, method):
    metric = metric_dyn if metric_static is None else metric_static
    x = _clean(model, tokens, names)
    m, g = _grad_at(model, tokens, metric, names, x)
    if method == "saliency":
        parts = g
        values = g[names[0]]  # the gradient is the same at hook_embed and hook_pos_embed
    else:
        parts = {n: x[n] * g[n] for n in names}
        values = functools.reduce(jnp.add, parts.values())
    return values, parts, m


def check_metric_position(metric, n_pos: int) -> None:
    """A built-in metric's position must lie in [-n_pos, n_pos) of the run it scores (JAX would
    silently clamp an index past the end)."""
    pos = getattr(metric, "pos", None) if isinstance(metric, Metric) else None
    if isinstance(pos, (int, np.integer)) and not -n_pos <= int(pos) < n_pos:
        raise ValueError(f"metric position {int(pos)} is outside the {n_pos} positions of the "
                         f"tokens (allowed: {-n_pos} .. {n_pos - 1})")


def _split_metric(metric, model=None, n_batch=None, n_pos=None):
    _check_metric(metric)
    if n_pos is not None:
        check_metric_position(metric, n_pos)
    if isinstance(metric, Metric) and model is not None:  # ids checked while they are concrete
        for what, ids in (("correct", metric.correct), ("wrong", metric.wrong)):
            if ids is not None:
                _pick(jnp.zeros((n_batch, model.cfg.d_vocab_out), jnp.float32), ids, what)
    return (metric, None) if isinstance(metric, Metric) else (None, metric)


def _result(method, model, tokens, names, values, parts, m, settings, **kw) -> Attribution:
    axes = _point_axes(names[0])
    return Attribution(method=method, target=names, values=values, parts=dict(parts), axes=axes,
                       tokens=tokens, metric_at_input=m, settings=_pairs(settings),
                       labels=_labels(model, names, tokens.shape[1]), **kw)


def saliency(model, tokens: Int[Array, "batch pos"], metric: MetricFn, *, at: str | None = None
             ) -> Attribution:
    """Saliency (Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional Networks"): the
    gradient of the metric with respect to the input, d f / d x, at the target.

    -> Attribution with ``values`` the signed gradient, shaped like the target ([batch, pos,
    d_model] for the embeddings, where it is the gradient at the summed input embedding, equal at
    hook_embed and hook_pos_embed); ``per_position()`` is its L2 norm over d_model (the saliency
    map). Why: the first-order sensitivity of f, one backward pass."""
    tokens = _tokens(model, tokens)
    names = _resolve_target(model, at)
    dyn, static = _split_metric(metric, model, tokens.shape[0], tokens.shape[1])
    values, parts, m = _gradient_method(model, tokens, dyn, static, names, "saliency")
    return _result("saliency", model, tokens, names, values, parts, m, {"at": names})


def gradient_x_input(model, tokens: Int[Array, "batch pos"], metric: MetricFn, *,
                     at: str | None = None) -> Attribution:
    """Gradient x input (Shrikumar et al. 2016, "Not Just a Black Box"): x * d f / d x at the
    target, the first-order Taylor term of f around 0 (exact for functions linear in x).

    -> Attribution, ``values`` shaped like the target (embeddings: hook_embed's and
    hook_pos_embed's parts summed, each in ``parts``)."""
    tokens = _tokens(model, tokens)
    names = _resolve_target(model, at)
    dyn, static = _split_metric(metric, model, tokens.shape[0], tokens.shape[1])
    values, parts, m = _gradient_method(model, tokens, dyn, static, names, "gradient_x_input")
    return _result("gradient_x_input", model, tokens, names, values, parts, m, {"at": names})


# ============================================================================ integrated gradients
def integration_points(steps: int, method: str = "gausslegendre"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(alphas [steps], weights [steps]) of a quadrature of [0, 1], as Captum's
    ``approximation_methods``: riemann_left (alphas k/n), riemann_right ((k+1)/n), riemann_middle
    ((k+1/2)/n), all weighted 1/n; riemann_trapezoid (alphas linspace(0, 1, n), end weights halved,
    n >= 2); gausslegendre (n-point Gauss-Legendre nodes mapped to [0, 1], Captum's default).
    The weights sum to 1."""
    steps = _check_steps(steps)
    if method not in IG_METHODS:
        raise ValueError(f"method {method!r} is not known; allowed: {', '.join(IG_METHODS)}")
    n = steps
    if method == "riemann_left":
        a, w = np.arange(n) / n, np.full(n, 1.0 / n)
    elif method == "riemann_right":
        a, w = np.arange(1, n + 1) / n, np.full(n, 1.0 / n)
    elif method == "riemann_middle":
        a, w = (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)
    elif method == "riemann_trapezoid":
        if n < 2:
            raise ValueError("riemann_trapezoid needs steps >= 2 (its two end points)")
        a = np.linspace(0.0, 1.0, n)
        w = np.full(n, 1.0 / (n - 1))
        w[0] = w[-1] = 0.5 / (n - 1)
    else:
        x, wx = np.polynomial.legendre.leggauss(n)
        a, w = 0.5 * (x + 1.0), 0.5 * wx
    return a.astype(np.float32), w.astype(np.float32)


def _ig_points(steps: int, method: str, chunk: int, groups: int = 1):
    """The quadrature's points and weights as [groups, n_chunks, chunk] (groups: one per device),
    padded with weight-0 points."""
    alphas, weights = integration_points(steps, method)
    per = -(-steps // groups)
    n_chunks = -(-per // chunk)
    pad = groups * n_chunks * chunk - steps  # padded points have weight 0
    shape = (groups, n_chunks, chunk)
    return (jnp.asarray(np.concatenate([alphas, np.zeros(pad, np.float32)]).reshape(shape)),
            jnp.asarray(np.concatenate([weights, np.zeros(pad, np.float32)]).reshape(shape)))


def _ig_weighted_grads(model, tokens, x, base, metric, names, alphas, weights):
    """sum_i w_i * d f(base + a_i (x - base)) / d point, per name; alphas, weights: [n_chunks,
    chunk], each chunk's points folded into the batch and the chunks scanned."""
    chunk = alphas.shape[1]
    diff = {n: x[n] - base[n] for n in names}
    n_batch = tokens.shape[0]

    def step(total, aw):
        a, w = aw  # [chunk]

        def f(points):  # points: {name: [chunk*batch, ...]}
            return jnp.sum(_folded_metric(model, tokens, metric, chunk, _replace_hooks(points)))

        points = {}
        for n in names:  # base + alpha * (x - base), the chunk's points folded into the batch
            shape = (chunk, *x[n].shape)
            ab = a.reshape((chunk,) + (1,) * x[n].ndim)
            points[n] = (base[n][None] + ab * diff[n][None]).reshape(chunk * n_batch, *shape[2:])
        g = jax.grad(f)(points)
        out = {}
        for n in names:
            gn = g[n].reshape(chunk, *x[n].shape)
            out[n] = total[n] + jnp.sum(w.reshape((chunk,) + (1,) * x[n].ndim) * gn, axis=0)
        return out, None

    zero = {n: jnp.zeros_like(x[n]) for n in names}
    return jax.lax.scan(step, zero, (alphas, weights))[0]


def _ig_result(model, tokens, x, base, metric, names, mean_grad):
    parts = {n: (x[n] - base[n]) * mean_grad[n] for n in names}
    values = functools.reduce(jnp.add, parts.values())
    ends = _folded_metric(model, tokens, metric, 1, _replace_hooks(x))[0]
    starts = _folded_metric(model, tokens, metric, 1, _replace_hooks(base))[0]
    err = jnp.sum(values.reshape(tokens.shape[0], -1), axis=-1) - (ends - starts)
    return values, parts, ends, starts, err


@functools.partial(jax.jit, static_argnames=("names", "steps", "method", "chunk", "metric_static"))
def _ig(model, tokens, x, base, metric_dyn, metric_static, names, steps, method, chunk):
    metric = metric_dyn if metric_static is None else metric_static
    alphas, weights = _ig_points(steps, method, chunk)
    mean_grad = _ig_weighted_grads(model, tokens, x, base, metric, names, alphas[0], weights[0])
    return _ig_result(model, tokens, x, base, metric, names, mean_grad)


@functools.partial(jax.jit, static_argnames=("names", "metric_static"))
def _ig_finish(model, tokens, x, base, metric_dyn, metric_static, names, mean_grad):
    metric = metric_dyn if metric_static is None else metric_static
    return _ig_result(model, tokens, x, base, metric, names, mean_grad)


def _ig_on_devices(model, tokens, x, base, dyn, static, names, steps, method, chunk, devices):
    """_ig with the quadrature's points split over ``devices`` (tinyinterp.sweeps): each device
    sums its points' weighted gradients, and the sums are added."""
    mesh = sweeps.sweep_mesh(devices)
    chunk = min(chunk, -(-steps // mesh.size))
    alphas, weights = _ig_points(steps, method, chunk, mesh.size)  # [device, n_chunks, chunk]

    def part(model, tokens, x, base, dyn, alphas, weights):  # one device's points
        metric = dyn if static is None else static
        return jax.vmap(lambda a, w: _ig_weighted_grads(model, tokens, x, base, metric, names,
                                                        a, w))(alphas, weights)

    sums = sweeps.map_sweep(part, (model, tokens, x, base, dyn, alphas, weights),
                            (None, None, None, None, None, 0, 0), devices,
                            key=("integrated_gradients", static, names))
    mean_grad = {n: jnp.asarray(np.sum(sums[n], axis=0)) for n in names}
    return _ig_finish(model, tokens, x, base, dyn, static, names, mean_grad)


def integrated_gradients(model, tokens: Int[Array, "batch pos"], metric: MetricFn, *,
                         steps: int = 50, method: str = "gausslegendre", baseline: Any = "zeros",
                         at: str | None = None, chunk_size: int | None = None,
                         devices: sweeps.Devices = None) -> Attribution:
    """Integrated gradients (Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep
    Networks"): IG_i = (x_i - x'_i) * int_0^1 d f(x' + a (x - x')) / d x_i da, by the quadrature
    ``method`` (``integration_points``: Captum's riemann_* and gausslegendre, default 50 points).

    ``baseline`` x': "zeros"; "mean" (the embeddings: the mean of W_E over the vocabulary at every
    position, positions kept; a hook point: the batch mean of its activation); an int token id
    (e.g. PAD) or int baseline tokens [pos] / [batch, pos] (x' is the activation the model has on
    them, so for the embeddings the positional part is kept); a float array shaped like the
    target's first point (or without its batch axis); or {hook name: array}. All points of the
    batch run as one compiled program: ``chunk_size`` points at a time (default: what keeps a
    step near 32 MiB of activations) folded into the batch axis, scanned over the chunks.

    -> Attribution with ``metric_at_input`` f(x), ``metric_at_baseline`` f(x') and the
    completeness error sum(IG) - (f(x) - f(x')) per example (the quadrature's error). It grows
    where the path is steep: "zeros" at the embeddings of a normed model is one such baseline
    (LN(a x) = LN(x), so f is flat for a > 0 and jumps near a = 0, which Riemann rules with a
    point at 0 miss), and so is a path on which a narrow residual's norm nearly vanishes. Prefer
    a PAD token or the mean embedding, and watch the error.

    ``devices`` (a count, a Mesh or a list of devices) splits the points over several devices
    or hosts (``tinyinterp.sweeps``): each sums its points' gradients, the sums are added."""
    tokens = _tokens(model, tokens)
    steps = _check_steps(steps)
    integration_points(steps, method)  # validates method and steps together
    names = _resolve_target(model, at)
    dyn, static = _split_metric(metric, model, tokens.shape[0], tokens.shape[1])
    x = _clean(model, tokens, names)
    base = _baseline(model, tokens, names, x, baseline)
    chunk = _chunk(steps, tokens.shape[0], model.cfg, tokens.shape[1], chunk_size)
    run = _ig if sweeps.sweep_mesh(devices) is None else functools.partial(_ig_on_devices,
                                                                            devices=devices)
    values, parts, ends, starts, err = run(model, tokens, x, base, dyn, static, names, steps,
                                           method, chunk)
    b_desc = baseline if isinstance(baseline, (str, int)) else type(baseline).__name__
    return _result("integrated_gradients", model, tokens, names, values, parts, ends,
                   {"at": names, "steps": steps, "method": method, "baseline": b_desc,
                    "chunk_size": chunk},
                   metric_at_baseline=starts, error=err, error_kind="completeness")


# ============================================================================ occlusion / ablation
@functools.partial(jax.jit, static_argnames=("n_variants", "chunk", "metric_static", "hooked"))
def _variants(model, tokens, variants, metric_dyn, metric_static, n_variants, chunk, hooked):
    """f on each variant ([n, batch, pos] tokens, or [n, batch, ...] values at ``hooked``),
    ``chunk`` variants per step of one scanned program -> [n, batch]."""
    metric = metric_dyn if metric_static is None else metric_static
    n_chunks = -(-n_variants // chunk)
    pad = n_chunks * chunk - n_variants
    v = jnp.concatenate([variants, jnp.broadcast_to(variants[:1], (pad, *variants.shape[1:]))])
    v = v.reshape(n_chunks, chunk, *variants.shape[1:])
    n_batch = tokens.shape[0]

    def step(_, vs):
        if hooked is None:
            toks = vs.reshape(chunk * n_batch, -1)
            logits = forward(model.params, model.cfg, toks)
            logits = logits.reshape(chunk, n_batch, *logits.shape[1:])
            vals = jax.vmap(lambda lg: _metric_values(metric, lg, tokens))(logits)
        else:
            hooks = _replace_hooks({hooked: vs.reshape(chunk * n_batch, *vs.shape[2:])})
            vals = _folded_metric(model, tokens, metric, chunk, hooks)
        return None, vals

    _, out = jax.lax.scan(step, None, v)
    return out.reshape(n_chunks * chunk, n_batch)[:n_variants]


def _variants_on(model, tokens, variants, dyn, static, chunk, hooked, devices):
    """_variants of every variant, split over ``devices`` (tinyinterp.sweeps) when several."""
    n = variants.shape[0]
    mesh = sweeps.sweep_mesh(devices)
    if mesh is None:
        return _variants(model, tokens, variants, dyn, static, n, chunk, hooked)
    per = sweeps.padded_length(n, mesh) // mesh.size  # each device's variants

    def part(model, tokens, variants, dyn):
        return _variants(model, tokens, variants, dyn, static, per, min(chunk, per), hooked)

    return jnp.asarray(sweeps.map_sweep(part, (model, tokens, variants, dyn),
                                        (None, None, 0, None), devices,
                                        key=("variants", static, per, chunk, hooked)))


def occlusion(model, tokens: Int[Array, "batch pos"], metric: MetricFn, *, window: int = 1,
              stride: int = 1, baseline_token: Any = 0, chunk_size: int | None = None,
              devices: sweeps.Devices = None) -> Occlusion:
    """Occlusion (Zeiler & Fergus 2014; Captum's Occlusion): replace each window of ``window``
    consecutive tokens (starts 0, stride, ...) by ``baseline_token`` (an int, or [batch, pos] /
    [pos] ids) and measure f(x) - f(x_occluded); each position's value is the mean over the
    windows that cover it (window=1: feature ablation per token). Every variant runs in one
    compiled program (``chunk_size`` variants per step; ``devices``: split over several devices
    or hosts, tinyinterp.sweeps). -> Occlusion, values [batch, pos]."""
    tokens = _tokens(model, tokens)
    n_batch, n_pos = tokens.shape
    for what, v in (("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    if window > n_pos:
        raise ValueError(f"window={window} is longer than the sequence (pos={n_pos})")
    b = baseline_token if isinstance(baseline_token, jax.Array) else np.asarray(baseline_token)
    if not jnp.issubdtype(b.dtype, jnp.integer):
        raise TypeError(f"baseline_token must be integer token ids, got dtype {b.dtype}")
    b = jnp.asarray(b, jnp.int32)
    if b.ndim == 0:
        b = jnp.full(tokens.shape, b)
    elif b.ndim == 1 and b.shape[0] == n_pos:
        b = jnp.broadcast_to(b[None], tokens.shape)
    if tuple(b.shape) != tuple(tokens.shape):
        raise ValueError(f"baseline_token must be an int, [pos={n_pos}] or [batch, pos]="
                         f"{tuple(tokens.shape)} token ids, got shape {tuple(b.shape)}")
    b = check_tokens(b, model.cfg)
    starts = tuple(range(0, n_pos - window + 1, stride))
    mask = np.zeros((len(starts), n_pos), bool)
    for i, s in enumerate(starts):
        mask[i, s:s + window] = True
    # variant 0 is the input itself: f(x) from the same compiled program as every f(x_w), so a
    # window that cannot change the metric gives exactly 0
    variants = jnp.where(jnp.asarray(mask)[:, None, :], b[None], tokens[None])  # [n, batch, pos]
    variants = jnp.concatenate([tokens[None], variants])
    dyn, static = _split_metric(metric, model, tokens.shape[0], tokens.shape[1])
    chunk = _chunk(len(starts) + 1, n_batch, model.cfg, n_pos, chunk_size)
    f_all = _variants_on(model, tokens, variants, dyn, static, chunk, None, devices)
    f_x, f_v = f_all[0], f_all[1:]  # [batch], [n, batch]
    deltas = (f_x[None] - f_v).T  # [batch, n]
    count = mask.sum(0).astype(np.float32)  # windows covering each position
    values = (deltas @ jnp.asarray(mask, jnp.float32)) / jnp.asarray(np.maximum(count, 1))[None]
    return Occlusion(values=values, window_deltas=deltas, metric_at_input=f_x, tokens=tokens,
                     window_starts=starts,
                     settings=_pairs({"window": window, "stride": stride, "chunk_size": chunk,
                                      "at": "tokens"}),
                     labels=(("pos", tuple(f"p{i}" for i in range(n_pos))),))


def feature_ablation(model, tokens: Int[Array, "batch pos"], metric: MetricFn, *, at: str,
                     baseline: Any = "zeros", by: str = "pos", chunk_size: int | None = None,
                     devices: sweeps.Devices = None) -> Occlusion:
    """Feature ablation at a hook point (Captum's FeatureAblation): replace one group of the
    point's activation by the baseline ("zeros", "mean", int baseline tokens, an array; as in
    ``integrated_gradients``) and measure f(x) - f(x_ablated). ``by``: "pos" (each position),
    "head" (each head of a per-head or pattern point) or "pos_head" (each (position, head)).
    All groups run in one compiled program (``devices``: split over several devices or hosts,
    tinyinterp.sweeps). -> Occlusion, values [batch, groups...]."""
    tokens = _tokens(model, tokens)
    names = _resolve_target(model, at)
    if names == EMBEDDINGS:
        raise ValueError("feature_ablation needs one hook point (at=...); for the tokens use occlusion")
    name = names[0]
    axes = _point_axes(name)
    x = _clean(model, tokens, names)[name]
    base = _baseline(model, tokens, names, {name: x}, baseline)[name]
    group_axes = {"pos": ("key_pos",) if "key_pos" in axes else ("pos",), "head": ("head_index",),
                  "pos_head": ("pos", "head_index")}.get(by)
    if group_axes is None or not set(group_axes) <= set(axes):
        raise ValueError(f"by={by!r} does not fit {name!r} with axes {axes}; allowed: 'pos'"
                         + (", 'head'" if "head_index" in axes else "")
                         + (", 'pos_head'" if {"pos", "head_index"} <= set(axes) else ""))
    idx = [axes.index(a) - 1 for a in group_axes]  # axes of x[0]
    sizes = [x.shape[i + 1] for i in idx]
    n = int(np.prod(sizes))
    masks = np.zeros((n, *x.shape[1:]), bool)
    for g, combo in enumerate(np.ndindex(*sizes)):
        sl = [slice(None)] * (x.ndim - 1)
        for i, c in zip(idx, combo, strict=True):
            sl[i] = c
        masks[(g, *sl)] = True
    variants = jnp.where(jnp.asarray(masks)[:, None], base[None], x[None])  # [n, batch, ...]
    variants = jnp.concatenate([x[None], variants])  # variant 0: x itself (as in occlusion)
    dyn, static = _split_metric(metric, model, tokens.shape[0], tokens.shape[1])
    chunk = _chunk(n + 1, tokens.shape[0], model.cfg, tokens.shape[1], chunk_size)
    f_all = _variants_on(model, tokens, variants, dyn, static, chunk, name, devices)
    f_x, f_v = f_all[0], f_all[1:]
    deltas = (f_x[None] - f_v).T  # [batch, n]
    labels = tuple((a, tuple((f"p{i}" if "pos" in a else f"H{i}") for i in range(s)))
                   for a, s in zip(group_axes, sizes, strict=True))
    return Occlusion(values=deltas.reshape(-1, *sizes), window_deltas=deltas, metric_at_input=f_x,
                     tokens=tokens, window_starts=tuple(range(n)),
                     settings=_pairs({"at": name, "by": by, "chunk_size": chunk,
                                      "baseline": baseline if isinstance(baseline, (str, int))
                                      else type(baseline).__name__}),
                     labels=labels)


# ============================================================================ LRP
@jax.custom_vjp
def _half_grad(x):
    """Identity whose backward halves the gradient: AttnLRP's uniform rule for a bilinear
    product, applied to both of its operands (each gets half the relevance)."""
    return x


_half_grad.defvjp(lambda x: (x, None), lambda _, g: (0.5 * g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _epsilon(z, eps: float):
    """Identity on a linear layer's output z whose backward scales the gradient by
    z / (z + eps * sign(z)): the epsilon-LRP rule in gradient x input form."""
    return z


def _epsilon_fwd(z, eps):
    return z, z


def _epsilon_bwd(eps, z, g):
    denom = z + eps * jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)
    return (g * z / denom,)


_epsilon.defvjp(_epsilon_fwd, _epsilon_bwd)


def softmax_rule(x: Float[Array, "... n"], relevance_out: Float[Array, "... n"]
                 ) -> Float[Array, "... n"]:
    """AttnLRP's softmax rule (Achtibat et al. 2024, eq. 12): R_i = x_i (R'_i - s_i sum_j R'_j),
    computed the way ``lrp`` computes it (gradient x input: the rule equals x times the softmax's
    ordinary vector-Jacobian product of R'/s; -inf inputs, masked, get 0)."""
    s, vjp = jax.vjp(lambda t: jax.nn.softmax(t, axis=-1), x)
    g = vjp(jnp.where(s > 0, relevance_out / jnp.where(s > 0, s, 1.0), 0.0))[0]
    return jnp.where(jnp.isfinite(x), x, 0.0) * g


def uniform_rule(a: Float[Array, "m k"], b: Float[Array, "k n"], relevance_out: Float[Array, "m n"],
                 epsilon: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """AttnLRP's uniform rule for a bilinear product o = a @ b (Achtibat et al. 2024, Prop. 3.3):
    each operand gets half the epsilon-LRP relevance, R^a_ij = 1/2 sum_p a_ij b_jp R_ip / o_ip
    (and R^b_jp = 1/2 sum_i a_ij b_jp R_ip / o_ip), computed as ``lrp`` does (gradient x input
    with ``_half_grad`` on both operands)."""
    o, vjp = jax.vjp(lambda a, b: _half_grad(a) @ _half_grad(b), a, b)
    denom = o + epsilon * jnp.where(o >= 0, 1.0, -1.0).astype(o.dtype)
    ga, gb = vjp(jnp.where(denom != 0, relevance_out / jnp.where(denom != 0, denom, 1.0), 0.0))
    return a * ga, b * gb


def _gate_at_zero(act_fn: str) -> float:
    return 0.0 if act_fn == "relu" else 0.5  # lim act(x)/x as x -> 0 (GELU, SiLU: 1/2)


def _lrp_hooks(cfg, rule: str, epsilon: float):
    """(modifying hooks, stash hooks): hooks that keep every forward value and change gradients.

    conservative (Ali et al. 2022): the attention pattern and every norm's scale are constants
    (stop_gradient), and the MLP's activation is x * stop_gradient(act(x) / x). attnlrp
    (Achtibat et al. 2024): the norms' scales and the activation's gate as above (identity rule),
    q, k, v and the pattern halve their gradients (uniform rule for q.k and pattern @ v), the
    softmax keeps its own gradient (its rule, in gradient x input form), and linear outputs apply
    the epsilon rule."""
    stash: dict[str, jax.Array] = {}
    mods, after = [], []

    def detach(v, *, name):
        del name
        return jax.lax.stop_gradient(v)

    def half(v, *, name):
        del name
        return _half_grad(v)

    def eps_rule(v, *, name):
        del name
        return _epsilon(v, epsilon)

    def keep(v, *, name):
        stash[name] = v
        return v

    def gate(v, *, name):
        pre = stash[name.replace("hook_post", "hook_pre")]
        safe = jnp.where(pre != 0, pre, 1.0)
        g = jnp.where(pre != 0, activation(safe, cfg.act_fn) / safe, _gate_at_zero(cfg.act_fn))
        sg = jax.lax.stop_gradient
        return sg(v) + (pre - sg(pre)) * sg(g)  # value v; gradient g (the gate held constant)

    linear_outputs = []
    for layer in range(cfg.n_layers):
        b = f"blocks.{layer}"
        linear_outputs += [f"{b}.attn.hook_{c}" for c in "qkv"] + [f"{b}.hook_attn_out"]
        if not cfg.attn_only:
            linear_outputs += [f"{b}.mlp.hook_pre", f"{b}.hook_mlp_out"]
    linear_outputs.append("unembed.hook_out")
    if rule == "attnlrp" and epsilon > 0:
        mods += [(n, eps_rule) for n in linear_outputs]
    for layer in range(cfg.n_layers):
        b = f"blocks.{layer}"
        if rule == "conservative":
            mods.append((f"{b}.attn.hook_pattern", detach))
        else:
            mods += [(f"{b}.attn.hook_{c}", half) for c in ("q", "k", "v", "pattern")]
        if not cfg.attn_only:
            mods.append((f"{b}.mlp.hook_post", gate))
            after.append((f"{b}.mlp.hook_pre", keep))
    if cfg.normalization_type is not None:
        scales = [f"blocks.{i}.ln{j}.hook_scale" for i in range(cfg.n_layers)
                  for j in ((1,) if cfg.attn_only else (1, 2))] + ["ln_final.hook_scale"]
        mods += [(n, detach) for n in scales]
    return mods, after


def _bias_points(model) -> dict[str, jax.Array]:
    """{hook point: the bias added there [*point shape without batch, pos]}: each linear map's
    bias, with the preceding norm's bias b pushed through its weights (b @ W)."""
    cfg, P = model.cfg, model.params
    out = {}
    for layer in range(cfg.n_layers):
        p = P["blocks"][layer]
        ln1_b = p.get("ln1", {}).get("b")
        for c in "QKV":
            bias = p["attn"][f"b_{c}"]  # [head, d_head]
            if ln1_b is not None:
                bias = bias + jnp.einsum("m,hmd->hd", ln1_b, p["attn"][f"W_{c}"])
            out[f"blocks.{layer}.attn.hook_{c.lower()}"] = bias
        out[f"blocks.{layer}.hook_attn_out"] = p["attn"]["b_O"]
        if not cfg.attn_only:
            ln2_b = p.get("ln2", {}).get("b")
            b_in = p["mlp"]["b_in"] + (ln2_b @ p["mlp"]["W_in"] if ln2_b is not None else 0.0)
            out[f"blocks.{layer}.mlp.hook_pre"] = b_in
            out[f"blocks.{layer}.hook_mlp_out"] = p["mlp"]["b_out"]
    lnf_b = P.get("ln_final", {}).get("b")
    b_U = P["unembed"]["b_U"]
    out["unembed.hook_out"] = b_U + (lnf_b @ P["unembed"]["W_U"] if lnf_b is not None else 0.0)
    return out


@functools.partial(jax.jit, static_argnames=("names", "rule", "epsilon", "metric_static"))
def _lrp(model, tokens, metric_dyn, metric_static, names, rule, epsilon):
    metric = metric_dyn if metric_static is None else metric_static
    cfg = model.cfg
    x = _clean(model, tokens, names)
    biases = _bias_points(model)
    shapes = jax.eval_shape(lambda: forward_with_cache(model.params, cfg, tokens,
                                                       frozenset(biases), return_type=None)[1])
    deltas = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}

    def f(x, deltas):
        mods, after = _lrp_hooks(cfg, rule, epsilon)
        add = [(n, functools.partial(_add, d)) for n, d in deltas.items()]
        logits = forward(model.params, cfg, tokens,
                         fwd_hooks=[*add, *mods, *_replace_hooks(x), *after])
        m = _metric_values(metric, logits, tokens)
        return jnp.sum(m), m

    (gx, gd), m = jax.grad(f, argnums=(0, 1), has_aux=True)(x, deltas)
    parts = {n: x[n] * gx[n] for n in names}
    values = functools.reduce(jnp.add, parts.values())
    n_batch = tokens.shape[0]
    bias_rel = jnp.zeros((n_batch,), jnp.float32)
    for n, bias in biases.items():  # bias [*rest] broadcast over [batch, pos, *rest]
        g = gd[n]
        bias_rel = bias_rel + jnp.sum((g * bias.reshape((1, 1) + bias.shape)).reshape(n_batch, -1),
                                      axis=-1)
    err = jnp.sum(values.reshape(n_batch, -1), axis=-1) + bias_rel - m
    return values, parts, m, bias_rel, err


def _add(d, value, *, name):
    del name
    return value + d


def lrp(model, tokens: Int[Array, "batch pos"], metric: MetricFn, *, rule: str = "conservative",
        at: str | None = None, epsilon: float | None = None) -> Attribution:
    """Layer-wise relevance propagation for transformers, as input x a modified gradient.

    rule="conservative" (Ali et al. 2022, "XAI for Transformers: Better Explanations through
    Conservative Propagation"): the attention pattern, each norm's scale and the MLP gate
    act(x)/x are held constant; relevance R = x * d f / d x of the resulting locally linear
    network (LRP-0). Exactly conservative: sum(R) + bias_relevance = f(x) for a metric linear in
    the logits.

    rule="attnlrp" (Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance
    Propagation for Transformers"): the softmax rule R_i = x_i (R'_i - s_i sum_j R'_j) (in
    gradient x input form: the softmax's own gradient), the uniform rule (half the relevance to
    each operand) for q.k and pattern @ v, the identity rule through norms and element-wise
    activations (scale and gate held constant), and the epsilon rule (``epsilon``, default 1e-6)
    for the linear maps. Not exactly conservative (the softmax rule drops a bias term): the error
    is reported.

    -> Attribution with ``bias_relevance`` [batch] (the share of every bias downstream of the
    target, with the norms' biases through the weights that follow them) and
    ``conservation_error`` = sum(R) + bias_relevance - f(x) per example. Hooks keep every forward
    value; the model runs its materialised-attention path."""
    tokens = _tokens(model, tokens)
    if rule not in LRP_RULES:
        raise ValueError(f"rule {rule!r} is not known; allowed: {', '.join(LRP_RULES)}")
    if epsilon is None:
        epsilon = 1e-6 if rule == "attnlrp" else 0.0
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite float >= 0, got {epsilon!r}")
    if rule == "conservative" and epsilon != 0.0:
        raise ValueError("rule='conservative' is LRP-0 (gradient x input with the pattern, scales "
                         "and gates held constant); epsilon applies to rule='attnlrp'")
    names = _resolve_target(model, at)
    dyn, static = _split_metric(metric, model, tokens.shape[0], tokens.shape[1])
    values, parts, m, bias_rel, err = _lrp(model, tokens, dyn, static, names, rule, float(epsilon))
    return _result(f"lrp_{rule}", model, tokens, names, values, parts, m,
                   {"at": names, "rule": rule, "epsilon": float(epsilon)},
                   error=err, error_kind="conservation", bias_relevance=bias_rel)


# ============================================================================ cache-based methods
def attention_rollout(cache: ActivationCache, *, residual: bool = True, head_fusion: str = "mean",
                      start_layer: int = 0) -> Rollout:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"):
    per layer the heads' patterns are fused (``head_fusion`` "mean", as in the paper, or "max" /
    "min" with the rows renormalised), mixed with the residual connection as 0.5 I + 0.5 A
    (``residual``), and multiplied through the layers from ``start_layer``:
    R = A_L ... A_start. Each row of R is a distribution over the earlier positions.
    Needs the cache's ``blocks.{l}.attn.hook_pattern``. -> Rollout, values [batch, pos, pos]."""
    if not isinstance(cache, ActivationCache):
        raise TypeError(f"attention_rollout needs an ActivationCache, got {type(cache).__name__}")
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion {head_fusion!r} is not known; allowed: {HEAD_FUSIONS}")
    cfg = cache.model.cfg
    if not (isinstance(start_layer, int) and 0 <= start_layer < cfg.n_layers):
        raise ValueError(f"start_layer must be in [0, n_layers={cfg.n_layers}), got {start_layer!r}")
    if not cache.has_batch_dim:
        raise ValueError("attention_rollout needs a cache with its batch axis")
    rollout, per_layer = None, []
    for layer in range(start_layer, cfg.n_layers):
        pattern = cache["pattern", layer]  # [batch, head, q, k]
        if head_fusion == "mean":
            a = jnp.mean(pattern, axis=1)
        else:
            a = jnp.max(pattern, axis=1) if head_fusion == "max" else jnp.min(pattern, axis=1)
            a = a / jnp.sum(a, axis=-1, keepdims=True)
        if residual:
            eye = jnp.eye(a.shape[-1], dtype=a.dtype)[None]  # [1, q, k]
            a = 0.5 * eye + 0.5 * a
        rollout = a if rollout is None else jnp.einsum("bqk,bkj->bqj", a, rollout)
        per_layer.append(rollout)
    n_pos = rollout.shape[-1]
    pl = tuple(f"p{i}" for i in range(n_pos))
    return Rollout(values=rollout, per_layer=jnp.stack(per_layer),
                   settings=_pairs({"residual": residual, "head_fusion": head_fusion,
                                    "start_layer": start_layer}),
                   labels=(("layer", tuple(f"L{i}" for i in range(start_layer, cfg.n_layers))),
                           ("query_pos", pl), ("key_pos", pl)))


def _direction(cache, metric, pos) -> tuple[jax.Array, jax.Array, int]:
    """(residual direction [batch, d_model], unembed-bias term [batch], pos)."""
    P = cache.model.params
    W_U, b_U = P["unembed"]["W_U"], P["unembed"]["b_U"]
    n_batch = cache["hook_embed"].shape[0]
    if isinstance(metric, Metric):
        if not metric.linear_in_logits:
            raise ValueError(f"direct logit attribution needs a metric linear in the logits (logit, "
                             f"logit_diff), got {metric.kind!r}; DLA of a log-prob or loss is not "
                             "a sum over components")
        ids = jnp.broadcast_to(metric.correct, (n_batch,))
        d = W_U[:, ids].T  # [batch, d_model]
        bu = b_U[ids]
        if metric.kind == "logit_diff":
            wrong = jnp.broadcast_to(metric.wrong, (n_batch,))
            d, bu = d - W_U[:, wrong].T, bu - b_U[wrong]
        return d, bu, metric.pos
    d = jnp.asarray(metric)
    if not jnp.issubdtype(d.dtype, jnp.floating) or d.shape not in ((W_U.shape[0],),
                                                                    (n_batch, W_U.shape[0])):
        raise ValueError(f"a DLA direction must be a float [d_model={W_U.shape[0]}] or [batch, "
                         f"d_model] array, or A.logit / A.logit_diff; got {getattr(d, 'shape', d)}")
    d = jnp.broadcast_to(d.reshape(-1, W_U.shape[0]), (n_batch, W_U.shape[0]))
    return d, jnp.zeros((n_batch,), d.dtype), pos


def direct_logit_attribution(cache: ActivationCache, metric, *, pos: int = -1,
                             expand_neurons: bool = True) -> DirectLogitAttribution:
    """Direct logit attribution: each component's write to the residual stream at ``pos``
    (every head, every neuron, the embeddings and the summed biases: the cache's
    ``get_full_resid_decomposition``), scaled by ln_final as the run scaled it (centred, divided
    by the cached ``ln_final.hook_scale``, times ln_final's w), dotted with the metric's
    direction (W_U[:, correct] - W_U[:, wrong]). ``metric``: A.logit / A.logit_diff (their pos
    is used) or a direction [d_model] / [batch, d_model]. Why: an exact, linear split of the
    logit difference given the run's norm scale; with ``bias_terms`` the parts sum to it."""
    if not isinstance(cache, ActivationCache) or not cache.has_batch_dim:
        raise TypeError("direct_logit_attribution needs an ActivationCache with its batch axis "
                        "(model.run_with_cache(tokens))")
    cfg, P = cache.model.cfg, cache.model.params
    d, bu, pos = _direction(cache, metric, pos)
    stack, labels = cache.get_full_resid_decomposition(None, expand_neurons=expand_neurons,
                                                       pos_slice=pos, return_labels=True)
    scaled = cache.apply_ln_to_stack(stack, None, pos_slice=pos)  # [component, batch, d_model]
    lnf = P.get("ln_final", {})
    d_eff = d * lnf["w"][None] if "w" in lnf else d  # ln_final's w folded into the direction
    values = jnp.einsum("cbm,bm->bc", scaled, d_eff)  # [batch, component]
    lnb = d @ lnf["b"] if "b" in lnf else jnp.zeros_like(bu)
    bias_terms = jnp.stack([lnb, bu], axis=-1)  # [batch, 2]
    return DirectLogitAttribution(
        values=values, bias_terms=bias_terms, metric_value=jnp.sum(values, -1) + lnb + bu,
        labels=tuple(labels), bias_labels=("ln_final.b", "b_U"), n_layers=cfg.n_layers,
        n_heads=cfg.n_heads, d_mlp=None if cfg.attn_only else cfg.d_mlp,
        settings=_pairs({"pos": pos, "expand_neurons": expand_neurons}))


def logit_lens(cache: ActivationCache, tokens: Int[Array, "batch pos"] | None = None,
               metric: MetricFn | None = None, *, incl_mid: bool = False) -> LogitLens:
    """The logit lens (nostalgebraist 2020): the residual stream at each layer's input (and
    after the last layer) decoded as if it were final: ln_final with its own statistics, w and b,
    then W_U and b_U. The last entry equals the model's logits. ``metric`` (with ``tokens``) is
    evaluated on each layer's logits. -> LogitLens, logits [layer, batch, pos, d_vocab_out]."""
    if not isinstance(cache, ActivationCache) or not cache.has_batch_dim:
        raise TypeError("logit_lens needs an ActivationCache with its batch axis")
    P = cache.model.params
    stack, labels = cache.accumulated_resid(None, incl_mid=incl_mid, apply_ln=True,
                                            return_labels=True)  # [layer, batch, pos, d_model]
    W_U, b_U = P["unembed"]["W_U"], P["unembed"]["b_U"]
    logits = jnp.einsum("lbpm,mv->lbpv", stack, W_U) + b_U[None, None, None]
    values = None
    if metric is not None:
        if tokens is None:
            raise ValueError("logit_lens with a metric needs the tokens")
        _check_metric(metric)
        tokens = check_tokens(tokens, cache.model.cfg)
        values = jax.vmap(lambda lg: _metric_values(metric, lg, tokens))(logits)
    return LogitLens(logits=logits, metric_values=values, labels=tuple(labels),
                     settings=_pairs({"incl_mid": incl_mid}))

