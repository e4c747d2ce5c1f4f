"""Attribution graphs (tinyinterp.graphs): exactness of the edges, pruning and scores against a
hand-computed graph, ground truth (a transcoder equal to the MLP, planted MLP circuits, an
attention-only model), interventions equal to edges, and clear errors for bad input."""

import numpy as np
import pytest
import scipy.sparse as sp

import tinyinterp
from tinyinterp import graphs
from tinyinterp import transcoders as T


def _cfg(**kw):
    base = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=20, n_ctx=16, d_mlp=48,
                act_fn="relu")
    return tinyinterp.TransformerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ln_model():
    return tinyinterp.HookedTransformer.from_config(_cfg(), seed=1)


PROMPT = np.array([3, 7, 1, 12, 7, 5, 18, 2, 9, 7], np.int32)


def assert_exact(g: graphs.AttributionGraph):
    """Each target's incoming edges plus its constant equal its pre-activation (float32)."""
    A = g.adjacency
    total = np.asarray(A.sum(axis=1), np.float64).ravel() + g.constant
    scale = np.asarray(abs(A).sum(axis=1), np.float64).ravel() + np.abs(g.constant)
    rows = np.r_[0:g.n_features, g.logit_start:g.n_nodes]
    err = np.abs(total - g.values)[rows]
    assert np.all(err <= 1e-5 * scale[rows] + 1e-6 * scale.max()), err.max()
    # error and token nodes are sources only
    assert np.diff(A.indptr)[g.n_features:g.logit_start].sum() == 0


