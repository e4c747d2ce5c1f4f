"""Activation, attribution and path patching, and ablations: their defining properties."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyinterp import HookedTransformer, TransformerConfig
from tinyinterp import patching as P
from tinyinterp.testing import CONFIG_POOL, random_params_like

# Two configs (compiled programs are reused across examples; hypothesis varies parameters, tokens
# and what each test draws): 2 layers with MLPs and LN on the default backend (Numba on CPU), and
# 2 attention-only layers with LN on the XLA backend.
POOL = (CONFIG_POOL[1], CONFIG_POOL[0].replace(attention_backend="xla"))


@st.composite
def pooled_model_and_tokens(draw, cfgs=POOL):
    cfg = draw(st.sampled_from(cfgs), label="cfg")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    model = random_params_like(HookedTransformer.from_config(cfg, seed),
                               jax.random.key(seed ^ 0x5EED))
    tokens = jax.random.randint(jax.random.fold_in(jax.random.key(seed), 1), (2, cfg.n_ctx), 0,
                                cfg.d_vocab, dtype=jnp.int32)
    return model, tokens


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Projection:
    """A pytree metric (its weights are traced, so one compiled program serves every example):
    a random linear read-out of every logit."""

    w: jax.Array  # [pos, d_vocab_out]

    def __call__(self, logits, tokens):
        return jnp.sum(logits * self.w[None], axis=(1, 2))


def last_logit_diff(logits, tokens):
    """A metric linear in the logits: logit of token 1 minus token 0 at the last position."""
    return logits[:, -1, 1] - logits[:, -1, 0]


def loss_metric(logits, tokens):
    """A nonlinear metric: the per-example mean next-token loss."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0], axis=-1)


def _corrupt(model, tokens, seed):
    return jax.random.randint(jax.random.key(seed), tokens.shape, 0, model.cfg.d_vocab,
                              dtype=jnp.int32)


