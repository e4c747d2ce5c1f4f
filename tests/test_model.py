"""The forward pass and its hooks: properties users rely on, over random small configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyinterp
from tinyinterp import HookedTransformer, TransformerConfig
from tinyinterp.interop import from_transformer_lens_state_dict, to_transformer_lens_state_dict
from tinyinterp.params import param_shapes
from tinyinterp.testing import model_and_tokens, pooled_model_and_tokens

REF_CFG = TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=64, n_ctx=64,
                            attn_only=True, normalization_type="LN")


def assert_close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# Module-level jitted runners with hashable hooks: jit reuses their compiled programs across
# hypothesis examples that share a config (the pooled strategy), instead of compiling per example.
def identity(v, *, name):
    return v


class ZeroHead:
    """Hook zeroing one head of hook_z ([batch, pos, head, d_head]); hashable, so it can be static."""

    def __init__(self, head):
        self.head = head

    def __call__(self, z, *, name):
        return z.at[:, :, self.head].set(0.0)

    def __eq__(self, other):
        return isinstance(other, ZeroHead) and other.head == self.head

    def __hash__(self):
        return hash(("ZeroHead", self.head))


@functools.partial(jax.jit, static_argnames=("hooks", "return_type"))
def run_hooked(model, tokens, hooks, return_type="logits"):
    return model.run_with_hooks(tokens, fwd_hooks=list(hooks), return_type=return_type)


@functools.partial(jax.jit, static_argnames=("name",))
def run_plus(model, tokens, name, delta):
    """Logits with ``delta`` added at hook point ``name``."""
    def add(v, *, name):
        return v + delta
    return model.run_with_hooks(tokens, fwd_hooks=[(name, add)])


ALL = lambda n: True  # noqa: E731  (one object, so the hooks tuple below hashes the same)


# ----------------------------------------------------------------------------- hooks
@settings(max_examples=5)
@given(pooled_model_and_tokens())
def test_identity_hooks_change_nothing(mt):
    model, tokens = mt
    clean = model(tokens)
    hooked = run_hooked(model, tokens, ((ALL, identity),))
    # Hooking every point materialises the pattern (unfused path): equal to float32 rounding.
    assert_close(hooked, clean, rtol=1e-4, atol=1e-4)
    cached, cache = model.run_with_cache(tokens)
    assert_close(cached, hooked, rtol=1e-5, atol=1e-5)  # two compiled programs: reassociation
    assert list(cache) == model.hook_names


@settings(max_examples=8)
@given(pooled_model_and_tokens(), st.data())
def test_head_ablation_through_hook_z_equals_subtracting_its_result(mt, data):
    """Zeroing head h's z at layer l removes exactly that head's hook_result from hook_attn_out."""
    model, tokens = mt
    cfg = model.cfg
    layer = data.draw(st.integers(0, cfg.n_layers - 1), label="layer")
    head = data.draw(st.integers(0, cfg.n_heads - 1), label="head")
    ablated = run_hooked(model, tokens, ((f"blocks.{layer}.attn.hook_z", ZeroHead(head)),))
    _, cache = model.run_with_cache(tokens, names_filter=[f"blocks.{layer}.attn.hook_result"])
    head_out = cache[f"blocks.{layer}.attn.hook_result"][:, :, head]  # [batch, pos, d_model]
    by_hand = run_plus(model, tokens, f"blocks.{layer}.hook_attn_out", -head_out)
    assert_close(ablated, by_hand, rtol=1e-4, atol=1e-4)


def test_hooks_on_one_point_compose_in_order():
    model = HookedTransformer.from_config(REF_CFG, seed=0)
    tokens = jnp.arange(10, dtype=jnp.int32)[None]
    name = "blocks.0.hook_resid_pre"
    seen = []

    def first(v, *, name):
        seen.append("first")
        return v * 2.0

    def second(v, *, name):
        seen.append("second")
        return v + 1.0

    @jax.jit
    def run(m, t):
        _, c = m.run_with_cache(t, names_filter=[name], fwd_hooks=[(name, first), (name, second)])
        return dict(c)

    cache = run(model, tokens)
    _, clean = model.run_with_cache(tokens, names_filter=[name])
    assert seen == ["first", "second"]
    assert_close(cache[name], clean[name] * 2.0 + 1.0, rtol=0, atol=1e-6)


def test_hook_filters_by_list_and_predicate_and_receive_their_name():
    model = HookedTransformer.from_config(REF_CFG, seed=0)
    tokens = jnp.arange(12, dtype=jnp.int32)[None]
    names_seen = []

    def record(v, *, name):
        names_seen.append(name)
        return v

    model.run_with_hooks(tokens, fwd_hooks=[(["blocks.0.attn.hook_q", "blocks.1.attn.hook_k"],
                                             record),
                                            (lambda n: n.endswith("hook_pattern"), record)])
    assert names_seen == ["blocks.0.attn.hook_q", "blocks.0.attn.hook_pattern",
                          "blocks.1.attn.hook_k", "blocks.1.attn.hook_pattern"]


@settings(max_examples=8)
@given(pooled_model_and_tokens(), st.data())
def test_names_filter_caches_exactly_the_names_asked_for(mt, data):
    model, tokens = mt
    names = data.draw(st.lists(st.sampled_from(model.hook_names), unique=True, max_size=6))
    _, cache = model.run_with_cache(tokens, names_filter=names)
    assert set(cache) == set(names)
    _, pred_cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    assert set(pred_cache) == set(names)
    _, full = model.run_with_cache(tokens)
    for n in names:  # the filtered run computes the same values
        assert_close(cache[n], full[n], rtol=1e-4, atol=1e-4)


@settings(max_examples=3)
@given(pooled_model_and_tokens())
def test_jit_and_eager_agree(mt):
    model, tokens = mt
    hooks = ((f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern", halve),)
    logits_e, loss_e = model.run_with_hooks(tokens, fwd_hooks=list(hooks), return_type="both")
    logits_j, loss_j = run_hooked(model, tokens, hooks, return_type="both")
    assert_close(logits_j, logits_e, rtol=1e-4, atol=1e-4)
    assert_close(loss_j, loss_e, rtol=1e-5, atol=1e-5)


def halve(v, *, name):
    return v * 0.5


def _ln1_output(model, cache, layer):
    """The attention input of ``layer`` rebuilt from the cache (TL: hook_normalized before w, b)."""
    kind = model.cfg.normalization_type
    b = f"blocks.{layer}"
    if kind is None:
        return cache[f"{b}.hook_resid_pre"]
    x = cache[f"{b}.ln1.hook_normalized"]
    ln = model.params["blocks"][layer].get("ln1", {})  # absent for LNPre / RMSPre
    if kind == "LN":
        return x * ln["w"][None, None] + ln["b"][None, None]
    if kind == "RMS":
        return x * ln["w"][None, None]
    return x


@pytest.mark.parametrize("backend", ["auto", "xla"])
@settings(max_examples=8)
@given(data=st.data())
def test_projections_and_head_results_match_their_einsum_definitions(backend, data):
    """hook_q/k/v = x @ W + b per head, hook_attn_scores/hook_pattern/hook_z as the XLA spec,
    hook_result[h] = z_h @ W_O[h], hook_attn_out = their sum + b_O: the TL definitions, which the
    forward pass computes otherwise (flat matmuls with a ones column against [W; b] and a
    block-diagonal W_O; a cache of the pattern comes from the fused kernel)."""
    model, tokens = data.draw(pooled_model_and_tokens(attention_backend=backend))
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        a = model.params["blocks"][layer]["attn"]
        name = f"blocks.{layer}.attn"
        x = _ln1_output(model, cache, layer)
        for c in "QKV":
            want = jnp.einsum("bpm,hmd->bphd", x, a[f"W_{c}"]) + a[f"b_{c}"][None, None]
            assert_close(cache[f"{name}.hook_{c.lower()}"], want, rtol=1e-4, atol=1e-5)
        # a cache only reads scores/pattern: the fused kernel writes them; same values as the spec
        q, k, v = (cache[f"{name}.hook_{c}"] for c in "qkv")
        scores = tinyinterp.fast.attention.attention_scores(q, k, backend="xla")
        assert_close(cache[f"{name}.hook_attn_scores"], scores, rtol=1e-4, atol=1e-5)
        pattern = tinyinterp.fast.attention.attention_pattern(scores)
        assert_close(cache[f"{name}.hook_pattern"], pattern, rtol=1e-4, atol=1e-5)
        z = cache[f"{name}.hook_z"]
        assert_close(z, tinyinterp.fast.attention.apply_pattern(pattern, v), rtol=1e-4, atol=1e-5)
        result = jnp.einsum("bphd,hdm->bphm", z, a["W_O"])
        assert_close(cache[f"{name}.hook_result"], result, rtol=1e-4, atol=1e-5)
        assert_close(cache[f"blocks.{layer}.hook_attn_out"],
                     jnp.sum(result, axis=2) + a["b_O"][None, None], rtol=1e-4, atol=1e-5)


@settings(max_examples=8)
@given(pooled_model_and_tokens(), st.data())
def test_hook_gradients_match_finite_differences(mt, data):
    model, tokens = mt
    name = data.draw(st.sampled_from([n for n in model.hook_names
                                      if not n.endswith(("attn_scores", "hook_scale"))]))
    key = jax.random.key(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    logits_shape = (*tokens.shape, model.cfg.d_vocab_out)
    weights = jax.random.normal(key, logits_shape, jnp.float32)

    def metric(logits):
        return jnp.sum(jnp.tanh(logits) * weights)

    _, cache = model.run_with_cache(tokens, names_filter=[name], incl_bwd=True, metric=metric)
    grad = cache[f"{name}_grad"]
    assert grad.shape == cache[name].shape
    # Half along the claimed gradient, half random, unit norm: a wrong magnitude or a wrong
    # direction both show up, and the step is small in every case.
    noise = jax.random.normal(jax.random.fold_in(key, 1), grad.shape, jnp.float32)
    direction = grad / (jnp.linalg.norm(grad) + 1e-12) + noise / jnp.linalg.norm(noise)
    direction = direction / jnp.linalg.norm(direction)
    eps = 3e-3

    def shifted(step):
        return float(metric(run_plus(model, tokens, name, step * direction)))

    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)  # central difference, error O(eps^2)
    analytic = float(jnp.sum(grad * direction))
    # a directional derivative along a unit vector is at most ||grad||: compare on that scale
    scale = float(jnp.linalg.norm(grad))
    assert abs(fd - analytic) <= 2e-2 * scale + 1e-3, (name, fd, analytic, scale)


def test_grad_wrt_params_through_hooked_run_under_jit():
    model = HookedTransformer.from_config(REF_CFG, seed=1)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, REF_CFG.d_vocab)

    @jax.jit
    def loss(m):
        def scale_pattern(p, *, name):
            return p * 0.9
        return m.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", scale_pattern)],
                                return_type="loss")

    grads = jax.grad(loss)(model)
    assert isinstance(grads, HookedTransformer)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads.params["blocks"][0]["attn"]["W_K"]).sum()) > 0


# ----------------------------------------------------------------------------- forward semantics
@settings(max_examples=4)
@given(pooled_model_and_tokens(), st.data())
def test_stop_then_start_at_layer_equals_full_forward(mt, data):
    model, tokens = mt
    layer = data.draw(st.integers(0, model.cfg.n_layers))
    resid = model(tokens, stop_at_layer=layer)
    if layer < model.cfg.n_layers:
        _, c2 = model.run_with_cache(tokens, names_filter=[f"blocks.{layer}.hook_resid_pre"])
        assert_close(resid, c2[f"blocks.{layer}.hook_resid_pre"], rtol=1e-5, atol=1e-5)
    assert_close(model(resid, start_at_layer=layer), model(tokens), rtol=1e-4, atol=1e-4)


def test_return_types_and_per_token_loss():
    model = HookedTransformer.from_config(REF_CFG, seed=2)
    tokens = jax.random.randint(jax.random.key(3), (3, 20), 0, REF_CFG.d_vocab)
    logits, loss = model(tokens, return_type="both")
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    assert per_token.shape == (3, 19)
    logp = jax.nn.log_softmax(logits, axis=-1)
    by_hand = -np.take_along_axis(np.asarray(logp[:, :-1]), np.asarray(tokens[:, 1:, None]), -1)[..., 0]
    assert_close(per_token, by_hand, rtol=1e-5, atol=1e-5)
    assert_close(loss, by_hand.mean(), rtol=1e-5, atol=1e-6)
    assert model(tokens, return_type=None) is None


def test_same_seed_same_bits_and_different_seed_differs():
    a = to_transformer_lens_state_dict(HookedTransformer.from_config(REF_CFG, seed=7))
    b = to_transformer_lens_state_dict(HookedTransformer.from_config(REF_CFG, seed=7))
    c = to_transformer_lens_state_dict(HookedTransformer.from_config(REF_CFG, seed=8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["embed.W_E"], c["embed.W_E"])


def test_fully_masked_scores_give_zero_pattern_not_nan():
    model = HookedTransformer.from_config(REF_CFG, seed=0)
    tokens = jnp.arange(8, dtype=jnp.int32)[None]

    def mask_all(s, *, name):
        return jnp.full_like(s, -jnp.inf)

    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_pattern"],
                                    fwd_hooks=[("blocks.0.attn.hook_attn_scores", mask_all)])
    assert np.all(np.asarray(cache["pattern", 0]) == 0.0)


def test_large_logits_stay_finite():
    model = HookedTransformer.from_config(REF_CFG, seed=0)
    big = jax.tree_util.tree_map(lambda x: x * 30.0, model.params)
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, REF_CFG.d_vocab)
    logits, cache = model.with_params(big).run_with_cache(tokens)
    assert float(jnp.abs(cache["attn_scores", 1]).max(where=jnp.isfinite(cache["attn_scores", 1]),
                                                       initial=0.0)) > 100
    assert bool(jnp.all(jnp.isfinite(logits)))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, err, match", [
    (np.array([[0, 1, 64]]), ValueError, r"\[0, d_vocab=64\).*64"),
    (np.array([[0, -1, 3]]), ValueError, r"\[0, d_vocab=64\).*-1"),
    (np.zeros((1, 65), np.int32), ValueError, "exceeds n_ctx=64"),
    (np.zeros((1, 5), np.float32), TypeError, "must be integers"),
    (np.zeros((5,), np.int32), ValueError, r"rank 2.*tokens\[None\]"),
    (np.zeros((1, 2, 3), np.int32), ValueError, "rank 2"),
    ("hello", TypeError, "integer array"),
])
def test_bad_tokens_raise_clear_errors(bad, err, match):
    model = HookedTransformer.from_config(REF_CFG, seed=0)
    for call in (model, model.run_with_cache, model.run_with_hooks):
        with pytest.raises(err, match=match):
            call(bad)


@pytest.mark.parametrize("backend", ["xla", "numba"])
def test_out_of_range_tokens_under_a_trace_give_nan_not_a_clamped_embedding(backend):
    """Inside jit the values are unknown, so no error can be raised: the bad sequence's logits are
    NaN (never a silently clamped embedding) and the other sequences are untouched. (Earlier
    positions of the bad sequence may be NaN too: 0 * NaN in pattern @ v, as in TL.)"""
    model = HookedTransformer.from_config(REF_CFG.replace(attention_backend=backend), seed=0)
    tokens = jnp.array([[1, 2, 64, 3], [1, 2, 63, 3]], jnp.int32)
    logits = jax.jit(lambda m, t: m(t))(model, tokens)
    assert bool(jnp.all(jnp.isnan(logits[0, 2:])))
    assert_close(logits[1], model(tokens[1:])[0], rtol=1e-5, atol=1e-5)


def test_unknown_hook_names_suggest_the_closest():
    model = HookedTransformer.from_config(REF_CFG, seed=0)
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(KeyError, match="blocks.0.attn.hook_pattern"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_patern", lambda v, name: v)])
    with pytest.raises(KeyError, match="blocks.1.hook_resid_post"):
        model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pots"])
    with pytest.raises(KeyError, match="unknown hook point"):  # attn_only: no MLP hooks
        model.run_with_cache(tokens, names_filter=["blocks.0.mlp.hook_post"])


@pytest.mark.parametrize("bad_hook, match", [
    (lambda v, name: v[..., :-1], r"blocks.0.hook_resid_pre.*returned shape"),
    (lambda v, name: v.astype(jnp.bfloat16), r"blocks.0.hook_resid_pre.*dtype"),
    (lambda v, name: None, r"blocks.0.hook_resid_pre.*returned NoneType"),
])
def test_hook_returning_wrong_shape_or_dtype_names_the_hook(bad_hook, match):
    model = HookedTransformer.from_config(REF_CFG, seed=0)
    with pytest.raises((ValueError, TypeError), match=match):
        model.run_with_hooks(jnp.zeros((1, 4), jnp.int32),
                             fwd_hooks=[("blocks.0.hook_resid_pre", bad_hook)])


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=60, d_head=16), "cannot derive n_heads"),
    (dict(act_fn="gleu"), "Did you mean 'gelu'"),
    (dict(normalization_type="LayerNorm"), "normalization_type"),
    (dict(n_layers=0), "n_layers must be positive"),
    (dict(d_vocab=-3), "d_vocab must be positive"),
    (dict(n_ctx=2.5), "n_ctx must be an int"),
    (dict(attention_backend="cuda"), "attention_backend"),
    (dict(eps=0.0), "eps"),
])
def test_invalid_configs_raise_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TransformerConfig(**kwargs)


def test_config_is_frozen_and_round_trips():
    cfg = REF_CFG.replace(attn_only=False, act_fn="gelu_new", normalization_type="RMSPre")
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.d_mlp == 4 * cfg.d_model
    with pytest.raises(AttributeError):
        cfg.d_model = 8  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown fields"):
        TransformerConfig.from_dict({**cfg.to_dict(), "d_modle": 3})


def test_start_stop_layer_and_return_type_errors():
    model = HookedTransformer.from_config(REF_CFG, seed=0)
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="stop_at_layer=5 is out of range"):
        model(tokens, stop_at_layer=5)
    with pytest.raises(ValueError, match="return_type"):
        model(tokens, return_type="probs")
    with pytest.raises(ValueError, match="residual stream"):
        model(tokens, start_at_layer=1)


# ----------------------------------------------------------------------------- interop
@settings(max_examples=3)
@given(model_and_tokens())
def test_interop_round_trip_is_exact_and_keys_are_tls(mt):
    model, tokens = mt
    sd = to_transformer_lens_state_dict(model)
    assert {k: v.shape for k, v in sd.items()} == param_shapes(model.cfg)
    back = from_transformer_lens_state_dict(model.cfg, sd)
    for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(back.params),
                    strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(back(tokens)), np.asarray(model(tokens)))


def test_interop_reference_keys_and_errors():
    cfg = REF_CFG.replace(attn_only=False)
    sd = to_transformer_lens_state_dict(HookedTransformer.from_config(cfg))
    assert list(sd)[:4] == ["embed.W_E", "pos_embed.W_pos", "blocks.0.ln1.w", "blocks.0.ln1.b"]
    assert sd["blocks.1.attn.W_O"].shape == (4, 16, 64) and sd["blocks.0.mlp.W_in"].shape == (64, 256)
    # TL's buffers are ignored, a missing parameter is named.
    sd_tl = dict(sd, **{"blocks.0.attn.mask": np.ones((64, 64), bool),
                        "blocks.0.attn.IGNORE": np.array(-1e5)})
    tinyinterp.interop.from_transformer_lens_state_dict(cfg, sd_tl)
    del sd["blocks.1.mlp.b_out"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.b_out'\]"):
        tinyinterp.interop.from_transformer_lens_state_dict(cfg, sd)


def test_start_after_stop_is_refused_and_equal_layers_pass_the_residual_through():
    cfg = TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=7,
                            attn_only=True)
    model = HookedTransformer.from_config(cfg, seed=0)
    resid = jnp.ones((1, 3, 8), jnp.float32)
    with pytest.raises(ValueError, match="comes after"):
        model(resid, start_at_layer=2, stop_at_layer=1)
    assert np.array_equal(np.asarray(model(resid, start_at_layer=1, stop_at_layer=1)),
                          np.asarray(resid))


def test_the_attention_backend_is_a_run_option_not_part_of_a_checkpoint(tmp_path):
    from tinyinterp.checkpoint import load_model, save_model

    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=7,
                            attn_only=True)
    params = HookedTransformer.from_config(cfg, seed=0).params
    for backend in ("xla", "numba"):
        save_model(HookedTransformer(cfg.replace(attention_backend=backend), params),
                   tmp_path / backend)
    texts = [(tmp_path / b / "config.json").read_text() for b in ("xla", "numba")]
    assert texts[0] == texts[1] and "attention_backend" not in texts[0]
    loaded = load_model(tmp_path / "numba", expected_config=cfg.replace(attention_backend="xla"))
    assert loaded.cfg == cfg  # the default backend ("auto")
    tokens = jnp.zeros((2, 5), jnp.int32)
    np.testing.assert_allclose(np.asarray(loaded(tokens, backend="xla")),
                               np.asarray(loaded(tokens, backend="numba")), rtol=1e-5, atol=1e-6)


def test_incl_bwd_compiles_once_per_config_names_and_hooks():
    """run_with_cache(..., incl_bwd=True) reuses its compiled program across calls (it used to
    re-trace a fresh closure every time)."""
    from tinyinterp import model as model_module

    cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=7,
                            attn_only=True)
    model = HookedTransformer.from_config(cfg, seed=0)
    tokens = jnp.zeros((2, 5), jnp.int32)
    names = ["blocks.0.hook_resid_post"]
    model.run_with_cache(tokens, names, return_type="loss", incl_bwd=True)
    before = model_module._jit_grads._cache_size()
    for seed in range(3):  # other params and tokens of the same shapes: no new program
        other = HookedTransformer.from_config(cfg, seed=seed + 1)
        loss, cache = other.run_with_cache(tokens + seed, names, return_type="loss", incl_bwd=True)
        assert cache["blocks.0.hook_resid_post_grad"].shape == (2, 5, 8)
    assert model_module._jit_grads._cache_size() == before