@pytest.mark.parametrize("case", ["mlp", "clt_jumprelu_skip_lnpre"])
def test_edges_plus_constant_equal_the_pre_activation(ln_model, case):
    if case == "mlp":
        model, tc = ln_model, T.from_mlps(ln_model)
    else:  # cross-layer JumpReLU transcoders with skip connections on a GELU LNPre model
        model = tinyinterp.HookedTransformer.from_config(
            _cfg(normalization_type="LNPre", act_fn="gelu", n_layers=3), seed=2)
        tc = T.random_transcoders(model.cfg, 64, architecture="jumprelu", skip=True,
                                  cross_layer=True, seed=3)
    g = graphs.attribution_graph(model, tc, PROMPT, batch_size=64)
    assert g.n_features > 0 and g.n_logits >= 1
    assert_exact(g)
    # the logit nodes: the top tokens covering 95% (at most 10), values = logit - mean logit
    logits = np.asarray(model(PROMPT[None])[0, -1], np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p)[:10]
    n = min(int(np.searchsorted(np.cumsum(p[top]), 0.95)) + 1, 10)
    np.testing.assert_array_equal(g.logit_tokens, top[:n])
    np.testing.assert_allclose(g.values[g.logit_start:], logits[top[:n]] - logits.mean(),
                               rtol=1e-5, atol=1e-5)
    if case != "mlp":  # random transcoders leave errors; every error node is an MLP's residue
        assert g.error_norms.max() > 0
    if case == "mlp":  # chunking does not change the rows
        g2 = graphs.attribution_graph(model, tc, PROMPT, batch_size=1000)
        np.testing.assert_allclose(g2.dense(), g.dense(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- golden pruning
def _hand_graph(logit_p=0.5):
    """Nodes f0 f1 | e0 | t0 | L (one layer, one position). Edges (target <- source: weight):
    f0 <- t0: 2; f1 <- t0: -1; L <- f0: 3, f1: -1, e0: 1."""
    A = np.zeros((5, 5), np.float32)
    A[0, 3], A[1, 3] = 2.0, -1.0
    A[4, 0], A[4, 1], A[4, 2] = 3.0, -1.0, 1.0
    return graphs.AttributionGraph(
        sp.csr_matrix(A), np.zeros(5, np.float32), np.zeros(5, np.float32),
        np.array([0]), np.array([[0, 0, 0], [0, 0, 1]]), np.ones(2, np.float32), np.array([4]),
        np.array([logit_p], np.float32), 1, np.zeros((1, 1), np.float32))


def test_pruning_and_scores_match_a_hand_computed_graph():
    g = _hand_graph(0.5)
    # row-normalised |A|: f0 <- t0: 1; f1 <- t0: 1; L <- f0 .6, f1 .2, e0 .2.
    # influence w A + w A^2 (w = 0.5 on L): f0 .3, f1 .1, e0 .1, then t0 .5 * (.6 + .2) = .4
    np.testing.assert_allclose(graphs.node_influence(g), [0.3, 0.1, 0.1, 0.4, 0.0], atol=1e-7)
    s = graphs.graph_scores(g)
    # replacement: tokens .4 / (tokens .4 + errors .1) = .8
    # completeness: sum((1 - error share of inputs) * (influence + w)) / sum(influence + w)
    #             = (.3 + .1 + .1 + .4 + .8 * .5) / (.3 + .1 + .1 + .4 + .5) = 1.3 / 1.4
    assert s.replacement == pytest.approx(0.8, abs=1e-6)
    assert s.completeness == pytest.approx(1.3 / 1.4, abs=1e-6)
    # node threshold .6: sorted influence .4 .3 .1 .1 0 (total .9), cumulative .444 .778 ...:
    # the first to reach .6 is .3 -> keep f0 (and t0, L: tokens and logits always)
    pr = graphs.prune_graph(g, node_threshold=0.6, edge_threshold=0.98)
    np.testing.assert_array_equal(pr.node_mask, [True, False, False, True, True])
    # pruned graph f0 <- t0 (1), L <- f0 (1): both edges carry influence .5, both kept
    tgt, src, wt = pr.edges()
    assert sorted(zip(tgt.tolist(), src.tolist(), strict=True)) == [(0, 3), (4, 0)]
    np.testing.assert_allclose(sorted(wt), [2.0, 3.0])
    np.testing.assert_allclose(pr.cumulative_scores, [0.7777778, 0.8888889, 1.0, 0.4444444, 1.0],
                               atol=1e-6)
    # the defaults (0.8, 0.98): the .8 mark is reached at the .1s (f1 and e0 tie): every node is
    # kept; edge influences f0<-t0 .3, f1<-t0 .1, L<-f0 .3, L<-f1 .1, L<-e0 .1 (of .9): all kept
    pr = graphs.prune_graph(g)
    assert pr.node_mask.all() and pr.edge_mask.sum() == 5
    # an edge threshold of .6 keeps the two .3 edges; f1 and e0 lose their edges and are dropped
    pr = graphs.prune_graph(g, edge_threshold=0.6)
    np.testing.assert_array_equal(pr.node_mask, [True, False, False, True, True])
    assert pr.edge_mask.sum() == 2
    for bad in (-0.1, 1.5, float("nan"), "0.8"):
        with pytest.raises(ValueError, match="node_threshold"):
            graphs.prune_graph(g, node_threshold=bad)


def test_threshold_of_many_scores_equals_the_sorting_definition():
    rng = np.random.default_rng(0)
    s = (rng.pareto(1.5, 300_000) * (rng.random(300_000) < 0.3)).astype(np.float32)
    for frac in (0.5, 0.8, 0.98, 1.0):
        srt = -np.sort(-s)
        cum = np.cumsum(srt, dtype=np.float64) / s.sum(dtype=np.float64)
        want = srt[min(int(np.searchsorted(cum, frac)), s.size - 1)]
        assert graphs._threshold(s, frac) == want


# ----------------------------------------------------------------------------- ground truth
def test_transcoder_equal_to_the_mlp_has_no_error_and_scores_fall_with_its_decoder(ln_model):
    tc = T.from_mlps(ln_model)
    g = graphs.attribution_graph(ln_model, tc, PROMPT)
    assert g.error_norms.max() < 1e-5
    s = graphs.graph_scores(g)
    assert s.replacement == pytest.approx(1.0, abs=1e-5)
    assert s.completeness == pytest.approx(1.0, abs=1e-5)
    scores = []
    for alpha in (1.0, 0.8, 0.6, 0.4, 0.2):
        scaled = tc.replace([{**p, "W_dec": alpha * p["W_dec"]} for p in tc.params])
        gs = graphs.graph_scores(graphs.attribution_graph(ln_model, scaled, PROMPT))
        scores.append((gs.replacement, gs.completeness))
    r, c = np.array(scores).T
    assert np.all(np.diff(r) < 0) and np.all(np.diff(c) < 0), scores


def planted_mlp_circuit(a_tok=3, b_tok=5, seed=0):
    """A 2-layer model without norms whose only route to the logits is planted: token ``a_tok``
    fires layer-0 neuron 0 (writing dim 16), a previous-token head in layer 1 moves it to the next
    position (dim 17), layer-1 neuron 0 fires there (dim 18) and raises the logit of ``b_tok``.
    Every other neuron (distractors, random) reads everything and writes only to dims 19.."""
    cfg = tinyinterp.TransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_vocab=8,
                                       n_ctx=8, d_mlp=8, normalization_type=None, act_fn="relu")
    rng = np.random.default_rng(seed)
    P = tinyinterp.init_params(cfg, __import__("jax").random.key(0))
    P = __import__("jax").tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32), P)
    P["embed"]["W_E"][:, 0:8] = np.eye(8)
    P["pos_embed"]["W_pos"][:, 8:16] = np.eye(8)
    for layer in range(2):
        m = P["blocks"][layer]["mlp"]
        m["W_in"][:, 1:] = 0.5 * rng.standard_normal((32, 7))
        m["b_in"][1:] = 0.1 * rng.standard_normal(7)
        m["W_out"][1:, 19:] = rng.standard_normal((7, 13))
    P["blocks"][0]["mlp"]["W_in"][a_tok, 0] = 1.0
    P["blocks"][0]["mlp"]["W_out"][0, 16] = 1.0
    a = P["blocks"][1]["attn"]
    s = 30.0 * 4.0  # SHARPNESS * sqrt(d_head)
    a["W_Q"][0][8 + np.arange(8), np.maximum(np.arange(8) - 1, 0)] = s
    a["W_K"][0][8 + np.arange(8), np.arange(8)] = 1.0
    a["W_V"][0][16, 0] = 1.0
    a["W_O"][0][0, 17] = 1.0
    P["blocks"][1]["mlp"]["W_in"][17, 0] = 1.0
    P["blocks"][1]["mlp"]["b_in"][0] = -0.5
    P["blocks"][1]["mlp"]["W_out"][0, 18] = 1.0
    P["unembed"]["W_U"][18, b_tok] = 20.0
    import jax.numpy as jnp
    P = __import__("jax").tree_util.tree_map(jnp.asarray, P)
    return tinyinterp.HookedTransformer(cfg, P)


