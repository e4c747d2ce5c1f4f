"""TransformerLens interop: state dicts as {TL parameter key: numpy array}.

The keys and shapes are exactly those of ``HookedTransformer.named_parameters()`` in
TransformerLens for the same config, so weights move both ways::

    sd = to_transformer_lens_state_dict(model)              # here -> TL
    tl_model.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=False)
    model = from_transformer_lens_state_dict(cfg, {k: v.numpy() for k, v in tl_sd.items()})

and tracr-compiled models come in with their computation graph as ground truth (``from_tracr``;
needs the optional ``tracr`` extra: ``pip install "tinyinterp[tracr]"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from tinyinterp.config import TransformerConfig
from tinyinterp.model import HookedTransformer
from tinyinterp.params import check_params, flatten_params, unflatten_params

# Buffers TL keeps in its state dict (not parameters): ignored on import.
_TL_BUFFERS = re.compile(r"^blocks\.\d+\.attn\.(mask|IGNORE)$|\.rotary_(sin|cos)$")


def to_transformer_lens_state_dict(model: HookedTransformer) -> dict[str, np.ndarray]:
    """{TL parameter key: float32 numpy array} for every parameter of ``model``."""
    return {k: np.asarray(v, dtype=np.float32) for k, v in flatten_params(model.params).items()}


def from_transformer_lens_state_dict(cfg: TransformerConfig, state_dict: dict) -> HookedTransformer:
    """A model from a TL-style state dict (numpy arrays, or anything ``np.asarray`` accepts, e.g.
    CPU torch tensors). Floating-point weights (float16/bfloat16/float64) are converted to float32;
    TL's attention buffers (``attn.mask``, ``attn.IGNORE``) are skipped; any other missing,
    unexpected or misshapen key, or a non-float weight (int, bool: not weights), is a clear
    ValueError naming the key (``tinyinterp.params.check_params``)."""
    flat = {}
    for k, v in state_dict.items():
        if _TL_BUFFERS.search(k):
            continue
        a = np.asarray(v)
        if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
            raise ValueError(f"state_dict[{k!r}] has dtype {a.dtype}; model weights must be "
                             "floating point (is this the right state dict?)")
        flat[k] = a.astype(np.float32)
    params = unflatten_params(flat, cfg)
    check_params(params, cfg)
    return HookedTransformer(cfg, params)


# ============================================================================ tracr
@dataclass(frozen=True)
class TracrComponent:
    """One component of a tracr-compiled model: ``name`` ("L0H1" a head, "L0MLP" an MLP layer,
    or "L0MLP[op]" the neurons of that layer computing one operation), the RASP operation it
    computes (``op``: the label of the SOp it writes, e.g. "aggregate_1"), the SOps it reads
    (``reads``: {"q"|"k"|"v"|"in": (labels)}), and for MLPs its ``neurons``."""

    name: str
    layer: int
    kind: str  # "head" | "mlp"
    op: str
    reads: dict
    head: int | None = None
    neurons: tuple[int, ...] = ()
    op_type: str | None = None  # "Map", "Aggregate", ... when the program was given


@dataclass(frozen=True)
class TracrGraph:
    """The compiled program's computation graph as the converted model's ground truth:
    ``components`` (which layer, head or neurons compute which RASP operation), ``edges``
    (writer, reader, via) with writers "embed" (tokens, indices, one) or a component name and
    readers a component name or "logits", and the ``output`` operation's label."""

    components: tuple[TracrComponent, ...]
    edges: tuple[tuple[str, str, str], ...]
    output: str
    n_layers: int
    n_heads: int
    d_mlp: int

    def head_mask(self) -> np.ndarray:
        """bool [n_layers, n_heads]: True at the heads that compute an operation."""
        mask = np.zeros((self.n_layers, self.n_heads), bool)
        for c in self.components:
            if c.kind == "head":
                mask[c.layer, c.head] = True
        return mask

    def neuron_mask(self) -> np.ndarray:
        """bool [n_layers, d_mlp]: True at the neurons that compute an operation."""
        mask = np.zeros((self.n_layers, self.d_mlp), bool)
        for c in self.components:
            if c.kind == "mlp":
                mask[c.layer, list(c.neurons)] = True
        return mask

    def component(self, op: str) -> TracrComponent:
        """The component computing RASP operation ``op`` (its label)."""
        for c in self.components:
            if c.op == op:
                return c
        raise KeyError(f"no component computes {op!r}; operations: "
                       f"{[c.op for c in self.components]}")


