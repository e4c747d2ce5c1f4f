"""``tinyinterp evaluate-methods``: every attribution and intervention method of the package checked on
models whose ground truth is known, beside two deliberately broken methods the checks must catch.

    from tinyinterp import evaluate
    table = evaluate.evaluate_methods(n_models=3, seed=0)       # {method: {property: value}}
    evaluate.main(["--out", "runs/evaluate"])                   # table.md/json, figure, report.md

Properties (tinyinterp.testing's checks) are measured on drawn ``planted.linear_model``s, where
the right answer is known in closed form: the pass rate of completeness, sensitivity, dummy,
linearity, implementation invariance, input invariance and model randomisation. Recovery (AUROC
of the planted heads among all heads) and deletion AOPC are measured on drawn planted circuits
(induction, copying, duplicate-token heads) and, when tracr is installed, on compiled RASP
programs. The broken methods: ``random_attributions`` (noise from a fixed seed: it never looks
at the model) and ``sign_flipped_gradient_x_input`` (gradient x input whose gradient changes sign
through layer 0's attention output).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tinyinterp import attribution as A
from tinyinterp import testing as T
from tinyinterp.reproduce._io import save_figure, write_atomic

__all__ = ["BROKEN", "METHODS", "PROPERTIES", "evaluate_methods", "head_scores",
           "random_attributions", "sign_flipped_gradient_x_input", "main"]


# ----------------------------------------------------------------------------- broken methods
def random_attributions(model, tokens, metric):
    """Broken on purpose: Gaussian noise [batch, pos, d_model] from a fixed seed."""
    del metric
    b, p = np.shape(tokens)
    return jax.random.normal(jax.random.key(0), (b, p, model.cfg.d_model), jnp.float32)


@jax.custom_vjp
def _flip(x):
    return x


_flip.defvjp(lambda x: (x, None), lambda _, g: (-g,))


def _flipped_grads(model, tokens, metric, names, layer: int = 0):
    """{name: activation}, {name: gradient of sum(metric)} at ``names``, with the gradient's sign
    flipped through blocks.{layer}.hook_attn_out."""
    tokens = jnp.asarray(tokens)
    _, cache = model.run_with_cache(tokens, names_filter=list(names))
    x = {n: cache[n] for n in names}

    def flip(v, *, name):
        del name
        return _flip(v)

    def f(x):
        hooks = [(n, (lambda v, *, name, _n=n: x[_n])) for n in names]
        logits = model.run_with_hooks(tokens, [*hooks, (f"blocks.{layer}.hook_attn_out", flip)])
        return jnp.sum(metric(logits, tokens))

    return x, jax.grad(f)(x)


def sign_flipped_gradient_x_input(model, tokens, metric):
    """Broken on purpose: gradient x input at the embeddings, with the gradient's sign flipped
    through layer 0's attention output (a sign error in one layer's backward pass)."""
    x, g = _flipped_grads(model, tokens, metric, ("hook_embed", "hook_pos_embed"))
    return x["hook_embed"] * g["hook_embed"] + x["hook_pos_embed"] * g["hook_pos_embed"]


# ----------------------------------------------------------------------------- the methods
def _ig(model, tokens, metric, devices=None):
    return A.integrated_gradients(model, tokens, metric, steps=8, devices=devices)


def _occlusion(model, tokens, metric, devices=None):
    return A.occlusion(model, tokens, metric, baseline_token=0, devices=devices)


METHODS: dict[str, Callable] = {
    "saliency": A.saliency,
    "gradient_x_input": A.gradient_x_input,
    "integrated_gradients": _ig,
    "lrp_conservative": lambda m, t, f: A.lrp(m, t, f, rule="conservative"),
    "lrp_attnlrp": lambda m, t, f: A.lrp(m, t, f, rule="attnlrp"),
    "occlusion": _occlusion,
}
BROKEN: dict[str, Callable] = {
    "random (broken)": random_attributions,
    "sign-flipped grad x input (broken)": sign_flipped_gradient_x_input,
}
# What a check cannot see by construction: the broken method has the property it tests. Every
# check catches at least one of the two broken methods, and each is caught by three or more.
BLIND_SPOTS: dict[tuple[str, str], str] = {
    ("random (broken)", "implementation_invariance"):
        "noise from a fixed seed never looks at the model, so equal functions get equal noise",
    ("random (broken)", "input_invariance"):
        "the same: it cannot change with a shift of the embeddings",
    ("sign-flipped grad x input (broken)", "dummy"):
        "a flipped gradient is still zero on the features the output ignores",
    ("sign-flipped grad x input (broken)", "linearity"):
        "a flipped gradient is still linear in the metric",
    ("sign-flipped grad x input (broken)", "model_randomisation"):
        "it still reads every weight, so re-drawing them changes it as it changes a correct one",
}
PROPERTIES = ("completeness", "sensitivity", "dummy", "linearity", "implementation_invariance",
              "input_invariance", "model_randomisation")
COMPONENT_METHODS = ("direct_logit_attribution", "zero_ablation", "attribution_patching")


def head_scores(name: str, model, tokens, metric, devices=None) -> np.ndarray:
    """[n_layers, n_heads] importance of every head by method ``name``: one of
    ``COMPONENT_METHODS``, ``random (broken)`` or ``sign-flipped grad x input (broken)`` (|sum of
    gradient x activation| at hook_z, the gradient sign-flipped through layer 0's attention)."""
    from tinyinterp import patching

    cfg = model.cfg
    tokens = jnp.asarray(tokens)
    zs = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
    if name == "direct_logit_attribution":
        _, cache = model.run_with_cache(tokens)
        return np.abs(np.asarray(A.direct_logit_attribution(cache, metric).per_head())).mean(0)
    if name == "zero_ablation":
        rows = [patching.ablate(model, tokens, metric, z, over=("head",), devices=devices)
                for z in zs]
        return np.stack([np.abs(np.asarray(r.values) - np.asarray(r.baseline)) for r in rows])
    if name == "attribution_patching":  # first order of zero-ablating each head
        _, cache = model.run_with_cache(tokens, names_filter=zs, incl_bwd=True,
                                        metric=lambda lg: jnp.sum(metric(lg, tokens)))
        return np.stack([np.abs(np.asarray(jnp.sum(cache[z] * cache[f"{z}_grad"], axis=(1, 3)))
                                ).mean(0) for z in zs])
    if name == "random (broken)":
        return np.asarray(jax.random.uniform(jax.random.key(0), (cfg.n_layers, cfg.n_heads)))
    if name == "sign-flipped grad x input (broken)":
        x, g = _flipped_grads(model, tokens, metric, tuple(zs))
        return np.stack([np.abs(np.asarray(jnp.sum(x[z] * g[z], axis=(1, 3)))).mean(0)
                         for z in zs])
    raise ValueError(f"unknown head-scoring method {name!r}")


# ----------------------------------------------------------------------------- the evaluation
def _check_all(method, lm, tokens, metric, metric_b) -> dict[str, bool | None]:
    dummy = np.zeros(lm.cfg.d_model, bool)
    dummy[list(lm.ground_truth.info["dummy"])] = True
    per_position_only = getattr(method, "func", method) is _occlusion  # also with devices=
    out = {}
    kw = dict(raise_on_failure=False)
    model = lm.model
    out["completeness"] = T.check_completeness(method, model, tokens, metric, **kw).passed
    out["sensitivity"] = T.check_sensitivity(
        method, model, tokens, metric, baseline=0 if per_position_only else "zeros", **kw).passed
    out["dummy"] = (None if per_position_only or not dummy.any()
                    else T.check_dummy(method, model, tokens, metric, dummy, **kw).passed)
    out["linearity"] = T.check_linearity(method, model, tokens, metric, metric_b, **kw).passed
    out["implementation_invariance"] = T.check_implementation_invariance(
        method, model, tokens, metric, **kw).passed
    out["input_invariance"] = T.check_input_invariance(method, model, tokens, metric, **kw).passed
    out["model_randomisation"] = T.check_model_randomisation(method, model, tokens, metric,
                                                             **kw).passed
    return out


def _circuits(n_models: int, seed: int, with_tracr: bool):
    """[(name, model, tokens, metric, planted head mask or None)] for recovery and deletion AOPC.
    The planted circuits share one config (so compiled programs are reused): 2 layers x 3 heads,
    two planted output subspaces each."""
    from tinyinterp import planted

    rng = np.random.default_rng(seed + 1)
    out = []
    kinds = (["induction"], ["copying", "duplicate_token"], ["previous_token", "copying"])
    for i in range(n_models):
        pm = planted.planted_model(kinds[i % len(kinds)], d_vocab=6, n_ctx=10, n_layers=2,
                                   n_heads=3, distractor_scale=float(rng.uniform(0.1, 0.5)),
                                   seed=int(rng.integers(2**31)), attention_backend="xla")
        period = rng.permutation(6)[:5]
        toks = jnp.asarray(np.stack([np.concatenate([np.roll(period, j), np.roll(period, j)])
                                     for j in range(3)]), jnp.int32)
        target = jnp.asarray(np.argmax(pm.expected_logits(toks)[:, -1], -1), jnp.int32)
        out.append((f"planted {'+'.join(kinds[i % len(kinds)])} #{i}", pm.model, toks,
                    A.logit(target), pm.ground_truth.head_mask()))
    if with_tracr:
        out += _tracr_circuits()
    return out


def _tracr_circuits():
    """A compiled program, the token two positions back (two shift-by-one Aggregates, one per
    layer, the second reading the first's output as its value: V-composition), with two inert
    distractor heads per layer (``interop.with_inert_heads``: they attend and write where nothing
    reads), so recovery has negatives: the program's heads are the planted ones. (A causal sort is
    no use here: its last positions' outputs are empty under causal attention.)"""
    from tinyinterp import interop

    try:
        from tracr.compiler import compiling
        from tracr.rasp import rasp
    except ImportError:
        return []

    def shift(sop):
        prev = rasp.Select(rasp.indices, rasp.indices, lambda k, q: q == k + 1)
        return rasp.categorical(rasp.Aggregate(prev, sop))

    prog = shift(shift(rasp.tokens))
    with jax.numpy_dtype_promotion("standard"):  # tracr's own code mixes int and float
        assembled = compiling.compile_rasp_to_model(prog, vocab={1, 2, 3, 4}, max_seq_len=5,
                                                    compiler_bos="BOS", causal=True)
    conv = interop.with_inert_heads(
        interop.from_tracr(assembled, prog, attention_backend="xla"), 2, seed=0)
    toks = jnp.asarray(conv.encode([["BOS", 3, 1, 4, 2], ["BOS", 2, 4, 3, 1]]))
    target = jnp.asarray(np.argmax(np.asarray(conv.model(toks))[:, -1], -1), jnp.int32)
    return [("tracr token-two-back + inert heads", conv.model, toks, A.logit(target),
             conv.ground_truth.head_mask())]


def _circuit_attributions(methods: dict, circuits, devices) -> dict:
    """{method: [per circuit: (attributions [batch, ...] float64, ms per explanation), or None
    where no other circuit shares its shape]}. The circuits of one shape (config, tokens,
    metric) are stacked on a sweep axis split over ``devices``: each method runs ONCE per group,
    vmapped over the stacked models (``sweeps.map_sweep``; a method's inner sweeps then run
    whole on each device). Each circuit's attributions are computed as alone, so they equal the
    one-device loop's. The time is the group's timed call (compiled first; placing, running,
    fetching) divided by its explanations (circuits x sequences): wall time per explained
    sequence, as on one device, with the devices working at once."""
    out: dict[str, list] = {name: [None] * len(circuits) for name in methods}
    for members, stacked in _circuit_groups(circuits):
        n_explained = len(members) * int(np.shape(circuits[members[0]][2])[0])
        for name, method in methods.items():
            _stacked_attributions(method, stacked, devices)  # compiled before it is timed
            t0 = time.perf_counter()
            a = _stacked_attributions(method, stacked, devices)  # [circuit, batch, ...]
            ms = 1e3 * (time.perf_counter() - t0) / n_explained
            for j, i in enumerate(members):
                out[name][i] = (a[j], ms)
    return out


def _circuit_groups(circuits) -> list[tuple[list[int], tuple]]:
    """[(indices, (models, tokens, metrics) stacked on a leading circuit axis)] for every shape
    (config, tokens, metric) that two or more of ``circuits`` share."""
    groups: dict = {}
    for i, (_, model, toks, metric, _) in enumerate(circuits):
        shape = (model.cfg, jax.tree.structure((model, metric)), jnp.shape(toks),
                 tuple(jnp.shape(x) for x in jax.tree.leaves((model, metric))))
        groups.setdefault(shape, []).append(i)
    return [(members, jax.tree.map(lambda *a: jnp.stack(a), *[
        (circuits[i][1], jnp.asarray(circuits[i][2]), circuits[i][3]) for i in members]))
        for members in groups.values() if len(members) > 1]


def _stacked_attributions(method, stacked, devices) -> np.ndarray:
    """``method`` on stacked circuits (``_circuit_groups``), vmapped over them and split over
    ``devices``: [circuit, batch, ...] float64."""
    from tinyinterp import sweeps

    fn = jax.vmap(functools.partial(_values_of, method))
    return np.asarray(sweeps.map_sweep(fn, stacked, 0, devices, key=("evaluate_methods", method)),
                      np.float64)


def _values_of(method, model, tokens, metric):
    """The array of ``method``'s result (an Attribution's ``values``, or the array itself)."""
    out = method(model, tokens, metric)
    return getattr(out, "values", out)


def evaluate_methods(n_models: int = 3, seed: int = 0, with_tracr: bool = True,
                     devices=None) -> dict:
    """{"properties": {method: {property: pass rate or None}}, "recovery": {method: mean AUROC},
    "aopc": {method: mean deletion AOPC}, "time_ms": {method: median ms per explanation},
    "n_models": ..., "circuits": [names]}.

    ``devices`` (a count, a Mesh or a list of devices) splits work over several devices or hosts
    (``tinyinterp.sweeps``); one device (the default) runs everything in turn, as always:
    - the circuits (recovery and AOPC): every method's attributions on the circuits of one
      shape (the planted circuits share one config) run as ONE program over the stacked
      circuits, split over the devices (``_circuit_attributions``); the time per explanation is
      then the group's call divided by its explanations. A circuit alone in its shape (the
      tracr program) runs in turn, its methods' inner sweeps split.
    - what stays in turn, per model or circuit: the property checks (host-side logic: each
      check builds its own model variants and compares numpy results; only the sweeps inside
      the methods they call, integrated gradients' points and occlusion's variants, split),
      the head scores for recovery (their caches are read by layer index on the host, not
      traceable; zero-ablation's sweep of every head splits), and the deletion curves (host
      orderings). Values equal the one-device run's."""
    from tinyinterp import planted, sweeps

    rng = np.random.default_rng(seed)
    split = sweeps.sweep_mesh(devices) is not None
    base = {**METHODS, **BROKEN}
    methods = {name: functools.partial(m, devices=devices) if split and m in (_ig, _occlusion)
               else m for name, m in base.items()}  # their inner sweeps split
    props = {m: {p: [] for p in PROPERTIES} for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    # one config for every linear model (compiled programs are reused); weights, the chosen
    # features, the averaging head's index (in layer 0, where the broken method flips the
    # gradient) and the distractors are drawn
    metric, metric_b = A.logit(0), A.logit(1)
    for _ in range(n_models):
        lm = planted.linear_model(n_layers=2, n_heads=2, placement=(0, int(rng.integers(2))),
                                  n_features=5, n_chosen=int(rng.integers(1, 5)),
                                  distractor_scale=float(rng.uniform(0.1, 0.5)),
                                  seed=int(rng.integers(2**31)), attention_backend="xla")
        toks = jnp.asarray(rng.integers(0, lm.cfg.d_vocab, (3, lm.cfg.n_ctx)), jnp.int32)
        for name, method in methods.items():
            for p, ok in _check_all(method, lm, toks, metric, metric_b).items():
                props[name][p].append(ok)
    circuits = _circuits(n_models, seed, with_tracr)
    recovery: dict[str, list[float]] = {m: [] for m in (*COMPONENT_METHODS, *BROKEN)}
    aopc: dict[str, list[float]] = {m: [] for m in methods}
    attrs = _circuit_attributions(base, circuits, devices) if split else None
    for i, (_, model, toks, metric, mask) in enumerate(circuits):
        for name in recovery if mask is not None else ():
            recovery[name].append(T.recovery_scores(
                head_scores(name, model, toks, metric, devices), mask)[1])
        for name, method in methods.items():
            if attrs is not None and attrs[name][i] is not None:  # split with its group
                a, ms = attrs[name][i]
            else:
                method(model, toks, metric)  # compiled before it is timed
                t0 = time.perf_counter()
                a = T.attributions(method, model, toks, metric)
                ms = 1e3 * (time.perf_counter() - t0) / toks.shape[0]
            times[name].append(ms)
            score = (np.sqrt((a * a).sum(-1)) if name == "saliency" and a.ndim == 3
                     else T.per_position(a) if a.ndim > 2 else a)
            curves = T.faithfulness_curves(model, toks, metric, score, baseline_token=0)
            aopc[name].append(float(np.mean(curves.aopc_deletion)))

    def rate(v):
        v = [x for x in v if x is not None]
        return None if not v else float(np.mean(v))

    return {"properties": {m: {p: rate(v) for p, v in d.items()} for m, d in props.items()},
            "recovery": {m: float(np.mean(v)) for m, v in recovery.items()},
            "aopc": {m: float(np.mean(v)) for m, v in aopc.items()},
            "time_ms": {m: float(np.median(v)) for m, v in times.items()},
            "n_models": n_models, "circuits": [c[0] for c in circuits]}


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def table_markdown(res: dict) -> str:
    cols = [*PROPERTIES, "recovery AUROC", "deletion AOPC", "ms / explanation"]
    lines = ["| method | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    names = list(res["properties"]) + [m for m in res["recovery"] if m not in res["properties"]]
    for m in names:
        row = [_fmt(res["properties"].get(m, {}).get(p)) for p in PROPERTIES]
        row += [_fmt(res["recovery"].get(m)), _fmt(res["aopc"].get(m)),
                _fmt(res["time_ms"].get(m))]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def figure(res: dict):
    from matplotlib.figure import Figure  # no pyplot: safe under Agg and in threads

    names = list(res["properties"])
    grid = np.array([[np.nan if res["properties"][m][p] is None else res["properties"][m][p]
                      for p in PROPERTIES] for m in names])
    fig = Figure(figsize=(9, 0.5 * len(names) + 2))
    ax = fig.add_subplot()
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(len(PROPERTIES)), [p.replace("_", "\n") for p in PROPERTIES], fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}", ha="center",
                    va="center", fontsize=7)
    ax.set_title("pass rate of each property check on planted linear models")
    fig.colorbar(im, ax=ax, shrink=0.6)
    fig.tight_layout()
    return fig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="evaluate-methods", help="output folder (default: %(default)s)")
    p.add_argument("--n-models", type=int, default=3,
                   help="drawn models per kind (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tracr", action="store_true", help="skip the tracr-compiled programs")
    from tinyinterp.sweeps import add_devices_argument

    add_devices_argument(p)


