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
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
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


# ============================================================================ property checks
# A method is any callable ``method(model, tokens, metric)`` returning attributions to the input
# embeddings: an array [batch, pos, d_model] (or [batch, pos]), or an object with ``.values`` (every
# tinyinterp.attribution result). Each check runs it, measures the property, and returns a
# CheckResult; on failure it raises CheckFailed (an AssertionError, so it reads well in pytest and
# inside a hypothesis test) unless ``raise_on_failure=False``.


class CheckFailed(AssertionError):
    """A property check failed; ``.result`` holds the CheckResult with the measured numbers."""

    def __init__(self, result: CheckResult):
        super().__init__(result.message)
        self.result = result


@dataclass(frozen=True)
class CheckResult:
    """What a check measured: ``measured`` and ``thresholds`` are {name: float}; ``message`` says
    in words what held or failed, on which example, by how much."""

    check: str
    method: str
    passed: bool
    measured: dict
    thresholds: dict
    message: str

    def __bool__(self) -> bool:
        return self.passed


def _name(method) -> str:
    if isinstance(method, str):
        return method
    return getattr(method, "__name__", None) or type(method).__name__


def _finish(check, method, passed, measured, thresholds, detail, raise_on_failure) -> CheckResult:
    measured = {k: float(v) for k, v in measured.items()}
    verdict = "passed" if passed else "FAILED"
    msg = f"{check} {verdict} for {_name(method)}: {detail}"
    result = CheckResult(check, _name(method), bool(passed), measured, dict(thresholds), msg)
    if not passed and raise_on_failure:
        raise CheckFailed(result)
    return result


def attributions(method, model, tokens, metric) -> np.ndarray:
    """``method(model, tokens, metric)`` as a float64 numpy array [batch, ...]."""
    out = method(model, tokens, metric)
    values = getattr(out, "values", out)
    a = np.asarray(values, dtype=np.float64)
    if a.ndim < 2 or a.shape[0] != np.shape(tokens)[0]:
        raise ValueError(f"{_name(method)} must return attributions [batch, pos, ...] for tokens "
                         f"{tuple(np.shape(tokens))}, got shape {a.shape}")
    return a


def per_position(a: np.ndarray) -> np.ndarray:
    """[batch, pos, ...] -> [batch, pos]: the signed sum over the other axes."""
    return a.reshape(a.shape[0], a.shape[1], -1).sum(-1)


def _metric_np(metric, logits, tokens) -> np.ndarray:
    return np.asarray(metric(logits, tokens), dtype=np.float64)


def metric_with_input_scaled(model, tokens, metric, keep) -> np.ndarray:
    """f with the input embeddings (hook_embed and hook_pos_embed) multiplied by ``keep``
    [n, batch, pos] (1 keeps a position, 0 zeroes it): -> [n, batch], one forward of n * batch."""
    tokens = jnp.asarray(tokens)
    keep = jnp.asarray(keep, jnp.float32)
    n, b, p = keep.shape
    tiled = jnp.broadcast_to(tokens[None], (n, b, p)).reshape(n * b, p)
    mask = keep.reshape(n * b, p, 1)

    def scale(v, *, name):
        del name
        return v * mask

    logits = model.run_with_hooks(tiled, [("hook_embed", scale), ("hook_pos_embed", scale)])
    logits = logits.reshape(n, b, *logits.shape[1:])
    return np.stack([_metric_np(metric, logits[i], tokens) for i in range(n)])


def metric_on_tokens(model, tokens_variants, tokens, metric) -> np.ndarray:
    """f on token variants [n, batch, pos] (the metric reads the original ``tokens``): [n, batch],
    one forward of n * batch sequences."""
    v = jnp.asarray(tokens_variants)
    n, b, p = v.shape
    logits = model(v.reshape(n * b, p)).reshape(n, b, p, -1)
    return np.stack([_metric_np(metric, logits[i], jnp.asarray(tokens)) for i in range(n)])


