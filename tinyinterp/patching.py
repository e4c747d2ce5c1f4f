"""Causal interventions: activation, attribution and path patching, and ablations.

Activation patching (Meng et al. 2022, "Locating and editing factual associations in GPT";
Heimersheim & Nanda 2024, "How to use and interpret activation patching") runs the model on a
*target* input and replaces one activation by its value from a *source* run, then reads a metric.
Which run is which is the caller's choice:

* denoising: target = corrupted tokens, source = the clean cache (does this activation suffice to
  restore the behaviour?);
* noising: target = clean tokens, source = the corrupted cache (is it necessary?).

``PatchResult.normalized()`` gives (patched - target) / (source - target) in either direction: the
fraction of the source run's effect that the patch carries.

TransformerLens' family (``get_act_patch_resid_pre`` ... ``get_act_patch_block_every``) keeps TL's
names, argument order ``(model, corrupted_tokens, clean_cache, patching_metric)`` and output shapes;
the metric follows tinyinterp's contract ``fn(logits, tokens) -> [batch]`` (TL's returns a scalar:
drop its ``.mean()``), and results average it over the batch (``reduce=None`` keeps the batch).

Every sweep is ONE compiled program: the unpatched target run (whose residual stream gives each
patched run its starting point: a patch at layer L starts at ``start_at_layer=L``, because the
layers before L are unchanged) and every patched run, batched over the patch index (the patch axis
folded into the model's batch axis, so the attention kernels see one big batch), in chunks of
``chunk_size`` patches under ``jax.lax.map`` to bound memory.

Attribution patching (Nanda 2023, "Attribution patching"; Syed, Rager & Conmy 2023, "Attribution
patching outperforms automated circuit discovery") estimates every patch of a family from one
forward and one backward pass: metric(patched) ~ metric(target) + grad . (source - target).

Path patching (Wang et al. 2022, IOI; Goldowsky-Dill et al. 2023, "Localizing model behavior with
path patching") measures sender heads' effect through chosen receivers only (see ``path_patch``).

Ablations (zero, mean, resample) are patches from a synthetic source: ``ablation_hook`` for
``run_with_hooks`` and ``ablate`` for the ablated metric (or a sweep of them).

Axis names: layer, pos, head, d_head, d_model, neuron (= d_mlp), query_pos (alias dest_pos),
key_pos (alias src_pos), d_vocab. ``head_index`` is accepted for ``head``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from tinyinterp import sweeps
from tinyinterp.attribution import check_metric_position, logits_for_metric
from tinyinterp.config import TransformerConfig
from tinyinterp.hooks import get_act_name, hook_names, unknown_hook_error
from tinyinterp.model import HookedTransformer, check_tokens, forward, forward_with_cache

Metric = Callable[[jax.Array, jax.Array], jax.Array]  # fn(logits, tokens) -> [batch]

# ----------------------------------------------------------------------------- axes of hook points
_AXIS_ALIASES = {"head_index": "head", "dest_pos": "query_pos", "src_pos": "key_pos",
                 "d_mlp": "neuron"}


def hook_axes(name: str) -> tuple[str, ...]:
    """The axis names of a hook point's activation after the batch axis, e.g.
    ``("pos", "head", "d_head")`` for ``blocks.0.attn.hook_z``."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("hook_q", "hook_k", "hook_v", "hook_z"):
        return ("pos", "head", "d_head")
    if leaf == "hook_result":
        return ("pos", "head", "d_model")
    if leaf in ("hook_attn_scores", "hook_pattern"):
        return ("head", "query_pos", "key_pos")
    if name.endswith(("mlp.hook_pre", "mlp.hook_post")):
        return ("pos", "neuron")
    if leaf == "hook_scale":
        return ("pos", "scale")
    if name == "unembed.hook_out":
        return ("pos", "d_vocab")
    return ("pos", "d_model")


def _canon_axis(axis: str, name: str, axes: Sequence[str]) -> str:
    if not isinstance(axis, str):
        raise TypeError(f"axis names must be strings, got {axis!r}")
    a = _AXIS_ALIASES.get(axis, axis)
    if a not in axes:
        raise ValueError(f"hook point {name!r} has no axis {axis!r}; its axes after batch are "
                         f"{list(axes)} (aliases: {_AXIS_ALIASES})")
    return a


def _start_layer(name: str, cfg: TransformerConfig) -> int | None:
    """The block where a patch of this hook point takes effect (None: the embedding)."""
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    if name.startswith(("ln_final", "unembed")):
        return cfg.n_layers
    return None


