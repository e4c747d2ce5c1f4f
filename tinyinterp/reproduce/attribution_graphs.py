"""`tinyinterp reproduce attribution-graphs`: a two-hop lookup traced through attribution graphs,
the toy counterpart of the Dallas -> Texas -> Austin experiment (Lindsey et al. 2025; method of
Ameisen et al. 2025).

The task: a prompt "x r1 r2" (3 tokens) asks for r2(r1(x)). 32 entities x; 4 first relations r1
map them to 8 intermediate entities (each intermediate has 4 preimages under each r1: x's
identity matters only through r1(x)); 4 second relations r2 map intermediates to 8 answers.
The model is trained next-token style on both hops (position 1 predicts r1(x), position 2
predicts r2(r1(x))) on 75% of the 512 prompts; the other 25% are held out. On a held-out prompt
the model has never seen (x, r1, r2) together, so memorising the triple is impossible: answering
needs r2 applied to the intermediate.

Then: cross-layer transcoders on the model's MLP activations, and per-layer JumpReLU
transcoders with a skip for comparison (per-layer report: normalised MSE, L0, dead fraction,
predictions kept with the transcoders in place of the MLPs); an attribution
graph, pruned, for every held-out prompt the model answers correctly; and two measurements:

1. does a feature on the graph's path encode the intermediate? For the most influential
   layer-0 feature at r1's position on each graph, how well its activation identifies r1(x) on
   the held-out prompts (precision and recall of "active" for "r1(x) is its entity").
2. does swapping it change the answer to r2(other)? The features of the intermediate (at r1's
   position) are suppressed and those of another intermediate injected at their typical
   activation, through the real MLPs (unconstrained) and with attention frozen and layer 0
   constrained; the new answer is compared with r2(other).

``run(out_dir, seed=0, quick=False)`` writes report.json, report.md, graph JSON files, HTML graph
views and PNG figures. ``quick=True`` is a reduced but real run (tests).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tinyinterp import graphs
from tinyinterp import transcoders as T
from tinyinterp.reproduce._io import json_safe, save_figure, write_atomic, write_report

N_X, N_C, N_A, N_R1, N_R2 = 32, 8, 8, 4, 4
X0, C0, A0, Q0, S0 = 0, N_X, N_X + N_C, N_X + N_C + N_A, N_X + N_C + N_A + N_R1
VOCAB = S0 + N_R2


def token_labels() -> list[str]:
    return ([f"x{i}" for i in range(N_X)] + [f"C{i}" for i in range(N_C)]
            + [f"A{i}" for i in range(N_A)] + [f"r{i}" for i in range(N_R1)]
            + [f"s{i}" for i in range(N_R2)])


def make_task(seed: int) -> dict:
    """The two-hop facts and the prompts [x, r1, r2, r1(x), r2(r1(x))], split 75 / 25."""
    rng = np.random.default_rng(seed)
    f1 = np.stack([rng.permutation(np.repeat(np.arange(N_C), N_X // N_C)) for _ in range(N_R1)])
    f2 = np.stack([rng.permutation(N_A) for _ in range(N_R2)])  # [r2, intermediate] -> answer
    rows = np.array([(x, Q0 + a, S0 + b, C0 + f1[a, x], A0 + f2[b, f1[a, x]])
                     for x in range(N_X) for a in range(N_R1) for b in range(N_R2)], np.int32)
    held = rng.random(len(rows)) < 0.25
    return {"f1": f1, "f2": f2, "train": rows[~held], "test": rows[held]}


def train_model(task: dict, steps: int, seed: int):
    """A 2-layer LN transformer with ReLU MLPs, trained on both hops of the training prompts."""
    import tinyinterp
    from tinyinterp.model import forward
    from tinyinterp.train import standard_promotion

    cfg = tinyinterp.TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128,
                                       d_vocab=VOCAB, n_ctx=3, act_fn="relu")
    model = tinyinterp.HookedTransformer.from_config(cfg, seed=seed)
    opt = standard_promotion(optax.adamw(3e-3, weight_decay=0.1))
    data = jnp.asarray(task["train"])

    def loss(p):
        logits = forward(p, cfg, data[:, :3])  # [prompt, pos, vocab]
        ce = optax.softmax_cross_entropy_with_integer_labels
        return jnp.mean(ce(logits[:, 2], data[:, 4])) + jnp.mean(ce(logits[:, 1], data[:, 3]))

    @jax.jit
    def fit(p, s):
        def step(c, _):
            p, s = c
            v, g = jax.value_and_grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), v
        return jax.lax.scan(step, (p, s), None, length=steps)

    (params, _), losses = fit(model.params, opt.init(model.params))
    return model.with_params(params), np.asarray(losses)


def _answers(model, rows: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.argmax(model(jnp.asarray(rows[:, :3]))[:, -1], -1))


def selectivity(model, tc, rows: np.ndarray) -> np.ndarray:
    """[feature, intermediate]: the mean activation of each layer-0 feature at r1's position
    (pos 1) over the prompts with each intermediate."""
    xs, _ = T.collect_mlp_io(model, rows[:, :3])
    acts = np.asarray(tc.encode(0, jnp.asarray(xs[0]))[1]).reshape(len(rows), 3, -1)[:, 1]
    mid = rows[:, 3] - C0
    return np.stack([acts[mid == c].mean(axis=0) for c in range(N_C)], axis=1), acts


def run(out_dir, *, seed: int = 0, quick: bool = False, verbose: bool = True,
        devices=None) -> dict:
    """The two-hop reproduction into ``out_dir``. ``devices`` (a count, a Mesh or a list of
    devices; the CLI's ``--devices N``): the per-layer transcoders' layers split over them
    (``tinyinterp.sweeps``)."""
    from tinyinterp.views import graph_view

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = dict(model_steps=250 if quick else 400, clt_features=48 if quick else 64,
             clt_steps=500 if quick else 1500, sparsity=0.3, max_graphs=4 if quick else 40)
    task = make_task(seed)
    model, losses = train_model(task, s["model_steps"], seed)
    acc_train = float(np.mean(_answers(model, task["train"]) == task["train"][:, 4]))
    ans_test = _answers(model, task["test"])
    acc_test = float(np.mean(ans_test == task["test"][:, 4]))
    t_model = time.perf_counter() - t0
    if verbose:
        print(f"[graphs] model: train accuracy {acc_train:.3f}, held-out {acc_test:.3f} "
              f"({t_model:.0f} s)", flush=True)

    # cross-layer transcoders on every position of the training prompts
    xs, ys = T.collect_mlp_io(model, task["train"][:, :3])
    clt_cfg = T.CLTConfig(n_features=s["clt_features"], n_steps=s["clt_steps"], batch_size=256,
                          sparsity=s["sparsity"], lr=3e-3, chunk_size=s["clt_steps"])
    tc, hist = T.train_clt(xs, ys, clt_cfg, seed=seed)
    tc_report = T.evaluate(model, tc, task["test"][:, :3])
    # for comparison: per-layer JumpReLU transcoders with a skip connection, same data
    plt = T.train_transcoders(xs, ys, s["clt_features"], architecture="jumprelu", skip=True,
                              l0_coefficient=1e-3, n_steps=s["clt_steps"], batch_size=256,
                              resample_every=0, chunk_size=s["clt_steps"], lr=3e-3, seed=seed,
                              devices=devices)
    plt_report = T.evaluate(model, plt, task["test"][:, :3])
    if verbose:
        for row in tc_report["layers"]:
            print(f"[graphs] CLT layer {row['layer']}: normalised MSE {row['normalized_mse']:.4f}, "
                  f"L0 {row['l0']:.1f}, dead {row['dead_fraction']:.3f}", flush=True)
        print(f"[graphs] predictions kept with the CLT in place of the MLPs: "
              f"{tc_report['prediction_agreement']:.3f}", flush=True)

    # graphs of held-out prompts the model answers correctly
    sel_train, _ = selectivity(model, tc, task["train"])  # [feature, intermediate]
    pref = np.argmax(sel_train, axis=1)  # each feature's intermediate
    ok = np.nonzero(ans_test == task["test"][:, 4])[0][: s["max_graphs"]]
    _, acts_test = selectivity(model, tc, task["test"])  # [prompt, feature] at pos 1
    mid_test = task["test"][:, 3] - C0
    path, per_prompt, scores = [], [], []
    for k, i in enumerate(ok):
        row = task["test"][i]
        g = graphs.attribution_graph(model, tc, row[:3])
        pr = graphs.prune_graph(g)
        sc = graphs.graph_scores(g)
        scores.append((sc.replacement, sc.completeness))
        cand = [n for n in pr.nodes if n < g.n_features and g.active_features[n, 0] == 0
                and g.active_features[n, 1] == 1]
        best = max(cand, key=lambda n: pr.influence[n]) if cand else None
        f = int(g.active_features[best, 2]) if best is not None else None
        path.append(f)
        per_prompt.append({"prompt": row[:3].tolist(), "intermediate": int(row[3]),
                           "answer": int(row[4]), "n_features": g.n_features,
                           "kept_nodes": int(pr.node_mask.sum()),
                           "kept_edges": int(pr.edge_mask.sum()), "replacement": sc.replacement,
                           "completeness": sc.completeness, "path_feature": f,
                           "path_feature_intermediate": None if f is None else int(pref[f])})
        if k < 2:
            labels = token_labels()
            slug = f"graph_{'_'.join(labels[t] for t in row[:3])}"
            graphs.save_graph_json(out / f"{slug}.json", pr, slug=slug, token_labels=labels)
            feats = {(int(a), int(b)) for a, _, b in g.active_features[pr.nodes[pr.nodes <
                                                                               g.n_features]]}
            ex = graphs.feature_examples(model, tc, task["train"][:, :3], feats, n_examples=4,
                                         context=2)
            graph_view(pr, examples=ex, token_labels=labels,
                       title=f"{' '.join(labels[t] for t in row[:3])} -> "
                             f"{labels[row[4]]} (via {labels[row[3]]})").save(out / f"{slug}.html")

    # 1. does the path feature encode the intermediate? (held-out prompts)
    enc = []
    for f in sorted({f for f in path if f is not None}):
        active = acts_test[:, f] > 0
        is_mid = mid_test == pref[f]
        tp = int(np.sum(active & is_mid))
        enc.append({"feature": f, "intermediate": int(pref[f]),
                    "precision": tp / max(1, int(active.sum())),
                    "recall": tp / max(1, int(is_mid.sum())),
                    "n_prompts": int(len(mid_test))})
    # 2. swap: suppress the intermediate's features at pos 1, inject another's (mean activation)
    typical = np.stack([np.where(sel_train[:, c] > 0, sel_train[:, c], 0.0) for c in range(N_C)])
    swaps = {"unconstrained": [], "constrained_layer0_frozen_attention": []}
    for i in ok:
        row = task["test"][i]
        c = int(row[3] - C0)
        b = int(row[2] - S0)
        other = next(o for o in ((c + j) % N_C for j in range(1, N_C))
                     if task["f2"][b, o] != task["f2"][b, c])
        supp = [graphs.FeatureIntervention(0, 1, int(f), value=0.0)
                for f in np.nonzero((pref == c) & (acts_test[i] > 0))[0]]
        inj = [graphs.FeatureIntervention(0, 1, int(f), value=float(typical[other, f]))
               for f in np.nonzero((pref == other) & (typical[other] > 0))[0]]
        want = A0 + int(task["f2"][b, other])
        for mode, kw in (("unconstrained", {}),
                         ("constrained_layer0_frozen_attention", {"constrained_layers": (0, 1)})):
            r = graphs.intervene(model, tc, row[:3], supp + inj, **kw)
            swaps[mode].append(int(np.argmax(r.logits[-1])) == want)
    swap_rate = {m: float(np.mean(v)) if v else float("nan") for m, v in swaps.items()}
    report = {
        "seed": seed, "quick": quick, "settings": s,
        "task": {"n_entities": N_X, "n_intermediates": N_C, "n_answers": N_A, "n_r1": N_R1,
                 "n_r2": N_R2, "n_train": int(len(task["train"])), "n_test": int(len(task["test"]))},
        "model": {"train_accuracy": acc_train, "held_out_accuracy": acc_test,
                  "final_loss": float(losses[-1])},
        "transcoders": {"kind": "cross-layer JumpReLU", **tc_report,
                        "final_loss": float(hist["loss"][-1])},
        "per_layer_transcoders": {"kind": "per-layer JumpReLU with skip", **plt_report},
        "graphs": {"n": len(ok), "mean_replacement": float(np.mean([r for r, _ in scores]))
                   if scores else None,
                   "mean_completeness": float(np.mean([c for _, c in scores])) if scores else None,
                   "prompts": per_prompt,
                   "path_feature_found": int(sum(f is not None for f in path))},
        "intermediate_encoding": enc,
        "path_feature_matches_intermediate": float(np.mean(
            [p["path_feature_intermediate"] == p["intermediate"] - C0 for p in per_prompt
             if p["path_feature"] is not None])) if any(f is not None for f in path) else None,
        "swap_success": swap_rate, "n_swaps": len(ok),
    }
    report["wall_time_s"] = time.perf_counter() - t0
    figs = _figures(report, sel_train, pref, tc_report)
    for name, _, fig in figs:
        save_figure(fig, out / name)
    write_atomic(out / "graphs.json", json.dumps(json_safe(per_prompt), indent=1))
    return write_report(out, report, [(n, c) for n, c, _ in figs], _summary, _markdown,
                        verbose=verbose)


def _figures(report, sel, pref, tc_report):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    order = np.argsort(pref, kind="stable")
    norm = sel[order] / np.maximum(sel[order].max(axis=1, keepdims=True), 1e-9)
    im = ax.imshow(norm.T, aspect="auto", cmap="Oranges")
    ax.set_xlabel("layer-0 feature (sorted by its intermediate)")
    ax.set_ylabel("intermediate r1(x)")
    ax.set_yticks(range(N_C), [f"C{i}" for i in range(N_C)])
    fig.colorbar(im, ax=ax, label="mean activation at r1's position / max")
    fig2 = Figure(figsize=(6, 3))
    ax = fig2.add_subplot(1, 2, 1)
    layers = [r["layer"] for r in tc_report["layers"]]
    ax.bar(layers, [r["normalized_mse"] for r in tc_report["layers"]], color="#d95f02")
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised MSE")
    ax.set_xticks(layers)
    ax = fig2.add_subplot(1, 2, 2)
    modes = list(report["swap_success"])
    ax.bar(range(len(modes)), [report["swap_success"][m] for m in modes], color="#7570b3")
    ax.set_xticks(range(len(modes)), ["real MLPs", "L0 constrained"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("answer -> r2(other)")
    fig2.tight_layout()
    return [("intermediate_features.png", "Layer-0 CLT features at r1's position: mean "
             "activation per intermediate entity (training prompts)", fig),
            ("transcoders_and_swaps.png", "CLT reconstruction error per layer; share of swaps "
             "that change the answer to r2(other)", fig2)]


def _summary(r: dict) -> list[str]:
    m, t, g = r["model"], r["transcoders"], r["graphs"]
    lines = [f"Two-hop lookup (x r1 r2 -> r2(r1(x))): the model answers {m['held_out_accuracy']:.1%}"
             f" of the {r['task']['n_test']} held-out prompts ({m['train_accuracy']:.1%} of the "
             "training prompts)."]
    lines.append("Cross-layer transcoders: " + "; ".join(
        f"layer {x['layer']} normalised MSE {x['normalized_mse']:.3f}, L0 {x['l0']:.1f}, dead "
        f"{x['dead_fraction']:.2f}" for x in t["layers"])
        + f"; with them in place of the MLPs (no error terms) {t['prediction_agreement']:.1%} of "
          "the next-token predictions are kept.")
    pl = r["per_layer_transcoders"]
    lines.append("Per-layer JumpReLU transcoders with a skip connection: " + "; ".join(
        f"layer {x['layer']} normalised MSE {x['normalized_mse']:.3f}, L0 {x['l0']:.1f}, dead "
        f"{x['dead_fraction']:.2f}" for x in pl["layers"])
        + f"; predictions kept {pl['prediction_agreement']:.1%}.")
    if g["n"]:
        lines.append(f"{g['n']} graphs of correctly answered held-out prompts: replacement score "
                     f"{g['mean_replacement']:.3f}, completeness {g['mean_completeness']:.3f} "
                     f"(means); a layer-0 feature at r1's position survives pruning in "
                     f"{g['path_feature_found']} of them.")
    if r["path_feature_matches_intermediate"] is not None:
        lines.append(f"The most influential such feature is the one whose preferred entity is the "
                     f"prompt's intermediate r1(x) in {r['path_feature_matches_intermediate']:.1%} "
                     "of the graphs.")
    if r["intermediate_encoding"]:
        p = np.mean([e["precision"] for e in r["intermediate_encoding"]])
        q = np.mean([e["recall"] for e in r["intermediate_encoding"]])
        lines.append(f"On held-out prompts these path features identify their intermediate with "
                     f"mean precision {p:.3f} and recall {q:.3f} "
                     f"({len(r['intermediate_encoding'])} features).")
    sw = r["swap_success"]
    lines.append(f"Swapping the intermediate's features for another entity's changes the answer to "
                 f"r2(other) in {sw['unconstrained']:.1%} of {r['n_swaps']} prompts through the "
                 f"real MLPs and {sw['constrained_layer0_frozen_attention']:.1%} with attention "
                 "frozen and layer 0 constrained.")
    lines.append(f"Wall time {r['wall_time_s']:.0f} s.")
    return lines


def _markdown(r: dict, figures, summary) -> str:
    md = ["# Attribution graphs of a two-hop lookup", "", *summary, "", "## Method", "",
          "Task, model, transcoders and measurements as in `tinyinterp/reproduce/"
          "attribution_graphs.py`'s docstring. Graphs: `tinyinterp.graphs.attribution_graph` "
          "(local replacement model: attention patterns and norm scales frozen, error nodes), "
          "pruned with node threshold 0.8 and edge threshold 0.98. The graph JSON files use the "
          "public attribution-graph frontend's schema; the .html files are self-contained views.",
          "", "## Transcoders (held-out prompts)", "",
          "| transcoders | layer | normalised MSE | L0 | dead fraction | predictions kept |",
          "|---|---|---|---|---|---|"]
    for key in ("transcoders", "per_layer_transcoders"):
        for x in r[key]["layers"]:
            md.append(f"| {r[key]['kind']} | {x['layer']} | {x['normalized_mse']:.4f} | "
                      f"{x['l0']:.2f} | {x['dead_fraction']:.3f} | "
                      f"{r[key]['prediction_agreement']:.3f} |")
    md += ["", "Predictions kept: the fraction of next-token predictions (every position) "
               "unchanged when the transcoders replace the MLPs with no error terms. The graphs "
               "use the cross-layer transcoders.", "",
           "## Path features and the intermediate", "",
           "| feature | intermediate | precision | recall |", "|---|---|---|---|"]
    for e in r["intermediate_encoding"]:
        md.append(f"| {e['feature']} | C{e['intermediate']} | {e['precision']:.3f} | "
                  f"{e['recall']:.3f} |")
    md += ["", "## Figures", ""]
    for name, caption in figures:
        md += [f"### {caption}", "", f"![{caption}]({name})", ""]
    return "\n".join(md) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reproduce_attribution_graphs", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for the task, model and CLT")
    parser.add_argument("--quick", action="store_true", help="reduced but real run")
    from tinyinterp.sweeps import add_devices_argument

    add_devices_argument(parser)


def main(args: argparse.Namespace) -> int:
    run(args.out, seed=args.seed, quick=args.quick, devices=getattr(args, "devices", 1))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
