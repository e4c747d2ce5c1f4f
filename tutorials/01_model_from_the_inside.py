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
# # Lesson 1: The model from the inside
#
# A transformer is usually presented as a black box: tokens in, a probability for the next token
# out. **Mechanistic interpretability** tries to open the box and say *which* internal
# computation produced an output. Before any method, you need to be able to see and change every
# intermediate value. That is what this lesson teaches, with the tools every later lesson uses:
#
# - **hook points**: named places in the forward pass where a value can be read or replaced;
# - `run_with_cache`: run the model and keep the values at the hook points you ask for;
# - `run_with_hooks`: run the model with your own functions editing values on the way;
# - **ablation**: switch one component off and see what breaks;
# - the **residual stream decomposition**: the final hidden state is a *sum* of what each
#   component wrote, so it can be split into those parts;
# - **direct logit attribution** and the **logit lens**: reading those parts as predictions.
#
# The vocabulary (hook names, `run_with_cache`) is TransformerLens' (Nanda and Bloom, 2022), and
# the view of the model as components writing into a shared residual stream is from "A
# Mathematical Framework for Transformer Circuits" (Elhage et al. 2021), which showed that a
# small attention-only transformer can be read as a sum of paths through its heads.
#
# Run it as a script (`python tutorials/01_model_from_the_inside.py`) or open it as a notebook
# (see tutorials/README.md). It needs no training and runs in a few seconds.

# %%
import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import tinyinterp
from tinyinterp import attribution as A
from tinyinterp import patching
from tinyinterp.planted import planted_model
from tinyinterp.plotting.induction import attention_pattern_figure
from tinyinterp.reproduce._io import save_figure

