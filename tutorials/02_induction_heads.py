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
# # Lesson 2: Induction heads, from a phase change to a causal circuit
#
# **In-context learning** is a model's ability to use earlier parts of its input to predict later
# parts better. Olsson et al. (2022, "In-context Learning and Induction Heads") traced much of it,
# in small and large transformers, to a two-head circuit they called the **induction head**: if
# the context contains `... A B ...` and the current token is `A`, attend to the `B` that followed
# the earlier `A` and predict it. They found that induction heads form in a sudden **phase
# change** early in training, visible as a bump in the training loss, at the same time as the
# in-context-learning ability appears. Elhage et al. (2021, "A Mathematical Framework for
# Transformer Circuits") had found the mechanism in two-layer attention-only models: a
# **previous-token head** in layer 0 writes "the token before me was A" into each position, and
# the induction head in layer 1 uses it through **K-composition** (its keys read the earlier
# head's output).
#
# In this lesson you will:
#
# 1. train a 2-layer attention-only transformer on repeated random tokens and watch the phase
#    change in its loss;
# 2. find the previous-token and induction heads with **detectors** (scores comparing each head's
#    attention pattern with an ideal one);
# 3. read the circuit out of the weights: the OV circuit (what a head copies), the QK circuit
#    (where it looks) and the K-composition score between the two heads;
# 4. confirm causally that the circuit does the work, with ablation and path patching.
#
# Training takes about 15 seconds on a laptop CPU; the whole lesson under 30.

# %%
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tinyinterp import circuits, detectors, patching
from tinyinterp.plotting import induction as ip
from tinyinterp.plotting.training import loss_curves
from tinyinterp.reproduce import induction as ind
from tinyinterp.reproduce._io import save_figure
from tinyinterp.train import train

