"""`tinyinterp reproduce grokking`: a one-layer transformer groks (a + b) mod p, and the progress
measures of Nanda, Chan, Lieberum, Smith & Steinhardt (2023) show why.

Trained full-batch with AdamW on a fixed 30% of the p^2 pairs, the model first memorises its
training pairs (train loss falls, test loss stays high), then, thousands of steps later and with
no change visible in either loss, builds a Fourier circuit (circuit formation: the restricted loss,
which keeps only that circuit, falls; the excluded loss, which cuts it out, rises above the train
loss), and finally, as weight decay removes the memorising weights (cleanup: the sum of squared
weights falls), generalises: test accuracy jumps to 100%. The circuit: W_E embeds a as
cos(w_k a), sin(w_k a) for a few key frequencies w_k = 2 pi k / p; attention and the MLP multiply
the a and b terms into cos(w_k (a + b)) and sin(w_k (a + b)); W_L = W_out @ W_U reads out
cos(w_k (a + b - c)), largest at c = (a + b) mod p.

The model is a ``HookedTransformer`` (``model_config``: one layer, 4 heads, d_model 128, d_mlp 512,
ReLU, no norm, untied embedding/unembedding with d_vocab p + 1 and d_vocab_out p, the paper's
initialisation scales), with the attention biases and b_U held at zero (the paper's model has
none). Training runs the grouped last-position step (``grouped_last_position_logits``; the
previous, lean one is ``last_position_logits``), the same function of the same parameter pytree
as ``tinyinterp.model.forward``'s logits at the last position (tested), so the analysis reads the
trained model through the ordinary hooks.

``run(out_dir, seed=0, paper=False, quick=False)`` writes report.json, report.md and PNG figures,
prints a plain-words summary and returns the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from tinyinterp import fourier
from tinyinterp.config import TransformerConfig
from tinyinterp.model import HookedTransformer, activation, forward
from tinyinterp.params import init_params
from tinyinterp.tasks import ModularAdditionSplit, modular_addition_split
from tinyinterp.train import standard_promotion

# The parameters the paper's model does not have: held at zero (they get no gradient).
FROZEN = ("blocks.*.attn.b_Q", "blocks.*.attn.b_K", "blocks.*.attn.b_V", "blocks.*.attn.b_O",
          "unembed.b_U")
STEP_PATHS = ("grouped", "lean", "model")


# ----------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class GrokkingConfig:
    """One grokking run: the data, the model's size and the optimiser.

    Defaults (``default()``): p 43, 40% of pairs train, weight decay 3, so the three phases stay
    apart (seed 0, grouped step: test loss peaks at step 120, falls to half its peak by 840,
    test accuracy 99% at 1,450) in about 1,700 steps of 739 pairs; the issue's p 59 with
    30% of pairs took 4,600 steps of 1,044 pairs (6x the work). ``paper()``: the published setup
    (p 113, 30%, weight decay 1). Both: lr 1e-3, AdamW betas (0.9, 0.98), 10 linear warm-up
    steps, full batch. Training stops ``after_grok`` (a share of the step at which test accuracy
    first reached 99%, at least ``min_after_grok`` steps) after grokking, or at ``max_steps``.
    ``eval_every``: the test pairs' loss/accuracy cadence (the training pairs' are every step);
    ``snapshot_every``: the parameters are kept this often for the progress measures.
    ``step_path``: "grouped" (``grouped_last_position_logits``, the fastest), "lean"
    (``last_position_logits``, the previous step) or "model" (``tinyinterp.model.forward`` on the
    full sequence; the benchmark's reference): the same function, three ways."""

    p: int = 43
    train_fraction: float = 0.4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    lr: float = 1e-3
    weight_decay: float = 3.0
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 10
    max_steps: int = 12_000
    after_grok: float = 0.1
    min_after_grok: int = 200
    eval_every: int = 10
    snapshot_every: int = 50
    seed: int = 0
    step_path: str = "grouped"

    def __post_init__(self):
        if self.step_path not in STEP_PATHS:
            raise ValueError(f"step_path must be one of {STEP_PATHS}, got {self.step_path!r}")
        if self.snapshot_every % self.eval_every:
            raise ValueError(f"snapshot_every ({self.snapshot_every}) must be a multiple of "
                             f"eval_every ({self.eval_every})")
        for name in ("max_steps", "eval_every", "snapshot_every", "p"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GrokkingConfig.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def default(cls, **changes) -> GrokkingConfig:
        return cls(**changes)

    @classmethod
    def paper(cls, **changes) -> GrokkingConfig:
        """Nanda et al. 2023: p 113, lr 1e-3, weight decay 1, betas (0.9, 0.98), 10 warm-up steps,
        30% train, full batch (they train 40k epochs; we stop after grokking and cleanup)."""
        return cls(**{"p": 113, "train_fraction": 0.3, "weight_decay": 1.0, "max_steps": 20_000,
                      "eval_every": 50, "snapshot_every": 500, **changes})

    def replace(self, **changes) -> GrokkingConfig:
        return dataclasses.replace(self, **changes)


def model_config(p: int, d_model: int = 128, n_heads: int = 4, d_mlp: int = 512) -> TransformerConfig:
    """The paper's model: 1 layer, MLP with ReLU, no norm, vocabulary p + 1 in (the numbers and
    "="), p out (untied: W_E and W_U are separate matrices), context 3, attention on the XLA
    path (3-token sequences: kernels buy nothing)."""
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
    return TransformerConfig(n_layers=1, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
                             d_mlp=d_mlp, d_vocab=p + 1, d_vocab_out=p, n_ctx=3, act_fn="relu",
                             normalization_type=None, attention_backend="xla",
                             model_name=f"grokking-modadd-p{p}")


def init_paper_params(cfg: TransformerConfig, seed: int) -> dict:
    """The paper's initialisation in our (TransformerLens-named) pytree: every weight matrix
    N(0, 1/d_model) except W_U, N(0, 1/d_vocab) (the paper's unembedding is [d_model, p + 1]; ours
    keeps the p output columns); all biases zero. Deterministic in ``seed``; one compiled program
    (op by op, JAX's per-leaf draws compiled dozens of small programs)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return _init_jit(cfg, jax.random.key(int(seed)))


@functools.partial(jax.jit, static_argnums=0)
def _init_jit(cfg: TransformerConfig, key: jax.Array) -> dict:
    unit = init_params(cfg.replace(initializer_range=1.0), key)  # every W_* ~ N(0, 1)
    s = 1.0 / math.sqrt(cfg.d_model)

    def scale(path, leaf):
        name = jax.tree_util.keystr(path)
        if "W_U" in name:
            return leaf * jnp.float32(1.0 / math.sqrt(cfg.d_vocab))
        if "'W_" in name:
            return leaf * jnp.float32(s)
        return leaf

    return jax.tree_util.tree_map_with_path(scale, unit)


def frozen_mask(params: dict) -> dict:
    """A pytree of bools like ``params``: True for the leaves held at zero (``FROZEN``)."""
    def is_frozen(path, _):
        name = jax.tree_util.keystr(path)
        return any(k in name for k in ("'b_Q'", "'b_K'", "'b_V'", "'b_O'", "'b_U'"))

    return jax.tree_util.tree_map_with_path(is_frozen, params)


# ----------------------------------------------------------------------------- the training steps
def last_position_logits(params: dict, cfg: TransformerConfig, tokens: Int[Array, "batch pos"], *,
                         via_W_L: bool | None = None) -> Float[Array, "batch d_vocab_out"]:
    """The logits at the last position, computing only what they need: equal (to float32
    rounding) to ``tinyinterp.model.forward(params, cfg, tokens)[:, -1]`` for a one-layer model
    without norms.

    Why it is faster: only the last position's query, attention output, MLP and unembedding are
    computed, and the keys and values are looked up, not multiplied: they depend only on (token,
    position), so they are computed once per vocabulary entry ([d_vocab, pos, ...] tables, 60-114
    rows) instead of once per example (thousands), and gathered; and, where p is small, the
    MLP's output goes to the logits through W_L = W_out @ W_U [d_mlp, p] (one matmul of p
    columns, not W_out's d_model = 128 and then W_U: the same sum, reassociated).
    ``via_W_L``: None (default) picks W_L when d_vocab_out <= d_model / 2, where it saves most of
    that matmul's work: at p 43, 1.9-2.3x faster per training step than W_out then W_U; at
    p 113 it saves only 10% of the multiplies and measured the same (59.5 against 60.0 ms at
    load ~4.5; benchmarks/grokking.py, same process), so W_out then W_U there. (Gathering the
    value-output products [.., head, d_model] instead of the values, one-hot matmuls instead of
    gathers, and folding W_O into W_in and W_U measured 1.3x, 1.2x and 1.2x slower.)"""
    _check_one_layer_mlp(cfg, "last_position_logits")
    n_pos, n_batch = tokens.shape[1], tokens.shape[0]
    at, mlp = params["blocks"][0]["attn"], params["blocks"][0]["mlp"]
    n_heads, d_model, d_head = at["W_Q"].shape
    hd = n_heads * d_head
    # every (token, position) input: [d_vocab, pos, d_model]
    x_tab = params["embed"]["W_E"][:, None, :] + params["pos_embed"]["W_pos"][None, :n_pos, :]
    # keys and values of every (token, position), one matmul: [d_vocab, pos, 2 * head * d_head]
    W_kv = jnp.concatenate([jnp.transpose(at["W_K"], (1, 0, 2)).reshape(d_model, hd),
                            jnp.transpose(at["W_V"], (1, 0, 2)).reshape(d_model, hd)], axis=1)
    b_kv = jnp.concatenate([at["b_K"].reshape(hd), at["b_V"].reshape(hd)])
    kv_tab = x_tab @ W_kv + b_kv[None, None]
    pos = jnp.arange(n_pos, dtype=jnp.int32)[None, :]  # [1, pos]
    kv = kv_tab[tokens, pos]  # [batch, pos, 2 * head * d_head], gathered
    k = kv[..., :hd].reshape(n_batch, n_pos, n_heads, d_head)
    v = kv[..., hd:].reshape(n_batch, n_pos, n_heads, d_head)
    # the query exists only at the last position: [d_vocab, head, d_head] table, gathered
    q_tab = jnp.einsum("vm,hmd->vhd", x_tab[:, n_pos - 1], at["W_Q"]) + at["b_Q"][None]
    q = q_tab[tokens[:, -1]]  # [batch, head, d_head]
    scores = jnp.einsum("bhd,bphd->bhp", q, k) / jnp.float32(math.sqrt(d_head))
    pattern = jax.nn.softmax(scores, axis=-1)  # [batch, head, pos]: the last query sees every key
    z = jnp.einsum("bhp,bphd->bhd", pattern, v).reshape(n_batch, hd)  # [batch, head * d_head]
    attn_out = z @ at["W_O"].reshape(hd, d_model) + at["b_O"][None]  # [batch, d_model]
    resid = x_tab[tokens[:, -1], n_pos - 1] + attn_out  # the residual at the last position
    pre = resid @ mlp["W_in"] + mlp["b_in"][None]  # [batch, d_mlp]
    W_U = params["unembed"]["W_U"]
    if via_W_L is None:
        via_W_L = 2 * W_U.shape[1] <= d_model
    if not via_W_L:  # as the model computes it
        return (resid + activation(pre, cfg.act_fn) @ mlp["W_out"] + mlp["b_out"][None]) @ W_U \
            + params["unembed"]["b_U"][None]
    # (resid + act @ W_out + b_out) @ W_U, reassociated: act @ (W_out @ W_U) multiplies by
    # W_L [d_mlp, d_vocab_out] (p columns) instead of W_out [d_mlp, d_model] then W_U
    W_L = mlp["W_out"] @ W_U  # [d_mlp, d_vocab_out]
    bias = mlp["b_out"] @ W_U + params["unembed"]["b_U"]  # [d_vocab_out]
    return resid @ W_U + activation(pre, cfg.act_fn) @ W_L + bias[None]  # [batch, d_vocab_out]


def _check_one_layer_mlp(cfg: TransformerConfig, name: str) -> None:
    if cfg.n_layers != 1 or cfg.normalization_type is not None or cfg.attn_only:
        raise ValueError(f"{name} computes a one-layer model with an MLP and no norm "
                         f"(n_layers=1, normalization_type=None, attn_only=False); got n_layers="
                         f"{cfg.n_layers}, normalization_type={cfg.normalization_type!r}, "
                         f"attn_only={cfg.attn_only}. Use tinyinterp.model.forward instead.")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tokens", "group", "members"],
                   meta_fields=["n_batch"])
@dataclasses.dataclass(frozen=True)
class PositionGroups:
    """A fixed batch of tokens [batch, pos] grouped by token, per position (``position_groups``):
    ``tokens`` [pos] the distinct tokens at each position, [group] each; ``group`` [pos] which of
    them each row holds, [batch] each; ``members`` [pos] the rows of each group, [group, most]
    each, padded with ``batch`` (the index of an appended zero row). A pytree (jit takes it as
    an argument; the shapes are static, the arrays traced)."""

    n_batch: int
    tokens: tuple
    group: tuple
    members: tuple


def position_groups(tokens) -> PositionGroups:
    """Group a fixed (concrete, not traced) batch of tokens [batch, pos] by the token at each
    position, for ``grouped_last_position_logits``. Numpy, once per batch."""
    if isinstance(tokens, jax.core.Tracer):
        raise ValueError("position_groups needs concrete tokens (the fixed training or test "
                         "batch), not a traced value: build the groups outside jit")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a non-empty integer [batch, pos] array, got "
                         f"{tokens.dtype} {tokens.shape}")
    n = tokens.shape[0]
    vals, groups, members = [], [], []
    for column in tokens.T:
        v, group, counts = np.unique(column, return_inverse=True, return_counts=True)
        rows = np.full((len(v), counts.max()), n, np.int32)  # padding: the appended zero row
        order = np.argsort(group, kind="stable")  # the rows, grouped, in order within a group
        slot = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)  # place in its group
        rows[group[order], slot] = order
        vals.append(jnp.asarray(v, jnp.int32))
        groups.append(jnp.asarray(group.reshape(-1), jnp.int32))
        members.append(jnp.asarray(rows))
    return PositionGroups(n, tuple(vals), tuple(groups), tuple(members))


@jax.custom_vjp
def _rows(table, group, members):
    """``table[group]`` [batch, ...] from a per-group table [group, ...]. Its gradient sums each
    group's rows by a gather (``members``) and a reduction, not the scatter-add that the
    gradient of a gather is (XLA's CPU scatter measured ~10x slower per element)."""
    return table[group]


def _rows_fwd(table, group, members):
    return table[group], (group, members)


def _rows_bwd(res, d):
    group, members = res
    padded = jnp.concatenate([d, jnp.zeros_like(d[:1])])  # row ``batch``: the padding's zeros
    return jnp.sum(padded[members], axis=1), None, None


_rows.defvjp(_rows_fwd, _rows_bwd)


def _per_row(table, groups: PositionGroups, pos: int):
    """The rows' values from a per-group table of position ``pos``: the table itself ([1, ...],
    broadcast by the caller) where every row holds the same token (the "=" of every pair)."""
    if table.shape[0] == 1:
        return table
    return _rows(table, groups.group[pos], groups.members[pos])


def grouped_last_position_logits(params: dict, cfg: TransformerConfig,
                                 groups: PositionGroups) -> Float[Array, "batch d_vocab_out"]:
    """``last_position_logits`` of the batch that ``groups`` (``position_groups(tokens)``) was
    built from: the same function of the same parameters (tested against
    ``tinyinterp.model.forward``), arranged for fewer and faster operations per example.

    - Every per-token quantity is computed once per distinct (token, position) and looked up:
      the query, keys and values, and the last token's own residual already multiplied into the
      MLP's input and the logits ([group, d_mlp + d_vocab_out]); where one query serves every row
      (the last position holds "=" in every pair), the attention scores too ([group, head] per
      key position, not [batch, head, d_head] keys per row: ~4% less time per step at p 113,
      session 11, same process). Where a position holds one token
      for the whole batch (the "=" at the end of every pair) its table is broadcast, not
      gathered; elsewhere the lookups' gradients are gathers and sums over each token's rows
      (``_rows``), not XLA's slow scatter-add.
    - The attention output enters the MLP and the logits through W_O @ W_in [d_head * head,
      d_mlp] and W_O @ W_U, so the per-example products are z @ (W_O W_in), z @ (W_O W_U) and
      act @ W_L: 527 M multiply-adds forward at p 113 on 3,830 pairs, against 620 M.
    - The MLP's output reaches the logits through W_L^T = W_U^T W_out^T [d_vocab_out, d_mlp], so
      that W_L's gradient is computed as [d_vocab_out, d_mlp] (dlogits^T @ act), which XLA's CPU
      matmul does 1.8x faster than the [d_mlp, d_vocab_out] one (5.6 against 10.2 ms).
    Measured at p 113 on 3,830 pairs (benchmarks/grokking.py, same process, a loaded machine):
    see README.md's grokking section."""
    _check_one_layer_mlp(cfg, "grouped_last_position_logits")
    n_batch, n_pos = groups.n_batch, len(groups.tokens)
    at, mlp = params["blocks"][0]["attn"], params["blocks"][0]["mlp"]
    n_heads, d_model, d_head = at["W_Q"].shape
    W_E, W_pos, W_U = params["embed"]["W_E"], params["pos_embed"]["W_pos"], params["unembed"]["W_U"]

    def heads(x, W, b):  # [group, d_model] -> [group, head, d_head]
        return jnp.einsum("gm,hmd->ghd", x, W) + b[None]

    x_last = W_E[groups.tokens[-1]] + W_pos[n_pos - 1][None]  # [group, d_model]
    q = heads(x_last, at["W_Q"], at["b_Q"])  # [group, head, d_head]
    one_query = q.shape[0] == 1  # one token at the last position (the "=" of every pair)
    if not one_query:
        q = _per_row(q, groups, n_pos - 1)  # [batch, head, d_head]
    scores, values = [], []
    for pos in range(n_pos):
        x = W_E[groups.tokens[pos]] + W_pos[pos][None]  # [group, d_model]
        k = heads(x, at["W_K"], at["b_K"])  # [group, head, d_head]
        values.append(_per_row(heads(x, at["W_V"], at["b_V"]), groups, pos))
        if one_query:  # a score per (key token, head), looked up per row
            s = _per_row(jnp.sum(q * k, axis=-1), groups, pos)  # [batch | 1, head]
        else:
            s = jnp.sum(q * _per_row(k, groups, pos), axis=-1)
        scores.append(jnp.broadcast_to(s, (n_batch, n_heads)))
    pattern = jax.nn.softmax(jnp.stack(scores, axis=1) / jnp.float32(math.sqrt(d_head)), axis=1)
    z = sum(pattern[:, pos, :, None] * values[pos] for pos in range(n_pos))  # [batch, head, d_head]
    z = z.reshape(n_batch, n_heads * d_head)
    W_O = at["W_O"].reshape(n_heads * d_head, d_model)
    d_mlp = mlp["W_in"].shape[1]
    # the last token's own residual, into the MLP and the logits: [batch | 1, d_mlp + d_vocab_out]
    own = _per_row(x_last @ jnp.concatenate([mlp["W_in"], W_U], axis=1), groups, n_pos - 1)
    pre = z @ (W_O @ mlp["W_in"]) + own[:, :d_mlp] + (at["b_O"] @ mlp["W_in"] + mlp["b_in"])[None]
    resid_logits = z @ (W_O @ W_U) + own[:, d_mlp:] \
        + ((at["b_O"] + mlp["b_out"]) @ W_U + params["unembed"]["b_U"])[None]
    W_LT = W_U.T @ mlp["W_out"].T  # [d_vocab_out, d_mlp]
    return resid_logits + jnp.einsum("bm,nm->bn", activation(pre, cfg.act_fn), W_LT)


def model_last_position_logits(params: dict, cfg: TransformerConfig,
                               tokens: Int[Array, "batch pos"]) -> Float[Array, "batch d_vocab_out"]:
    """The reference: the whole model on the full sequence, then its last position."""
    return forward(params, cfg, tokens)[:, -1]


def _logits_fn(step_path: str, tokens):
    """``fn(params, cfg)``: the last position's logits of the fixed batch ``tokens`` by
    ``step_path`` (the grouped step's groups are built here, once)."""
    if step_path == "grouped":
        groups = position_groups(tokens)
        return lambda params, cfg: grouped_last_position_logits(params, cfg, groups)
    fn = last_position_logits if step_path == "lean" else model_last_position_logits
    tokens = jnp.asarray(tokens)
    return lambda params, cfg: fn(params, cfg, tokens)


def label_is_top(logits: Float[Array, "n c"], labels: Int[Array, " n"]) -> Float[Array, " n"]:
    """1.0 where the label's logit is the row's largest (a tie for the largest counts), else 0.0:
    the accuracy of the training step and the evaluations. The same as ``argmax == label`` but
    where another class ties the label's logit exactly; a max and a gather, not the slow
    index-carrying reduction XLA's CPU argmax is."""
    top = jnp.take_along_axis(logits, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]
    return (top >= jnp.max(logits, axis=-1)).astype(jnp.float32)


def sum_squared_weights(params: dict) -> Float[Array, ""]:
    """The sum of squares of every parameter (the paper's "total sum of squared weights")."""
    return sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class TrainResult:
    """A finished run. ``steps`` [eval] the steps of the eval rows; ``train_loss_every_step``
    [step]; ``test_loss``, ``test_acc``, ``train_acc``, ``train_loss`` [eval] at those steps;
    ``snapshot_steps`` [snapshot]; ``snapshots``: params stacked on a leading snapshot axis (the
    last is the final model); ``grok_step``: first eval step with test accuracy >= 99% (None if
    never); ``wall_s``: training time (compile included); ``params`` the final parameters."""

    config: GrokkingConfig
    model_cfg: TransformerConfig
    data: ModularAdditionSplit
    params: dict
    steps: np.ndarray
    train_loss_every_step: np.ndarray
    train_loss: np.ndarray
    train_acc: np.ndarray
    test_loss: np.ndarray
    test_acc: np.ndarray
    snapshot_steps: np.ndarray
    snapshots: dict
    grok_step: int | None
    total_steps: int
    wall_s: float
    compile_s: float

    @property
    def model(self) -> HookedTransformer:
        return HookedTransformer(self.model_cfg, self.params)


def _make_chunk(tc: GrokkingConfig, cfg: TransformerConfig, data: ModularAdditionSplit,
                frozen: dict):
    """(optimiser, chunk). ``chunk(params, opt_state)`` runs ``snapshot_every`` training steps as
    one compiled program: ``snapshot_every / eval_every`` blocks, each the test pairs' loss and
    accuracy at the block's first step, then ``eval_every`` steps whose loss and accuracy on the
    training pairs come from the step's own forward pass (no extra evaluation); and, for the
    parameters it returns, [train loss, train acc, test loss, test acc]. ``frozen``: a pytree of
    Python bools like the params (``frozen_mask``), the leaves whose gradient is dropped."""
    schedule = optax.linear_schedule(0.0, tc.lr, tc.warmup_steps) if tc.warmup_steps else tc.lr
    # PyTorch's AdamW (the paper's): decoupled weight decay, p -= lr * (adam + wd * p)
    opt = standard_promotion(optax.adamw(schedule, b1=tc.beta1, b2=tc.beta2, eps=1e-8,
                                         weight_decay=tc.weight_decay))
    split = {"train": data.train_idx, "test": data.test_idx}
    logits_fns = {k: _logits_fn(tc.step_path, data.tokens[idx]) for k, idx in split.items()}
    labels = {k: jnp.asarray(data.labels[idx]) for k, idx in split.items()}

    def loss_acc(params, which):
        logits, labs = logits_fns[which](params, cfg), labels[which]  # [n, p], [n]
        return fourier.cross_entropy(logits, labs), jnp.mean(label_is_top(logits, labs))

    def step(carry, _):
        params, opt_state = carry
        (loss, acc), grads = jax.value_and_grad(loss_acc, has_aux=True)(params, "train")
        grads = jax.tree_util.tree_map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), jnp.stack([loss, acc])

    def block(carry, _):
        test = jnp.stack(loss_acc(carry[0], "test"))  # at the block's first step
        carry, train_rows = jax.lax.scan(step, carry, None, length=tc.eval_every)
        return carry, (test, train_rows)

    @jax.jit
    def chunk(params, opt_state):
        (params, opt_state), (test, train_rows) = jax.lax.scan(
            block, (params, opt_state), None, length=tc.snapshot_every // tc.eval_every)
        end = jnp.stack([*loss_acc(params, "train"), *loss_acc(params, "test")])
        return params, opt_state, test, train_rows.reshape(-1, 2), end  # [eval, 2], [step, 2], [4]

    return opt, chunk


def train(tc: GrokkingConfig | None = None, *, verbose: bool = False) -> TrainResult:
    """Train one grokking run (see ``GrokkingConfig``) full-batch with AdamW, one compiled chunk
    of ``snapshot_every`` steps at a time (``_make_chunk``: the training pairs' loss and accuracy
    at every step, the test pairs' every ``eval_every`` steps), keeping a parameter snapshot per
    chunk; stops ``after_grok`` after test accuracy first reaches 99%. Same config -> bitwise the
    same run."""
    tc = tc or GrokkingConfig()
    data = modular_addition_split(tc.p, tc.train_fraction, tc.seed)
    cfg = model_config(tc.p, tc.d_model, tc.n_heads, tc.d_mlp)
    params = init_paper_params(cfg, tc.seed)
    opt, chunk = _make_chunk(tc, cfg, data, frozen_mask(params))
    opt_state = jax.jit(opt.init)(params)  # one program, not one per leaf
    t0 = time.perf_counter()
    chunk = chunk.lower(params, opt_state).compile()  # compiled ahead, so compile_s is compiling only
    compile_s = time.perf_counter() - t0
    snaps, snap_steps, tests, trains = [], [], [], []
    grok, stop, step = None, tc.max_steps, 0
    while step < stop:
        snaps.append(jax.tree_util.tree_map(np.asarray, params))
        snap_steps.append(step)
        params, opt_state, test, rows, end = chunk(params, opt_state)
        test, rows, end = np.asarray(test), np.asarray(rows), np.asarray(end)
        tests.append(test)
        trains.append(rows)
        if not (np.all(np.isfinite(test)) and np.all(np.isfinite(rows))):
            raise FloatingPointError(f"grokking run: non-finite loss by step {step}; lower lr")
        if grok is None and np.any(test[:, 1] >= 0.99):
            grok = step + int(np.argmax(test[:, 1] >= 0.99)) * tc.eval_every
            extra = max(tc.min_after_grok, int(tc.after_grok * grok))
            stop = min(tc.max_steps, grok + extra)
        step += tc.snapshot_every
        if verbose and step % (10 * tc.snapshot_every) == 0:
            print(f"[grokking] step {step}: train loss {rows[-1, 0]:.3g}, test loss "
                  f"{test[-1, 0]:.3g}, test acc {test[-1, 1]:.3f}", flush=True)
    snaps.append(jax.tree_util.tree_map(np.asarray, params))
    snap_steps.append(step)
    per_step = np.concatenate(trains)  # [step, 2]: loss, acc of the params before each step
    # eval rows at 0, eval_every, ..., step: the last is the final params' (the last chunk's end)
    test = np.concatenate(tests + [end[None, 2:]])
    train_rows = np.concatenate([per_step[::tc.eval_every], end[None, :2]])
    wall = time.perf_counter() - t0
    steps = np.arange(len(test)) * tc.eval_every
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *snaps)  # numpy: nothing to compile
    return TrainResult(config=tc, model_cfg=cfg, data=data, params=params, steps=steps,
                       train_loss_every_step=per_step[:, 0], train_loss=train_rows[:, 0],
                       train_acc=train_rows[:, 1], test_loss=test[:, 0], test_acc=test[:, 1],
                       snapshot_steps=np.asarray(snap_steps), snapshots=stacked, grok_step=grok,
                       total_steps=step, wall_s=wall, compile_s=compile_s)


# ----------------------------------------------------------------------------- progress measures
@dataclasses.dataclass(frozen=True)
class ProgressMeasures:
    """The paper's progress measures at each parameter snapshot, all [snapshot]: ``steps``;
    ``train_loss`` / ``test_loss``; ``restricted_loss`` (all pairs, the logits restricted to the
    key frequencies' cos/sin(w(a + b)) directions); ``excluded_loss`` (training pairs, those
    directions removed); ``sum_sq_weights``; ``gini_W_E`` / ``gini_W_L`` (Gini coefficients of the
    Fourier-component norms of W_E and of W_L = W_out @ W_U); ``key_energy_W_E`` (share of W_E's
    non-constant Fourier energy on the key frequencies). ``key_freqs``: the frequencies used."""

    steps: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray
    restricted_loss: np.ndarray
    excluded_loss: np.ndarray
    sum_sq_weights: np.ndarray
    gini_W_E: np.ndarray
    gini_W_L: np.ndarray
    key_energy_W_E: np.ndarray
    key_freqs: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (list(getattr(self, f.name)) if f.name == "key_freqs"
                         else np.asarray(getattr(self, f.name)).tolist())
                for f in dataclasses.fields(self)}


def progress_measures(result: TrainResult, key_freqs) -> ProgressMeasures:
    """Every progress measure at every snapshot of ``result``, as one compiled program over the
    snapshots (``lax.map``: one snapshot's [p^2, p] logits in memory at a time)."""
    cfg, data, p = result.model_cfg, result.data, result.data.p
    tokens, labels = jnp.asarray(data.tokens), jnp.asarray(data.labels)
    is_train = jnp.asarray(data.is_train)
    freqs = [int(f) for f in key_freqs]
    key_idx = jnp.asarray([f - 1 for f in freqs], jnp.int32)

    def one(params):
        logits = last_position_logits(params, cfg, tokens)  # [pair, p]
        W_E = params["embed"]["W_E"]
        W_L = params["blocks"][0]["mlp"]["W_out"] @ params["unembed"]["W_U"]  # [d_mlp, p]
        se, sl = fourier.embedding_spectrum(W_E, p), fourier.unembed_spectrum(W_L, p)
        key_share = (jnp.sum(se.energy[key_idx]) / jnp.sum(se.energy) if freqs
                     else jnp.float32(0.0))
        out = [fourier.cross_entropy(logits, labels, is_train),
               fourier.cross_entropy(logits, labels, ~is_train),
               fourier.restricted_loss(logits, labels, freqs) if freqs else jnp.float32(jnp.nan),
               fourier.excluded_loss(logits, labels, freqs, is_train) if freqs
               else jnp.float32(jnp.nan),
               sum_squared_weights(params), se.gini, sl.gini, key_share]
        return jnp.stack(out)

    vals = np.asarray(jax.jit(lambda s: jax.lax.map(one, s))(result.snapshots))  # [snapshot, 8]
    return ProgressMeasures(steps=np.asarray(result.snapshot_steps), train_loss=vals[:, 0],
                            test_loss=vals[:, 1], restricted_loss=vals[:, 2],
                            excluded_loss=vals[:, 3], sum_sq_weights=vals[:, 4],
                            gini_W_E=vals[:, 5], gini_W_L=vals[:, 6], key_energy_W_E=vals[:, 7],
                            key_freqs=tuple(freqs))


def phases(result: TrainResult) -> dict[str, Any]:
    """Mark the three phases from the loss and accuracy curves alone (so the progress measures can
    be checked against them): memorisation ends where the test loss peaks (the model has fit its
    training pairs in a way that generalises worst: train accuracy reached 99% at
    ``train_99_step``); circuit formation runs until the test loss has fallen to half its peak
    (in nats), where cleanup starts; cleanup ends when test accuracy first reaches 99%
    (``grok_step``). Steps are eval steps."""
    steps, tl = result.steps, result.test_loss
    train99 = _first(steps, result.train_acc >= 0.99)
    grok = result.grok_step
    end = len(steps) if grok is None else int(np.searchsorted(steps, grok)) + 1
    i_peak = int(np.argmax(tl[:end]))
    half = tl[i_peak] / 2.0
    after = np.flatnonzero(tl[i_peak:end] <= half)
    clean = int(steps[i_peak + after[0]]) if len(after) else None
    return {"train_99_step": train99, "memorisation_end": int(steps[i_peak]),
            "peak_test_loss": float(tl[i_peak]), "cleanup_start": clean, "grok_step": grok,
            "end": int(result.total_steps)}


def _first(steps: np.ndarray, cond: np.ndarray) -> int | None:
    i = np.flatnonzero(cond)
    return int(steps[i[0]]) if len(i) else None


# ----------------------------------------------------------------------------- the experiment
KEY_FREQS_RANGE = (3, 7)  # the "3-7 key frequencies"
KEY_ENERGY_MIN = 0.5  # "carrying most of W_E's Fourier norm": more than half of its energy
MIN_DELAY = 500  # steps between train and test accuracy reaching 99%
NEURON_THRESHOLD = 0.85  # the paper's share of variance for "explained by one frequency"
# quick (CI, the tutorial): the default setup with half the step cap, so it is the default
# command's own run (seed 0 groks at step 1,390). Grokking at small p is seed-sensitive, and a
# CI run must not depend on one lucky seed: measured (session 11), the default setup passes every
# check on seeds 0, 1, 3, 4, 5 and fails seed 2 (99% test accuracy only at step 7,030), with
# both this step and the one before it (which moves the runs by float rounding); the previous
# quick setup (p 31, 50% of pairs) passed on seeds 0 and 2 of 0-3 only, so a change of float
# rounding could move CI's run off its checks. (p 37 with 50% passed seeds 1-7 but not 0: key
# frequencies not yet apart at the stop, or a late loss spike.)
QUICK = dict(max_steps=6000)


@functools.partial(jax.jit, static_argnames="step_path")
def _final_arrays(model: HookedTransformer, tokens: Int[Array, "pair pos"],
                  groups: PositionGroups | None, step_path: str) -> dict[str, Any]:
    """Everything about the final model that does not depend on the key frequencies, as one
    compiled program: the logits and MLP activations through the model's hooks, the training
    step's logits (``step_path``; ``groups`` are the pairs' ``position_groups`` for the grouped
    step), to compare, the spectra of W_E and W_L, the neurons' frequencies, the 2-D transform of
    the logits."""
    p = model.cfg.d_vocab_out
    logits_full, cache = model.run_with_cache(tokens, names_filter=["blocks.0.mlp.hook_post"])
    logits = logits_full[:, -1]  # [pair, p]: the answer is read at the last position ("=")
    if step_path == "grouped":
        step = grouped_last_position_logits(model.params, model.cfg, groups)
    elif step_path == "lean":
        step = last_position_logits(model.params, model.cfg, tokens)
    else:
        step = model_last_position_logits(model.params, model.cfg, tokens)
    params = model.params
    W_L = params["blocks"][0]["mlp"]["W_out"] @ params["unembed"]["W_U"]  # [d_mlp, p]
    acts = cache["blocks.0.mlp.hook_post"][:, -1].reshape(p, p, -1)  # [a, b, neuron]
    return {"logits": logits, "step_gap": jnp.max(jnp.abs(step - logits)), "acts": acts,
            "se": fourier.embedding_spectrum(params["embed"]["W_E"], p),
            "sl": fourier.unembed_spectrum(W_L, p),
            "nf": fourier.neuron_frequencies(acts, threshold=NEURON_THRESHOLD),
            "l2d": fourier.logits_fourier_2d(logits),
            "strength": jnp.std(acts.reshape(p * p, -1), axis=0)}  # [neuron]


def _energy_share(energy: np.ndarray, freqs) -> float:
    """Share of a spectrum's energy [freq] on ``freqs`` (numpy: no compile for a few numbers)."""
    e = np.asarray(energy, np.float64)
    return float(e[[f - 1 for f in freqs]].sum() / max(e.sum(), 1e-30)) if freqs else 0.0


def analyse(result: TrainResult) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything the report says about a finished run: the key frequencies, the neurons, the 2-D
    Fourier transform of the logits, the progress measures and the phases. Reads the trained
    model through its hooks (``run_with_cache``) and checks that the training step's logits
    (``config.step_path``) are the model's. Two compiled programs: the final model's arrays
    (``_final_arrays``), then the progress measures over the snapshots (which need the key
    frequencies). Returns (JSON-safe findings, arrays for the figures)."""
    data, p = result.data, result.data.p
    model = result.model
    step_path = result.config.step_path
    groups = position_groups(data.tokens) if step_path == "grouped" else None
    fa = _final_arrays(model, jnp.asarray(data.tokens), groups, step_path)
    se, sl, nf = fa["se"], fa["sl"], fa["nf"]
    keys = fourier.key_frequencies(se.energy)
    logits = np.asarray(fa["logits"], np.float64)  # [pair, p]
    centred = logits - logits.mean(axis=0, keepdims=True)
    if keys:  # variance of the logits along the key frequencies' cos/sin(w(a + b)) directions
        U = np.asarray(fourier.sum_directions(p, keys), np.float64)  # [direction, pair]
        kept = U.T @ (U @ centred)
        key_logit_share = float(np.sum(kept ** 2) / np.sum(centred ** 2))
    else:
        key_logit_share = 0.0
    pm = progress_measures(result, keys)
    ph = phases(result)
    # neurons to show: the most active ones of different key frequencies
    best, frac = np.asarray(nf.best_freq), np.asarray(nf.frac_explained)
    order = np.argsort(-np.asarray(fa["strength"]))
    shown = []
    for f in keys:
        shown += [int(i) for i in order if best[i] == f and frac[i] >= nf.threshold][:1]
    shown += [int(i) for i in order if int(i) not in shown][:max(0, 4 - len(shown))]
    explained = frac >= nf.threshold
    findings = {
        "training_step": step_path,
        "step_vs_model_max_abs_logit_diff": float(fa["step_gap"]),
        "key_frequencies": keys,
        "W_E": {"energy_share_of_key_frequencies": _energy_share(se.energy, keys),
                "energy_per_frequency": np.asarray(se.energy).tolist(),
                "gini": float(se.gini)},
        "W_L": {"key_frequencies": fourier.key_frequencies(sl.energy),
                "energy_share_of_key_frequencies": _energy_share(sl.energy, keys),
                "gini": float(sl.gini)},
        "neurons": {"threshold": nf.threshold,
                    "fraction_explained_by_one_frequency": float(np.mean(explained)),
                    "neurons_per_frequency": nf.counts(),
                    "share_of_explained_neurons_on_key_frequencies": float(
                        np.mean(np.isin(best[explained], keys))) if np.any(explained) else 0.0,
                    "shown": shown},
        "logits_fourier_2d": {"share_of_centred_logits_on_key_sum_directions": key_logit_share,
                              "top_components": _top_components(np.asarray(fa["l2d"]), se.labels, 8)},
        "phases": ph,
        "progress": pm.as_dict(),
    }
    arrays = {"acts": np.asarray(fa["acts"]), "best_freq": best, "frac": frac, "se": se, "sl": sl,
              "l2d": np.asarray(fa["l2d"]), "pm": pm, "model": model}
    return findings, arrays


def _top_components(m: np.ndarray, labels, k: int) -> list[dict[str, Any]]:
    sq = m.ravel() ** 2
    order = np.argsort(-sq)[:k]
    n = m.shape[0]
    return [{"a": labels[i // n], "b": labels[i % n], "share": float(sq[i] / sq.sum())}
            for i in order]


def _at(pm: ProgressMeasures, step: int | None) -> int:
    """Index of the last snapshot at or before ``step``."""
    if step is None:
        return len(pm.steps) - 1
    return max(0, int(np.searchsorted(pm.steps, step, side="right")) - 1)


def checks(result: TrainResult, f: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's findings, each a check with its value, threshold and a plain-words line."""
    ph, pm = f["phases"], ProgressMeasures(**{k: (tuple(v) if k == "key_freqs" else np.asarray(v))
                                               for k, v in f["progress"].items()})
    out = {}
    final_acc = float(result.test_acc[-1])
    delay = (None if ph["grok_step"] is None or ph["train_99_step"] is None
             else ph["grok_step"] - ph["train_99_step"])
    out["grokked"] = {
        "holds": final_acc > 0.99 and delay is not None and delay >= MIN_DELAY,
        "value": {"final_test_accuracy": final_acc, "delay_steps": delay},
        "threshold": f"test accuracy > 0.99, reached >= {MIN_DELAY} steps after train accuracy",
        "words": (f"Train accuracy reached 99% at step {ph['train_99_step']}, test accuracy only at "
                  f"step {ph['grok_step']}, {delay} steps later (final test accuracy "
                  f"{final_acc:.2%}): the model memorised first and generalised much later."
                  if delay is not None else
                  f"Test accuracy never reached 99% (final {final_acc:.2%}).")}
    keys, share = f["key_frequencies"], f["W_E"]["energy_share_of_key_frequencies"]
    lo, hi = KEY_FREQS_RANGE
    out["key_frequencies"] = {
        "holds": lo <= len(keys) <= hi and share > KEY_ENERGY_MIN,
        "value": {"n": len(keys), "frequencies": keys, "energy_share": share},
        "threshold": f"{lo}-{hi} frequencies carrying > {KEY_ENERGY_MIN:.0%} of W_E's Fourier energy",
        "words": (f"W_E's Fourier spectrum has {len(keys)} key frequencies {sorted(keys)} (those "
                  f"above the largest drop in its sorted spectrum, all >= 10x its median) carrying "
                  f"{share:.0%} of its "
                  f"energy (squared norm, constant left out); the other "
                  f"{result.data.p // 2 - len(keys)} frequencies share the rest.")}
    i_mem, i_clean = _at(pm, ph["memorisation_end"]), _at(pm, ph["cleanup_start"])
    r, t = float(pm.restricted_loss[i_clean]), float(pm.test_loss[i_clean])
    r_mem = float(pm.restricted_loss[i_mem])
    out["restricted_loss_leads"] = {
        "holds": ph["cleanup_start"] is not None and r < t and r < r_mem,
        "value": {"step": int(pm.steps[i_clean]), "restricted_loss": r, "test_loss": t,
                  "restricted_loss_at_memorisation_end": r_mem},
        "threshold": "restricted < test loss at the start of cleanup, and falling since memorisation",
        "words": (f"Before the test loss falls (step {int(pm.steps[i_clean])}, start of cleanup) "
                  f"the restricted loss, which keeps only the key frequencies' cos/sin(w(a+b)) "
                  f"parts of the logits, is already {r:.3g} against a test loss of {t:.3g} (it was "
                  f"{r_mem:.3g} at the end of memorisation): the generalising circuit is there "
                  f"before the test loss shows it.")}
    span = slice(i_mem, i_clean + 1)
    ex, tr = pm.excluded_loss[span], pm.train_loss[span]
    ratio = float(np.min(ex / np.maximum(tr, 1e-30))) if len(ex) else float("nan")
    out["excluded_loss_rises"] = {
        "holds": bool(len(ex) >= 2 and np.all(ex > tr) and ex[-1] > ex[0]),
        "value": {"steps": [int(pm.steps[i_mem]), int(pm.steps[i_clean])],
                  "excluded_loss": [float(ex[0]), float(ex[-1])] if len(ex) else [],
                  "train_loss": [float(tr[0]), float(tr[-1])] if len(tr) else [],
                  "min_ratio_excluded_over_train": ratio},
        "threshold": "excluded > train loss at every snapshot of circuit formation, and rising",
        "words": (f"During circuit formation (steps {int(pm.steps[i_mem])}-{int(pm.steps[i_clean])}) "
                  f"the excluded loss, the training loss with the key frequencies cut out of the "
                  f"logits, stays above the train loss (at least {ratio:.3g}x) and rises from "
                  f"{float(ex[0]):.3g} to {float(ex[-1]):.3g}: the model fits its training pairs "
                  f"more and more through the Fourier circuit and less through memorisation."
                  if len(ex) else "Circuit formation was not found.")}
    w_mem, w_end = float(pm.sum_sq_weights[i_mem]), float(pm.sum_sq_weights[-1])
    w_peak = float(np.max(pm.sum_sq_weights))
    out["weight_norm_falls"] = {
        "holds": w_end < w_mem,
        "value": {"at_memorisation_end": w_mem, "peak": w_peak, "final": w_end},
        "threshold": "sum of squared weights at the end < at the end of memorisation",
        "words": (f"The sum of squared weights falls after memorisation, from {w_mem:.4g} (end of "
                  f"memorisation) to {w_end:.4g} at the end ({w_end / w_mem:.0%}): weight decay "
                  f"removes the memorising weights once the circuit does the job more cheaply.")}
    gap = f["step_vs_model_max_abs_logit_diff"]
    out["training_step_is_the_model"] = {
        "holds": gap < 1e-3,
        "value": gap,
        "threshold": f"max abs({f['training_step']} step - model) logit < 1e-3",
        "words": (f"The trained parameters in the HookedTransformer give the same logits as the "
                  f"{f['training_step']} training step that trained them (max difference "
                  f"{gap:.2g}).")}
    return out


def write_figures(out: Path, result: TrainResult, f: dict, arrays: dict) -> list[tuple[str, str]]:
    from tinyinterp.plotting import grokking as gp
    from tinyinterp.reproduce._io import save_figure

    pm, ph, keys = arrays["pm"], f["phases"], f["key_frequencies"]
    figs = [
        ("curves.png", "Train and test loss (log scale) and accuracy, phases shaded",
         gp.plot_training_curves(result.steps, result.train_loss, result.test_loss,
                                 result.train_acc, result.test_acc, ph)),
        ("W_E_fourier.png", "Fourier norms of W_E, key frequencies in red",
         gp.plot_fourier_norms(np.asarray(arrays["se"].norms), arrays["se"].labels, keys)),
        ("W_L_fourier.png", "Fourier norms of W_L = W_out W_U (over the output)",
         gp.plot_fourier_norms(np.asarray(arrays["sl"].norms), arrays["sl"].labels, keys,
                               title="Fourier components of W_L")),
        ("neurons.png", "MLP neurons over (a, b) and the share explained by one frequency",
         gp.plot_neurons(arrays["acts"], f["neurons"]["shown"], arrays["best_freq"], arrays["frac"],
                         f["neurons"]["threshold"])),
        ("progress_measures.png", "Restricted and excluded loss",
         gp.plot_progress_measures(pm.steps, pm.train_loss, pm.test_loss, pm.restricted_loss,
                                   pm.excluded_loss, ph, keys)),
        ("weight_norm.png", "Sum of squared weights",
         gp.plot_series(pm.steps, {"sum of squared weights": pm.sum_sq_weights}, ph,
                        ylabel="sum of squared weights", title="Total sum of squared weights")),
        ("gini.png", "Gini coefficients of the Fourier norms of W_E and W_L",
         gp.plot_series(pm.steps, {"Gini(W_E Fourier norms)": pm.gini_W_E,
                                   "Gini(W_L Fourier norms)": pm.gini_W_L}, ph,
                        ylabel="Gini coefficient", title="Sparsity of W_E and W_L in the Fourier basis")),
        ("logits_fourier.png", "2-D Fourier transform of the logits",
         gp.plot_logits_fourier(arrays["l2d"], arrays["se"].labels)),
    ]
    for name, _, fig in figs:
        save_figure(fig, out / name)
    return [(name, caption) for name, caption, _ in figs]


def _summary(report: dict) -> list[str]:
    ph = report["findings"]["phases"]
    lines = [f"Grokking (a + b) mod {report['data']['p']}, {report['setup']}: "
             f"{report['data']['n_train']} training pairs, {report['data']['n_test']} held out; "
             f"trained {report['train']['total_steps']} steps in {report['timings_s']['train']:.1f} s "
             f"(compile {report['train']['compile_s']:.1f} s; {report['cpu_s']['train']:.1f} "
             f"CPU-seconds), {report['timings_s']['total']:.1f} s in all "
             f"({report['cpu_s']['total']:.1f} CPU-seconds; load average {os.getloadavg()[0]:.1f}).",
             f"Phases: memorisation to step {ph['memorisation_end']}, circuit formation to step "
             f"{ph['cleanup_start']}, cleanup to step {ph['grok_step']}."]
    for name, c in report["checks"].items():
        lines.append(f"[{'ok' if c['holds'] else 'FAILED'}] {name}: {c['words']}")
    return lines


def _markdown(report: dict, figures: list[tuple[str, str]], summary: list[str]) -> str:
    f = report["findings"]
    nn = f["neurons"]
    md = ["# Grokking modular addition: reproduction", "",
          f"Nanda, Chan, Lieberum, Smith & Steinhardt (2023), \"Progress measures for grokking via "
          f"mechanistic interpretability\". Setup: {report['setup']}; seed {report['seed']}; "
          f"{report['timings_s']['total']:.1f} s wall in all. Numbers: report.json.", "",
          "Model: one layer, 4 heads, d_model 128, d_mlp 512, ReLU, no layer norm, untied "
          "embedding (p + 1 tokens: the numbers and \"=\") and unembedding (p outputs), the "
          "paper's init, no attention or unembedding biases (held at zero). Input \"a b =\", "
          "answer read at the last position. AdamW, full batch.", "",
          "## Findings", ""]
    md += [f"- {s}" for s in summary]
    md += ["", "## The circuit", "",
           f"- Key frequencies (from W_E): {f['key_frequencies']}; W_L's own key frequencies: "
           f"{f['W_L']['key_frequencies']} (W_L's energy on W_E's key frequencies: "
           f"{f['W_L']['energy_share_of_key_frequencies']:.0%}).",
           f"- {nn['fraction_explained_by_one_frequency']:.0%} of the {report['model']['d_mlp']} "
           f"MLP neurons have >= {nn['threshold']:.0%} of their variance over (a, b) in one "
           f"frequency; {nn['share_of_explained_neurons_on_key_frequencies']:.0%} of those on a key "
           f"frequency. Neurons per frequency: {nn['neurons_per_frequency']}.",
           f"- The logits: {f['logits_fourier_2d']['share_of_centred_logits_on_key_sum_directions']:.0%}"
           f" of their variance over inputs lies along cos(w(a+b)) and sin(w(a+b)) of the key "
           f"frequencies. Largest 2-D components: "
           + ", ".join(f"{c['a']} x {c['b']} ({c['share']:.1%})"
                       for c in f["logits_fourier_2d"]["top_components"][:6]) + ".",
           f"- Gini coefficient of the Fourier norms: W_E {f['progress']['gini_W_E'][0]:.2f} at "
           f"init -> {f['W_E']['gini']:.2f}; W_L {f['progress']['gini_W_L'][0]:.2f} -> "
           f"{f['W_L']['gini']:.2f}.", "",
           "How it computes a + b: with w = 2 pi k / p, the embedding gives cos(wa), sin(wa), "
           "cos(wb), sin(wb); the MLP's ReLUs, being non-linear, form products of the a and b "
           "waves, whose parts cos(w(a+b)) = cos(wa)cos(wb) - sin(wa)sin(wb) and sin(w(a+b)) = "
           "sin(wa)cos(wb) + cos(wa)sin(wb) W_L maps to cos(w(a+b))cos(wc) + sin(w(a+b))sin(wc) = "
           "cos(w(a+b-c)), which is largest (1) exactly at c = a + b mod p. Several frequencies "
           "add up, so the wrong answers cancel while the right one adds.", "",
           "## Checks", "", "| check | threshold | holds |", "|---|---|---|"]
    for name, c in report["checks"].items():
        md.append(f"| {name} | {c['threshold']} | {'yes' if c['holds'] else 'NO'} |")
    md += ["", "## Figures", ""]
    for name, caption in figures:
        md += [f"### {caption}", "", f"![{caption}]({name})", ""]
    return "\n".join(md) + "\n"


class GrokkingCheckFailed(AssertionError):
    """A finding of the issue did not hold (the report was written; see its checks)."""


def run(out_dir: str | os.PathLike = "reproduce_grokking", *, seed: int = 0, paper: bool = False,
        quick: bool = False, verbose: bool = True, strict: bool = True,
        config: GrokkingConfig | None = None) -> dict:
    """Train, analyse, write report.json / report.md / PNGs / the model into ``out_dir``, print a
    plain-words summary and return the report. ``paper``: the published setup; ``quick``: the
    default setup capped at ``QUICK['max_steps']`` steps (CI and lesson 08; not with ``paper``,
    whose run needs more). ``strict``: raise ``GrokkingCheckFailed`` (after writing the
    report) if a finding does not hold."""
    from tinyinterp.reproduce._io import write_report

    if paper and quick:
        raise ValueError("quick is the default setup's capped run; it does not combine with paper "
                         "(the published setup groks after 6,000-8,500 steps)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    if config is None:
        config = GrokkingConfig.paper(seed=seed) if paper else GrokkingConfig(seed=seed)
        if quick:
            config = config.replace(**QUICK)
    setup = ("the paper's setup" if paper else "the default (fast) setup") + (", quick" if quick else "")
    setup += (f" (p {config.p}, lr {config.lr:g}, weight decay {config.weight_decay:g}, betas "
              f"({config.beta1:g}, {config.beta2:g}), {config.warmup_steps} warm-up steps, "
              f"{config.train_fraction:.0%} of pairs train, full batch)")
    if verbose:
        print(f"[grokking] training: {setup}", flush=True)
    result = train(config, verbose=verbose)
    t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
    t1, c1 = time.perf_counter(), time.process_time()
    findings, arrays = analyse(result)
    t_analysis, c_analysis = time.perf_counter() - t1, time.process_time() - c1
    report = {
        "experiment": "grokking", "seed": config.seed, "paper": paper, "quick": quick,
        "setup": setup, "config": dataclasses.asdict(config), "model": result.model_cfg.to_dict(),
        "data": {**result.data.to_dict(), "n_train": int(result.data.is_train.sum()),
                 "n_test": int((~result.data.is_train).sum())},
        "train": {"total_steps": result.total_steps, "grok_step": result.grok_step,
                  "compile_s": result.compile_s, "step_path": config.step_path},
        "curves": {"steps": result.steps.tolist(), "train_loss": result.train_loss.tolist(),
                   "test_loss": result.test_loss.tolist(), "train_acc": result.train_acc.tolist(),
                   "test_acc": result.test_acc.tolist()},
        "findings": findings,
    }
    report["checks"] = checks(result, findings)
    t2, c2 = time.perf_counter(), time.process_time()
    from tinyinterp.checkpoint import save_model

    save_model(arrays["model"], out / "model")  # `tinyinterp inspect OUT/model` reads it
    figures = write_figures(out, result, findings, arrays)
    report["timings_s"] = {"train": t_train, "analysis": t_analysis,
                           "figures": time.perf_counter() - t2, "total": time.perf_counter() - t0}
    # CPU seconds (all threads) of the same spans: on a shared machine, what the run itself used
    report["cpu_s"] = {"train": c_train, "analysis": c_analysis,
                       "figures": time.process_time() - c2, "total": time.process_time() - c0}
    report = write_report(out, report, figures, _summary, _markdown, verbose=verbose)
    failed = [n for n, c in report["checks"].items() if not c["holds"]]
    if strict and failed:
        raise GrokkingCheckFailed(f"grokking: findings that did not hold: {failed} (see "
                                  f"{out / 'report.md'})")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reproduce_grokking", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the init")
    parser.add_argument("--paper", action="store_true",
                        help="the published setup: p 113, 30%% of pairs train, weight decay 1 "
                             "(default: p 43, 40%%, weight decay 3, the three phases apart in "
                             "well under a minute)")
    parser.add_argument("--quick", action="store_true",
                        help=f"the default setup capped at {QUICK['max_steps']:,} steps (CI); "
                             "not with --paper")


def main(args: argparse.Namespace) -> int:
    try:
        run(args.out, seed=args.seed, paper=args.paper, quick=args.quick)
    except GrokkingCheckFailed as e:
        print(f"tinyinterp reproduce grokking: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