def test_planted_mlp_circuit_survives_pruning(planted_graph):
    model, tc, prompt, g, pr = planted_graph  # a_tok=3 at position 2, the answer read at 3
    assert g.logit_tokens.tolist() == [5]
    assert_exact(g)
    planted = [g.token_node(2), g.feature_node(0, 2, 0), g.feature_node(1, 3, 0), g.logit_node(5)]
    assert pr.node_mask[planted].all()
    kept_features = {tuple(g.active_features[i]) for i in pr.nodes if i < g.n_features}
    assert kept_features == {(0, 2, 0), (1, 3, 0)}  # distractors carry no influence
    tgt, src, _ = pr.edges()
    chain = {(planted[1], planted[0]), (planted[2], planted[1]), (planted[3], planted[2])}
    assert chain <= set(zip(tgt.tolist(), src.tolist(), strict=True))


@pytest.fixture(scope="module")
def planted_graph():
    model = planted_mlp_circuit()
    prompt = np.array([1, 6, 3, 4], np.int32)
    tc = T.from_mlps(model)
    g = graphs.attribution_graph(model, tc, prompt)
    return model, tc, prompt, g, graphs.prune_graph(g)


def test_frontend_json_schema_and_node_ids(planted_graph, tmp_path):
    import json
    model, tc, prompt, g, pr = planted_graph
    labels = [chr(ord("a") + i) for i in range(8)]
    graphs.save_graph_json(tmp_path / "g.json", pr, slug="planted", token_labels=labels)
    d = json.loads((tmp_path / "g.json").read_text())
    assert set(d) == {"metadata", "qParams", "nodes", "links"}
    assert d["metadata"]["slug"] == "planted" and d["metadata"]["prompt_tokens"] == list("bgde")
    assert d["metadata"]["node_threshold"] == 0.8
    ids = {n["node_id"]: n for n in d["nodes"]}
    # circuit-tracer's ids: feature {layer}_{feature}_{pos}, token E_{id}_{pos}, logit
    # {n_layers + 1}_{id}_{pos}; error 0_{layer}_{pos}
    assert {"0_0_2", "1_0_3", "E_3_2", "3_5_3"} <= set(ids)
    assert ids["0_0_2"]["feature_type"] == "cross layer transcoder"
    assert ids["0_0_2"]["activation"] == pytest.approx(1.0)
    assert ids["3_5_3"]["feature_type"] == "logit" and ids["3_5_3"]["is_target_logit"]
    assert ids["3_5_3"]["clerp"].startswith('Output "f" (p=')
    assert ids["E_3_2"]["layer"] == "E" and ids["E_3_2"]["jsNodeId"] == "E_3-2"
    keys = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
            "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence",
            "activation"}
    assert all(set(n) == keys for n in d["nodes"])
    A = g.dense()
    for link in d["links"]:
        assert link["source"] in ids and link["target"] in ids
    w = {(lk["target"], lk["source"]): lk["weight"] for lk in d["links"]}
    assert w[("1_0_3", "0_0_2")] == pytest.approx(float(A[g.feature_node(1, 3, 0),
                                                           g.feature_node(0, 2, 0)]))
    assert len(d["links"]) == pr.edge_mask.sum()


