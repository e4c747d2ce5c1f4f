"""The public property checks pass on correct methods and fail, readably, on broken ones; the
faithfulness curves and the strategies do what they say."""

import functools

import jax
import numpy as np
import pytest
from hypothesis import given, settings

from tinyinterp import attribution as A
from tinyinterp import testing as T
from tinyinterp.evaluate import head_scores, random_attributions, sign_flipped_gradient_x_input
from tinyinterp.planted import linear_model, planted_model


def ig(model, tokens, metric):
    return A.integrated_gradients(model, tokens, metric, steps=2)  # exact on a linear model


@functools.cache
def _setup():
    # the averaging head in layer 0, where the broken method flips the gradient's sign
    lm = linear_model(n_layers=2, n_heads=2, placement=(0, 1), n_features=5, n_chosen=3,
                      distractor_scale=0.3, seed=3, attention_backend="xla")
    toks = jax.random.randint(jax.random.key(0), (3, lm.cfg.n_ctx), 0, lm.cfg.d_vocab)
    dummy = np.zeros(lm.cfg.d_model, bool)
    dummy[list(lm.ground_truth.info["dummy"])] = True
    return lm, toks, dummy


def _run(check, method):
    lm, toks, dummy = _setup()
    f, g = A.logit(2), A.logit(5)
    extra = {"dummy": (dummy,), "linearity": (g,)}.get(check, ())
    fn = getattr(T, f"check_{check}")
    return fn(method, lm.model, toks, f, *extra, raise_on_failure=False)


# (check, a correct method that passes, broken methods that must fail)
CASES = [
    ("completeness", ig, [random_attributions, sign_flipped_gradient_x_input]),
    ("sensitivity", ig, [random_attributions, sign_flipped_gradient_x_input]),
    ("dummy", A.gradient_x_input, [random_attributions]),
    ("linearity", A.gradient_x_input, [random_attributions]),
    ("implementation_invariance", A.gradient_x_input, [sign_flipped_gradient_x_input]),
    ("input_invariance", A.saliency, [sign_flipped_gradient_x_input]),
    ("model_randomisation", A.saliency, [random_attributions]),
]


@pytest.mark.parametrize("check,good,broken", CASES, ids=[c[0] for c in CASES])
def test_check_passes_on_a_correct_method_and_fails_on_broken_ones(check, good, broken):
    ok = _run(check, good)
    assert ok.passed, ok.message
    for b in broken:
        bad = _run(check, b)
        assert not bad.passed, bad.message
        assert bad.method == b.__name__ and "FAILED" in bad.message and bad.measured


def test_blind_spots_are_real_and_every_check_catches_a_broken_method():
    """evaluate.BLIND_SPOTS names the (broken method, check) pairs a check cannot catch because
    the broken method has that property: each of them passes; every other pair fails. So every
    check fails on at least one broken method, and each broken method fails most checks."""
    from tinyinterp.evaluate import BLIND_SPOTS, BROKEN

    names = {f: n for n, f in BROKEN.items()}
    checks = [c[0] for c in CASES]
    for method in (random_attributions, sign_flipped_gradient_x_input):
        for check in checks:
            res = _run(check, method)
            assert res.passed == ((names[method], check) in BLIND_SPOTS), (check, res.message)
    assert all(any((b, c) not in BLIND_SPOTS for b in BROKEN) for c in checks)


def test_known_failures_of_correct_methods_are_reported():
    """The checks see what the papers say: gradient x input is not input invariant (Kindermans et
    al.), saliency is not complete."""
    assert not _run("input_invariance", A.gradient_x_input).passed
    assert not _run("completeness", A.saliency).passed


def test_failure_raises_a_readable_assertion_with_the_numbers():
    lm, toks, _ = _setup()
    with pytest.raises(T.CheckFailed) as e:
        T.check_completeness(random_attributions, lm.model, toks, A.logit(2))
    assert isinstance(e.value, AssertionError)
    assert "check_completeness FAILED for random_attributions" in str(e.value)
    assert e.value.result.measured["max_abs_error"] > 0.1
    res = T.check_completeness(ig, lm.model, toks, A.logit(2))
    assert res and res.measured["max_abs_error"] < 1e-4


def test_recovers_planted_heads():
    """Zero-ablating each head finds the planted induction circuit (both heads); random scores do
    not."""
    pm = planted_model(["induction"], d_vocab=6, n_ctx=10, n_layers=2, n_heads=3, seed=5,
                       attention_backend="xla")
    toks = jax.numpy.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], [5, 3, 1, 0, 2, 5, 3, 1, 0, 2]])
    target = jax.numpy.asarray(np.argmax(pm.expected_logits(toks)[:, -1], -1))
    mask = pm.ground_truth.head_mask()
    good = T.check_recovers_planted(head_scores("zero_ablation", pm.model, toks, A.logit(target)),
                                    mask)
    assert good.measured["auroc"] == 1.0 and good.measured["top_k_recall"] == 1.0
    bad = T.check_recovers_planted(-mask.astype(float), mask, method="planted last",
                                   raise_on_failure=False)
    assert not bad.passed and bad.measured["auroc"] == 0.0 and "planted last" in bad.message
    assert T.recovery_scores([3.0, 1.0, 2.0, 0.0], [True, False, True, False]) == (1.0, 1.0)


def test_faithfulness_curves():
    """Ends of the curves are f(x) and f(baseline); the exact attribution deletes better than its
    reverse."""
    lm, toks, _ = _setup()
    f = A.logit(2)
    exact = lm.expected_attribution(toks, 2)
    good = T.faithfulness_curves(lm.model, toks, f, exact, baseline_token=0)
    worst = T.faithfulness_curves(lm.model, toks, f, -exact, baseline_token=0)
    fx = np.asarray(f(lm.model(toks), toks))
    fb = np.asarray(f(lm.model(np.zeros_like(toks)), toks))
    np.testing.assert_allclose(good.deletion[:, 0], fx, atol=1e-5)
    np.testing.assert_allclose(good.deletion[:, -1], fb, atol=1e-5)
    np.testing.assert_allclose(good.insertion[:, 0], fb, atol=1e-5)
    np.testing.assert_allclose(good.insertion[:, -1], fx, atol=1e-5)
    assert np.all(good.aopc_deletion >= worst.aopc_deletion)


@settings(max_examples=2)
@given(T.linear_models())
def test_integrated_gradients_is_complete_on_drawn_linear_models(lm):
    """The README's example: a check inside a hypothesis test."""
    toks = jax.random.randint(jax.random.key(1), (2, lm.cfg.n_ctx), 0, lm.cfg.d_vocab)
    T.check_completeness(ig, lm.model, toks, A.logit(0), rtol=1e-3)


@settings(max_examples=5)
@given(T.clean_corrupted(linear_model().cfg, max_changed=3))
def test_clean_corrupted_differ_exactly_at_the_positions(pair):
    clean, corrupted, positions = pair
    differs = np.asarray(clean != corrupted)
    want = np.zeros(differs.shape[1], bool)
    want[list(positions)] = True
    assert (differs == want[None]).all()