@dataclass(frozen=True, eq=False)
class TracrModel:
    """``from_tracr``'s result: the HookedTransformer, its ground truth (``ground_truth``, a
    TracrGraph), the residual stream's labels, and tracr's input/output encodings."""

    model: HookedTransformer
    ground_truth: TracrGraph
    residual_labels: tuple[str, ...]
    input_encoding: dict
    output_decoding: dict | None  # id -> value for categorical outputs; None for numerical

    def encode(self, inputs) -> np.ndarray:
        """Token values (e.g. [["BOS", 1, 2, 3]]) -> ids [batch, pos] (int32)."""
        try:
            return np.asarray([[self.input_encoding[t] for t in row] for row in inputs], np.int32)
        except KeyError as e:
            raise ValueError(f"token {e.args[0]!r} is not in the compiled vocabulary "
                             f"{sorted(map(str, self.input_encoding))}") from None

    def decode(self, logits) -> list:
        """Logits [batch, pos, d_vocab_out] -> output values per position (argmax decoded for a
        categorical program, the single output for a numerical one)."""
        x = np.asarray(logits)
        if self.output_decoding is None:
            return x[..., 0].tolist()
        return [[self.output_decoding[int(i)] for i in row] for row in np.argmax(x, -1)]


def _sop(label: str) -> str:
    return label.split(":", 1)[0]


def from_tracr(assembled, program=None, *, attention_backend: str = "auto") -> TracrModel:
    """A HookedTransformer (TransformerLens names) computing what a tracr-compiled model computes,
    with the program's computation graph as its ground truth.

    ``assembled``: tracr's ``AssembledTransformerModel`` (``compiling.compile_rasp_to_model(...,
    causal=True)``; a non-causal model cannot be one: the HookedTransformer is causal).
    ``program`` (optional): the RASP program, to name each operation's type (Map, Aggregate, ...).
    The conversion is weight for weight: tracr's one-hot embeddings, its heads padded to a common
    key size (n_heads * d_head need not be d_model), ReLU MLPs, no norm, and its unembedding (the
    projection onto the output operation's subspace; for a numerical program one output).
    The graph is read from the weights: each head's and neuron's nonzero rows and columns name
    the residual subspaces (RASP operations) it reads and writes."""
    cfg_t = assembled.model_config
    if getattr(cfg_t, "layer_norm", False):
        raise ValueError("from_tracr converts models without layer norm (tracr's default)")
    if not getattr(cfg_t, "causal", False):
        raise ValueError("from_tracr needs a causal model: compile with "
                         "compile_rasp_to_model(..., causal=True)")
    P = {k: {kk: np.asarray(v, np.float64) for kk, v in d.items()} for k, d in assembled.params.items()}
    labels = tuple(assembled.residual_labels)
    W_E = P["token_embed"]["embeddings"]  # [d_vocab, d_model]
    W_pos = P["pos_embed"]["embeddings"]  # [n_ctx, d_model]
    d_model = W_E.shape[1]
    L, H, K = cfg_t.num_layers, cfg_t.num_heads, cfg_t.key_size
    d_mlp = cfg_t.mlp_hidden_size
    cfg = TransformerConfig(n_layers=L, d_model=d_model, n_heads=H, d_head=K, d_mlp=d_mlp,
                            d_vocab=W_E.shape[0], n_ctx=W_pos.shape[0], act_fn="relu",
                            normalization_type=None, attn_only=False,
                            attention_backend=attention_backend, model_name="tracr")
    blocks = []
    for layer in range(L):
        pre = f"transformer/layer_{layer}"

        def heads_in(name, pre=pre):  # w [d_model, H*K] -> [H, d_model, K]; b [H*K] -> [H, K]
            w, b = P[f"{pre}/attn/{name}"]["w"], P[f"{pre}/attn/{name}"]["b"]
            return w.reshape(d_model, H, K).transpose(1, 0, 2), b.reshape(H, K)

        (W_Q, b_Q), (W_K, b_K), (W_V, b_V) = (heads_in(n) for n in ("query", "key", "value"))
        lin = P[f"{pre}/attn/linear"]
        blocks.append({
            "attn": {"W_Q": W_Q, "W_K": W_K, "W_V": W_V, "b_Q": b_Q, "b_K": b_K, "b_V": b_V,
                     "W_O": lin["w"].reshape(H, K, d_model), "b_O": lin["b"]},
            "mlp": {"W_in": P[f"{pre}/mlp/linear_1"]["w"], "b_in": P[f"{pre}/mlp/linear_1"]["b"],
                    "W_out": P[f"{pre}/mlp/linear_2"]["w"], "b_out": P[f"{pre}/mlp/linear_2"]["b"]},
        })
    graph = _tracr_graph(blocks, labels, L, H, d_mlp, program)
    out_idx = [i for i, lab in enumerate(labels) if _sop(lab) == graph.output]
    enc_out = getattr(assembled.output_encoder, "encoding_map", None)
    dec = None if enc_out is None else {i: v for v, i in enc_out.items()}
    if dec is not None:  # categorical: output id j is the direction "output:value_j"
        W_U = np.zeros((d_model, len(dec)))
        for j, value in dec.items():
            W_U[labels.index(f"{graph.output}:{value}"), j] = 1.0
        decoding = dict(dec)
    else:  # numerical: one output, the operation's one direction
        if len(out_idx) != 1:
            raise ValueError(f"a numerical output should be one residual direction, found "
                             f"{[labels[i] for i in out_idx]}")
        W_U = np.zeros((d_model, 1))
        W_U[out_idx[0], 0] = 1.0
        decoding = None
    cfg = cfg.replace(d_vocab_out=W_U.shape[1])
    params = {"embed": {"W_E": W_E}, "pos_embed": {"W_pos": W_pos}, "blocks": blocks,
              "unembed": {"W_U": W_U, "b_U": np.zeros(W_U.shape[1])}}
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    check_params(params, cfg)
    enc = dict(getattr(assembled.input_encoder, "encoding_map", None) or
               {i: i for i in range(W_E.shape[0])})
    return TracrModel(HookedTransformer(cfg, params), graph, labels, enc, decoding)