OUT = Path(os.environ.get("TINYINTERP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="tinyinterp-01-"))
OUT.mkdir(parents=True, exist_ok=True)
print(f"figures go to {OUT}")

# %% [markdown]
# ## Every hook point of a small model
#
# A model is described by a `TransformerConfig` and holds its weights as a plain dictionary of
# arrays (`model.params`). Here is a one-layer model with an MLP and layer norm, freshly
# initialised (random weights). `model.hook_names` lists every hook point in the order the
# forward pass visits them. Shapes use a fixed vocabulary: `batch`, `pos` (position in the
# sequence), `d_model` (the width of the **residual stream**, the vector each position carries
# from layer to layer), `head_index`, `d_head` (each attention head's own, smaller width) and
# `d_mlp` (the number of MLP neurons).

# %%
cfg = tinyinterp.TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=10,
                                   n_ctx=8, d_mlp=32, act_fn="gelu", normalization_type="LN")
fresh = tinyinterp.HookedTransformer.from_config(cfg, seed=0)
print(fresh)
tokens = jnp.array([[1, 2, 3, 4, 5]])  # [batch=1, pos=5]
logits, cache = fresh.run_with_cache(tokens)
for name in fresh.hook_names:
    print(f"  {name:32s} {tuple(cache[name].shape)}")
assert len(cache) == len(fresh.hook_names) and logits.shape == (1, 5, cfg.d_vocab)

# %% [markdown]
# Read the list from top to bottom and you have read the model: the token and position
# embeddings (`hook_embed`, `hook_pos_embed`) are added to form the residual stream
# (`blocks.0.hook_resid_pre`); layer norm divides by a scale (`ln1.hook_scale`); the attention
# layer computes queries, keys and values (`hook_q`, `hook_k`, `hook_v`), scores between every
# query position and every earlier key position (`hook_attn_scores`), turns them into weights with
# a softmax (`hook_pattern`), mixes the values (`hook_z`) and maps each head back to `d_model`
# (`hook_result`); their sum (`hook_attn_out`) is *added* to the residual stream
# (`hook_resid_mid`); the MLP does the same (`mlp.hook_pre`, `mlp.hook_post`, `hook_mlp_out`);
# a final layer norm and the **unembedding** `W_U` turn the last residual stream into
# **logits**, one score per vocabulary token (`unembed.hook_out`).
#
# ## A model whose answer we know
#
# To learn the tools we want a model whose internals we already understand, so that we can check
# that each tool tells the truth. `tinyinterp.planted.planted_model` builds one by hand: an
# **induction circuit** (the subject of lesson 2) among random **distractor** heads and MLP
# neurons whose outputs go nowhere. Induction is the rule "if the context contains `... A B ...`
# and the current token is `A`, predict `B`". It takes two heads:
#
# - a **previous-token head** in layer 0: every position attends to the position just before it
#   and copies that token into its own residual stream ("the token before me was A");
# - an **induction head** in layer 1: at the current `A`, it attends to positions whose *previous*
#   token was `A` (it reads what the previous-token head wrote), and copies the token found there
#   (`B`) into the output.
#
# The planted model has no layer norm, so its residual stream is an exact sum of separate named
# subspaces (token, position, the previous-token head's output, the induction head's output,
# noise) and its logits are exactly the induction head's output.

# %%
pm = planted_model(["induction"], d_vocab=8, n_ctx=12, n_layers=2, n_heads=2, attn_only=False,
                   placement={"previous_token": (0, 1), "induction": (1, 0)}, seed=0)
model = pm.model
print(model)
for head in pm.ground_truth.heads:
    print(f"  planted {head.kind} head {head.label}: reads {head.reads}, writes {head.writes!r}")
print("  edges (sender, receiver, how):", pm.ground_truth.edges)

# %% [markdown]
# The edge `('L0H1', 'L1H0', 'k')` says the previous-token head's output is read by the induction
# head's *keys*. This is **K-composition**: a later head's keys (what it is searched by) are
# built from an earlier head's output.
#
# Our input is six tokens repeated twice. Position 7 holds `5`, whose earlier occurrence
# (position 1) was followed by `1`, so induction predicts `1` there.

# %%
seq = [3, 5, 1, 6, 2, 7, 3, 5, 1, 6, 2, 7]
tokens = jnp.array([seq])
logits, cache = model.run_with_cache(tokens)
pred = np.asarray(logits[0]).argmax(-1)
print("tokens:     ", seq)
print("predictions:", pred.tolist())
np.testing.assert_allclose(np.asarray(logits), pm.expected_logits(tokens), atol=1e-4)
assert pred[7] == 1 and all(pred[i] == seq[i + 1] for i in range(6, 11))

# %% [markdown]
# In the second half every prediction is right: the model has "read" the first half. In the first
# half there is nothing to copy, and its predictions are arbitrary.
#
# ## Reading values: `run_with_cache`
#
# The cache is a read-only mapping from hook names to arrays. TransformerLens' shorthand works
# too: `cache["pattern", 1]` is `cache["blocks.1.attn.hook_pattern"]`, of shape
# `[batch, head_index, query_pos, key_pos]`: row `q` of a head's pattern is how that head at
# position `q` spreads its attention over positions `0..q`.

# %%
labels = [str(t) for t in seq]
prev_pattern = np.asarray(cache["pattern", 0][0, 1])  # [query_pos, key_pos]
ind_pattern = np.asarray(cache["pattern", 1][0, 0])
save_figure(attention_pattern_figure(prev_pattern, labels, title="L0H1: previous-token head"),
            OUT / "previous_token_pattern.png")
save_figure(attention_pattern_figure(ind_pattern, labels, title="L1H0: induction head"),
            OUT / "induction_pattern.png")
print("L0H1 attends from each position to:", prev_pattern.argmax(-1).tolist())
print("L1H0 attends from each position to:", ind_pattern.argmax(-1).tolist())
assert all(prev_pattern[q, q - 1] > 0.99 for q in range(1, 12))
assert all(ind_pattern[q, q - 5] > 0.99 for q in range(6, 12))

# %% [markdown]
# In `previous_token_pattern.png` all the attention weight sits on the line just below the
# diagonal: each position looks one step back. In `induction_pattern.png` the second half's rows
# put their weight on a diagonal line five positions back (the sequence's period minus one): the
# `5` at position 7 attends to position 2, the `1` that followed the earlier `5`.
#
# ## Changing values: `run_with_hooks` and ablation
#
# A **hook** is a pure function `fn(value, *, name) -> value` attached to a hook point; whatever it
# returns replaces the value for the rest of the forward pass. **Zero-ablating** a head means
# replacing its output with zeros: if the prediction depends on that head, it breaks. Here we
# zero the previous-token head's `hook_z` (its mixed values, `[batch, pos, head_index, d_head]`).

# %%
def zero_head(head):
    def hook(z, *, name):
        return z.at[:, :, head].set(0.0)
    return hook


ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head(1))])
print("with L0H1 ablated, logit of the right answer at position 7:",
      f"{float(ablated[0, 7, 1]):.3f} (was {float(logits[0, 7, 1]):.3f})")
