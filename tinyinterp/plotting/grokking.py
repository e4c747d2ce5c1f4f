"""Figures for grokking modular addition and its progress measures (Nanda et al. 2023).

Every function builds a ``matplotlib.figure.Figure`` directly (no pyplot, Agg-safe) and returns it.
``phases`` is the dict of ``tinyinterp.reproduce.grokking.phases``: ``memorisation_end``,
``cleanup_start``, ``grok_step`` (steps; None where not reached) and ``end``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

PHASE_COLOURS = (("memorisation", "tab:blue"), ("circuit formation", "tab:orange"),
                 ("cleanup", "tab:green"))


def _phase_spans(phases: dict | None) -> list[tuple[str, str, float, float]]:
    if not phases:
        return []
    edges = [0, phases.get("memorisation_end"), phases.get("cleanup_start"), phases.get("grok_step")]
    spans = []
    for (name, colour), lo, hi in zip(PHASE_COLOURS, edges[:-1], edges[1:], strict=True):
        if lo is not None and hi is not None and hi > lo:
            spans.append((name, colour, float(lo), float(hi)))
    return spans


def shade_phases(ax, phases: dict | None, *, labels: bool = True) -> None:
    """Shade the memorisation / circuit-formation / cleanup spans of ``phases`` on ``ax``."""
    for name, colour, lo, hi in _phase_spans(phases):
        ax.axvspan(lo, hi, color=colour, alpha=0.12, lw=0, label=name if labels else None)


def plot_training_curves(steps: np.ndarray, train_loss: np.ndarray, test_loss: np.ndarray,
                         train_acc: np.ndarray, test_acc: np.ndarray, phases: dict | None = None,
                         title: str = "Grokking: train and test loss and accuracy") -> Figure:
    """Loss (log scale) and accuracy of the training and held-out pairs against the step
    [eval], with the three phases shaded."""
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax_l, ax_a = fig.subplots(1, 2)
    ax_l.plot(steps, train_loss, label="train loss", color="tab:blue")
    ax_l.plot(steps, test_loss, label="test loss", color="tab:red")
    ax_l.set_yscale("log")
    ax_l.set_ylabel("cross-entropy (nats, log scale)")
    ax_a.plot(steps, train_acc, label="train accuracy", color="tab:blue")
    ax_a.plot(steps, test_acc, label="test accuracy", color="tab:red")
    ax_a.set_ylim(-0.02, 1.02)
    ax_a.set_ylabel("accuracy")
    for ax in (ax_l, ax_a):
        shade_phases(ax, phases, labels=ax is ax_l)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_l.legend(fontsize=8)
    ax_a.legend(fontsize=8, loc="center right")
    fig.suptitle(title)
    return fig


def plot_fourier_norms(norms: np.ndarray, labels: Sequence[str], key_freqs: Sequence[int],
                       title: str = "Fourier components of W_E", ylabel: str = "norm") -> Figure:
    """A bar per Fourier component [component] (const, cos 1, sin 1, ...), the components of the
    key frequencies in colour and named."""
    norms = np.asarray(norms)
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    ax = fig.subplots()
    key = set(int(k) for k in key_freqs)
    freq = [0 if lab == "const" else int(lab.split()[1]) for lab in labels]
    colours = ["tab:red" if f in key else "tab:gray" for f in freq]
    ax.bar(np.arange(len(norms)), norms, color=colours, width=0.85)
    for i, (f, lab) in enumerate(zip(freq, labels, strict=True)):
        if f in key:
            ax.annotate(lab, (i, norms[i]), textcoords="offset points", xytext=(0, 2), ha="center",
                        fontsize=7, rotation=90)
    ax.set_xlabel("Fourier component (const, cos 1, sin 1, cos 2, ...)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}; key frequencies (red): {sorted(key) if key else 'none'}")
    ax.set_xlim(-1, len(norms))
    return fig


def plot_neurons(acts: np.ndarray, neurons: Sequence[int], best_freq: np.ndarray,
                 frac_explained: np.ndarray, threshold: float,
                 title: str = "MLP neurons over (a, b)") -> Figure:
    """Top: the activation of a few neurons over every input pair (``acts`` [a, b, neuron]);
    bottom left: each neuron's share of variance explained by its best single frequency
    (``frac_explained`` [neuron], sorted) with the threshold; bottom right: how many explained
    neurons each frequency has."""
    acts = np.asarray(acts)
    k = len(neurons)
    fig = Figure(figsize=(2.6 * max(k, 4), 6.2), layout="constrained")
    grid = fig.add_gridspec(2, max(k, 4))
    for i, n in enumerate(neurons):
        ax = fig.add_subplot(grid[0, i])
        v = acts[:, :, n]
        ax.imshow(v, cmap="viridis", origin="lower")
        ax.set_title(f"neuron {n}: freq {int(best_freq[n])}\n{frac_explained[n]:.0%} explained",
                     fontsize=8)
        ax.set_xlabel("b")
        ax.set_ylabel("a" if i == 0 else "")
    half = max(k, 4) // 2
    ax = fig.add_subplot(grid[1, :half])
    fe = np.sort(np.asarray(frac_explained))[::-1]
    ax.plot(np.arange(len(fe)), fe, color="tab:purple")
    ax.axhline(threshold, color="k", ls="--", lw=0.8, label=f"threshold {threshold:g}")
    share = float(np.mean(np.asarray(frac_explained) >= threshold))
    ax.set_title(f"{share:.0%} of neurons explained by one frequency", fontsize=9)
    ax.set_xlabel("neuron (sorted)")
    ax.set_ylabel("variance share of best frequency")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[1, half:])
    explained = np.asarray(frac_explained) >= threshold
    freqs, counts = np.unique(np.asarray(best_freq)[explained], return_counts=True)
    ax.bar([str(f) for f in freqs], counts, color="tab:purple")
    ax.set_xlabel("best frequency (explained neurons)")
    ax.set_ylabel("neurons")
    fig.suptitle(title)
    return fig


def plot_progress_measures(steps: np.ndarray, train_loss: np.ndarray, test_loss: np.ndarray,
                           restricted_loss: np.ndarray, excluded_loss: np.ndarray,
                           phases: dict | None = None, key_freqs: Sequence[int] = (),
                           title: str = "Restricted and excluded loss") -> Figure:
    """The paper's two progress measures against the step [snapshot], with train and test loss,
    log scale, phases shaded."""
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, train_loss, label="train loss", color="tab:blue")
    ax.plot(steps, test_loss, label="test loss", color="tab:red")
    ax.plot(steps, restricted_loss, label="restricted loss (key freqs only, all pairs)",
            color="tab:purple", ls="--")
    ax.plot(steps, excluded_loss, label="excluded loss (key freqs removed, train pairs)",
            color="tab:brown", ls="--")
    shade_phases(ax, phases, labels=False)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats, log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}; key frequencies {list(key_freqs)}")
    return fig


def plot_series(steps: np.ndarray, series: dict[str, np.ndarray], phases: dict | None = None,
                ylabel: str = "", title: str = "", log: bool = False) -> Figure:
    """Lines against the step [snapshot] with the phases shaded (weight norm, Gini
    coefficients)."""
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, values in series.items():
        ax.plot(steps, values, label=name)
    shade_phases(ax, phases)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig


def plot_logits_fourier(norms_2d: np.ndarray, labels: Sequence[str], *, top: int = 12,
                        title: str = "2-D Fourier transform of the logits over (a, b)") -> Figure:
    """Left: the norm (over outputs c) of each 2-D Fourier component of the logits [a-component,
    b-component]; right: the ``top`` largest components and their share of the total squared
    norm."""
    m = np.asarray(norms_2d)
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1.2, 1])
    im = ax.imshow(m, cmap="Blues", origin="upper")
    n = len(labels)
    ticks = np.arange(0, n, max(1, n // 12))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
    ax.set_xlabel("b component")
    ax.set_ylabel("a component")
    fig.colorbar(im, ax=ax, shrink=0.8, label="norm over outputs c")
    sq = m.ravel() ** 2
    order = np.argsort(-sq)[:top]
    share = sq[order] / max(sq.sum(), 1e-30)
    names = [f"{labels[i // n]} x {labels[i % n]}" for i in order]
    ax2.barh(np.arange(len(order))[::-1], share, color="tab:blue")
    ax2.set_yticks(np.arange(len(order))[::-1], names, fontsize=8)
    ax2.set_xlabel("share of the logits' squared norm")
    ax2.set_title(f"top {top}: {share.sum():.0%} of the total", fontsize=9)
    fig.suptitle(title)
    return fig
