"""Synthetic tasks: deterministic token data generated from a PRNG key, inside jit.

Every task samples a batch dict of static shape from ``(key, batch_size)`` with pure ``jnp`` ops,
so the training loop can generate each step's data inside its compiled loop:

    batch["tokens"]       int32 [batch, pos]       the sequences
    batch["loss_mask"]    bool  [batch, pos - 1]   which next-token predictions the loss counts:
                                                   entry i is the prediction of tokens[:, i + 1]
                                                   made at position i (float32 weights, a
                                                   weighted mean, where a task weights them)
    batch["answer_mask"]  bool  [batch, pos - 1]   which predictions are determined by the context
                                                   (what ``accuracy`` scores)

The tasks (``get_task(name, **options)``; ``TASKS`` lists the names and their options):

``repeated_tokens`` (alias ``induction``)
    ``length`` uniform random tokens repeated ``n_repeats`` times, optionally after a BOS token:
    ``[BOS] x_0 .. x_{L-1} x_0 .. x_{L-1} ...``. Without BOS the tokens are drawn from
    ``[0, d_vocab)``; with ``bos=True`` token 0 is BOS and the random tokens come from
    ``[1, d_vocab)``. ``loss_on="all"`` (default, as in TransformerLens/ARENA) trains on every
    prediction, ``"repeated"`` only on the predictable ones. The answer positions are the
    predictions made at a token inside a repeat (position >= offset + L), which induction can make.
    ``min_length`` (0: off) draws each sequence's segment length L uniformly from
    ``[min_length, length]``, left-pads the sequence with ``n_repeats * (length - L)`` copies of
    the reserved token ``PAD = 0`` so every batch keeps its shape, and draws the segment's tokens
    without replacement from ``[1, d_vocab)``. Why: with a fixed L the repeat period is constant
    and a single attention head solves the task from positions alone (attend ``L - 1`` back and
    copy), so no induction circuit forms; a varying period rules that shortcut out, and distinct
    tokens make "attend to the token after the earlier occurrence of this one" exact, so a
    previous-token head feeding an induction head is the circuit that solves it. The per-example
    masks ``first_mask`` (predictions of first-segment tokens, unpredictable) and ``answer_mask``
    (predictions made inside a repeat) say which predictions are which.
    ``filler`` (with ``min_length``) says what comes before the segment: ``"pad"`` (default) the
    PAD tokens above; ``"distinct"`` the same number of random tokens, all distinct from each
    other and from the segment (the only repeated tokens are the repeats); ``"repeat"`` no filler:
    the segment starts at position 0 and repeats cyclically to the end of the context;
    ``"mixed"`` (what the induction-heads reproduction trains on) a filler of distinct tokens
    whose length is 0 for a fraction ``no_filler`` of the sequences (default 0.5) and otherwise
    uniform in ``[1, n_repeats * (length - L)]``, then the segment repeated cyclically to the end (at least
    ``n_repeats`` times). Why: with PAD filler the amount of padding gives the period away (so a
    positional solution remains); ``"repeat"`` alone lets the model rely on the segment starting
    at 0 (it then fails when a filler comes first); ``"distinct"`` alone leaves start = 0 rare, and
    the model fails the first prediction of a repeat at that edge.
    ``sampling`` (with ``min_length``) says how the tokens are drawn: ``"distinct"`` (default) as
    above, from ``[1, d_vocab)``, no token twice in a sequence except through the repeats;
    ``"replacement"`` every segment and filler token uniform over every id ``[0, d_vocab)``, so a
    token may recur inside the segment (the layout TransformerLens and ARENA test induction on);
    ``"mixed"`` each sequence one or the other with probability 1/2, ids from ``[0, d_vocab)``
    either way (what the induction-heads reproduction trains on). Why: a model trained only on
    distinct tokens meets a segment with a repeated token, or token 0, for the first time at test
    time and fails it. "replacement" and "mixed" need a filler other than "pad" (0 is a token).
    ``bos="mixed"`` (with ``min_length``): about half the sequences start with BOS (token 0), the
    others have one more token of the body at the end, so both kinds fill the same ``seq_len``.
    ``no_filler_no_bos`` (with ``min_length``; default None: ``no_filler``) is the no-filler
    fraction of the sequences without BOS. ``answer_weight`` and ``early_weight`` (default 1)
    weight the loss: the predictions made inside a repeat count ``answer_weight`` times, those
    of them made before position ``early_end`` (default 16) ``early_weight`` times, every other
    prediction once (``loss_mask`` is then float32 weights; the loss is the weighted mean). Why
    (the induction-heads reproduction): the first repeat's first predictions, with the segment
    at position 0 or 1 next to the position-0 attention sink, are a few of the 64 predictions of
    a sequence and were still 1.5-3 nats off after training without them.
``copy`` / ``reverse`` / ``sort``
    ``x_0 .. x_{n-1} SEP y_0 .. y_{n-1}`` with ``x`` uniform in ``[0, n_symbols)``, ``SEP =
    n_symbols`` (so ``d_vocab = n_symbols + 1``) and ``y`` = ``x``, ``x`` reversed, or ``x`` sorted
    ascending. The loss and the accuracy count the ``n`` predictions of ``y`` (made at SEP and
    at ``y_0 .. y_{n-2}``).
``modular_addition``
    ``a b = c`` with ``a, b`` uniform in ``[0, p)``, ``c = (a + b) mod p`` and the ``=`` token
    ``p`` (so ``d_vocab = p + 1``, ``seq_len = 4``). Only the prediction of ``c`` (made at ``=``)
    counts.

Each ``Task`` is a frozen, hashable dataclass (usable as a static argument to ``jax.jit``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

Batch = dict[str, jax.Array]
PAD = 0  # the padding token of repeated_tokens with min_length (also the BOS token)


# ----------------------------------------------------------------------------- the Task object
@dataclasses.dataclass(frozen=True)
class Task:
    """A synthetic next-token task of fixed shape.

    ``name``: registry name; ``seq_len``: pos of every batch; ``d_vocab``: the smallest model
    vocabulary that holds every token; ``options``: the options it was built with (sorted
    ``(name, value)`` pairs, so a Task is hashable); ``sampler(key, batch_size) -> batch``.
    """

    name: str
    seq_len: int
    d_vocab: int
    options: tuple[tuple[str, Any], ...]
    # Equality and hash come from (name, seq_len, d_vocab, options): two get_task calls with the
    # same options give equal tasks, so jit's static-argument cache is hit.
    sampler: Callable[[jax.Array, int], Batch] = dataclasses.field(repr=False, compare=False)

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        """A batch dict (see the module docstring); pure jnp, static shapes, jit-able with
        ``batch_size`` static. Same key -> same batch."""
        return self.sampler(key, batch_size)

    def loss(self, logits: Float[Array, "batch pos vocab"], batch: Batch) -> Float[Array, ""]:
        """Mean next-token cross-entropy over ``batch["loss_mask"]`` positions (weighted by it
    where it holds weights)."""
        return masked_mean(per_token_loss(logits, batch["tokens"]), batch["loss_mask"])

    def accuracy(self, logits: Float[Array, "batch pos vocab"], batch: Batch) -> Float[Array, ""]:
        """Fraction of ``answer_mask`` predictions whose argmax is the next token."""
        return masked_mean(correct_predictions(logits, batch["tokens"]).astype(jnp.float32),
                           batch["answer_mask"])

    def loss_metrics(self, per_token: Float[Array, "batch pos_minus_1"],
                     batch: Batch) -> dict[str, jax.Array]:
        """Cheap per-step loss breakdowns from the per-token loss (no argmax): ``answer_loss``
        for every task, plus ``loss_first`` / ``loss_repeated`` for repeated tokens."""
        out = {"answer_loss": masked_mean(per_token, batch["answer_mask"])}
        if self.name == "repeated_tokens":
            out.update(induction_losses(per_token, batch))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description; ``get_task(**d)`` rebuilds the same task."""
        return {"name": self.name, **self.opts}

    @property
    def token_labels(self) -> tuple[str, ...]:
        """A readable name for every token id, [d_vocab] strings (see ``task_token_labels``);
        the views and figures show these instead of bare ids."""
        return task_token_labels(self)

    def label_tokens(self, tokens: Int[Array, "*shape"]) -> list:
        """``tokens`` (any shape) as nested lists of their names (``token_labels``)."""
        return label_tokens(tokens, self.token_labels)