def _close(a, b, tol=2e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


@settings(max_examples=3)
@given(pooled_model_and_tokens(), st.sampled_from(["resid_pre", "attn_head_out_by_pos",
                                                   "attn_head_pattern_by_pos"]))
def test_patching_a_run_into_itself_changes_nothing(mt, family):
    model, tokens = mt
    _, cache = model.run_with_cache(tokens)
    res = P._family_result(family, model, tokens, cache, loss_metric, reduce="mean", chunk_size=7)
    _close(res.values, np.broadcast_to(res.baseline, res.shape))
    _close(res.source, res.baseline)


@settings(max_examples=6)
@given(pooled_model_and_tokens(), st.integers(0, 2**16), st.booleans())
def test_patching_all_of_resid_pre_0_reproduces_the_source_logits(mt, seed, denoise):
    model, clean = mt
    corrupted = _corrupt(model, clean, seed)
    source, target = (clean, corrupted) if denoise else (corrupted, clean)
    projection = Projection(jax.random.normal(jax.random.key(seed),
                                              (clean.shape[1], model.cfg.d_vocab_out)))
    _, cache = model.run_with_cache(source)
    res = P.activation_patch(model, target, cache, projection, "blocks.0.hook_resid_pre",
                             reduce=None)
    _close(res.values, projection(model(source), source))
    _close(res.normalized(), np.ones_like(res.values), tol=1e-3)


@settings(max_examples=5)
@given(pooled_model_and_tokens(), st.integers(0, 2**16), st.sampled_from(["z", "result"]))
def test_all_heads_outputs_equal_attn_out(mt, seed, what):
    model, tokens = mt
    layer = 0
    _, cache = model.run_with_cache(_corrupt(model, tokens, seed))
    for head_hook in (f"attn.hook_{what}",):
        heads = P.activation_patch(model, tokens, cache, loss_metric,
                                   f"blocks.{layer}.{head_hook}", over=("pos",))
        out = P.activation_patch(model, tokens, cache, loss_metric,
                                 f"blocks.{layer}.hook_attn_out", over=("pos",))
        assert heads.axes == out.axes == ("pos",)
        _close(heads.values, out.values)


def _one_patch_reference(model, tokens, cache, metric, name, index):
    """A patch done the plain way: the hook writes the source value at ``index``."""
    src = cache[name]

    def hook(value, *, name):
        return value.at[(slice(None),) + index].set(src[(slice(None),) + index])

    return float(jnp.mean(metric(model.run_with_hooks(tokens, [(name, hook)]), tokens)))


_FAMILY_INDEX = {  # family -> how a result index (after layer) indexes the activation
    "resid_pre": lambda i: (i[0],), "attn_out": lambda i: (i[0],),
    "attn_head_out_by_pos": lambda i: (i[0], i[1]), "attn_head_q_by_pos": lambda i: (i[0], i[1]),
    "attn_head_k_by_pos": lambda i: (i[0], i[1]), "attn_head_v_by_pos": lambda i: (i[0], i[1]),
    "attn_head_pattern_by_pos": lambda i: (i[0], i[1]),
    "attn_head_pattern_dest_src_pos": lambda i: (i[0], i[1], i[2]),
    "attn_head_out_all_pos": lambda i: (slice(None), i[0]),
    "attn_head_q_all_pos": lambda i: (slice(None), i[0]),
    "attn_head_k_all_pos": lambda i: (slice(None), i[0]),
    "attn_head_v_all_pos": lambda i: (slice(None), i[0]),
    "attn_head_pattern_all_pos": lambda i: (i[0],),
}


@settings(max_examples=4)
@given(pooled_model_and_tokens(), st.sampled_from(["resid_pre", "attn_head_q_by_pos",
                                                   "attn_head_pattern_dest_src_pos",
                                                   "attn_head_v_all_pos"]),
       st.integers(0, 2**16), st.data())
def test_batched_sweep_equals_patches_one_at_a_time(mt, family, seed, data):
    model, tokens = mt
    corrupted = _corrupt(model, tokens, seed)
    _, clean_cache = model.run_with_cache(tokens)
    fn = getattr(P, f"get_act_patch_{family}")
    res = fn(model, corrupted, clean_cache, loss_metric, chunk_size=5)
    assert res.axes[0] == "layer" and len(res.labels) == res.values.ndim
    assert all(len(lab) == d for lab, d in zip(res.labels, res.shape, strict=True))
    act = P.FAMILIES[family].act
    for _ in range(3):
        idx = tuple(data.draw(st.integers(0, d - 1)) for d in res.shape)
        name = P.get_act_name(act, idx[0])
        ref = _one_patch_reference(model, corrupted, clean_cache, loss_metric, name,
                                   _FAMILY_INDEX[family](idx[1:]))
        _close(res.values[idx], ref)


@settings(max_examples=2)
@given(pooled_model_and_tokens(), st.sampled_from(["resid_pre", "attn_head_out_by_pos",
                                                   "mlp_out", "resid_mid"]),
       st.sampled_from(["logit_diff", "log_prob"]), st.integers(-3, 6), st.integers(0, 2**16))
def test_one_position_metrics_run_the_last_block_at_that_position_only(mt, family, kind, pos,
                                                                       seed):
    """A built-in metric at one position runs the last block there only (attribution.last_block_at)
    where the patch lies before it; the same metric as a plain function runs the whole model. Both
    give the same sweep, in every family (patches inside the last block take the whole model)."""
    from tinyinterp import attribution as A

    model, tokens = mt
    if model.cfg.attn_only and family in ("mlp_out", "resid_mid"):
        family = "resid_pre"
    corrupted = _corrupt(model, tokens, seed)
    _, clean_cache = model.run_with_cache(tokens)
    metric = (A.logit_diff(pos=pos, correct=tokens[:, 0], wrong=tokens[:, 1]) if kind == "logit_diff"
              else A.log_prob(tokens[:, 2], pos=pos))
    assert A.reads_one_position(metric)
    fn = getattr(P, f"get_act_patch_{family}")
    fast = fn(model, corrupted, clean_cache, metric, chunk_size=3)
    whole = fn(model, corrupted, clean_cache, lambda lg, t: metric(lg, t), chunk_size=3)
    _close(fast.values, whole.values)
    _close(fast.baseline, whole.baseline)
    resid = clean_cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre"]
    start = P.forward(model.params, model.cfg, resid, start_at_layer=model.cfg.n_layers - 1)
    _close(A.last_block_at(model.params, model.cfg, resid, pos)[:, 0], start[:, pos])


@pytest.mark.slow  # compiles one program per family and helper (~8 programs)
def test_tl_shapes_and_every_helpers():
    cfg = CONFIG_POOL[1]  # with MLPs
    model = random_params_like(HookedTransformer.from_config(cfg, 0), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.d_vocab)
    _, cache = model.run_with_cache(_corrupt(model, tokens, 3))
    L, H, n = cfg.n_layers, cfg.n_heads, 5
    expect = {"resid_mid": (L, n), "attn_head_pattern_by_pos": (L, H, n),
              "attn_head_pattern_all_pos": (L, H)}
    for fam, shape in expect.items():
        assert getattr(P, f"get_act_patch_{fam}")(model, tokens, cache, loss_metric).shape == shape
    every = P.get_act_patch_attn_head_by_pos_every(model, tokens, cache, loss_metric)
    assert every.shape == (5, L, n, H) and every.labels[0] == P._EVERY_HEAD
    pattern = P.get_act_patch_attn_head_pattern_by_pos(model, tokens, cache, loss_metric)
    _close(every.values[4], np.swapaxes(pattern.values, 1, 2))
    allpos = P.get_act_patch_attn_head_all_pos_every(model, tokens, cache, loss_metric)
    assert allpos.shape == (5, L, H) and allpos.axes == ("patch_type", "layer", "head")
    block = P.get_act_patch_block_every(model, tokens, cache, loss_metric, reduce=None)
    assert block.shape == (3, L, n, 2) and block.axes[-1] == "batch"
    _close(block.values.mean(-1)[0], P.get_act_patch_resid_pre(model, tokens, cache,
                                                                loss_metric).values)
    fig = block.plot()
    assert fig.axes


# ----------------------------------------------------------------------------- attribution patching
def _without_norms(model):
    cfg = model.cfg.replace(normalization_type=None)
    params = {k: v for k, v in model.params.items() if k != "ln_final"}
    params["blocks"] = [{k: v for k, v in b.items() if k not in ("ln1", "ln2")}
                        for b in model.params["blocks"]]
    return HookedTransformer(cfg, params)


@settings(max_examples=5)
@given(pooled_model_and_tokens(), st.integers(0, 2**16))
def test_attribution_patching_is_exact_where_the_metric_is_linear(mt, seed):
    """With no final norm the logits are linear in the last layer's MLP output and (in an
    attention-only model) its heads' outputs; a logit difference is linear in the logits."""
    model, tokens = mt
    model = _without_norms(model)
    last = model.cfg.n_layers - 1
    _, cache = model.run_with_cache(_corrupt(model, tokens, seed))
    if model.cfg.attn_only:
        cases = ((f"blocks.{last}.attn.hook_z", ("pos", "head")),
                 (f"blocks.{last}.hook_attn_out", ("pos",)))
    else:
        cases = ((f"blocks.{last}.mlp.hook_post", ("pos", "neuron")),
                 (f"blocks.{last}.hook_mlp_out", ("pos",)))
    for hook, over in cases:
        act = P.activation_patch(model, tokens, cache, last_logit_diff, hook, over=over)
        attr = P.attribution_patch(model, tokens, cache, last_logit_diff, hook=hook, over=over)
        assert attr.shape == act.shape and attr.axes == act.axes
        _close(attr.values, act.values, tol=1e-4)


@settings(max_examples=3)
@given(pooled_model_and_tokens(), st.integers(0, 2**16),
       st.sampled_from(["resid_pre", "attn_head_out_by_pos"]))
def test_attribution_patching_tracks_small_perturbations(mt, seed, family):
    model, tokens = mt
    act = P.FAMILIES[family].act
    names = [P.get_act_name(act, layer) for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    key = jax.random.key(seed)
    source = {n: cache[n] + 1e-2 * jnp.std(cache[n]) * jax.random.normal(
        jax.random.fold_in(key, i), cache[n].shape) for i, n in enumerate(names)}
    if act == "pattern":  # keep it a causal pattern
        source = {n: jnp.where(cache[n] > 0, jnp.abs(v), 0.0) for n, v in source.items()}
    exact = getattr(P, f"get_act_patch_{family}")(model, tokens, source, loss_metric)
    approx = P.attribution_patch(model, tokens, source, loss_metric, family)
    assert approx.shape == exact.shape and approx.axes == exact.axes
    a, b = exact.effect().ravel(), approx.effect().ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.9, (a, b)


# ----------------------------------------------------------------------------- path patching
@settings(max_examples=4)
@given(pooled_model_and_tokens(), st.integers(0, 2**16), st.data())
def test_path_patching_through_every_receiver_is_activation_patching(mt, seed, data):
    model, tokens = mt
    cfg = model.cfg
    _, cache = model.run_with_cache(_corrupt(model, tokens, seed))
    receivers = [(c, layer, None) for layer in range(cfg.n_layers) for c in "qkv"] + ["logits"]
    if not cfg.attn_only:
        receivers += [("mlp", layer) for layer in range(cfg.n_layers)]
    heads = [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    senders = data.draw(st.lists(st.sampled_from(heads), min_size=1, max_size=3, unique=True))
    path = P.path_patch(model, tokens, cache, loss_metric, receivers, senders)
    src = {n: cache[n] for n in (f"blocks.{layer}.attn.hook_z" for layer, _ in senders)}

    def hooks():
        out = []
        for layer, h in senders:
            name = f"blocks.{layer}.attn.hook_z"
            out.append((name, lambda v, *, name, h=h: v.at[:, :, h].set(src[name][:, :, h])))
        return out

    ref = jnp.mean(loss_metric(model.run_with_hooks(tokens, hooks()), tokens))
    _close(path.values, ref)
    sweep = P.path_patch(model, tokens, cache, loss_metric, receivers)
    act = P.get_act_patch_attn_head_out_all_pos(model, tokens, cache, loss_metric)
    assert sweep.shape == act.shape == (cfg.n_layers, cfg.n_heads)
    _close(sweep.values, act.values)


def test_path_patching_to_the_logits_is_the_direct_effect():
    """Senders -> logits only: the final residual moves by the senders' output change, nothing
    downstream recomputes."""
    cfg = TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=6,
                            attn_only=True, normalization_type=None, attention_backend="xla")
    model = random_params_like(HookedTransformer.from_config(cfg, 3), jax.random.key(4))
    tokens = jax.random.randint(jax.random.key(5), (2, 6), 0, 11)
    _, cache = model.run_with_cache(_corrupt(model, tokens, 9))
    _, tcache = model.run_with_cache(tokens)
    W_O = model.params["blocks"][0]["attn"]["W_O"][1]
    delta = (cache["blocks.0.attn.hook_z"][:, :, 1] - tcache["blocks.0.attn.hook_z"][:, :, 1]) @ W_O
    logits = model(tcache["blocks.1.hook_resid_post"] + delta, start_at_layer=2)
    res = P.path_patch(model, tokens, cache, last_logit_diff, "logits", [(0, 1)])
    _close(res.values, jnp.mean(last_logit_diff(logits, tokens)))


# ----------------------------------------------------------------------------- ablations
@settings(max_examples=4)
@given(pooled_model_and_tokens(), st.data())
def test_zero_ablating_a_head_equals_zeroing_its_W_O(mt, data):
    model, tokens = mt
    layer = data.draw(st.integers(0, model.cfg.n_layers - 1))
    head = data.draw(st.integers(0, model.cfg.n_heads - 1))
    res = P.ablate(model, tokens, loss_metric, f"blocks.{layer}.attn.hook_z", {"head": head})
    params = jax.tree_util.tree_map(lambda x: x, model.params)
    params["blocks"][layer]["attn"]["W_O"] = params["blocks"][layer]["attn"]["W_O"].at[head].set(0.0)
    ref = jnp.mean(loss_metric(model.with_params(params)(tokens), tokens))
    _close(res.values, ref)
    hooked = model.run_with_hooks(tokens, [(f"blocks.{layer}.attn.hook_z",
                                            P.ablation_hook("zero", {"head": head}))])
    _close(jnp.mean(loss_metric(hooked, tokens)), ref)
    every = P.ablate(model, tokens, loss_metric, f"blocks.{layer}.attn.hook_z", over=("head",))
    _close(every.values[head], ref)


def test_mean_and_resample_ablation():
    cfg = CONFIG_POOL[1]
    model = random_params_like(HookedTransformer.from_config(cfg, 0), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 6), 0, cfg.d_vocab)
    ref_tokens = jax.random.randint(jax.random.key(2), (4, 6), 0, cfg.d_vocab)
    name = "blocks.1.mlp.hook_post"
    _, rc = model.run_with_cache(ref_tokens, names_filter=[name])
    mean = rc[name].mean(axis=0)  # [pos, d_mlp]

    def set_mean(v, *, name):
        return v.at[:, :, 2].set(jnp.broadcast_to(mean[None, :, 2], v[:, :, 2].shape))

    ref = jnp.mean(loss_metric(model.run_with_hooks(tokens, [(name, set_mean)]), tokens))
    res = P.ablate(model, tokens, loss_metric, name, {"neuron": 2}, kind="mean",
                   reference_tokens=ref_tokens)
    _close(res.values, ref)
    a = P.ablate(model, tokens, loss_metric, name, kind="resample", reference_tokens=ref_tokens,
                 seed=1, over=("neuron",))
    b = P.ablate(model, tokens, loss_metric, name, kind="resample", reference_tokens=ref_tokens,
                 seed=1, over=("neuron",))
    np.testing.assert_array_equal(a.values, b.values)  # deterministic for a seed
    # a resample from a one-example reference batch is patching from that example
    one = ref_tokens[:1]
    r1 = P.ablate(model, tokens, loss_metric, name, {"pos": 3}, kind="resample",
                  reference_tokens=one)
    _, oc = model.run_with_cache(jnp.broadcast_to(one, tokens.shape))
    r2 = P.activation_patch(model, tokens, oc, loss_metric, name, {"pos": 3})
    _close(r1.values, r2.values)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    cfg = CONFIG_POOL[0]
    model = HookedTransformer.from_config(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.d_vocab)
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(KeyError, match="closest valid"):
        P.activation_patch(model, tokens, cache, loss_metric, "blocks.0.hook_resid_pr")
    with pytest.raises(IndexError, match="pos axis"):
        P.activation_patch(model, tokens, cache, loss_metric, "blocks.0.hook_resid_pre",
                           {"pos": 9})
    with pytest.raises(IndexError, match="head axis"):
        P.activation_patch(model, tokens, cache, loss_metric, "blocks.0.attn.hook_z", {"head": 2})
    with pytest.raises(ValueError, match="no axis 'neuron'"):
        P.activation_patch(model, tokens, cache, loss_metric, "blocks.0.attn.hook_z",
                           {"neuron": 0})
    with pytest.raises(ValueError, match="differ in shape"):
        P.activation_patch(model, tokens[:, :4], cache, loss_metric, "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="one value per example"):
        P.get_act_patch_resid_pre(model, tokens, cache, lambda lg, t: lg[:, -1, 0].mean())
    from tinyinterp import attribution as A

    with pytest.raises(ValueError, match="outside the 5 positions"):
        P.get_act_patch_resid_pre(model, tokens, cache, A.logit(0, pos=5))
    with pytest.raises(KeyError, match="source_cache has no"):
        P.activation_patch(model, tokens, {}, loss_metric, "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="attn_only"):
        P.get_act_patch_mlp_out(model, tokens, cache, loss_metric)
    with pytest.raises(IndexError, match="layer"):
        P.path_patch(model, tokens, cache, loss_metric, [("q", 5, 0)], [(0, 0)])
    with pytest.raises(IndexError, match="head"):
        P.path_patch(model, tokens, cache, loss_metric, "logits", [(0, 7)])
    with pytest.raises(ValueError, match="reference"):
        P.ablate(model, tokens, loss_metric, "blocks.0.attn.hook_z", kind="mean")
