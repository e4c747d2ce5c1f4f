# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 5: Toy models of superposition
#
# Interpretability would be easy if every neuron meant one thing. It often does not: a single
# neuron of a language model can fire on academic citations, Korean text and HTTP requests.
# Such neurons are called **polysemantic**. Elhage et al. (2022, "Toy Models of Superposition")
# proposed an explanation and demonstrated it in models small enough to see completely. Call a
# **feature** a property of the input the model would like to represent (say "this is Korean").
# If a model has more features than dimensions, it can still store them, as long as the
# features are **sparse** (each is rarely active): it gives each feature a direction, the
# directions cannot all be orthogonal, and the small **interference** between them costs little
# when two features are rarely active together. This is **superposition**. They found that:
#
# - with dense features, a model keeps the most important ones in orthogonal directions and
#   drops the rest, like PCA;
# - as the features get sparser, more and more are stored, in superposition, in striking
#   geometric arrangements (antipodal pairs, pentagons);
# - whether a feature is dropped, gets its own dimension or is superposed depends on its
#   importance and its sparsity, with sharp boundaries: a **phase diagram**;
# - the number of dimensions each feature gets "sticks" at simple fractions (1, 1/2, 2/5, ...).
#
# This lesson reproduces each of these in about 15 seconds, training hundreds of tiny models at
# once.

# %%
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from tinyinterp import superposition as sp
from tinyinterp.plotting import superposition as P
from tinyinterp.reproduce import superposition as rs
from tinyinterp.reproduce._io import save_figure

