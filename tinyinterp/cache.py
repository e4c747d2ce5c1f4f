"""ActivationCache: a read-only mapping from hook name to activation, plus TL's decompositions.

Names, arguments, label strings and stacking order follow TransformerLens' ``ActivationCache``, so
TL recipes (direct logit attribution, logit lens, per-head and per-neuron decompositions) carry over.
The cache is pure: no method mutates it; methods that change it (``remove_batch_dim``,
``apply_slice_to_batch_dim``, ``compute_head_results``) return a new cache.

Axes: a "stack" is ``[component, *batch_and_pos, d_model]`` where ``batch_and_pos`` is
``(batch, pos)``, or ``(pos,)`` after ``remove_batch_dim``, and loses ``pos`` when an int
``pos_slice`` picks one position (TL's ``Slice`` semantics).

Norm conventions (as TL): ``apply_ln_to_stack`` centres each component (LN, LNPre) and divides by
the *cached* ``hook_scale`` of the norm that reads the stack; it does not apply the norm's ``w``
and ``b`` (fold them into the next weights first, as TL users do with ``fold_ln``). Because the
scale is shared, a stack that sums to the residual then sums to that norm's ``hook_normalized``
(which, as in TL, is taken before ``w`` and ``b``). ``logit_attrs`` applies that scaling itself
and dots with ``W_U[:, token]``: ``b_U`` is not included.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from tinyinterp.config import NORMALIZATION_TYPES
from tinyinterp.hooks import get_act_name

NORMALIZED_TYPES = tuple(t for t in NORMALIZATION_TYPES if t is not None)  # the norms that exist
SliceInput = None | int | slice | tuple | Sequence[int] | np.ndarray | jax.Array


# ----------------------------------------------------------------------------- slicing
class Slice:
    """TransformerLens' ``Slice``: one way to say "which positions / batch items / neurons".

    * ``None``            -> everything (identity)
    * ``int`` ``i``       -> ``x[i]``: the dimension is removed
    * ``tuple`` ``(k,)``, ``(m, k)``, ``(m, k, s)`` -> ``slice(*t)``; a ``slice`` is used as is
    * list / numpy / jax array of indices -> ``x[idx]``: the dimension keeps ``len(idx)`` entries
    """

    def __init__(self, input_slice: SliceInput | Slice = None):
        if isinstance(input_slice, Slice):
            self.slice, self.mode = input_slice.slice, input_slice.mode
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        elif isinstance(input_slice, (int, np.integer)) and not isinstance(input_slice, bool):
            self.slice, self.mode = int(input_slice), "int"
        elif isinstance(input_slice, tuple):
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, (list, np.ndarray, jax.Array)):
            idx = input_slice if isinstance(input_slice, jax.Array) else np.asarray(input_slice)
            if idx.ndim == 0:
                self.slice, self.mode = int(idx), "int"
            elif idx.ndim == 1 and (jnp.issubdtype(idx.dtype, jnp.integer) or idx.size == 0):
                self.slice, self.mode = idx.astype(np.int32) if idx.size == 0 else idx, "array"
            else:
                raise ValueError(f"an index-array slice must be a 1-D array of integers, got shape "
                                 f"{tuple(idx.shape)} dtype {idx.dtype}")
        else:
            raise TypeError(f"cannot slice with {input_slice!r}: use None, an int, a (start, stop[, "
                            "step]) tuple, a slice, or a 1-D list/array of indices")

    def apply(self, x: jax.Array, dim: int = 0) -> jax.Array:
        """Apply along ``dim`` (negative counts from the end)."""
        if self.mode == "identity":
            return x
        index = [slice(None)] * x.ndim
        index[dim] = self.slice
        return x[tuple(index)]

    def indices(self, max_ctx: int | None = None) -> np.ndarray:
        """The indices selected from an axis of length ``max_ctx`` (an int slice gives ``[i]``)."""
        if self.mode == "int":
            return np.array([self.slice])
        if max_ctx is None:
            raise ValueError("max_ctx is needed to list the indices of a non-int slice")
        return np.arange(max_ctx)[np.asarray(self.slice) if self.mode == "array" else self.slice]

    def __repr__(self) -> str:
        return f"Slice({self.slice!r}, mode={self.mode!r})"


def _with_leading(x: jax.Array, ndim: int) -> jax.Array:
    """Add leading size-1 axes so ``x`` has rank ``ndim`` (explicit broadcasting: the library is
    clean under ``jax_numpy_rank_promotion="raise"``)."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def accumulated_bias(params: dict, cfg, layer: int, mlp_input: bool = False,
                     include_mlp_biases: bool = True) -> Float[Array, " d_model"]:
    """Sum of the biases written into the residual stream before the input of ``layer``: every
    ``b_O`` (and ``b_out`` if ``include_mlp_biases``) of layers ``< layer``, plus this layer's
    ``b_O`` when ``mlp_input`` (TL's ``HookedTransformer.accumulated_bias``). -> [d_model]"""
    if not 0 <= layer <= cfg.n_layers:
        raise ValueError(f"layer must be in [0, n_layers={cfg.n_layers}], got {layer}")
    if mlp_input and layer == cfg.n_layers:
        raise ValueError("mlp_input=True needs a layer below n_layers: the unembed has no MLP input")
    total = jnp.zeros((cfg.d_model,), jnp.float32)
    for i in range(layer):
        total = total + params["blocks"][i]["attn"]["b_O"]
        if include_mlp_biases and not cfg.attn_only:
            total = total + params["blocks"][i]["mlp"]["b_out"]
    if mlp_input:
        total = total + params["blocks"][layer]["attn"]["b_O"]
    return total