assert float(ablated[0, 7, 1]) < 0.5 * float(logits[0, 7, 1])

# %% [markdown]
# The induction head does not compute its answer from the previous-token head's output directly:
# it uses that output to decide *where to look*. Without it, its keys carry no "previous token"
# information, it spreads its attention over every earlier position, and the right answer's logit
# collapses.
#
# `tinyinterp.patching.ablate` does the same for every head of a layer in one compiled program.
# A **metric** is a function `fn(logits, tokens) -> [batch]`; `A.logit(1, pos=7)` reads the
# logit of token 1 at position 7.

# %%
metric = A.logit(1, pos=7)
for layer in range(2):
    r = patching.ablate(model, tokens, metric, f"blocks.{layer}.attn.hook_z", over=("head",))
    print(f"layer {layer}: metric {float(r.baseline):.3f} unablated; with each head zeroed:",
          np.round(np.asarray(r.values, np.float64), 3).tolist())
    planted = pm.ground_truth.head_mask()[layer]
    assert np.all(r.values[planted] < 0.5) and np.allclose(r.values[~planted], r.baseline, atol=1e-4)

# %% [markdown]
# Only the two planted heads matter; zeroing a distractor changes nothing, as built.
#
# ## The residual stream decomposition
#
# Each block *adds* its output to the residual stream, so the final residual stream is the sum of
# the embeddings and of every attention and MLP output. `cache.decompose_resid()` returns that
# stack of parts (with labels); their sum is the final residual stream.

# %%
parts, part_labels = cache.decompose_resid(return_labels=True)  # [component, batch, pos, d_model]
print(part_labels)
np.testing.assert_allclose(np.asarray(parts.sum(0)), np.asarray(cache["resid_post", 1]), atol=1e-4)

# %% [markdown]
# ## Direct logit attribution
#
# The logit of token `t` is the final residual stream dotted with column `t` of `W_U` (plus a
# bias; with layer norm, after dividing by its scale). Since the residual stream is a sum, the
# logit is a sum too: each component's **direct logit attribution** (DLA) is its own output
# dotted with that column. It measures the *direct* effect only, what a component writes straight
# into the logit, not what it does through later layers.
# `A.direct_logit_attribution` splits the metric over every head, every MLP neuron, the
# embeddings and the biases.

# %%
dla = A.direct_logit_attribution(cache, metric)
values = np.asarray(dla.values[0])
order = np.argsort(-np.abs(values))[:5]
print("largest direct contributions to the logit of 1 at position 7:",
      [(dla.labels[i], round(float(values[i]), 3)) for i in order])
