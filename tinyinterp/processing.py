"""Weight processing (TransformerLens' ``process_weights``): reparametrisations that keep the
model's log-probabilities and make its weights easier to read.

Each function maps ``(params, cfg) -> (new params, new cfg)`` and leaves its inputs untouched
(params are immutable pytrees). ``process_weights(model, ...)`` applies them in TL's order and
returns a new HookedTransformer.

* ``fold_ln``: a norm's weight (and LN's bias) is folded into the matrices that read the norm's
  output (W_Q/W_K/W_V and their biases, W_in/b_in, W_U/b_U); LN becomes LNPre and RMS becomes RMSPre
  (parameter-free), which is how a folded config says it is folded, as in TL. For LN the reading
  weights are also centred over d_model (the normalized input has zero mean, so a constant
  component of a weight's column is read as 0).
* ``center_writing_weights``: W_E, W_pos, W_O, b_O, W_out, b_out lose their mean over d_model
  (every reader centres the residual first). LN/LNPre models only.
* ``center_unembed``: W_U and b_U lose their mean over the vocabulary (softmax is shift-invariant).
* ``fold_value_biases``: b_V folds into b_O (b_O += sum_h b_V[h] @ W_O[h]; the pattern sums to 1).
* ``refactor_factored_attn_matrices``: W_QK = W_Q W_K^T and W_OV = W_V W_O re-factored by SVD
  (Elhage et al. 2021): W_Q, W_K balanced with the biases as an extra input coordinate, W_O
  orthonormal rows.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tinyinterp.config import TransformerConfig
from tinyinterp.model import HookedTransformer
from tinyinterp.params import Params, flatten_params, unflatten_params

_FOLDED = {"LN": "LNPre", "RMS": "RMSPre"}


def _copy(params: Params) -> Params:
    """A new nested dict/list structure sharing the (immutable) leaves."""
    if isinstance(params, dict):
        return {k: _copy(v) for k, v in params.items()}
    if isinstance(params, list):
        return [_copy(v) for v in params]
    return params


def _check(params: Params, cfg: TransformerConfig) -> None:
    if not isinstance(cfg, TransformerConfig):
        raise TypeError(f"cfg must be a TransformerConfig, got {type(cfg).__name__}")
    unflatten_params(flatten_params(params), cfg)  # a clear error if params don't match cfg


def fold_ln(params: Params, cfg: TransformerConfig, *, center_weights: bool = True
            ) -> tuple[Params, TransformerConfig]:
    """Fold each norm's w (and LN's b) into the weights that read it; LN -> LNPre, RMS -> RMSPre.

    (x * w + b) @ W + c = x @ (w[:, None] * W) + (b @ W + c). With LN (and ``center_weights``),
    W's columns are centred over d_model as well, since x has zero mean. A model already LNPre,
    RMSPre or without norms is returned unchanged."""
    _check(params, cfg)
    kind = cfg.normalization_type
    if kind not in _FOLDED:
        return params, cfg
    p = _copy(params)
    is_ln = kind == "LN"

    def fold(ln: dict, W: jnp.ndarray, b: jnp.ndarray, axis_in: int):
        """W's d_model axis is ``axis_in``; b is broadcast against W with that axis summed."""
        w = ln["w"]
        shape = [1] * W.ndim
        shape[axis_in] = w.shape[0]
        if is_ln:
            b = b + jnp.sum(W * ln["b"].reshape(shape), axis=axis_in)
        W = W * w.reshape(shape)
        if is_ln and center_weights:
            W = W - jnp.mean(W, axis=axis_in, keepdims=True)
        return W, b

    for blk in p["blocks"]:
        ln1 = blk.pop("ln1")
        a = blk["attn"]
        for c in "QKV":  # W [head, d_model, d_head], b [head, d_head]
            a[f"W_{c}"], a[f"b_{c}"] = fold(ln1, a[f"W_{c}"], a[f"b_{c}"], 1)
        if not cfg.attn_only:
            ln2 = blk.pop("ln2")
            blk["mlp"]["W_in"], blk["mlp"]["b_in"] = fold(ln2, blk["mlp"]["W_in"],
                                                          blk["mlp"]["b_in"], 0)
    lnf = p.pop("ln_final")
    p["unembed"]["W_U"], p["unembed"]["b_U"] = fold(lnf, p["unembed"]["W_U"], p["unembed"]["b_U"], 0)
    return p, cfg.replace(normalization_type=_FOLDED[kind])


def center_writing_weights(params: Params, cfg: TransformerConfig
                           ) -> tuple[Params, TransformerConfig]:
    """Remove the d_model mean of everything that writes to the residual stream (W_E, W_pos,
    W_O, b_O, W_out, b_out). Exact only when every reader centres its input (LN, LNPre)."""
    _check(params, cfg)
    if cfg.normalization_type not in ("LN", "LNPre"):
        raise ValueError(f"center_writing_weights needs a model whose norms centre the residual "
                         f"(normalization_type 'LN' or 'LNPre'), got {cfg.normalization_type!r}: "
                         "with RMS norms or none the mean of the residual is read, so centring "
                         "would change the model")
    p = _copy(params)

    def center(x):
        return x - jnp.mean(x, axis=-1, keepdims=True)

    p["embed"]["W_E"] = center(p["embed"]["W_E"])
    p["pos_embed"]["W_pos"] = center(p["pos_embed"]["W_pos"])
    for blk in p["blocks"]:
        blk["attn"]["W_O"] = center(blk["attn"]["W_O"])
        blk["attn"]["b_O"] = center(blk["attn"]["b_O"])
        if not cfg.attn_only:
            blk["mlp"]["W_out"] = center(blk["mlp"]["W_out"])
            blk["mlp"]["b_out"] = center(blk["mlp"]["b_out"])
    return p, cfg


