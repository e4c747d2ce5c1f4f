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
# # Lesson 4: Causal interventions
#
# Attributions (lesson 3) are read off one run. **Causal interventions** change the run and watch
# what happens, which is how a claim like "this activation carries the answer" is tested. The
# main tool is **activation patching** (Meng et al. 2022 used it, as "causal tracing", to find
# where GPT-2 XL stores facts; Heimersheim and Nanda 2024 wrote the guide to using it well):
#
# 1. pick a **clean** input and a **corrupted** one that differ in exactly the thing you study;
# 2. run the model on the corrupted input, but replace one activation with its value from the
#    clean run (this direction is called **denoising**);
# 3. measure how much of the clean behaviour comes back.
#
# Sweeping the patch over every layer and position gives a map of where the information lives.
# A sweep costs one forward pass per patch; **attribution patching** (Nanda 2023; Syed, Rager and
# Conmy 2023) estimates the whole sweep from one forward and one backward pass with a
# first-order Taylor expansion. **Path patching** (Wang et al. 2022) restricts a patch to chosen
# paths. Finally, **steering** (Turner et al. 2023, "Activation addition") adds a vector to the
# residual stream to change what the model does, with no training.

# %%
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from tinyinterp import TransformerConfig, get_task, patching
from tinyinterp import attribution as A
from tinyinterp.reproduce._io import save_figure
from tinyinterp.steering import mean_difference_vector, steering_hook
from tinyinterp.train import TrainConfig, train