# ----------------------------------------------------------------------------- loss helpers
def per_token_loss(logits: Float[Array, "batch pos vocab"],
                   tokens: Int[Array, "batch pos"]) -> Float[Array, "batch pos_minus_1"]:
    """Next-token cross-entropy: entry ``[b, i]`` is ``-log p(tokens[b, i+1] | tokens[b, :i+1])``."""
    logprobs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [b, pos-1, V]
    target = tokens[:, 1:, None]  # [b, pos-1, 1]
    return -jnp.take_along_axis(logprobs, target, axis=-1)[..., 0]  # [b, pos-1]


def correct_predictions(logits: Float[Array, "batch pos vocab"],
                        tokens: Int[Array, "batch pos"]) -> Bool[Array, "batch pos_minus_1"]:
    """Whether the argmax prediction at position i equals tokens[:, i + 1]."""
    return jnp.argmax(logits[:, :-1], axis=-1).astype(jnp.int32) == tokens[:, 1:]


def masked_mean(x: Float[Array, "*s"],
                mask: Bool[Array, "*s"] | Float[Array, "*s"]) -> Float[Array, ""]:
    """Mean of ``x`` over the True entries of ``mask``, or weighted by a float ``mask`` (0 when
    the mask is empty)."""
    m = mask.astype(x.dtype)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), jnp.asarray(1.0, x.dtype))


