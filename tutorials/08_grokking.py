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
# # Lesson 8: Grokking modular addition, and how to watch a circuit form
#
# **Grokking** (Power et al. 2022): a small network trained on a small algorithmic dataset fits
# its training examples almost at once, sits there for thousands of steps with a held-out
# accuracy near chance, and then, suddenly, generalises. Nanda, Chan, Lieberum, Smith and
# Steinhardt (2023, "Progress measures for grokking via mechanistic interpretability") took a
# one-layer transformer that grokked `(a + b) mod p`, read the algorithm it had learned out of its
# weights, and used that algorithm to define **progress measures**: quantities that change
# smoothly during the long flat stretch where the loss curves show nothing. The sudden jump turns
# out to be the end of a gradual process in three phases:
#
# 1. **memorisation**: the model fits the training pairs with a lookup-table-like solution;
# 2. **circuit formation**: a generalising Fourier circuit grows alongside it (the test loss does
#    not move: memorisation still dominates on held-out pairs);
# 3. **cleanup**: weight decay removes the memorising weights, which the circuit has made
#    redundant, and the test loss collapses.
#
# In this lesson you will train such a model on a CPU (about a minute), find its key frequencies,
# see how its neurons compute `a + b` with the addition formulas for cosine and sine, and read
# the progress measures. Run it as a script (`python tutorials/08_grokking.py`) or in Jupyter.

# %%
import os
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from tinyinterp import fourier
from tinyinterp.plotting import grokking as gp
from tinyinterp.reproduce import grokking as g
from tinyinterp.reproduce._io import save_figure
from tinyinterp.tasks import modular_addition_split