def test_graph_view_in_chromium(planted_graph, tmp_path):
    from tinyinterp.views import graph_view
    from tinyinterp.views._chromium import Browser, find_chromium
    if find_chromium() is None:
        import os
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is not installed")
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    model, tc, prompt, g, pr = planted_graph
    labels = [chr(ord("a") + i) for i in range(8)]
    data = np.array([[1, 6, 3, 4], [3, 3, 0, 1], [2, 2, 2, 2]], np.int32)
    ex = graphs.feature_examples(model, tc, data, [(0, 0), (1, 0)], n_examples=2, context=2)
    assert [e["seq"] for e in ex["0_0"]] == [0, 1] and ex["0_0"][0]["max"] == pytest.approx(1.0)
    view = graph_view(pr, examples=ex, token_labels=labels)
    path = view.save(tmp_path / "graph.html")
    d = graphs.graph_json(pr)
    with Browser() as b:
        page = b.page()
        page.open(path)
        assert page.eval("document.querySelector('.ti-view').getAttribute('data-ti-ready')") == "1"
        assert page.eval("document.querySelectorAll('.ti-node').length") == len(d["nodes"])
        assert page.eval("document.querySelectorAll('line.ti-edge').length") == len(d["links"])
        page.hover('[data-node="0_0_2"]')
        text = page.eval("document.querySelector('.ti-tip').textContent")
        assert "feature 0 of layer 0 at pos 2" in text and "activation: 1.0000" in text
        assert "top-activating examples" in text and "b g [d] e" in text
        page.click('[data-node="1_0_3"]')
        n_edges = sum(1 for lk in d["links"] if "1_0_3" in (lk["source"], lk["target"]))
        assert page.eval("document.querySelectorAll('line.ti-edge:not(.ti-dim)').length") == n_edges
        assert page.console_errors() == []
        urls = page.requests()
        assert urls[0].endswith("graph.html") and all(u.startswith("data:") for u in urls[1:])
        page.screenshot(tmp_path / "graph.png")


def test_attention_only_model_has_only_tokens_and_logits():
    cfg = _cfg(attn_only=True)
    model = tinyinterp.HookedTransformer.from_config(cfg, seed=7)
    g = graphs.attribution_graph(model, None, PROMPT)
    assert g.n_features == 0 and g.n_errors == 0
    assert_exact(g)
    infl = graphs.node_influence(g)
    assert infl[g.token_start:g.logit_start].sum() > 0
    assert np.all(infl[:g.token_start] == 0) and np.all(infl[g.logit_start:] == 0)
    s = graphs.graph_scores(g)
    assert s.replacement == 1.0 and s.completeness == pytest.approx(1.0)