def induction_segments(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks over the ``seq_len - 1`` predictions of a repeated-tokens task:
    ``first`` (predictions of tokens inside the first segment; nothing in context predicts them)
    and ``repeated`` (predictions made at a token inside a repeat, which induction can make). The
    one prediction at the last token of the first segment (of the first repeated token) is in
    neither: only position, not induction, could predict it."""
    if task.name != "repeated_tokens":
        raise ValueError(f"induction_segments needs a 'repeated_tokens' task, got {task.name!r}")
    if task.opts.get("min_length", 0) not in (0, task.opts["length"]):
        raise ValueError("induction_segments: with min_length the segments differ per sequence; "
                         "use the batch's first_mask and answer_mask")
    o = 1 if task.opts["bos"] else 0
    length = task.opts["length"]
    i = np.arange(task.seq_len - 1)
    return i < o + length - 1, i >= o + length


def induction_losses(per_token: Float[Array, "batch pos_minus_1"],
                     task_or_batch: Task | Batch) -> dict[str, jax.Array]:
    """``{"loss_first", "loss_repeated"}``: mean per-token loss on the unpredictable predictions
    (first segment, and filler) vs on the repeats. Pass the batch (its ``first_mask`` and
    ``answer_mask``) or, for a fixed segment length, the task (see ``induction_segments``). A
    model that has learned induction has loss_repeated << loss_first ~ log(number of tokens)."""
    if isinstance(task_or_batch, Task):
        first, repeated = induction_segments(task_or_batch)
        return {"loss_first": jnp.mean(per_token[:, first]),
                "loss_repeated": jnp.mean(per_token[:, repeated])}
    return {"loss_first": masked_mean(per_token, task_or_batch["first_mask"]),
            "loss_repeated": masked_mean(per_token, task_or_batch["answer_mask"])}


# ----------------------------------------------------------------------------- samplers
def random_permutations(key: jax.Array, batch_size: int, n: int) -> Int[Array, "batch n"]:
    """[batch, n] int32: an independent uniformly random permutation of ``0 .. n-1`` per row.

    One single-operand sort of packed keys (random high bits, the index in the low
    ``ceil(log2 n)`` bits, read back after sorting) instead of an argsort (a key-value sort):
    measured 4-9x faster for 64 ids on this CPU, where the argsort was over half of the training
    data's sampling time. Two indices draw the same random bits with probability about
    ``n^2 / 2^(33 - index bits)`` per row (3e-5 for n = 64); such a tie keeps their order, a
    negligible bias. Beyond 1024 ids, where ties would be common, it argsorts."""
    bits = max(1, (n - 1).bit_length())
    if bits > 10:
        u = jax.random.uniform(key, (batch_size, n))
        return jnp.argsort(u, axis=1).astype(jnp.int32)
    low = jnp.uint32((1 << bits) - 1)
    r = jax.random.bits(key, (batch_size, n), dtype=jnp.uint32)  # [batch, n]
    packed = (r & ~low) | jnp.arange(n, dtype=jnp.uint32)[None, :]  # [batch, n]
    return (jnp.sort(packed, axis=1) & low).astype(jnp.int32)


def _masks(batch_size: int, loss: np.ndarray, answer: np.ndarray) -> dict[str, jax.Array]:
    shape = (batch_size, loss.shape[0])
    return {"loss_mask": jnp.broadcast_to(jnp.asarray(loss), shape),
            "answer_mask": jnp.broadcast_to(jnp.asarray(answer), shape)}


def _repeated_tokens(d_vocab: int, length: int, n_repeats: int, bos: bool | str, loss_on: str,
                     min_length: int = 0, filler: str = "pad", sampling: str = "distinct",
                     no_filler: float = 0.5, no_filler_no_bos: float | None = None,
                     answer_weight: float = 1.0, early_weight: float = 1.0, early_end: int = 16):
    o = 1 if bos else 0
    seq_len = o + length * n_repeats
    if min_length > length:
        raise ValueError(f"task 'repeated_tokens': min_length={min_length} must be <= "
                         f"length={length} (0 turns it off)")
    weighted = (no_filler_no_bos, answer_weight, early_weight) != (None, 1.0, 1.0)
    mixed = sampling != "distinct" or bos == "mixed" or no_filler != 0.5 or weighted
    if min_length in (0, length) and mixed:
        raise ValueError(f"task 'repeated_tokens': sampling={sampling!r}, bos={bos!r}, "
                         f"no_filler={no_filler}, no_filler_no_bos={no_filler_no_bos}, "
                         f"answer_weight={answer_weight} and early_weight={early_weight} apply "
                         f"to a varying period; set min_length "
                         f"(1 <= min_length < length={length}), or "
                         "use the defaults sampling='distinct', no_filler=0.5 and bos=True/False "
                         "(a fixed period "
                         "already draws its tokens with replacement)")
    if min_length not in (0, length) and mixed:
        return _mixed_repeated_tokens(d_vocab, length, n_repeats, bos, loss_on, min_length,
                                      filler, sampling, no_filler, no_filler_no_bos,
                                      answer_weight, early_weight, early_end)
    if min_length in (0, length):
        answer = np.arange(seq_len - 1) >= o + length
        first = np.arange(seq_len - 1) < o + length - 1
        loss = np.ones(seq_len - 1, bool) if loss_on == "all" else answer

        def sample(key: jax.Array, batch_size: int) -> Batch:
            x = jax.random.randint(key, (batch_size, length), o, d_vocab, dtype=jnp.int32)
            tokens = jnp.tile(x, (1, n_repeats))  # [batch, length * n_repeats]
            if bos:
                tokens = jnp.concatenate([jnp.zeros((batch_size, 1), jnp.int32), tokens], axis=1)
            return {"tokens": tokens, **_masks(batch_size, loss, answer),
                    "first_mask": jnp.broadcast_to(jnp.asarray(first), (batch_size, seq_len - 1))}

        return sample, seq_len, d_vocab

    if length > d_vocab - 1:
        raise ValueError(f"task 'repeated_tokens': with min_length the {length} segment tokens are "
                         f"distinct ids from [1, d_vocab={d_vocab}); use length <= {d_vocab - 1}")
    body = length * n_repeats
    n_distinct = body - (n_repeats - 1) * min_length  # segment + filler tokens at the shortest L
    if filler in ("distinct", "mixed") and n_distinct > d_vocab - 1:
        raise ValueError(f"task 'repeated_tokens': filler='distinct' needs {n_distinct} distinct "
                         f"ids from [1, d_vocab={d_vocab}); raise min_length or d_vocab")

    def sample_variable(key: jax.Array, batch_size: int) -> Batch:
        k_len, k_seg, k_start = jax.random.split(key, 3)
        seg_len = jax.random.randint(k_len, (batch_size, 1), min_length, length + 1,
                                     dtype=jnp.int32)  # [batch, 1]
        # distinct tokens from [1, d_vocab): the first `length` of a random permutation per row
        u = jax.random.uniform(k_seg, (batch_size, d_vocab - 1))  # [batch, d_vocab - 1]
        seg = jnp.argsort(u, axis=1)[:, :length].astype(jnp.int32) + 1  # [batch, length]
        # where the first segment begins ("repeat": at 0, the segment repeats up to the end)
        if filler == "repeat":
            start = jnp.zeros_like(seg_len)
        elif filler == "mixed":  # no filler for about half the sequences, else a uniform amount
            most = n_repeats * (length - seg_len)  # [batch, 1]
            start = jnp.floor(jax.random.uniform(k_start, (batch_size, 1)) *
                              (2 * most + 1).astype(jnp.float32)).astype(jnp.int32) - most
            start = jnp.maximum(start, 0)
        else:
            start = n_repeats * (length - seg_len)  # [batch, 1]
        j = jnp.arange(body, dtype=jnp.int32)[None, :]  # [1, body]
        in_seg = j >= start  # [batch, body]
        if filler == "repeat":
            tokens = jnp.take_along_axis(seg, j % seg_len, axis=1)  # [batch, body]
        elif filler == "pad":
            idx = jnp.where(in_seg, (j - start) % seg_len, 0)  # [batch, body]
            tokens = jnp.where(in_seg, jnp.take_along_axis(seg, idx, axis=1), PAD)
        else:  # segment = perm[:L], filler = perm[L:L + start]: every token distinct but the repeats
            perm = jnp.argsort(u, axis=1).astype(jnp.int32) + 1  # [batch, d_vocab - 1]
            idx = jnp.where(in_seg, (j - start) % seg_len, seg_len + j)  # [batch, body]
            tokens = jnp.take_along_axis(perm, idx, axis=1)  # [batch, body]
        if bos:
            tokens = jnp.concatenate([jnp.zeros((batch_size, 1), jnp.int32), tokens], axis=1)
        i = jnp.arange(seq_len - 1, dtype=jnp.int32)[None, :]  # prediction i: token i + 1
        s0 = o + start  # [batch, 1]: position of the first segment token
        answer = i >= s0 + seg_len  # made at a token inside a repeat
        first = (i >= s0 - 1) & (i < s0 + seg_len - 1)  # of a first-segment token
        loss = jnp.ones_like(answer) if loss_on == "all" else answer
        return {"tokens": tokens, "loss_mask": loss, "answer_mask": answer, "first_mask": first}

    return sample_variable, seq_len, d_vocab


def _mixed_repeated_tokens(d_vocab: int, length: int, n_repeats: int, bos: bool | str,
                           loss_on: str, min_length: int, filler: str, sampling: str,
                           no_filler: float, no_filler_no_bos: float | None = None,
                           answer_weight: float = 1.0, early_weight: float = 1.0,
                           early_end: int = 16):
    """The varying-period sampler with ``sampling`` "replacement"/"mixed", ``bos="mixed"``,
    ``no_filler_no_bos`` or loss weights (see the module docstring). Every sequence is a body of
    ``seq_len`` tokens (filler, then the segment repeated cyclically to the end); a BOS row is
    ``[0] + body[:-1]``."""
    o = 1 if bos else 0
    body = length * n_repeats
    seq_len = o + body
    lo = 1 if sampling == "distinct" else 0  # the smallest content id
    n_ids = d_vocab - lo
    if filler == "pad" and sampling != "distinct":
        raise ValueError(f"task 'repeated_tokens': filler='pad' pads with token 0, which "
                         f"sampling={sampling!r} uses as a content token; use filler='mixed', "
                         "'distinct' or 'repeat'")
    # segment + filler tokens of the longest-filler sequence (shortest L), all read from one pool
    n_pool = seq_len - (n_repeats - 1) * min_length
    if sampling != "replacement" and n_pool > n_ids:
        raise ValueError(f"task 'repeated_tokens': sampling={sampling!r} draws sequences of "
                         f"{n_pool} distinct ids from [{lo}, d_vocab={d_vocab}); raise min_length "
                         "or d_vocab, or use sampling='replacement'")
    if sampling == "replacement" and length > d_vocab:
        raise ValueError(f"task 'repeated_tokens': length={length} > d_vocab={d_vocab}")

    def sample(key: jax.Array, batch_size: int) -> Batch:
        k_len, k_perm, k_draw, k_start, k_kind, k_bos = jax.random.split(key, 6)
        seg_len = jax.random.randint(k_len, (batch_size, 1), min_length, length + 1,
                                     dtype=jnp.int32)  # [batch, 1]
        if sampling == "replacement":
            pool = jax.random.randint(k_draw, (batch_size, n_pool), 0, d_vocab, dtype=jnp.int32)
        else:  # a random permutation of the ids per row: distinct tokens
            pool = random_permutations(k_perm, batch_size, n_ids)[:, :n_pool] + lo  # [batch, n_pool]
            if sampling == "mixed":  # half of the rows drawn with replacement instead
                draws = jax.random.randint(k_draw, (batch_size, n_pool), 0, d_vocab,
                                           dtype=jnp.int32)  # [batch, n_pool]
                with_replacement = jax.random.bernoulli(k_kind, 0.5, (batch_size, 1))
                pool = jnp.where(with_replacement, draws, pool)  # [batch, n_pool]
        n_body = seq_len  # the body fills the whole sequence; a BOS row drops its last token
        if bos == "mixed":
            has_bos = jax.random.bernoulli(k_bos, 0.5, (batch_size, 1))  # [batch, 1]
        else:
            has_bos = jnp.full((batch_size, 1), bool(bos))
        nf = no_filler if no_filler_no_bos is None else jnp.where(has_bos, no_filler,
                                                                   no_filler_no_bos)  # [batch, 1]
        if filler == "repeat":
            start = jnp.zeros_like(seg_len)
        elif filler == "mixed":  # no filler for no_filler of the sequences, else uniform
            most = n_repeats * (length - seg_len)  # [batch, 1]
            u = jax.random.uniform(k_start, (batch_size, 1))  # [batch, 1]
            amount = jnp.floor((u - nf) / (1.0 - nf) *
                               most.astype(jnp.float32)).astype(jnp.int32) + 1
            start = jnp.where(u < nf, 0, jnp.minimum(amount, most))
        else:  # "pad" / "distinct": the segment ends exactly n_repeats periods after its start
            start = n_repeats * (length - seg_len)  # [batch, 1]
        j = jnp.arange(n_body, dtype=jnp.int32)[None, :]  # [1, body]
        in_seg = j >= start  # [batch, body]
        # segment = pool[:L], filler = pool[L:L + start]
        idx = jnp.where(in_seg, (j - start) % seg_len, jnp.minimum(seg_len + j, n_pool - 1))
        tokens = jnp.take_along_axis(pool, idx, axis=1)  # [batch, body]
        if filler == "pad":
            tokens = jnp.where(in_seg, tokens, PAD)
        if bos == "mixed":
            shifted = jnp.concatenate([jnp.full((batch_size, 1), PAD, jnp.int32),
                                       tokens[:, :-1]], axis=1)  # [batch, seq_len]
            tokens = jnp.where(has_bos, shifted, tokens)
            offset = has_bos.astype(jnp.int32)  # [batch, 1]
        elif bos:
            tokens = jnp.concatenate([jnp.full((batch_size, 1), PAD, jnp.int32),
                                      tokens[:, :-1]], axis=1)
            offset = jnp.ones_like(seg_len)
        else:
            offset = jnp.zeros_like(seg_len)
        i = jnp.arange(seq_len - 1, dtype=jnp.int32)[None, :]  # prediction i: token i + 1
        s0 = offset + start  # [batch, 1]: position of the first segment token
        answer = i >= s0 + seg_len  # made at a token inside a repeat
        first = (i >= s0 - 1) & (i < s0 + seg_len - 1)  # of a first-segment token
        loss = jnp.ones_like(answer) if loss_on == "all" else answer
        if answer_weight != 1.0 or early_weight != 1.0:  # float weights instead of a bool mask
            w = jnp.where(i < early_end, early_weight, answer_weight)  # [1, seq_len - 1]
            loss = jnp.where(answer, w, loss.astype(jnp.float32))  # [batch, seq_len - 1]
        return {"tokens": tokens, "loss_mask": loss, "answer_mask": answer, "first_mask": first}

    return sample, seq_len, d_vocab


def _seq2seq(kind: str, n_symbols: int, length: int):
    seq_len = 2 * length + 1
    answer = np.arange(seq_len - 1) >= length  # predictions made at SEP, y_0 .. y_{n-2}

    def sample(key: jax.Array, batch_size: int) -> Batch:
        x = jax.random.randint(key, (batch_size, length), 0, n_symbols, dtype=jnp.int32)
        if kind == "copy":
            y = x
        elif kind == "reverse":
            y = x[:, ::-1]
        else:
            y = jnp.sort(x, axis=-1)
        sep = jnp.full((batch_size, 1), n_symbols, jnp.int32)
        tokens = jnp.concatenate([x, sep, y], axis=1)  # [batch, 2 * length + 1]
        return {"tokens": tokens, **_masks(batch_size, answer, answer)}

    return sample, seq_len, n_symbols + 1


def _modular_addition(p: int):
    answer = np.array([False, False, True])  # only the prediction made at "=" counts

    def sample(key: jax.Array, batch_size: int) -> Batch:
        ab = jax.random.randint(key, (batch_size, 2), 0, p, dtype=jnp.int32)
        c = (ab[:, 0:1] + ab[:, 1:2]) % p  # [batch, 1]
        eq = jnp.full((batch_size, 1), p, jnp.int32)
        tokens = jnp.concatenate([ab, eq, c], axis=1)  # [batch, 4]: a b = c
        return {"tokens": tokens, **_masks(batch_size, answer, answer)}

    return sample, 4, p + 1


# ----------------------------------------------------------------------------- registry
# name -> (builder, {option: default}); the defaults are the reference shapes.
TASKS: dict[str, tuple[Callable, dict[str, Any]]] = {
    "repeated_tokens": (_repeated_tokens,
                        {"d_vocab": 64, "length": 32, "n_repeats": 2, "bos": False,
                         "loss_on": "all", "min_length": 0, "filler": "pad",
                         "sampling": "distinct", "no_filler": 0.5, "no_filler_no_bos": None,
                         "answer_weight": 1.0, "early_weight": 1.0, "early_end": 16}),
    "copy": (lambda **o: _seq2seq("copy", **o), {"n_symbols": 16, "length": 8}),
    "reverse": (lambda **o: _seq2seq("reverse", **o), {"n_symbols": 16, "length": 8}),
    "sort": (lambda **o: _seq2seq("sort", **o), {"n_symbols": 16, "length": 8}),
    "modular_addition": (_modular_addition, {"p": 113}),
}
ALIASES = {"induction": "repeated_tokens", "repeat": "repeated_tokens", "modadd": "modular_addition",
           "addition": "modular_addition"}

_MIN = {"d_vocab": 2, "length": 1, "n_repeats": 2, "n_symbols": 2, "p": 2, "min_length": 0,
        "early_end": 0}
_WEIGHTS = ("answer_weight", "early_weight")  # loss weights: positive numbers, not fractions


def _check_option(task: str, name: str, value: Any, default: Any) -> Any:
    if name == "bos" and isinstance(value, str):
        if value != "mixed":
            raise ValueError(f"task {task!r}: option bos must be True, False or 'mixed', "
                             f"got {value!r}")
        return value
    if name == "no_filler_no_bos" and value is None:
        return None
    if name in ("no_filler_no_bos", *_WEIGHTS):
        default = 0.5  # a number, checked below (a fraction, or a weight)
    if isinstance(default, bool):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"task {task!r}: option {name} must be a bool, got {value!r}")
        return bool(value)
    if isinstance(default, int):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"task {task!r}: option {name} must be an int, got {value!r}")
        if value < _MIN[name]:
            raise ValueError(f"task {task!r}: option {name} must be >= {_MIN[name]}, got {value}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                          np.floating)):
            raise TypeError(f"task {task!r}: option {name} must be a number, got {value!r}")
        if name in _WEIGHTS:
            if not 0.0 < float(value) < float("inf"):  # NaN fails too
                raise ValueError(f"task {task!r}: option {name} is a loss weight and must be a "
                                 f"positive finite number, got {value!r}")
            return float(value)
        if not 0.0 <= float(value) < 1.0:  # NaN fails too
            raise ValueError(f"task {task!r}: option {name} is a fraction of the sequences and "
                             f"must be in [0, 1), got {value!r}")
        return float(value)
    if name == "filler" and value not in ("pad", "distinct", "repeat", "mixed"):
        raise ValueError(f"task {task!r}: option filler must be 'pad', 'distinct', 'repeat' or "
                         f"'mixed', got {value!r}")
    if name == "sampling" and value not in ("distinct", "replacement", "mixed"):
        raise ValueError(f"task {task!r}: option sampling must be 'distinct', 'replacement' or "
                         f"'mixed', got {value!r}")
    if name == "loss_on" and value not in ("all", "repeated"):
        raise ValueError(f"task {task!r}: option loss_on must be 'all' or 'repeated', "
                         f"got {value!r}")
    return value


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name with options overriding its defaults (see ``TASKS``).

    Unknown names and options, wrong option types and out-of-range values raise a clear error.
    """
    canonical = ALIASES.get(name, name)
    if canonical not in TASKS:
        names = sorted(TASKS) + sorted(ALIASES)
        close = difflib.get_close_matches(str(name), names, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))} "
                         f"(aliases: {', '.join(f'{a}->{t}' for a, t in ALIASES.items())}).{hint}")
    builder, defaults = TASKS[canonical]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"task {canonical!r} has no option(s) {unknown}; its options (with "
                         f"defaults) are {defaults}")
    opts = {k: _check_option(canonical, k, options.get(k, v), v) for k, v in defaults.items()}
    sampler, seq_len, d_vocab = builder(**opts)
    return Task(name=canonical, seq_len=seq_len, d_vocab=d_vocab,
                options=tuple(sorted(opts.items())), sampler=sampler)