def check_completeness(method, model, tokens, metric, *, baseline: str | int = "zeros",
                       rtol: float = 1e-2, atol: float = 1e-4,
                       raise_on_failure: bool = True) -> CheckResult:
    """Completeness (Sundararajan et al. 2017; LRP's conservation): the attributions sum to
    f(x) - f(x'), x' the baseline ("zeros": zero input embeddings; an int: that token at every
    position, positions kept). Passes when |sum - (f(x) - f(x'))| <= atol + rtol * |f(x) - f(x')|
    in every example."""
    a = attributions(method, model, tokens, metric)
    b, p = np.shape(tokens)
    if isinstance(baseline, str):
        if baseline != "zeros":
            raise ValueError(f"baseline must be 'zeros' or an int token id, got {baseline!r}")
        f = metric_with_input_scaled(model, tokens, metric, np.stack([np.ones((b, p)),
                                                                      np.zeros((b, p))]))
    else:
        base = np.full((b, p), int(baseline), np.int32)
        f = metric_on_tokens(model, np.stack([np.asarray(tokens), base]), tokens, metric)
    delta = f[0] - f[1]
    total = a.reshape(b, -1).sum(-1)
    err = np.abs(total - delta)
    allowed = atol + rtol * np.abs(delta)
    worst = int(np.argmax(err - allowed))
    passed = bool(np.all(err <= allowed))
    return _finish("check_completeness", method, passed,
                   {"max_abs_error": err.max(), "max_rel_error": (err / np.maximum(np.abs(delta),
                                                                                  1e-12)).max()},
                   {"atol": atol, "rtol": rtol},
                   f"sum of attributions {total[worst]:.6g} vs f(x) - f(baseline) = "
                   f"{delta[worst]:.6g} in example {worst} (error {err[worst]:.3g}, allowed "
                   f"{allowed[worst]:.3g})", raise_on_failure)


def check_sensitivity(method, model, tokens, metric, *, baseline: str | int = "zeros",
                      min_correlation: float = 0.9, effect_tol: float = 1e-4,
                      zero_atol: float = 1e-7, raise_on_failure: bool = True) -> CheckResult:
    """Sensitivity (Sundararajan et al. 2017's Sensitivity(a), measured as Ancona et al. 2018's
    sensitivity-1): each position is removed in turn (its input embeddings zeroed, or its token
    replaced by the int ``baseline``), giving the effect delta_p = f(x) - f(x without p). Passes
    when every position with |delta_p| > effect_tol has a nonzero attribution (|attr_p| >
    zero_atol) and the Pearson correlation of the per-position attributions with delta over the
    batch is >= min_correlation."""
    a = per_position(attributions(method, model, tokens, metric))
    b, p = np.shape(tokens)
    if isinstance(baseline, str):
        keep = np.ones((p + 1, b, p))
        for i in range(p):
            keep[i + 1, :, i] = 0.0
        f = metric_with_input_scaled(model, tokens, metric, keep)
    else:
        toks = np.asarray(tokens)
        variants = np.repeat(toks[None], p + 1, axis=0)
        for i in range(p):
            variants[i + 1, :, i] = int(baseline)
        f = metric_on_tokens(model, variants, tokens, metric)
    delta = (f[0][None] - f[1:]).T  # [batch, pos]
    matters = np.abs(delta) > effect_tol
    missed = matters & (np.abs(a) <= zero_atol)
    corr = _pearson(a.ravel(), delta.ravel())
    passed = bool(not missed.any() and corr >= min_correlation)
    detail = (f"correlation of attributions with the effect of removing each position {corr:.3f} "
              f"(need >= {min_correlation}); {int(missed.sum())} positions that change f got a "
              "zero attribution")
    if missed.any():
        bi, pi = map(int, np.argwhere(missed)[0])
        detail += f" (first: example {bi}, position {pi}, effect {delta[bi, pi]:.4g})"
    return _finish("check_sensitivity", method, passed,
                   {"correlation": corr, "missed": missed.sum()},
                   {"min_correlation": min_correlation, "zero_atol": zero_atol}, detail,
                   raise_on_failure)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else (1.0 if np.allclose(x, y) else 0.0)


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def check_dummy(method, model, tokens, metric, dummy, *, atol: float = 1e-6,
                raise_on_failure: bool = True) -> CheckResult:
    """Dummy (Sundararajan et al.'s Sensitivity(b)): features the model's output does not depend
    on get zero attribution. ``dummy``: a bool mask broadcastable to the attributions' shape
    (e.g. [d_model] for input coordinates, [batch, pos] for positions) marking those features.
    Passes when max |attr| over them <= atol * max(1, max |attr|)."""
    a = attributions(method, model, tokens, metric)
    mask = np.asarray(dummy, bool)
    if mask.ndim == 2 and a.ndim == 3 and mask.shape == a.shape[:2]:
        mask = mask[..., None]
    mask = np.broadcast_to(mask, a.shape)
    if not mask.any():
        raise ValueError("check_dummy needs at least one dummy feature (the mask is all False)")
    on_dummy = np.abs(a[mask]).max()
    scale = max(1.0, float(np.abs(a).max()))
    passed = bool(on_dummy <= atol * scale)
    return _finish("check_dummy", method, passed,
                   {"max_on_dummy": on_dummy, "max_overall": np.abs(a).max()}, {"atol": atol},
                   f"largest |attribution| on a feature the output ignores: {on_dummy:.3g} "
                   f"(allowed {atol * scale:.3g}; largest overall {np.abs(a).max():.3g})",
                   raise_on_failure)


