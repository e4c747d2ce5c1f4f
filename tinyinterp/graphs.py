"""Attribution graphs (Ameisen et al. 2025, "Circuit Tracing"; the circuit-tracer library).

Axis vocabulary: layer, pos, d_model, feature, node, row (a target node whose incoming edges are
computed), vocab.

**The local replacement model** of one prompt: every MLP is replaced by its transcoder
(``tinyinterp.transcoders``) plus an *error node* per (layer, pos) equal to the MLP's output minus
the transcoder's; the attention patterns and every norm's scale are held at their values on the
prompt. What remains is linear in the residual stream: each target node's pre-activation is a
sum of direct contributions (edges) from the nodes upstream plus a constant (the biases).

**Nodes**, in circuit-tracer's order: active features (sorted by layer, pos, feature), error nodes
(layer-major: index n_features + layer * n_pos + pos), token nodes (the token's embedding with its
positional embedding folded in), logit nodes (the top tokens of the last position covering
``desired_logit_prob`` of the probability, at most ``max_n_logits``). The constant terms (every
bias, pushed through the frozen model) form one more node, kept apart in ``graph.constant``.

**Edges** ``adjacency[target, source]``: a feature's edge is its activation times the gradient of
the target's pre-activation with respect to it in the local replacement model; an error or token
node's edge is its vector dotted with the gradient at the point it writes to. A feature target's
pre-activation is its encoder's ``x W_enc + b_enc``; a logit target's is the logit minus the mean
logit, read through the demeaned unembedding (circuit-tracer's). So for every target

    sum(adjacency[target]) + constant[target] == value[target]      (to float32 rounding).

Rows are computed by vector-Jacobian products batched over target rows (``jax.vmap`` over the
rows of a chunk of ``batch_size`` rows, one compiled program per target layer) and stored sparse
(scipy CSR): never one backward pass per node.

**Pruning and scores** (circuit-tracer's ``prune_graph`` and ``compute_graph_scores``): influence
is w ((I - A)^-1 - I) = w A + w A^2 + ..., A the adjacency with absolute values, rows normalised
to sum 1, w the logit probabilities on the logit nodes. Nodes are kept down to ``node_threshold``
(0.8) of the total influence, edges to ``edge_threshold`` (0.98) of the total edge influence;
token and logit nodes are always kept. Error nodes are pruned like features (kept when their
influence passes the threshold and they keep an outgoing edge), never forced in or out; feature
nodes also need a kept incoming edge. The constant node is not part of the influence
computation (circuit-tracer has none). Replacement score: the share of influence reaching the
tokens rather than error nodes; completeness: the influence-weighted share of each node's
(normalised) inputs that come from non-error nodes.

**Interventions** (``intervene``): set or scale features, with the attention patterns and norm
scales frozen and the feature activations of a range of layers constrained (held at their values
except where set), or unconstrained through the real MLPs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jaxtyping import Array, Float

from tinyinterp.transcoders import Transcoders, mlp_input_hook

__all__ = [
    "AttributionGraph", "GraphScores", "PruneResult", "attribution_graph", "prune_graph",
    "graph_scores", "node_influence", "FeatureIntervention", "InterventionResult", "intervene",
    "graph_json", "save_graph_json", "feature_examples",
]


# ----------------------------------------------------------------------------- the graph
@dataclass(frozen=True, eq=False)
class AttributionGraph:
    """A prompt's attribution graph (see the module docstring for the node order and edges).

    ``adjacency`` [node, node] (targets x sources, scipy CSR float32); ``constant`` [node] (the
    constant node's edge into each target); ``values`` [node] (each target's pre-activation: a
    feature's encoder pre-activation, a logit minus the mean logit; 0 for error and token nodes);
    ``active_features`` [n_features, 3] (layer, pos, feature); ``activations`` [n_features];
    ``logit_tokens`` / ``logit_probabilities`` [n_logits]; ``error_norms`` [layer, pos]."""

    adjacency: sp.csr_matrix
    constant: np.ndarray
    values: np.ndarray
    tokens: np.ndarray
    active_features: np.ndarray
    activations: np.ndarray
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray
    n_layers: int
    error_norms: np.ndarray
    settings: dict = field(default_factory=dict)

    n_pos = property(lambda self: int(self.tokens.shape[0]))
    n_features = property(lambda self: int(self.active_features.shape[0]))
    n_errors = property(lambda self: self.n_layers * self.n_pos)
    n_tokens = property(lambda self: self.n_pos)
    n_logits = property(lambda self: int(self.logit_tokens.shape[0]))
    n_nodes = property(lambda self: self.n_features + self.n_errors + self.n_pos + self.n_logits)
    error_start = property(lambda self: self.n_features)
    token_start = property(lambda self: self.n_features + self.n_errors)
    logit_start = property(lambda self: self.token_start + self.n_pos)

    def logit_weights(self) -> np.ndarray:
        """[node]: each logit node's probability, 0 elsewhere (the influence's starting vector)."""
        w = np.zeros(self.n_nodes, np.float32)
        w[self.logit_start:] = self.logit_probabilities
        return w

    def dense(self) -> np.ndarray:
        """The adjacency as a dense [node, node] array (small graphs only)."""
        return self.adjacency.toarray()

    def kind(self, node: int) -> str:
        """"feature" | "error" | "token" | "logit"."""
        if not 0 <= node < self.n_nodes:
            raise IndexError(f"node {node} out of range: the graph has {self.n_nodes} nodes")
        for name, start in (("logit", self.logit_start), ("token", self.token_start),
                            ("error", self.error_start)):
            if node >= start:
                return name
        return "feature"

    def feature_node(self, layer: int, pos: int, feature: int) -> int:
        """The node index of an active feature (KeyError when it is not active here)."""
        hit = np.nonzero((self.active_features[:, 0] == layer) & (self.active_features[:, 1] == pos)
                         & (self.active_features[:, 2] == feature))[0]
        if not hit.size:
            raise KeyError(f"feature {feature} of layer {layer} is not active at pos {pos}")
        return int(hit[0])

    def error_node(self, layer: int, pos: int) -> int:
        return self.error_start + layer * self.n_pos + pos

    def token_node(self, pos: int) -> int:
        return self.token_start + pos

    def logit_node(self, token: int) -> int:
        hit = np.nonzero(self.logit_tokens == token)[0]
        if not hit.size:
            raise KeyError(f"token {token} is not one of the graph's logit nodes "
                           f"{self.logit_tokens.tolist()}")
        return self.logit_start + int(hit[0])

    def label(self, node: int, token_labels: Sequence[str] | None = None) -> str:
        """A short readable name for a node."""
        def name(t):
            return token_labels[t] if token_labels is not None else str(t)
        kind = self.kind(node)
        if kind == "feature":
            layer, pos, f = self.active_features[node]
            return f"L{layer} F{f} @{pos}"
        if kind == "error":
            layer, pos = divmod(node - self.error_start, self.n_pos)
            return f"err L{layer} @{pos}"
        if kind == "token":
            pos = node - self.token_start
            return f"{name(int(self.tokens[pos]))} @{pos}"
        i = node - self.logit_start
        return f"logit {name(int(self.logit_tokens[i]))} (p={self.logit_probabilities[i]:.3f})"

    def __repr__(self) -> str:
        return (f"AttributionGraph(pos={self.n_pos}, features={self.n_features}, "
                f"errors={self.n_errors}, logits={self.n_logits}, edges={self.adjacency.nnz})")


# ----------------------------------------------------------------------------- input checks
def _check_inputs(model, transcoders: Transcoders | None, tokens) -> tuple[Transcoders, np.ndarray]:
    from tinyinterp.inputs import check_tokens

    cfg = model.cfg
    if transcoders is None:
        transcoders = Transcoders([])
    if not isinstance(transcoders, Transcoders):
        raise TypeError(f"transcoders must be a tinyinterp.transcoders.Transcoders (one per MLP "
                        f"layer; None for an attention-only model), got {type(transcoders).__name__}")
    transcoders.check(cfg)
    toks = np.asarray(tokens) if isinstance(tokens, (list, tuple)) else tokens
    if hasattr(toks, "ndim") and toks.ndim == 1:
        toks = toks[None]
    toks = check_tokens(toks, cfg)
    if toks.shape[0] != 1:
        raise ValueError(f"an attribution graph is for one prompt: tokens [pos] or [1, pos], got "
                         f"shape {tuple(toks.shape)}")
    toks = np.asarray(toks)[0].astype(np.int32)
    if toks.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    bad = (toks < 0) | (toks >= cfg.d_vocab)
    if bad.any():
        raise ValueError(f"token ids must be in [0, {cfg.d_vocab}), got {toks[bad].tolist()}")
    return transcoders, toks


# ----------------------------------------------------------------------------- the clean run
def _frozen_norm(x: Float[Array, "pos d_model"], scale: Float[Array, "pos 1"] | None, p: dict,
                 kind: str | None, affine: bool) -> Float[Array, "pos d_model"]:
    """``tinyinterp.model.normalize`` with the scale held at its value on the prompt: linear."""
    if kind is None:
        return x
    if kind in ("LN", "LNPre"):
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x / scale
    if affine and kind in ("LN", "RMS"):
        x = x * p["w"][None, :]
    if affine and kind == "LN":
        x = x + p["b"][None, :]
    return x


def _final_read_hook(cfg) -> str:
    return "ln_final.hook_normalized" if cfg.normalization_type is not None else "unembed.hook_in"


@functools.partial(jax.jit, static_argnames=("cfg",))
def _clean_run(params, tc: Transcoders, toks, *, cfg) -> dict:
    """Everything the local replacement model holds fixed, from one forward pass: the frozen
    patterns and scales, the transcoders' inputs, pre-activations, activations and errors, the
    logits (one compiled program)."""
    from tinyinterp.model import forward_with_cache

    has_norm = cfg.normalization_type is not None
    n_mlp = tc.n_layers
    names = ["hook_embed", "hook_pos_embed", _final_read_hook(cfg)]
    for layer in range(cfg.n_layers):
        names.append(f"blocks.{layer}.attn.hook_pattern")
        if has_norm:
            names.append(f"blocks.{layer}.ln1.hook_scale")
    for layer in range(n_mlp):
        names += [mlp_input_hook(cfg, layer), f"blocks.{layer}.hook_mlp_out"]
        if has_norm:
            names.append(f"blocks.{layer}.ln2.hook_scale")
    if has_norm:
        names.append("ln_final.hook_scale")
    logits, cache = forward_with_cache(params, cfg, toks[None], frozenset(names))
    c = {n: cache[n][0] for n in names}  # drop the batch axis
    frozen = {"pattern": jnp.stack([c[f"blocks.{i}.attn.hook_pattern"] for i in range(cfg.n_layers)]),
              "ln1": (jnp.stack([c[f"blocks.{i}.ln1.hook_scale"] for i in range(cfg.n_layers)])
                      if has_norm else None),
              "ln2": (jnp.stack([c[f"blocks.{i}.ln2.hook_scale"] for i in range(n_mlp)])
                      if has_norm and n_mlp else None),
              "lnf": c["ln_final.hook_scale"] if has_norm else None}
    xs = [c[mlp_input_hook(cfg, i)] for i in range(n_mlp)]  # each [pos, d_model]
    outs, pres, acts = tc(xs) if n_mlp else ([], [], [])
    n_pos, d = toks.shape[0], cfg.d_model
    errors = (jnp.stack([c[f"blocks.{i}.hook_mlp_out"] - outs[i] for i in range(n_mlp)])
              if n_mlp else jnp.zeros((0, n_pos, d), jnp.float32))
    # the constant terms: the linear model with every node at zero (the transcoders' b_dec only)
    b_dec = (jnp.stack([jnp.broadcast_to(p["b_dec"][None, :], (n_pos, d)) for p in tc.params])
             if n_mlp else errors)
    skips = tuple(p.get("W_skip") for p in tc.params)
    reads0 = [_linear_reads(params, cfg, frozen, skips, upto, jnp.zeros((n_pos, d), jnp.float32),
                            b_dec) for upto in range(n_mlp + 1)]
    return {"frozen": frozen, "xs": xs, "pres": pres, "acts": acts, "errors": errors,
            "logits": logits[0], "tokvec": c["hook_embed"] + c["hook_pos_embed"],
            "reads0": reads0}


# ----------------------------------------------------------------------------- the linear model
def _linear_reads(params, cfg, frozen: dict, skips: tuple, upto: int,
                  embed_write: Float[Array, "pos d_model"],
                  mlp_writes: Float[Array, "layer pos d_model"]) -> Float[Array, "pos d_model"]:
    """The local replacement model, linear in what is written into the residual stream (the
    token embeddings ``embed_write`` and each layer's MLP output ``mlp_writes``): the read of
    layer ``upto`` (the transcoder's input of that layer; ``upto == n_mlp``: the final norm's
    output before its affine), with the patterns and norm scales frozen."""
    kind = cfg.normalization_type
    n_mlp = mlp_writes.shape[0]
    resid = embed_write
    for layer in range(cfg.n_layers):
        blk = params["blocks"][layer]
        a = blk["attn"]
        x = _frozen_norm(resid, None if frozen["ln1"] is None else frozen["ln1"][layer],
                         blk.get("ln1", {}), kind, affine=True)
        v = jnp.einsum("pm,hmd->phd", x, a["W_V"]) + a["b_V"][None]  # [pos, head, d_head]
        z = jnp.einsum("hqk,khd->qhd", frozen["pattern"][layer], v)  # frozen pattern @ v
        resid = resid + jnp.einsum("qhd,hdm->qm", z, a["W_O"]) + a["b_O"][None, :]
        if layer >= n_mlp:
            continue
        xin = _frozen_norm(resid, None if frozen["ln2"] is None else frozen["ln2"][layer], {},
                           kind, affine=False)  # the transcoder's input [pos, d_model]
        if layer == upto:
            return xin
        out = mlp_writes[layer]
        if skips[layer] is not None:
            out = out + xin @ skips[layer]
        resid = resid + out
    return _frozen_norm(resid, frozen["lnf"], {}, kind, affine=False)


@functools.partial(jax.jit, static_argnames=("cfg", "upto", "n_keep"))
def _edge_rows(params, frozen, skips, tokvec, errors, dec, feat_pos, feat_slot, rows_pos, rows_vec,
               *, cfg, upto: int, n_keep: int):
    """Edges into a chunk of target rows of layer ``upto``: one vector-Jacobian product per row,
    batched with vmap. rows_pos [row] (all < n_keep), rows_vec [row, d_model] (the target reads
    ``rows_vec . read[upto][rows_pos]``). dec [pos, slot, layer * d_model]: each active source
    feature's activation x decoder into every MLP layer, by position and slot; feat_pos /
    feat_slot [feature] where each source feature sits in ``dec``. Attention is causal, so only
    the first ``n_keep`` positions can reach these rows: the sequence is cut there. -> (feature
    edges [row, feature], error edges [row, layer * n_keep], token edges [row, n_keep])."""
    P = n_keep
    tokvec, errors, dec = tokvec[:P], errors[:, :P], dec[:P]
    frozen = {"pattern": frozen["pattern"][:, :, :P, :P],
              **{k: None if frozen[k] is None else frozen[k][..., :P, :] for k in ("ln1", "ln2")},
              "lnf": None if frozen["lnf"] is None else frozen["lnf"][:P]}
    d = tokvec.shape[1]
    n_mlp = errors.shape[0]
    _, vjp = jax.vjp(lambda e, m: _linear_reads(params, cfg, frozen, skips, upto, e, m),
                     jnp.zeros_like(tokvec), jnp.zeros((n_mlp, P, d), jnp.float32))

    def one(p, vec):
        return vjp(jnp.zeros((P, d), jnp.float32).at[p].set(vec))

    g_e, g_m = jax.vmap(one)(rows_pos, rows_vec)  # [row, pos, d_model], [row, layer, pos, d_model]
    tok = jnp.einsum("rpd,pd->rp", g_e, tokvec)
    n_row = rows_pos.shape[0]
    err = jnp.einsum("rlpd,lpd->rlp", g_m, errors).reshape(n_row, n_mlp * P)
    # [row, layer, pos, d] -> [row, pos, layer * d]: contract each position's block with dec
    gm = jnp.transpose(g_m, (0, 2, 1, 3)).reshape(n_row, P, n_mlp * d)
    fe = jnp.einsum("rpk,pnk->rpn", gm, dec)  # [row, pos, slot]
    return fe[:, feat_pos, feat_slot], err, tok


def _bucket(n: int, step: int = 32) -> int:
    return max(step, -(-n // step) * step)


def _decoder_blocks(tc: Transcoders, host: list, feats: np.ndarray, acts: np.ndarray, n_pos: int,
                    d: int):
    """(dec [pos, slot, layer * d_model], slot [feature]) for source features ``feats`` [n, 3]
    (sorted by layer, pos, feature) with activations ``acts`` [n]."""
    n_mlp = tc.n_layers
    order = np.lexsort((np.arange(len(feats)), feats[:, 1]))  # stable by position
    slot = np.zeros(len(feats), np.int64)
    if len(feats):
        sorted_pos = feats[order, 1]
        starts = np.searchsorted(sorted_pos, sorted_pos, side="left")
        slot[order] = np.arange(len(feats)) - starts
    n_slot = _bucket(int(slot.max()) + 1 if len(feats) else 1)
    dec = np.zeros((n_pos, n_slot, n_mlp * d), np.float32)
    for layer in range(n_mlp):
        sel = np.nonzero(feats[:, 0] == layer)[0]
        if not sel.size:
            continue
        W = host[layer]["W_dec"][feats[sel, 2]]  # [n, n_targets, d_model]
        W = W * acts[sel][:, None, None]
        for j, t in enumerate(tc.targets(layer)):
            dec[feats[sel, 1], slot[sel], t * d:(t + 1) * d] = W[:, j, :]
    return dec, slot


def _salient_logits(logits: np.ndarray, max_n_logits: int, desired_logit_prob: float):
    """circuit-tracer's ``compute_salient_logits``: the most probable tokens until their total
    probability reaches ``desired_logit_prob``, at most ``max_n_logits``."""
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max())
    probs = (probs / probs.sum()).astype(np.float32)
    top = np.argsort(-probs, kind="stable")[:max_n_logits]
    cut = int(np.searchsorted(np.cumsum(probs[top]), desired_logit_prob)) + 1
    top = top[:cut]
    return top.astype(np.int64), probs[top]


def attribution_graph(model, transcoders: Transcoders | None, tokens, *, max_n_logits: int = 10,
                      desired_logit_prob: float = 0.95, batch_size: int = 256) -> AttributionGraph:
    """The attribution graph of a prompt ``tokens`` [pos] (or [1, pos]) through the local
    replacement model of ``model`` with ``transcoders`` (one per MLP layer; None for an
    attention-only model). Edge rows are computed ``batch_size`` target rows at a time by batched
    vector-Jacobian products. See the module docstring for the nodes, edges and exactness."""
    if not isinstance(max_n_logits, int) or max_n_logits < 1:
        raise ValueError(f"max_n_logits must be an int >= 1, got {max_n_logits!r}")
    if not 0.0 < desired_logit_prob <= 1.0:
        raise ValueError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    tc, toks = _check_inputs(model, transcoders, tokens)
    cfg, params = model.cfg, model.params
    run = _clean_run(params, tc, jnp.asarray(toks), cfg=cfg)
    n_pos, d, n_mlp = toks.shape[0], cfg.d_model, tc.n_layers
    host = [{k: np.asarray(v) for k, v in p.items()} for p in tc.params]  # numpy copies

    # active features, sorted by (layer, pos, feature)
    feats, acts, pres = [np.zeros((0, 3), np.int64)], [np.zeros(0, np.float32)], \
        [np.zeros(0, np.float32)]
    for layer in range(n_mlp):
        a = np.asarray(run["acts"][layer])  # [pos, feature]
        pos, f = np.nonzero(a > 0)
        feats.append(np.stack([np.full_like(pos, layer), pos, f], axis=1))
        acts.append(a[pos, f])
        pres.append(np.asarray(run["pres"][layer])[pos, f])
    feats = np.concatenate(feats).astype(np.int64)
    acts = np.concatenate(acts).astype(np.float32)
    pres = np.concatenate(pres).astype(np.float32)
    n_feat = len(feats)

    logits_last = np.asarray(run["logits"][-1], np.float32)
    logit_ids, logit_p = _salient_logits(logits_last, max_n_logits, desired_logit_prob)
    W_U, b_U = np.asarray(params["unembed"]["W_U"]), np.asarray(params["unembed"]["b_U"])
    W_dm = W_U - W_U.mean(axis=1, keepdims=True)  # demeaned unembedding [d_model, vocab]
    b_dm = b_U - b_U.mean()
    lnf = params.get("ln_final", {})
    w_f = np.asarray(lnf["w"]) if cfg.normalization_type in ("LN", "RMS") else np.ones(d, np.float32)
    b_f = np.asarray(lnf["b"]) if cfg.normalization_type == "LN" else np.zeros(d, np.float32)
    logit_vec = (w_f[:, None] * W_dm[:, logit_ids]).T  # [logit, d_model]
    logit_b = b_f @ W_dm[:, logit_ids] + b_dm[logit_ids]  # [logit]
    logit_val = logits_last[logit_ids] - logits_last.mean()

    n_err = n_mlp * n_pos
    n_nodes = n_feat + n_err + n_pos + len(logit_ids)
    tok_start, logit_start = n_feat + n_err, n_feat + n_err + n_pos
    skips = tuple(p.get("W_skip") for p in tc.params)
    frozen = run["frozen"]

    # target rows, grouped by the layer they read: (layer, nodes, positions, vectors, biases)
    groups = []
    for layer in range(n_mlp):
        sel = np.nonzero(feats[:, 0] == layer)[0]
        if sel.size:
            groups.append((layer, sel, feats[sel, 1], host[layer]["W_enc"][:, feats[sel, 2]].T,
                           host[layer]["b_enc"][feats[sel, 2]]))
    groups.append((n_mlp, logit_start + np.arange(len(logit_ids)),
                   np.full(len(logit_ids), n_pos - 1), logit_vec, logit_b))

    constant = np.zeros(n_nodes, np.float32)
    values = np.zeros(n_nodes, np.float32)
    values[:n_feat] = pres
    values[logit_start:] = logit_val
    counts = np.zeros(n_nodes, np.int64)  # stored edges per row
    indices, data = [], []  # per chunk, in row order
    for upto, row_nodes, rpos, rvec, rb in groups:
        reads0 = np.asarray(run["reads0"][upto])  # [pos, d_model]
        rvec = np.ascontiguousarray(rvec, np.float32)
        constant[row_nodes] = np.sum(rvec * reads0[rpos], axis=-1) + rb
        src = np.nonzero(feats[:, 0] < upto)[0]  # only earlier layers write into this read
        dec, slot = _decoder_blocks(tc, host, feats[src], acts[src], n_pos, d)
        dec = jnp.asarray(dec)
        for s in range(0, len(row_nodes), batch_size):
            n = min(batch_size, len(row_nodes) - s)
            keep = min(n_pos, _bucket(int(rpos[s:s + n].max()) + 1, 16))  # causal cut
            src_k = np.nonzero(feats[src, 1] < keep)[0]  # sources at positions before the cut
            p_chunk = np.zeros(batch_size, np.int32)
            p_chunk[:n] = rpos[s:s + n]
            v_chunk = np.zeros((batch_size, d), np.float32)
            v_chunk[:n] = rvec[s:s + n]
            n_src = len(src_k)  # padded to a bucket: fewer shapes to compile
            f_pos = np.zeros(_bucket(n_src, 64), np.int32)
            f_slot = np.zeros_like(f_pos)
            f_pos[:n_src], f_slot[:n_src] = feats[src[src_k], 1], slot[src_k]
            fe, err, tok = _edge_rows(params, frozen, skips, run["tokvec"], run["errors"], dec,
                                      f_pos, f_slot, p_chunk, v_chunk, cfg=cfg, upto=upto,
                                      n_keep=keep)
            # [row, sources | errors | tokens] -> the nonzero entries, CSR order
            block = np.concatenate([np.asarray(fe)[:n, :n_src], np.asarray(err)[:n],
                                    np.asarray(tok)[:n]], axis=1)
            cols = np.concatenate([src[src_k], n_feat + (np.arange(n_mlp)[:, None] * n_pos
                                                         + np.arange(keep)[None, :]).ravel(),
                                   tok_start + np.arange(keep)]).astype(np.int32)
            nz = block != 0
            counts[row_nodes[s:s + n]] = np.count_nonzero(nz, axis=1)
            flat = np.flatnonzero(nz)
            indices.append(cols[flat % block.shape[1]])
            data.append(block.ravel()[flat])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    adjacency = sp.csr_matrix((np.concatenate(data) if data else np.zeros(0, np.float32),
                               np.concatenate(indices) if indices else np.zeros(0, np.int32),
                               indptr), shape=(n_nodes, n_nodes))
    error_norms = np.linalg.norm(np.asarray(run["errors"]), axis=-1)  # [layer, pos]
    settings = {"max_n_logits": max_n_logits, "desired_logit_prob": desired_logit_prob,
                "batch_size": batch_size, "architecture": tc.architecture,
                "cross_layer": tc.cross_layer, "skip": tc.skip, "model_n_layers": cfg.n_layers}
    return AttributionGraph(adjacency, constant, values, toks, feats, acts, logit_ids, logit_p,
                            n_mlp, error_norms, settings)


# ----------------------------------------------------------------------------- pruning, scores
def _as_csr(adjacency) -> sp.csr_matrix:
    if sp.issparse(adjacency):
        return sp.csr_matrix(adjacency, dtype=np.float32)
    a = np.asarray(adjacency, np.float32)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"an adjacency must be square [node, node], got shape {a.shape}")
    return sp.csr_matrix(a)


def _normalize(A: sp.csr_matrix) -> sp.csr_matrix:
    """|A| with every row scaled to sum 1 (rows of zeros stay zero); one copy of A's data."""
    data = np.abs(A.data, dtype=np.float32)
    counts = np.diff(A.indptr)
    sums = np.add.reduceat(data, A.indptr[:-1][counts > 0]) if data.size else data
    scale = np.zeros(A.shape[0], np.float32)
    scale[counts > 0] = 1.0 / np.maximum(sums, np.float32(1e-10))
    data *= np.repeat(scale, counts)
    return sp.csr_matrix((data, A.indices, A.indptr), shape=A.shape)


def _influence(An: sp.csr_matrix, w: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """w A + w A^2 + ... = w ((I - A)^-1 - I), summed until the product is zero (a DAG)."""
    At = An.T  # a CSC view: no copy
    cur = At @ w
    total = cur.copy()
    for _ in range(max_iter):
        if not cur.any():
            return total
        cur = At @ cur
        total += cur
    raise RuntimeError(f"influence did not converge in {max_iter} steps: the graph has a cycle")


def node_influence(graph: AttributionGraph, adjacency=None) -> np.ndarray:
    """[node]: each node's influence on the logits, w ((I - A)^-1 - I) (A row-normalised |adjacency|)."""
    A = graph.adjacency if adjacency is None else _as_csr(adjacency)
    return _influence(_normalize(A), graph.logit_weights())


def _threshold(scores: np.ndarray, fraction: float) -> float:
    """circuit-tracer's ``find_threshold``: the score at which the largest scores, summed in
    decreasing order, first reach ``fraction`` of the total. Exact; for many scores it sorts only
    the scores in the bin (by float32 exponent and 7 mantissa bits) where the sum crosses."""
    s = np.ascontiguousarray(scores, np.float32).ravel()
    if s.size == 0:
        return math.inf
    total = float(s.sum(dtype=np.float64))
    if s.size <= 1 << 16 or total <= 0:
        srt = -np.sort(-s)
        cum = np.cumsum(srt, dtype=np.float64) / (total if total > 0 else 1.0)
        return float(srt[min(int(np.searchsorted(cum, fraction)), s.size - 1)])
    bins = s.view(np.uint32) >> 16  # monotone in the value for s >= 0
    mass = np.bincount(bins, weights=s, minlength=1 << 16)[::-1]  # from the largest bin down
    cum = np.cumsum(mass) / total
    j = min(int(np.searchsorted(cum, fraction)), int(np.nonzero(mass)[0][-1]))
    b = (1 << 16) - 1 - j
    above = cum[j - 1] * total if j else 0.0
    cand = -np.sort(-s[bins == b])
    cum_c = (above + np.cumsum(cand, dtype=np.float64)) / total
    return float(cand[min(int(np.searchsorted(cum_c, fraction)), cand.size - 1)])


@dataclass(frozen=True, eq=False)
class PruneResult:
    """``node_mask`` [node]; ``edge_mask`` [nnz] over ``graph.adjacency``'s stored entries (CSR
    order); ``cumulative_scores`` [node] (a node's rank as the cumulative share of influence);
    ``influence`` [node]."""

    graph: AttributionGraph
    node_mask: np.ndarray
    edge_mask: np.ndarray
    cumulative_scores: np.ndarray
    influence: np.ndarray
    node_threshold: float
    edge_threshold: float

    @property
    def adjacency(self) -> sp.csr_matrix:
        """The pruned adjacency [node, node] (the kept edges' weights)."""
        A = self.graph.adjacency
        return sp.csr_matrix((np.where(self.edge_mask, A.data, np.float32(0)), A.indices,
                              A.indptr), shape=A.shape)

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(targets, sources, weights) of the kept edges."""
        A = self.graph.adjacency
        rows = np.repeat(np.arange(A.shape[0]), np.diff(A.indptr))
        return rows[self.edge_mask], A.indices[self.edge_mask], A.data[self.edge_mask]

    @property
    def nodes(self) -> np.ndarray:
        return np.nonzero(self.node_mask)[0]


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def prune_graph(graph: AttributionGraph, node_threshold: float = 0.8,
                edge_threshold: float = 0.98) -> PruneResult:
    """circuit-tracer's ``prune_graph``: keep the nodes holding ``node_threshold`` of the
    influence on the logits (tokens and logits always), then the edges holding ``edge_threshold``
    of the edge influence in the graph of those nodes; then drop, until nothing changes, feature
    and error nodes left without a kept outgoing edge and feature nodes without a kept incoming
    edge (and those nodes' edges)."""
    node_threshold = _check_fraction(node_threshold, "node_threshold")
    edge_threshold = _check_fraction(edge_threshold, "edge_threshold")
    A = graph.adjacency
    n = A.shape[0]
    w = graph.logit_weights()
    infl = _influence(_normalize(A), w)
    node_mask = infl >= _threshold(infl, node_threshold)
    node_mask[graph.token_start:] = True
    rows = np.repeat(np.arange(n, dtype=np.int32), np.diff(A.indptr))
    cols = A.indices
    inside = node_mask[rows] & node_mask[cols]
    P = sp.csr_matrix((np.where(inside, A.data, np.float32(0)), cols, A.indptr), shape=A.shape)
    Pn = _normalize(P)
    out_infl = _influence(Pn, w) + w
    scores = Pn.data * out_infl[rows]  # edge influence, over A's stored entries
    edge_mask = inside & (scores >= _threshold(scores[inside], edge_threshold))
    n_feat, tok_start = graph.n_features, graph.token_start
    while True:
        old = node_mask.copy()
        has_out = np.bincount(cols[edge_mask], minlength=n) > 0
        has_in = np.bincount(rows[edge_mask], minlength=n) > 0
        node_mask[:tok_start] &= has_out[:tok_start]
        node_mask[:n_feat] &= has_in[:n_feat]
        edge_mask &= node_mask[rows] & node_mask[cols]
        if np.array_equal(old, node_mask):
            break
    order = np.argsort(-infl, kind="stable")
    total = infl.sum(dtype=np.float64)
    cumulative = np.zeros(n, np.float32)
    cumulative[order] = np.cumsum(infl[order], dtype=np.float64) / (total if total > 0 else 1.0)
    return PruneResult(graph, node_mask, edge_mask, cumulative, infl, node_threshold,
                       edge_threshold)


@dataclass(frozen=True)
class GraphScores:
    """``replacement``: the share of the end-to-end influence of the tokens versus the error
    nodes (1: every path from the logits back ends at a token, not an error). ``completeness``:
    the influence-weighted share of each node's normalised inputs that comes from non-error nodes."""

    replacement: float
    completeness: float


def graph_scores(graph: AttributionGraph, pruned: PruneResult | None = None) -> GraphScores:
    """circuit-tracer's ``compute_graph_scores`` on the graph (or on its pruned adjacency)."""
    A = graph.adjacency if pruned is None else pruned.adjacency
    An = _normalize(A)
    w = graph.logit_weights()
    infl = _influence(An, w)
    tok = float(infl[graph.token_start:graph.logit_start].sum(dtype=np.float64))
    err = float(infl[graph.error_start:graph.token_start].sum(dtype=np.float64))
    replacement = tok / (tok + err) if tok + err > 0 else float("nan")
    err_cols = np.zeros(graph.n_nodes, np.float32)
    err_cols[graph.error_start:graph.token_start] = 1.0
    non_error = 1.0 - An @ err_cols  # [node]
    out = infl + w
    completeness = float((non_error * out).sum(dtype=np.float64) / out.sum(dtype=np.float64))
    return GraphScores(replacement, completeness)


# ----------------------------------------------------------------------------- interventions
@dataclass(frozen=True)
class FeatureIntervention:
    """Set feature ``feature`` of source layer ``layer`` at ``pos`` to ``value``, or to ``scale``
    times its activation on the prompt (give exactly one; a negative scale flips its sign)."""

    layer: int
    pos: int
    feature: int
    value: float | None = None
    scale: float | None = None


@dataclass(frozen=True, eq=False)
class InterventionResult:
    """``logits`` / ``clean_logits`` [pos, vocab]; per layer [pos, feature]: ``activations`` (the
    activations the transcoders wrote with: held values at constrained layers, the run's own
    elsewhere, interventions applied), ``pre_activations`` (the encoders' pre-activations on the
    intervened run), ``clean_activations``, ``clean_pre_activations``; ``changed``: the features
    whose activation moved, [(layer, pos, feature, old, new)] by decreasing |new - old|."""

    logits: np.ndarray
    clean_logits: np.ndarray
    activations: list
    pre_activations: list
    clean_activations: list
    clean_pre_activations: list
    changed: list
    settings: dict

    def logit_change(self, token: int, pos: int = -1, demean: bool = True) -> float:
        """The change of ``token``'s logit at ``pos`` (minus the mean logit's change if
        ``demean``, as the graph's logit nodes)."""
        new, old = self.logits[pos].astype(np.float64), self.clean_logits[pos].astype(np.float64)
        delta = new[token] - old[token]
        return float(delta - (new.mean() - old.mean()) if demean else delta)


def _check_interventions(interventions, tc: Transcoders, n_pos: int) -> list[FeatureIntervention]:
    if isinstance(interventions, FeatureIntervention):
        interventions = [interventions]
    out = []
    for iv in interventions:
        if not isinstance(iv, FeatureIntervention):
            iv = FeatureIntervention(*iv) if isinstance(iv, (tuple, list)) else iv
        if not isinstance(iv, FeatureIntervention):
            raise TypeError(f"an intervention is a FeatureIntervention(layer, pos, feature, "
                            f"value=... | scale=...), got {iv!r}")
        if (iv.value is None) == (iv.scale is None):
            raise ValueError(f"{iv}: give exactly one of value= (set the activation) or scale= "
                             "(multiply its value on the prompt)")
        amount = iv.value if iv.value is not None else iv.scale
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or \
                not math.isfinite(amount):
            raise ValueError(f"{iv}: value / scale must be a finite number, got {amount!r}")
        if not (isinstance(iv.layer, int) and 0 <= iv.layer < tc.n_layers):
            raise ValueError(f"{iv}: unknown layer {iv.layer!r}; the transcoders have layers "
                             f"0..{tc.n_layers - 1}" if tc.n_layers else
                             f"{iv}: there are no transcoder features (attention-only model)")
        pos = iv.pos + n_pos if isinstance(iv.pos, int) and iv.pos < 0 else iv.pos
        if not (isinstance(pos, int) and 0 <= pos < n_pos):
            raise ValueError(f"{iv}: pos {iv.pos!r} is outside the prompt (length {n_pos})")
        n_f = tc.n_features(iv.layer)
        if not (isinstance(iv.feature, (int, np.integer)) and 0 <= iv.feature < n_f):
            raise ValueError(f"{iv}: unknown feature {iv.feature!r}; layer {iv.layer}'s transcoder "
                             f"has features 0..{n_f - 1}")
        out.append(FeatureIntervention(iv.layer, pos, int(iv.feature), iv.value, iv.scale))
    return out


def intervene(model, transcoders: Transcoders, tokens, interventions, *,
              constrained_layers: tuple[int, int] | range | None = None,
              freeze_attention: bool | None = None) -> InterventionResult:
    """Run the prompt with features set or scaled (``FeatureIntervention``s, or (layer, pos,
    feature, value) tuples).

    ``constrained_layers`` (start, stop): in those layers the MLP output is the transcoder's,
    from activations held at their values on the prompt (except those set here), plus the held
    error node; elsewhere the real MLP runs and the intervened features' decoders add their
    change (unconstrained: None). ``freeze_attention`` (default: True when constrained) holds the
    attention patterns and every norm's scale at their values on the prompt. With every layer
    constrained and attention frozen this is the local replacement model itself: scaling a
    source feature by 2 moves each target's pre-activation (and demeaned logit) by the graph's
    edge weight."""
    tc, toks = _check_inputs(model, transcoders, tokens)
    cfg = model.cfg
    n_pos, n_mlp = toks.shape[0], tc.n_layers
    ivs = _check_interventions(interventions, tc, n_pos)
    if constrained_layers is None:
        lo = hi = 0
    else:
        r = constrained_layers
        lo, hi = (r.start, r.stop) if isinstance(r, range) else tuple(r)
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= n_mlp):
            raise ValueError(f"constrained_layers must be (start, stop) with 0 <= start <= stop <= "
                             f"{n_mlp}, got {constrained_layers!r}")
    freeze = (constrained_layers is not None) if freeze_attention is None else bool(freeze_attention)
    clean = _clean_run(model.params, tc, jnp.asarray(toks), cfg=cfg)
    # per layer: (mask [pos, feature], value to set, scale to apply) of the interventions
    edits = []
    for layer in range(n_mlp):
        n_f = tc.n_features(layer)
        mask, setv, mult = np.zeros((n_pos, n_f), bool), np.zeros((n_pos, n_f), np.float32), \
            np.ones((n_pos, n_f), np.float32)
        for iv in ivs:
            if iv.layer == layer:
                mask[iv.pos, iv.feature] = True
                if iv.value is not None:
                    setv[iv.pos, iv.feature], mult[iv.pos, iv.feature] = iv.value, 0.0
                else:
                    mult[iv.pos, iv.feature] = iv.scale
        edits.append((mask, setv, mult))
    logits, used, pres = _intervened_run(model.params, tc, jnp.asarray(toks), clean,
                                         [tuple(jnp.asarray(e) for e in ed) for ed in edits],
                                         cfg=cfg, lo=lo, hi=hi, freeze=freeze)
    acts_new = [np.asarray(a) for a in used]
    acts_old = [np.asarray(a) for a in clean["acts"]]
    changed = []
    for layer, (old, new) in enumerate(zip(acts_old, acts_new, strict=True)):
        tol = 1e-6 * max(1.0, float(np.abs(old).max(initial=0.0)))
        for p, f in zip(*np.nonzero(np.abs(new - old) > tol), strict=True):
            changed.append((layer, int(p), int(f), float(old[p, f]), float(new[p, f])))
    changed.sort(key=lambda c: -abs(c[4] - c[3]))
    return InterventionResult(np.asarray(logits), np.asarray(clean["logits"]), acts_new,
                              [np.asarray(p) for p in pres], acts_old,
                              [np.asarray(p) for p in clean["pres"]], changed,
                              {"constrained_layers": (lo, hi) if constrained_layers is not None
                               else None, "freeze_attention": freeze,
                               "interventions": [asdict(iv) for iv in ivs]})


@functools.partial(jax.jit, static_argnames=("cfg", "lo", "hi", "freeze"))
def _intervened_run(params, tc: Transcoders, toks, clean, edits, *, cfg, lo: int, hi: int,
                    freeze: bool):
    """The forward pass of ``intervene`` (one compiled program per model, shapes and mode)."""
    from tinyinterp.model import forward

    n_mlp = tc.n_layers
    frozen = clean["frozen"]
    has_norm = cfg.normalization_type is not None
    state: dict = {"x": {}, "pre": {}, "base": {}, "used": {}}

    def const(value):
        return lambda v, *, name: jnp.broadcast_to(value[None], v.shape)

    def read(v, *, name):
        layer = int(name.split(".")[1])
        x = v[0]  # [pos, d_model]
        pre, natural = tc.encode(layer, x)
        base = clean["acts"][layer] if lo <= layer < hi else natural
        mask, setv, mult = edits[layer]
        # value: set (mult 0); scale: x its value on the prompt
        edited = jnp.where(mult == 0.0, setv, clean["acts"][layer] * mult)
        state["x"][layer], state["pre"][layer], state["base"][layer] = x, pre, base
        state["used"][layer] = jnp.where(mask, edited, base)
        return v

    def write(v, *, name):
        t = int(name.split(".")[1])
        if lo <= t < hi:  # the transcoder's output from held activations + the held error
            out = tc.decode_layer(t, state["used"], state["x"][t]) + clean["errors"][t]
        else:  # the real MLP + the change the intervened features' decoders make
            out = v[0]
            for s in range(t + 1):
                if t in tc.targets(s):
                    out = out + (state["used"][s] - state["base"][s]) @ \
                        tc.params[s]["W_dec"][:, t - s, :]
        return out[None]

    hooks = []
    if freeze:
        for layer in range(cfg.n_layers):
            hooks.append((f"blocks.{layer}.attn.hook_pattern", const(frozen["pattern"][layer])))
            if has_norm:
                hooks.append((f"blocks.{layer}.ln1.hook_scale", const(frozen["ln1"][layer])))
        for layer in range(n_mlp):
            if has_norm:
                hooks.append((f"blocks.{layer}.ln2.hook_scale", const(frozen["ln2"][layer])))
        if has_norm:
            hooks.append(("ln_final.hook_scale", const(frozen["lnf"])))
    hooks += [(mlp_input_hook(cfg, i), read) for i in range(n_mlp)]
    hooks += [(f"blocks.{i}.hook_mlp_out", write) for i in range(n_mlp)]
    logits = forward(params, cfg, toks[None], fwd_hooks=hooks, backend="xla")[0]
    return logits, [state["used"][i] for i in range(n_mlp)], [state["pre"][i] for i in range(n_mlp)]


# ----------------------------------------------------------------------------- frontend JSON
def _token_text(t: int, token_labels) -> str:
    return str(token_labels[t]) if token_labels is not None else str(t)


def graph_json(pruned: PruneResult, *, slug: str = "graph", scan: str = "tinyinterp",
               token_labels: Sequence[str] | None = None, prompt: str | None = None,
               num_features: int | None = None) -> dict:
    """The pruned graph in the schema of the public attribution-graph frontend (circuit-tracer's
    ``create_graph_files``): ``metadata`` (slug, scan, transcoder_list, prompt_tokens, prompt,
    node_threshold), ``qParams``, ``nodes`` and ``links`` (source, target, weight), with its
    node ids: feature ``{layer}_{feature}_{pos}``, error ``0_{layer}_{pos}``, token
    ``E_{token}_{pos}``, logit ``{n_layers + 1}_{token}_{pos}``; ``influence`` is the node's
    cumulative influence score. ``num_features``: the transcoder width, to number features
    ``feature + 10^ceil(log10(num_features)) * layer`` as the frontend does for a whole scan."""
    g = pruned.graph
    n_model_layers = int(g.settings.get("model_n_layers", g.n_layers))
    offset = 10 ** math.ceil(math.log10(num_features)) if num_features else 0
    cum = pruned.cumulative_scores
    nodes: dict[int, dict] = {}

    def node(i, node_id, feature, layer, pos, ftype, js, **extra):
        nodes[i] = {"node_id": node_id, "feature": int(feature), "layer": str(layer),
                    "ctx_idx": int(pos), "feature_type": ftype, "token_prob": 0.0,
                    "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                    "jsNodeId": js, "clerp": "", "influence": float(cum[i]),
                    "activation": None, **extra}

    for i in np.nonzero(pruned.node_mask)[0].tolist():
        kind = g.kind(i)
        if kind == "feature":
            layer, pos, f = (int(v) for v in g.active_features[i])
            node(i, f"{layer}_{f}_{pos}", f + offset * layer, layer, pos, "cross layer transcoder",
                 f"{layer}_{f}-0", activation=float(g.activations[i]))
        elif kind == "error":
            layer, pos = divmod(i - g.error_start, g.n_pos)
            node(i, f"0_{layer}_{pos}", -1, layer, pos, "mlp reconstruction error",
                 f"{layer}_{pos}-0")
        elif kind == "token":
            pos = i - g.token_start
            t = int(g.tokens[pos])
            node(i, f"E_{t}_{pos}", pos, "E", pos, "embedding", f"E_{t}-{pos}")
        else:
            j = i - g.logit_start
            t, p = int(g.logit_tokens[j]), float(g.logit_probabilities[j])
            node(i, f"{n_model_layers + 1}_{t}_{g.n_pos - 1}", t, n_model_layers + 1, g.n_pos - 1,
                 "logit", f"L_{t}-{g.n_pos - 1}", token_prob=p, is_target_logit=j == 0,
                 clerp=f'Output "{_token_text(t, token_labels)}" (p={p:.3f})')
            nodes[i]["influence"] = None
    tgt, src, wt = pruned.edges()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(w)}
             for t, s, w in zip(tgt.tolist(), src.tolist(), wt.tolist(), strict=True)
             if s in nodes and t in nodes]
    connected = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values()
            if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    prompt_tokens = [_token_text(int(t), token_labels) for t in g.tokens]
    return {"metadata": {"slug": slug, "scan": scan, "transcoder_list": [],
                         "prompt_tokens": prompt_tokens,
                         "prompt": prompt if prompt is not None else " ".join(prompt_tokens),
                         "node_threshold": pruned.node_threshold},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                        "sg_pos": ""},
            "nodes": used, "links": links}


