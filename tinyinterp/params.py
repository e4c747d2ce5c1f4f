"""Parameters: a plain nested dict of jnp arrays, named and shaped as in TransformerLens.

    params["embed"]["W_E"]                 [d_vocab, d_model]
    params["pos_embed"]["W_pos"]           [n_ctx, d_model]
    params["blocks"][l]["ln1"]["w"/"b"]     [d_model]       (LN: w, b; RMS: w; LNPre/RMSPre/None: absent)
    params["blocks"][l]["attn"]["W_Q"/"W_K"/"W_V"]  [n_heads, d_model, d_head]
    params["blocks"][l]["attn"]["b_Q"/"b_K"/"b_V"]  [n_heads, d_head]
    params["blocks"][l]["attn"]["W_O"]     [n_heads, d_head, d_model]
    params["blocks"][l]["attn"]["b_O"]     [d_model]
    params["blocks"][l]["ln2"], ["mlp"]["W_in" [d_model, d_mlp], "b_in", "W_out" [d_mlp, d_model], "b_out"]
                                           (absent when attn_only)
    params["ln_final"]["w"/"b"]            [d_model]
    params["unembed"]["W_U"]               [d_model, d_vocab_out]
    params["unembed"]["b_U"]               [d_vocab_out]

``params["blocks"]`` is a list with one dict per layer. ``flatten_params`` gives the TransformerLens
state-dict view (``"blocks.0.attn.W_Q"``), ``unflatten_params`` inverts it. ``check_params(params,
cfg)`` checks every leaf's shape and dtype against the config (checkpoint loading and the
TransformerLens import call it; a model is never built on params it does not fit).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tinyinterp.config import TransformerConfig

Params = dict


def _norm_param_names(normalization_type: str | None) -> tuple[str, ...]:
    """Which parameters a norm layer owns (TL: LNPre and RMSPre are parameter-free)."""
    return {"LN": ("w", "b"), "RMS": ("w",)}.get(normalization_type, ())


def param_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """TL state-dict key -> shape, in TL's module order, for every parameter this config has."""
    D, H, Dh, V, Vo = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_vocab, cfg.d_vocab_out
    norm = _norm_param_names(cfg.normalization_type)
    shapes: dict[str, tuple[int, ...]] = {"embed.W_E": (V, D), "pos_embed.W_pos": (cfg.n_ctx, D)}
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        for n in norm:
            shapes[f"{p}.ln1.{n}"] = (D,)
        for n in norm if not cfg.attn_only else ():
            shapes[f"{p}.ln2.{n}"] = (D,)
        shapes[f"{p}.attn.W_Q"] = (H, D, Dh)
        shapes[f"{p}.attn.W_K"] = (H, D, Dh)
        shapes[f"{p}.attn.W_V"] = (H, D, Dh)
        shapes[f"{p}.attn.W_O"] = (H, Dh, D)
        shapes[f"{p}.attn.b_Q"] = (H, Dh)
        shapes[f"{p}.attn.b_K"] = (H, Dh)
        shapes[f"{p}.attn.b_V"] = (H, Dh)
        shapes[f"{p}.attn.b_O"] = (D,)
        if not cfg.attn_only:
            shapes[f"{p}.mlp.W_in"] = (D, cfg.d_mlp)
            shapes[f"{p}.mlp.b_in"] = (cfg.d_mlp,)
            shapes[f"{p}.mlp.W_out"] = (cfg.d_mlp, D)
            shapes[f"{p}.mlp.b_out"] = (D,)
    for n in norm:
        shapes[f"ln_final.{n}"] = (D,)
    shapes["unembed.W_U"] = (D, Vo)
    shapes["unembed.b_U"] = (Vo,)
    return shapes


def init_params(cfg: TransformerConfig, key: jax.Array) -> Params:
    """Seeded init (TL's "gpt2" mode): weight matrices ~ N(0, initializer_range), biases 0,
    norm weights 1. Deterministic in ``key``; every parameter gets its own folded-in key."""
    flat = {}
    for i, (name, shape) in enumerate(param_shapes(cfg).items()):
        leaf = name.rsplit(".", 1)[1]
        if leaf.startswith("W_"):
            k = jax.random.fold_in(key, i)
            flat[name] = cfg.initializer_range * jax.random.normal(k, shape, dtype=jnp.float32)
        elif leaf == "w":
            flat[name] = jnp.ones(shape, jnp.float32)
        else:
            flat[name] = jnp.zeros(shape, jnp.float32)
    return unflatten_params(flat, cfg)


def flatten_params(params: Params) -> dict[str, jax.Array]:
    """Nested params -> {TL state-dict key: array}, e.g. ``"blocks.0.attn.W_Q"``."""
    flat: dict[str, jax.Array] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}")
        else:
            flat[prefix] = node

    walk(params, "")
    return flat