def run(args) -> int:
    if args.n_models < 1:
        raise ValueError(f"--n-models must be >= 1, got {args.n_models}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = evaluate_methods(args.n_models, args.seed, with_tracr=not args.no_tracr,
                           devices=getattr(args, "devices", 1))
    res["seconds"] = time.perf_counter() - t0
    table = table_markdown(res)
    write_atomic(out / "table.md", table + "\n")
    write_atomic(out / "results.json", json.dumps(res, indent=2))
    save_figure(figure(res), out / "properties.png")
    caught = {m: [p for p in PROPERTIES if res["properties"][m][p] not in (None, 1.0)]
              for m in BROKEN}
    report = [
        "# Interpretability methods on models with known ground truth", "",
        f"{res['n_models']} drawn planted linear models (closed-form attributions) for the "
        f"property checks; {len(res['circuits'])} circuits for recovery and deletion AOPC: "
        + ", ".join(res["circuits"]) + ".", "",
        "Entries under the properties are pass rates; recovery is the AUROC of the planted heads "
        "among all heads (component methods and the broken ones); deletion AOPC is the mean drop "
        "of the metric as the highest-attributed tokens are replaced by token 0 (higher is "
        "better); time is the median wall time per explained sequence.", "", table, "",
        "![pass rates](properties.png)", "", "## The broken methods", ""]
    for m, props in caught.items():
        report.append(f"- **{m}** is caught by: {', '.join(props) if props else 'nothing'}.")
        report += [f"  - {p} cannot see it: {why}." for (b, p), why in BLIND_SPOTS.items()
                   if b == m]
    report += ["", f"Total time: {res['seconds']:.1f} s."]
    write_atomic(out / "report.md", "\n".join(report) + "\n")
    print(table)
    print(f"wrote {out}/report.md, table.md, results.json, properties.png in {res['seconds']:.1f} s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tinyinterp evaluate-methods")
    add_arguments(p)
    return run(p.parse_args(argv))