def save_graph_json(path, pruned: PruneResult, **kwargs) -> None:
    """``graph_json`` written atomically to ``path`` (never half-written)."""
    import json

    from tinyinterp.reproduce._io import write_atomic

    write_atomic(path, json.dumps(graph_json(pruned, **kwargs), allow_nan=False))


def feature_examples(model, transcoders: Transcoders, tokens, features, *, n_examples: int = 5,
                     context: int = 6, batch_size: int = 64) -> dict:
    """Top-activating examples of transcoder features over ``tokens`` [n_seq, pos]: {"{layer}_
    {feature}": [{"tokens": [ids], "acts": [...], "max": float, "seq": int, "pos": int}]}, the
    ``n_examples`` sequences with the largest activation, each a window of ``context`` tokens
    either side of its maximum."""
    cfg = model.cfg
    tokens = np.asarray(tokens)
    features = sorted({(int(layer), int(f)) for layer, f in features})
    for layer, f in features:
        if not 0 <= layer < transcoders.n_layers or not 0 <= f < transcoders.n_features(layer):
            raise ValueError(f"unknown feature {f} of layer {layer}")
    names = [mlp_input_hook(cfg, layer) for layer in range(transcoders.n_layers)]
    acts = {k: [] for k in features}
    for s in range(0, tokens.shape[0], batch_size):
        _, cache = model.run_with_cache(tokens[s:s + batch_size], names_filter=names)
        for layer, f in features:
            x = cache[names[layer]]  # [batch, pos, d_model]
            a = transcoders.encode(layer, x.reshape(-1, x.shape[-1]))[1][:, f]
            acts[(layer, f)].append(np.asarray(a).reshape(x.shape[:2]))
    out = {}
    for (layer, f), parts in acts.items():
        a = np.concatenate(parts)  # [n_seq, pos]
        best = a.max(axis=1)
        rows = [int(r) for r in np.argsort(-best, kind="stable")[:n_examples] if best[r] > 0]
        ex = []
        for r in rows:
            p = int(np.argmax(a[r]))
            lo, hi = max(0, p - context), min(a.shape[1], p + context + 1)
            ex.append({"tokens": tokens[r, lo:hi].tolist(), "acts": a[r, lo:hi].tolist(),
                       "max": float(best[r]), "seq": r, "pos": p})
        out[f"{layer}_{f}"] = ex
    return out
