"""Models with planted circuits: hand-set weights whose computation is known, with the ground truth.

    from tinyinterp.planted import planted_model, linear_model, superposition_model
    pm = planted_model(["induction"], d_vocab=8, n_ctx=12, n_layers=3, n_heads=3, seed=0)
    pm.model                        # a HookedTransformer (no norm, attention-only by default)
    pm.ground_truth.heads           # PlantedHead(kind, layer, head, reads, writes) for each head
    pm.ground_truth.edges           # (sender, receiver, via): ("L0H2", "L2H1", "k") = K-composition
    pm.expected_patterns(tokens)    # {(layer, head): [batch, query_pos, key_pos]} (numpy reference)
    pm.expected_logits(tokens)      # [batch, pos, d_vocab_out] (numpy reference)

Every planted model has no norm, so the residual stream is a sum of disjoint named subspaces
(``ground_truth.subspaces``): ``tok`` and ``pos`` (one-hot token and position embeddings), one
output subspace per planted head kind (``prev``, ``induction``, ``copying``, ``duplicate``) and
``noise``. Planted heads read and write only their subspaces; their attention scores are separated
by ``SHARPNESS`` (30 after the 1/sqrt(d_head) scale), so a pattern that the ground truth says is
one-hot is one-hot to float32 rounding (the other weights are below exp(-30)). Every other head and
every MLP neuron is a *distractor*: random weights at ``distractor_scale`` reading the whole
residual stream and writing only into ``noise``, which nothing planted and not the unembedding
reads. So the outputs are exactly those of the planted circuit, whatever the distractors do, and
a component's ground-truth importance is known: planted heads matter, distractors have no effect.

Kinds of head (``HEAD_KINDS``):

- ``previous_token``: query position i attends to key i - 1 (position 0 to itself) and writes the
  token it reads into ``prev``: prev[i] = onehot(tok[i - 1]) (prev[0] = onehot(tok[0])).
- ``induction``: reads ``prev`` by K-composition with a previous-token head in an earlier layer
  (planted with it): query i attends uniformly to the keys k in 1..i with tok[k - 1] == tok[i]
  (to all of 1..i if there is none; position 0 to itself) and copies their tokens into
  ``induction``: after [A][B] ... [A] it predicts [B].
- ``copying``: attends uniformly to every position up to the query (zero QK) and copies the
  tokens into ``copying``: the logits are the token counts so far / (i + 1); its OV circuit
  W_E W_V W_O W_U is the identity (copying score 1).
- ``duplicate_token``: query i attends uniformly to the earlier keys k < i with tok[k] == tok[i]
  (to all of 0..i-1 if there is none; position 0 to itself) and writes their token into
  ``duplicate``.

The unembedding reads the output subspace of every planted head except a previous-token head
that feeds an induction head, with gain 1: logits = sum of those subspaces (read as tokens).

Also ``linear_model`` (the output at each position is a known linear function of chosen
coordinates of the input embedding: attributions in closed form) and ``superposition_model`` (an
MLP layer whose neurons hold n_features > d_mlp known features along known directions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from tinyinterp.config import TransformerConfig
from tinyinterp.model import HookedTransformer
from tinyinterp.params import init_params

__all__ = [
    "HEAD_KINDS", "SHARPNESS", "GroundTruth", "PlantedHead", "PlantedModel", "linear_model",
    "planted_model", "superposition_model",
]

HEAD_KINDS = ("previous_token", "induction", "copying", "duplicate_token")
SHARPNESS = 30.0  # score gap between attended and ignored keys, after the 1/sqrt(d_head) scale
_OUT_SPACE = {"previous_token": "prev", "induction": "induction", "copying": "copying",
              "duplicate_token": "duplicate"}


@dataclass(frozen=True)
class PlantedHead:
    """One planted attention head: its ``kind``, where it sits, which residual subspaces its
    query, key and value read (``reads``: (("q", "tok"), ("k", "prev"), ...)) and the subspace
    its output writes (``writes``)."""

    kind: str
    layer: int
    head: int
    reads: tuple[tuple[str, str], ...]
    writes: str

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head}"


@dataclass(frozen=True)
class GroundTruth:
    """What a planted model computes and with which components.

    ``heads``: the planted heads; ``neurons``: planted (layer, neuron) pairs (superposition
    model); ``edges``: (sender, receiver, via) with via in "q", "k", "v" (a head reading
    another's output) or "logits" (a component read by the unembedding); ``subspaces``:
    (name, start, stop) slices of d_model; ``features``: for ``linear_model`` the coordinates
    of the input embedding the output depends on, for ``superposition_model`` the feature
    directions etc. (see each builder)."""

    heads: tuple[PlantedHead, ...]
    n_layers: int
    n_heads: int
    d_mlp: int | None = None
    neurons: tuple[tuple[int, int], ...] = ()
    edges: tuple[tuple[str, str, str], ...] = ()
    subspaces: tuple[tuple[str, int, int], ...] = ()
    info: dict = field(default_factory=dict, compare=False)

    def subspace(self, name: str) -> slice:
        for n, a, b in self.subspaces:
            if n == name:
                return slice(a, b)
        raise KeyError(f"no subspace {name!r}; this model has {[n for n, _, _ in self.subspaces]}")

    def head_mask(self, kinds: Sequence[str] | None = None) -> np.ndarray:
        """bool [n_layers, n_heads]: True at the planted heads (of ``kinds``, default all)."""
        mask = np.zeros((self.n_layers, self.n_heads), bool)
        for h in self.heads:
            if kinds is None or h.kind in kinds:
                mask[h.layer, h.head] = True
        return mask

    def neuron_mask(self) -> np.ndarray:
        """bool [n_layers, d_mlp]: True at the planted neurons."""
        if self.d_mlp is None:
            raise ValueError("this model has no MLPs")
        mask = np.zeros((self.n_layers, self.d_mlp), bool)
        for layer, n in self.neurons:
            mask[layer, n] = True
        return mask

    def heads_of(self, kind: str) -> tuple[PlantedHead, ...]:
        return tuple(h for h in self.heads if h.kind == kind)


@dataclass(frozen=True, eq=False)
class PlantedModel:
    """A model with a planted circuit and its ground truth, plus a numpy reference of what it
    computes (``expected_patterns``, ``expected_logits``) written independently of the model."""

    model: HookedTransformer
    ground_truth: GroundTruth
    _reference: object = field(repr=False)

    @property
    def cfg(self) -> TransformerConfig:
        return self.model.cfg

    def expected_patterns(self, tokens) -> dict[tuple[int, int], np.ndarray]:
        """{(layer, head): [batch, query_pos, key_pos]} for every planted head."""
        return self._reference.patterns(np.asarray(tokens))

    def expected_logits(self, tokens) -> np.ndarray:
        """[batch, pos, d_vocab_out]: the logits the planted circuit computes."""
        return self._reference.logits(np.asarray(tokens))

    def expected_attribution(self, tokens, token: int, pos: int = -1) -> np.ndarray:
        """``linear_model`` only: the exact attribution [batch, pos, d_model] of
        logits[:, pos, token] to the input embedding (hook_embed + hook_pos_embed) from a zero
        baseline (integrated gradients = gradient x input = this, for a linear function)."""
        if not hasattr(self._reference, "attribution"):
            raise TypeError("expected_attribution is known in closed form for linear_model only")
        return self._reference.attribution(np.asarray(tokens), token, pos)


# ----------------------------------------------------------------------------- helpers
def _layout(parts: Sequence[tuple[str, int]]) -> tuple[tuple[str, int, int], ...]:
    out, start = [], 0
    for name, size in parts:
        out.append((name, start, start + size))
        start += size
    return tuple(out)


def _sizes(n_heads: int, need_d_model: int, need_d_head: int) -> tuple[int, int]:
    """(d_model, d_head) with d_model = n_heads * d_head >= need_d_model, d_head >= need_d_head."""
    d_head = max(need_d_head, -(-need_d_model // n_heads))
    return n_heads * d_head, d_head


def _uniform_rows(mask: np.ndarray) -> np.ndarray:
    """mask [..., q, k] bool -> each row's uniform distribution over its True entries."""
    m = mask.astype(np.float64)
    return m / m.sum(-1, keepdims=True)


class _Distractors:
    """Fills every non-planted head and MLP neuron with random weights (``scale``) that read the
    whole residual stream and write only into the ``noise`` subspace."""

    def __init__(self, rng: np.random.Generator, scale: float, noise: slice):
        self.rng, self.scale, self.noise = rng, float(scale), noise

    def head(self, attn: dict, h: int) -> None:
        r, s = self.rng, self.scale
        for w in ("W_Q", "W_K", "W_V"):
            attn[w][h] = s * r.standard_normal(attn[w][h].shape)
        for b in ("b_Q", "b_K", "b_V"):
            attn[b][h] = s * r.standard_normal(attn[b][h].shape)
        attn["W_O"][h] = 0.0
        attn["W_O"][h][:, self.noise] = s * r.standard_normal(attn["W_O"][h][:, self.noise].shape)

    def mlp(self, mlp: dict, neurons=None) -> None:
        r, s = self.rng, self.scale
        idx = np.arange(mlp["W_in"].shape[1]) if neurons is None else np.asarray(neurons)
        mlp["W_in"][:, idx] = s * r.standard_normal((mlp["W_in"].shape[0], len(idx)))
        mlp["b_in"][idx] = s * r.standard_normal(len(idx))
        mlp["W_out"][idx] = 0.0
        mlp["W_out"][np.ix_(idx, np.arange(self.noise.start, self.noise.stop))] = (
            s * r.standard_normal((len(idx), self.noise.stop - self.noise.start)))
        mlp["b_out"][self.noise] = s * r.standard_normal(self.noise.stop - self.noise.start)


def _zero_params(cfg: TransformerConfig) -> dict:
    """init_params' structure with every leaf a float64 numpy zero array (filled by hand)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float64), shapes)


def _to_model(cfg: TransformerConfig, params: dict) -> HookedTransformer:
    return HookedTransformer(cfg, jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32),
                                                         params))


def _check_sizes(d_vocab, n_ctx, n_layers, n_heads, distractor_scale):
    for name, v, lo in (("d_vocab", d_vocab, 2), ("n_ctx", n_ctx, 2), ("n_layers", n_layers, 1),
                        ("n_heads", n_heads, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not (isinstance(distractor_scale, (int, float)) and math.isfinite(distractor_scale)
            and distractor_scale >= 0):
        raise ValueError(f"distractor_scale must be a finite float >= 0, got {distractor_scale!r}")


# ----------------------------------------------------------------------------- planted heads
class _HeadsReference:
    """The numpy reference for ``planted_model``: patterns and logits from the tokens alone."""

    def __init__(self, heads: tuple[PlantedHead, ...], readout: tuple[str, ...], d_vocab: int):
        self.heads, self.readout, self.d_vocab = heads, readout, d_vocab

    def _pattern(self, kind: str, toks: np.ndarray) -> np.ndarray:
        b, n = toks.shape
        q = np.arange(n)[:, None]
        k = np.arange(n)[None, :]
        causal = np.broadcast_to(k <= q, (b, n, n))
        if kind == "previous_token":
            return _uniform_rows(np.broadcast_to((k == q - 1) | ((q == 0) & (k == 0)), (b, n, n)))
        if kind == "copying":
            return _uniform_rows(causal)
        if kind == "induction":
            prev = np.concatenate([toks[:, :1], toks[:, :-1]], axis=1)  # prev[i] = tok[i-1]
            match = (prev[:, None, :] == toks[:, :, None]) & (k >= 1) & causal  # [b, q, k]
            fallback = (k >= 1) & causal | ((q == 0) & (k == 0))
            return _uniform_rows(np.where(match.any(-1, keepdims=True), match, fallback))
        if kind == "duplicate_token":
            match = (toks[:, None, :] == toks[:, :, None]) & (k < q)
            fallback = (k < q) | ((q == 0) & (k == 0))
            return _uniform_rows(np.where(match.any(-1, keepdims=True), match,
                                          np.broadcast_to(fallback, (b, n, n))))
        raise ValueError(kind)

    def patterns(self, toks: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
        return {(h.layer, h.head): self._pattern(h.kind, toks) for h in self.heads}

    def logits(self, toks: np.ndarray) -> np.ndarray:
        onehot = np.eye(self.d_vocab)[toks]  # [batch, pos, d_vocab]
        out = np.zeros(onehot.shape)
        for h in self.heads:
            if _OUT_SPACE[h.kind] in self.readout:
                # each head writes pattern @ onehot(tokens it attends to) into its subspace
                out += np.einsum("bqk,bkv->bqv", self._pattern(h.kind, toks), onehot)
        return out


def planted_model(kinds: Sequence[str], *, d_vocab: int = 8, n_ctx: int = 12, n_layers: int = 2,
                  n_heads: int = 2, placement: dict[str, tuple[int, int]] | None = None,
                  distractor_scale: float = 0.3, attn_only: bool = True, d_mlp: int = 8,
                  n_noise: int = 4, seed: int = 0, attention_backend: str = "auto"
                  ) -> PlantedModel:
    """A model with the planted heads ``kinds`` (a subset of ``HEAD_KINDS``; "induction" brings
    its previous-token head in an earlier layer) and distractors everywhere else.

    ``placement``: {kind: (layer, head)}; kinds left out are placed at layers and heads drawn
    from ``seed`` (an induction head's previous-token head in a strictly earlier layer; no two
    planted heads share a slot). ``distractor_scale``: the std of the distractors' weights.
    Sizes: d_head >= d_vocab + n_ctx + 1 and d_model = n_heads * d_head hold the subspaces
    tok [d_vocab], pos [n_ctx], one [d_vocab] output per planted kind and noise (the rest, at
    least ``n_noise``). -> PlantedModel (see the module docstring for what each head computes)."""
    _check_sizes(d_vocab, n_ctx, n_layers, n_heads, distractor_scale)
    kinds = list(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in HEAD_KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {HEAD_KINDS}, got {list(kinds)}")
    if "induction" in kinds and "previous_token" not in kinds:
        kinds.insert(0, "previous_token")
    if "induction" in kinds and n_layers < 2:
        raise ValueError("an induction circuit needs n_layers >= 2 (previous-token head first)")
    if len(kinds) > n_layers * n_heads:
        raise ValueError(f"{len(kinds)} planted heads do not fit {n_layers} layers x {n_heads} heads")
    rng = np.random.default_rng(seed)
    slots = _place(kinds, dict(placement or {}), n_layers, n_heads, rng)

    V, C = d_vocab, n_ctx
    need_head = V + C + 1
    parts = [("tok", V), ("pos", C)] + [(_OUT_SPACE[k], V) for k in kinds]
    base = sum(s for _, s in parts)
    d_model, d_head = _sizes(n_heads, base + n_noise, need_head)
    parts.append(("noise", d_model - base))
    subspaces = _layout(parts)
    sub = {n: slice(a, b) for n, a, b in subspaces}
    cfg = TransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
                            d_vocab=V, n_ctx=C, d_mlp=d_mlp, attn_only=attn_only,
                            normalization_type=None, act_fn="relu",
                            attention_backend=attention_backend)
    P = _zero_params(cfg)
    P["embed"]["W_E"][:, sub["tok"]] = np.eye(V)
    P["pos_embed"]["W_pos"][:, sub["pos"]] = np.eye(C)
    s = SHARPNESS * math.sqrt(d_head)  # a query-key product of 1 * s scores SHARPNESS
    tok_rows, pos_rows = np.arange(V) + sub["tok"].start, np.arange(C) + sub["pos"].start
    heads = []
    for kind in kinds:
        layer, h = slots[kind]
        a = P["blocks"][layer]["attn"]
        out = sub[_OUT_SPACE[kind]]
        if kind == "previous_token":  # query i -> slot i-1 (0 -> 0); key j -> slot j
            a["W_Q"][h][pos_rows, np.maximum(np.arange(C) - 1, 0)] = s
            a["W_K"][h][pos_rows, np.arange(C)] = 1.0
            reads = (("q", "pos"), ("k", "pos"), ("v", "tok"))
        elif kind == "induction":  # query tok t -> slot t; key prev t -> slot t; key 0 -> -2s
            prev_rows = np.arange(V) + sub["prev"].start
            a["W_Q"][h][tok_rows, np.arange(V)] = s
            a["b_Q"][h][V] = s
            a["W_K"][h][prev_rows, np.arange(V)] = 1.0
            a["W_K"][h][pos_rows[0], V] = -2.0
            reads = (("q", "tok"), ("k", "prev"), ("k", "pos"), ("v", "tok"))
        elif kind == "duplicate_token":  # same token: +s; same position (itself): -2s
            a["W_Q"][h][tok_rows, np.arange(V)] = s
            a["W_K"][h][tok_rows, np.arange(V)] = 1.0
            a["W_Q"][h][pos_rows, V + np.arange(C)] = s
            a["W_K"][h][pos_rows, V + np.arange(C)] = -2.0
            reads = (("q", "tok"), ("k", "tok"), ("q", "pos"), ("k", "pos"), ("v", "tok"))
        else:  # copying: zero QK (uniform attention)
            reads = (("v", "tok"),)
        a["W_V"][h][tok_rows, np.arange(V)] = 1.0  # every planted head moves the token read
        a["W_O"][h][np.arange(V), np.arange(V) + out.start] = 1.0
        heads.append(PlantedHead(kind, layer, h, reads, _OUT_SPACE[kind]))
    heads = tuple(heads)
    readout = tuple(_OUT_SPACE[k] for k in kinds if not (k == "previous_token" and "induction" in kinds))
    for space in readout:
        P["unembed"]["W_U"][np.arange(V) + sub[space].start, np.arange(V)] = 1.0
    dis = _Distractors(rng, distractor_scale, sub["noise"])
    taken = {(hd.layer, hd.head) for hd in heads}
    for layer in range(n_layers):
        for h in range(n_heads):
            if (layer, h) not in taken:
                dis.head(P["blocks"][layer]["attn"], h)
        if not attn_only:
            dis.mlp(P["blocks"][layer]["mlp"])
    edges = []
    by_kind = {hd.kind: hd for hd in heads}
    if "induction" in by_kind:
        edges.append((by_kind["previous_token"].label, by_kind["induction"].label, "k"))
    edges += [(hd.label, "logits", "logits") for hd in heads if hd.writes in readout]
    gt = GroundTruth(heads=heads, n_layers=n_layers, n_heads=n_heads,
                     d_mlp=None if attn_only else d_mlp, edges=tuple(edges), subspaces=subspaces,
                     info={"readout": readout, "distractor_scale": float(distractor_scale),
                           "seed": seed})
    return PlantedModel(_to_model(cfg, P), gt, _HeadsReference(heads, readout, V))


def _place(kinds, placement, n_layers, n_heads, rng) -> dict[str, tuple[int, int]]:
    for k, (layer, h) in placement.items():
        if k not in kinds:
            raise ValueError(f"placement names {k!r}, which is not planted ({kinds})")
        if not (0 <= layer < n_layers and 0 <= h < n_heads):
            raise ValueError(f"placement {k!r}: ({layer}, {h}) is outside {n_layers} layers x "
                             f"{n_heads} heads")
    if len(set(placement.values())) != len(placement):
        raise ValueError(f"two planted heads share a slot: {placement}")
    slots = dict(placement)
    order = sorted(kinds, key=lambda k: {"induction": 0, "previous_token": 1}.get(k, 2))
    for k in order:
        if k in slots:
            continue
        free = [(layer, h) for layer in range(n_layers) for h in range(n_heads)
                if (layer, h) not in slots.values()]
        if k == "previous_token" and "induction" in kinds:
            top = slots["induction"][0] if "induction" in slots else n_layers - 1
            free = [(layer, h) for layer, h in free if layer < top]
        if k == "induction":
            bottom = slots["previous_token"][0] if "previous_token" in slots else 0
            below = free  # with no previous-token slot yet, leave a free slot below for it
            free = [(layer, h) for layer, h in free if layer > bottom
                    and ("previous_token" in slots or any(lo < layer for lo, _ in below))]
        if not free:
            raise ValueError(f"no free slot for the {k} head given placement {placement}")
        slots[k] = free[rng.integers(len(free))]
    if "induction" in kinds and not slots["previous_token"][0] < slots["induction"][0]:
        raise ValueError("the previous-token head must sit in an earlier layer than the induction "
                         f"head, got {slots['previous_token']} and {slots['induction']}")
    return slots


# ----------------------------------------------------------------------------- linear model
class _LinearReference:
    def __init__(self, W_E, W_pos, w_direct, w_attn, b_U):
        self.W_E, self.W_pos = W_E, W_pos  # [V, D], [C, D]
        self.w_direct, self.w_attn, self.b_U = w_direct, w_attn, b_U  # [D, Vo], [D, Vo], [Vo]

    def _x(self, toks):
        return self.W_E[toks] + self.W_pos[None, : toks.shape[1]]  # [batch, pos, D]

    def logits(self, toks):
        x = self._x(toks)
        n = toks.shape[1]
        avg = np.cumsum(x, axis=1) / np.arange(1, n + 1)[None, :, None]  # mean over keys <= q
        return x @ self.w_direct + avg @ self.w_attn + self.b_U

    def patterns(self, toks):
        return {}

    def attribution(self, toks, token, pos):
        x = self._x(toks)
        n = toks.shape[1]
        q = pos % n
        w = np.zeros((n, x.shape[-1]))
        w[: q + 1] = self.w_attn[:, token] / (q + 1)
        w[q] += self.w_direct[:, token]
        return x * w[None]


def linear_model(*, d_vocab: int = 8, n_ctx: int = 8, n_features: int = 6, n_chosen: int = 3,
                 n_layers: int = 2, n_heads: int = 2, d_vocab_out: int | None = None,
                 placement: tuple[int, int] | None = None, distractor_scale: float = 0.3,
                 attn_only: bool = True, d_mlp: int = 8, seed: int = 0,
                 attention_backend: str = "auto") -> PlantedModel:
    """A model whose logits are a known linear function of chosen input features.

    The input embedding x = W_E[tok] + W_pos[pos] (random, in an ``n_features``-dim ``feat``
    subspace) feeds the logits along two paths that read only ``n_chosen`` chosen coordinates
    (``ground_truth.info["chosen"]``): the direct path (W_U reads them) and one planted averaging
    head (zero QK: uniform over keys <= query) whose OV circuit reads them; so
    logits[q] = x_q @ w_direct + mean_{k<=q} x_k @ w_attn + b_U, exactly, and the attribution of
    logits[:, q, c] to the input from a zero baseline is known in closed form
    (``expected_attribution``). The other coordinates of ``feat`` (``info["dummy"]``) are dummies:
    the output does not depend on them at all."""
    _check_sizes(d_vocab, n_ctx, n_layers, n_heads, distractor_scale)
    if not 1 <= n_chosen <= n_features:
        raise ValueError(f"need 1 <= n_chosen <= n_features, got {n_chosen}, {n_features}")
    rng = np.random.default_rng(seed)
    Vo = d_vocab if d_vocab_out is None else d_vocab_out
    k = n_chosen
    parts = [("feat", n_features), ("avg", k), ("noise", 4)]
    d_model, d_head = _sizes(n_heads, sum(s for _, s in parts), k)
    parts[-1] = ("noise", d_model - n_features - k)
    subspaces = _layout(parts)
    sub = {n: slice(a, b) for n, a, b in subspaces}
    cfg = TransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
                            d_vocab=d_vocab, d_vocab_out=Vo, n_ctx=n_ctx, d_mlp=d_mlp,
                            attn_only=attn_only, normalization_type=None, act_fn="relu",
                            attention_backend=attention_backend)
    P = _zero_params(cfg)
    P["embed"]["W_E"][:, sub["feat"]] = rng.standard_normal((d_vocab, n_features))
    P["pos_embed"]["W_pos"][:, sub["feat"]] = 0.5 * rng.standard_normal((n_ctx, n_features))
    chosen = np.sort(rng.choice(n_features, size=k, replace=False)) + sub["feat"].start
    layer, h = placement if placement is not None else (int(rng.integers(n_layers)),
                                                        int(rng.integers(n_heads)))
    a = P["blocks"][layer]["attn"]
    a["W_V"][h][chosen, np.arange(k)] = 1.0  # value = the chosen coordinates
    avg_rows = np.arange(k) + sub["avg"].start
    a["W_O"][h][np.arange(k), avg_rows] = 1.0  # written into avg
    W_U = P["unembed"]["W_U"]
    W_U[chosen] = rng.standard_normal((k, Vo))  # direct path
    W_U[avg_rows] = rng.standard_normal((k, Vo))  # attention path
    P["unembed"]["b_U"][:] = rng.standard_normal(Vo)
    dis = _Distractors(rng, distractor_scale, sub["noise"])
    for lay in range(n_layers):
        for hh in range(n_heads):
            if (lay, hh) != (layer, h):
                dis.head(P["blocks"][lay]["attn"], hh)
        if not attn_only:
            dis.mlp(P["blocks"][lay]["mlp"])
    D = d_model
    w_direct = np.zeros((D, Vo))
    w_direct[chosen] = W_U[chosen]
    w_attn = np.zeros((D, Vo))
    w_attn[chosen] = W_U[avg_rows]
    head = PlantedHead("averaging", layer, h, (("v", "feat"),), "avg")
    gt = GroundTruth(heads=(head,), n_layers=n_layers, n_heads=n_heads,
                     d_mlp=None if attn_only else d_mlp,
                     edges=(("embed", "logits", "logits"), (head.label, "logits", "logits")),
                     subspaces=subspaces,
                     info={"chosen": tuple(int(c) for c in chosen),
                           "dummy": tuple(int(c) for c in range(sub["feat"].start, sub["feat"].stop)
                                          if c not in set(chosen.tolist())),
                           "w_direct": w_direct,
                           "w_attn": w_attn, "seed": seed})
    ref = _LinearReference(P["embed"]["W_E"], P["pos_embed"]["W_pos"], w_direct, w_attn,
                           P["unembed"]["b_U"].copy())
    return PlantedModel(_to_model(cfg, P), gt, ref)


# ----------------------------------------------------------------------------- superposition
class _SuperpositionReference:
    def __init__(self, token_features, F, b_in, readout, b_U):
        self.a, self.F, self.b_in, self.readout, self.b_U = token_features, F, b_in, readout, b_U

    def neurons(self, toks):
        """[batch, pos, d_mlp]: b_in + features(tok) @ F (the ReLU never cuts: b_in is large)."""
        return self.b_in + self.a[toks] @ self.F

    def logits(self, toks):
        return self.neurons(toks) @ self.readout + self.b_U

    def patterns(self, toks):
        return {}


def superposition_model(*, n_features: int = 6, d_mlp: int = 3, d_vocab: int = 16,
                        n_ctx: int = 6, feature_probability: float = 0.3, n_layers: int = 2,
                        n_heads: int = 2, layer: int | None = None, d_vocab_out: int = 4,
                        distractor_scale: float = 0.3, seed: int = 0,
                        attention_backend: str = "auto") -> PlantedModel:
    """A model with one MLP layer whose d_mlp neurons hold n_features > d_mlp features in
    superposition, along known directions.

    Each token switches on a known sparse set of features (each with probability
    ``feature_probability``, magnitude in [0.5, 1]): ``info["token_features"]`` [d_vocab,
    n_features], embedded one feature per residual coordinate (``feat``). The planted MLP layer
    (``layer``, drawn if None) has W_in[feat] = F, unit feature directions in neuron space
    (``info["feature_directions"]`` [n_features, d_mlp]), and a bias ``info["b_in"]`` large
    enough that the ReLU never cuts: its hook_post is exactly b_in + features @ F (the
    ``neuron_activations`` reference). W_out writes the neurons into ``mlp`` and W_U reads them
    with a random readout. Every other MLP layer and every head is a distractor."""
    _check_sizes(d_vocab, n_ctx, n_layers, n_heads, distractor_scale)
    if not 1 <= d_mlp < n_features:
        raise ValueError(f"superposition needs 1 <= d_mlp < n_features, got {d_mlp}, {n_features}")
    if not 0 < feature_probability <= 1:
        raise ValueError(f"feature_probability must be in (0, 1], got {feature_probability}")
    rng = np.random.default_rng(seed)
    layer = int(rng.integers(n_layers)) if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers}), got {layer}")
    parts = [("feat", n_features), ("mlp", d_mlp), ("noise", 4)]
    d_model, d_head = _sizes(n_heads, sum(s for _, s in parts), 1)
    parts[-1] = ("noise", d_model - n_features - d_mlp)
    subspaces = _layout(parts)
    sub = {n: slice(a, b) for n, a, b in subspaces}
    cfg = TransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
                            d_vocab=d_vocab, d_vocab_out=d_vocab_out, n_ctx=n_ctx, d_mlp=d_mlp,
                            attn_only=False, normalization_type=None, act_fn="relu",
                            attention_backend=attention_backend)
    P = _zero_params(cfg)
    active = rng.random((d_vocab, n_features)) < feature_probability
    a = np.where(active, rng.uniform(0.5, 1.0, (d_vocab, n_features)), 0.0)
    P["embed"]["W_E"][:, sub["feat"]] = a
    F = rng.standard_normal((n_features, d_mlp))
    F /= np.linalg.norm(F, axis=1, keepdims=True)
    b_in = np.abs(a @ F).max(0) + 1.0  # [d_mlp]: pre-activations stay >= 1
    m = P["blocks"][layer]["mlp"]
    m["W_in"][sub["feat"]] = F
    m["b_in"][:] = b_in
    m["W_out"][np.arange(d_mlp), np.arange(d_mlp) + sub["mlp"].start] = 1.0
    readout = rng.standard_normal((d_mlp, d_vocab_out))
    P["unembed"]["W_U"][sub["mlp"]] = readout
    dis = _Distractors(rng, distractor_scale, sub["noise"])
    for lay in range(n_layers):
        for h in range(n_heads):
            dis.head(P["blocks"][lay]["attn"], h)
        if lay != layer:
            dis.mlp(P["blocks"][lay]["mlp"])
    gt = GroundTruth(heads=(), n_layers=n_layers, n_heads=n_heads, d_mlp=d_mlp,
                     neurons=tuple((layer, n) for n in range(d_mlp)),
                     edges=tuple((f"L{layer}N{n}", "logits", "logits") for n in range(d_mlp)),
                     subspaces=subspaces,
                     info={"layer": layer, "token_features": a, "feature_directions": F,
                           "feature_probability": float(feature_probability), "b_in": b_in,
                           "seed": seed})
    ref = _SuperpositionReference(a, F, b_in, readout, np.zeros(d_vocab_out))
    return PlantedModel(_to_model(cfg, P), gt, ref)