def _metric_key(m):
    """A hashable key for a metric: a built-in Metric by value (so equal metrics hit the same
    compiled program), anything else by identity."""
    fields = getattr(m, "__dataclass_fields__", None)
    if fields is None or not {"kind", "pos", "correct", "wrong"} <= set(fields):
        return ("id", id(m))
    ids = tuple(None if getattr(m, f) is None else tuple(np.asarray(getattr(m, f)).ravel().tolist())
                for f in ("correct", "wrong"))
    return (m.kind, m.pos, ids)


class _Combined:
    """c_a f_a + c_b f_b as a metric, hashable by value (methods that compile per metric reuse
    the compiled program for an equal combination)."""

    def __init__(self, ca, cb, fa, fb):
        self.ca, self.cb, self.fa, self.fb = ca, cb, fa, fb
        self.__name__ = "combined_metric"

    def __call__(self, logits, tokens):
        return self.ca * self.fa(logits, tokens) + self.cb * self.fb(logits, tokens)

    def _key(self):
        return (self.ca, self.cb, _metric_key(self.fa), _metric_key(self.fb))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Combined) and self._key() == other._key()


def check_linearity(method, model, tokens, metric_a, metric_b, *, coefficients=(1.0, -0.5),
                    rtol: float = 1e-3, atol: float = 1e-5,
                    raise_on_failure: bool = True) -> CheckResult:
    """Linearity (Sundararajan et al. 2017): the attribution of c_a f_a + c_b f_b equals
    c_a attr(f_a) + c_b attr(f_b). Passes within atol + rtol * max |attr|."""
    ca, cb = (float(c) for c in coefficients)
    both = attributions(method, model, tokens, _Combined(ca, cb, metric_a, metric_b))
    sep = ca * attributions(method, model, tokens, metric_a) + cb * attributions(
        method, model, tokens, metric_b)
    err = np.abs(both - sep).max()
    allowed = atol + rtol * max(np.abs(both).max(), np.abs(sep).max())
    return _finish("check_linearity", method, bool(err <= allowed),
                   {"max_abs_error": err}, {"atol": atol, "rtol": rtol},
                   f"attr({ca:g} f_a + {cb:g} f_b) differs from {ca:g} attr(f_a) + {cb:g} "
                   f"attr(f_b) by up to {err:.3g} (allowed {allowed:.3g})", raise_on_failure)