OUT = Path(os.environ.get("TINYINTERP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="tinyinterp-08-"))
OUT.mkdir(parents=True, exist_ok=True)
print(f"figures go to {OUT}")

# %% [markdown]
# ## The task
#
# Every pair `(a, b)` with `0 <= a, b < p` is one example, written as three tokens `a b =`; the
# model must put the answer `(a + b) mod p` at the last position. `=` is token `p`, so the model
# reads `p + 1` different tokens and predicts one of `p` classes. A fixed random share of the
# `p^2` pairs is all it ever trains on; the rest are held out.
#
# The paper uses p = 113 with 30% of the pairs for training and weight decay 1. To run in well
# under a minute on a laptop CPU this lesson uses what `tinyinterp reproduce grokking` does by
# default: p = 43 with 40% of the pairs and weight decay 3, which shortens the run while keeping
# the phases apart (`--paper` runs the published setup).

# %%
CONFIG = g.GrokkingConfig(**g.QUICK)  # p 43, weight decay 3, lr 1e-3, 40% of pairs train
data = modular_addition_split(CONFIG.p, CONFIG.train_fraction, CONFIG.seed)
p = data.p
print(f"p = {p}: {p * p} pairs, {len(data.train_idx)} train, {len(data.test_idx)} held out")
for row in (0, 5 * p + 7, int(data.test_idx[3])):
    tokens = " ".join(data.token_labels[t] for t in data.tokens[row])
    print(f"  tokens [{tokens}]  ->  {data.describe(row)}")

# %% [markdown]
# ## The model
#
# The paper's model: one layer, four attention heads, d_model 128, an MLP of 512 ReLU neurons, no
# layer norm, and separate (untied) embedding and unembedding matrices. It is an ordinary
# `HookedTransformer`, so everything from the earlier lessons (hooks, caches) works on it.

# %%
cfg = g.model_config(p)
print(cfg)

# %% [markdown]
# ## Training: full batch AdamW
#
# Every step uses all training pairs at once. The loss only needs the logits at the last
# position, so the training step (`g.grouped_last_position_logits`) computes only those, and
# computes what depends on one token (its keys, values and query) once per token instead of once
# per pair: the same function of the same parameters as the model's forward pass (the test suite
# checks that, and the report checks it again on the trained model), several times faster. The
# steps run in compiled chunks (`jax.lax.scan`), and the training accuracy comes from each step's
# own forward pass, so measuring costs almost nothing. Weight decay is essential: without it
# there is no cleanup and no grokking.

# %%
t0 = time.perf_counter()
result = g.train(CONFIG)
print(f"trained {result.total_steps} steps in {time.perf_counter() - t0:.1f} s; test accuracy "
      f"reached 99% at step {result.grok_step}")
ph = g.phases(result)
print(ph)
save_figure(gp.plot_training_curves(result.steps, result.train_loss, result.test_loss,
                                    result.train_acc, result.test_acc, ph), OUT / "curves.png")

# %% [markdown]
# Look at `curves.png`. The train loss falls to ~1e-6 within a few hundred steps, while the test
# loss *rises*: the model is memorising. For a long stretch nothing seems to happen. Then the
# test loss falls off a cliff and test accuracy jumps to 100%. We mark the phases from the
# curves alone: memorisation ends where the test loss peaks, cleanup starts when the test loss has
# fallen to half its peak, and ends when test accuracy reaches 99%.

# %%
train99 = ph["train_99_step"]
assert result.test_acc[-1] > 0.99, "the model should generalise by the end"
assert result.grok_step - train99 >= g.MIN_DELAY, "generalisation should come long after memorising"
print(f"train accuracy 99% at step {train99}, test accuracy 99% at step {result.grok_step}")

# %% [markdown]
# ## The Fourier basis of Z_p
#
# Functions of a residue `x` in `0 .. p-1` can be written in the basis
# `1, cos(w_k x), sin(w_k x)` with `w_k = 2 pi k / p` for `k = 1 .. (p-1)/2`. This basis is
# orthonormal (after scaling), so transforming a vector or matrix into it only rotates it:
# norms and dot products are unchanged. Look at the embedding W_E (one row per number token) in
# this basis, along the token axis:

# %%
model = result.model
W_E = model.params["embed"]["W_E"]
spec = fourier.embedding_spectrum(W_E, p)
keys = fourier.key_frequencies(spec.energy)
share = float(spec.energy_fraction(keys))
print(f"key frequencies: {keys}, carrying {share:.0%} of W_E's energy "
      f"(Gini of the Fourier norms: {float(spec.gini):.2f})")
save_figure(gp.plot_fourier_norms(np.asarray(spec.norms), spec.labels, keys), OUT / "W_E_fourier.png")
assert 3 <= len(keys) <= 7 and share > 0.5

# %% [markdown]
# Out of p // 2 possible frequencies, the embedding uses only a handful: it has learned to
# represent each number `a` by `cos(w_k a)` and `sin(w_k a)` for a few key frequencies `k`. Which
# frequencies depends on the seed; that there are a few of them does not.
#
# ## How the circuit computes a + b
#
# The answer is in two trigonometric identities:
#
#     cos(w(a + b)) = cos(wa) cos(wb) - sin(wa) sin(wb)
#     sin(w(a + b)) = sin(wa) cos(wb) + cos(wa) sin(wb)
#
# The embedding gives the MLP `cos(wa), sin(wa), cos(wb), sin(wb)` (attention moves the `a` and
# `b` information to the `=` position), so a neuron's input is roughly
# `alpha cos(wa + phi) + alpha cos(wb + phi)` for one key frequency `w`. The ReLU is not linear:
# its output contains, besides those two terms, their product
# `cos(wa + phi) cos(wb + phi) = (cos(w(a + b) + 2 phi) + cos(w(a - b))) / 2`. That is where the
# `a + b` terms come from; W_out and W_U, summing over many neurons with different phases, keep
# them. So each neuron, as a function of `(a, b)`, should be made of one frequency's terms: a
# constant, waves in `a` and in `b`, and their products. Cache the neuron activations at the last
# position over all pairs and measure how much of each neuron's variance one frequency explains:

# %%
tokens = jnp.asarray(data.tokens)
logits, cache = model.run_with_cache(tokens, names_filter=["blocks.0.mlp.hook_post"])
acts = cache["blocks.0.mlp.hook_post"][:, -1].reshape(p, p, -1)  # [a, b, neuron]
nf = fourier.neuron_frequencies(acts)
strength = np.asarray(jnp.std(acts.reshape(p * p, -1), axis=0))
shown = [int(i) for i in np.argsort(-strength)[:4]]
save_figure(gp.plot_neurons(np.asarray(acts), shown, np.asarray(nf.best_freq),
                            np.asarray(nf.frac_explained), nf.threshold), OUT / "neurons.png")
print(f"{float(nf.fraction_explained):.0%} of neurons have >= 85% of their variance in one "
      f"frequency; neurons per frequency: {nf.counts()}")
on_key = np.isin(np.asarray(nf.best_freq)[np.asarray(nf.explained)], keys)
print(f"{on_key.mean():.0%} of those neurons use a key frequency of the embedding")
assert float(nf.fraction_explained) > 0.5 and on_key.mean() > 0.8

# %% [markdown]
# In `neurons.png` the strongest neurons are grids of blobs, periodic in `a` and in `b` with the
# same period `p / k`. Most neurons are explained almost entirely by a single frequency, and the
# frequencies are the key frequencies of the embedding.
#
# The last step maps `cos(w(a + b))` and `sin(w(a + b))` to the logit of each answer `c`:
#
#     cos(w(a + b)) cos(wc) + sin(w(a + b)) sin(wc) = cos(w(a + b - c))
#
# which is 1, its maximum, exactly when `c = a + b mod p`, and smaller elsewhere. Adding a few
# frequencies makes the right answer stand out more: the peaks agree at `c = a + b` and the rest
# cancel. If that is the algorithm, the logits, seen in the 2-D Fourier basis over `(a, b)`, are
# made of `cos k x cos k`, `sin k x sin k`, `cos k x sin k` and `sin k x cos k` terms of the key
# frequencies and little else:

# %%
last = logits[:, -1]  # [pair, p]
l2d = np.asarray(fourier.logits_fourier_2d(last))
save_figure(gp.plot_logits_fourier(l2d, spec.labels), OUT / "logits_fourier.png")
sq = l2d.ravel() ** 2
top = np.argsort(-sq)[:4 * len(keys)]
names = [(spec.labels[i // p], spec.labels[i % p]) for i in top]
print("largest 2-D components of the logits:", names[:8])
on_keys = sum(sq[i] for i, (x, y) in zip(top, names, strict=True)
              if x != "const" and y != "const" and x.split()[1] == y.split()[1]
              and int(x.split()[1]) in keys)
print(f"share of the logits' squared norm in those key-frequency terms: {on_keys / sq.sum():.0%}")
assert on_keys / sq.sum() > 0.5

# %% [markdown]
# ## Progress measures
#
# Now that we know the algorithm, we can measure how much of it exists at any step, on the
# parameter snapshots kept during training:
#
# - **restricted loss**: keep only the parts of the logits along `cos(w_k(a + b))` and
#   `sin(w_k(a + b))` for the key frequencies (plus a constant), and compute the loss on all
#   pairs. It measures how well the Fourier circuit alone would do.
# - **excluded loss**: remove exactly those parts, and compute the loss on the *training* pairs.
#   While the model memorises it equals the train loss; as the model comes to rely on the
#   circuit for its training pairs too, cutting the circuit out hurts more and more.
# - **sum of squared weights**: what weight decay pushes down. The circuit is a cheaper way to fit
#   the training data than memorisation, so once it exists the weights can shrink.

# %%
pm = g.progress_measures(result, keys)
save_figure(gp.plot_progress_measures(pm.steps, pm.train_loss, pm.test_loss, pm.restricted_loss,
                                      pm.excluded_loss, ph, keys), OUT / "progress_measures.png")
save_figure(gp.plot_series(pm.steps, {"sum of squared weights": pm.sum_sq_weights}, ph,
                           ylabel="sum of squared weights"), OUT / "weight_norm.png")
i_mem = int(np.searchsorted(pm.steps, ph["memorisation_end"], side="right")) - 1
i_clean = int(np.searchsorted(pm.steps, ph["cleanup_start"], side="right")) - 1
for name, i in (("end of memorisation", i_mem), ("start of cleanup", i_clean), ("end", -1)):
    print(f"{name:>20} (step {pm.steps[i]:5d}): test {pm.test_loss[i]:.3g}, restricted "
          f"{pm.restricted_loss[i]:.3g}, train {pm.train_loss[i]:.2g}, excluded "
          f"{pm.excluded_loss[i]:.3g}, sum of squared weights {pm.sum_sq_weights[i]:.0f}")

# %% [markdown]
# Read `progress_measures.png` from left to right:
#
# - During circuit formation the **restricted loss falls well below the test loss**: the
#   generalising circuit already exists, but the memorised part of the logits still dominates on
#   held-out pairs, so the test loss does not show it.
# - The **excluded loss rises above the train loss**: the training pairs are more and more
#   fitted by the circuit.
# - After memorisation the **sum of squared weights falls**, fastest in cleanup, when weight decay
#   removes the memorising weights and the test loss follows the restricted loss down.

# %%
assert pm.restricted_loss[i_clean] < pm.test_loss[i_clean]
assert pm.restricted_loss[i_clean] < pm.restricted_loss[i_mem]
assert np.all(pm.excluded_loss[i_mem:i_clean + 1] > pm.train_loss[i_mem:i_clean + 1])
assert pm.excluded_loss[i_clean] > pm.excluded_loss[i_mem]
assert pm.sum_sq_weights[-1] < pm.sum_sq_weights[i_mem]
print(f"all progress-measure checks hold; figures in {OUT}")

# %% [markdown]
# ## Exercises
#
# 1. Train without weight decay (`CONFIG.replace(weight_decay=0.0)`). Does the model grok? What
#    do the restricted loss and the sum of squared weights do?
# 2. Compare the Gini coefficient of W_E's Fourier norms at the first and last snapshots
#    (`pm.gini_W_E`): when does the embedding become sparse in the Fourier basis?
# 3. Pick a neuron with a high single-frequency share and fit
#    `alpha cos(w_k(a + b)) + beta sin(w_k(a + b)) + gamma` to its activation. How much variance
#    does `a + b` alone explain, compared with terms in `a` or `b` alone?
# 4. Run `tinyinterp reproduce grokking --paper` (p 113, weight decay 1) and compare the length
#    of each phase with this run's.