def center_unembed(params: Params, cfg: TransformerConfig) -> tuple[Params, TransformerConfig]:
    """W_U -= its mean over the vocabulary, b_U -= its mean: the logits shift by the same amount
    for every token, so log-probs are unchanged."""
    _check(params, cfg)
    p = _copy(params)
    W_U, b_U = p["unembed"]["W_U"], p["unembed"]["b_U"]
    p["unembed"]["W_U"] = W_U - jnp.mean(W_U, axis=-1, keepdims=True)
    p["unembed"]["b_U"] = b_U - jnp.mean(b_U)
    return p, cfg


def fold_value_biases(params: Params, cfg: TransformerConfig) -> tuple[Params, TransformerConfig]:
    """b_O += sum_h b_V[h] @ W_O[h], b_V = 0: a head's value bias adds a constant to its output
    (its pattern sums to 1), so the layer's output bias can carry it."""
    _check(params, cfg)
    p = _copy(params)
    for blk in p["blocks"]:
        a = blk["attn"]
        # b_V [head, d_head] x W_O [head, d_head, d_model] -> [d_model]
        a["b_O"] = a["b_O"] + jnp.einsum("hd,hdm->m", a["b_V"], a["W_O"])
        a["b_V"] = jnp.zeros_like(a["b_V"])
    return p, cfg


def refactor_factored_attn_matrices(params: Params, cfg: TransformerConfig
                                    ) -> tuple[Params, TransformerConfig]:
    """Re-factor each head's W_QK and W_OV by SVD (TL's experimental option).

    QK: with the bias as an extra input coordinate, [W_Q; b_Q] [W_K; b_K]^T = U S V^T, and the new
    [W_Q; b_Q] = U sqrt(S), [W_K; b_K] = V sqrt(S) (top d_head singular values). OV: b_V is folded
    into b_O first, then W_V W_O = U S V^T and W_V = U S, W_O = V^T (orthonormal rows)."""
    _check(params, cfg)
    p, _ = fold_value_biases(params, cfg)
    dh = cfg.d_head
    for blk in p["blocks"]:
        a = blk["attn"]
        Wq = jnp.concatenate([a["W_Q"], a["b_Q"][:, None, :]], axis=1)  # [head, d_model+1, d_head]
        Wk = jnp.concatenate([a["W_K"], a["b_K"][:, None, :]], axis=1)
        qk = jnp.einsum("hid,hjd->hij", Wq, Wk)  # [head, d_model+1, d_model+1]
        U, S, Vh = jnp.linalg.svd(qk)
        root = jnp.sqrt(S[:, :dh])  # [head, d_head]
        Wq = U[:, :, :dh] * root[:, None, :]
        Wk = jnp.swapaxes(Vh[:, :dh, :], 1, 2) * root[:, None, :]
        a["W_Q"], a["b_Q"] = Wq[:, :-1], Wq[:, -1]
        a["W_K"], a["b_K"] = Wk[:, :-1], Wk[:, -1]
        ov = jnp.einsum("hmd,hdn->hmn", a["W_V"], a["W_O"])  # [head, d_model, d_model]
        U, S, Vh = jnp.linalg.svd(ov)
        a["W_V"] = U[:, :, :dh] * S[:, None, :dh]
        a["W_O"] = Vh[:, :dh, :]
    return p, cfg


def process_weights(model: HookedTransformer, fold_ln: bool = True,
                    center_writing_weights: bool = True, center_unembed: bool = True,
                    fold_value_biases: bool = True,
                    refactor_factored_attn_matrices: bool = False) -> HookedTransformer:
    """TransformerLens' ``process_weights`` with its flags and order: fold_ln,
    center_writing_weights (LN models only, skipped otherwise as in TL), center_unembed,
    fold_value_biases (then b_O re-centred), refactor_factored_attn_matrices. Returns a new model;
    ``model`` is unchanged. Log-probs are kept to float32 rounding."""
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"process_weights takes a HookedTransformer, got {type(model).__name__}")
    params, cfg = model.params, model.cfg
    for flag, name in ((fold_ln, "fold_ln"), (center_writing_weights, "center_writing_weights"),
                       (center_unembed, "center_unembed"), (fold_value_biases, "fold_value_biases"),
                       (refactor_factored_attn_matrices, "refactor_factored_attn_matrices")):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"process_weights: {name} must be True or False, got {flag!r}")
    centred = center_writing_weights and cfg.normalization_type in ("LN", "LNPre")
    if fold_ln:
        params, cfg = _fold_ln(params, cfg)
    if centred:
        params, cfg = _center_writing_weights(params, cfg)
    if center_unembed:
        params, cfg = _center_unembed(params, cfg)
    if fold_value_biases:
        params, cfg = _fold_value_biases(params, cfg)
        if centred:
            for blk in params["blocks"]:
                blk["attn"]["b_O"] = blk["attn"]["b_O"] - jnp.mean(blk["attn"]["b_O"])
    if refactor_factored_attn_matrices:
        params, cfg = _refactor(params, cfg)
    return HookedTransformer(cfg, params)


# the flags shadow the functions inside process_weights
_fold_ln, _center_writing_weights, _center_unembed = fold_ln, center_writing_weights, center_unembed
_fold_value_biases, _refactor = fold_value_biases, refactor_factored_attn_matrices

__all__ = ["center_unembed", "center_writing_weights", "fold_ln", "fold_value_biases",
           "process_weights", "refactor_factored_attn_matrices"]
