"""Hook points: their names, TL shorthand, name filters and the per-run hook context.

A hook is a pure function ``fn(value, *, name) -> value``. Which hook points a run reads (caches)
or replaces (hooks) is declared by the caller; the forward pass asks a ``HookContext`` at every
hook point. Nothing is stored or computed for points nobody asked for.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from tinyinterp.config import TransformerConfig

HookFn = Callable[..., jax.Array]
NamesFilter = None | str | Iterable[str] | Callable[[str], bool]


def _norm_hooks(prefix: str) -> list[str]:
    return [f"{prefix}.hook_scale", f"{prefix}.hook_normalized"]


def hook_names(cfg: TransformerConfig) -> list[str]:
    """Every hook point of a model with this config, in the order the forward pass visits them."""
    has_norm = cfg.normalization_type is not None
    names = ["hook_embed", "hook_pos_embed"]
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        names.append(f"{p}.hook_resid_pre")
        if has_norm:
            names += _norm_hooks(f"{p}.ln1")
        names += [f"{p}.attn.hook_{n}" for n in ("q", "k", "v", "attn_scores", "pattern", "z",
                                                  "result")]
        names.append(f"{p}.hook_attn_out")
        if not cfg.attn_only:
            names.append(f"{p}.hook_resid_mid")
            if has_norm:
                names += _norm_hooks(f"{p}.ln2")
            names += [f"{p}.mlp.hook_pre", f"{p}.mlp.hook_post", f"{p}.hook_mlp_out"]
        names.append(f"{p}.hook_resid_post")
    if has_norm:
        names += _norm_hooks("ln_final")
    names += ["unembed.hook_in", "unembed.hook_out"]
    return names


_SHORTHAND = {
    # shorthand -> (template, needs a layer)
    "embed": ("hook_embed", False),
    "pos_embed": ("hook_pos_embed", False),
    "resid_pre": ("blocks.{layer}.hook_resid_pre", True),
    "resid_mid": ("blocks.{layer}.hook_resid_mid", True),
    "resid_post": ("blocks.{layer}.hook_resid_post", True),
    "attn_out": ("blocks.{layer}.hook_attn_out", True),
    "mlp_out": ("blocks.{layer}.hook_mlp_out", True),
    "q": ("blocks.{layer}.attn.hook_q", True),
    "k": ("blocks.{layer}.attn.hook_k", True),
    "v": ("blocks.{layer}.attn.hook_v", True),
    "z": ("blocks.{layer}.attn.hook_z", True),
    "result": ("blocks.{layer}.attn.hook_result", True),
    "attn_scores": ("blocks.{layer}.attn.hook_attn_scores", True),
    "pattern": ("blocks.{layer}.attn.hook_pattern", True),
    "attn": ("blocks.{layer}.attn.hook_pattern", True),  # TL alias
    "pre": ("blocks.{layer}.mlp.hook_pre", True),
    "post": ("blocks.{layer}.mlp.hook_post", True),
    "mlp_pre": ("blocks.{layer}.mlp.hook_pre", True),
    "mlp_post": ("blocks.{layer}.mlp.hook_post", True),
}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens shorthand -> full hook name.

    ``get_act_name("pattern", 1)`` -> ``"blocks.1.attn.hook_pattern"``;
    ``get_act_name("scale", 0, "ln1")`` -> ``"blocks.0.ln1.hook_scale"``;
    ``get_act_name("normalized")`` -> ``"ln_final.hook_normalized"``. A full name passes through.
    """
    if "." in name or name.startswith("hook_"):
        return name
    if name in ("scale", "normalized"):
        if layer is None:
            return f"ln_final.hook_{name}"
        lt = {"a": "ln1", "attn": "ln1", "m": "ln2", "mlp": "ln2"}.get(layer_type, layer_type)
        if lt not in ("ln1", "ln2"):
            raise ValueError(f"get_act_name({name!r}, {layer}) needs layer_type 'ln1' or 'ln2', "
                             f"got {layer_type!r}")
        return f"blocks.{layer}.{lt}.hook_{name}"
    if name not in _SHORTHAND:
        close = difflib.get_close_matches(name, list(_SHORTHAND) + ["scale", "normalized"], n=3)
        raise KeyError(f"unknown activation shorthand {name!r}"
                       + (f"; did you mean {close}?" if close else "")
                       + f" Known: {sorted(_SHORTHAND) + ['scale', 'normalized']}")
    template, needs_layer = _SHORTHAND[name]
    if needs_layer and layer is None:
        raise ValueError(f"get_act_name({name!r}) needs a layer index")
    return template.format(layer=layer)


