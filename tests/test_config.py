"""Configs and params are validated where they are made: a wrong type or value is a clear error
naming the field (never a raw TypeError from a comparison deep inside), and params are checked
against their config leaf by leaf (shape and dtype) wherever a model is built from them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyinterp import HookedTransformer, TransformerConfig
from tinyinterp.interop import from_transformer_lens_state_dict, to_transformer_lens_state_dict
from tinyinterp.params import check_params, init_params, param_shapes
from tinyinterp.testing import CONFIG_POOL
from tinyinterp.train import TrainConfig

CFG = TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=11, n_ctx=8, d_mlp=32)


def params_of(cfg: TransformerConfig, seed: int = 0):
    return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed))  # one compile


# ----------------------------------------------------------------------------- TransformerConfig
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(initializer_range="0.1"), TypeError, r"initializer_range must be a number .*'0.1' \(str\)"),
    (dict(initializer_range=float("nan")), ValueError, "initializer_range must be positive and"),
    (dict(initializer_range=0.0), ValueError, "initializer_range must be positive"),
    (dict(eps="1e-5"), TypeError, r"eps must be a number .*'1e-5'"),
    (dict(eps=True), TypeError, "eps must be a number"),
    (dict(eps=float("inf")), ValueError, "eps must be a positive finite"),
    (dict(d_model="16"), TypeError, r"d_model must be an int, got '16' \(str\)"),
    (dict(n_layers=2.0), TypeError, "n_layers must be an int"),
    (dict(n_layers=True), TypeError, "n_layers must be an int"),
    (dict(d_vocab=None), TypeError, "d_vocab must be an int"),
    (dict(act_fn=None), TypeError, "act_fn must be a str"),
    (dict(normalization_type=1), TypeError, "normalization_type must be a str or None"),
    (dict(attention_backend=["xla"]), TypeError, "attention_backend must be a str"),
    (dict(model_name=3), TypeError, "model_name must be a str"),
    (dict(attn_only="yes"), TypeError, "attn_only must be a bool"),
    (dict(d_head=0), ValueError, "d_head must be positive"),
])
def test_transformer_config_types(kwargs, error, match):
    with pytest.raises(error, match=match):
        TransformerConfig(**{**CFG.to_dict(), **kwargs})


def test_transformer_config_accepts_numpy_scalars_and_stays_json_safe():
    cfg = TransformerConfig(n_layers=np.int64(2), d_model=np.int32(16), n_heads=2, d_head=8,
                            d_vocab=11, n_ctx=8, d_mlp=32, eps=np.float32(1e-5),
                            attn_only=np.bool_(False))
    assert type(cfg.d_model) is int and type(cfg.eps) is float and cfg.attn_only is False
    assert TransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(TypeError, match="from_dict needs a dict"):
        TransformerConfig.from_dict([("d_model", 16)])


# ----------------------------------------------------------------------------- TrainConfig
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(grad_clip="1"), TypeError, r"grad_clip must be a number or None, got '1' \(str\)"),
    (dict(grad_clip=-1.0), ValueError, "grad_clip must be a finite number >= 0"),
    (dict(grad_clip=float("inf")), ValueError, "grad_clip must be a finite number"),
    (dict(lr="0.001"), TypeError, "lr must be a number"),
    (dict(lr=float("nan")), ValueError, "lr must be a finite number"),
    (dict(final_lr_frac=5), ValueError, r"final_lr_frac .* must be in \[0, 1\], got 5.0"),
    (dict(final_lr_frac=-0.1), ValueError, "final_lr_frac must be a finite number >= 0"),
    (dict(weight_decay=None), TypeError, "weight_decay must be a number"),
    (dict(b1=1.0), ValueError, "b1 and b2 must be < 1"),
    (dict(steps="100"), TypeError, r"steps must be an int >= 0, got '100' \(str\)"),
    (dict(steps=10.0), TypeError, "steps must be an int"),
    (dict(steps=-1), ValueError, "steps must be an int >= 0"),
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
    (dict(seed=True), TypeError, "seed must be an int"),
    (dict(schedule="exp"), ValueError, "schedule='exp'; allowed"),
    (dict(schedule=["cosine"]), ValueError, "schedule"),
    (dict(progress=1), ValueError, "progress must be None, True or False"),
])
def test_train_config_types_and_ranges(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**kwargs)


def test_train_config_normalises_numbers():
    tc = TrainConfig(grad_clip=1, lr=np.float32(0.5), steps=np.int64(3), final_lr_frac=1)
    assert tc.grad_clip == 1.0 and type(tc.grad_clip) is float and type(tc.steps) is int
    assert TrainConfig.from_dict(json.loads(json.dumps(tc.to_dict()))) == tc
    assert TrainConfig(grad_clip=None).grad_clip is None
    with pytest.raises(TypeError, match="from_dict needs a dict"):
        TrainConfig.from_dict("steps=3")


# ----------------------------------------------------------------------------- check_params
def test_check_params_accepts_init_params_and_tracers():
    params = params_of(CFG)
    check_params(params, CFG)
    jax.jit(lambda p: check_params(p, CFG) or p["embed"]["W_E"].sum())(params)
    jax.eval_shape(lambda p: check_params(p, CFG), params)


def _edit(params, path, value):
    params = jax.tree_util.tree_map(lambda x: x, params)  # a fresh tree (surgery is functional)
    node = params
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return params


@pytest.mark.parametrize("path, value, match", [
    (("blocks", 0, "attn", "W_O"), jnp.zeros((3, 8, 16), jnp.float32),
     r"'blocks.0.attn.W_O'\] has shape \(3, 8, 16\), the config expects \(2, 8, 16\) "
     r"\[n_heads=2, d_head=8, d_model=16\]"),
    (("embed", "W_E"), jnp.zeros((4, 16), jnp.float32),
     r"'embed.W_E'\] has shape \(4, 16\), the config expects \(11, 16\) \[d_vocab=11, d_model=16\]"),
    (("unembed", "b_U"), jnp.zeros((11,), jnp.int32), r"'unembed.b_U'\] has dtype int32, expected "
                                                       "float32"),
    (("pos_embed", "W_pos"), jnp.zeros((8, 16), jnp.bfloat16), "dtype bfloat16"),
    (("ln_final", "w"), [1.0] * 16, r"'ln_final.w'\] must be an array, got list"),
    (("blocks", 1, "mlp", "W_gate"), jnp.zeros((16, 32), jnp.float32),
     r"unexpected \['blocks.1.mlp.W_gate'\]"),
])
def test_check_params_names_the_leaf_expected_and_got(path, value, match):
    params = _edit(params_of(CFG), path, value)
    with pytest.raises(ValueError, match=match):
        check_params(params, CFG)


def test_check_params_structure_errors():
    params = params_of(CFG)
    with pytest.raises(ValueError, match="params has 1 blocks but the config has n_layers=2"):
        check_params({**params, "blocks": params["blocks"][:1]}, CFG)
    with pytest.raises(ValueError, match=r"missing \['unembed.b_U'\]"):
        check_params(_edit(params, ("unembed",), {"W_U": params["unembed"]["W_U"]}), CFG)
    with pytest.raises(ValueError, match="nested dict"):
        check_params([params], CFG)
    with pytest.raises(ValueError, match=r"params\['blocks'\] must be a list"):
        check_params({**params, "blocks": {0: params["blocks"][0]}}, CFG)


def test_check_params_agrees_with_the_shapes_of_the_config():
    """Params of one config pass for every config with the same parameter shapes and fail, with
    a ValueError, for every other (all pairs of the test pool; abstract params: only shapes and
    dtypes are read)."""
    key = jax.random.key(1)
    abstract = {cfg: jax.eval_shape(lambda k, cfg=cfg: init_params(cfg, k), key)
                for cfg in CONFIG_POOL}
    for other, params in abstract.items():
        for cfg in CONFIG_POOL:
            if param_shapes(cfg) == param_shapes(other):
                check_params(params, cfg)
            else:
                with pytest.raises(ValueError, match="params"):
                    check_params(params, cfg)


# ----------------------------------------------------------------------------- interop
def test_interop_checks_params_and_dtypes():
    sd = to_transformer_lens_state_dict(HookedTransformer(CFG, params_of(CFG)))
    back = from_transformer_lens_state_dict(CFG, {k: v.astype(np.float64) for k, v in sd.items()})
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(back.params))
    with pytest.raises(ValueError, match=r"'blocks.0.attn.W_O'.*shape \(3, 8, 16\)"):
        from_transformer_lens_state_dict(CFG, {**sd, "blocks.0.attn.W_O": np.zeros((3, 8, 16))})
    with pytest.raises(ValueError, match=r"state_dict\['embed.W_E'\] has dtype int32; model "
                                         "weights must be floating point"):
        from_transformer_lens_state_dict(CFG, {**sd, "embed.W_E": sd["embed.W_E"].astype(np.int32)})