def equivalent_models(model: HookedTransformer, seed: int = 0) -> dict[str, HookedTransformer]:
    """Models that compute exactly the same function as ``model`` with other weights:
    "permuted_heads" (every layer's heads in a drawn order), "rescaled_ov" (each head's W_V and
    b_V times c, W_O divided by c, c drawn in [0.5, 2]), "extra_layer" (an empty layer
    inserted before layer 0: every weight and bias zero, so it writes nothing)."""
    rng = np.random.default_rng(seed)
    cfg, P = model.cfg, model.params
    heads = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
    perm = [dict(blk, attn={**blk["attn"], **{k: blk["attn"][k][jnp.asarray(order)] for k in heads}})
            for blk, order in ((blk, rng.permutation(cfg.n_heads)) for blk in P["blocks"])]
    scaled = []
    for blk in P["blocks"]:
        c = jnp.asarray(rng.uniform(0.5, 2.0, cfg.n_heads), jnp.float32)
        at = blk["attn"]
        scaled.append(dict(blk, attn={**at, "W_V": at["W_V"] * c[:, None, None],
                                      "b_V": at["b_V"] * c[:, None],
                                      "W_O": at["W_O"] / c[:, None, None]}))
    empty = jax.tree_util.tree_map(jnp.zeros_like, P["blocks"][0])
    for norm in ("ln1", "ln2"):  # a norm's weight is 1 (it multiplies a zero output anyway)
        if norm in empty and "w" in empty[norm]:
            empty[norm] = {**empty[norm], "w": jnp.ones_like(empty[norm]["w"])}
    extra_cfg = cfg.replace(n_layers=cfg.n_layers + 1)
    return {
        "permuted_heads": model.with_params({**P, "blocks": perm}),
        "rescaled_ov": model.with_params({**P, "blocks": scaled}),
        "extra_layer": HookedTransformer(extra_cfg, {**P, "blocks": [empty, *P["blocks"]]}),
    }


def _same_function(model, other, tokens, what: str) -> None:
    a, b = np.asarray(model(tokens)), np.asarray(other(tokens))
    if not np.allclose(a, b, atol=1e-4, rtol=1e-4):
        raise ValueError(f"{what}: the models do not compute the same function (logits differ by "
                         f"{np.abs(a - b).max():.3g}); the check needs functionally equal models")


def check_implementation_invariance(method, model, tokens, metric, *, equivalents=None,
                                    rtol: float = 1e-3, atol: float = 1e-5, seed: int = 0,
                                    raise_on_failure: bool = True) -> CheckResult:
    """Implementation invariance (Sundararajan et al. 2017): functionally equal networks get equal
    attributions. ``equivalents``: {name: model computing the same function}
    (default ``equivalent_models(model, seed)``: permuted heads, rescaled OV, an extra empty
    layer). Passes when each one's attributions equal the model's within atol + rtol * max
    |attr|."""
    equivalents = equivalent_models(model, seed) if equivalents is None else equivalents
    base = attributions(method, model, tokens, metric)
    errs = {}
    for name, other in equivalents.items():
        _same_function(model, other, tokens, f"check_implementation_invariance[{name}]")
        errs[name] = np.abs(attributions(method, other, tokens, metric) - base).max()
    allowed = atol + rtol * np.abs(base).max()
    worst = max(errs, key=errs.get)
    return _finish("check_implementation_invariance", method, bool(errs[worst] <= allowed),
                   {f"max_abs_error[{k}]": v for k, v in errs.items()},
                   {"atol": atol, "rtol": rtol},
                   f"attributions on the equivalent model {worst!r} differ by up to "
                   f"{errs[worst]:.3g} (allowed {allowed:.3g})", raise_on_failure)


