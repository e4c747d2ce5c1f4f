"""Hypothesis strategies and models for property-based tests of interpretability methods.

Public API, used by tinyinterp's own tests and meant for yours::

    from hypothesis import given
    from tinyinterp.testing import model_and_tokens

    @given(model_and_tokens())
    def test_my_attribution_is_complete(mt):
        model, tokens = mt
        ...

Models have random parameters with non-trivial biases and norm weights (not just the init), so
properties that only hold at init (zero biases, unit LN weights) do not pass by accident.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from hypothesis import strategies as st

from tinyinterp.config import ACT_FNS, NORMALIZATION_TYPES, TransformerConfig
from tinyinterp.model import HookedTransformer


@st.composite
def configs(draw, *, max_layers: int = 3, max_heads: int = 4, max_d_head: int = 8,
            max_vocab: int = 24, max_ctx: int = 12, max_d_mlp: int | None = None,
            attn_only: bool | None = None,
            normalization_types=NORMALIZATION_TYPES, act_fns=ACT_FNS,
            attention_backend: str = "xla",
            choices: dict[str, Sequence[int]] | None = None) -> TransformerConfig:
    """Small random ``TransformerConfig``s covering every normalization type and activation.

    Sizes are drawn from 1 (2 for d_vocab, n_ctx) up to their ``max_*``; ``max_d_mlp`` defaults to
    ``3 * d_model``. ``choices`` pins a size field to a few values instead, e.g.
    ``choices={"d_head": [2], "d_vocab": [5]}``: fewer distinct shapes mean fewer XLA
    compilations, which is what keeps a property-test suite fast."""
    choices = dict(choices or {})
    unknown = set(choices) - {"n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"}
    if unknown:
        raise ValueError(f"configs(choices=...): unknown size fields {sorted(unknown)}")

    def size(name: str, lo: int, hi: int) -> int:
        if name in choices:
            return draw(st.sampled_from(list(choices[name])), label=name)
        return draw(st.integers(lo, hi), label=name)

    n_heads = size("n_heads", 1, max_heads)
    d_head = size("d_head", 1, max_d_head)
    d_model = n_heads * d_head
    only = draw(st.booleans(), label="attn_only") if attn_only is None else attn_only
    return TransformerConfig(
        n_layers=size("n_layers", 1, max_layers),
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=size("d_mlp", 1, max_d_mlp or 3 * d_model),
        d_vocab=size("d_vocab", 2, max_vocab),
        n_ctx=size("n_ctx", 2, max_ctx),
        act_fn=draw(st.sampled_from(act_fns), label="act_fn"),
        normalization_type=draw(st.sampled_from(normalization_types), label="normalization_type"),
        attn_only=only,
        attention_backend=attention_backend,
    )


def random_params_like(model: HookedTransformer, key: jax.Array, scale: float = 0.3):
    """The model's params plus Gaussian noise on every leaf (so biases and norm weights are
    non-trivial)."""
    leaves, treedef = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys,
                                                                                strict=True)]
    return model.with_params(jax.tree_util.tree_unflatten(treedef, noisy))


@st.composite
def models(draw, cfg_strategy=None) -> HookedTransformer:
    """A ``HookedTransformer`` with random (noised) parameters for a drawn config."""
    cfg = draw(cfg_strategy if cfg_strategy is not None else configs(), label="cfg")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    model = HookedTransformer.from_config(cfg, seed=seed)
    return random_params_like(model, jax.random.key(seed ^ 0x5EED))


@st.composite
def tokens(draw, cfg: TransformerConfig, *, max_batch: int = 3, min_pos: int = 1) -> jax.Array:
    """Valid token ids [batch, pos] for ``cfg`` (pos <= n_ctx)."""
    batch = draw(st.integers(1, max_batch), label="batch")
    pos = draw(st.integers(min(min_pos, cfg.n_ctx), cfg.n_ctx), label="pos")
    seed = draw(st.integers(0, 2**31 - 1), label="token_seed")
    return jax.random.randint(jax.random.key(seed), (batch, pos), 0, cfg.d_vocab, dtype=jnp.int32)


@st.composite
def model_and_tokens(draw, cfg_strategy=None, *, max_batch: int = 3, min_pos: int = 2):
    """(model, tokens) pairs: a random model and valid tokens for it."""
    model = draw(models(cfg_strategy))
    return model, draw(tokens(model.cfg, max_batch=max_batch, min_pos=min_pos))


# A small pool of configs that together cover every normalization type, activation function and
# attn_only setting, with odd sizes. Drawing from it (instead of from all configs) lets jit reuse
# compiled programs across examples: hypothesis still varies the parameters, the token values and
# whatever the test draws (layers, heads, hook points). Use it where compile time dominates.
CONFIG_POOL: tuple[TransformerConfig, ...] = (
    TransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=7,
                      attn_only=True, normalization_type="LN", act_fn="gelu"),
    TransformerConfig(n_layers=2, d_model=6, n_heads=3, d_head=2, d_mlp=5, d_vocab=9, n_ctx=6,
                      attn_only=False, normalization_type="LN", act_fn="gelu_new"),
    TransformerConfig(n_layers=1, d_model=5, n_heads=1, d_head=5, d_mlp=7, d_vocab=13, n_ctx=5,
                      attn_only=False, normalization_type="LNPre", act_fn="relu"),
    TransformerConfig(n_layers=3, d_model=4, n_heads=2, d_head=2, d_mlp=3, d_vocab=7, n_ctx=8,
                      attn_only=False, normalization_type="RMS", act_fn="silu"),
    TransformerConfig(n_layers=2, d_model=6, n_heads=2, d_head=3, d_mlp=4, d_vocab=10, n_ctx=6,
                      attn_only=False, normalization_type="RMSPre", act_fn="gelu_fast"),
    TransformerConfig(n_layers=2, d_model=4, n_heads=4, d_head=1, d_vocab=8, n_ctx=5,
                      attn_only=True, normalization_type=None, act_fn="relu"),
    # d_model and n_heads * d_head whole 16-float vectors: the shapes the fused Numba kernels take
    TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=12, d_vocab=10, n_ctx=6,
                      attn_only=False, normalization_type="LN", act_fn="gelu"),
    TransformerConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_vocab=9, n_ctx=7,
                      attn_only=True, normalization_type="RMS", act_fn="relu"),
)


@st.composite
def pooled_model_and_tokens(draw, *, batch: int = 2, attention_backend: str = "auto"):
    """(model, tokens) with the config drawn from ``CONFIG_POOL``, random (noised) parameters and
    random tokens of a fixed shape per config ([batch, n_ctx]), so compiled programs are reused."""
    cfg = draw(st.sampled_from(CONFIG_POOL), label="cfg").replace(
        attention_backend=attention_backend)
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    model = random_params_like(HookedTransformer.from_config(cfg, seed=seed),
                               jax.random.key(seed ^ 0x5EED))
    toks = jax.random.randint(jax.random.fold_in(jax.random.key(seed), 1), (batch, cfg.n_ctx), 0,
                              cfg.d_vocab, dtype=jnp.int32)
    return model, toks


# ----------------------------------------------------------------------------- more strategies
@st.composite
def params(draw, cfg: TransformerConfig, *, scale: float = 0.3):
    """A params pytree for ``cfg``: the seeded init plus Gaussian noise (``scale``) on every leaf."""
    seed = draw(st.integers(0, 2**31 - 1), label="params_seed")
    model = HookedTransformer.from_config(cfg, seed=seed)
    return random_params_like(model, jax.random.key(seed ^ 0x5EED), scale).params


@st.composite
def clean_corrupted(draw, cfg: TransformerConfig, *, batch: int = 2, pos: int | None = None,
                    positions: Sequence[int] | None = None, max_changed: int = 1):
    """(clean [batch, pos], corrupted [batch, pos], changed positions): the two batches differ
    exactly at ``positions`` (drawn, up to ``max_changed`` of them, when None), in every row
    (each changed token is replaced by a different id)."""
    n = cfg.n_ctx if pos is None else pos
    if positions is None:
        positions = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=max_changed,
                                  unique=True), label="positions")
    positions = sorted(int(p) % n for p in positions)
    seed = draw(st.integers(0, 2**31 - 1), label="token_seed")
    k1, k2 = jax.random.split(jax.random.key(seed))
    clean = jax.random.randint(k1, (batch, n), 0, cfg.d_vocab, dtype=jnp.int32)
    shift = jax.random.randint(k2, (batch, len(positions)), 1, cfg.d_vocab, dtype=jnp.int32)
    idx = jnp.asarray(positions)
    corrupted = clean.at[:, idx].set((clean[:, idx] + shift) % cfg.d_vocab)
    return clean, corrupted, tuple(positions)


@st.composite
def planted_models(draw, kinds: Sequence[str] | None = None, *, max_layers: int = 3,
                   max_heads: int = 3, d_vocab: Sequence[int] = (5, 7), n_ctx: Sequence[int] = (8, 10),
                   max_distractor_scale: float = 0.5, attn_only: bool | None = True):
    """A ``tinyinterp.planted.PlantedModel`` with the planted heads ``kinds`` (drawn from
    ``planted.HEAD_KINDS`` when None) at drawn layers and head indices, among distractors at a
    drawn scale. Sizes come from small pools (fewer compilations)."""
    from tinyinterp import planted

    if kinds is None:
        kinds = draw(st.lists(st.sampled_from(planted.HEAD_KINDS), min_size=1, max_size=3,
                              unique=True), label="kinds")
    kinds = list(kinds)
    n_planted = len(set(kinds) | ({"previous_token"} if "induction" in kinds else set()))
    min_layers = 2 if "induction" in kinds else 1
    n_layers = draw(st.integers(min_layers, max(min_layers, max_layers)), label="n_layers")
    min_heads = max(1, -(-n_planted // n_layers))
    n_heads = draw(st.integers(min_heads, max(min_heads, max_heads)), label="n_heads")
    only = draw(st.booleans(), label="attn_only") if attn_only is None else attn_only
    return planted.planted_model(
        kinds, d_vocab=draw(st.sampled_from(list(d_vocab)), label="d_vocab"),
        n_ctx=draw(st.sampled_from(list(n_ctx)), label="n_ctx"), n_layers=n_layers,
        n_heads=n_heads, attn_only=only,
        distractor_scale=draw(st.floats(0.0, max_distractor_scale), label="distractor_scale"),
        seed=draw(st.integers(0, 2**31 - 1), label="seed"), attention_backend="xla")


@st.composite
def linear_models(draw, *, max_layers: int = 2, attn_only: bool | None = True):
    """A ``planted.linear_model`` (logits a known linear function of chosen input coordinates)
    with drawn sizes, placement and distractors."""
    from tinyinterp import planted

    n_features = draw(st.integers(2, 6), label="n_features")
    only = draw(st.booleans(), label="attn_only") if attn_only is None else attn_only
    return planted.linear_model(
        n_features=n_features, n_chosen=draw(st.integers(1, n_features), label="n_chosen"),
        n_layers=draw(st.integers(1, max_layers), label="n_layers"),
        n_heads=draw(st.integers(1, 2), label="n_heads"), attn_only=only,
        distractor_scale=draw(st.floats(0.0, 0.5), label="distractor_scale"),
        seed=draw(st.integers(0, 2**31 - 1), label="seed"), attention_backend="xla")


@st.composite
def superposition_models(draw):
    """A ``planted.superposition_model`` with drawn feature count, neurons, sparsity and layer."""
    from tinyinterp import planted

    n_features = draw(st.integers(3, 8), label="n_features")
    return planted.superposition_model(
        n_features=n_features, d_mlp=draw(st.integers(2, n_features - 1), label="d_mlp"),
        feature_probability=draw(st.floats(0.1, 0.9), label="feature_probability"),
        n_layers=draw(st.integers(1, 2), label="n_layers"),
        distractor_scale=draw(st.floats(0.0, 0.5), label="distractor_scale"),
        seed=draw(st.integers(0, 2**31 - 1), label="seed"), attention_backend="xla")