print(f"parts sum to {float(dla.total()[0]):.4f}; the logit is {float(logits[0, 7, 1]):.4f}")
fig = Figure(figsize=(9, 3), layout="constrained")
ax = fig.add_subplot()
ax.bar(range(len(values)), values)
ax.set_xticks(range(len(values)), dla.labels, rotation=90, fontsize=7)
ax.set_ylabel("direct logit attribution")
ax.set_title("Who writes the logit of token 1 at position 7?")
save_figure(fig, OUT / "direct_logit_attribution.png")
assert dla.labels[int(np.argmax(values))] == "L1H0"
np.testing.assert_allclose(float(dla.total()[0]), float(logits[0, 7, 1]), atol=1e-4)
assert abs(values[dla.labels.index("L0H1")]) < 1e-4

# %% [markdown]
# `direct_logit_attribution.png` is one tall bar, at the induction head L1H0, and nothing
# anywhere else. Note what DLA does *not* say: the previous-token head has a direct attribution
# of zero (it writes into a subspace the unembedding ignores), yet ablating it broke the
# prediction. DLA answers "who wrote the answer", not "who was needed"; ablation answers the
# second question.
#
# ## The logit lens
#
# The **logit lens** (nostalgebraist, 2020, who found that GPT-2's intermediate residual streams,
# decoded as if they were the last, already give sensible predictions that sharpen layer by
# layer) applies the final norm and unembedding to the residual stream at every layer's input.

# %%
lens = A.logit_lens(cache, tokens, metric)
for label, v in zip(lens.labels, np.asarray(lens.metric_values[:, 0]), strict=True):
    print(f"  residual stream at {label:10s}: logit of 1 at position 7 = {v:.3f}")
assert np.asarray(lens.metric_values[-1, 0]) > 0.99 and np.all(np.abs(lens.metric_values[:-1]) < 1e-4)

# %% [markdown]
# The answer does not exist in the residual stream before layer 1 (logit 0) and is fully there
# after it: the prediction is made in one step, by the induction head. In a trained model the
# picture is usually gradual, and the logit lens is how you watch it form.
#
# ## Exercises
#
# 1. Ablate the induction head instead (`blocks.1.attn.hook_z`, head 0). What happens to the
#    logits, and why is this planted model's answer so drastic?
# 2. Mean-ablate instead of zero-ablate: `patching.ablation_hook("mean", {"head": 1},
#    reference=...)` replaces the head's output with its average over a reference batch. Why is
#    mean ablation often preferred over zero ablation in trained models?
# 3. Use `cache.decompose_resid(layer=1, return_labels=True)` to find which parts of the residual
#    stream the induction head's keys are computed from.

# %% [markdown]
# ### Solutions

# %%
# 1. The unembedding of this planted model reads only the induction head's output subspace, so
#    without that head every logit is 0 (a uniform prediction) at every position. A trained model
#    has other paths (the direct path from the embedding, other heads), and ablating one head
#    usually only hurts the predictions that relied on it.
abl = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_head(0))])
print(f"largest |logit| with L1H0 ablated: {float(jnp.abs(abl).max()):.2e}")
assert float(jnp.abs(abl).max()) < 1e-4

# 2. Zero is a value the head never outputs in normal runs; the mean keeps the ablated model
#    on-distribution, so the effect measured is the loss of the head's *information*.
reference = jnp.array([[4, 2, 6, 1, 7, 3, 4, 2, 6, 1, 7, 3], [6, 7, 5, 3, 1, 2, 6, 7, 5, 3, 1, 2]])
ref_z = model.run_with_cache(reference, names_filter=["blocks.0.attn.hook_z"])[1]["z", 0]
mean_hook = patching.ablation_hook("mean", {"head": 1}, reference=ref_z)
mean_abl = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", mean_hook)])
print(f"mean-ablated L0H1: logit of 1 at position 7 = {float(mean_abl[0, 7, 1]):.3f}")

# 3. The induction head reads layer 1's input: the embeddings and layer 0's outputs.
_, labels1 = cache.decompose_resid(layer=1, return_labels=True)
print("layer 1 reads:", labels1)
print(f"all checks hold; figures in {OUT}")