def _resid_before(layer: int, cfg: TransformerConfig) -> str:
    """The hook point holding the residual stream that enters block ``layer`` (or the unembed)."""
    if layer < cfg.n_layers:
        return f"blocks.{layer}.hook_resid_pre"
    return f"blocks.{cfg.n_layers - 1}.hook_resid_post"


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class PatchResult:
    """A labelled array of metric values, one per patch.

    ``values`` has one axis per name in ``axes`` (``labels[i]`` labels axis i: layer numbers,
    positions, head numbers, patch types) and, with ``reduce=None``, a last axis "batch".
    ``baseline`` is the metric of the unpatched target run and ``source`` that of the source run
    (None when the source cache lacks ``blocks.0.hook_resid_pre``), reduced the same way.
    ``method`` is "activation", "attribution", "path" or "ablation"; ``settings`` records the rest.
    """

    values: np.ndarray
    axes: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    baseline: np.ndarray
    source: np.ndarray | None
    method: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.values, dtype=dtype)

    def __getitem__(self, item):
        return self.values[item]

    def effect(self) -> np.ndarray:
        """patched - baseline: what each patch changed."""
        return self.values - _expand(self.baseline, self.values)

    def normalized(self) -> np.ndarray:
        """(patched - target) / (source - target): 0 = no effect, 1 = the whole source run's effect
        (Heimersheim & Nanda 2024, sec. 3). Needs ``source``."""
        if self.source is None:
            raise ValueError("normalized() needs the source run's metric: cache "
                             "blocks.0.hook_resid_pre in the source run (run_with_cache default "
                             "names_filter=None caches it)")
        span = _expand(self.source - self.baseline, self.values)
        return self.effect() / span

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, e.g. for JSON or a DataFrame."""
        return {"values": np.asarray(self.values).tolist(), "axes": list(self.axes),
                "labels": [list(lab) for lab in self.labels],
                "baseline": np.asarray(self.baseline).tolist(),
                "source": None if self.source is None else np.asarray(self.source).tolist(),
                "method": self.method, "settings": dict(self.settings)}

    def plot(self, ax=None, *, normalized: bool = False, title: str | None = None):
        """A matplotlib Figure: a line for 1 axis, a heatmap for 2, one heatmap per entry of the
        first axis for 3 or 4 (the last axes flattened); axes named and labelled; a "batch" axis
        (reduce=None) is averaged."""
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        v = self.normalized() if normalized else self.values
        axes, labels = self.axes, self.labels
        if axes and axes[-1] == "batch":  # reduce=None: plot the batch mean
            v, axes, labels = v.mean(axis=-1), axes[:-1], labels[:-1]
        if len(axes) >= 4:
            v = v.reshape(v.shape[0], v.shape[1], -1)
            axes = (axes[0], axes[1], " x ".join(axes[2:]))
            labels = (labels[0], labels[1], tuple(str(i) for i in range(v.shape[2])))
        title = title or f"{self.method} patching: {self.settings.get('hook', '')}"
        if len(axes) <= 2:
            fig, a = (plt.subplots(figsize=(6, 4)) if ax is None else (ax.figure, ax))
            panels = [(a, v, title)]
        else:
            n = v.shape[0]
            fig, a_list = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
            panels = [(a_list[0, i], v[i], f"{axes[0]} {labels[0][i]}") for i in range(n)]
            fig.suptitle(title)
            axes, labels = axes[1:], labels[1:]
        lim = float(np.nanmax(np.abs(v))) if v.size else 1.0
        for a, data, t in panels:
            if data.ndim == 0:
                a.bar([0], [float(data)])
            elif data.ndim == 1:
                a.plot(np.arange(data.shape[0]), data, marker="o")
                a.set_xlabel(axes[-1])
                a.set_ylabel("normalized" if normalized else "metric")
            else:
                im = a.imshow(data, cmap="RdBu", vmin=-lim if normalized else None,
                              vmax=lim if normalized else None, aspect="auto")
                a.set_ylabel(axes[-2])
                a.set_xlabel(axes[-1])
                if len(labels[-2]) <= 32:
                    a.set_yticks(range(len(labels[-2])), labels[-2])
                fig.colorbar(im, ax=a)
            a.set_title(t)
        return fig


def _expand(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    """baseline [] or [batch] broadcast against values [*axes] or [*axes, batch]."""
    x = np.asarray(x)
    return x.reshape((1,) * (like.ndim - x.ndim) + x.shape)


# ----------------------------------------------------------------------------- validation
def _check_model(model) -> HookedTransformer:
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"model must be a tinyinterp HookedTransformer, got {type(model).__name__}")
    return model


def _check_hook(name: str, cfg: TransformerConfig) -> str:
    if not isinstance(name, str):
        raise TypeError(f"hook must be a hook point name (str), got {name!r}")
    valid = hook_names(cfg)
    if name not in valid:
        raise unknown_hook_error(name, valid)
    return name


def check_metric(metric: Metric, logits_shape: tuple[int, ...], tokens: jax.Array) -> None:
    """A metric must be ``fn(logits, tokens) -> [batch]`` (one value per example): checked
    abstractly (no computation) before a sweep compiles."""
    if not callable(metric):
        raise TypeError(f"metric must be a callable fn(logits, tokens) -> [batch], got {metric!r}")
    check_metric_position(metric, logits_shape[1])
    try:
        out = jax.eval_shape(metric, jax.ShapeDtypeStruct(logits_shape, jnp.float32),
                             jax.ShapeDtypeStruct(tokens.shape, tokens.dtype))
    except TypeError as e:
        raise TypeError(f"metric must take (logits, tokens) and return [batch]; calling it "
                        f"failed: {e}") from e
    if not hasattr(out, "shape") or tuple(out.shape) != (logits_shape[0],):
        got = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
        raise ValueError(
            f"metric must return one value per example, shape (batch,) = ({logits_shape[0]},), got "
            f"{got}. A TransformerLens-style metric that returns a scalar (e.g. ends in .mean()) "
            "should return the per-example values instead; results are averaged over the batch")


def _source_activation(source_cache: Mapping, name: str, target_shape: tuple[int, ...]
                       ) -> jax.Array:
    if not isinstance(source_cache, Mapping):
        raise TypeError(f"source_cache must be an ActivationCache (or a mapping hook name -> "
                        f"activation), got {type(source_cache).__name__}")
    if name not in source_cache:
        raise KeyError(f"source_cache has no activation {name!r}: cache it in the source run, "
                       f"e.g. model.run_with_cache(source_tokens) (all hook points) or "
                       f"names_filter=[{name!r}, ...]")
    src = jnp.asarray(source_cache[name])
    if tuple(src.shape) != tuple(target_shape):
        raise ValueError(
            f"source and target runs differ in shape at {name!r}: source {tuple(src.shape)} vs "
            f"target {tuple(target_shape)}. Patching needs the same batch size and number of "
            "positions in both runs (pad or truncate the prompts to one length)")
    if src.dtype != jnp.float32:
        src = src.astype(jnp.float32)
    return src


def _activation_shapes(model: HookedTransformer, tokens: jax.Array, names: Sequence[str]
                       ) -> dict[str, tuple[int, ...]]:
    """Shapes of the target run's activations at ``names`` and of its logits (key "logits"),
    computed abstractly."""
    out = jax.eval_shape(lambda p, t: forward_with_cache(p, model.cfg, t, frozenset(names)),
                         model.params, tokens)
    shapes = {k: tuple(v.shape) for k, v in out[1].items()}
    shapes["logits"] = tuple(out[0].shape)
    return shapes


def _axis_mask(value, axis: str, dim: int, name: str) -> np.ndarray:
    """An index along one axis (int, sequence of ints, slice) -> a boolean mask [dim]."""
    mask = np.zeros(dim, dtype=bool)
    if isinstance(value, slice):
        mask[value] = True
        return mask
    items = [value] if isinstance(value, (int, np.integer)) else list(np.asarray(value).ravel())
    for i in items:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index {axis}={value!r} for {name!r}: use an int, a list of ints or a "
                            "slice")
        if not -dim <= int(i) < dim:
            raise IndexError(f"index {axis}={int(i)} is outside {name!r}'s {axis} axis, which has "
                             f"{dim} entries (valid: 0..{dim - 1}, or negative from the end)")
        mask[int(i)] = True
    return mask


def _base_mask(index: Mapping | None, name: str, shape: tuple[int, ...],
               over: Sequence[str] = ()) -> np.ndarray:
    """``index`` ({axis: int | ints | slice}, None = everything) -> a boolean mask over the
    activation's non-batch shape."""
    axes = hook_axes(name)
    mask = np.ones(shape, dtype=bool)
    if index is None:
        return mask
    if not isinstance(index, Mapping):
        raise TypeError(f"index must be a dict {{axis: int | list of ints | slice}} or None (the "
                        f"whole activation), got {index!r}; {name!r} has axes {list(axes)}")
    for axis, value in index.items():
        a = _canon_axis(axis, name, axes)
        if a in over:
            raise ValueError(f"axis {a!r} is both indexed and swept over; give it in one of "
                             "index or over")
        i = axes.index(a)
        m = _axis_mask(value, a, shape[i], name)
        mask &= m.reshape((1,) * i + (shape[i],) + (1,) * (len(shape) - i - 1))
    return mask


# ----------------------------------------------------------------------------- the sweep engine
def _split_metric(metric) -> tuple[tuple, tuple]:
    """A metric -> (dynamic leaves, static part), so a pytree metric (tinyinterp.attribution's,
    whose token ids are leaves) is traced and a plain function is a static argument of the jit."""
    leaves, treedef = jax.tree_util.tree_flatten(metric)
    if len(leaves) == 1 and leaves[0] is metric:
        return (), ("fn", metric)
    return tuple(leaves), ("tree", treedef)


def _join_metric(leaves: tuple, static: tuple) -> Metric:
    kind, x = static
    return x if kind == "fn" else jax.tree_util.tree_unflatten(x, leaves)


@dataclass(frozen=True)
class _Group:
    """Patches of one hook point: every combination of the ``swept`` axes (in that order), each
    restricted by the base mask."""

    name: str
    start: int | None  # start_at_layer of the patched runs (None: from the tokens)
    shape: tuple[int, ...]  # activation shape after batch
    axes: tuple[str, ...]
    swept: tuple[str, ...]

    @property
    def sweep_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[self.axes.index(a)] for a in self.swept)