def unknown_hook_error(name: str, valid: Sequence[str]) -> KeyError:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    return KeyError(f"unknown hook point {name!r}"
                    + (f"; closest valid names: {close}" if close else "")
                    + f" (this model has {len(valid)} hook points; see model.hook_names)")


def resolve_names(names_filter: NamesFilter, valid: Sequence[str]) -> list[str]:
    """A names filter (None = all, a name, a list of names, or a predicate) -> the list of names,
    in forward order. Unknown names are a clear error listing the closest valid ones."""
    if names_filter is None:
        return list(valid)
    if callable(names_filter):
        return [n for n in valid if names_filter(n)]
    names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    valid_set = set(valid)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"hook names must be strings, got {n!r}")
        if n not in valid_set:
            raise unknown_hook_error(n, valid)
    wanted = set(names)
    return [n for n in valid if n in wanted]


def resolve_fwd_hooks(fwd_hooks, valid: Sequence[str]) -> dict[str, tuple[HookFn, ...]]:
    """``[(name | names | predicate, fn), ...]`` -> {name: (fn, ...)}; several hooks on one point
    compose in the order given."""
    table: dict[str, list[HookFn]] = {}
    for entry in fwd_hooks or ():
        if not (isinstance(entry, tuple) and len(entry) == 2 and callable(entry[1])):
            raise TypeError(f"each fwd_hook must be a (name_or_filter, fn) pair, got {entry!r}")
        target, fn = entry
        for n in resolve_names(target, valid):
            table.setdefault(n, []).append(fn)
    return {k: tuple(v) for k, v in table.items()}


@dataclass
class HookContext:
    """What one run does at its hook points: apply ``fwd_hooks``, add gradient probes ``deltas``
    (zeros whose gradient is the gradient at that point), record ``cache_names`` into ``cache``."""

    fwd_hooks: dict[str, tuple[HookFn, ...]] = field(default_factory=dict)
    cache_names: frozenset[str] = frozenset()
    deltas: dict[str, jax.Array] | None = None
    cache: dict[str, jax.Array] = field(default_factory=dict)
    visited: list[str] | None = None  # when a list, every hook point the run visits, in order

    def wants(self, name: str) -> bool:
        """Does anyone read or replace this hook point? (Decides whether to materialise it.)"""
        return (name in self.fwd_hooks or name in self.cache_names
                or (self.deltas is not None and name in self.deltas))

    def replaces(self, name: str) -> bool:
        """Is this point's value changed by a hook or a gradient probe (not just read)?"""
        return name in self.fwd_hooks or (self.deltas is not None and name in self.deltas)

    def __call__(self, name: str, value: jax.Array) -> jax.Array:
        if self.visited is not None:
            self.visited.append(name)
        for fn in self.fwd_hooks.get(name, ()):
            new = fn(value, name=name)
            if not hasattr(new, "shape") or not hasattr(new, "dtype"):
                raise TypeError(f"hook on {name!r} returned {type(new).__name__}, expected an array "
                                f"of shape {tuple(value.shape)} and dtype {value.dtype}")
            if tuple(new.shape) != tuple(value.shape) or new.dtype != value.dtype:
                raise ValueError(
                    f"hook on {name!r} returned shape {tuple(new.shape)} dtype {new.dtype}; it must "
                    f"return shape {tuple(value.shape)} dtype {value.dtype} (the hook point's own)")
            value = new
        if self.deltas is not None and name in self.deltas:
            value = value + self.deltas[name]
        if name in self.cache_names:
            self.cache[name] = value
        return value



def zero_like_tree(shapes: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    return {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
