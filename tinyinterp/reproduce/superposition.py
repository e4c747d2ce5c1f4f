"""`tinyinterp reproduce superposition`: the four headline results of Toy Models of Superposition.

1. n=5, m=2, importance 0.9**i: dense -> two orthogonal features, the rest dropped (bias ~ 0.5);
   ~80% sparsity -> antipodal pairs; ~90% -> a pentagon. Several seeds; the best by loss is shown.
2. n=20, m=5, importance 0.7**i: represented features (||W_i|| > 0.5) grow with sparsity, least
   important last.
3. n=2, m=1 phase diagram over the extra feature's importance and the density: not represented,
   dedicated dimension, antipodal superposition.
4. Uniform importance: dimensions per feature sticks at 1 and 1/2; feature dimensionalities D_i
   cluster at 1, 3/4, 2/3, 1/2, 2/5 (the paper's claim; the report says which lines this run
   finds, and DENSE_NOTE below why 1 and 3/4 are not among them).

``run(out_dir, seed=0, quick=False)`` writes report.json, report.md and PNG figures, prints a
plain-words summary and returns the report. ``quick=True`` is a reduced but real run (tests).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import time
from pathlib import Path

import jax
import numpy as np

from tinyinterp import superposition as sp
from tinyinterp.reproduce._io import save_figure, write_report

# --------------------------------------------------------------------------------------------
# Settings


def settings(quick: bool) -> dict:
    """Experiment sizes. The full run follows the reference setup (batch 1024, 10k steps) except
    where noted; quick shrinks batches, steps and grids (still real training)."""
    if quick:
        return dict(
            pentagon=dict(probs=[1.0, 0.2, 0.1], seeds=2, steps=3000, batch=256),
            counts=dict(n_levels=3, steps=3000, batch=256, extra_steps=500, extra_below=0.05),
            phase=dict(n_importance=3, n_density=3, steps=1500, batch=128, seeds=2),
            geometry=dict(n_features=40, n_hidden=6, batch=128, lr=3e-3, tol=0.0125,
                          groups=[dict(probs=[1.0, 0.3, 0.05], steps=1000),
                                  dict(probs=[0.6, 0.2], steps=1500)]),
        )
    return dict(
        pentagon=dict(probs=[1.0, 0.2, 0.1, 0.05], seeds=5, steps=10_000, batch=1024),
        counts=dict(n_levels=10, steps=10_000, batch=1024, extra_steps=10_000, extra_below=0.05),
        # the grid uses batch 256 to keep the whole command under the 60 s goal on a 2-core CPU
        # (the 2-feature model is well estimated by 256 samples)
        phase=dict(n_importance=9, n_density=9, steps=10_000, batch=256, seeds=3),
        # the notebook's uniform-importance model (n=200, m=20, importance 1, 1-S from 1 to 1/20)
        # but, to fit the time goal: batch 256 instead of 1024, 15 levels placed where D* is on a
        # plateau (3,000 steps) or moves between plateaus (14,000 steps; at 7,000 the triangles
        # had not settled) instead of 20 evenly spaced levels x 10,000 steps, and lr 3e-3 with
        # cosine decay instead of a constant 1e-3. The three densest levels start from the
        # notebook's init std (DENSE_NOTE), the others from the per-matrix one (INIT_NOTE).
        # key: a group trains from fold_in(key, this); the transition group keeps the key it had
        # before the dense levels became a group of their own
        geometry=dict(n_features=200, n_hidden=20, batch=256, lr=3e-3, tol=0.0125,
                      groups=[dict(probs=[1.0, 0.9, 0.8], steps=3000, init="notebook", key=2),
                              dict(probs=[0.45, 0.38, 0.3, 0.15, 0.1, 0.05], steps=3000, key=0),
                              dict(probs=[0.7, 0.64, 0.6, 0.24, 0.22, 0.2], steps=14_000,
                                   key=1)]),
    )


# Init (INIT_NOTE): every experiment here uses the per-matrix xavier-normal std sqrt(2/(n+m))
# (sp.xavier_init_std), so an instance's init does not depend on how many seeds and levels are
# trained alongside. The notebook's xavier_normal_ over its joint [instance, feature, hidden]
# tensor gives a smaller std (sp.notebook_init_std: 0.021 instead of 0.095 at n=200, m=20, 20
# instances). Measured on the uniform-importance sweep (seeds 0-2): with the notebook's std the
# features that are not represented at 1-S = 0.7 still end with ||W_j|| ~ 0.2 (they start at
# ~0.1: the background is learned, not left over from the init; the notebook's own batch 1024,
# constant lr 1e-3, 10k steps give the same), still no D_i cluster at 1 or 3/4, and the 2/5
# cluster was lost in all 3 seeds (found in all 3 with sqrt(2/(n+m))).
#
# DENSE_NOTE (why there is no D_i line at 1 or 3/4; measured with scripts outside the package,
# seeds 0, 1 and 3, n=200, m=20, uniform importance). Loss reference: m features with a dimension
# each and the rest dropped (bias E[x]) lose (n-m) Var(x) = (n-m)(p/3 - p^2/4), p = 1-S (15.00 at
# p=1).
# - Dense levels, per-matrix std 0.095: training stalls in a worse solution, loss 21.5 / 20.8 /
#   20.8 at p = 1 / 0.9 / 0.8 (a rank-20 projection whose bias leaves 13% of pre-activations
#   negative; refitting the bias does not help; batch 1024, constant lr 1e-3 or 6,000 steps do
#   not either). With the notebook's std 0.021 (same steps) the loss is 15.00 / 17.55 / 19.19,
#   equal to the dedicated-dimension reference, but the solution is the spread one: a rank-20
#   projection, ||W_i|| ~ 0.31 for all but at most one feature, D_i = ||W_i||^2 ~ 0.1. The
#   notebook's own setup (batch 1024, constant 1e-3, 10k steps, std 0.021) gives the same (loss
#   15.01). Started FROM the dedicated solution (constant 1e-3 or cosine 3e-3, 3k steps),
#   training keeps the 20 features (D_i among them 0.96-0.985) but grows an unrepresented
#   background ||W_j|| 0.17-0.20 (loss 15.000 -> 14.997 at p=1), which pulls their D_i to a
#   median of 0.63-0.75: dense data gives loss-equivalent solutions, and none of them keeps
#   D_i = 1 after training.
# - Transition, a finer grid 1-S = 0.84, 0.82, ..., 0.66 with the notebook's setup for 20k steps
#   (std 0.021, batch 1024, constant 1e-3): 12-25 represented features, median D_i 0.69-0.72;
#   among represented features only 0.97 (0.84) falling to 0.74 (0.66); the background's share of
#   their denominators 28% (0.84) falling to 5% (0.66). Of the 174 represented D_i, 1 is within
#   1/80 of 3/4 and 63 in the window just below it (a smear, no tetrahedron line), 14 near 2/3.
#   The repository's own settings (batch 256, cosine 3e-3, 14k steps) on that grid: 4 near 3/4,
#   92 just below. The background is part of the optimum, not slow convergence: at 1-S = 0.73
#   (notebook setup, 10k steps) removing its component along the represented features' span
#   (bias refit) raises the loss from 19.80 to 20.25; scaling the whole background by 0 / 0.5 /
#   1.5 raises it by 2.19 / 0.49 / 1.22; zeroed at 1-S = 1, 0.8, 0.7 (per-matrix std, 3k steps)
#   it grows back to 0.25-0.31 in 3,000 more steps.
# - At 1-S = 0.7 this command's run (per-matrix std, batch 256, cosine 3e-3, 14k steps) ends at
#   loss 20.03, above the dedicated-dimension reference 19.95; the notebook's setup for 20k steps
#   reaches 19.91 there (21 represented, median D_i 0.69, 5 near 2/3), again no line at 1 or 3/4.
# - The lines that are found depend on the draw: with the settings before the dense group was
#   split off, seeds 0, 1, 2 all found 2/3, 1/2 and 2/5 (3/8 in seeds 0 and 1); the same settings
#   with the transition group trained from another key (fold_in index 2 instead of 1, seed 0)
#   found only 1/2 (2/3: 12 near against 3 / 12 in the side windows; 2/5: 29 against 30 / 24).
# - n=400, m=30 (the size replications of the paper's figure use), the notebook's setup exactly
#   (std 0.0126, batch 1024, AdamW 1e-3 with weight decay 0.01, 10k steps; 26 levels from 1-S = 1
#   to 0.05, seeds 0 and 1; 0.73-0.388 also at 20k steps): of 3,617 represented D_i none is
#   within 1/80 of 1 or 3/4 (the largest is 0.724); lines at 1/2 (714), 2/5 and 3/8. Dedicated
#   dimensions (1-S 0.8-0.73) and tetrahedra (0.67) do form, as the D_i over represented features
#   alone show (~0.98-1.0; 2 near 3/4 at 10k steps, 11 at 20k), but the background (norms
#   0.24-0.27, 23-55% of their denominators) puts them at 0.66-0.70. Dense levels (1-S >= 0.85)
#   represent nothing: every feature has norm ~0.27, the spread solution (loss 0.03 above the
#   dedicated-dimension reference).
# - The reference code itself gives the same: the notebook's uniform-importance experiment written
#   in PyTorch 2.13 from its description (W [instance, feature, hidden] with xavier_normal_ over
#   the 3-D tensor, b = 0, ReLU(W^T W x + b), AdamW lr 1e-3 with its default weight decay 0.01,
#   batch 1024, constant lr, 10k steps, loss = mean over batch and features summed over
#   instances; 20 levels 1-S = 20^-t) and run on this machine, n=200, m=20, seeds 0 and 1: of
#   4,000 D_i per seed none is within 1/80 of 1 or 3/4 (the largest are 0.720 and 0.721); near
#   1/2 208 / 218, 3/8 38 / 39, 2/5 26 / 34, 2/3 7 / 5. The unrepresented norms are 0.31 at
#   1-S = 1 and 0.23 at 0.73, as here. So the missing lines are not a difference of this
#   implementation from the reference code.

# --------------------------------------------------------------------------------------------
# Geometry classification (n=5, m=2)


def describe_2d(W: np.ndarray, threshold: float = 0.5) -> dict:
    """Name the geometry of W [feature, hidden=2]: 'orthogonal' (2 represented at ~90 degrees),
    'antipodal pairs' (every represented feature has a partner at ~180 degrees), 'pentagon'
    (5 represented, consecutive angles ~72 degrees), or 'other'. Angles within 10 degrees."""
    norms = np.linalg.norm(W, axis=1)
    rep = np.where(norms > threshold)[0]
    angles = np.degrees(np.arctan2(W[rep, 1], W[rep, 0]))
    out = {"represented": rep.tolist(), "angles_deg": np.round(angles, 1).tolist()}
    geometry = "other"
    if len(rep) == 2:
        gap = abs((angles[0] - angles[1] + 180) % 360 - 180)
        if abs(gap - 90) < 10:
            geometry = "orthogonal"
    if len(rep) >= 2 and len(rep) % 2 == 0 and geometry == "other":
        unit = W[rep] / norms[rep, None]
        cos = unit @ unit.T  # [rep, rep]
        np.fill_diagonal(cos, 1.0)
        partners = (cos < -math.cos(math.radians(10))).sum(axis=1)
        if np.all(partners == 1):
            geometry = "antipodal pairs"
    if len(rep) == 5:
        gaps = np.diff(np.sort(angles % 360), append=np.sort(angles % 360)[0] + 360)
        if np.all(np.abs(gaps - 72) < 10):
            geometry = "pentagon"
    out["geometry"] = geometry
    return out


def classify_regime(W: np.ndarray, threshold: float = 0.5) -> int:
    """n=2, m=1: 0 extra feature (index 1) not represented, 1 it has the dimension to itself,
    2 both represented with opposite signs (antipodal superposition), 3 other."""
    w0, w1 = float(W[0, 0]), float(W[1, 0])
    if abs(w1) <= threshold:
        return 0
    if abs(w0) <= threshold:
        return 1
    return 2 if w0 * w1 < 0 else 3


# --------------------------------------------------------------------------------------------
# Experiments


def _train(n, m, probs, importance, steps, batch, key, n_per_prob=1, devices=None):
    probs = np.repeat(np.asarray(probs, np.float32), n_per_prob)
    cfg = sp.ToyModelConfig(n_features=n, n_hidden=m, n_instances=len(probs), n_steps=steps,
                            batch_size=batch, chunk_size=min(steps, 2500),
                            init_std=sp.xavier_init_std(n, m))  # INIT_NOTE
    prob = probs[:, None] * np.ones((1, n), np.float32)  # [instance, feature]
    return sp.train(cfg, key, importance, prob, devices=devices), probs


def exp_pentagon(key, s) -> tuple[dict, dict]:
    n, m, k = 5, 2, s["seeds"]
    res, probs = _train(n, m, s["probs"], sp.importance_schedule(n, 0.9), s["steps"], s["batch"],
                        key, n_per_prob=k, devices=s.get("devices"))
    W, b = np.asarray(res.params["W"]), np.asarray(res.params["b"])
    loss = res.final_loss()
    levels = []
    best_idx = []
    for li, p in enumerate(s["probs"]):
        runs = []
        for si in range(k):
            i = li * k + si
            d = describe_2d(W[i])
            runs.append({"seed_index": si, "final_loss": float(loss[i]), **d,
                         "norms": np.round(np.linalg.norm(W[i], axis=1), 3).tolist(),
                         "bias": np.round(b[i], 3).tolist()})
        best = int(np.argmin(loss[li * k:(li + 1) * k]))
        best_idx.append(li * k + best)
        levels.append({"feature_probability": float(p), "sparsity": float(1 - p),
                       "best_seed_index": best, "best_geometry": runs[best]["geometry"],
                       "geometry_counts": _count([r["geometry"] for r in runs]), "runs": runs})
    dense = levels[0]["runs"][levels[0]["best_seed_index"]]
    return ({"n_features": n, "n_hidden": m, "importance": "0.9**i", "seeds_per_level": k,
             "steps": s["steps"], "batch_size": s["batch"], "levels": levels,
             "dense_dropped_bias": dense["bias"][2:]},
            {"W": W[best_idx], "b": b[best_idx], "probs": np.asarray(s["probs"])})


def _count(items):
    out = {}
    for it in items:
        out[it] = out.get(it, 0) + 1
    return out


def exp_counts(key, s) -> tuple[dict, dict]:
    n, m = 20, 5
    probs = np.logspace(0, -2, s["n_levels"]).astype(np.float32)
    res, _ = _train(n, m, probs, sp.importance_schedule(n, 0.7), s["steps"], s["batch"], key,
                    devices=s.get("devices"))
    W = np.asarray(res.params["W"])
    counts = np.asarray(sp.represented_count(W))
    norms = np.asarray(sp.feature_norms(W))
    out = {"n_features": n, "n_hidden": m, "importance": "0.7**i", "steps": s["steps"],
           "batch_size": s["batch"], "levels": []}
    extended = np.full(len(probs), np.nan)
    W_ext = W.copy()
    sparse = np.where(probs < s["extra_below"])[0]
    if s["extra_steps"] and len(sparse):
        res2 = sp.continue_training(res, s["extra_steps"], instances=sparse)
        W_ext = np.asarray(res2.params["W"])
        extended[sparse] = np.asarray(sp.represented_count(W_ext[sparse]))
        # not converged = the count or the loss still moved during the extra steps
    for i, p in enumerate(probs):
        rep = np.where(norms[i] > 0.5)[0]
        level = {"feature_probability": float(p), "represented": int(counts[i]),
                 "represented_features": rep.tolist(),
                 "least_important_last": bool(np.array_equal(rep, np.arange(len(rep)))),
                 "dimensions_per_feature": float(sp.dimensions_per_feature(W[i])),
                 "final_loss": float(res.final_loss()[i])}
        if np.isfinite(extended[i]):
            level["represented_after_extra_steps"] = int(extended[i])
            level["total_steps_extra"] = s["steps"] + s["extra_steps"]
            level["converged_at_reference_steps"] = bool(extended[i] == counts[i])
        out["levels"].append(level)
    out["extra_steps_for_probability_below"] = s["extra_below"]
    out["extra_steps"] = s["extra_steps"]
    return out, {"W": W, "W_ext": W_ext, "probs": probs, "counts": counts, "extended": extended}


def exp_phase(key, s) -> tuple[dict, dict]:
    importance = np.logspace(-1, 1, s["n_importance"]).astype(np.float32)
    density = np.logspace(0, -2, s["n_density"]).astype(np.float32)
    imp_grid, den_grid = np.meshgrid(importance, density, indexing="ij")  # [importance, density]
    k = s["seeds"]
    n_inst = imp_grid.size * k  # instance = (cell, seed), seed fastest
    cfg = sp.ToyModelConfig(n_features=2, n_hidden=1, n_instances=n_inst, n_steps=s["steps"],
                            batch_size=s["batch"], chunk_size=min(s["steps"], 2500),
                            init_std=sp.xavier_init_std(2, 1))  # INIT_NOTE
    extra_imp = np.repeat(imp_grid.ravel(), k)  # [instance]
    imp = np.stack([np.ones(n_inst, np.float32), extra_imp], axis=1)  # [instance, feature]
    prob = np.repeat(np.repeat(den_grid.ravel(), k)[:, None], 2, axis=1)  # [instance, feature]
    res = sp.train(cfg, key, imp, prob, devices=s.get("devices"))
    W = np.asarray(res.params["W"]).reshape(imp_grid.size, k, 2, 1)  # [cell, seed, feature, 1]
    loss = res.final_loss().reshape(imp_grid.size, k)  # [cell, seed]
    best = loss.argmin(axis=1)  # [cell]
    regimes = np.array([classify_regime(W[c, best[c]]) for c in range(imp_grid.size)])
    regimes = regimes.reshape(imp_grid.shape)
    all_regimes = np.array([[classify_regime(W[c, j]) for j in range(k)]
                            for c in range(imp_grid.size)])
    agree = float((all_regimes == regimes.ravel()[:, None]).mean())
    names = ["not represented", "dedicated dimension", "antipodal superposition", "other"]
    return ({"n_features": 2, "n_hidden": 1, "steps": s["steps"], "batch_size": s["batch"],
             "seeds_per_cell": k, "cell_regime_from": "the seed with the lowest final loss",
             "fraction_of_seeds_agreeing_with_best": agree,
             "importance": importance.tolist(), "density": density.tolist(),
             "regime_names": names, "regimes": regimes.tolist(),
             "regime_counts": {n: int((regimes == i).sum()) for i, n in enumerate(names)}},
            {"regimes": regimes, "importance": importance, "density": density})


def exp_geometry(key, s) -> tuple[dict, dict]:
    """Uniform importance, n features in m dims, a sweep over sparsity. The levels come in groups
    trained separately: the levels where D* sits on a plateau (dense, 1/2, very sparse) settle
    quickly; the levels where D* moves between plateaus (1 -> 1/2 and just below 1/2, where
    triangles, pentagons and antiprisms form) get more steps. lr: cosine decay from s["lr"] to 0."""
    n, m = s["n_features"], s["n_hidden"]
    init_std = sp.xavier_init_std(n, m)  # INIT_NOTE
    # the notebook's std: xavier_normal_ over its [20 levels, n, m] tensor (DENSE_NOTE)
    stds = {"xavier": init_std, "notebook": sp.notebook_init_std(n, m, 20)}
    W_parts, probs_parts, steps_parts, loss_parts, std_parts = [], [], [], [], []
    for gi, g in enumerate(s["groups"]):
        probs = np.asarray(g["probs"], np.float32)
        std = stds[g.get("init", "xavier")]
        cfg = sp.ToyModelConfig(n_features=n, n_hidden=m, n_instances=len(probs),
                                n_steps=g["steps"], batch_size=s["batch"], lr=s["lr"],
                                lr_schedule="cosine", chunk_size=g["steps"], init_std=std)
        res = sp.train(cfg, jax.random.fold_in(key, g.get("key", gi)), np.ones(n, np.float32),
                       probs[:, None] * np.ones((1, n), np.float32), devices=s.get("devices"))
        W_parts.append(np.asarray(res.params["W"]))
        probs_parts.append(probs)
        steps_parts.append(np.full(len(probs), g["steps"]))
        loss_parts.append(res.final_loss())
        std_parts.append(np.full(len(probs), std))
    order = np.argsort(-np.concatenate(probs_parts), kind="stable")  # densest first
    W = np.concatenate(W_parts)[order]  # [level, feature, hidden]
    probs = np.concatenate(probs_parts)[order]
    steps = np.concatenate(steps_parts)[order]
    loss = np.concatenate(loss_parts)[order]
    stds_used = np.concatenate(std_parts)[order]
    D = np.asarray(sp.feature_dimensionality(W))  # [level, feature]
    norms = np.asarray(sp.feature_norms(W))
    dpf = np.asarray(sp.dimensions_per_feature(W))
    rep = norms > 0.5  # [level, feature]
    tol = s["tol"]
    clusters = sp.fraction_clusters(D[rep], tol=tol)
    # how much of a represented feature's denominator sum_j (W_i_hat . W_j)^2 comes from the
    # features that are not represented (||W_j|| <= 0.5): this background pulls D_i below the
    # fraction of the polytope the represented features form
    W_hat = W / np.maximum(norms, 1e-8)[..., None]
    sq = np.einsum("lih,ljh->lij", W_hat, W) ** 2  # [level, feature(i), feature(j)]
    weak_share = (sq * ~rep[:, None, :]).sum(-1) / np.maximum(sq.sum(-1), 1e-12)  # [level, feature]
    # the same ratio with the sum over represented features only (a diagnostic, not the paper's
    # D_i): how far the unrepresented background moves D_i
    D_rep_only = [np.asarray(sp.feature_dimensionality(W[i][rep[i]])) for i in range(len(probs))]
    levels = []
    for i, p in enumerate(probs):
        Di = D[i][rep[i]]
        levels.append({
            "D_median": float(np.median(Di)) if Di.size else None,
            "D_over_represented_only_median": (float(np.median(D_rep_only[i])) if Di.size
                                               else None),
            "feature_probability": float(p), "steps": int(steps[i]), "final_loss": float(loss[i]),
            "init_std": float(stds_used[i]),
            # m features with a dimension each, the others dropped with bias E[x]: (n-m) Var(x)
            "dedicated_dimensions_loss": float((n - m) * (p / 3 - p * p / 4)),
            "dimensions_per_feature": float(dpf[i]), "represented": int(rep[i].sum()),
            "D_near": {k: int(np.sum(np.abs(Di - v) < tol)) for k, v in sp.STICKY_FRACTIONS.items()},
            "unrepresented_mean_norm": float(norms[i][~rep[i]].mean()) if (~rep[i]).any() else 0.0,
            "unrepresented_share_of_denominator": (float(weak_share[i][rep[i]].mean())
                                                   if rep[i].any() else None)})
    rep_D = D[rep]
    hist, edges = np.histogram(rep_D, bins=88, range=(0.0, 1.1))
    return ({"n_features": n, "n_hidden": m, "importance": "uniform", "batch_size": s["batch"],
             "init_std": init_std, "weight_decay": sp.ToyModelConfig().weight_decay,
             "lr": f"{s['lr']:g}, cosine decay to 0", "groups": s["groups"], "levels": levels,
             "represented_D_total": int(rep_D.size), "tolerance": tol, "fractions": clusters,
             "fractions_found": [k for k, c in clusters.items() if c["cluster"]],
             "D_histogram": {"counts": hist.tolist(), "edges": np.round(edges, 4).tolist()}},
            {"probs": probs, "D": D, "norms": norms, "dpf": dpf, "clusters": clusters, "tol": tol})


# --------------------------------------------------------------------------------------------
# Output


def _figures(out: Path, arrays: dict) -> list[tuple[str, str]]:
    from tinyinterp.plotting import superposition as P

    a = arrays["pentagon"]
    labels = [f"1-S = {p:g}" for p in a["probs"]]
    figs = [
        ("pentagon_wtw_bias.png", "W W^T and biases, n=5, m=2 (best seed per sparsity)",
         P.plot_wtw_and_bias(a["W"], a["b"], labels,
                             "n=5, m=2, importance 0.9^i: W W^T (top) and bias (bottom)")),
        ("pentagon_directions.png", "Feature directions in the hidden plane, n=5, m=2",
         P.plot_hidden_directions(a["W"], labels, "n=5, m=2: W_i in the 2-D hidden space")),
    ]
    c = arrays["counts"]
    clabels = [f"1-S={p:.2g}" for p in c["probs"]]
    figs += [
        ("counts_norm_bars.png", "Feature norms coloured by interference, n=20, m=5",
         P.plot_feature_norm_bars(c["W"], clabels,
                                  "n=20, m=5, importance 0.7^i: ||W_i|| coloured by interference")),
        ("counts_represented.png", "Represented features against sparsity, n=20, m=5",
         P.plot_represented_counts(c["probs"], c["counts"], 5, 20,
                                   c["extended"] if np.isfinite(c["extended"]).any() else None)),
    ]
    ph = arrays["phase"]
    figs.append(("phase_diagram.png", "Phase diagram, n=2, m=1",
                 P.plot_phase_diagram(ph["regimes"], ph["importance"], ph["density"])))
    g = arrays["geometry"]
    figs += [
        ("dimensions_per_feature.png", "Dimensions per feature against sparsity",
         P.plot_dimensions_per_feature(g["probs"], g["dpf"])),
        ("feature_dimensionality.png", "Feature dimensionality D_i with sticky fractions",
         P.plot_feature_dimensionality(g["probs"], g["D"], g["norms"], g["dpf"],
                                       clusters=g["clusters"], tol=g["tol"])),
    ]
    for name, _, fig in figs:
        save_figure(fig, out / name)
    return [(name, caption) for name, caption, _ in figs]


def _summary(report: dict) -> list[str]:
    lines = []
    pe = report["pentagon"]
    for lv in pe["levels"]:
        lines.append(
            f"n=5, m=2 at 1-S={lv['feature_probability']:g}: best seed (lowest loss, index "
            f"{lv['best_seed_index']} of {pe['seeds_per_level']}) is '{lv['best_geometry']}'; "
            f"all seeds: {lv['geometry_counts']}.")
    lines.append("Dense: the dropped features' biases are "
                 f"{[round(v, 2) for v in pe['dense_dropped_bias']]} (E[x] = 0.5).")
    co = report["counts"]
    txt = ", ".join(f"{lv['feature_probability']:.2g}: {lv['represented']}" for lv in co["levels"])
    lines.append(f"n=20, m=5: represented features by 1-S: {txt}.")
    not_conv = [lv for lv in co["levels"] if not lv.get("converged_at_reference_steps", True)]
    ext = [lv for lv in co["levels"] if "represented_after_extra_steps" in lv]
    if ext:
        lines.append(
            "After " + str(co["extra_steps"]) + " extra steps at the sparsest levels: "
            + ", ".join(f"{lv['feature_probability']:.2g}: {lv['represented_after_extra_steps']}"
                        for lv in ext)
            + (f"; the count changed (not converged at {co['steps']} steps) at: "
               + ", ".join(f"{lv['feature_probability']:.2g}" for lv in not_conv)
               if not_conv else "; the counts did not change (converged in this sense)."))
    gaps = [f"{lv['feature_probability']:.2g}" for lv in co["levels"]
            if not lv["least_important_last"]]
    lines.append("The represented set is the most important features first at every level"
                 if not gaps else
                 "The represented set is the most important features first except at 1-S = "
                 + ", ".join(gaps) + " (one feature skipped; see report.json)")
    ph = report["phase"]
    lines.append(f"Phase diagram (n=2, m=1; per cell the lowest-loss of {ph['seeds_per_cell']} "
                 f"seeds): regime counts {ph['regime_counts']}; "
                 f"{ph['fraction_of_seeds_agreeing_with_best']:.0%} of all seeds agree with it.")
    ge = report["geometry"]
    dp = ", ".join(f"{lv['feature_probability']:.2g}: {lv['dimensions_per_feature']:.2f}"
                   for lv in ge["levels"])
    lines.append(f"Uniform importance n={ge['n_features']}, m={ge['n_hidden']}: dimensions per "
                 f"feature D* = m / ||W||_F^2 by 1-S: {dp}.")
    near1 = [f"{lv['feature_probability']:.2g}" for lv in ge["levels"]
             if abs(lv["dimensions_per_feature"] - 1.0) < 0.05]
    near_half = [f"{lv['feature_probability']:.2g}" for lv in ge["levels"]
                 if abs(lv["dimensions_per_feature"] - 0.5) < 0.05]
    lines.append(f"D* within 0.05 of 1 at 1-S = {', '.join(near1) or 'none'}; "
                 f"within 0.05 of 1/2 at 1-S = {', '.join(near_half) or 'none'}.")
    fr, tol = ge["fractions"], ge["tolerance"]
    counts = "; ".join(f"{k} ({c['shape']}): {c['near']} [{c['below']} / {c['above']}]"
                       for k, c in fr.items())
    lines.append(f"Feature dimensionality D_i of the {ge['represented_D_total']} represented "
                 f"features (all levels): within {tol:g} of each fraction [in the windows of the "
                 f"same width just below / above]: {counts}.")
    found = ge["fractions_found"]
    missing = [k for k in fr if k not in found]
    lines.append("Clusters (>= 5 features and at least twice the mean of the adjacent windows that "
                 "do not overlap another fraction's; 2/5 and 3/8 lie 2 tol apart, so each is "
                 "compared with its outer window): "
                 f"{', '.join(found) or 'none'}; no cluster at {', '.join(missing) or '-'}.")
    trans = [lv for lv in ge["levels"]
             if 0.55 < lv["dimensions_per_feature"] < 0.95 and lv["represented"]]
    missing_high = [k for k in ("1", "3/4", "2/3") if k in missing]
    if trans and missing_high:
        lines.append(
            f"Why no line at {', '.join(missing_high)}: where D* moves from 1 to 1/2 the features "
            "that are not represented keep small norms and leak into the represented ones: at "
            "1-S = " + "; ".join(
                f"{lv['feature_probability']:.2g}: unrepresented mean ||W_j|| "
                f"{lv['unrepresented_mean_norm']:.2f}, "
                f"{lv['unrepresented_share_of_denominator']:.0%} of the denominator, median D_i "
                f"{lv['D_median']:.2f} ({lv['D_over_represented_only_median']:.2f} with the sum "
                "over represented features only)" for lv in trans) + ".")
        # with no gradient, AdamW's decoupled decay alone shrinks W_j by exp(-wd * sum_t lr_t)
        # (sum_t lr_t = lr * steps / 2 under a cosine decay to 0); E||W_j|| at init ~ std sqrt(m)
        lr0 = float(ge["lr"].split(",")[0])
        sq_m = math.sqrt(ge["n_hidden"])
        lines.append(
            "This background is set by training, not by the init: ||W_j|| starts near init std "
            "x sqrt(m), and weight decay alone would leave " + ", ".join(
                f"{lv['init_std'] * sq_m * math.exp(-ge['weight_decay'] * lr0 * lv['steps'] / 2):.2f}"
                f" at 1-S = {lv['feature_probability']:.2g} (from "
                f"{lv['init_std'] * sq_m:.2f}; measured {lv['unrepresented_mean_norm']:.2f})"
                for lv in trans) + ".")
        pulled = [lv for lv in trans
                  if lv["D_over_represented_only_median"] - lv["D_median"] > 0.05]
        if pulled:
            lines.append(
                "At 1-S = " + ", ".join(f"{lv['feature_probability']:.2g}" for lv in pulled)
                + " this background moves the represented features' D_i down by "
                + ", ".join(f"{lv['D_over_represented_only_median'] - lv['D_median']:.2f}"
                            for lv in pulled)
                + " (medians)"
                + ("; among the represented features alone they nearly have a dimension each "
                   "(median >= 0.9), so these are dedicated dimensions kept off the line at 1"
                   if all(lv["D_over_represented_only_median"] >= 0.9 for lv in pulled) else "")
                + ". (Measured separately, see DENSE_NOTE in the source: the background is part "
                "of the optimum, not slow convergence; at 1-S = 0.73 removing its component along "
                "the represented features raises the loss by 2%, and zeroed it grows back.)")
    if "1" in missing or "3/4" in missing:
        lines.append(
            "The reference code gives the same: the notebook's experiment written in PyTorch and "
            "run on this machine (n=200, m=20, its init, AdamW, batch 1024, 10k steps; seeds 0 "
            "and 1) has no D_i within 1/80 of 1 or 3/4 either, the largest being 0.720 and 0.721 "
            "(DENSE_NOTE in the source).")
    if "3/4" in missing and fr["3/4"]["below"] > 2 * fr["3/4"]["near"]:
        c = fr["3/4"]
        lines.append(
            f"3/4: {c['near']} D_i within {tol:g} of it but {c['below']} in the window just "
            "below: at the transition levels the D_i spread between 2/3 and 3/4 instead of "
            "sitting at 3/4 (no tetrahedra); a finer grid of levels (1-S = 0.84 ... 0.66) with "
            "the notebook's setup and 20k steps does the same (DENSE_NOTE).")
    dense = [lv for lv in ge["levels"]
             if lv["dimensions_per_feature"] > 0.98 and lv["represented"] < ge["n_hidden"]]
    if dense:
        gap = max(abs(lv["final_loss"] / lv["dedicated_dimensions_loss"] - 1) for lv in dense)
        lines.append(
            "Dense levels: " + "; ".join(
                f"1-S = {lv['feature_probability']:.2g}: {lv['represented']} represented, D* "
                f"{lv['dimensions_per_feature']:.2f}, training loss {lv['final_loss']:.2f} against "
                f"{lv['dedicated_dimensions_loss']:.2f} for m features with a dimension each"
                for lv in dense)
            + ". With uniform importance and dense data every rank-m projection fits about as "
            f"well as dedicated dimensions (the same loss to within {gap:.2%} here), and training from "
            "a random init spreads the m dimensions over all features (D_i ~ ||W_i||^2 ~ m/n), "
            "so dense data gives no D_i = 1. (Measured separately, see DENSE_NOTE in the source: "
            "started from the dedicated solution, training keeps those features but grows the "
            "same small background, which puts their D_i at 0.63-0.75 rather than 1.)")
    return lines


def _markdown(report: dict, figures: list[tuple[str, str]], summary: list[str]) -> str:
    md = ["# Toy Models of Superposition: reproduction", "",
          f"seed {report['seed']}, {'quick (reduced) run' if report['quick'] else 'full run'}, "
          f"{report['wall_time_s']:.1f} s wall. Data: each feature is 0 with probability S, else "
          "uniform on [0, 1). Model ReLU(W^T W x + b), AdamW (weight decay 0.01), xavier-normal "
          "init; lr 1e-3 constant except the uniform-importance sweep (see its section). "
          "Numbers: report.json.", "", "## Findings", ""]
    md += [f"- {s}" for s in summary]
    md += ["", "## n=5, m=2 per sparsity and seed", "",
           "| 1-S | seed | loss | represented | geometry |", "|---|---|---|---|---|"]
    for lv in report["pentagon"]["levels"]:
        for r in lv["runs"]:
            star = " (best)" if r["seed_index"] == lv["best_seed_index"] else ""
            md.append(f"| {lv['feature_probability']:g} | {r['seed_index']}{star} | "
                      f"{r['final_loss']:.4f} | {len(r['represented'])} | {r['geometry']} |")
    md += ["", "## n=20, m=5 represented features", "",
           "| 1-S | represented | after extra steps | dims/feature |", "|---|---|---|---|"]
    for lv in report["counts"]["levels"]:
        md.append(f"| {lv['feature_probability']:.3g} | {lv['represented']} | "
                  f"{lv.get('represented_after_extra_steps', '')} | "
                  f"{lv['dimensions_per_feature']:.3f} |")
    ge = report["geometry"]
    fr_names = list(ge["fractions"])
    nb_levels = [lv["feature_probability"] for lv in ge["levels"]
                 if lv["init_std"] != ge["init_std"]]
    md += ["", f"## Uniform importance, n={ge['n_features']}, m={ge['n_hidden']}", "",
           "Setup against the reference notebook's feature-geometry run (n=200, m=20, importance "
           "1, 20 levels 1-S = 20^-linspace(0, 1, 20), batch 1024, 10,000 steps, AdamW lr 1e-3 "
           f"constant): same model and data, but batch {ge['batch_size']}, lr {ge['lr']}, "
           f"{len(ge['levels'])} levels placed where D* sits on a plateau (fewer steps) or moves "
           "between plateaus (more steps), to fit the 60 s goal for the whole command; and "
           "xavier-normal init per instance (std sqrt(2/(n+m))), where the notebook's "
           "xavier_normal_ over its joint [20, 200, 20] tensor gives std sqrt(2/4400) ~ 0.021 "
           "(measured with that std, seeds 0-2: the same unrepresented background, no cluster at "
           "1 or 3/4, and no cluster at 2/5 either; see INIT_NOTE in the source)"
           + (", except at 1-S = " + ", ".join(f"{p:.2g}" for p in nb_levels)
              + ", which start from the notebook's std: from the larger one they stall at a loss "
              "well above the reference (DENSE_NOTE in the source)" if nb_levels else "") + ". "
           "'dedicated-dims loss' = (n-m) Var(x), the loss of m features with a dimension each "
           "and the rest dropped. "
           f"D_i counts: represented features (||W_i|| > 0.5), within {ge['tolerance']:g} of the "
           "fraction.", "",
           "| 1-S | steps | loss | dedicated-dims loss | D* | represented | "
           + " | ".join(fr_names)
           + " | median D_i (represented only) | unrepresented share of the denominator |",
           "|---" * (8 + len(fr_names)) + "|"]
    for lv in ge["levels"]:
        share = lv["unrepresented_share_of_denominator"]
        med = ("" if lv["D_median"] is None else
               f"{lv['D_median']:.2f} ({lv['D_over_represented_only_median']:.2f})")
        md.append(f"| {lv['feature_probability']:.3g} | {lv['steps']} | {lv['final_loss']:.2f} | "
                  f"{lv['dedicated_dimensions_loss']:.2f} | "
                  f"{lv['dimensions_per_feature']:.3f} | {lv['represented']} | "
                  + " | ".join(str(lv["D_near"][k]) for k in fr_names)
                  + f" | {med} | {'' if share is None else f'{share:.0%}'} |")
    md += ["", "| fraction | geometry | near | window below | window above | compared with | "
           "cluster |", "|---|---|---|---|---|---|---|"]
    for k, c in ge["fractions"].items():
        md.append(f"| {k} | {c['shape']} | {c['near']} | {c['below']} | {c['above']} | "
                  f"{' and '.join(c['compared_with'])} | {'yes' if c['cluster'] else 'no'} |")
    md += ["", "## Figures", ""]
    for name, caption in figures:
        md += [f"### {caption}", "", f"![{caption}]({name})", ""]
    return "\n".join(md) + "\n"


EXPERIMENTS = (("pentagon", exp_pentagon), ("counts", exp_counts), ("phase", exp_phase),
               ("geometry", exp_geometry))


def run(out_dir, *, seed: int = 0, quick: bool = False, verbose: bool = True,
        workers: int | None = None, devices=None) -> dict:
    """Run the four experiments, write report.json / report.md / PNGs into ``out_dir``, print a
    plain-words summary and return the report dict.

    ``workers`` (default: 2 if the machine has 2 or more cores, else 1): with 2, the
    uniform-importance sweep (the largest single piece) trains in a second thread while the other
    three run one after another in this one. Each experiment is one XLA computation at a time
    that uses about one core, so on an idle 2-core machine this nearly halves the wall time; the
    results are identical either way (each experiment depends only on its own key).
    ``devices`` (a count, a Mesh or a list of devices): each experiment's instances split over
    several devices or hosts (``tinyinterp.sweeps``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = settings(quick)
    key = jax.random.key(seed)
    if workers is None:
        workers = 2 if (os.cpu_count() or 1) >= 2 else 1
    t0 = time.perf_counter()
    report = {"seed": seed, "quick": quick, "settings": s, "workers": workers, "timings_s": {}}
    arrays = {}

    def one(i, name, fn):
        t = time.perf_counter()
        result = fn(jax.random.fold_in(key, i), {**s[name], "devices": devices})
        report["timings_s"][name] = time.perf_counter() - t
        if verbose:
            print(f"[superposition] {name}: {report['timings_s'][name]:.1f} s", flush=True)
        return result

    jobs = list(enumerate(EXPERIMENTS))
    background = None
    pool = None
    if workers >= 2:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        i, (name, fn) = jobs.pop()  # geometry
        background = (name, pool.submit(one, i, name, fn))
    try:
        for i, (name, fn) in jobs:
            report[name], arrays[name] = one(i, name, fn)
        if background is not None:
            name, future = background
            report[name], arrays[name] = future.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    report["wall_time_s"] = time.perf_counter() - t0  # training (figures not included)
    report["timings_s"] = {name: report["timings_s"][name] for name, _ in EXPERIMENTS}
    t = time.perf_counter()
    figures = _figures(out, arrays)
    report["timings_s"]["figures"] = time.perf_counter() - t
    return write_report(out, report, figures, _summary, _markdown, verbose=verbose)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reproduce_superposition", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="base seed (instances fold it in)")
    parser.add_argument("--quick", action="store_true", help="reduced but real run")
    parser.add_argument("--workers", type=int, default=None,
                        help="2: train the uniform-importance sweep in a second thread (default "
                             "when the machine has 2+ cores); 1: everything in one thread")
    from tinyinterp.sweeps import add_devices_argument

    add_devices_argument(parser)


def main(args: argparse.Namespace) -> int:
    run(args.out, seed=args.seed, quick=args.quick, workers=args.workers,
        devices=getattr(args, "devices", 1))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
