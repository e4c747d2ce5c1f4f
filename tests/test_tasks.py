"""Synthetic tasks: the data is what each task says it is (tokens, targets, masks), for any seed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp.tasks import (
    TASKS,
    Task,
    get_task,
    induction_losses,
    induction_segments,
    per_token_loss,
    random_permutations,
    task_from_dict,
)

seeds = st.integers(0, 2**31 - 1)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _sample(task: Task, key, batch_size):
    return task.sample(key, batch_size)


def sample(task, seed, batch_size=8, jit=True):
    fn = _sample if jit else Task.sample
    batch = jax.device_get(fn(task, jax.random.key(seed), batch_size))
    toks, lm, am = batch["tokens"], batch["loss_mask"], batch["answer_mask"]
    assert toks.dtype == np.int32 and toks.shape == (batch_size, task.seq_len)
    assert lm.dtype == np.bool_ and lm.shape == (batch_size, task.seq_len - 1)
    assert am.dtype == np.bool_ and am.shape == (batch_size, task.seq_len - 1)
    assert toks.min() >= 0 and toks.max() < task.d_vocab
    return toks, lm, am


# Every distinct shape compiles once, so the shape options come from small sets and the seeds vary.
@settings(max_examples=40)
@given(seed=seeds, length=st.sampled_from([1, 12]), n_repeats=st.sampled_from([2, 3]),
       bos=st.booleans(), d_vocab=st.sampled_from([3, 50]),
       loss_on=st.sampled_from(["all", "repeated"]))
def test_repeated_tokens(seed, length, n_repeats, bos, d_vocab, loss_on):
    task = get_task("induction", length=length, n_repeats=n_repeats, bos=bos, d_vocab=d_vocab,
                    loss_on=loss_on)
    o = int(bos)
    assert task.name == "repeated_tokens" and task.seq_len == o + length * n_repeats
    toks, lm, am = sample(task, seed, jit=False)  # eager: one compile per shape is too slow here
    if bos:
        assert (toks[:, 0] == 0).all() and (toks[:, 1:] > 0).all()
    x = toks[:, o:o + length]
    for r in range(n_repeats):
        np.testing.assert_array_equal(toks[:, o + r * length:o + (r + 1) * length], x)
    # answer positions: predictions made inside a repeat, whose target the context determines
    i = np.arange(task.seq_len - 1)
    np.testing.assert_array_equal(am, np.broadcast_to(i >= o + length, am.shape))
    for b, j in zip(*np.nonzero(am), strict=True):
        earlier = np.nonzero(toks[b, :j] == toks[b, j])[0]  # previous occurrence(s) of the token
        assert toks[b, j + 1] in toks[b, earlier + 1]
    np.testing.assert_array_equal(lm, np.ones_like(lm) if loss_on == "all" else am)
    first, repeated = induction_segments(task)
    assert not (first & repeated).any() and (first | repeated).sum() == task.seq_len - 2


def _segment(row):
    """(s0, L) of a variable-period sequence, from its tokens alone: the first non-PAD token that
    occurred before starts the first repeat; its earlier occurrence starts the segment."""
    for j in range(1, len(row)):
        if row[j] != 0 and (row[:j] == row[j]).any():
            s0 = int(np.nonzero(row[:j] == row[j])[0][0])
            return s0, j - s0
    raise AssertionError(f"no repeat in {row}")


@settings(max_examples=40)
@given(seed=seeds, filler=st.sampled_from(["pad", "distinct", "repeat", "mixed"]),
       min_length=st.sampled_from([1, 5]), loss_on=st.sampled_from(["all", "repeated"]),
       bos=st.booleans())
def test_repeated_tokens_min_length(seed, filler, min_length, loss_on, bos):
    length, n_repeats, d_vocab = 12, 2, 32
    task = get_task("induction", length=length, n_repeats=n_repeats, d_vocab=d_vocab, bos=bos,
                    min_length=min_length, filler=filler, loss_on=loss_on)
    o = int(bos)
    assert task.seq_len == o + length * n_repeats
    batch = jax.device_get(task.sample(jax.random.key(seed), 16))
    toks, lm, am, fm = (batch[k] for k in ("tokens", "loss_mask", "answer_mask", "first_mask"))
    assert toks.dtype == np.int32 and toks.shape == (16, task.seq_len)
    assert toks.min() >= 0 and toks.max() < d_vocab
    if bos:
        assert (toks[:, 0] == 0).all()
    i = np.arange(task.seq_len - 1)
    for b, row in enumerate(toks):
        s0, L = _segment(row)
        assert min_length <= L <= length
        seg = row[s0:s0 + L]
        assert (seg > 0).all() and len(set(seg.tolist())) == L  # distinct, never PAD
        np.testing.assert_array_equal(row[s0:], seg[np.arange(task.seq_len - s0) % L])
        body_start = s0 - o  # filler tokens before the segment
        fill = row[o:s0]
        most = n_repeats * (length - L)
        if filler == "pad":
            assert body_start == most and (fill == 0).all()
        elif filler == "distinct":
            assert body_start == most
        elif filler == "repeat":
            assert body_start == 0
        else:
            assert 0 <= body_start <= most
        if filler in ("distinct", "mixed"):  # every token distinct except through the repeats
            assert (fill > 0).all() and len(set(fill.tolist()) | set(seg.tolist())) == len(fill) + L
        np.testing.assert_array_equal(am[b], i >= s0 + L)
        np.testing.assert_array_equal(fm[b], (i >= s0 - 1) & (i < s0 + L - 1))
        np.testing.assert_array_equal(lm[b], np.ones_like(lm[b]) if loss_on == "all" else am[b])
        for j in np.nonzero(am[b])[0]:  # every answer is determined by the earlier occurrence
            earlier = np.nonzero(row[:j] == row[j])[0]
            assert row[j + 1] in row[earlier + 1]


def test_repeated_tokens_min_length_period_and_start_vary():
    task = get_task("induction", min_length=8, filler="mixed")
    toks = np.asarray(task.sample(jax.random.key(0), 64)["tokens"])
    s0, lengths = np.array([_segment(r) for r in toks]).T
    assert len(set(lengths.tolist())) > 10  # the period varies: no positional shortcut
    assert 0.3 < np.mean(s0 == 0) < 0.7 and len(set(s0.tolist())) > 10
    # the default (min_length=0) is the fixed layout, unchanged
    fixed = get_task("induction")
    assert fixed.opts["min_length"] == 0 and fixed.opts["filler"] == "pad"
    t = np.asarray(fixed.sample(jax.random.key(0), 4)["tokens"])
    np.testing.assert_array_equal(t[:, :32], t[:, 32:])


def test_repeated_tokens_min_length_errors():
    with pytest.raises(ValueError, match="min_length"):
        get_task("induction", length=8, min_length=9)
    with pytest.raises(ValueError, match="filler"):
        get_task("induction", min_length=8, filler="zeros")
    with pytest.raises(ValueError, match="distinct"):
        get_task("induction", length=28, min_length=1, d_vocab=50, filler="distinct")
    with pytest.raises(ValueError, match="length <="):
        get_task("induction", length=40, min_length=8, d_vocab=32)


@settings(max_examples=30)
@given(seed=seeds, kind=st.sampled_from(["copy", "reverse", "sort"]),
       length=st.sampled_from([1, 7]), n_symbols=st.sampled_from([2, 30]))
def test_seq2seq(seed, kind, length, n_symbols):
    task = get_task(kind, length=length, n_symbols=n_symbols)
    assert task.seq_len == 2 * length + 1 and task.d_vocab == n_symbols + 1
    toks, lm, am = sample(task, seed, jit=False)
    x, sep, y = toks[:, :length], toks[:, length], toks[:, length + 1:]
    assert (sep == n_symbols).all() and (x < n_symbols).all()
    expected = {"copy": x, "reverse": x[:, ::-1], "sort": np.sort(x, axis=1)}[kind]
    np.testing.assert_array_equal(y, expected)
    # the predictions of y_0..y_{n-1} are made at positions length .. 2*length-1
    i = np.arange(task.seq_len - 1)
    np.testing.assert_array_equal(lm, np.broadcast_to(i >= length, lm.shape))
    np.testing.assert_array_equal(am, lm)


@settings(max_examples=30)
@given(seed=seeds, p=st.sampled_from([2, 7, 113]))
def test_modular_addition(seed, p):
    task = get_task("modular_addition", p=p)
    assert task.seq_len == 4 and task.d_vocab == p + 1
    toks, lm, am = sample(task, seed, batch_size=32, jit=False)
    a, b, eq, c = toks.T
    assert (a < p).all() and (b < p).all() and (eq == p).all()
    np.testing.assert_array_equal(c, (a + b) % p)
    np.testing.assert_array_equal(lm, np.broadcast_to([False, False, True], lm.shape))
    np.testing.assert_array_equal(am, lm)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_and_key_dependent(name):
    task = get_task(name)
    t1, _, _ = sample(task, 3, 16)
    t2, _, _ = sample(task, 3, 16)
    t3, _, _ = sample(task, 4, 16)
    np.testing.assert_array_equal(t1, t2)
    assert not np.array_equal(t1, t3)
    assert get_task(name) == task and hash(get_task(name)) == hash(task)
    assert task_from_dict(task.to_dict()) == task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_perfect_logits_score_one(name):
    """accuracy and loss agree with the targets: logits that put all mass on the next token give
    accuracy 1 and loss ~0; logits that avoid it give accuracy 0."""
    task = get_task(name)
    batch = _sample(task, jax.random.key(0), 8)
    nxt = jnp.concatenate([batch["tokens"][:, 1:], batch["tokens"][:, :1]], axis=1)
    good = 30.0 * jax.nn.one_hot(nxt, task.d_vocab, dtype=jnp.float32)
    bad = 30.0 * jax.nn.one_hot((nxt + 1) % task.d_vocab, task.d_vocab, dtype=jnp.float32)
    assert float(task.accuracy(good, batch)) == 1.0
    assert float(task.loss(good, batch)) < 1e-6
    assert float(task.accuracy(bad, batch)) == 0.0
    assert float(task.loss(bad, batch)) > 25.0


def test_per_token_loss_matches_uniform():
    tokens = jnp.zeros((2, 5), jnp.int32)
    logits = jnp.zeros((2, 5, 7), jnp.float32)
    np.testing.assert_allclose(per_token_loss(logits, tokens), np.full((2, 4), np.log(7)),
                               rtol=1e-6)


def test_induction_losses_split():
    task = get_task("induction", length=4, n_repeats=2, bos=True, d_vocab=10)  # seq_len 9
    per_tok = jnp.asarray(np.tile(np.arange(8, dtype=np.float32), (2, 1)))
    out = induction_losses(per_tok, task)
    # first: predictions 0..3 (tokens 1..4 minus the boundary at 4); repeated: 5..7
    assert float(out["loss_first"]) == pytest.approx(np.mean([0, 1, 2, 3]))
    assert float(out["loss_repeated"]) == pytest.approx(np.mean([5, 6, 7]))
    with pytest.raises(ValueError, match="repeated_tokens"):
        induction_losses(per_tok, get_task("copy"))


def test_bad_names_and_options():
    with pytest.raises(ValueError, match=r"unknown task 'revers'.*Did you mean 'reverse'"):
        get_task("revers")
    with pytest.raises(ValueError, match=r"no option\(s\) \['lenght'\].*length"):
        get_task("copy", lenght=3)
    with pytest.raises(ValueError, match="n_repeats must be >= 2"):
        get_task("induction", n_repeats=1)
    with pytest.raises(TypeError, match="length must be an int"):
        get_task("sort", length=2.5)
    with pytest.raises(TypeError, match="bos must be a bool"):
        get_task("induction", bos=1)
    with pytest.raises(ValueError, match="loss_on"):
        get_task("induction", loss_on="some")
    with pytest.raises(ValueError, match="p must be >= 2"):
        get_task("modular_addition", p=1)


def _segment_from_masks(row, am, fm):
    """(s0, L) of one row from its answer and first-segment masks (see the module docstring).
    The masks of (s0 = 0, L) and (s0 = 1, L - 1) are the same (prediction 0 is of a first-segment
    token either way); the tokens decide: the first is periodic from position 0."""
    a = int(np.argmax(am))  # the first prediction made inside a repeat: s0 + L
    count = int(fm.sum())  # L predictions of first-segment tokens (L - 1 when s0 = 0)
    if a - count != 1:
        return a - count, count
    t = np.arange(a, len(row))
    return (0, a) if np.array_equal(row[t], row[t - a]) else (1, a - 1)


@settings(max_examples=24)
@given(seed=seeds, sampling=st.sampled_from(["replacement", "mixed"]),
       bos=st.sampled_from([False, True, "mixed"]), filler=st.sampled_from(["mixed", "repeat"]))
def test_repeated_tokens_with_replacement_and_mixed_bos(seed, sampling, bos, filler):
    """The layouts the induction reproduction trains on: every id (0 included), tokens drawn with
    replacement (repeats inside the segment), BOS on some sequences, a varying period; each row
    is a filler then its segment repeated to the end, and the masks say where."""
    length, n_repeats, d_vocab, min_length = 12, 2, 40, 4
    task = get_task("induction", length=length, n_repeats=n_repeats, d_vocab=d_vocab, bos=bos,
                    min_length=min_length, filler=filler, sampling=sampling)
    o = 0 if bos is False else 1
    assert task.seq_len == o + length * n_repeats
    batch = jax.device_get(task.sample(jax.random.key(seed), 16))
    toks, am, fm = batch["tokens"], batch["answer_mask"], batch["first_mask"]
    assert toks.shape == (16, task.seq_len) and toks.min() >= 0 and toks.max() < d_vocab
    for b, row in enumerate(toks):
        s0, L = _segment_from_masks(row, am[b], fm[b])
        assert min_length <= L <= length
        if bos is True:
            assert row[0] == 0 and s0 >= 1
        if bos is False and filler == "repeat":
            assert s0 == 0
        t = np.arange(s0 + L, task.seq_len)
        np.testing.assert_array_equal(row[t], row[t - L])  # periodic from the segment on
        assert am[b].sum() >= (n_repeats - 1) * L - 1  # at least one full repeat is scored
        for j in np.nonzero(am[b])[0]:  # the next token followed an earlier occurrence
            earlier = np.nonzero(row[:j] == row[j])[0]
            assert row[j + 1] in row[earlier + 1]


def test_repeated_tokens_mixed_sampling_statistics():
    """sampling='mixed', bos='mixed': about half the rows start with BOS, about half draw their
    segment with replacement (a token recurs inside it in most of those), every id occurs as a
    content token, and the period and start vary."""
    task = get_task("induction", d_vocab=64, length=32, n_repeats=2, min_length=8,
                    filler="mixed", sampling="mixed", bos="mixed")
    batch = jax.device_get(task.sample(jax.random.key(0), 2000))
    toks, am, fm = batch["tokens"], batch["answer_mask"], batch["first_mask"]
    assert task.seq_len == 65
    segs = [_segment_from_masks(r, a, f) for r, a, f in zip(toks, am, fm, strict=True)]
    dup = np.array([len(set(r[s:s + L].tolist())) < L for r, (s, L) in zip(toks, segs, strict=True)])
    assert 0.3 < dup.mean() < 0.5, dup.mean()  # replacement rows with L >= 8 of 64 ids: mostly dup
    assert 0.45 < np.mean(toks[:, 0] == 0) < 0.58  # BOS (plus the odd content token 0)
    content = np.concatenate([r[s:] for r, (s, _) in zip(toks, segs, strict=True)])
    assert set(content.tolist()) == set(range(64))  # every id, 0 included
    assert len({L for _, L in segs}) == 25 and 0.3 < np.mean([s <= 1 for s, _ in segs]) < 0.7
    more = get_task("induction", d_vocab=64, length=32, n_repeats=2, min_length=8, bos=False,
                    filler="mixed", sampling="mixed", no_filler=0.75)
    b = jax.device_get(more.sample(jax.random.key(1), 2000))
    starts = [_segment_from_masks(r, a, f)[0]
              for r, a, f in zip(b["tokens"], b["answer_mask"], b["first_mask"], strict=True)]
    assert 0.72 < np.mean(np.array(starts) == 0) < 0.78  # no filler for a fraction no_filler


@settings(max_examples=5, deadline=None)
@given(seed=seeds, n=st.sampled_from([1, 2, 5, 63, 64, 1025]))
def test_random_permutations_are_uniform_permutations(seed, n):
    """Every row a permutation of 0..n-1 (packed-key sort up to 1024 ids, argsort beyond), the
    same for the same key, and each id equally likely in each place (chi-square over rows)."""
    rows = 4000 if n <= 64 else 3
    p = np.asarray(random_permutations(jax.random.key(seed), rows, n))
    assert p.shape == (rows, n) and p.dtype == np.int32
    np.testing.assert_array_equal(np.sort(p, axis=1), np.broadcast_to(np.arange(n), p.shape))
    np.testing.assert_array_equal(p, np.asarray(random_permutations(jax.random.key(seed), rows, n)))
    if 2 <= n <= 64:
        for place in (0, n - 1):
            counts = np.bincount(p[:, place], minlength=n)
            chi2 = ((counts - rows / n) ** 2 / (rows / n)).sum()
            assert chi2 < (n - 1) + 6 * np.sqrt(2 * (n - 1)), (place, counts)  # ~6 sigma


def test_repeated_tokens_loss_weights_and_no_filler_without_bos():
    """answer_weight / early_weight: loss_mask holds float weights (early_weight on the answers
    before early_end, answer_weight on the later ones, 1 elsewhere), so the task's loss is the
    weighted mean; no_filler_no_bos sets the no-filler share of the rows without BOS only; the
    tokens and masks are those of the unweighted task from the same key."""
    kw = dict(d_vocab=64, length=32, n_repeats=2, min_length=8, filler="mixed", sampling="mixed",
              bos="mixed", no_filler=0.5)
    plain = jax.device_get(get_task("induction", **kw).sample(jax.random.key(2), 2000))
    task = get_task("induction", **kw, answer_weight=2.0, early_weight=6.0, early_end=16)
    b = jax.device_get(task.sample(jax.random.key(2), 2000))
    for k in ("tokens", "answer_mask", "first_mask"):
        np.testing.assert_array_equal(b[k], plain[k])
    w, am = b["loss_mask"], b["answer_mask"]
    assert w.dtype == np.float32 and plain["loss_mask"].dtype == bool
    i = np.broadcast_to(np.arange(w.shape[1]), w.shape)
    np.testing.assert_array_equal(w, np.where(am, np.where(i < 16, 6.0, 2.0), 1.0))
    assert am[:, :16].any()  # some early answers exist to weight
    logits = jax.random.normal(jax.random.key(3), (8, 65, 64))
    nll = np.asarray(per_token_loss(logits, b["tokens"][:8]), np.float64)
    want = (nll * w[:8]).sum() / w[:8].sum()
    np.testing.assert_allclose(float(task.loss(logits, {k: v[:8] for k, v in b.items()})), want,
                               rtol=1e-5)
    for bos, share in ((False, 0.95), (True, 0.5)):  # no_filler_no_bos, or no_filler with BOS
        nb = jax.device_get(get_task("induction", **{**kw, "bos": bos}, no_filler_no_bos=0.95)
                            .sample(jax.random.key(4), 2000))
        starts = np.array([_segment_from_masks(r, a, f)[0] - bos for r, a, f in
                           zip(nb["tokens"], nb["answer_mask"], nb["first_mask"], strict=True)])
        assert abs(np.mean(starts == 0) - share) < 0.035, (bos, np.mean(starts == 0))


def test_repeated_tokens_sampling_errors():
    with pytest.raises(ValueError, match="token 0"):
        get_task("induction", min_length=8, sampling="replacement", filler="pad")
    with pytest.raises(ValueError, match="min_length"):
        get_task("induction", sampling="mixed")
    with pytest.raises(ValueError, match="min_length"):
        get_task("induction", bos="mixed")
    with pytest.raises(ValueError, match="sampling"):
        get_task("induction", min_length=8, filler="mixed", sampling="sometimes")
    with pytest.raises(ValueError, match="bos"):
        get_task("induction", min_length=8, filler="mixed", bos="maybe")
    with pytest.raises(ValueError, match="no_filler"):
        get_task("induction", min_length=8, filler="mixed", no_filler=float("nan"))
    with pytest.raises(ValueError, match="no_filler"):
        get_task("induction", min_length=8, filler="mixed", no_filler=1.0)
    with pytest.raises(ValueError, match="distinct ids"):
        get_task("induction", d_vocab=16, min_length=8, filler="mixed", sampling="mixed")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="answer_weight"):
            get_task("induction", min_length=8, filler="mixed", answer_weight=bad)
    with pytest.raises(TypeError, match="early_weight"):
        get_task("induction", min_length=8, filler="mixed", early_weight="2")
    with pytest.raises(ValueError, match="no_filler_no_bos"):
        get_task("induction", min_length=8, filler="mixed", no_filler_no_bos=1.0)
    with pytest.raises(ValueError, match="early_end"):
        get_task("induction", min_length=8, filler="mixed", early_end=-1)
    with pytest.raises(ValueError, match="min_length"):  # weights need a varying period
        get_task("induction", answer_weight=2.0)
