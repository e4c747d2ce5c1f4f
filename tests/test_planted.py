"""Planted-circuit models compute exactly what their ground truth says, and the package's
detectors find exactly the planted heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp import attribution as A
from tinyinterp import detectors
from tinyinterp.planted import HEAD_KINDS, linear_model, planted_model, superposition_model
from tinyinterp.testing import linear_models, planted_models, superposition_models


def _tokens(cfg, seed, batch=3):
    return jax.random.randint(jax.random.key(seed), (batch, cfg.n_ctx), 0, cfg.d_vocab,
                              dtype=jnp.int32)


def _repeated(cfg, seed, batch=4, repeats=3, period=4):
    """Distinct tokens in a period, repeated: every query after the first period has exactly one
    earlier occurrence of its token (per period)."""
    period = min(period, cfg.d_vocab, cfg.n_ctx // repeats)
    keys = jax.random.split(jax.random.key(seed), batch)
    rows = [jax.random.permutation(k, cfg.d_vocab)[:period] for k in keys]
    return jnp.stack([jnp.tile(r, repeats) for r in rows]).astype(jnp.int32)


@settings(max_examples=5)
@given(planted_models(attn_only=None), st.integers(0, 2**31 - 1))
def test_planted_heads_compute_their_ground_truth(pm, seed):
    """Every planted head's pattern and the logits equal the numpy reference on random tokens."""
    toks = _tokens(pm.cfg, seed)
    logits, cache = pm.model.run_with_cache(toks)
    np.testing.assert_allclose(np.asarray(logits), pm.expected_logits(toks), atol=1e-5)
    for (layer, head), want in pm.expected_patterns(toks).items():
        got = np.asarray(cache["pattern", layer][:, head])
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"L{layer}H{head}")
    # the prediction (argmax) is the circuit's wherever the reference has a unique maximum
    ref = pm.expected_logits(toks)
    top2 = np.sort(ref, -1)[..., -2:]
    unique = top2[..., 1] - top2[..., 0] > 1e-3
    assert np.array_equal(np.argmax(np.asarray(logits), -1)[unique], np.argmax(ref, -1)[unique])


def test_induction_circuit_predicts_the_token_after_the_earlier_occurrence():
    pm = planted_model(["induction"], d_vocab=6, n_ctx=12, n_layers=3, n_heads=2, seed=4,
                       distractor_scale=0.5, attention_backend="xla")
    toks = _repeated(pm.cfg, 0, repeats=2, period=6)  # 6 distinct tokens, twice
    pred = np.asarray(jnp.argmax(pm.model(toks), -1))
    # in the second period, position i predicts token i + 1 (the one that followed it before)
    np.testing.assert_array_equal(pred[:, 6:-1], np.asarray(toks)[:, 7:])
    gt = pm.ground_truth
    (pt,), (ind,) = gt.heads_of("previous_token"), gt.heads_of("induction")
    assert pt.layer < ind.layer and (pt.label, ind.label, "k") in gt.edges
    assert ("k", "prev") in ind.reads and pt.writes == "prev"


@settings(max_examples=4)
@given(planted_models(kinds=list(HEAD_KINDS), d_vocab=(4, 5), n_ctx=(12,)),
       st.integers(0, 2**31 - 1))
def test_detectors_find_exactly_the_planted_heads(pm, seed):
    """On random tokens of period 4 repeated 3 times (so 2/3 of the queries have an earlier
    occurrence), the heads scoring > 0.5 are exactly the planted ones of each kind:
    previous-token, induction, duplicate-token; the OV copying score is 1 exactly at the heads
    whose output the unembedding reads."""
    gt = pm.ground_truth
    toks = _repeated(pm.cfg, seed)
    assert toks.shape[1] == 12 and len(set(np.asarray(toks)[0, :4].tolist())) == 4
    for kind, score in (("previous_token", detectors.previous_token_scores),
                        ("induction", detectors.induction_scores),
                        ("duplicate_token", detectors.duplicate_token_scores)):
        s = np.asarray(score(pm.model, toks))
        np.testing.assert_array_equal(s > 0.5, gt.head_mask([kind]), err_msg=f"{kind}: {s}")
    copying = np.asarray(detectors.copying_scores(pm.model))
    readers = np.zeros_like(gt.head_mask())
    for h in gt.heads:
        readers[h.layer, h.head] = h.writes in gt.info["readout"]
    np.testing.assert_array_equal(np.nan_to_num(copying, nan=0.0) > 0.99, readers)


