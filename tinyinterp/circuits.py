"""Weight-space circuit analysis: FactoredMatrix, QK/OV circuits, composition and copying scores.

Conventions (TransformerLens', right-multiplied: a residual row vector ``x`` is read as ``x @ W``):

    QK circuit of a head   W_Q @ W_K^T          [n_heads, d_model, d_model]   scores = q_resid QK k_resid^T
    OV circuit of a head   W_V @ W_O            [n_heads, d_model, d_model]   output = src_resid OV
    full QK circuit        W_E QK W_E^T         [n_heads, d_vocab, d_vocab]   (query token, key token)
    full OV circuit        W_E OV W_U           [n_heads, d_vocab, d_vocab_out] (attended token, logit)

All are returned as :class:`FactoredMatrix` so nothing bigger than the factors is materialised until
asked for (``.AB``). Layer norms, biases and the positional embedding are ignored, as in TL's
``model.QK`` / ``model.OV`` and in Elhage et al. (2021), "A Mathematical Framework for Transformer
Circuits".

Axis vocabulary: layer, head_index, d_model, d_head, d_vocab; ``...`` is any leading (batch) dims.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Complex, Float

from tinyinterp.config import TransformerConfig

__all__ = [
    "FactoredMatrix",
    "qk_circuit",
    "ov_circuit",
    "full_qk_circuit",
    "full_ov_circuit",
    "composition_scores",
    "all_composition_scores",
    "composition_score_baseline",
    "eigenvalue_copying_score",
    "ov_copying_scores",
]

CompositionMode = Literal["Q", "K", "V"]


# ---------------------------------------------------------------------------------------- helpers
@jax.jit
def _bmm(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x @ y`` over the last two axes with the leading (batch) axes broadcast explicitly (so it is
    clean under ``jax_numpy_rank_promotion="raise"``). x [..., n, k], y [..., k, m] -> [..., n, m]."""
    lead = jnp.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    x = jnp.broadcast_to(x, lead + x.shape[-2:])
    y = jnp.broadcast_to(y, lead + y.shape[-2:])
    return jnp.matmul(x, y)


def _mT(x: jax.Array) -> jax.Array:
    """Swap the last two axes: [..., a, b] -> [..., b, a]."""
    return jnp.swapaxes(x, -1, -2)


def _as_float_array(x: Any, what: str) -> jax.Array:
    arr = jnp.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"FactoredMatrix: {what} must be a floating-point array, got dtype "
                        f"{arr.dtype}; convert it with .astype(jnp.float32)")
    return arr


