"""Weight processing keeps log-probs, returns new params, and a folded model round-trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp import HookedTransformer, TransformerConfig, processing
from tinyinterp.checkpoint import load_model, save_model
from tinyinterp.params import flatten_params
from tinyinterp.testing import configs, models


def _logprobs(model, tokens):
    return jax.nn.log_softmax(model(tokens), axis=-1)


def _tokens(cfg, seed):
    return jax.random.randint(jax.random.key(seed), (2, cfg.n_ctx), 0, cfg.d_vocab, dtype=jnp.int32)


def _assert_same(before, after, scale=1.0):
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-4,
                               atol=1e-4 * max(1.0, scale))


# random small configs of every normalization type (few distinct shapes, so programs are reused)
CFGS = configs(act_fns=("gelu", "relu"), choices={"n_layers": [2], "n_heads": [2], "d_head": [3],
                                                  "d_mlp": [5], "d_vocab": [9], "n_ctx": [5]})
STEPS = ["fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
         "refactor_factored_attn_matrices"]


@settings(max_examples=16)
@given(models(CFGS), st.sampled_from(STEPS), st.integers(0, 2**16))
def test_each_processing_function_keeps_log_probs(model, step, seed):
    cfg = model.cfg
    tokens = _tokens(cfg, seed)
    before = _logprobs(model, tokens)
    flat_before = {k: np.asarray(v) for k, v in flatten_params(model.params).items()}
    fn = getattr(processing, step)
    if step == "center_writing_weights" and cfg.normalization_type not in ("LN", "LNPre"):
        with pytest.raises(ValueError, match="centre the residual"):
            fn(model.params, cfg)
        return
    params, new_cfg = fn(model.params, cfg)
    after = _logprobs(HookedTransformer(new_cfg, params), tokens)
    _assert_same(before, after, float(jnp.abs(before).max()))
    # the old params are untouched
    for k, v in flatten_params(model.params).items():
        np.testing.assert_array_equal(np.asarray(v), flat_before[k])
    if step == "fold_ln":
        expected = {"LN": "LNPre", "RMS": "RMSPre"}.get(cfg.normalization_type,
                                                         cfg.normalization_type)
        assert new_cfg.normalization_type == expected
    if step == "center_unembed":
        np.testing.assert_allclose(np.asarray(params["unembed"]["W_U"].mean(-1)), 0, atol=1e-6)
    if step == "fold_value_biases":
        assert not np.asarray(params["blocks"][0]["attn"]["b_V"]).any()


@settings(max_examples=12)
@given(models(CFGS), st.booleans(), st.integers(0, 2**16))
def test_process_weights_keeps_log_probs(model, refactor, seed):
    tokens = _tokens(model.cfg, seed)
    processed = processing.process_weights(model, refactor_factored_attn_matrices=refactor)
    before = _logprobs(model, tokens)
    _assert_same(before, _logprobs(processed, tokens), float(jnp.abs(before).max()))
    assert processed.cfg.normalization_type in ("LNPre", "RMSPre", None)


def test_folded_model_checkpoint_round_trips(tmp_path):
    cfg = TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=6,
                            d_mlp=12)
    model = HookedTransformer.from_config(cfg, 0)
    folded = processing.process_weights(model)
    assert folded.cfg.normalization_type == "LNPre" and "ln_final" not in folded.params
    save_model(folded, tmp_path / "folded")
    loaded = load_model(tmp_path / "folded")
    assert loaded.cfg == folded.cfg
    for k, v in flatten_params(folded.params).items():
        np.testing.assert_array_equal(np.asarray(flatten_params(loaded.params)[k]), np.asarray(v))
    tokens = _tokens(cfg, 1)
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(folded(tokens)))


def test_bad_input():
    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=6,
                            normalization_type="RMS")
    model = HookedTransformer.from_config(cfg, 0)
    with pytest.raises(ValueError, match="centre the residual"):
        processing.center_writing_weights(model.params, cfg)
    with pytest.raises(ValueError, match="do not match the config"):
        processing.fold_ln(model.params, cfg.replace(normalization_type="LN"))
    with pytest.raises(TypeError, match="True or False"):
        processing.process_weights(model, fold_ln="yes")