OUT = Path(os.environ.get("TINYINTERP_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="tinyinterp-02-"))
OUT.mkdir(parents=True, exist_ok=True)
print(f"figures go to {OUT}")

# %% [markdown]
# ## The model and the data
#
# The model is the reproduction's (`tinyinterp reproduce induction`): two layers of four
# attention heads, `d_model` 64, layer norm, no MLPs, a vocabulary of 64 tokens and a context of
# 65. Each training sequence is a random segment of 8 to 32 tokens repeated to the end of the
# context, sometimes after a filler and a BOS (beginning-of-sequence) token. The first occurrence
# of the segment is unpredictable; every later token is predictable by induction. The segment
# length varies so that the model cannot solve the task by positions alone ("copy the token 32
# back") and must use content. The reproduction trains 1500 steps on batches of 64 with a decaying
# learning rate; here 400 steps on batches of 32 at a constant learning rate are enough for the
# circuit to form.

# %%
cfg = ind.DEFAULT_CONFIG
task = ind.training_task(cfg)
tc = ind.DEFAULT_TRAIN.replace(steps=400, batch_size=32, schedule="constant", eval_batches=0,
                              progress=False)
example = task.sample(jax.random.key(1), 1)["tokens"][0]
print(cfg)
print("a training sequence:", np.asarray(example).tolist())
t0 = time.perf_counter()
result = train(cfg, task, tc)
model = result.model
print(f"trained {tc.steps} steps in {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# ## The phase change
#
# The training history records the loss on two kinds of prediction separately: those of the
# first occurrence of the segment (nothing in the context predicts them: the best possible loss is
# about ln 64 = 4.16 nats) and those inside a repeat (predictable by induction, best loss 0).
# `ind.find_phase_change` finds where the repeated-half loss falls fastest.

# %%
loss_first = np.asarray(result.history["loss_first"])
loss_rep = np.asarray(result.history["loss_repeated"])
pc = ind.find_phase_change(loss_rep)
print(f"phase change at step {pc['step']} (10%-90% of the fall between steps {pc['start']} and "
      f"{pc['end']}): repeated-half loss {pc['plateau_loss']:.2f} -> {pc['final_loss']:.3f} nats")
save_figure(loss_curves(np.arange(len(loss_rep)), {"first occurrence": loss_first,
                                                   "repeats (induction)": loss_rep},
                        title="Repeated random tokens: loss on each part", phase_change=pc),
            OUT / "loss_curves.png")
assert pc["found"] and pc["drop"] > 2.0 and pc["end"] < tc.steps

# %% [markdown]
# In `loss_curves.png` both curves sit near 4 nats for the first ~200 steps: the model has learnt
# only which tokens are common, and treats the repeats like the first occurrence. Then, within a
# few dozen steps (the shaded window), the loss on the repeats drops towards 0 while the loss on
# the first occurrence stays where it is. Nothing about the data changed at that step: the model
# suddenly found the induction algorithm.
#
# ## Finding the heads with detectors
#
# We analyse the trained model on fresh sequences of the classic layout: 32 distinct random
# tokens, repeated once. A **detector** compares a head's attention pattern with an ideal pattern:
#
# - **previous-token score**: the mean attention from each position to the one just before it;
# - **prefix-matching (induction) score** (Olsson et al.): in the repeat, the mean attention from
#   a token to the token *after* its earlier occurrence;
# - **copying score** (Elhage et al.): does attending to a token raise that same token's logit?
#   It is computed from the weights: the eigenvalues of the head's full **OV circuit**
#   `W_E W_V W_O W_U` (token in, logits out), `sum(eigenvalues) / sum(|eigenvalues|)`, +1 for a
#   head that only copies.

# %%
SEQ = ind.SEQ_LEN  # 32
tokens = ind.distinct_repeated_tokens(jax.random.key(7), 32, cfg.d_vocab, SEQ)  # [32, 64]
_, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
patterns = [cache["pattern", layer] for layer in range(cfg.n_layers)]
scores = {
    # previous-token: on the first occurrence, where the induction head's keys are read
    "previous_token": np.asarray(detectors.previous_token_scores(
        [p[..., :SEQ, :SEQ] for p in patterns], tokens[:, :SEQ])),
    "prefix_matching": np.asarray(detectors.prefix_matching_scores(patterns, tokens)),
    "copying": np.asarray(detectors.copying_scores(model)),
}
for name, s in scores.items():
    grid = np.array2string(s, precision=2, suppress_small=True).replace("\n", "")
    print(f"{name:>16}: {grid} (rows: layers)")
prev_head = int(np.argmax(scores["previous_token"][0]))
ind_head = int(np.argmax(scores["prefix_matching"][1]))
print(f"previous-token head L0H{prev_head}, induction head L1H{ind_head}")
save_figure(ip.head_score_heatmaps(scores), OUT / "head_scores.png")
pattern = np.asarray(patterns[1][0, ind_head])
save_figure(ip.attention_pattern_figure(pattern, [str(int(t)) for t in tokens[0]],
                                        title=f"L1H{ind_head} on a repeated sequence"),
            OUT / "induction_pattern.png")
assert scores["previous_token"][0, prev_head] > 0.5
assert scores["prefix_matching"][1, ind_head] > 0.5 and scores["copying"][1, ind_head] > 0.5

# %% [markdown]
# `head_scores.png`: in layer 0 one head stands out as a previous-token head; in layer 1 *every*
# head prefix-matches and copies. The model has learnt several induction heads side by side
# (we keep the strongest as "the" induction head). Remember this redundancy when we ablate. In
# `induction_pattern.png` the induction head's attention in the second half is a stripe parallel
# to the diagonal, 31 positions back: each repeated token attends to the token that followed its
# earlier occurrence.
#
# ## Reading the circuit from the weights
#
# A head's **QK circuit** `W_Q W_K^T` (a `d_model x d_model` matrix) says which query direction
# attends to which key direction; its OV circuit `W_V W_O` says what it writes when it attends.
# `circuits.FactoredMatrix` keeps such products as their two factors, so they stay cheap.
#
# **K-composition** asks how much of the induction head's key side reads what the
# previous-token head writes: `||OV_prev  (W_Q W_K^T)_ind^T||_F / (||OV_prev||_F ||QK_ind||_F)`,
# a number between 0 and 1 (Elhage et al. 2021). Random heads of these shapes already score
# something, so we compare with the same score for random Gaussian heads
# (`composition_score_baseline`).

# %%
k_comp = np.asarray(circuits.all_composition_scores(model, "K"))[0, :, 1, :]  # [L0 head, L1 head]
baseline = circuits.composition_score_baseline(cfg, "K", n_samples=256, seed=0, return_samples=True)
p99 = float(np.quantile(baseline, 0.99))
print(f"K-composition L0H{prev_head} -> L1H{ind_head}: {k_comp[prev_head, ind_head]:.3f} "
      f"(random heads: mean {baseline.mean():.3f}, 99th percentile {p99:.3f})")
save_figure(ip.composition_heatmap(k_comp, baseline=float(baseline.mean()), mode="K"),
            OUT / "k_composition.png")
assert k_comp[prev_head, ind_head] > p99

ov = circuits.full_ov_circuit(model, 1)[ind_head].AB  # [d_vocab, d_vocab]: attended -> logit
diag_top = float(np.mean(np.argmax(np.asarray(ov), axis=1) == np.arange(cfg.d_vocab)))
print(f"full OV circuit of L1H{ind_head}: for {diag_top:.0%} of tokens, attending to the token "
      "raises that same token's logit the most")
assert diag_top > 0.8

# %% [markdown]
# `k_composition.png` shows the K-composition between every layer-0 and every layer-1 head; the
# previous-token -> induction pair stands above the random baseline (the cyan line on the colour
# bar). The full OV circuit is close to a diagonal matrix: what the induction head attends to is
# what it predicts. This is a weights-only argument, though; the next section tests it causally.
#
# ## Confirming the circuit causally
#
# Our **metric** is the model's mean log-probability of the correct next token on the repeated
# half. **Mean ablation** replaces a head's output with its average over a reference batch (on
# distribution, unlike zeros); if the metric collapses, the head was necessary.

# %%
def repeat_logprob(logits, tokens):
    """Mean log-probability of the right next token over the repeated half: [batch]."""
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [batch, pos-1, d_vocab]
    right = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, pos-1]
    return jnp.mean(right[:, SEQ:], axis=-1)


reference = ind.distinct_repeated_tokens(jax.random.key(8), 32, cfg.d_vocab, SEQ)
per_head = {}
for layer in range(cfg.n_layers):
    r = patching.ablate(model, tokens, repeat_logprob, f"blocks.{layer}.attn.hook_z",
                        over=("head",), kind="mean", reference_tokens=reference)
    per_head[layer] = r.values
    print(f"layer {layer}: log-prob {float(r.baseline):.3f}; each head mean-ablated:",
          np.round(np.asarray(r.values, np.float64), 2).tolist())
clean = float(r.baseline)
whole = patching.ablate(model, tokens, repeat_logprob, "blocks.1.attn.hook_z", kind="mean",
                        reference_tokens=reference)
print(f"every layer-1 head mean-ablated at once: log-prob {float(whole.values):.2f}")
assert np.argmin(per_head[0]) == prev_head and per_head[0][prev_head] < clean - 0.3
assert float(whole.values) < clean - 2.0

# %% [markdown]
# In layer 0, ablating the previous-token head hurts most; the other heads matter much less. In
# layer 1, ablating any *one* induction head barely matters, because the other induction heads
# still do the job; ablating all of them at once destroys the prediction (several nats). One
# head at a time is a weak test when a model has backups. And ablation cannot tell *how* the
# previous-token head is used. **Path patching** (Wang et al. 2022, who used it to trace the indirect-object
# circuit in GPT-2 small; Goldowsky-Dill et al. 2023) can: it runs the model on the clean input,
# takes each sender head's output from a **corrupted** run, and lets it reach only chosen
# receivers, here the keys of the layer-1 heads. Our corrupted input has a different first half, so
# "the token before me was A" is wrong in every position of it. If the previous-token head's
# output matters *through the induction head's keys*, this patch alone should break induction.

# %%
corrupted = jnp.concatenate([reference[:, :SEQ], tokens[:, SEQ:]], axis=1)
_, corrupted_cache = model.run_with_cache(corrupted, names_filter=lambda n: n.endswith("hook_z"))
paths = patching.path_patch(model, tokens, corrupted_cache, repeat_logprob,
                            receivers=[("k", 1, None)])  # None: every head of layer 1
effect = paths.effect()  # [layer, head]: change of the metric
print("path patching into layer 1's keys, change of log-prob per sender head:")
print(np.round(effect, 2))
save_figure(paths.plot(title="path patching: sender heads -> layer-1 keys"),
            OUT / "path_patching.png")
assert effect[0, prev_head] < -1.0 and np.argmin(effect[0]) == prev_head

# %% [markdown]
# `path_patching.png` has one strongly negative cell, the previous-token head: its corrupted
# output, delivered only to the induction heads' keys, destroys the prediction. That is
# K-composition, shown causally. (Layer-1 heads cannot send to a layer-1 head, so their row is 0.)
#
# ## Exercises
#
# 1. Path patch the previous-token head into the induction head's *queries* or *values* instead
#    (`receivers=[("q", 1, None)]`). What do you expect, and what happens?
# 2. Compute the in-context-learning score (`detectors.in_context_learning_score`): the loss late
#    in the context minus the loss early in it. Is it negative?
# 3. Retrain with `steps=150`. Which of the scores above already show the circuit?

# %% [markdown]
# ### Solutions

# %%
# 1. The induction head's query is the current token, not the previous one: the previous-token
#    head should matter far less through the queries (or the values) than through the keys.
q_paths = patching.path_patch(model, tokens, corrupted_cache, repeat_logprob,
                              receivers=[("q", 1, None)]).effect()
print(f"through the queries: {q_paths[0, prev_head]:.2f} (through the keys: "
      f"{effect[0, prev_head]:.2f})")
assert abs(q_paths[0, prev_head]) < abs(effect[0, prev_head])

# 2. Negative: late predictions (inside the repeat) are much better than early ones.
icl = detectors.in_context_learning_score(model, tokens, early=SEQ // 2, late=-1)
print(f"in-context-learning score: {icl:.2f} nats")
assert icl < -1.0

# 3. (Not run here, to keep the lesson short.) Before the phase change the prefix-matching score
#    and K-composition are near their random values; the previous-token head forms first.
print(f"all checks hold; figures in {OUT}")