def shifted_input_model(model: HookedTransformer, shift) -> HookedTransformer:
    """Kindermans et al. (2017)'s input shift: every token embedding moved by the constant
    ``shift`` [d_model], and every reader of the residual stream (queries, keys, values, MLP
    inputs, the unembedding) compensating through its bias, so the model computes the same
    function of the tokens. Needs normalization_type None (a norm would not pass the shift on)."""
    cfg, P = model.cfg, model.params
    if cfg.normalization_type is not None:
        raise ValueError("the input-shift model needs normalization_type=None (a norm re-scales "
                         f"the shifted residual); this model has {cfg.normalization_type!r}")
    c = jnp.asarray(shift, jnp.float32)
    if c.shape != (cfg.d_model,):
        raise ValueError(f"shift must be a vector [d_model={cfg.d_model}], got {c.shape}")
    blocks = []
    for blk in P["blocks"]:
        at = blk["attn"]
        # c [d_model] @ W [head, d_model, d_head] -> [head, d_head]
        at = {**at, **{f"b_{k}": at[f"b_{k}"] - jnp.einsum("m,hmd->hd", c, at[f"W_{k}"])
                       for k in "QKV"}}
        new = dict(blk, attn=at)
        if not cfg.attn_only:
            new["mlp"] = {**blk["mlp"], "b_in": blk["mlp"]["b_in"] - c @ blk["mlp"]["W_in"]}
        blocks.append(new)
    return model.with_params({**P, "embed": {"W_E": P["embed"]["W_E"] + c[None]},
                              "blocks": blocks,
                              "unembed": {**P["unembed"],
                                          "b_U": P["unembed"]["b_U"] - c @ P["unembed"]["W_U"]}})


def check_input_invariance(method, model, tokens, metric, *, shift=None, seed: int = 0,
                           rtol: float = 1e-3, atol: float = 1e-5,
                           raise_on_failure: bool = True) -> CheckResult:
    """Input invariance (Kindermans et al. 2017, "The (Un)reliability of saliency methods"): a
    constant shift of the token embeddings, compensated inside the model
    (``shifted_input_model``), changes nothing the model computes, so the attributions must not
    change either. ``shift`` defaults to a drawn vector of norm ~ the embeddings'. Passes when
    they are equal within atol + rtol * max |attr|. (Gradients pass; gradient x input and
    integrated gradients from a zero baseline do not: their baseline does not move.)"""
    if shift is None:
        scale = float(np.asarray(jnp.std(model.params["embed"]["W_E"]))) or 1.0
        shift = scale * np.random.default_rng(seed).standard_normal(model.cfg.d_model)
    other = shifted_input_model(model, shift)
    _same_function(model, other, tokens, "check_input_invariance")
    base = attributions(method, model, tokens, metric)
    err = np.abs(attributions(method, other, tokens, metric) - base).max()
    allowed = atol + rtol * np.abs(base).max()
    return _finish("check_input_invariance", method, bool(err <= allowed),
                   {"max_abs_error": err}, {"atol": atol, "rtol": rtol},
                   f"attributions after a constant shift of the input embeddings (the function "
                   f"unchanged) differ by up to {err:.3g} (allowed {allowed:.3g})",
                   raise_on_failure)


def randomised_models(model: HookedTransformer, seed: int = 0) -> list[tuple[str, HookedTransformer]]:
    """Adebayo et al. (2018)'s cascading randomisation: the unembedding, then layer L-1, ...,
    layer 0 re-drawn in turn (each weight matrix from a normal with its own std, or
    ``initializer_range`` where that is 0), keeping what was re-drawn before. The embeddings,
    which are the input the attributions are about, are kept."""
    rng = np.random.default_rng(seed)
    cfg = model.cfg

    def redraw(tree):
        def leaf(path, x):
            name = str(path[-1].key) if hasattr(path[-1], "key") else ""
            if not name.startswith("W_"):
                return x
            std = float(np.asarray(jnp.std(x))) or cfg.initializer_range
            return jnp.asarray(std * rng.standard_normal(x.shape), jnp.float32)
        return jax.tree_util.tree_map_with_path(leaf, tree)

    P = model.params
    out = []
    P = {**P, "unembed": redraw(P["unembed"])}
    out.append(("unembed", model.with_params(P)))
    for layer in reversed(range(cfg.n_layers)):
        blocks = list(P["blocks"])
        blocks[layer] = redraw(blocks[layer])
        P = {**P, "blocks": blocks}
        out.append((f"blocks.{layer}", model.with_params(P)))
    return out