# ----------------------------------------------------------------------------- the cache
class ActivationCache(Mapping):
    """Read-only {hook name: array}. Index by full name or TL shorthand: ``cache["pattern", 0]``,
    ``cache["scale", 0, "ln1"]``, ``cache["normalized"]`` (ln_final), ``cache["resid_post", -1]``.

    Iteration, ``keys()``, ``values()``, ``items()`` follow the forward pass order. ``model`` is the
    ``HookedTransformer`` that produced the activations (its ``cfg`` and ``params`` are read by the
    decompositions)."""

    def __init__(self, cache_dict: dict[str, jax.Array], model, has_batch_dim: bool = True):
        order = {n: i for i, n in enumerate(model.hook_names)} if model is not None else {}
        # forward order (hook points first, then their "_grad" entries), not jit's sorted order
        self._cache = dict(sorted(cache_dict.items(),
                                  key=lambda kv: (kv[0].endswith("_grad"),
                                                  order.get(kv[0].removesuffix("_grad"), 1 << 30))))
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ------------------------------------------------------------------ mapping
    def _resolve(self, key) -> str:
        """Full hook name for a key: a full name, a shorthand, or (name, layer[, layer_type])."""
        if isinstance(key, str) and key in self._cache:
            return key
        if isinstance(key, tuple):
            if not 1 <= len(key) <= 3:
                raise KeyError(f"a tuple key is (name, layer[, layer_type]), got {key!r}")
            if len(key) > 1 and key[1] is not None and key[1] < 0:
                key = (key[0], self._cfg.n_layers + key[1], *key[2:])  # TL: negative layers
            return get_act_name(*key)
        if isinstance(key, str):
            return get_act_name(key)
        raise KeyError(f"cache keys are hook names (str) or (name, layer[, layer_type]) tuples, "
                       f"got {key!r}")

    def __getitem__(self, key) -> jax.Array:
        name = self._resolve(key)
        if name not in self._cache:
            raise KeyError(self._missing_message(key, name))
        return self._cache[name]

    def _missing_message(self, key, name: str) -> str:
        valid = self.model.hook_names if self.model is not None else []
        if name in valid:
            return (f"{name!r} (from key {key!r}) is a hook point of this model but was not cached;"
                    " include it in run_with_cache(names_filter=...)")
        close = difflib.get_close_matches(name, list(self._cache) or valid, n=3, cutoff=0.5)
        return (f"{name!r} (from key {key!r}) is not in this cache"
                + (f"; closest cached names: {close}" if close else "")
                + f" ({len(self._cache)} entries; see cache.keys())")

    def __contains__(self, key) -> bool:
        try:
            return self._resolve(key) in self._cache
        except (KeyError, ValueError, TypeError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._cache)

    def __len__(self) -> int:
        return len(self._cache)

    def __repr__(self) -> str:
        return (f"ActivationCache({len(self)} activations, has_batch_dim={self.has_batch_dim}, "
                f"keys={list(self._cache)[:4]}{' ...' if len(self) > 4 else ''})")

    # ------------------------------------------------------------------ helpers
    @property
    def _cfg(self):
        if self.model is None:
            raise ValueError("this ActivationCache has no model; decompositions need model.cfg and "
                             "model.params (build it with ActivationCache(cache_dict, model))")
        return self.model.cfg

    @property
    def _params(self) -> dict:
        self._cfg  # noqa: B018 (the clear error when there is no model)
        return self.model.params

    def _layer(self, layer: int | None, what: str = "layer") -> int:
        """TL convention: None and -1 mean n_layers (the unembed input)."""
        n = self._cfg.n_layers
        if layer is None or layer == -1:
            return n
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer <= n:
            raise ValueError(f"{what} must be in [0, n_layers={n}], -1 or None (both mean n_layers, "
                             f"the input to the unembed), got {layer!r}")
        return int(layer)

    def _need_mid(self, what: str) -> None:
        if self._cfg.attn_only:
            raise ValueError(f"{what} needs resid_mid / the MLP of a layer, but this model is "
                             "attn_only (it has none)")

    def _batch_size(self) -> int:
        for v in self._cache.values():
            if v.ndim > 0:
                return int(v.shape[0])
        return 1

    def _resid_input(self, layer: int, mlp_input: bool = False) -> jax.Array:
        """The residual stream read by ``layer`` (its attn, or its MLP with ``mlp_input``);
        layer == n_layers is the input to the unembed."""
        if mlp_input:
            return self["resid_mid", layer]
        if layer == self._cfg.n_layers:
            return self["resid_post", layer - 1]
        return self["resid_pre", layer]

    def _empty_stack(self, pos_slice: Slice) -> jax.Array:
        ref = pos_slice.apply(self._any_resid(), dim=-2)  # [*batch_and_pos, d_model]
        return jnp.zeros((0, *ref.shape), ref.dtype)

    def _any_resid(self) -> jax.Array:
        for name in ("hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"):
            if name in self._cache:
                return self._cache[name]
        raise KeyError("an empty stack needs hook_embed in the cache to know its shape")

    # ------------------------------------------------------------------ batch dim
    def remove_batch_dim(self) -> ActivationCache:
        """A new cache without the batch axis (batch size must be 1)."""
        if not self.has_batch_dim:
            warnings.warn("remove_batch_dim: this cache has no batch dimension already",
                          stacklevel=2)
            return self
        batch = self._batch_size()
        if batch != 1:
            raise ValueError(f"remove_batch_dim needs batch size 1, but this cache has batch size "
                             f"{batch}; pick one item first: cache.apply_slice_to_batch_dim(i)")
        new = {k: v[0] if v.ndim > 0 else v for k, v in self._cache.items()}
        return ActivationCache(new, self.model, has_batch_dim=False)

    def apply_slice_to_batch_dim(self, batch_slice: SliceInput | Slice) -> ActivationCache:
        """A new cache with ``batch_slice`` applied to every activation's batch axis (an int
        removes the axis)."""
        batch_slice = Slice(batch_slice)
        if not self.has_batch_dim and batch_slice.mode != "identity":
            raise ValueError("cannot slice the batch of a cache without a batch dimension")
        new = {k: batch_slice.apply(v, dim=0) if v.ndim > 0 else v for k, v in self._cache.items()}
        return ActivationCache(new, self.model,
                               has_batch_dim=self.has_batch_dim and batch_slice.mode != "int")

    # ------------------------------------------------------------------ stacks of residual streams
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False,
                          apply_ln: bool = False, pos_slice: SliceInput | Slice = None,
                          mlp_input: bool = False, return_labels: bool = False):
        """The residual stream at the input of each layer up to ``layer`` (logit lens).

        -> [layers_covered, *batch_and_pos, d_model] (and labels "0_pre", "0_mid", ...,
        "final_post"). ``layer`` None/-1/n_layers includes the final residual ("final_post");
        otherwise the stack ends with ``resid_pre`` of ``layer`` (and ``resid_mid`` of ``layer``
        with ``mlp_input``). ``incl_mid`` adds ``resid_mid`` of every earlier layer.
        ``apply_ln``: for the final layer (logit lens, as TL since PR #1180) each entry goes
        through ``ln_final`` with its *own* statistics, including ``w`` and ``b``; otherwise the
        cached scale of the reading norm is used (``apply_ln_to_stack``).
        """
        pos_slice = Slice(pos_slice)
        layer = self._layer(layer)
        n = self._cfg.n_layers
        if incl_mid and layer > 0 or mlp_input:
            self._need_mid("incl_mid / mlp_input")
        if mlp_input and layer == n:
            raise ValueError("mlp_input=True needs a layer below n_layers")
        parts, labels = [], []
        for i in range(layer + 1):
            if i == n:
                parts.append(self["resid_post", n - 1])
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        stack = jnp.stack([pos_slice.apply(p, dim=-2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           has_batch_dim=self.has_batch_dim,
                                           recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False,
                        mode: Literal["all", "mlp", "attn"] = "all", apply_ln: bool = False,
                        pos_slice: SliceInput | Slice = None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual stream read by ``layer`` as a stack of the outputs that wrote it:
        "embed", "pos_embed", then "{l}_attn_out" / "{l}_mlp_out" for every l < layer (and
        "{layer}_attn_out" with ``mlp_input``). Sums to that residual stream.

        -> [components, *batch_and_pos, d_model] (and labels). ``mode`` "attn"/"mlp" keeps only
        those outputs; ``apply_ln`` scales by the reading norm's cached scale.
        """
        if mode not in ("all", "mlp", "attn"):
            raise ValueError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}")
        pos_slice = Slice(pos_slice)
        layer = self._layer(layer)
        if mlp_input:
            self._need_mid("mlp_input")
            if layer == self._cfg.n_layers:
                raise ValueError("mlp_input=True needs a layer below n_layers")
        incl_attn = mode != "mlp"
        incl_mlp = mode != "attn" and not self._cfg.attn_only
        parts, labels = [], []
        if incl_embeds:
            for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
                if name in self._cache:
                    parts.append(self[name])
                    labels.append(label)
        for i in range(layer):
            if incl_attn:
                parts.append(self["attn_out", i])
                labels.append(f"{i}_attn_out")
            if incl_mlp:
                parts.append(self["mlp_out", i])
                labels.append(f"{i}_mlp_out")
        if mlp_input and incl_attn:
            parts.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        if parts:
            stack = jnp.stack([pos_slice.apply(p, dim=-2) for p in parts])
        else:
            stack = self._empty_stack(pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack

    def _head_results(self, layer: int) -> jax.Array:
        """hook_result of ``layer`` [*batch, pos, head_index, d_model], or z @ W_O when not cached."""
        name = f"blocks.{layer}.attn.hook_result"
        if name in self._cache:
            return self._cache[name]
        z = self["z", layer]  # [*batch, pos, head_index, d_head]
        # z [..., head, d_head] @ W_O [head, d_head, d_model] -> [..., head, d_model]
        return jnp.einsum("...hd,hdm->...hm", z, self._params["blocks"][layer]["attn"]["W_O"])

    def compute_head_results(self) -> ActivationCache:
        """A new cache with ``hook_result`` (z @ W_O) for every layer whose result is missing."""
        new = dict(self._cache)
        for layer in range(self._cfg.n_layers):
            new[f"blocks.{layer}.attn.hook_result"] = self._head_results(layer)
        return ActivationCache(new, self.model, has_batch_dim=self.has_batch_dim)

    def stack_head_results(self, layer: int | None = -1, return_labels: bool = False,
                           incl_remainder: bool = False, pos_slice: SliceInput | Slice = None,
                           apply_ln: bool = False):
        """Every head's output (``hook_result``) for the layers before ``layer``, labels "L{l}H{h}".

        -> [layer * n_heads, *batch_and_pos, d_model]. Per layer the heads sum to
        ``attn_out - b_O``. ``incl_remainder`` appends "remainder" = (residual read by ``layer``)
        - sum of the heads, so the stack sums to that residual."""
        pos_slice = Slice(pos_slice)
        layer = self._layer(layer)
        parts, labels = [], []
        for i in range(layer):
            # [*batch, pos, head, d_model] -> pos sliced (dim -3), heads moved to the front
            r = pos_slice.apply(self._head_results(i), dim=-3)
            parts.append(jnp.moveaxis(r, -2, 0))  # [head, *batch_and_pos, d_model]
            labels += [f"L{i}H{h}" for h in range(self._cfg.n_heads)]
        stack = jnp.concatenate(parts, axis=0) if parts else self._empty_stack(pos_slice)
        if incl_remainder:
            resid = pos_slice.apply(self._resid_input(layer), dim=-2)
            stack = jnp.concatenate([stack, (resid - jnp.sum(stack, axis=0))[None]], axis=0)
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice,
                                           has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack

    def stack_activation(self, activation_name: str, layer: int | None = -1,
                         sublayer_type: str | None = None) -> jax.Array:
        """``cache[activation_name, l, sublayer_type]`` stacked over l < ``layer`` -> [layers, ...]."""
        layer = self._layer(layer)
        if layer == 0:
            raise ValueError("stack_activation with layer=0 stacks nothing; use layer >= 1")
        return jnp.stack([self[activation_name, i, sublayer_type] for i in range(layer)])

    def get_neuron_results(self, layer: int, neuron_slice: SliceInput | Slice = None,
                           pos_slice: SliceInput | Slice = None) -> jax.Array:
        """What each neuron of ``layer``'s MLP writes to the residual stream: ``post[..., n] *
        W_out[n]`` -> [*batch_and_pos, neurons, d_model] (without ``b_out``). Not cached:
        cheap to recompute, large to store."""
        self._need_mid("get_neuron_results")
        if not 0 <= layer < self._cfg.n_layers:
            raise ValueError(f"layer must be in [0, n_layers={self._cfg.n_layers}), got {layer}")
        neuron_slice, pos_slice = Slice(neuron_slice), Slice(pos_slice)
        post = pos_slice.apply(self["post", layer], dim=-2)  # [*batch_and_pos, d_mlp]
        post = neuron_slice.apply(post, dim=-1)  # [*batch_and_pos, neurons] (or no neuron axis)
        W_out = neuron_slice.apply(self._params["blocks"][layer]["mlp"]["W_out"], dim=0)
        # post [..., neurons, 1] * W_out [neurons, d_model] -> [..., neurons, d_model]
        return post[..., None] * _with_leading(W_out, post.ndim + 1)

    def stack_neuron_results(self, layer: int | None, pos_slice: SliceInput | Slice = None,
                             neuron_slice: SliceInput | Slice = None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False,
                             mlp_input: bool = False):
        """Every neuron's output for the layers before ``layer``, labels "L{l}N{n}".

        -> [layer * neurons, *batch_and_pos, d_model]. An int ``neuron_slice`` keeps one neuron
        per layer (the axis is kept). ``incl_remainder``: "remainder" = residual read by
        ``layer`` (its MLP with ``mlp_input``) - the neurons."""
        self._need_mid("stack_neuron_results")
        layer = self._layer(layer)
        neuron_slice = Slice(neuron_slice)
        if neuron_slice.mode == "int":
            neuron_slice = Slice([neuron_slice.slice])
        pos_slice = Slice(pos_slice)
        neurons = neuron_slice.indices(self._cfg.d_mlp)
        labels = [f"L{i}N{int(n)}" for i in range(layer) for n in neurons]
        parts = [jnp.moveaxis(self.get_neuron_results(i, neuron_slice, pos_slice), -2, 0)
                 for i in range(layer)]  # each [neurons, *batch_and_pos, d_model]
        stack = jnp.concatenate(parts, axis=0) if parts else self._empty_stack(pos_slice)
        if incl_remainder:
            resid = pos_slice.apply(self._resid_input(layer, mlp_input), dim=-2)
            stack = jnp.concatenate([stack, (resid - jnp.sum(stack, axis=0))[None]], axis=0)
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: SliceInput | Slice = None,
                                     return_labels: bool = False):
        """The residual stream read by ``layer`` split into every head ("L{l}H{h}"), every neuron
        ("L{l}N{n}", or "{l}_mlp_out" without ``expand_neurons``), "embed", "pos_embed" and
        "bias" (the summed ``b_O``, plus ``b_out`` when neurons are expanded), in TL's order.
        Sums to that residual stream. -> [components, *batch_and_pos, d_model] (and labels)."""
        pos_slice = Slice(pos_slice)
        layer = self._layer(layer)
        cfg = self._cfg
        if mlp_input:
            self._need_mid("mlp_input")
            if layer == cfg.n_layers:
                raise ValueError("mlp_input=True needs a layer below n_layers")
        heads, labels = self.stack_head_results(layer + int(mlp_input), return_labels=True,
                                                pos_slice=pos_slice)
        parts = [heads]
        if not cfg.attn_only and layer > 0:
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(layer, pos_slice=pos_slice,
                                                                   return_labels=True)
            else:
                neurons, neuron_labels = self.decompose_resid(layer, mlp_input=mlp_input,
                                                              mode="mlp", pos_slice=pos_slice,
                                                              incl_embeds=False, return_labels=True)
            parts.append(neurons)
            labels = labels + neuron_labels
        for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if name in self._cache:
                parts.append(pos_slice.apply(self[name], dim=-2)[None])
                labels.append(label)
        bias = accumulated_bias(self._params, cfg, layer, mlp_input,
                                include_mlp_biases=expand_neurons)  # [d_model]
        parts.append(jnp.broadcast_to(_with_leading(bias, heads.ndim), (1, *heads.shape[1:])))
        labels.append("bias")
        stack = jnp.concatenate(parts, axis=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ norms and logits
    def _cached_scale(self, layer: int, mlp_input: bool, pos_slice: Slice,
                      batch_slice: Slice) -> jax.Array:
        if layer == self._cfg.n_layers:
            name = "ln_final.hook_scale"
        else:
            if mlp_input:
                self._need_mid("mlp_input")
            name = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        if name not in self._cache:
            raise KeyError(f"applying the norm needs the cached scale {name!r}; include it in "
                           "run_with_cache(names_filter=...)")
        scale = pos_slice.apply(self._cache[name], dim=-2)  # [*batch, pos, 1] sliced
        if self.has_batch_dim:
            scale = batch_slice.apply(scale, dim=0)
        return scale

    def apply_ln_to_stack(self, residual_stack: Float[Array, "components *batch_and_pos d_model"],
                          layer: int | None = None, mlp_input: bool = False,
                          pos_slice: SliceInput | Slice = None,
                          batch_slice: SliceInput | Slice = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> jax.Array:
        """Treat each component as input to ``layer``'s norm (ln1, ln2 with ``mlp_input``,
        ln_final for None/-1/n_layers) and apply that norm's *cached* scaling: centre (LN,
        LNPre) and divide by the cached ``hook_scale``. No ``w``/``b`` (as TL). Unchanged for
        normalization None.

        ``pos_slice`` is assumed already applied to the stack (it slices the cached scale);
        ``batch_slice`` is applied to both (stack axis 1 if ``has_batch_dim``). With
        ``recompute_ln`` and the final layer, each component goes through ``ln_final`` with its
        own statistics, ``w`` and ``b`` included (TL's logit-lens path)."""
        cfg = self._cfg
        layer = self._layer(layer)
        pos_slice, batch_slice = Slice(pos_slice), Slice(batch_slice)
        if has_batch_dim:
            # (TL returns before this for models without norms, so there batch_slice is ignored;
            # here the stack's shape does not depend on the normalization type.)
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if cfg.normalization_type not in NORMALIZED_TYPES:
            return residual_stack
        x = residual_stack
        if cfg.normalization_type in ("LN", "LNPre"):
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        if recompute_ln and layer == cfg.n_layers:
            x = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.eps)
            p = self._params.get("ln_final", {})
            if "w" in p:
                x = x * _with_leading(p["w"], x.ndim)
            if "b" in p:
                x = x + _with_leading(p["b"], x.ndim)
            return x
        scale = self._cached_scale(layer, mlp_input, pos_slice, batch_slice)
        if scale.ndim > x.ndim:
            raise ValueError(f"the cached scale has shape {tuple(scale.shape)} but the stack "
                             f"{tuple(residual_stack.shape)}; apply the same pos_slice/batch_slice "
                             "to the stack (or pass has_batch_dim=False for a stack without batch)")
        return x / _with_leading(scale, x.ndim)

    def _residual_directions(self, tokens, what: str) -> jax.Array:
        """W_U[:, tokens] with the token axes first: [*token_shape, d_model]."""
        if isinstance(tokens, str):
            raise TypeError(f"{what}: tinyinterp models have no tokenizer; pass token ids (an int "
                            "or an int array), not a string")
        t = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
        if not jnp.issubdtype(t.dtype, jnp.integer):
            raise TypeError(f"{what} must be integer token ids, got dtype {t.dtype}")
        if t.ndim > 2:
            raise ValueError(f"{what} must be an int, [batch], [pos] or [batch, pos], got shape "
                             f"{tuple(t.shape)}")
        d_vocab_out = self._cfg.d_vocab_out
        if not isinstance(t, jax.core.Tracer) and t.size:
            lo, hi = int(np.min(t)), int(np.max(t))
            if lo < 0 or hi >= d_vocab_out:
                raise ValueError(f"{what} must lie in [0, d_vocab_out={d_vocab_out}); got min {lo},"
                                 f" max {hi} (JAX would silently clamp them)")
        W_U = self._params["unembed"]["W_U"]  # [d_model, d_vocab_out]
        return jnp.moveaxis(W_U[:, jnp.asarray(t)], 0, -1)  # [*token_shape, d_model]

    def logit_attrs(self, residual_stack: Float[Array, "components *batch_and_pos d_model"],
                    tokens, incorrect_tokens=None, pos_slice: SliceInput | Slice = None,
                    batch_slice: SliceInput | Slice = None,
                    has_batch_dim: bool = True) -> Float[Array, " components *batch_and_pos"]:
        """Direct logit attribution: how much each component of the stack adds to the logit of
        ``tokens`` (minus ``incorrect_tokens``'s, if given).

        The stack is first scaled as the input to the unembed (``apply_ln_to_stack`` with
        ln_final's cached scale; do not apply it yourself), then dotted with ``W_U[:, token]``.
        ``b_U`` and ln_final's ``w``/``b`` are not included (as TL; fold ln_final into the
        unembed for an exact logit decomposition). ``tokens``: an int (one token everywhere),
        [batch] (one per example, when the length equals the stack's batch size), [pos] (one per
        position, shared across the batch) or [batch, pos]. -> [components, *batch_and_pos]."""
        directions = self._residual_directions(tokens, "tokens")
        if incorrect_tokens is not None:
            wrong = self._residual_directions(incorrect_tokens, "incorrect_tokens")
            if wrong.shape != directions.shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape, got "
                                 f"{tuple(directions.shape[:-1])} and {tuple(wrong.shape[:-1])}")
            directions = directions - wrong
        batch_slice = Slice(batch_slice)
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice,
                                        batch_slice=batch_slice, has_batch_dim=has_batch_dim)
        if (has_batch_dim and batch_slice.mode != "int" and scaled.ndim == 4
                and directions.ndim == 2 and directions.shape[0] == scaled.shape[1]):
            directions = directions[:, None, :]  # [batch, 1, d_model]: per example, every position
        if directions.ndim > scaled.ndim - 1:
            raise ValueError(f"tokens of shape {tuple(directions.shape[:-1])} do not fit a stack of "
                             f"shape {tuple(scaled.shape)}")
        # [components, *batch_and_pos, d_model] . [*batch_and_pos, d_model] -> [components, ...]
        return jnp.sum(scaled * _with_leading(directions, scaled.ndim), axis=-1)