def _patch_masks(group: _Group, base: jax.Array, idx: jax.Array) -> jax.Array:
    """Masks [k, *shape] for k patches: the base mask and, per swept axis, idx[:, j] only."""
    m = base[None]  # [1, *shape]
    for j, a in enumerate(group.swept):
        i = group.axes.index(a)
        dim = group.shape[i]
        one_hot = jnp.arange(dim, dtype=jnp.int32)[None, :] == idx[:, j][:, None]  # [k, dim]
        # [k, dim] -> [k, 1, .., dim, .., 1] (dim at axis i + 1)
        m = m & one_hot.reshape((idx.shape[0],) + (1,) * i + (dim,) + (1,) * (len(group.shape) - i - 1))
    return m


def _chunks(n: int, chunk_size: int) -> tuple[int, int]:
    k = max(1, min(chunk_size, n))
    return k, -(-n // k)


def _auto_chunk(cfg: TransformerConfig, batch: int, n_pos: int, n_patches: int,
                budget_bytes: int = 16 * 2**20) -> int:
    """Patches per chunk so that one chunk's activations stay near ``budget_bytes``: per patched
    example, the residual-sized tensors, the attention pattern and the logits (float32). Small
    chunks that stay in cache run faster: on the benchmark's sweeps (shared 2-core machine)
    chunks of 4-8 patches (32-64 sequences) beat 64-128 by 1.5-4x on both backends."""
    d_mlp = 0 if cfg.attn_only else cfg.d_mlp
    per_example = n_pos * (6 * cfg.d_model + 2 * cfg.n_heads * n_pos + 2 * cfg.d_vocab_out + 2 * d_mlp)
    per_patch = max(1, 4 * batch * per_example)
    return max(1, min(n_patches, budget_bytes // per_patch))


def _fold_hook(mask: jax.Array, src: jax.Array, k: int) -> Callable:
    """A hook for k patched runs folded into the batch: value [k*batch, *shape]; patch p takes
    ``src`` where mask[p] is set."""

    def hook(value, *, name):
        v = value.reshape((k, src.shape[0]) + value.shape[1:])  # [k, batch, *shape]
        out = jnp.where(mask[:, None], src[None], v)  # [k,1,*s] / [1,batch,*s] / [k,batch,*s]
        return out.reshape(value.shape)

    return hook


def _map_chunks(fn: Callable, chunks: jax.Array) -> jax.Array:
    """fn over the leading (chunk) axis: a plain call for one chunk, else ``jax.lax.map`` (a loop
    inside the program, so only one chunk's activations are live at a time). One chunk skips the
    loop: on the benchmark's resid_pre sweep (XLA backend, shared machine) 3.7 s -> 2.2 s."""
    if chunks.shape[0] == 1:
        return fn(chunks[0])[None]
    return jax.lax.map(fn, chunks)


def _tile(x: jax.Array, k: int) -> jax.Array:
    """[batch, ...] -> [k*batch, ...] (k copies, patch-major)."""
    return jnp.broadcast_to(x[None], (k,) + x.shape).reshape((k * x.shape[0],) + x.shape[1:])


def _metric_per_patch(metric: Metric, logits: jax.Array, tokens: jax.Array, k: int) -> jax.Array:
    """logits [k*batch, pos, vocab] -> metric values [k, batch]."""
    per = logits.reshape((k, tokens.shape[0]) + logits.shape[1:])
    return jax.vmap(lambda lg: metric(lg, tokens))(per)


def _patched_metric(params, cfg, x, hook, group: _Group, metric, tokens, k: int) -> jax.Array:
    """The metric [k, batch] of k patched runs folded into the batch of ``x`` (the residual entering
    block ``group.start``, or tokens). A built-in metric at one position runs the last block there
    only when the patch lies before it (``attribution.logits_for_metric``)."""
    logits, metric = logits_for_metric(params, cfg, x, metric, [(group.name, hook)],
                                       start_at_layer=group.start)
    return _metric_per_patch(metric, logits, tokens, k)


@functools.partial(jax.jit, static_argnames=("cfg", "metric_static", "groups", "chunk_size",
                                             "with_source"))
def _sweep_program(params, tokens, sources, bases, indices, source_resid, metric_leaves, *, cfg,
                   metric_static, groups, chunk_size, with_source):
    """The whole sweep as one program: the target run (its residual stream at every start layer
    and its metric), every group's patched runs in chunks, and the source run's metric."""
    metric = _join_metric(metric_leaves, metric_static)
    starts = sorted({g.start for g in groups if g.start is not None})
    names = frozenset(_resid_before(s, cfg) for s in starts)
    logits, cache = forward_with_cache(params, cfg, tokens, names)
    baseline = metric(logits, tokens)  # [batch]
    outs = []
    for g, src, base, idx in zip(groups, sources, bases, indices, strict=True):
        x0 = tokens if g.start is None else cache[_resid_before(g.start, cfg)]
        n = idx.shape[0]
        k, n_chunks = _chunks(n, chunk_size)
        padded = jnp.concatenate([idx, jnp.zeros((n_chunks * k - n, idx.shape[1]), idx.dtype)])
        x_tiled = _tile(x0, k)

        def run_chunk(chunk_idx, g=g, src=src, base=base, x_tiled=x_tiled, k=k):
            mask = _patch_masks(g, base, chunk_idx)  # [k, *shape]
            return _patched_metric(params, cfg, x_tiled, _fold_hook(mask, src, k), g, metric,
                                   tokens, k)  # [k, batch]

        per_chunk = _map_chunks(run_chunk, padded.reshape(n_chunks, k, idx.shape[1]))
        outs.append(per_chunk.reshape(n_chunks * k, tokens.shape[0])[:n])  # [n, batch]
    source = None
    if with_source:
        source = metric(forward(params, cfg, source_resid, start_at_layer=0), tokens)
    return baseline, outs, source


def _all_indices(shape: tuple[int, ...]) -> np.ndarray:
    """Every index of ``shape`` in row-major order: [prod(shape), len(shape)] int32."""
    rows = list(itertools.product(*[range(d) for d in shape]))  # [()] when nothing is swept
    return np.asarray(rows, dtype=np.int32).reshape(len(rows), len(shape))


def _reduce(values: jax.Array, reduce: str | None) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if reduce == "mean":
        return v.mean(axis=-1)
    if reduce is None:
        return v
    raise ValueError(f"reduce must be 'mean' or None (keep the batch axis), got {reduce!r}")


def _run_groups(model: HookedTransformer, tokens, source_cache: Mapping, metric: Metric,
                specs: Sequence[tuple[str, Mapping | None, tuple[str, ...]]], *,
                chunk_size: int | None, source_arrays: Sequence[jax.Array] | None = None,
                devices: sweeps.Devices = None):
    """Validate and run groups given as (hook name, index, swept axes). Returns the target
    metric [batch], one [n_patches, batch] per group, the source metric or None, and the groups.
    ``devices``: each group's patches split over several devices or hosts (tinyinterp.sweeps)."""
    cfg = model.cfg
    tokens = check_tokens(tokens, cfg)
    names = [_check_hook(n, cfg) for n, _, _ in specs]
    shapes = _activation_shapes(model, tokens, names)
    check_metric(metric, shapes["logits"], tokens)
    groups, sources, bases, indices = [], [], [], []
    for i, (name, index, over) in enumerate(specs):
        full = shapes[name]
        axes = hook_axes(name)
        swept = tuple(_canon_axis(a, name, axes) for a in over)
        if len(set(swept)) != len(swept):
            raise ValueError(f"over={tuple(over)} names an axis twice")
        g = _Group(name, _start_layer(name, cfg), full[1:], axes, swept)
        groups.append(g)
        if source_arrays is not None:
            src = source_arrays[i]
            if tuple(src.shape) != full:
                raise ValueError(f"replacement for {name!r} has shape {tuple(src.shape)}, expected "
                                 f"{full}")
            sources.append(src)
        else:
            sources.append(_source_activation(source_cache, name, full))
        bases.append(jnp.asarray(_base_mask(index, name, g.shape, swept)))
        indices.append(jnp.asarray(_all_indices(g.sweep_shape)))
    n_max = max(int(ix.shape[0]) for ix in indices)
    if chunk_size is None:
        chunk_size = _auto_chunk(cfg, int(tokens.shape[0]), int(tokens.shape[1]), n_max)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (patches per batched run), got "
                         f"{chunk_size!r}")
    resid0 = "blocks.0.hook_resid_pre"
    with_source = (source_arrays is None and isinstance(source_cache, Mapping)
                   and resid0 in source_cache
                   and tuple(np.shape(source_cache[resid0])) == (*tokens.shape, cfg.d_model))
    source_resid = jnp.asarray(source_cache[resid0], jnp.float32) if with_source else None
    leaves, static = _split_metric(metric)
    program = functools.partial(_sweep_program, cfg=cfg, metric_static=static,
                                groups=tuple(groups), chunk_size=chunk_size,
                                with_source=with_source)
    args = (model.params, tokens, tuple(sources), tuple(bases), tuple(indices), source_resid,
            leaves)
    mesh = sweeps.sweep_mesh(devices)
    if mesh is None:
        baseline, outs, source = program(*args)
        return baseline, outs, source, groups, chunk_size
    # the patches (indices) split over the devices; the target and source runs on each
    in_axes = (None, None, None, None, 0, None, None)
    args = args[:4] + (tuple(sweeps.pad(ix, mesh) for ix in indices),) + args[5:]
    placed = tuple(sweeps.put(a, mesh, ax) for a, ax in zip(args, in_axes, strict=True))
    key = ("patching", cfg, static, tuple(groups), chunk_size, with_source)
    baseline, outs, source = sweeps.compile_sweep(program, mesh, in_axes, (None, 0, None),
                                                  key=key)(*placed)
    outs = [jnp.asarray(sweeps.fetch(o, ix.shape[0])) for o, ix in zip(outs, indices, strict=True)]
    baseline, source = jax.tree_util.tree_map(jnp.asarray, sweeps.fetch((baseline, source)))
    return baseline, outs, source, groups, chunk_size


def _labels(axis: str, n: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(n))


def activation_patch(model: HookedTransformer, tokens: Int[Array, "batch pos"],
                     source_cache: Mapping, metric: Metric, hook: str,
                     index: Mapping | None = None, *, over: Sequence[str] = (),
                     reduce: str | None = "mean", chunk_size: int | None = None,
                     devices: sweeps.Devices = None) -> PatchResult:
    """Patch hook point ``hook`` from ``source_cache`` into the run on ``tokens``; the metric.

    ``index`` picks what is patched: None = the whole activation (every position at once), or
    ``{axis: int | list of ints | slice}``, e.g. ``{"pos": 3}``, ``{"head": 1}``,
    ``{"pos": 3, "head": 1}`` (on hook_z/q/k/v/result), ``{"neuron": 7}`` (on mlp.hook_post),
    ``{"head": 0, "query_pos": 5}`` (on hook_pattern). ``over`` sweeps axes: one patch per entry
    of each named axis (restricted by ``index`` on the others), all in one compiled program.

    Denoising: ``tokens`` = corrupted, ``source_cache`` = the clean run's cache; noising: the
    other way round. Returns a PatchResult with axes ``over`` (plus "batch" if ``reduce=None``).
    ``devices`` (a count, a Mesh or a list of devices): the patches split over several devices
    or hosts (``tinyinterp.sweeps``).
    """
    model = _check_model(model)
    over = tuple(over)
    baseline, outs, source, groups, chunk = _run_groups(
        model, tokens, source_cache, metric, [(hook, index, over)], chunk_size=chunk_size,
        devices=devices)
    g = groups[0]
    vals = np.asarray(outs[0]).reshape(g.sweep_shape + (outs[0].shape[-1],))
    return PatchResult(
        values=_reduce(vals, reduce), axes=g.swept + (() if reduce else ("batch",)),
        labels=tuple(_labels(a, d) for a, d in zip(g.swept, g.sweep_shape, strict=True))
        + (() if reduce else (_labels("batch", vals.shape[-1]),)),
        baseline=_reduce(baseline, reduce),
        source=None if source is None else _reduce(source, reduce), method="activation",
        settings={"hook": hook, "index": None if index is None else dict(index), "over": over,
                  "reduce": reduce, "chunk_size": chunk})


# ----------------------------------------------------------------------------- TL's family
# family -> (activation shorthand, swept axes of the activation, result axes after "layer",
#            how the result axes permute the swept ones, layers axis name)
@dataclass(frozen=True)
class _Family:
    act: str
    swept: tuple[str, ...]  # axes of the activation swept per layer, in result order
    labels: tuple[str, ...]  # TL's axis names for the result (after "layer")


FAMILIES: dict[str, _Family] = {
    "resid_pre": _Family("resid_pre", ("pos",), ("pos",)),
    "resid_mid": _Family("resid_mid", ("pos",), ("pos",)),
    "attn_out": _Family("attn_out", ("pos",), ("pos",)),
    "mlp_out": _Family("mlp_out", ("pos",), ("pos",)),
    "attn_head_out_by_pos": _Family("z", ("pos", "head"), ("pos", "head")),
    "attn_head_q_by_pos": _Family("q", ("pos", "head"), ("pos", "head")),
    "attn_head_k_by_pos": _Family("k", ("pos", "head"), ("pos", "head")),
    "attn_head_v_by_pos": _Family("v", ("pos", "head"), ("pos", "head")),
    "attn_head_pattern_by_pos": _Family("pattern", ("head", "query_pos"),
                                        ("head_index", "dest_pos")),
    "attn_head_pattern_dest_src_pos": _Family("pattern", ("head", "query_pos", "key_pos"),
                                              ("head_index", "dest_pos", "src_pos")),
    "attn_head_out_all_pos": _Family("z", ("head",), ("head",)),
    "attn_head_q_all_pos": _Family("q", ("head",), ("head",)),
    "attn_head_k_all_pos": _Family("k", ("head",), ("head",)),
    "attn_head_v_all_pos": _Family("v", ("head",), ("head",)),
    "attn_head_pattern_all_pos": _Family("pattern", ("head",), ("head_index",)),
}


def _family(name: str, cfg: TransformerConfig) -> _Family:
    if name not in FAMILIES:
        import difflib

        close = difflib.get_close_matches(name, list(FAMILIES), n=3)
        raise ValueError(f"unknown patching family {name!r}"
                         + (f"; did you mean {close}?" if close else "")
                         + f" Known: {sorted(FAMILIES)}")
    fam = FAMILIES[name]
    if cfg.attn_only and fam.act in ("resid_mid", "mlp_out"):
        raise ValueError(f"{name} patches blocks.L.hook_{fam.act}, which an attn_only model does "
                         "not have (no MLPs); use resid_pre / attn_out, or a model with MLPs")
    return fam


def _families_sweep(model: HookedTransformer, tokens, source_cache: Mapping, metric: Metric,
                    families: Sequence[str], *, reduce: str | None, chunk_size: int | None,
                    devices: sweeps.Devices = None):
    """Every family's sweep over every layer in one compiled program. Returns per family the
    values [layer, *sweep, batch] and the labels, plus the baseline and source metrics."""
    model = _check_model(model)
    cfg = model.cfg
    fams = [_family(f, cfg) for f in families]
    specs = [(get_act_name(f.act, layer), None, f.swept) for f in fams
             for layer in range(cfg.n_layers)]
    baseline, outs, source, groups, chunk = _run_groups(model, tokens, source_cache, metric,
                                                        specs, chunk_size=chunk_size,
                                                        devices=devices)
    per_family = []
    for i, _ in enumerate(fams):
        layers = []
        for layer in range(cfg.n_layers):
            j = i * cfg.n_layers + layer
            g = groups[j]
            layers.append(np.asarray(outs[j]).reshape(g.sweep_shape + (outs[j].shape[-1],)))
        per_family.append((np.stack(layers), groups[i * cfg.n_layers].sweep_shape))
    return per_family, baseline, source, chunk


def _family_result(family: str, model, tokens, source_cache, metric, *, reduce, chunk_size,
                   devices: sweeps.Devices = None) -> PatchResult:
    per_family, baseline, source, chunk = _families_sweep(
        model, tokens, source_cache, metric, [family], reduce=reduce, chunk_size=chunk_size,
        devices=devices)
    vals, sweep_shape = per_family[0]
    fam = FAMILIES[family]
    return _result(vals, ("layer",) + fam.labels, (model.cfg.n_layers,) + sweep_shape, baseline,
                   source, "activation", reduce, {"family": family, "hook": fam.act,
                                                  "chunk_size": chunk, "reduce": reduce})


def _result(vals, axes, dims, baseline, source, method, reduce, settings) -> PatchResult:
    vals = _reduce(vals, reduce)
    labels = tuple(_labels(a, d) for a, d in zip(axes, dims, strict=True))
    if reduce is None:
        axes = axes + ("batch",)
        labels = labels + (_labels("batch", vals.shape[-1]),)
    return PatchResult(values=vals, axes=axes, labels=labels, baseline=_reduce(baseline, reduce),
                       source=None if source is None else _reduce(source, reduce), method=method,
                       settings=settings)


def _make_family_fn(family: str) -> Callable[..., PatchResult]:
    fam = FAMILIES[family]

    def fn(model: HookedTransformer, corrupted_tokens: Int[Array, "batch pos"],
           clean_cache: Mapping, patching_metric: Metric, *, reduce: str | None = "mean",
           chunk_size: int | None = None, devices: sweeps.Devices = None) -> PatchResult:
        return _family_result(family, model, corrupted_tokens, clean_cache, patching_metric,
                              reduce=reduce, chunk_size=chunk_size, devices=devices)

    shape = ", ".join(("n_layers",) + tuple("pos" if a.endswith("pos") else "n_heads"
                                             for a in fam.labels))
    fn.__name__ = fn.__qualname__ = f"get_act_patch_{family}"
    fn.__doc__ = (f"TransformerLens' ``get_act_patch_{family}``: patch ``hook_{fam.act}`` of every "
                  f"layer, one patch per ({', '.join(fam.labels)}), from ``clean_cache`` into the "
                  f"run on ``corrupted_tokens``.\n\n    Returns a PatchResult of shape [{shape}] "
                  f"with axes {('layer',) + fam.labels} (plus \"batch\" with reduce=None); all "
                  "patches run as one compiled batched program (``devices``: split over "
                  "several devices or hosts, tinyinterp.sweeps). ``patching_metric`` is "
                  "fn(logits, tokens) -> [batch].")
    return fn


get_act_patch_resid_pre = _make_family_fn("resid_pre")
get_act_patch_resid_mid = _make_family_fn("resid_mid")
get_act_patch_attn_out = _make_family_fn("attn_out")
get_act_patch_mlp_out = _make_family_fn("mlp_out")
get_act_patch_attn_head_out_by_pos = _make_family_fn("attn_head_out_by_pos")
get_act_patch_attn_head_q_by_pos = _make_family_fn("attn_head_q_by_pos")
get_act_patch_attn_head_k_by_pos = _make_family_fn("attn_head_k_by_pos")
get_act_patch_attn_head_v_by_pos = _make_family_fn("attn_head_v_by_pos")
get_act_patch_attn_head_pattern_by_pos = _make_family_fn("attn_head_pattern_by_pos")
get_act_patch_attn_head_pattern_dest_src_pos = _make_family_fn("attn_head_pattern_dest_src_pos")
get_act_patch_attn_head_out_all_pos = _make_family_fn("attn_head_out_all_pos")
get_act_patch_attn_head_q_all_pos = _make_family_fn("attn_head_q_all_pos")
get_act_patch_attn_head_k_all_pos = _make_family_fn("attn_head_k_all_pos")
get_act_patch_attn_head_v_all_pos = _make_family_fn("attn_head_v_all_pos")
get_act_patch_attn_head_pattern_all_pos = _make_family_fn("attn_head_pattern_all_pos")

_EVERY_HEAD = ("output", "query", "key", "value", "pattern")


def get_act_patch_attn_head_all_pos_every(model: HookedTransformer,
                                          corrupted_tokens: Int[Array, "batch pos"],
                                          clean_cache: Mapping, metric: Metric, *,
                                          reduce: str | None = "mean",
                                          chunk_size: int | None = None) -> PatchResult:
    """TL's helper: every head (all positions at once) for each of output (z), query, key,
    value and pattern, in one compiled program. Shape [5, n_layers, n_heads], axes
    ("patch_type", "layer", "head")."""
    fams = ["attn_head_out_all_pos", "attn_head_q_all_pos", "attn_head_k_all_pos",
            "attn_head_v_all_pos", "attn_head_pattern_all_pos"]
    per, baseline, source, chunk = _families_sweep(model, corrupted_tokens, clean_cache, metric,
                                                   fams, reduce=reduce, chunk_size=chunk_size)
    vals = np.stack([v for v, _ in per])  # [5, layer, head, batch]
    res = _result(vals, ("patch_type", "layer", "head"), vals.shape[:3], baseline, source,
                  "activation", reduce, {"family": "attn_head_all_pos_every", "chunk_size": chunk,
                                         "reduce": reduce})
    return _relabel(res, 0, _EVERY_HEAD)


def get_act_patch_attn_head_by_pos_every(model: HookedTransformer,
                                         corrupted_tokens: Int[Array, "batch pos"],
                                         clean_cache: Mapping, metric: Metric, *,
                                         reduce: str | None = "mean",
                                         chunk_size: int | None = None) -> PatchResult:
    """TL's helper: every head at every position for output (z), query, key, value and
    pattern (by destination position, rearranged to [layer, pos, head] as TL does), in one
    compiled program. Shape [5, n_layers, pos, n_heads], axes ("patch_type", "layer", "pos",
    "head")."""
    fams = ["attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos",
            "attn_head_v_by_pos", "attn_head_pattern_by_pos"]
    per, baseline, source, chunk = _families_sweep(model, corrupted_tokens, clean_cache, metric,
                                                   fams, reduce=reduce, chunk_size=chunk_size)
    parts = [v for v, _ in per[:4]]
    parts.append(np.swapaxes(per[4][0], 1, 2))  # [layer, head, dest_pos, b] -> [layer, pos, head, b]
    vals = np.stack(parts)
    res = _result(vals, ("patch_type", "layer", "pos", "head"), vals.shape[:4], baseline, source,
                  "activation", reduce, {"family": "attn_head_by_pos_every", "chunk_size": chunk,
                                         "reduce": reduce})
    return _relabel(res, 0, _EVERY_HEAD)


def get_act_patch_block_every(model: HookedTransformer, corrupted_tokens: Int[Array, "batch pos"],
                              clean_cache: Mapping, metric: Metric, *,
                              reduce: str | None = "mean",
                              chunk_size: int | None = None) -> PatchResult:
    """TL's helper: resid_pre, attn_out and mlp_out of every layer at every position, in one
    compiled program. Shape [3, n_layers, pos], axes ("patch_type", "layer", "pos"). Needs MLPs
    (an attn_only model has no mlp_out)."""
    fams = ["resid_pre", "attn_out", "mlp_out"]
    per, baseline, source, chunk = _families_sweep(model, corrupted_tokens, clean_cache, metric,
                                                   fams, reduce=reduce, chunk_size=chunk_size)
    vals = np.stack([v for v, _ in per])
    res = _result(vals, ("patch_type", "layer", "pos"), vals.shape[:3], baseline, source,
                  "activation", reduce, {"family": "block_every", "chunk_size": chunk,
                                         "reduce": reduce})
    return _relabel(res, 0, tuple(fams))


def _relabel(res: PatchResult, axis: int, labels: tuple[str, ...]) -> PatchResult:
    new = list(res.labels)
    new[axis] = labels
    return PatchResult(res.values, res.axes, tuple(new), res.baseline, res.source, res.method,
                       res.settings)


# ----------------------------------------------------------------------------- attribution patching
@functools.partial(jax.jit, static_argnames=("cfg", "metric_static", "names"))
def _grads_program(params, tokens, metric_leaves, *, cfg, metric_static, names):
    """One forward and one backward: the target activations at ``names``, the gradient of the
    metric (summed over the batch, so example b's gradient is its own) there, and the metric."""
    metric = _join_metric(metric_leaves, metric_static)
    shapes = jax.eval_shape(lambda: forward_with_cache(params, cfg, tokens, names)[1])
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}

    def total(deltas):
        logits, cache = forward_with_cache(params, cfg, tokens, names, deltas=deltas)
        m = metric(logits, tokens)  # [batch]
        return jnp.sum(m), (m, cache)

    grads, (m, cache) = jax.grad(total, has_aux=True)(zeros)
    return m, cache, grads


def _attribution(grad: jax.Array, target: jax.Array, source: jax.Array, axes: tuple[str, ...],
                 swept: tuple[str, ...]) -> np.ndarray:
    """grad . (source - target) summed over the axes not swept: [*swept, batch]."""
    diff = source - target
    # attention scores are -inf above the diagonal in both runs: no change there
    contrib = jnp.where(jnp.isfinite(diff), grad * diff, 0.0)  # [batch, *shape]
    keep = [1 + axes.index(a) for a in swept]
    rest = [1 + i for i, a in enumerate(axes) if a not in swept]
    contrib = jnp.transpose(contrib, keep + rest + [0])  # [*swept, *rest, batch]
    n_rest = len(rest)
    if n_rest:
        contrib = jnp.sum(contrib, axis=tuple(range(len(keep), len(keep) + n_rest)))
    return np.asarray(contrib)


def attribution_patch(model: HookedTransformer, tokens: Int[Array, "batch pos"],
                      source_cache: Mapping, metric: Metric, family: str | None = None, *,
                      hook: str | None = None, over: Sequence[str] = (),
                      reduce: str | None = "mean", devices: sweeps.Devices = None) -> PatchResult:
    """Attribution patching: the first-order estimate of every patch of an activation-patching
    sweep from one forward and one backward pass (Nanda 2023; Syed et al. 2023).

    estimate = metric(target) + sum over the patched entries of grad_metric . (source - target),
    with the gradient taken in the target run. Either ``family`` (a key of ``FAMILIES``:
    "resid_pre", "attn_head_out_by_pos", ...; same shape and labels as ``get_act_patch_<family>``)
    or ``hook`` + ``over`` (same as ``activation_patch(..., hook, over=over)``). Exact where the
    metric is linear in the patched activation; compare with activation patching elsewhere.

    ``devices`` (a count, a Mesh or a list of devices): there is no sweep to split (every patch
    comes from the one gradient), so the batch of examples is: the forward and backward run
    under ``jax.jit`` with the tokens split over the devices and XLA partitioning the program
    (the Numba kernels on each device's share). The devices must divide the batch."""
    model = _check_model(model)
    cfg = model.cfg
    tokens = check_tokens(tokens, cfg)
    if (family is None) == (hook is None):
        raise ValueError("give exactly one of family (e.g. 'resid_pre') or hook (a hook point "
                         "name, with over=...)")
    if family is not None:
        fam = _family(family, cfg)
        names = [get_act_name(fam.act, layer) for layer in range(cfg.n_layers)]
        swept = tuple(_canon_axis(a, names[0], hook_axes(names[0])) for a in fam.swept)
    else:
        names = [_check_hook(hook, cfg)]
        swept = tuple(_canon_axis(a, hook, hook_axes(hook)) for a in over)
    shapes = _activation_shapes(model, tokens, names)
    check_metric(metric, shapes["logits"], tokens)
    sources = [_source_activation(source_cache, n, shapes[n]) for n in names]
    leaves, static = _split_metric(metric)
    args = (model.params, tokens, leaves)
    mesh = sweeps.sweep_mesh(devices)
    if mesh is not None:
        if tokens.shape[0] % mesh.size:
            raise ValueError(f"attribution_patch splits the batch of examples over the devices: "
                             f"a batch of {tokens.shape[0]} on {mesh.size} devices; give a batch "
                             "they divide (or devices=None)")
        args = tuple(sweeps.put(a, mesh, ax) for a, ax in zip(args, (None, 0, None), strict=True))
    m, cache, grads = _grads_program(*args, cfg=cfg, metric_static=static, names=frozenset(names))
    if mesh is not None:
        m, cache, grads = jax.tree_util.tree_map(jnp.asarray, sweeps.fetch((m, cache, grads)))
    base = np.asarray(m)  # [batch]
    per = [_attribution(grads[n], cache[n], s, hook_axes(n), swept) + base
           for n, s in zip(names, sources, strict=True)]
    if family is not None:
        vals = np.stack(per)  # [layer, *swept, batch]
        axes = ("layer",) + fam.labels
        settings = {"family": family, "hook": fam.act, "reduce": reduce}
    else:
        vals = per[0]
        axes = swept
        settings = {"hook": hook, "over": tuple(over), "reduce": reduce}
    return _result(vals, axes, vals.shape[:-1], base, None, "attribution", reduce, settings)


# ----------------------------------------------------------------------------- path patching
_RECEIVER_KINDS = ("q", "k", "v")


def _check_receivers(receivers, cfg: TransformerConfig):
    """-> (qkv: {layer: {kind: head mask}}, mlp layers, logits?)"""
    if isinstance(receivers, str):
        receivers = [receivers]
    qkv: dict[int, dict[str, np.ndarray]] = {}
    mlps: set[int] = set()
    logits = False
    for r in receivers:
        if r == "logits":
            logits = True
            continue
        if not isinstance(r, tuple) or len(r) not in (2, 3):
            raise ValueError(f"a receiver is 'logits', ('q'|'k'|'v', layer, head or None) or "
                             f"('mlp', layer); got {r!r}")
        kind, layer = r[0], r[1]
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not (
                0 <= layer < cfg.n_layers):
            raise IndexError(f"receiver {r!r}: layer must be in [0, {cfg.n_layers}), got {layer!r}")
        if kind == "mlp":
            if cfg.attn_only:
                raise ValueError(f"receiver {r!r}: this model is attn_only (no MLPs)")
            mlps.add(int(layer))
            continue
        if kind not in _RECEIVER_KINDS or len(r) != 3:
            raise ValueError(f"receiver {r!r}: kind must be 'q', 'k', 'v' (with a head) or 'mlp'")
        head = r[2]
        mask = qkv.setdefault(int(layer), {}).setdefault(kind, np.zeros(cfg.n_heads, bool))
        if head is None:
            mask[:] = True
        elif isinstance(head, bool) or not isinstance(head, (int, np.integer)) or not (
                0 <= head < cfg.n_heads):
            raise IndexError(f"receiver {r!r}: head must be in [0, {cfg.n_heads}) or None (all)")
        else:
            mask[int(head)] = True
    if not (qkv or mlps or logits):
        raise ValueError("path_patch needs at least one receiver")
    return qkv, frozenset(mlps), logits


def _sender_mask(senders, cfg: TransformerConfig) -> np.ndarray:
    mask = np.zeros((cfg.n_layers, cfg.n_heads), bool)
    for s in senders:
        if not (isinstance(s, tuple) and len(s) == 2):
            raise ValueError(f"a sender is a head (layer, head), got {s!r}")
        layer, head = s
        for v, n, what in ((layer, cfg.n_layers, "layer"), (head, cfg.n_heads, "head")):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < n:
                raise IndexError(f"sender {s!r}: {what} must be in [0, {n}), got {v!r}")
        mask[layer, head] = True
    if not mask.any():
        raise ValueError("path_patch needs at least one sender head")
    return mask


@functools.partial(jax.jit, static_argnames=("cfg", "metric_static", "qkv_layers", "mlps",
                                             "logits", "chunk_size"))
def _path_program(params, tokens, z_source, sender_masks, qkv_masks, metric_leaves, *, cfg,
                  metric_static, qkv_layers, mlps, logits, chunk_size):
    """Path patching for each sender set in ``sender_masks`` [n, layer, head] (batched like the
    activation sweeps). Receivers: per layer in ``qkv_layers``, head masks [3, head] for q, k, v
    (``qkv_masks``); MLP layers ``mlps``; the logits if ``logits``."""
    metric = _join_metric(metric_leaves, metric_static)
    n_layers = cfg.n_layers
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    target_logits, cache = forward_with_cache(params, cfg, tokens,
                                              frozenset(z_names + ["blocks.0.hook_resid_pre"]))
    baseline = metric(target_logits, tokens)
    # each head's change of output, source - target: z diff @ W_O[h] [batch, pos, head, d_model]
    head_diff = jnp.stack([
        jnp.einsum("bphd,hdm->bphm", z_source[layer] - cache[z_names[layer]],
                   params["blocks"][layer]["attn"]["W_O"]) for layer in range(n_layers)])
    resid0 = cache["blocks.0.hook_resid_pre"]
    batch = tokens.shape[0]
    n = sender_masks.shape[0]
    k, n_chunks = _chunks(n, chunk_size)
    padded = jnp.concatenate([sender_masks, jnp.zeros((n_chunks * k - n,) + sender_masks.shape[1:],
                                                      sender_masks.dtype)])

    def run_chunk(masks):  # masks [k, layer, head]
        # direct effect of the senders in each layer on the residual: [k, layer, batch, pos, d_model]
        per_layer = jnp.einsum("lbphm,klh->klbpm", head_diff, masks.astype(jnp.float32))
        before = jnp.cumsum(per_layer, axis=1) - per_layer  # senders in layers < L

        def flat(x):  # [k, batch, ...] -> [k*batch, ...]
            return x.reshape((k * batch,) + x.shape[2:])

        x = _tile(resid0, k)  # [k*batch, pos, d_model]
        for layer in range(n_layers):
            b = f"blocks.{layer}"
            d_pre = flat(before[:, layer])
            d_mid = flat(before[:, layer] + per_layer[:, layer])
            # a sender's own output stays at the target run's value: its change enters through
            # the receivers only, and paths from one sender through another are cut (as when the
            # senders are activation-patched together)
            hooks = [(f"{b}.attn.hook_z",
                      lambda v, *, name, m=masks[:, layer], zt=cache[z_names[layer]]: jnp.where(
                          m[:, None, None, :, None], zt[None],
                          v.reshape((k,) + zt.shape)).reshape(v.shape))]
            after_attn = f"{b}.hook_resid_post" if cfg.attn_only else f"{b}.hook_resid_mid"
            undo = None
            if layer in qkv_layers:
                qm = qkv_masks[qkv_layers.index(layer)]  # [3, head]
                names = [f"{b}.attn.hook_{c}" for c in "qkv"]
                _, plain = forward_with_cache(params, cfg, x, frozenset(names),
                                              start_at_layer=layer, stop_at_layer=layer + 1)
                hooks.append((f"{b}.hook_resid_pre", lambda v, *, name, d=d_pre: v + d))
                for c, nm in enumerate(names):
                    hooks.append((nm, lambda v, *, name, m=qm[c], p=plain[nm]:
                                  jnp.where(m[None, None, :, None], v, p)))
                undo = d_pre
            if layer in mlps:
                mid_add = d_mid if undo is None else d_mid - undo
                hooks.append((f"{b}.hook_resid_mid", lambda v, *, name, d=mid_add: v + d))
                hooks.append((f"{b}.hook_resid_post", lambda v, *, name, d=d_mid: v - d))
            elif undo is not None:
                hooks.append((after_attn, lambda v, *, name, d=undo: v - d))
            x = forward(params, cfg, x, fwd_hooks=hooks, start_at_layer=layer,
                        stop_at_layer=layer + 1)
        if logits:
            x = x + flat(before[:, -1] + per_layer[:, -1])
        out = forward(params, cfg, x, start_at_layer=n_layers)
        return _metric_per_patch(metric, out, tokens, k)

    vals = _map_chunks(run_chunk, padded.reshape((n_chunks, k) + sender_masks.shape[1:]))
    return baseline, vals.reshape(n_chunks * k, batch)[:n]


def path_patch(model: HookedTransformer, tokens: Int[Array, "batch pos"], source_cache: Mapping,
               metric: Metric, receivers, senders=None, *, reduce: str | None = "mean",
               chunk_size: int | None = None, devices: sweeps.Devices = None) -> PatchResult:
    """Path patching: the effect on the metric of sender heads' source-run outputs through the
    receivers only (Wang et al. 2022; Goldowsky-Dill et al. 2023).

    Each sender head's change of output, (z_source - z_target) @ W_O[h], is added to the input of
    each receiver only: a receiver head's q, k or v (``("q", layer, head)``; head None = all
    heads of that layer), a layer's MLP (``("mlp", layer)``) or the unembedding (``"logits"``).
    Every other path from the senders is frozen at the target run's value (a sender's own output
    included, so paths from one sender through another are cut); what a receiver then computes
    propagates downstream as usual. With receivers in one layer this is exactly IOI's
    two-step procedure; with every q, k, v, MLP and the logits as receivers it equals activation
    patching of the senders' hook_z.

    ``senders``: heads ``[(layer, head), ...]`` patched together (one value), or None: every head
    on its own, one compiled program, result axes ("layer", "head") as in IOI's figures.
    ``source_cache`` needs every layer's ``attn.hook_z``. ``devices`` (a count, a Mesh or a list
    of devices): the sender sets split over several devices or hosts (``tinyinterp.sweeps``)."""
    model = _check_model(model)
    cfg = model.cfg
    tokens = check_tokens(tokens, cfg)
    qkv, mlps, logits = _check_receivers(receivers, cfg)
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
    shapes = _activation_shapes(model, tokens, z_names)
    check_metric(metric, shapes["logits"], tokens)
    z_src = jnp.stack([_source_activation(source_cache, n, shapes[n]) for n in z_names])
    if senders is None:
        masks = np.zeros((cfg.n_layers * cfg.n_heads, cfg.n_layers, cfg.n_heads), bool)
        for i, (layer, head) in enumerate(itertools.product(range(cfg.n_layers),
                                                            range(cfg.n_heads))):
            masks[i, layer, head] = True
    else:
        masks = _sender_mask(senders, cfg)[None]
    layers = tuple(sorted(qkv))
    qkv_masks = jnp.asarray(np.stack([np.stack([qkv[layer].get(c, np.zeros(cfg.n_heads, bool))
                                                for c in _RECEIVER_KINDS]) for layer in layers])
                            if layers else np.zeros((0, 3, cfg.n_heads), bool))
    if chunk_size is None:
        chunk_size = _auto_chunk(cfg, int(tokens.shape[0]), int(tokens.shape[1]), masks.shape[0])
    leaves, static = _split_metric(metric)
    statics = dict(cfg=cfg, metric_static=static, qkv_layers=layers, mlps=tuple(sorted(mlps)),
                   logits=logits, chunk_size=int(chunk_size))
    args = (model.params, tokens, z_src, jnp.asarray(masks), qkv_masks, leaves)
    if sweeps.sweep_mesh(devices) is None:
        baseline, vals = _path_program(*args, **statics)
    else:  # the sender sets split over the devices; the target run on each
        baseline, vals = sweeps.map_sweep(
            functools.partial(_path_program, **statics), args, (None, None, None, 0, None, None),
            devices, (None, 0), key=("path_patch", *statics.items()))
    vals = np.asarray(vals)
    settings = {"receivers": list(receivers) if not isinstance(receivers, str) else [receivers],
                "senders": None if senders is None else list(senders), "reduce": reduce}
    if senders is None:
        vals = vals.reshape(cfg.n_layers, cfg.n_heads, -1)
        return _result(vals, ("layer", "head"), vals.shape[:2], baseline, None, "path", reduce,
                       settings)
    return _result(vals[0], (), (), baseline, None, "path", reduce, settings)


# ----------------------------------------------------------------------------- ablations
ABLATIONS = ("zero", "mean", "resample")


def ablation_values(kind: str, target: jax.Array, reference: jax.Array | None = None, *,
                    seed: int = 0, mean_over: Sequence[str] = ("batch",),
                    name: str = "activation") -> jax.Array:
    """What an ablation writes, with the target's shape [batch, ...]: zeros; the reference's
    mean over ``mean_over`` ("batch", optionally "pos"); or, for "resample", for each target
    example a reference example drawn (with replacement, seeded) from ``reference``."""
    if kind not in ABLATIONS:
        raise ValueError(f"ablation kind must be one of {ABLATIONS}, got {kind!r}")
    if kind == "zero":
        return jnp.zeros_like(target)
    if reference is None:
        raise ValueError(f"{kind} ablation needs reference activations (a reference batch), e.g. "
                         "reference_tokens=... in ablate()")
    reference = jnp.asarray(reference, target.dtype)
    if reference.ndim != target.ndim:
        raise ValueError(f"reference activations for {name!r} have shape {tuple(reference.shape)}, "
                         f"the target's are {tuple(target.shape)}")
    if kind == "mean":
        axes = hook_axes(name) if name != "activation" else ()
        over = [0] + [1 + axes.index(_canon_axis(a, name, axes)) for a in mean_over if a != "batch"]
        m = jnp.mean(reference, axis=tuple(over), keepdims=True)
        if m.shape[1:] != target.shape[1:] and not all(
                a == b or a == 1 for a, b in zip(m.shape[1:], target.shape[1:], strict=True)):
            raise ValueError(f"mean ablation of {name!r}: the reference's shape "
                             f"{tuple(reference.shape)} does not match the target's "
                             f"{tuple(target.shape)} after the batch axis; use references of "
                             "the same length or mean_over=('batch', 'pos')")
        return jnp.broadcast_to(m, target.shape)
    if reference.shape[1:] != target.shape[1:]:
        raise ValueError(f"resample ablation of {name!r}: reference {tuple(reference.shape)} and "
                         f"target {tuple(target.shape)} differ after the batch axis")
    pick = jax.random.randint(jax.random.key(seed), (target.shape[0],), 0, reference.shape[0])
    return reference[pick]


def ablation_hook(kind: str = "zero", index: Mapping | None = None, *,
                  reference: jax.Array | None = None, seed: int = 0,
                  mean_over: Sequence[str] = ("batch",)) -> Callable:
    """A hook ``fn(value, *, name)`` for run_with_hooks / generate that ablates ``index`` of the
    hook point it is attached to ({"head": 2}, {"neuron": [3, 5]}, {"pos": 4}, None = all):
    "zero" writes 0, "mean" the mean of ``reference`` (activations of a reference batch at that
    hook point), "resample" a seeded random reference example per target example."""
    if kind not in ABLATIONS:
        raise ValueError(f"ablation kind must be one of {ABLATIONS}, got {kind!r}")
    if kind != "zero" and reference is None:
        raise ValueError(f"{kind} ablation needs reference= (activations of a reference batch at "
                         "the hook point, e.g. model.run_with_cache(ref_tokens)[1][name])")

    def hook(value, *, name):
        mask = jnp.asarray(_base_mask(index, name, tuple(value.shape[1:])))
        new = ablation_values(kind, value, reference, seed=seed, mean_over=mean_over, name=name)
        return jnp.where(mask[None], new, value)

    return hook


def ablate(model: HookedTransformer, tokens: Int[Array, "batch pos"], metric: Metric, hook: str,
           index: Mapping | None = None, *, kind: str = "zero",
           reference_tokens: Int[Array, "ref_batch pos"] | None = None, seed: int = 0,
           mean_over: Sequence[str] = ("batch",), over: Sequence[str] = (),
           reduce: str | None = "mean", chunk_size: int | None = None,
           devices: sweeps.Devices = None) -> PatchResult:
    """The metric with ``index`` of ``hook`` ablated ("zero", "mean" or "resample" over the
    reference batch ``reference_tokens``). ``over`` sweeps axes (e.g. over=("head",) ablates
    each head in turn), one compiled program (``devices``: split over several devices or
    hosts, tinyinterp.sweeps). ``baseline`` is the unablated metric."""
    model = _check_model(model)
    cfg = model.cfg
    tokens = check_tokens(tokens, cfg)
    hook = _check_hook(hook, cfg)
    _, target = model.run_with_cache(tokens, names_filter=[hook])
    reference = None
    if kind != "zero":
        if reference_tokens is None:
            raise ValueError(f"{kind} ablation needs reference_tokens (a reference batch)")
        reference_tokens = check_tokens(reference_tokens, cfg)
        reference = model.run_with_cache(reference_tokens, names_filter=[hook])[1][hook]
    new = ablation_values(kind, target[hook], reference, seed=seed, mean_over=mean_over, name=hook)
    baseline, outs, _, groups, chunk = _run_groups(
        model, tokens, {}, metric, [(hook, index, tuple(over))], chunk_size=chunk_size,
        source_arrays=[new], devices=devices)
    g = groups[0]
    vals = np.asarray(outs[0]).reshape(g.sweep_shape + (outs[0].shape[-1],))
    return _result(vals, g.swept, g.sweep_shape, baseline, None, "ablation", reduce,
                   {"hook": hook, "kind": kind, "index": None if index is None else dict(index),
                    "over": tuple(over), "seed": seed, "mean_over": tuple(mean_over),
                    "reduce": reduce, "chunk_size": chunk})


__all__ = [
    "ABLATIONS", "FAMILIES", "PatchResult", "ablate", "ablation_hook", "ablation_values",
    "activation_patch", "attribution_patch", "check_metric", "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every", "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_k_by_pos", "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_pattern_by_pos", "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_q_all_pos", "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_v_all_pos", "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_out", "get_act_patch_block_every", "get_act_patch_mlp_out",
    "get_act_patch_resid_mid", "get_act_patch_resid_pre", "hook_axes", "path_patch",
]