def unflatten_params(flat: dict, cfg: TransformerConfig) -> Params:
    """{TL state-dict key: array} -> nested params, checking that the keys and shapes are exactly
    those of ``cfg`` (a clear error lists what is missing, unexpected or misshapen)."""
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "parameters do not match the config: "
            + (f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}; " if missing else "")
            + (f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; "
               if unexpected else "")
            + f"config has n_layers={cfg.n_layers}, attn_only={cfg.attn_only}, "
            f"normalization_type={cfg.normalization_type!r}")
    # TL's module order: embed, pos_embed, blocks, ln_final, unembed
    params: Params = {"embed": {}, "pos_embed": {}, "blocks": [{} for _ in range(cfg.n_layers)]}
    for name, shape in expected.items():
        value = flat[name]
        if tuple(np.shape(value)) != shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(np.shape(value))}, "
                             f"the config expects {shape}")
        parts = name.split(".")
        if parts[0] == "blocks":
            node = params["blocks"][int(parts[1])]
            parts = parts[2:]
        else:
            node = params
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = jnp.asarray(value, dtype=jnp.float32)
    return params


# The axes of each parameter, for error messages ("W_O [n_heads, d_head, d_model]").
_AXES = {"W_E": ("d_vocab", "d_model"), "W_pos": ("n_ctx", "d_model"), "w": ("d_model",),
         "b": ("d_model",), "W_Q": ("n_heads", "d_model", "d_head"),
         "W_K": ("n_heads", "d_model", "d_head"), "W_V": ("n_heads", "d_model", "d_head"),
         "W_O": ("n_heads", "d_head", "d_model"), "b_Q": ("n_heads", "d_head"),
         "b_K": ("n_heads", "d_head"), "b_V": ("n_heads", "d_head"), "b_O": ("d_model",),
         "W_in": ("d_model", "d_mlp"), "b_in": ("d_mlp",), "W_out": ("d_mlp", "d_model"),
         "b_out": ("d_model",), "W_U": ("d_model", "d_vocab_out"), "b_U": ("d_vocab_out",)}


@functools.lru_cache(maxsize=64)
def _abstract_params(cfg: TransformerConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """{TL name: shape and dtype} of ``init_params(cfg, key)``, traced abstractly (no arrays)."""
    tree = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    return flatten_params(tree)


def _describe(name: str, shape: tuple[int, ...], cfg: TransformerConfig) -> str:
    axes = _AXES.get(name.rsplit(".", 1)[-1])
    if axes is None or len(axes) != len(shape):
        return str(shape)
    return "[" + ", ".join(f"{a}={getattr(cfg, a)}" for a in axes) + "]"


def check_params(params: Params, cfg: TransformerConfig) -> None:
    """Raise a ValueError unless ``params`` has exactly the leaves, shapes and dtype (float32) that
    ``init_params(cfg, key)`` gives. Works on concrete arrays and on tracers (only shapes and dtypes
    are read), and costs no computation.

    Why: the forward pass and its kernels are written for these shapes; a W_O with 3 heads in a
    2-head config, or a W_E with too few rows, would otherwise run silently wrong (or worse)."""
    if not isinstance(params, dict):
        raise ValueError(f"params must be a nested dict of arrays (TransformerLens names), got "
                         f"{type(params).__name__}")
    blocks = params.get("blocks")
    if blocks is not None and not isinstance(blocks, (list, tuple)):
        raise ValueError(f"params['blocks'] must be a list with one dict per layer, got "
                         f"{type(blocks).__name__}")
    if isinstance(blocks, (list, tuple)) and len(blocks) != cfg.n_layers:
        raise ValueError(f"params has {len(blocks)} blocks but the config has "
                         f"n_layers={cfg.n_layers}")
    flat: dict = {}

    def walk(node, prefix: str) -> None:  # dicts, and the list of blocks; anything else is a leaf
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif prefix == "blocks" and isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"blocks.{i}")
        else:
            flat[prefix] = node

    walk(params, "")
    expected = _abstract_params(cfg)
    missing = [k for k in expected if k not in flat]
    unexpected = [k for k in flat if k not in expected]
    if missing or unexpected:
        raise ValueError(
            "params do not match the config: "
            + (f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}; " if missing else "")
            + (f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; "
               if unexpected else "")
            + f"the config has n_layers={cfg.n_layers}, attn_only={cfg.attn_only}, "
            f"normalization_type={cfg.normalization_type!r}")
    for name, ref in expected.items():
        leaf, shape = flat[name], tuple(ref.shape)
        got_shape, got_dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if got_shape is None or got_dtype is None:
            raise ValueError(f"params[{name!r}] must be an array, got {type(leaf).__name__}")
        if tuple(got_shape) != shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(got_shape)}, the config expects "
                             f"{shape} {_describe(name, shape, cfg)}")
        if np.dtype(got_dtype) != np.dtype(ref.dtype):
            raise ValueError(f"params[{name!r}] has dtype {np.dtype(got_dtype)}, expected "
                             f"{np.dtype(ref.dtype)} (cast with .astype(jnp.{np.dtype(ref.dtype)}) "
                             "if the values are right)")


def count_params(params: Params) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