def test_placement_is_honoured_and_checked():
    pm = planted_model(["duplicate_token", "copying"], n_layers=2, n_heads=3,
                       placement={"copying": (0, 2), "duplicate_token": (1, 0)})
    assert {(h.kind, h.layer, h.head) for h in pm.ground_truth.heads} == {
        ("copying", 0, 2), ("duplicate_token", 1, 0)}
    with pytest.raises(ValueError, match="earlier layer"):
        planted_model(["induction"], n_layers=2, placement={"induction": (0, 0),
                                                           "previous_token": (1, 0)})
    with pytest.raises(ValueError, match="subset"):
        planted_model(["bigram"])
    with pytest.raises(ValueError, match="share a slot"):
        planted_model(["copying", "duplicate_token"],
                      placement={"copying": (0, 0), "duplicate_token": (0, 0)})


@settings(max_examples=3)
@given(linear_models(attn_only=None), st.integers(0, 2**31 - 1))
def test_linear_model_output_and_attribution_are_known(lm, seed):
    """The logits are the known linear function; integrated gradients and gradient x input from a
    zero baseline equal the closed-form attribution; the dummy coordinates get exactly 0."""
    toks = _tokens(lm.cfg, seed, batch=2)
    np.testing.assert_allclose(np.asarray(lm.model(toks)), lm.expected_logits(toks), atol=1e-5)
    target = int(seed % lm.cfg.d_vocab_out)
    want = lm.expected_attribution(toks, target)
    ig = A.integrated_gradients(lm.model, toks, A.logit(target), steps=2)
    np.testing.assert_allclose(np.asarray(ig.values), want, atol=1e-5)
    dummy = np.zeros(lm.cfg.d_model, bool)  # the input's coordinates the output ignores
    dummy[list(lm.ground_truth.info["dummy"])] = True
    g = A.gradient_x_input(lm.model, toks, A.logit(target))
    np.testing.assert_allclose(np.asarray(g.values), want, atol=1e-5)
    assert np.all(np.asarray(g.values)[..., dummy] == 0.0)


@settings(max_examples=3)
@given(superposition_models(), st.integers(0, 2**31 - 1))
def test_superposition_neurons_hold_the_known_features(sm, seed):
    """hook_post of the planted layer is exactly b_in + features(token) @ F, with more features
    than neurons, unit feature directions, and the logits read from it."""
    info = sm.ground_truth.info
    F = info["feature_directions"]
    assert F.shape[0] > F.shape[1]
    np.testing.assert_allclose(np.linalg.norm(F, axis=1), 1.0, rtol=1e-6)
    toks = _tokens(sm.cfg, seed)
    logits, cache = sm.model.run_with_cache(toks)
    feats = info["token_features"][np.asarray(toks)]  # [batch, pos, n_features]
    want = info["b_in"] + feats @ F
    np.testing.assert_allclose(np.asarray(cache[f"blocks.{info['layer']}.mlp.hook_post"]), want,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), sm.expected_logits(toks), atol=1e-5)
    assert sm.ground_truth.neuron_mask()[info["layer"]].all()


def test_distractors_have_no_effect_and_scale_as_asked():
    """Re-drawing every distractor (another seed for the same placement) leaves the logits
    unchanged; the distractors' weights have the chosen scale."""
    kw = dict(d_vocab=5, n_ctx=8, n_layers=2, n_heads=3, attn_only=False,
              placement={"copying": (1, 1)})
    a = planted_model(["copying"], seed=1, distractor_scale=0.4, **kw)
    b = planted_model(["copying"], seed=2, distractor_scale=2.0, **kw)
    toks = _tokens(a.cfg, 0)
    np.testing.assert_allclose(np.asarray(a.model(toks)), np.asarray(b.model(toks)), atol=1e-5)
    w = np.asarray(a.model.params["blocks"][0]["attn"]["W_Q"])
    assert 0.3 < w.std() < 0.5
    lm = linear_model(n_layers=1, n_heads=1, seed=0)
    assert lm.ground_truth.head_mask().all()
    sm = superposition_model(n_features=5, d_mlp=2, seed=0)
    assert not sm.ground_truth.head_mask().any()