def check_model_randomisation(method, model, tokens, metric, *, max_similarity: float = 0.6,
                              seed: int = 0, raise_on_failure: bool = True) -> CheckResult:
    """Model-parameter randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"):
    re-drawing the weights layer by layer from the top (``randomised_models``) must change the
    attributions. Similarity: the Spearman rank correlation of |attributions| with the original
    ones, per example (over the entries not zero in both), averaged. Passes when it is
    <= max_similarity at every step of the cascade."""
    base = np.abs(attributions(method, model, tokens, metric))
    sims = {}
    for name, m in randomised_models(model, seed):
        a = np.abs(attributions(method, m, tokens, metric))
        per_example = []
        for x, y in zip(base, a, strict=True):
            live = (x.ravel() != 0) | (y.ravel() != 0)  # entries zero in both carry no ranking
            per_example.append(_pearson(_ranks(x.ravel()[live]), _ranks(y.ravel()[live])))
        sims[name] = float(np.mean(per_example))
    worst = max(sims, key=sims.get)
    return _finish("check_model_randomisation", method, bool(sims[worst] <= max_similarity),
                   {f"similarity[{k}]": v for k, v in sims.items()},
                   {"max_similarity": max_similarity},
                   f"after re-drawing up to {worst!r} the attributions' rank correlation with "
                   f"the trained model's is {sims[worst]:.3f} (allowed <= {max_similarity})",
                   raise_on_failure)


def recovery_scores(scores, planted) -> tuple[float, float]:
    """(top-k recall, AUROC) of ``scores`` (higher = more important) against the bool mask
    ``planted`` of the same shape, k = the number of planted components. AUROC counts ties as
    one half."""
    s = np.asarray(scores, np.float64).ravel()
    m = np.asarray(planted, bool).ravel()
    if s.shape != m.shape:
        raise ValueError(f"scores {np.shape(scores)} and planted mask {np.shape(planted)} differ")
    if not m.any() or m.all():
        raise ValueError("recovery needs planted and non-planted components")
    s = np.nan_to_num(s, nan=-np.inf)
    k = int(m.sum())
    top = np.argsort(-s, kind="stable")[:k]
    recall = float(m[top].mean())
    pos, neg = s[m], s[~m]
    auroc = float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum())
                  / (len(pos) * len(neg)))
    return recall, auroc


def check_recovers_planted(scores, planted, *, min_recall: float = 1.0, min_auroc: float = 0.95,
                           method=None, raise_on_failure: bool = True) -> CheckResult:
    """A method's component scores (e.g. [n_layers, n_heads], higher = more important) rank the
    planted components (``planted``: a bool mask of the same shape, e.g.
    ``ground_truth.head_mask()``) first: top-k recall >= min_recall (k = the number planted) and
    AUROC >= min_auroc."""
    recall, auroc = recovery_scores(scores, planted)
    passed = recall >= min_recall and auroc >= min_auroc
    return _finish("check_recovers_planted", method or "scores", passed,
                   {"top_k_recall": recall, "auroc": auroc},
                   {"min_recall": min_recall, "min_auroc": min_auroc},
                   f"top-{int(np.sum(planted))} recall {recall:.2f} (need >= {min_recall}), "
                   f"AUROC {auroc:.3f} (need >= {min_auroc})", raise_on_failure)


@dataclass(frozen=True)
class FaithfulnessCurves:
    """Deletion and insertion curves [batch, pos + 1] (f after k tokens replaced by / restored
    from the baseline token, most important first) and their AOPC [batch]: the mean of
    f(x) - f(x with k deleted) over k = 0..pos (higher = the attribution found what matters), and
    the mean of f(x with k inserted) - f(baseline) (higher is better too)."""

    deletion: np.ndarray
    insertion: np.ndarray
    aopc_deletion: np.ndarray
    aopc_insertion: np.ndarray
    order: np.ndarray  # [batch, pos]: positions, most important first
    baseline_token: int