OUT = Path(os.environ.get("TINYINTERP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="tinyinterp-04-"))
OUT.mkdir(parents=True, exist_ok=True)
print(f"figures go to {OUT}")

# %% [markdown]
# ## The model and the question
#
# A 2-layer attention-only transformer trained on the **copy** task: six random symbols (of 12),
# a separator `SEP`, then the six again. At position `6 + j` it predicts `y_j = x_j`. Where, inside
# the model, does the symbol travel from position `j` to position `6 + j`?

# %%
L = 6
task = get_task("copy", n_symbols=12, length=L)
cfg = TransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_vocab=task.d_vocab,
                        n_ctx=task.seq_len, attn_only=True)
result = train(cfg, task, TrainConfig(steps=400, batch_size=64, lr=3e-3, progress=False,
                                      eval_batches=2))
model = result.model
print(f"copy accuracy on held-out sequences: {result.history['eval']['accuracy'][-1]:.1%}")
assert result.history["eval"]["accuracy"][-1] > 0.98

# %% [markdown]
# The clean inputs are 32 copy sequences. In each corrupted input we change one symbol, `x_2`, in
# the first half only. Our **metric** is the **logit difference** at position `6 + 2 = 8`, where
# the model predicts `y_2`: the logit of the clean answer `x_2` minus that of the corrupted
# `x'_2`. It is high on clean inputs, strongly negative on corrupted ones (the model copies what
# it sees).

# %%
J = 2
clean = task.sample(jax.random.key(0), 32)["tokens"]  # [32, 13]
shift = jax.random.randint(jax.random.key(1), (32,), 1, 12)
new_symbol = (clean[:, J] + shift) % 12  # a different symbol
corrupted = clean.at[:, J].set(new_symbol)
metric = A.logit_diff(clean[:, J], new_symbol, pos=L + J)
_, clean_cache = model.run_with_cache(clean)
_, corrupted_cache = model.run_with_cache(corrupted)
m_clean = float(metric(model(clean), clean).mean())
m_corrupt = float(metric(model(corrupted), corrupted).mean())
print(f"logit difference: clean {m_clean:.2f}, corrupted {m_corrupt:.2f}")
assert m_clean > 3 and m_corrupt < -3

# %% [markdown]
# ## An activation patching sweep
#
# `patching.get_act_patch_resid_pre` (TransformerLens' name and argument order: model, corrupted
# tokens, clean cache, metric) patches the residual stream at the input of each layer, one
# position at a time: one patched run per (layer, position), all as one compiled program.
# `.normalized()` rescales the result so that 0 means "as corrupted" and 1 "as clean".

# %%
resid = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
norm = resid.normalized()  # [layer, pos]
print("restored fraction, rows = layers 0 and 1, columns = positions:")
print(np.round(np.asarray(norm, np.float64), 2))
save_figure(resid.plot(normalized=True, title="denoising the residual stream (resid_pre)"),
            OUT / "resid_pre_patching.png")
assert norm[0, J] > 0.9 and np.all(np.abs(np.delete(norm[0], J)) < 0.1)
assert norm[1, L + J] > 0.9

# %% [markdown]
# Read `resid_pre_patching.png` row by row. At the input of layer 0 only position 2 matters:
# patching it is patching the clean token itself (restored fraction 1), and every other position
# is identical in both runs (0). At the input of layer 1 the symbol is already at position 8,
# where it is predicted (about 1): layer 0 has moved it there, and patching position 2 at this
# layer no longer matters. The map traces the path of the information through layers and
# positions.
#
# Which heads move it? Patching each head's output (`hook_z`, all positions at once):

# %%
heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
head_norm = np.asarray(heads.normalized(), np.float64)  # [layer, head]
print("restored fraction per head (rows = layers):")
print(np.round(head_norm, 2))
save_figure(heads.plot(normalized=True, title="denoising each head's output"),
            OUT / "head_patching.png")
assert head_norm[0].max() > 0.5

# %% [markdown]
# ## Attribution patching
#
# Each patched run above is a full forward pass. Attribution patching approximates
# `metric(patched) - metric(corrupted)` by `grad . (clean - corrupted)`, with the gradient taken
# once in the corrupted run: one forward and one backward pass for the whole sweep. It is exact
# when the metric is linear in the activation, and can be badly off where the model is strongly
# non-linear (a softmax that saturates).

# %%
approx = patching.attribution_patch(model, corrupted, clean_cache, metric, family="resid_pre")
exact_effect, approx_effect = resid.effect().ravel(), approx.effect().ravel()
corr = float(np.corrcoef(exact_effect, approx_effect)[0, 1])
print(f"correlation between activation and attribution patching over the sweep: {corr:.2f}")
for (layer, p_) in [(0, J), (1, L + J)]:
    print(f"  layer {layer}, pos {p_}: activation patching {resid.effect()[layer, p_]:+.2f}, "
          f"attribution patching {approx.effect()[layer, p_]:+.2f}")
assert corr > 0.5

# %% [markdown]
# The two sweeps agree on *where* the effect is (the correlation), but the estimate's size can
# be far from the real effect at the important patches: the answer's softmax and layer norm are
# not linear over a change this big. Use attribution patching to search a large space cheaply,
# then confirm the few candidates it finds with real activation patching.
#
# ## Path patching
#
# Patching a head's output changes everything downstream of it. To ask only about its **direct
# effect** on the output, path patching lets the clean output of each sender head reach just one
# receiver, here the unembedding (`receivers="logits"`), and freezes every other path.

# %%
direct = patching.path_patch(model, corrupted, clean_cache, metric, receivers="logits")
print("direct effect on the logit difference of each head's clean output (rows = layers):")
print(np.round(direct.effect(), 2))
save_figure(direct.plot(title="path patching: each head -> logits"), OUT / "path_patching.png")
assert direct.effect()[0].max() > 1.0 and direct.effect()[1].min() > 1.0

# %% [markdown]
# Every head but one has a large direct effect. The layer-0 head that moves the symbol (L0H0)
# also writes it straight into the logits; the layer-1 heads read it at position 8, where layer 0
# put it, and write it to the logits again: they depend on layer 0 (their effect in the full
# patch above is that of layer 0's output reaching them), but their own contribution is direct.
# Activation patching said *where* the symbol is; path patching separates *how* it reaches the
# output.
#
# ## Steering the output with a vector
#
# A **steering vector** is a direction added to the residual stream. The mean-difference version
# (Rimsky et al. 2023, "Steering Llama 2 via contrastive activation addition"): take inputs that
# show a behaviour and inputs that do not, and subtract their mean residual streams. Here the
# behaviour is "output symbol 7 at position 8": the positive inputs have `x_2 = 7`, the negative
# ones `x_2 = 3`. We add the vector to layer 1's input at position 8 of new inputs with `x_2 = 3`.

# %%
base = task.sample(jax.random.key(5), 64)["tokens"]
positive, negative = base.at[:, J].set(7), base.at[:, J].set(3)
positive, negative = positive.at[:, L + 1 + J].set(7), negative.at[:, L + 1 + J].set(3)
vector = mean_difference_vector(model, positive, negative, layer=1, pos=L + J)
test = task.sample(jax.random.key(6), 64)["tokens"].at[:, J].set(3)
hook = ("blocks.1.hook_resid_pre", steering_hook(vector, 1.0, start_pos=L + J))
before = np.asarray(model(test)[:, L + J].argmax(-1))
after = np.asarray(model.run_with_hooks(test, fwd_hooks=[hook])[:, L + J].argmax(-1))
print(f"at position {L + J}: predicts 3 in {np.mean(before == 3):.0%} before steering, "
      f"7 in {np.mean(after == 7):.0%} after")
assert np.mean(before == 3) > 0.95 and np.mean(after == 7) > 0.9

# %% [markdown]
# The vector, computed from 128 forward passes and no training, turns "copy 3" into "output 7"
# on inputs it has never seen. That the mean difference of two sets of activations works as a
# control knob is evidence that the model represents "the symbol to copy" along a direction in
# its residual stream.
#
# ## Exercises
#
# 1. Patch in the other direction (**noising**): run the clean input and patch in the corrupted
#    cache. Which patches *destroy* the behaviour? Compare with the denoising map.
# 2. Scale the steering vector by 0.5 and by 3. What happens?
# 3. Which layer-1 head has the largest direct effect? Look at its attention pattern at
#    position 8 (`clean_cache["pattern", 1]`).

# %% [markdown]
# ### Solutions

# %%
# 1. Noising: the same places matter (for this simple circuit), now with negative sign.
noising = patching.get_act_patch_resid_pre(model, clean, corrupted_cache, metric).normalized()
print("noising, restored fraction of the corrupted behaviour:", np.round(
    np.asarray(noising[0], np.float64), 2).tolist())
assert noising[0, J] > 0.9

# 2. Too little does not flip the answer everywhere; a lot flips it (and eventually breaks
#    other predictions, since it is added from position 8 on).
for coeff in (0.5, 3.0):
    hook_c = ("blocks.1.hook_resid_pre", steering_hook(vector, coeff, start_pos=L + J))
    out = np.asarray(model.run_with_hooks(test, fwd_hooks=[hook_c])[:, L + J].argmax(-1))
    print(f"coefficient {coeff}: predicts 7 in {np.mean(out == 7):.0%}")

# 3. The layer-1 head with the largest direct effect attends from position 8 to position 8
#    itself, where layer 0 has already brought the symbol, and copies it to the output.
h = int(np.argmax(direct.effect()[1]))
attn = np.asarray(clean_cache["pattern", 1][:, h, L + J].mean(0), np.float64)
print(f"L1H{h} at position {L + J} attends most to position {int(attn.argmax())}")
print(f"all checks hold; figures in {OUT}")