def task_from_dict(d: dict[str, Any]) -> Task:
    """Inverse of ``Task.to_dict``."""
    d = dict(d)
    return get_task(d.pop("name"), **d)


# ----------------------------------------------------------------------------- token labels
def _symbol_name(i: int, n: int) -> str:
    """Symbols of copy/reverse/sort: letters a, b, ... while they last, else their ids."""
    return "abcdefghijklmnopqrstuvwxyz"[i] if n <= 26 else str(i)


def task_token_labels(task: Task) -> tuple[str, ...]:
    """Readable names for the ``task.d_vocab`` token ids.

    ``copy`` / ``reverse`` / ``sort``: the symbols are letters ``a, b, c, ...`` (their ids when
    there are more than 26) and the separator is ``SEP``. ``modular_addition``: the numbers
    ``0 .. p-1`` and ``=``. ``repeated_tokens``: the ids as digits, except token 0 where it is
    only ever a marker: ``BOS`` (with ``bos``) or ``PAD`` (the padding filler); where the task
    also draws 0 as an ordinary token (no BOS with a fixed period, or ``sampling`` other than
    "distinct") it stays ``0``, since the name must hold for every occurrence."""
    o = task.opts
    if task.name in ("copy", "reverse", "sort"):
        n = o["n_symbols"]
        return tuple(_symbol_name(i, n) for i in range(n)) + ("SEP",)
    if task.name == "modular_addition":
        return tuple(str(i) for i in range(o["p"])) + ("=",)
    labels = [str(i) for i in range(task.d_vocab)]
    if task.name == "repeated_tokens":
        varying = o["min_length"] not in (0, o["length"])
        zero_is_content = (o["sampling"] != "distinct") if varying else not o["bos"]
        if not zero_is_content:
            if o["bos"]:
                labels[PAD] = "BOS"
            elif varying and o["filler"] == "pad":
                labels[PAD] = "PAD"
    return tuple(labels)