# ----------------------------------------------------------------------------- interventions
def test_each_edge_equals_an_intervention_under_full_freezing(ln_model):
    tc = T.random_transcoders(ln_model.cfg, 48, architecture="jumprelu", skip=True,
                              cross_layer=True, seed=3)
    g = graphs.attribution_graph(ln_model, tc, PROMPT)
    A = g.dense()
    layer1 = np.nonzero(g.active_features[:, 0] == 1)[0]
    strength = np.abs(A[:, :g.n_features]).sum(axis=0) * (g.active_features[:, 0] == 0)
    for s in np.argsort(-strength)[:2]:
        layer, pos, f = (int(v) for v in g.active_features[s])
        r = graphs.intervene(ln_model, tc, PROMPT, [graphs.FeatureIntervention(layer, pos, f,
                                                                               scale=2.0)],
                             constrained_layers=(0, 2))
        assert r.changed[0][:3] == (layer, pos, f) and r.changed[0][4] == pytest.approx(
            2 * g.activations[s], rel=1e-6)
        tl, tp, tf = g.active_features[layer1].T
        moved = r.pre_activations[1][tp, tf] - r.clean_pre_activations[1][tp, tf]
        scale = np.abs(A[layer1, s]).max()
        np.testing.assert_allclose(moved, A[layer1, s], atol=1e-5 * scale)
        got = [r.logit_change(int(t)) for t in g.logit_tokens]
        np.testing.assert_allclose(got, A[g.logit_start:, s], atol=1e-5 * scale)


def test_unconstrained_intervention_runs_the_real_mlps(ln_model):
    import jax.numpy as jnp
    tc = T.from_mlps(ln_model)
    g = graphs.attribution_graph(ln_model, tc, PROMPT)
    layer, pos, f = (int(v) for v in g.active_features[0])
    assert layer == 0
    # a transcoder equal to the MLP: setting its feature to 0 is ablating the neuron
    r = graphs.intervene(ln_model, tc, PROMPT, [(layer, pos, f, 0.0)])

    def ablate(v, *, name):
        return v.at[:, pos, f].set(0.0)

    want = ln_model.run_with_hooks(jnp.asarray(PROMPT)[None],
                                   fwd_hooks=[("blocks.0.mlp.hook_post", ablate)])[0]
    np.testing.assert_allclose(r.logits, np.asarray(want), rtol=1e-5, atol=1e-5)
    # the downstream features move with it (the real MLPs run), the changed list has them
    assert (0, pos, f) in [c[:3] for c in r.changed] and any(c[0] == 1 for c in r.changed)
    # a negative multiple, constrained: its activation is flipped, the others held
    r = graphs.intervene(ln_model, tc, PROMPT, [graphs.FeatureIntervention(layer, pos, f,
                                                                           scale=-1.5)],
                         constrained_layers=(0, 2))
    assert r.activations[0][pos, f] == pytest.approx(-1.5 * g.activations[0], rel=1e-6)
    assert [c[:3] for c in r.changed] == [(layer, pos, f)]
    # no intervention: nothing changes, in either mode
    for kw in ({}, {"constrained_layers": (0, 2)}):
        r = graphs.intervene(ln_model, tc, PROMPT, [], **kw)
        np.testing.assert_allclose(r.logits, r.clean_logits, rtol=1e-5, atol=1e-5)
        assert r.changed == []


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gets_clear_errors(ln_model):
    tc = T.from_mlps(ln_model)
    other = tinyinterp.HookedTransformer.from_config(_cfg(d_model=16, d_head=4), seed=0)
    with pytest.raises(ValueError, match="d_model=32"):
        graphs.attribution_graph(ln_model, T.from_mlps(other), PROMPT)
    with pytest.raises(ValueError, match="1 transcoders for a model with 2 MLP layers"):
        graphs.attribution_graph(ln_model, tc.replace(tc.params[:1]), PROMPT)
    with pytest.raises(ValueError, match="exceeds n_ctx=16"):
        graphs.attribution_graph(ln_model, tc, np.zeros(17, np.int32))
    with pytest.raises(ValueError, match="one prompt"):
        graphs.attribution_graph(ln_model, tc, np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="d_vocab=20"):
        graphs.attribution_graph(ln_model, tc, np.array([1, 20], np.int32))
    with pytest.raises(TypeError, match="Transcoders"):
        graphs.attribution_graph(ln_model, [tc.params[0]], PROMPT)
    attn_only = tinyinterp.HookedTransformer.from_config(_cfg(attn_only=True), seed=0)
    with pytest.raises(ValueError, match="attention-only"):
        graphs.attribution_graph(attn_only, tc, PROMPT)
    with pytest.raises(ValueError, match="unknown feature 48"):
        graphs.intervene(ln_model, tc, PROMPT, [graphs.FeatureIntervention(0, 1, 48, value=1.0)])
    with pytest.raises(ValueError, match="unknown layer 2"):
        graphs.intervene(ln_model, tc, PROMPT, [graphs.FeatureIntervention(2, 1, 0, value=1.0)])
    with pytest.raises(ValueError, match="outside the prompt"):
        graphs.intervene(ln_model, tc, PROMPT, [graphs.FeatureIntervention(0, 10, 0, value=1.0)])
    with pytest.raises(ValueError, match="exactly one"):
        graphs.intervene(ln_model, tc, PROMPT, [graphs.FeatureIntervention(0, 1, 0, 1.0, 2.0)])
    with pytest.raises(ValueError, match="constrained_layers"):
        graphs.intervene(ln_model, tc, PROMPT, [], constrained_layers=(0, 3))