def with_inert_heads(conv: TracrModel, n_extra: int = 2, *, scale: float = 1.0,
                     seed: int = 0) -> TracrModel:
    """``conv`` with ``n_extra`` distractor heads added to every layer: random queries, keys and
    values (std ``scale``) that read the whole residual stream and write, through a random W_O, into
    ``n_extra`` fresh residual directions that nothing reads (no later head, no MLP, not the
    unembedding). The model computes exactly what ``conv`` computes, the distractors attend and
    write, and the ground truth's head mask marks only the program's heads, so a head-scoring
    method has negatives to rank below them (recovery AUROC on a compiled program). The new
    heads' indices follow the program's in each layer; ``residual_labels`` gain "inert:i"."""
    if n_extra < 1:
        raise ValueError(f"n_extra must be >= 1, got {n_extra}")
    rng = np.random.default_rng(seed)
    cfg, P = conv.model.cfg, conv.model.params
    d, H, d_new = cfg.d_model, cfg.n_heads, cfg.d_model + n_extra

    def pad_rows(w, axis):  # zero rows for the new residual directions (nothing reads them)
        pad = [(0, 0)] * w.ndim
        pad[axis] = (0, n_extra)
        return jnp.pad(w, pad)

    def draw(*shape):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    blocks = []
    for blk in P["blocks"]:
        at = blk["attn"]
        new = {}
        for c in "QKV":  # [H, d_model, d_head] -> [H + n_extra, d_new, d_head]
            W = pad_rows(at[f"W_{c}"], 1)
            new[f"W_{c}"] = jnp.concatenate([W, draw(n_extra, d_new, cfg.d_head)])
            new[f"b_{c}"] = jnp.concatenate([at[f"b_{c}"], draw(n_extra, cfg.d_head)])
        # the program's heads write where they wrote; head H + i writes only direction d + i
        W_O_new = jnp.zeros((n_extra, cfg.d_head, d_new), jnp.float32)
        for i in range(n_extra):
            W_O_new = W_O_new.at[i, :, d + i].set(draw(cfg.d_head))
        new["W_O"] = jnp.concatenate([pad_rows(at["W_O"], 2), W_O_new])
        new["b_O"] = pad_rows(at["b_O"], 0)
        mlp = {**blk["mlp"], "W_in": pad_rows(blk["mlp"]["W_in"], 0),
               "W_out": pad_rows(blk["mlp"]["W_out"], 1), "b_out": pad_rows(blk["mlp"]["b_out"], 0)}
        blocks.append({**blk, "attn": new, "mlp": mlp})
    params = {"embed": {"W_E": pad_rows(P["embed"]["W_E"], 1)},
              "pos_embed": {"W_pos": pad_rows(P["pos_embed"]["W_pos"], 1)}, "blocks": blocks,
              "unembed": {**P["unembed"], "W_U": pad_rows(P["unembed"]["W_U"], 0)}}
    new_cfg = cfg.replace(d_model=d_new, n_heads=H + n_extra)
    check_params(params, new_cfg)
    g = conv.ground_truth
    graph = TracrGraph(g.components, g.edges, g.output, g.n_layers, H + n_extra, g.d_mlp)
    labels = (*conv.residual_labels, *(f"inert:{i}" for i in range(n_extra)))
    return TracrModel(HookedTransformer(new_cfg, params), graph, labels, conv.input_encoding,
                      conv.output_decoding)