@jax.jit
def _factored_svd(A: jax.Array, B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Compact SVD of A @ B from the factors (one compiled program per shape)."""
    Qa, Ra = jnp.linalg.qr(A)  # [..., ldim, ka], [..., ka, mdim]
    # JAX's CPU LAPACK kernels call scipy's threaded OpenBLAS and XLA may run independent ops at
    # once; concurrent OpenBLAS calls can deadlock. This inert data dependency on Ra serialises
    # the two QRs.
    Bt = _mT(B) + 0.0 * Ra[..., :1, :1]  # [..., rdim, mdim]
    Qb, Rb = jnp.linalg.qr(Bt)  # [..., rdim, kb], [..., kb, mdim]
    middle = _bmm(Ra, _mT(Rb))  # [..., ka, kb]
    Um, S, Vmh = jnp.linalg.svd(middle, full_matrices=False)  # [.., ka, k], [.., k], [.., k, kb]
    U = _bmm(Qa, Um)  # [..., ldim, k]
    Vh = _bmm(Qb, _mT(Vmh))  # [..., rdim, k]
    return U, S, Vh


@jax.jit
def _factored_fro_norm(A: jax.Array, B: jax.Array) -> jax.Array:
    """||A @ B||_F [...] for A [..., n, k], B [..., k, m] via <A^T A, B B^T> (k x k matmuls)."""
    gram_a = _bmm(_mT(A), A)  # [..., k, k]
    gram_b = _bmm(B, _mT(B))  # [..., k, k]
    return jnp.sqrt(jnp.maximum(jnp.sum(gram_a * gram_b, axis=(-2, -1)), jnp.zeros((), A.dtype)))


# ---------------------------------------------------------------------------------- FactoredMatrix
@jax.tree_util.register_pytree_node_class
class FactoredMatrix:
    """The matrix ``A @ B``, kept as its two factors (TransformerLens' ``FactoredMatrix``).

    ``A`` [..., ldim, mdim], ``B`` [..., mdim, rdim]; leading (batch) dims broadcast, e.g. one matrix
    per head: ``FactoredMatrix(W_Q, W_K^T)`` is [n_heads, d_model, d_model] with ``mdim = d_head``.
    Low-rank products (QK and OV circuits have rank <= d_head) are cheap to multiply, decompose
    (SVD, eigenvalues, norm) and index without materialising ``A @ B``.

    A pytree (children ``A``, ``B``): it passes through ``jax.jit`` and ``jax.vmap``.
    """

    # numpy must not try to treat a FactoredMatrix as an array: `np_array @ fm` defers to
    # FactoredMatrix.__rmatmul__ (jax arrays defer to unknown types by themselves).
    __array_ufunc__ = None

    def __init__(self, A: Float[Array, "... ldim mdim"], B: Float[Array, "... mdim rdim"]):
        A = _as_float_array(A, "A")
        B = _as_float_array(B, "B")
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"FactoredMatrix: A and B must be at least 2-D, got shapes "
                             f"{tuple(A.shape)} and {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix: inner dimensions differ: A {tuple(A.shape)} has "
                             f"{A.shape[-1]} columns, B {tuple(B.shape)} has {B.shape[-2]} rows")
        try:
            lead = jnp.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except ValueError as e:
            raise ValueError(f"FactoredMatrix: leading dims of A {tuple(A.shape)} and B "
                             f"{tuple(B.shape)} do not broadcast") from e
        if A.dtype != B.dtype:
            dtype = jnp.promote_types(A.dtype, B.dtype)
            A, B = A.astype(dtype), B.astype(dtype)
        self.A = jnp.broadcast_to(A, lead + A.shape[-2:])
        self.B = jnp.broadcast_to(B, lead + B.shape[-2:])

    # pytree protocol
    def tree_flatten(self):
        return (self.A, self.B), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.A, obj.B = children
        return obj

    # ------------------------------------------------------------------ shape
    @property
    def ldim(self) -> int:
        return self.A.shape[-2]

    @property
    def mdim(self) -> int:
        return self.A.shape[-1]

    @property
    def rdim(self) -> int:
        return self.B.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """(*leading_dims, ldim, rdim): the shape of the dense product."""
        return tuple(self.A.shape[:-1]) + (self.rdim,)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return self.A.dtype

    @property
    def pair(self) -> tuple[jax.Array, jax.Array]:
        return self.A, self.B

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={self.shape}, mdim={self.mdim}, dtype={self.dtype})"

    # ------------------------------------------------------------------ products
    @property
    def AB(self) -> Float[Array, "... ldim rdim"]:
        """The dense product A @ B [..., ldim, rdim] (materialises it)."""
        return _bmm(self.A, self.B)

    @property
    def BA(self) -> Float[Array, "... mdim mdim"]:
        """The reverse product B @ A [..., mdim, mdim]; needs a square matrix (ldim == rdim)."""
        if self.ldim != self.rdim:
            raise ValueError(f"FactoredMatrix.BA needs ldim == rdim, shape is {self.shape}")
        return _bmm(self.B, self.A)

    @property
    def T(self) -> FactoredMatrix:
        """Transpose of the last two axes: (A B)^T = B^T A^T."""
        return FactoredMatrix(_mT(self.B), _mT(self.A))

    def __matmul__(self, other: Any) -> FactoredMatrix | jax.Array:
        """``self @ other``: other a FactoredMatrix, a matrix [..., rdim, n] (-> FactoredMatrix) or
        a vector [rdim] (-> array [..., ldim]). The inner dimension stays min(mdim, rdim)."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not hasattr(other, "shape"):
            return NotImplemented
        other = _as_float_array(other, "the right operand")
        if other.shape[-1 if other.ndim == 1 else -2] != self.rdim:
            raise ValueError(f"FactoredMatrix @ array: inner dimensions differ, {self.shape} @ "
                             f"{tuple(other.shape)}")
        if other.ndim == 1:  # A @ (B @ v): [..., ldim]
            return _bmm(self.A, _bmm(self.B, other[:, None]))[..., 0]
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, _bmm(self.B, other))
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Any) -> FactoredMatrix | jax.Array:
        """``other @ self``: other a matrix [..., n, ldim] (-> FactoredMatrix) or a vector [ldim]
        (-> array [..., rdim])."""
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        if not hasattr(other, "shape"):
            return NotImplemented
        other = _as_float_array(other, "the left operand")
        if other.shape[-1] != self.ldim:
            raise ValueError(f"array @ FactoredMatrix: inner dimensions differ, "
                             f"{tuple(other.shape)} @ {self.shape}")
        if other.ndim == 1:  # (v @ A) @ B: [..., rdim]
            return _bmm(_bmm(other[None, :], self.A), self.B)[..., 0, :]
        if self.ldim > self.mdim:
            return FactoredMatrix(_bmm(other, self.A), self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: float | jax.Array) -> FactoredMatrix:
        """Scalar multiple (folded into A)."""
        if jnp.ndim(scalar) != 0:
            raise ValueError("FactoredMatrix * x needs a scalar x; use @ for matrix products")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __neg__(self) -> FactoredMatrix:
        return FactoredMatrix(-self.A, self.B)

    # ------------------------------------------------------------------ decompositions
    def svd(self) -> tuple[Float[Array, "... ldim k"], Float[Array, "... k"],
                           Float[Array, "... rdim k"]]:
        """Compact SVD without forming A @ B: (U [..., ldim, k], S [..., k], Vh [..., rdim, k]),
        k = min(ldim, mdim, rdim), singular values descending, such that
        ``A @ B == U @ diag(S) @ Vh^T``.

        As in TransformerLens, ``Vh`` holds the right singular vectors as *columns* (it is the
        transpose of numpy's ``vh``). Method: reduced QR of both factors, A = Qa Ra and
        B^T = Qb Rb, then A B = Qa (Ra Rb^T) Qb^T and only the small middle matrix is decomposed.
        """
        return _factored_svd(self.A, self.B)

    @property
    def U(self) -> Float[Array, "... ldim k"]:
        return self.svd()[0]

    @property
    def S(self) -> Float[Array, "... k"]:
        return self.svd()[1]

    @property
    def Vh(self) -> Float[Array, "... rdim k"]:
        return self.svd()[2]

    @property
    def eigenvalues(self) -> Complex[Array, "... mdim"]:
        """Eigenvalues of B @ A [..., mdim] (complex). These are the eigenvalues of A @ B apart
        from zeros: if BAv = kv then AB(Av) = k(Av). A @ B has ldim - mdim extra zero eigenvalues
        when ldim > mdim; B @ A has mdim - ldim extra zeros when mdim > ldim."""
        return jnp.linalg.eigvals(self.BA)

    def norm(self) -> Float[Array, "..."]:
        """Frobenius norm [...] (= sqrt of the sum of squared singular values), from the factors'
        Gram matrices, ||A B||_F^2 = <A^T A, B B^T>: no decomposition, no LAPACK call."""
        return _factored_fro_norm(self.A, self.B)

    def collapse_l(self) -> Float[Array, "... k rdim"]:
        """S Vh^T [..., k, rdim]: the product with the orthogonal left factor U removed
        (same Frobenius norm and same products from the right as A @ B up to rotation)."""
        U, S, Vh = self.svd()
        return S[..., :, None] * _mT(Vh)

    def collapse_r(self) -> Float[Array, "... ldim k"]:
        """U S [..., ldim, k]: the product with the orthogonal right factor removed."""
        U, S, Vh = self.svd()
        return U * S[..., None, :]

    def make_even(self) -> FactoredMatrix:
        """The same matrix refactored as (U sqrt(S), sqrt(S) Vh^T): balanced, orthogonal factors."""
        U, S, Vh = self.svd()
        r = jnp.sqrt(S)
        return FactoredMatrix(U * r[..., None, :], r[..., :, None] * _mT(Vh))

    def get_corner(self, k: int = 3) -> Float[Array, "... k k"]:
        """The top-left k x k block of A @ B (computed from the factors' first rows/columns);
        leading dims are kept."""
        return _bmm(self.A[..., :k, :], self.B[..., :, :k])

    def unsqueeze(self, axis: int) -> FactoredMatrix:
        """Insert a new leading axis (``axis`` counts among the leading dims, or from the end of
        them if negative)."""
        n_lead = self.ndim - 2
        if not -n_lead - 1 <= axis <= n_lead:
            raise ValueError(f"unsqueeze: axis {axis} out of range for {n_lead} leading dims")
        ax = axis if axis >= 0 else n_lead + 1 + axis
        return FactoredMatrix(jnp.expand_dims(self.A, ax), jnp.expand_dims(self.B, ax))

    # ------------------------------------------------------------------ indexing
    def __getitem__(self, idx: Any) -> FactoredMatrix:
        """Index the leading dims (``fm[h]``: one head), or also rows (one more index) and
        columns (two more), as in TL. Integer row/column indices keep their axis (a 1-row matrix)."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(i is Ellipsis or i is None for i in idx):
            raise IndexError("FactoredMatrix indexing supports ints, slices and index arrays, "
                             "not ... or None")
        n_lead = self.ndim - 2

        def keep(i):  # an int index on a matrix axis keeps the axis
            return slice(i, i + 1) if isinstance(i, (int, np.integer)) else i

        if len(idx) <= n_lead:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if len(idx) == n_lead + 1:
            lead, rows = idx[:n_lead], keep(idx[-1])
            return FactoredMatrix(self.A[lead + (rows,)], self.B[lead])
        if len(idx) == n_lead + 2:
            lead, rows, cols = idx[:n_lead], keep(idx[-2]), keep(idx[-1])
            return FactoredMatrix(self.A[lead + (rows,)], self.B[lead + (slice(None), cols)])
        raise IndexError(f"too many indices ({len(idx)}) for a FactoredMatrix of shape {self.shape}")


# --------------------------------------------------------------------------------- circuits
def _params_of(source: Any) -> dict:
    """A params dict from a params dict or anything with ``.params`` (a HookedTransformer)."""
    params = getattr(source, "params", source)
    if not isinstance(params, dict) or "blocks" not in params:
        raise TypeError("expected a HookedTransformer or a params dict (as from init_params), got "
                        f"{type(source).__name__}")
    return params


def _stack_attn(params: dict, name: str, layer: int | None) -> jax.Array:
    """params["blocks"][l]["attn"][name] for one layer, or stacked over layers (layer=None)."""
    blocks = params["blocks"]
    if layer is None:
        return jnp.stack([b["attn"][name] for b in blocks])  # [n_layers, n_heads, ...]
    if not -len(blocks) <= layer < len(blocks):
        raise IndexError(f"layer {layer} out of range for a model with {len(blocks)} layers")
    return blocks[layer]["attn"][name]


def qk_circuit(source: Any, layer: int | None = None) -> FactoredMatrix:
    """Per-head QK circuit ``W_Q @ W_K^T``: [n_heads, d_model, d_model] for one layer, or
    [n_layers, n_heads, d_model, d_model] for ``layer=None`` (TL's ``model.QK``).

    ``source``: a HookedTransformer or a params dict. Entry [i, j] is the attention score a query
    residual direction i gives a key residual direction j (biases, LN and the 1/sqrt(d_head)
    scale not included)."""
    p = _params_of(source)
    W_Q = _stack_attn(p, "W_Q", layer)  # [..., n_heads, d_model, d_head]
    W_K = _stack_attn(p, "W_K", layer)  # [..., n_heads, d_model, d_head]
    return FactoredMatrix(W_Q, _mT(W_K))


def ov_circuit(source: Any, layer: int | None = None) -> FactoredMatrix:
    """Per-head OV circuit ``W_V @ W_O``: [n_heads, d_model, d_model] (or with a leading layer
    axis for ``layer=None``; TL's ``model.OV``). Row i is what the head writes when it attends to
    residual direction i."""
    p = _params_of(source)
    W_V = _stack_attn(p, "W_V", layer)  # [..., n_heads, d_model, d_head]
    W_O = _stack_attn(p, "W_O", layer)  # [..., n_heads, d_head, d_model]
    return FactoredMatrix(W_V, W_O)


def full_qk_circuit(source: Any, layer: int | None = None, *,
                    embedding: Literal["embed", "pos"] = "embed") -> FactoredMatrix:
    """Full QK circuit through an embedding: ``W_E QK W_E^T`` [n_heads, d_vocab, d_vocab]
    (query token, key token), or ``W_pos QK W_pos^T`` [n_heads, n_ctx, n_ctx] for
    ``embedding="pos"`` (query position, key position). Layer axis in front for ``layer=None``.

    This is the direct path only (what a layer-0 head sees; Elhage et al. 2021's
    W_E^T W_QK W_E in column-vector notation)."""
    p = _params_of(source)
    if embedding == "embed":
        W = p["embed"]["W_E"]  # [d_vocab, d_model]
    elif embedding == "pos":
        W = p["pos_embed"]["W_pos"]  # [n_ctx, d_model]
    else:
        raise ValueError(f"embedding must be 'embed' or 'pos', got {embedding!r}")
    return W @ qk_circuit(p, layer) @ W.T


def full_ov_circuit(source: Any, layer: int | None = None) -> FactoredMatrix:
    """Full OV circuit ``W_E @ W_V @ W_O @ W_U``: [n_heads, d_vocab, d_vocab_out] (layer axis in
    front for ``layer=None``). Entry [s, t]: how much attending to token s raises the logit of
    token t through this head's direct path (LN, biases and positional embedding ignored)."""
    p = _params_of(source)
    return p["embed"]["W_E"] @ ov_circuit(p, layer) @ p["unembed"]["W_U"]


# -------------------------------------------------------------------------- composition scores
def composition_scores(left: FactoredMatrix, right: FactoredMatrix, *,
                       broadcast_dims: bool = True) -> Float[Array, "..."]:
    """``||L R||_F / (||L||_F ||R||_F)`` for factored matrices (TL's ``utils.composition_scores``).

    With ``broadcast_dims`` the leading dims of ``left`` [*l, d, d] and ``right`` [*r, d, d] are
    crossed: the result is [*l, *r]. Otherwise they broadcast elementwise. Norms are computed on
    the factors' Gram matrices (mdim-sized matmuls; no SVD, so no LAPACK call)."""
    if broadcast_dims:
        l_lead, r_lead = left.ndim - 2, right.ndim - 2
        for i in range(l_lead):
            right = right.unsqueeze(i)
        for i in range(r_lead):
            left = left.unsqueeze(l_lead + i)
    if left.rdim != right.ldim:
        raise ValueError(f"composition_scores needs left.rdim == right.ldim, shapes were "
                         f"{left.shape} and {right.shape}")
    return _composition_core(left, right)


@jax.jit
def _composition_core(left: FactoredMatrix, right: FactoredMatrix) -> jax.Array:
    # Frobenius norms from small Gram matrices of the factors, no QR/SVD: with L = Al Bl and
    # R = Ar Br, ||L||^2 = sum(Al^T Al * Bl Bl^T) and ||L R||^2 = tr(M^T Gl M Hr) with M = Bl Ar.
    # (Batched LAPACK calls were also slower here, and jaxlib's batched QR was seen to hang in a
    # process that had run other XLA work, at batch 512.)
    Al, Bl, Ar, Br = left.A, left.B, right.A, right.B
    Gl = _bmm(_mT(Al), Al)  # [..., k_l, k_l]
    Hl = _bmm(Bl, _mT(Bl))  # [..., k_l, k_l]
    Gr = _bmm(_mT(Ar), Ar)  # [..., k_r, k_r]
    Hr = _bmm(Br, _mT(Br))  # [..., k_r, k_r]
    M = _bmm(Bl, Ar)  # [..., k_l, k_r]
    l_sq = jnp.sum(Gl * Hl, axis=(-2, -1))
    r_sq = jnp.sum(Gr * Hr, axis=(-2, -1))
    c_sq = jnp.sum(_bmm(Gl, M) * _bmm(M, Hr), axis=(-2, -1))  # tr(M^T Gl M Hr)
    zero = jnp.zeros((), c_sq.dtype)
    return jnp.sqrt(jnp.maximum(c_sq, zero)) / jnp.sqrt(l_sq * r_sq)


def _right_for_mode(qk: FactoredMatrix, ov: FactoredMatrix, mode: str) -> FactoredMatrix:
    # Which matrix of the later head reads the earlier head's output (TL's all_composition_scores):
    # Q: the query side of QK; K: the key side, i.e. QK^T; V: the OV circuit.
    if mode == "Q":
        return qk
    if mode == "K":
        return qk.T
    if mode == "V":
        return ov
    raise ValueError(f"mode must be one of 'Q', 'K', 'V', got {mode!r}")


def all_composition_scores(source: Any, mode: CompositionMode
                           ) -> Float[Array, "layer head_index layer head_index"]:
    """Q-, K- or V-composition scores between every pair of heads, [n_layers, n_heads, n_layers,
    n_heads] (TL's ``HookedTransformer.all_composition_scores``).

    Entry [l1, h1, l2, h2] = ``||OV_{l1,h1} M_{l2,h2}||_F / (||OV_{l1,h1}||_F ||M_{l2,h2}||_F)``
    where OV = W_V W_O of the earlier head and M of the later head is W_Q W_K^T (Q), W_K W_Q^T (K)
    or W_V W_O (V). Pairs with l2 <= l1 cannot compose and are 0. Elhage et al. (2021)."""
    p = _params_of(source)
    ov = ov_circuit(p)  # [n_layers, n_heads, d_model, d_model]
    right = _right_for_mode(qk_circuit(p), ov, mode)
    scores = composition_scores(ov, right, broadcast_dims=True)  # [L, H, L, H]
    n_layers = scores.shape[0]
    later = jnp.arange(n_layers)[:, None, None, None] < jnp.arange(n_layers)[None, None, :, None]
    return jnp.where(later, scores, jnp.zeros((), scores.dtype))


def composition_score_baseline(cfg: TransformerConfig, mode: CompositionMode = "K", *,
                               n_samples: int = 256, seed: int = 0,
                               return_samples: bool = False) -> float | np.ndarray:
    """The composition score of random heads of ``cfg``'s shapes: mean over ``n_samples`` pairs.

    Each sample draws W_Q, W_K, W_V [d_model, d_head] and W_O [d_head, d_model] of the earlier and
    later head i.i.d. from the init distribution N(0, initializer_range^2) (the score is
    scale-invariant, so any i.i.d. Gaussian gives the same distribution) and scores them exactly as
    :func:`all_composition_scores` does. Compare a trained pair's score with this mean.
    Seeded: the same (cfg shapes, mode, n_samples, seed) gives the same number.
    ``return_samples=True`` returns all samples [n_samples] instead of the mean."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    samples = np.asarray(_baseline_samples(cfg.d_model, cfg.d_head, float(cfg.initializer_range),
                                           mode, n_samples, seed))  # [n_samples]
    return samples if return_samples else float(samples.mean())


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _baseline_samples(D: int, Dh: int, s: float, mode: str, n_samples: int, seed: int
                      ) -> Float[Array, " n_samples"]:
    """composition_score_baseline's samples, as one jitted function: run eagerly, each of its
    small ops compiled an executable of its own (1.34 s per call in a fresh process; 0.99 s
    jitted, most of it the one compile)."""
    k = jax.random.split(jax.random.key(seed), 6)
    shape_in, shape_out = (n_samples, D, Dh), (n_samples, Dh, D)
    ov_src = FactoredMatrix(s * jax.random.normal(k[0], shape_in, jnp.float32),
                            s * jax.random.normal(k[1], shape_out, jnp.float32))
    qk_dst = FactoredMatrix(s * jax.random.normal(k[2], shape_in, jnp.float32),
                            _mT(s * jax.random.normal(k[3], shape_in, jnp.float32)))
    ov_dst = FactoredMatrix(s * jax.random.normal(k[4], shape_in, jnp.float32),
                            s * jax.random.normal(k[5], shape_out, jnp.float32))
    right = _right_for_mode(qk_dst, ov_dst, mode)
    return composition_scores(ov_src, right, broadcast_dims=False)


# ---------------------------------------------------------------------------- copying scores
def eigenvalue_copying_score(matrix: FactoredMatrix | Float[Array, "... n n"]
                             ) -> Float[Array, "..."]:
    """``sum(eigenvalues) / sum(|eigenvalues|)`` of a square matrix [..., n, n] -> [...], in
    [-1, 1]: +1 when every eigenvalue is positive real (the matrix copies: an input raises its own
    output), -1 when all are negative. Elhage et al. (2021), "A Mathematical Framework for
    Transformer Circuits", section on copying / primarily positive eigenvalues.
    For a FactoredMatrix the (few) eigenvalues of B @ A are used: the rest are zero."""
    return _eigenvalue_copying_score(matrix)


@jax.jit
def _eigenvalue_copying_score(matrix: FactoredMatrix | jax.Array) -> jax.Array:
    if isinstance(matrix, FactoredMatrix):
        eig = matrix.eigenvalues
    else:
        m = jnp.asarray(matrix)
        if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
            raise ValueError(f"eigenvalue_copying_score needs square matrices, got {m.shape}")
        eig = jnp.linalg.eigvals(m)
    return jnp.real(jnp.sum(eig, axis=-1)) / jnp.sum(jnp.abs(eig), axis=-1)


def ov_copying_scores(source: Any, layer: int | None = None
                      ) -> Float[Array, "layer head_index"]:
    """Eigenvalue copying score (:func:`eigenvalue_copying_score`) of each head's full OV circuit
    W_E W_V W_O W_U: [n_layers, n_heads], or [n_heads] for one layer. Positive means the head
    copies: attending to a token raises that token's logit. Needs d_vocab == d_vocab_out."""
    p = _params_of(source)
    full = full_ov_circuit(p, layer)
    if full.ldim != full.rdim:
        raise ValueError(f"the OV copying score needs d_vocab == d_vocab_out, the full OV circuit "
                         f"is {full.shape}")
    return eigenvalue_copying_score(full)
