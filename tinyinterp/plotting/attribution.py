"""Figures for feature attribution: tokens coloured by their attribution, and a layers x heads
heatmap for per-head results (direct logit attribution, per-head ablations, head attributions).

Each function builds a ``matplotlib.figure.Figure`` directly (no pyplot: safe under Agg, in threads
and in tests) and returns it; save it with ``fig.savefig(path)``. Signed values use a diverging map
centred at 0 (red positive, blue negative, white zero), with symmetric limits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from tinyinterp.views.attributions import per_position

__all__ = ["token_attribution_figure", "head_heatmap"]

_DIVERGING = "RdBu_r"


def _symmetric_norm(v: np.ndarray, vmax: float | None) -> Normalize:
    finite = v[np.isfinite(v)]
    m = float(vmax) if vmax is not None else (float(np.max(np.abs(finite))) if finite.size else 1.0)
    m = m if m > 0 else 1.0
    return Normalize(vmin=-m, vmax=m)  # centred at 0


def token_attribution_figure(values, tokens=None, *, labels: Sequence[Sequence[str]] | None = None,
                             show_values: bool = False, title: str = "Attribution per token",
                             vmax: float | None = None, fmt: str = "{:+.2f}") -> Figure:
    """Tokens as a row of boxes per example, each coloured by its attribution (diverging map
    centred at 0, symmetric limits ``vmax``, default the largest |value|), with a colorbar.

    ``values``: [pos] / [batch, pos] or an Attribution (its ``per_position()``). Box text: the
    token's label from ``labels`` ([batch][pos] strings), else its id from ``tokens`` ([pos] /
    [batch, pos]; an Attribution's own tokens by default), else the position; ``show_values``
    adds the value under it."""
    if tokens is None and hasattr(values, "tokens"):
        tokens = values.tokens
    v = per_position(values).astype(np.float64)
    n_batch, n_pos = v.shape
    if tokens is not None:
        t = np.asarray(tokens)
        t = t[None] if t.ndim == 1 else t
        if t.shape != v.shape:
            raise ValueError(f"tokens {t.shape} must match the attributions {v.shape}")
    if labels is not None:
        if len(labels) != n_batch or any(len(row) != n_pos for row in labels):
            raise ValueError(f"labels must be [batch={n_batch}][pos={n_pos}] strings")
    norm = _symmetric_norm(v, vmax)
    fig = Figure(figsize=(max(4.0, 0.62 * n_pos + 1.6), 0.62 * n_batch + 1.3), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(v, cmap=_DIVERGING, norm=norm, aspect="auto")
    for (b, p), x in np.ndenumerate(v):
        if labels is not None:
            text = str(labels[b][p])
        elif tokens is not None:
            text = str(int(t[b, p]))
        else:
            text = f"p{p}"
        if show_values and np.isfinite(x):
            text += "\n" + fmt.format(x)
        dark = abs(norm(x) - 0.5) > 0.3 if np.isfinite(x) else False
        ax.text(p, b, text, ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    ax.set_xticks(range(n_pos), [str(p) for p in range(n_pos)], fontsize=7)
    ax.set_yticks(range(n_batch), [f"ex {b}" for b in range(n_batch)], fontsize=7)
    ax.set_xlabel("position")
    ax.set_xticks(np.arange(-0.5, n_pos), minor=True)
    ax.set_yticks(np.arange(-0.5, n_batch), minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.9, label="attribution")
    return fig


def head_heatmap(values, *, title: str = "Per-head attribution", example: int | None = None,
                 show_values: bool = True, vmax: float | None = None) -> Figure:
    """A layers x heads heatmap (rows L0 on top, columns heads), diverging map centred at 0.

    ``values``: [n_layers, n_heads], or [batch, n_layers, n_heads] (the mean over the batch, or
    one ``example``), or a DirectLogitAttribution (its ``per_head()``)."""
    if hasattr(values, "per_head") and not isinstance(values, np.ndarray):
        values = values.per_head()
    v = np.asarray(values, np.float64)
    if v.ndim == 3:
        v = v.mean(0) if example is None else v[example]
    if v.ndim != 2:
        raise ValueError(f"per-head values must be [n_layers, n_heads] or [batch, n_layers, "
                         f"n_heads], got shape {v.shape}")
    n_layers, n_heads = v.shape
    norm = _symmetric_norm(v, vmax)
    fig = Figure(figsize=(max(3.2, 0.6 * n_heads + 2.0), 0.55 * n_layers + 1.8),
                 layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(v, cmap=_DIVERGING, norm=norm, aspect="auto")
    if show_values and v.size <= 256:
        for (i, j), x in np.ndenumerate(v):
            ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(norm(x) - 0.5) > 0.3 else "black")
    ax.set_xticks(range(n_heads), [f"H{h}" for h in range(n_heads)])
    ax.set_yticks(range(n_layers), [f"L{i}" for i in range(n_layers)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.9)
    return fig