def _tracr_graph(blocks, labels, L, H, d_mlp, program) -> TracrGraph:
    """Components, edges and output read from the converted weights (see from_tracr)."""
    types = {}
    if program is not None:  # label -> the RASP expression's type, over the whole program
        stack, seen = [program], set()
        while stack:
            e = stack.pop()
            if id(e) in seen:
                continue
            seen.add(id(e))
            types[e.label] = type(e).__name__
            stack.extend(getattr(e, "children", ()))
    inputs = {"tokens", "indices", "one"}

    def sops(rows) -> tuple[str, ...]:
        return tuple(sorted({_sop(labels[i]) for i in np.flatnonzero(rows)}))

    comps = []
    for layer, blk in enumerate(blocks):
        at = blk["attn"]
        for h in range(H):
            writes = sops(np.abs(at["W_O"][h]).sum(0) > 0)
            if not writes:
                continue
            if len(writes) != 1:
                raise ValueError(f"L{layer}H{h} writes several operations {writes}")
            reads = {c: sops(np.abs(at[f"W_{c.upper()}"][h]).sum(1) > 0) for c in "qkv"}
            op = writes[0]
            op_type = types.get(op) or ("SelectorWidth (attention part)"
                                        if op.endswith("_selector_width_attn_output") else None)
            comps.append(TracrComponent(f"L{layer}H{h}", layer, "head", op, reads, head=h,
                                        op_type=op_type))
        W_in, W_out = blk["mlp"]["W_in"], blk["mlp"]["W_out"]
        by_op: dict[str, list[int]] = {}
        layer_reads = set(sops(np.abs(W_in).sum(1) > 0))
        for n in range(d_mlp):
            # an MLP may also write (to clean up) a subspace it reads: tracr's SelectorWidth MLP
            # erases its attention part's hidden output; what it computes is what it writes
            # without reading
            w = sops(np.abs(W_out[n]) > 0)
            w = tuple(x for x in w if x not in layer_reads) or w
            if len(w) > 1:
                raise ValueError(f"neuron {n} of layer {layer} writes several operations {w}")
            if w:
                by_op.setdefault(w[0], []).append(n)
        several = len(by_op) > 1
        for op, neurons in by_op.items():
            reads = {"in": sops(np.abs(W_in[:, neurons]).sum(1) > 0)}
            name = f"L{layer}MLP[{op}]" if several else f"L{layer}MLP"
            comps.append(TracrComponent(name, layer, "mlp", op, reads, neurons=tuple(neurons),
                                        op_type=types.get(op)))
    if not comps:
        raise ValueError("the tracr model computes nothing (no head or neuron writes)")
    writer = {c.op: c.name for c in comps}
    edges = []
    for c in comps:
        for via, read in c.reads.items():
            for s in read:
                src = "embed" if s in inputs else writer.get(s)
                if src is None:
                    raise ValueError(f"{c.name} reads {s!r}, which nothing writes")
                edges.append((src, c.name, via))
    read_somewhere = {s for c in comps for r in c.reads.values() for s in r}
    sinks = [c for c in comps if c.op not in read_somewhere]
    if len(sinks) != 1:
        raise ValueError(f"expected one output operation (written, never read), found "
                         f"{[c.op for c in sinks]}")
    edges.append((sinks[0].name, "logits", "logits"))
    return TracrGraph(tuple(comps), tuple(dict.fromkeys(edges)), sinks[0].op, L, H, d_mlp)