OUT = Path(os.environ.get("TINYINTERP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="tinyinterp-05-"))
OUT.mkdir(parents=True, exist_ok=True)
print(f"figures go to {OUT}")
QUICK = rs.settings(quick=True)  # the reduced sizes `tinyinterp reproduce superposition --quick` uses

# %% [markdown]
# ## The toy model
#
# The input `x` has `n` features. Each feature is 0 with probability `S` (the **sparsity**) and
# otherwise uniform on [0, 1). The model squeezes `x` into `m < n` hidden dimensions with a
# matrix `W` (`n x m`) and tries to reconstruct it:
#
#     h = x W            (the hidden vector, m numbers)
#     x' = ReLU(h W^T + b)
#
# The loss is the reconstruction error weighted by each feature's **importance** `I_i`:
# `sum_i I_i (x_i - x'_i)^2`. Row `W_i` of `W` is the direction feature `i` gets in the hidden
# space; its length `||W_i||` says how strongly it is represented (we call a feature
# **represented** when `||W_i|| > 0.5`). The ReLU matters: it lets the model filter out small
# negative interference, which a purely linear model cannot.
#
# `sp.train` trains many independent **instances** (copies with their own settings) at once. Here
# `n = 5` features in `m = 2` dimensions, importance `0.9^i`, at three feature probabilities
# `1 - S`, two seeds each.

# %%
probs = np.asarray([1.0, 0.2, 0.1], np.float32)  # 1 - S: dense, sparse, sparser
n, m, seeds = 5, 2, 2
cfg = sp.ToyModelConfig(n_features=n, n_hidden=m, n_instances=len(probs) * seeds, n_steps=3000,
                        batch_size=256, chunk_size=3000, init_std=sp.xavier_init_std(n, m))
prob = np.repeat(probs, seeds)[:, None] * np.ones((1, n), np.float32)  # [instance, feature]
res = sp.train(cfg, jax.random.key(0), sp.importance_schedule(n, 0.9), prob)
W, b = np.asarray(res.params["W"]), np.asarray(res.params["b"])  # [instance, feature, hidden]
loss = res.final_loss()
best = [i * seeds + int(np.argmin(loss[i * seeds:(i + 1) * seeds])) for i in range(len(probs))]
geometry = []
for p, i in zip(probs, best, strict=True):
    geometry.append(rs.describe_2d(W[i])["geometry"])
    norms = np.linalg.norm(W[i].astype(np.float64), axis=1)
    print(f"1-S = {p:.1f}: feature norms {np.round(norms, 2).tolist()}, geometry: {geometry[-1]}")
labels = [f"1-S = {p:g}" for p in probs]
save_figure(P.plot_hidden_directions(W[best], labels), OUT / "pentagon_directions.png")
save_figure(P.plot_wtw_and_bias(W[best], b[best], labels), OUT / "pentagon_wtw_bias.png")
assert geometry[0] == "orthogonal" and geometry[-1] == "pentagon"

# %% [markdown]
# `pentagon_directions.png` draws each `W_i` as an arrow in the 2-D hidden plane. Dense (left):
# two arrows at right angles, the two most important features, each with a dimension of its own;
# the other three are dropped. Sparse (middle): features in **antipodal pairs**, two features on
# one line with opposite signs (when one is active the other is almost never, and the ReLU cuts
# the negative interference). Sparser (right): all five features, at 72 degrees from each other, a
# regular **pentagon**: five features in two dimensions. In `pentagon_wtw_bias.png` the top row is
# `W W^T`, whose off-diagonal entries are the interference between features, and the bottom row
# the bias: the superposed models have *negative* biases, which is how the ReLU removes the
# interference.
#
# ## The sparsity sweep: how many features are represented?
#
# Now `n = 20` features in `m = 5` dimensions, importance `0.7^i`, at several sparsities
# (`rs.exp_counts` trains them all as one program).

# %%
counts_report, counts = rs.exp_counts(jax.random.key(1), QUICK["counts"])
for level in counts_report["levels"]:
    print(f"1-S = {level['feature_probability']:.2g}: {level['represented']:2d} features "
          f"represented (||W_i|| > 0.5)")
save_figure(P.plot_represented_counts(counts["probs"], counts["counts"], 5, 20),
            OUT / "represented_counts.png")
save_figure(P.plot_feature_norm_bars(counts["W"], [f"1-S={p:.2g}" for p in counts["probs"]]),
            OUT / "feature_norms.png")
n_rep = [lv["represented"] for lv in counts_report["levels"]]
assert n_rep[0] <= 5 < n_rep[-1] and n_rep == sorted(n_rep)

# %% [markdown]
# `represented_counts.png`: with dense features exactly `m = 5` are represented (the dotted
# line); sparser features push the count well above 5. `feature_norms.png` shows each feature's
# `||W_i||` as a bar, coloured by its interference with the others: dense, the represented
# bars are dark (no interference, a dedicated dimension); sparse, they are bright (superposed).
#
# ## The phase diagram
#
# The smallest case that shows the trade-off: `n = 2` features, `m = 1` dimension. Feature 0 has
# importance 1; we vary the importance of feature 1 and the density `1 - S` of both, and classify
# each trained model: feature 1 **not represented**, given the **dedicated dimension** (feature 0
# dropped), or both stored in **antipodal superposition** (`W = [w, -w]`).

# %%
phase_report, phase = rs.exp_phase(jax.random.key(2), QUICK["phase"])
regimes = phase["regimes"]  # [importance, density]: 0, 1, 2 as in rs.classify_regime
print("importance of feature 1:", np.round(phase["importance"].astype(np.float64), 2).tolist())
print("density 1 - S:          ", np.round(phase["density"].astype(np.float64), 3).tolist())
print("regime per cell (rows: importance, columns: density):")
print(regimes)
save_figure(P.plot_phase_diagram(regimes, phase["importance"], phase["density"]),
            OUT / "phase_diagram.png")
assert np.all(regimes[0] == 0)  # ten times less important than feature 0: dropped
assert regimes[-1, 0] == 1  # more important than feature 0 and dense: its own dimension
assert np.all(regimes[1:, 1:] == 2)  # important enough and sparse: superposition

# %% [markdown]
# In `phase_diagram.png` (importance up, sparser to the right) the bottom row, where the extra
# feature is ten times less important than feature 0, is not represented at any density. Dense
# and at least as important (top left), the extra feature takes the one dimension for itself and
# feature 0 is dropped. Sparse and important enough (the right-hand block), both features share
# the dimension in antipodal superposition. The same two features are dropped, given a
# dimension or superposed depending on importance *and* sparsity; the paper's finer grid shows
# the boundaries between the regions are sharp.
#
# ## Feature dimensionality
#
# How much of a dimension does each feature get? Elhage et al. define the **feature
# dimensionality** `D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2` (`W_i_hat` is the unit vector along
# `W_i`): 1 for a feature with a dimension to itself, 1/2 for one of an antipodal pair, 2/5 for a
# pentagon vertex. Summed over features, **dimensions per feature** `m / ||W||_F^2` says how many
# dimensions each represented feature gets on average. They found both "stick" at simple
# fractions as the sparsity changes. Here with `n = 40` features of equal importance in `m = 6`
# dimensions (the paper uses 200 and 20; see `tinyinterp reproduce superposition` for that run).

# %%
geo_report, geo = rs.exp_geometry(jax.random.key(3), QUICK["geometry"])
for level in geo_report["levels"]:
    print(f"1-S = {level['feature_probability']:.2f}: {level['represented']:2d} represented, "
          f"dimensions per feature {level['dimensions_per_feature']:.2f}, median D_i "
          f"{level['D_median'] if level['D_median'] is None else round(level['D_median'], 2)}")
print("sticky fractions found:", geo_report["fractions_found"])
save_figure(P.plot_dimensions_per_feature(geo["probs"], geo["dpf"]),
            OUT / "dimensions_per_feature.png")
save_figure(P.plot_feature_dimensionality(geo["probs"], geo["D"], geo["norms"], geo["dpf"],
                                          clusters=geo["clusters"], tol=geo["tol"]),
            OUT / "feature_dimensionality.png")
dpf = geo["dpf"]  # densest level first
assert dpf[0] > 0.5 and dpf[-1] < dpf[0] and "1/2" in geo_report["fractions_found"]

# %% [markdown]
# `dimensions_per_feature.png`: dense, each represented feature has a whole dimension (about 1);
# as features get sparser (to the right) they get less and less, passing 1/2 (antipodal pairs)
# on the way. In `feature_dimensionality.png` each dot is one represented feature's `D_i`; the
# red dots sit on a sticky fraction. In this small, short run (five sparsity levels) only the
# 1/2 line is found; the full run (`tinyinterp reproduce superposition`) finds 2/3, 2/5 and 3/8
# too, and its report explains why the lines at 1 and 3/4 do not appear in this implementation
# or in the reference code.
#
# ## Exercises
#
# 1. Train the `n = 5, m = 2` model as a *linear* model (`ToyModelConfig(linear=True)`) at
#    `1 - S = 0.1`. How many features are represented? Why?
# 2. With the trained pentagon model, compute `sp.interference(W)` for each feature. Which
#    features interfere most?
# 3. In the phase diagram, what happens at intermediate density? Run `rs.exp_phase` with a finer
#    grid (`dict(QUICK["phase"], n_importance=5, n_density=5)`).

# %% [markdown]
# ### Solutions

# %%
# 1. A linear model cannot filter interference, so superposition never pays: it keeps only m = 2
#    features (the most important) and drops the rest, whatever the sparsity.
lin_cfg = sp.ToyModelConfig(n_features=n, n_hidden=m, n_instances=1, n_steps=3000, batch_size=256,
                            chunk_size=3000, linear=True, init_std=sp.xavier_init_std(n, m))
lin = sp.train(lin_cfg, jax.random.key(4), sp.importance_schedule(n, 0.9),
               np.full((1, n), 0.1, np.float32))
lin_count = int(sp.represented_count(lin.params["W"])[0])
print(f"linear model at 1-S = 0.1: {lin_count} features represented")
assert lin_count <= m

# 2. In the pentagon each feature overlaps its neighbours at 72 degrees (cos 72 = 0.31) and the
#    next ones at 144 degrees (cos 144 = -0.81): every feature has about the same interference,
#    2 (1.1 * 0.31)^2 + 2 (1.1 * 0.81)^2 = 1.8 for norms of 1.1.
interf = np.asarray(sp.interference(W[best[-1]]), np.float64)
print("interference per feature (pentagon):", np.round(interf, 2).tolist())

# 3. (Not run here, to keep the lesson short.) With more cells the boundaries appear as sharp
#    lines: crossing one, the trained solution jumps from one regime to another rather than
#    changing gradually, which is why Elhage et al. call it a phase change.
print(f"all checks hold; figures in {OUT}")
