"""tracr-compiled programs convert to HookedTransformers that compute what tracr computes, with the
program's computation graph as ground truth. Skipped (with the reason) without tracr-pypi."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

tracr = pytest.importorskip("tracr", reason="tracr is not installed (pip install 'tinyinterp[tracr]')")

from tracr.compiler import compiling, lib  # noqa: E402
from tracr.rasp import rasp  # noqa: E402

from tinyinterp import detectors  # noqa: E402
from tinyinterp.interop import from_tracr  # noqa: E402
from tinyinterp.testing import rasp_programs  # noqa: E402

VOCAB = {1, 2, 3}


def _compile(prog, max_seq_len=5, causal=True):
    with jax.numpy_dtype_promotion("standard"):  # tracr's own code mixes int and float
        return compiling.compile_rasp_to_model(prog, vocab=VOCAB, max_seq_len=max_seq_len,
                                               compiler_bos="BOS", causal=causal)


def _agree(assembled, conv, inputs):
    """Every layer's residual stream and the outputs equal tracr's own on ``inputs`` (sequences
    of one length, run as one batch through tracr's forward)."""
    toks = conv.encode(inputs)
    with jax.numpy_dtype_promotion("standard"):  # tracr's own code mixes int and float
        out = assembled.forward(assembled.params, jnp.asarray(toks))
    logits, cache = conv.model.run_with_cache(toks)
    for i, r in enumerate(out.transformer_output.residuals):  # after each sublayer
        name = f"blocks.{i // 2}.hook_resid_{'mid' if i % 2 == 0 else 'post'}"
        np.testing.assert_allclose(np.asarray(cache[name]), np.asarray(r), atol=1e-5,
                                   err_msg=name)
    got = np.asarray(logits)
    want = np.asarray(out.unembedded_output)  # argmax ids (categorical) or values (numerical)
    if conv.output_decoding is None:
        np.testing.assert_allclose(got[..., 0], want, atol=1e-5)
    else:
        np.testing.assert_array_equal(np.argmax(got, -1)[:, 1:], want[:, 1:])  # BOS: position 0
    # and the decoded values, as tracr's output encoder decodes them
    dec = assembled.output_encoder.decode
    assert [row[1:] for row in conv.decode(logits)] == [dec(w.tolist())[1:] if conv.output_decoding
                                                        else w.tolist()[1:] for w in want]


def test_shift_by_one_is_a_previous_token_head():
    """Aggregate(Select(indices, indices, q == k + 1), tokens): one head, found by the package's
    previous-token detector; the graph says it computes the program's Aggregate."""
    prog = rasp.categorical(rasp.Aggregate(
        rasp.Select(rasp.indices, rasp.indices, lambda k, q: q == k + 1), rasp.tokens))
    assembled = _compile(prog, max_seq_len=6)
    conv = from_tracr(assembled, prog)
    cfg = conv.model.cfg
    assert cfg.d_model != cfg.n_heads * cfg.d_head and cfg.normalization_type is None
    _agree(assembled, conv, [["BOS", 1, 2, 3, 1, 2, 3], ["BOS", 3, 3, 1, 2, 2, 1]])
    gt = conv.ground_truth
    (comp,) = gt.components
    assert (comp.kind, comp.op, comp.op_type) == ("head", prog.label, "Aggregate")
    assert (comp.name, "logits", "logits") in gt.edges and gt.output == prog.label
    toks = jnp.asarray(conv.encode([["BOS", 1, 2, 3, 1, 2, 3]]))
    scores = np.asarray(detectors.previous_token_scores(conv.model, toks, exclude_bos=True))
    np.testing.assert_array_equal(scores > 0.9, gt.head_mask())


def test_sort_graph_has_selector_width_and_k_composition():
    """make_sort_unique: SelectorWidth (a head and an MLP) feeds the sorting Aggregate's keys."""
    prog = lib.make_sort_unique(rasp.tokens, rasp.tokens)
    assembled = _compile(prog)
    conv = from_tracr(assembled, prog, attention_backend="xla")
    _agree(assembled, conv, [["BOS", 3, 1, 2], ["BOS", 2, 3, 1], ["BOS", 1, 3, 2]])
    gt = conv.ground_truth
    out = gt.component(gt.output)
    assert out.kind == "head" and out.op_type == "Aggregate"
    width = [c for c in gt.components if c.op_type == "SelectorWidth"]
    assert len(width) == 1 and width[0].kind == "mlp" and width[0].layer < out.layer
    assert (width[0].name, out.name, "k") in gt.edges


def test_inert_heads_change_nothing_and_zero_ablation_ranks_the_program_first():
    """with_inert_heads: the same outputs at every position, the distractor heads attend and write
    (their hook_result is not zero); on evaluate-methods' compiled program (the token two back:
    two composed shift heads) zero-ablating each head scores the program's heads above every inert
    one (recovery AUROC 1), direct logit attribution misses the first head (it acts only through
    the second), and random scores do not reach 1."""
    from tinyinterp import evaluate
    from tinyinterp import testing as T
    from tinyinterp.interop import with_inert_heads

    prog = lib.make_sort_unique(rasp.tokens, rasp.tokens)
    conv = from_tracr(_compile(prog), prog, attention_backend="xla")
    inert = with_inert_heads(conv, 2, seed=1)
    toks = jnp.asarray(conv.encode([["BOS", 3, 1, 2], ["BOS", 2, 3, 1]]))
    np.testing.assert_allclose(np.asarray(inert.model(toks)), np.asarray(conv.model(toks)),
                               atol=1e-5)
    H = conv.model.cfg.n_heads
    _, cache = inert.model.run_with_cache(toks)
    for layer in range(inert.model.cfg.n_layers):
        assert float(jnp.abs(cache[f"blocks.{layer}.attn.hook_result"][:, :, H:]).max()) > 0.1
    mask = inert.ground_truth.head_mask()
    assert mask.shape == (conv.model.cfg.n_layers, H + 2) and not mask[:, H:].any()
    with pytest.raises(ValueError, match="n_extra"):
        with_inert_heads(conv, 0)

    (_, model, toks, metric, mask), = evaluate._tracr_circuits()
    assert mask.sum() == 2 and mask[:, 0].all()  # one program head per layer, then inert ones
    want = np.asarray(toks)[:, -3]  # the token two back (value v: input id = output id = v - 1)
    np.testing.assert_array_equal(np.argmax(np.asarray(model(toks))[:, -1], -1), want)
    ablation = evaluate.head_scores("zero_ablation", model, toks, metric)
    assert T.check_recovers_planted(ablation, mask).measured["auroc"] == 1.0
    dla = evaluate.head_scores("direct_logit_attribution", model, toks, metric)
    assert dla[0, 0] == 0.0 and dla[1, 0] > 0.5
    rand = evaluate.head_scores("random (broken)", model, toks, metric)
    assert T.recovery_scores(rand, mask)[1] < 1.0


def test_numerical_program_and_errors():
    """A numerical Aggregate of a numerical Map: one output; a non-causal model is refused."""
    ones = rasp.numerical(rasp.Map(lambda x: 1 if x == 1 else 0, rasp.tokens))
    prog = rasp.numerical(rasp.Aggregate(rasp.Select(rasp.tokens, rasp.tokens,
                                                     rasp.Comparison.LEQ), ones, default=0))
    assembled = _compile(prog)
    conv = from_tracr(assembled, prog, attention_backend="xla")
    assert conv.model.cfg.d_vocab_out == 1 and conv.output_decoding is None
    _agree(assembled, conv, [["BOS", 1, 2, 1, 3], ["BOS", 3, 3, 2, 1]])
    assert {c.op_type for c in conv.ground_truth.components} == {"Map", "Aggregate"}
    assert (conv.ground_truth.component(ones.label).name,
            conv.ground_truth.component(prog.label).name, "v") in conv.ground_truth.edges
    with pytest.raises(ValueError, match="not in the compiled vocabulary"):
        conv.encode([["BOS", 7]])
    non_causal = _compile(prog, causal=False)
    with pytest.raises(ValueError, match="causal=True"):
        from_tracr(non_causal)


@settings(max_examples=2)
@given(rasp_programs(vocab=VOCAB, max_seq_len=4))
def test_drawn_programs_agree_with_tracr(compiled):
    """Small drawn RASP programs (Map / SequenceMap / Aggregate chains) convert exactly."""
    prog, assembled, inputs = compiled
    conv = from_tracr(assembled, prog, attention_backend="xla")
    _agree(assembled, conv, inputs)
    assert conv.ground_truth.output == prog.label