def label_tokens(tokens: Int[Array, "*shape"], labels) -> list:
    """``tokens`` (an int array of any shape) as nested lists of names: ``labels[id]``, for a
    sequence of names indexed by id (``task.token_labels``). An id outside the table is an error
    naming it."""
    t = np.asarray(tokens)
    if t.size and (t.min() < 0 or t.max() >= len(labels)):
        bad = int(t.max()) if t.max() >= len(labels) else int(t.min())
        raise ValueError(f"token id {bad} has no label: the table names ids 0..{len(labels) - 1}")
    names = np.asarray([str(x) for x in labels] or [""], dtype=object)
    return names[t].tolist() if t.ndim else names[int(t)]


# ----------------------------------------------------------------------------- fixed-split tasks
@dataclasses.dataclass(frozen=True)
class ModularAdditionSplit:
    """The ``modular-addition`` task of Nanda et al. (2023): every pair ``(a, b)`` of ``[0, p)``,
    shown as the three tokens ``a b =`` (``=`` is token ``p``, so ``d_vocab = p + 1``), with the
    answer ``(a + b) mod p`` read from the logits at the last position (``d_vocab_out = p``), and a
    fixed random ``train_fraction`` of the p^2 pairs for training, the rest held out.

    Unlike the sampled ``modular_addition`` task (``a b = c``, random pairs each batch, for
    ``tinyinterp train``), the model never sees the held-out pairs, which is what grokking is
    about. Rows are in ``pair = a * p + b`` order (the order the Fourier analysis expects).

    ``tokens`` int32 [pair, 3]; ``labels`` int32 [pair]; ``is_train`` bool [pair];
    ``train_idx`` / ``test_idx`` int32 row indices (sorted); ``token_labels`` ["0", ..., "p-1", "="].
    """

    p: int
    train_fraction: float
    seed: int
    tokens: np.ndarray = dataclasses.field(repr=False, compare=False)
    labels: np.ndarray = dataclasses.field(repr=False, compare=False)
    is_train: np.ndarray = dataclasses.field(repr=False, compare=False)

    name = "modular-addition"
    seq_len = 3

    @property
    def d_vocab(self) -> int:
        """Input vocabulary: the p numbers and ``=``."""
        return self.p + 1

    @property
    def d_vocab_out(self) -> int:
        """Output classes: the p residues."""
        return self.p

    @property
    def eq_token(self) -> int:
        return self.p

    @property
    def token_labels(self) -> tuple[str, ...]:
        return tuple(str(i) for i in range(self.p)) + ("=",)

    @property
    def train_idx(self) -> np.ndarray:
        return np.flatnonzero(self.is_train).astype(np.int32)

    @property
    def test_idx(self) -> np.ndarray:
        return np.flatnonzero(~self.is_train).astype(np.int32)

    def describe(self, row: int) -> str:
        """One example in words, e.g. ``'3 + 5 = 8 (mod 7), train'``."""
        a, b, _ = (int(t) for t in self.tokens[row])
        split = "train" if self.is_train[row] else "test"
        return f"{a} + {b} = {int(self.labels[row])} (mod {self.p}), {split}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description; ``modular_addition_split(**d)`` rebuilds the same split."""
        return {"p": self.p, "train_fraction": self.train_fraction, "seed": self.seed}