# ----------------------------------------------------------------------------- reproduction
def test_reproduce_attribution_graphs_quick(tmp_path, capsys):
    import json

    from tinyinterp.cli import main
    assert main(["reproduce", "attribution-graphs", "--quick", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["model"]["held_out_accuracy"] > 0.9  # the held-out triples need the composition
    for row in r["transcoders"]["layers"]:
        assert row["normalized_mse"] < 0.2 and 0 < row["l0"] < 48
    assert r["transcoders"]["prediction_agreement"] > 0.9
    assert r["graphs"]["n"] == 4 and 0 < r["graphs"]["mean_replacement"] <= 1
    assert all(0.0 <= v <= 1.0 for v in r["swap_success"].values())
    names = {p.name for p in tmp_path.iterdir()}
    assert {"report.md", "report.json", "graphs.json", "intermediate_features.png",
            "transcoders_and_swaps.png"} <= names
    graph_files = sorted(n for n in names if n.startswith("graph_") and n.endswith(".json"))
    assert len(graph_files) == 2
    d = json.loads((tmp_path / graph_files[0]).read_text())
    assert d["nodes"] and d["metadata"]["prompt_tokens"][0].startswith("x")
    assert (tmp_path / graph_files[0].replace(".json", ".html")).stat().st_size < 200_000
    assert "held-out prompts" in capsys.readouterr().out


# ----------------------------------------------------------------------------- circuit-tracer
def test_edges_pruning_and_scores_match_circuit_tracer():
    """The same weights in circuit-tracer (a TransformerLens state dict + its per-layer JumpReLU
    transcoders) give the same graph. Its conventions, matched here: transcoders read the MLP
    input after ln2's affine (so ln2 is the identity affine), token nodes hold the token embedding
    only (so W_pos = 0), features and errors at position 0 are dropped (so they are removed from
    ours before pruning and scores)."""
    import types

    pytest.importorskip("torch", reason="circuit-tracer parity needs torch")
    try:
        import huggingface_hub.constants as hc  # circuit-tracer 0.5 imports a name newer hubs lack
        if not hasattr(hc, "HF_HUB_ENABLE_HF_TRANSFER"):
            hc.HF_HUB_ENABLE_HF_TRANSFER = False
        from circuit_tracer.attribution.attribute import attribute
        from circuit_tracer.graph import compute_graph_scores
        from circuit_tracer.graph import prune_graph as ct_prune
        from circuit_tracer.replacement_model import ReplacementModel
        from circuit_tracer.transcoder.activation_functions import JumpReLU
        from circuit_tracer.transcoder.single_layer_transcoder import (
            SingleLayerTranscoder,
            TranscoderSet,
        )
    except ImportError as e:
        pytest.skip(f"circuit-tracer is not installed (an optional extra: pip install "
                    f"circuit-tracer): {e}")
    import jax
    import jax.numpy as jnp
    import torch
    from transformer_lens import HookedTransformerConfig

    from tinyinterp import interop

    model = tinyinterp.HookedTransformer.from_config(_cfg(), seed=1)
    P = jax.tree_util.tree_map(lambda x: x, model.params)
    P["pos_embed"]["W_pos"] = jnp.zeros_like(P["pos_embed"]["W_pos"])
    for b in P["blocks"]:
        b["ln2"]["w"], b["ln2"]["b"] = jnp.ones_like(b["ln2"]["w"]), jnp.zeros_like(b["ln2"]["b"])
    model = model.with_params(P)
    tc = T.random_transcoders(model.cfg, 64, architecture="jumprelu", threshold=0.3, seed=3)
    ours = graphs.attribution_graph(model, tc, PROMPT)

    c = model.cfg
    tl_cfg = HookedTransformerConfig(n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads,
                                     d_head=c.d_head, d_vocab=c.d_vocab, n_ctx=c.n_ctx,
                                     d_mlp=c.d_mlp, act_fn="relu", normalization_type="LN",
                                     dtype=torch.float32, device="cpu")
    sets = {}
    for layer, p in enumerate(tc.params):
        t = SingleLayerTranscoder(c.d_model, 64, JumpReLU(torch.tensor(np.exp(np.asarray(
            p["log_threshold"]))), 0.1), layer_idx=layer, dtype=torch.float32,
            device=torch.device("cpu"))
        with torch.no_grad():
            t.W_enc.copy_(torch.tensor(np.asarray(p["W_enc"]).T))
            t.b_enc.copy_(torch.tensor(np.asarray(p["b_enc"])))
            t.W_dec.copy_(torch.tensor(np.asarray(p["W_dec"])[:, 0]))
            t.b_dec.copy_(torch.tensor(np.asarray(p["b_dec"])))
        sets[layer] = t
    rm = ReplacementModel.from_config(tl_cfg, TranscoderSet(
        sets, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out"))
    sd = {k.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed."):
          torch.tensor(np.asarray(v)) for k, v in interop.to_transformer_lens_state_dict(model).items()}
    rm.load_state_dict(sd, strict=False)
    rm.tokenizer = types.SimpleNamespace(  # token ids in, unchanged (no BOS is prepended)
        all_special_ids=list(range(c.d_vocab)), padding_side="right", vocab_size=c.d_vocab,
        bos_token_id=None, pad_token_id=None, eos_token_id=None,
        decode=lambda t: " ".join(map(str, np.atleast_1d(np.asarray(t)).tolist())))
    theirs = attribute(torch.tensor(PROMPT).long(), rm, batch_size=64)

    af = theirs.active_features.numpy()[theirs.selected_features.numpy()]
    assert np.all(af[:, 1] > 0)  # circuit-tracer drops position 0
    keep = [ours.feature_node(*map(int, r)) for r in af]
    idx = keep + list(range(ours.error_start, ours.n_nodes))
    A = ours.dense()[np.ix_(idx, idx)]
    A[:, [len(keep) + layer * ours.n_pos for layer in range(ours.n_layers)]] = 0.0  # errors at 0
    A_t = theirs.adjacency_matrix.numpy()
    np.testing.assert_array_equal(ours.logit_tokens,
                                  [int(t.vocab_idx) for t in theirs.logit_targets])
    np.testing.assert_allclose(A, A_t, atol=1e-5 * np.abs(A_t).max())
    sub = graphs.AttributionGraph(sp.csr_matrix(A), np.zeros(len(idx), np.float32),
                                  np.zeros(len(idx), np.float32), ours.tokens, af,
                                  ours.activations[keep], ours.logit_tokens,
                                  ours.logit_probabilities, ours.n_layers, ours.error_norms)
    s = graphs.graph_scores(sub)
    np.testing.assert_allclose([s.replacement, s.completeness], compute_graph_scores(theirs),
                               atol=1e-5)
    pt, po = ct_prune(theirs), graphs.prune_graph(sub)
    np.testing.assert_array_equal(pt.node_mask.numpy(), po.node_mask)
    tgt, src, _ = po.edges()
    mine = np.zeros(A.shape, bool)
    mine[tgt, src] = True
    np.testing.assert_array_equal(pt.edge_mask.numpy(), mine)
    np.testing.assert_allclose(pt.cumulative_scores.numpy(), po.cumulative_scores, atol=1e-5)