def faithfulness_curves(model, tokens, metric, scores, *, baseline_token: int = 0
                        ) -> FaithfulnessCurves:
    """Deletion and insertion curves (Samek et al. 2017's AOPC; Petsiuk et al. 2018's
    insertion) for per-position ``scores`` [batch, pos] (or attributions [batch, pos, ...],
    summed per position): positions replaced by ``baseline_token`` one at a time, highest score
    first; every step of every example runs in one batched forward."""
    s = np.asarray(getattr(scores, "values", scores), np.float64)
    s = per_position(s) if s.ndim > 2 else s
    toks = np.asarray(tokens)
    b, p = toks.shape
    if s.shape != (b, p):
        raise ValueError(f"scores must be [batch, pos] = {(b, p)} (or [batch, pos, ...]), got "
                         f"{s.shape}")
    order = np.argsort(-s, axis=1, kind="stable")
    deleted = np.repeat(toks[None], p + 1, axis=0)  # [k, batch, pos]
    inserted = np.full((p + 1, b, p), int(baseline_token), toks.dtype)
    for k in range(1, p + 1):
        rows = np.arange(b)
        deleted[k:, rows, order[:, k - 1]] = int(baseline_token)
        inserted[k:, rows, order[:, k - 1]] = toks[rows, order[:, k - 1]]
    f = metric_on_tokens(model, np.concatenate([deleted, inserted]).astype(np.int32), tokens,
                         metric)
    dele, ins = f[: p + 1].T, f[p + 1:].T  # [batch, pos + 1]
    return FaithfulnessCurves(deletion=dele, insertion=ins,
                              aopc_deletion=np.mean(dele[:, :1] - dele, axis=1),
                              aopc_insertion=np.mean(ins - ins[:, :1], axis=1),
                              order=order, baseline_token=int(baseline_token))


@st.composite
def rasp_programs(draw, *, vocab=frozenset({1, 2, 3}), max_seq_len: int = 4, max_ops: int = 2,
                  n_inputs: int = 2):
    """(program, tracr-compiled model, inputs): a small categorical RASP program (a chain of up to
    ``max_ops`` drawn operations: Map (x * a + b) mod 4, SequenceMap (x + y) mod 4, Aggregate of a
    select by index offset), compiled with ``causal=True`` and a BOS, and ``n_inputs`` drawn
    input sequences ["BOS", ...] of one drawn length. Needs tracr (the ``[tracr]`` extra)."""
    from tracr.compiler import compiling
    from tracr.rasp import rasp

    sops = [rasp.tokens]
    for _ in range(draw(st.integers(1, max_ops), label="n_ops")):
        kind = draw(st.sampled_from(["map", "sequence_map", "aggregate"]), label="op")
        x = draw(st.sampled_from(sops), label="operand")
        if kind == "map":
            a, b = draw(st.integers(1, 3), label="a"), draw(st.integers(0, 3), label="b")
            new = rasp.Map(lambda v, a=a, b=b: (v * a + b) % 4, x)
        elif kind == "sequence_map":
            y = draw(st.sampled_from(sops), label="operand2")
            new = rasp.SequenceMap(lambda u, v: (u + v) % 4, x, y)
        else:
            shift = draw(st.integers(0, 2), label="shift")
            select = rasp.Select(rasp.indices, rasp.indices, lambda k, q, s=shift: q == k + s)
            new = rasp.Aggregate(select, x)
        sops.append(rasp.categorical(new))
    program = sops[-1]
    with jax.numpy_dtype_promotion("standard"):  # tracr's own code mixes int and float
        assembled = compiling.compile_rasp_to_model(program, vocab=set(vocab),
                                                    max_seq_len=max_seq_len, compiler_bos="BOS",
                                                    causal=True)
    length = draw(st.integers(1, max_seq_len), label="length")
    inputs = [["BOS"] + draw(st.lists(st.sampled_from(sorted(vocab)), min_size=length,
                                      max_size=length), label="input")
              for _ in range(n_inputs)]
    return program, assembled, inputs