def modular_addition_split(p: int = 113, train_fraction: float = 0.3,
                           seed: int = 0) -> ModularAdditionSplit:
    """All p^2 pairs ``a b =`` -> ``(a + b) mod p`` with a seeded train/test split (see
    ``ModularAdditionSplit``). ``floor(train_fraction * p^2)`` pairs train, chosen by a
    permutation from ``numpy.random.default_rng(seed)``: the same (p, fraction, seed) always gives
    the same split. Defaults are the paper's (p = 113, 30%)."""
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 2:
        raise ValueError(f"task 'modular-addition': p must be an int >= 2, got {p!r}")
    if not (isinstance(train_fraction, (int, float)) and 0.0 < train_fraction < 1.0):
        raise ValueError(f"task 'modular-addition': train_fraction must be in (0, 1) (a share of "
                         f"the p^2 pairs; both splits need examples), got {train_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"task 'modular-addition': seed must be an int >= 0, got {seed!r}")
    p = int(p)
    n_train = int(train_fraction * p * p)
    if not 1 <= n_train < p * p:
        raise ValueError(f"task 'modular-addition': train_fraction={train_fraction} of {p * p} pairs "
                         f"gives {n_train} training pairs; choose a fraction that leaves both "
                         "splits non-empty")
    a, b = np.divmod(np.arange(p * p, dtype=np.int32), np.int32(p))  # pair = a * p + b
    tokens = np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int32)  # [pair, 3]
    is_train = np.zeros(p * p, bool)
    is_train[np.random.default_rng(int(seed)).permutation(p * p)[:n_train]] = True
    for arr in (tokens, is_train):
        arr.setflags(write=False)
    labels = ((a + b) % p).astype(np.int32)
    labels.setflags(write=False)
    return ModularAdditionSplit(p=p, train_fraction=float(train_fraction), seed=int(seed),
                                tokens=tokens, labels=labels, is_train=is_train)
